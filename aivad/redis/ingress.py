"""Redis ingress (DESIGN §5): a stream read through a consumer group, and pub/sub channels."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import attrs
import coredis
import coredis.exceptions
import trio

from aivad.envelope import BadMessage, Envelope
from aivad.protocol import loads_json

from .client import (
    _CLIENT_ERRORS,
    RedisLogError,
    RedisUnavailable,
    _errors,
    _raise_single,
    _raw_reply,
    _text,
    _translate,
)
from .log import RedisLog

log = logging.getLogger(__name__)


# ---- ingress: a stream read through a consumer group ------------------------------------------

_ENTRY_FIELDS = frozenset({"type", "payload", "message_id", "metadata", "timestamp"})
_MAX_MESSAGE_ID = 255


def _loads(value: str, what: str) -> Any:
    try:
        return loads_json(value)
    except ValueError as exc:
        raise BadMessage(f"{what} is not JSON: {exc}") from None


#: bytes of each value an oversized entry's dead letter keeps
_HEAD_BYTES = 256


def envelope_from_entry(fields: Mapping[str, str], default_message_id: str) -> Envelope:
    """Turn one ingest stream entry into an envelope (DESIGN §5). Raises BadMessage.

    An entry carries ``envelope`` (an envelope as JSON; ``message_id`` may stand
    beside it), or ``type`` + ``payload`` (JSON) with optional ``message_id``,
    ``metadata`` (a JSON object) and ``timestamp``. Any other field is an error
    (a misspelt ``paylaod`` must not pass unnoticed). Without a ``message_id``
    the entry's own id is used (``default_message_id``), so an entry delivered
    twice is stored once.
    """
    if "envelope" in fields:
        extra = set(fields) - {"envelope", "message_id"}
        if extra:
            raise BadMessage(f"an entry with envelope takes only message_id beside it, not {', '.join(sorted(extra))}")
        obj = _loads(fields["envelope"], "envelope")
        if not isinstance(obj, dict):
            raise BadMessage("envelope must be a JSON object")
        if obj.get("message_id") is None:
            obj = {**obj, "message_id": fields.get("message_id") or default_message_id}
        return Envelope.from_wire(obj)
    unknown = set(fields) - _ENTRY_FIELDS
    if unknown:
        raise BadMessage(f"unknown entry fields {', '.join(sorted(unknown))} (an entry has envelope, "
                         f"or type and payload with optional message_id, metadata, timestamp)")
    if "type" not in fields:
        raise BadMessage("an entry needs envelope, or type and payload")
    payload = _loads(fields["payload"], "payload") if "payload" in fields else None
    metadata = _loads(fields["metadata"], "metadata") if "metadata" in fields else None
    return Envelope.from_fields(fields["type"], payload, metadata, fields.get("message_id") or default_message_id,
                                fields.get("timestamp"))


def _entry_message_id(stream: str, entry_id: str) -> str:
    name = f"{stream}/{entry_id}"
    if len(name) > _MAX_MESSAGE_ID:
        name = f"{hashlib.sha1(stream.encode()).hexdigest()}/{entry_id}"
    return name


@attrs.frozen
class IngressStatistics:
    stream: str
    group: str
    consumer: str
    read: int
    claimed: int
    acked: int
    rejected: int


@attrs.frozen
class IngressEntry:
    """One entry of the ingest stream: its id, its fields, and the envelope or why there is none."""

    entry_id: str
    fields: dict[str, str]
    envelope: Envelope | None
    error: str | None


class RedisIngress:
    """Reads ``ingest_stream`` through a consumer group; acknowledges only what the caller says.

    ``await read()`` returns the next non-empty list of :class:`IngressEntry`:
    first this consumer's own pending entries (delivered before a crash or a
    lost connection, not acknowledged), then, every ``claim_interval_s``,
    entries that another consumer has held for ``claim_idle_s`` without
    acknowledging (a dead node's, ``XAUTOCLAIM``), then new ones (``XREADGROUP
    >`` with ``BLOCK``). Nothing is acknowledged by reading:

    * :meth:`ack` after the entries are committed (``XACK``);
    * :meth:`reject` for entries that cannot be taken (``entry.error`` is set, or
      the caller refused them): a copy with the reason goes to the dead-letter
      stream (bounded, ``MAXLEN ~ dead_max``), then the entry is acknowledged.

    ``XAUTOCLAIM`` takes any entry pending longer than ``claim_idle_s``, this
    consumer's own included: an entry read but neither acknowledged nor
    rejected for that long comes again. Entries are delivered at least once;
    since the envelope of an entry without ``message_id`` gets the entry's id
    as one, the log stores each once. After :class:`RedisUnavailable` (in a
    read, an ack or a reject) the next ``read()`` starts again with the own
    pending entries: what was read but not acknowledged comes back.
    """

    def __init__(self, redis_log: RedisLog, stream: str, *, group: str = "aivad", consumer: str,
                 count: int = 100, block_s: float = 1.0, claim_idle_s: float = 60.0, claim_interval_s: float = 10.0,
                 dead_stream: str | None = None, dead_max: int = 10_000, start_id: str = "0",
                 max_entry_bytes: int = 1_048_576) -> None:
        if count < 1 or dead_max < 1:
            raise ValueError("count and dead_max must be >= 1")
        #: an entry whose fields and values are longer together is refused unparsed (a dead letter)
        self.max_entry_bytes = max_entry_bytes
        self._log = redis_log
        self._client = redis_log.client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.dead_stream = dead_stream or redis_log.settings.key("ingest-dead")
        self._count = count
        self._block_ms = max(1, round(block_s * 1000))
        self._claim_idle_ms = max(1, round(claim_idle_s * 1000))
        self._claim_interval_s = claim_interval_s
        self._dead_max = dead_max
        self._start_id = start_id
        self._op_timeout_s = redis_log.settings.op_timeout_s
        #: reading this consumer's own pending entries after this id; None: done, read new ones
        self._pending_from: str | None = "0"
        self._claim_from = "0-0"
        self._claim_due = trio.current_time()
        self._group_ready = False
        self.read_entries = 0
        self.claimed = 0
        self.acked = 0
        self.rejected = 0

    def __aiter__(self) -> RedisIngress:
        return self

    async def __anext__(self) -> list[IngressEntry]:
        return await self.read()

    async def ensure_group(self) -> None:
        """Create the stream and the group (from ``start_id``) unless they exist."""
        with (_errors("create ingest group"), trio.fail_after(self._op_timeout_s),
              contextlib.suppress(coredis.exceptions.StreamDuplicateConsumerGroupError)):  # BUSYGROUP
            await self._client.xgroup_create(self.stream, self.group, self._start_id, mkstream=True)
        self._group_ready = True

    async def read(self) -> list[IngressEntry]:
        try:
            while True:
                if not self._group_ready:
                    await self.ensure_group()
                try:
                    entries = await self._read_once()
                except coredis.exceptions.StreamConsumerGroupError:  # NOGROUP
                    log.warning("redis ingress %s: group %s is gone (Redis lost it?); creating it again",
                                self.stream, self.group)
                    self._group_ready = False
                    self._pending_from = "0"
                    continue
                if entries:
                    self.read_entries += len(entries)
                    return entries
        except _CLIENT_ERRORS as exc:
            self._pending_from = "0"
            translated = _translate(exc, f"ingress {self.stream}")
            assert translated is not None
            raise translated from exc
        except RedisLogError:
            self._pending_from = "0"
            raise

    async def _read_once(self) -> list[IngressEntry]:
        # Raw replies: coredis's typed XREADGROUP reply fails on a pending entry whose fields are
        # nil (deleted from the stream while pending) — exactly what this must survive.
        stream = self.stream
        if self._pending_from is not None:
            with trio.fail_after(self._op_timeout_s):
                found = await self._client.create_request(
                    b"XREADGROUP", b"GROUP", self.group, self.consumer, b"COUNT", self._count,
                    b"STREAMS", stream, self._pending_from, callback=_raw_reply)
            raw = found.get(stream.encode(), ()) if found else ()
            if not raw:
                self._pending_from = None
                return []
            self._pending_from = _text(raw[-1][0])
            return await self._entries(raw)
        now = trio.current_time()
        if now >= self._claim_due:
            with trio.fail_after(self._op_timeout_s):
                next_from, claimed, *_ = await self._client.create_request(
                    b"XAUTOCLAIM", stream, self.group, self.consumer, self._claim_idle_ms, self._claim_from,
                    b"COUNT", self._count, callback=_raw_reply)
            self._claim_from = _text(next_from)
            if self._claim_from == "0-0":
                self._claim_due = now + self._claim_interval_s
            if claimed:
                self.claimed += len(claimed)
                log.info("redis ingress %s: claimed %d entries idle for %.1fs or more", stream, len(claimed),
                         self._claim_idle_ms / 1000)
                return await self._entries(claimed)
        timeout = self._block_ms / 1000 + self._op_timeout_s
        with trio.fail_after(timeout):
            found = await self._client.create_request(
                b"XREADGROUP", b"GROUP", self.group, self.consumer, b"COUNT", self._count, b"BLOCK", self._block_ms,
                b"STREAMS", stream, b">", callback=_raw_reply)
        return await self._entries(found.get(stream.encode(), ()) if found else ())

    async def _entries(self, raw: Sequence[Any]) -> list[IngressEntry]:
        entries = []
        deleted = []
        for ident, flat in raw:
            entry_id = _text(ident)
            if flat is None:  # deleted from the stream while pending: nothing to take
                deleted.append(entry_id)
                continue
            size = sum(len(part) for part in flat)
            if size > self.max_entry_bytes:  # not parsed; its dead letter keeps each value's head
                fields = {bytes(k).decode(errors="replace"): bytes(v[:_HEAD_BYTES]).decode(errors="replace")
                          for k, v in zip(flat[::2], flat[1::2], strict=True)}
                entries.append(IngressEntry(entry_id, fields, None,
                                            f"entry is {size} bytes, over ingest_max_entry_bytes "
                                            f"({self.max_entry_bytes})"))
                continue
            pairs = zip(flat[::2], flat[1::2], strict=True)
            try:
                fields = {k.decode(): v.decode() for k, v in pairs}
            except UnicodeDecodeError:
                fields = {k.decode(errors="replace"): v.decode(errors="replace")
                          for k, v in zip(flat[::2], flat[1::2], strict=True)}
                entries.append(IngressEntry(entry_id, fields, None, "entry is not UTF-8"))
                continue
            try:
                envelope = envelope_from_entry(fields, _entry_message_id(self.stream, entry_id))
            except BadMessage as exc:
                entries.append(IngressEntry(entry_id, fields, None, str(exc)))
            else:
                entries.append(IngressEntry(entry_id, fields, envelope, None))
        if deleted:
            with trio.fail_after(self._op_timeout_s):
                await self._client.xack(self.stream, self.group, deleted)
            log.info("redis ingress %s: acknowledged %d pending entries deleted from the stream", self.stream,
                     len(deleted))
        return entries

    async def ack(self, entries: Sequence[IngressEntry | str]) -> int:
        """Acknowledge entries (after their commit); returns how many were still pending."""
        ids = [e if isinstance(e, str) else e.entry_id for e in entries]
        if not ids:
            return 0
        try:
            with _errors(f"ack {self.stream}"), trio.fail_after(self._op_timeout_s):
                n = await self._client.xack(self.stream, self.group, ids)
        except RedisLogError:
            self._pending_from = "0"  # what stayed pending comes again with the next read
            raise
        self.acked += n
        return n

    async def reject(self, entries: Sequence[tuple[IngressEntry, str]]) -> None:
        """Dead-letter entries with their reasons, then acknowledge them.

        The copy goes to ``dead_stream`` first (fields ``stream``, ``entry_id``,
        ``reason``, ``fields`` as JSON), then the XACK, in one pipeline: a crash in
        between leaves the entry pending, so it is dead-lettered again (a second
        copy), never lost. (Not one MULTI: on a Redis Cluster the two streams live
        in different slots.)
        """
        if not entries:
            return
        try:
            await self._reject(entries)
        except RedisLogError:
            self._pending_from = "0"
            raise
        self.rejected += len(entries)
        for entry, reason in entries:
            log.warning("redis ingress %s: dead-lettered entry %s: %s", self.stream, entry.entry_id, reason)

    def redeliver(self) -> None:
        """Read this consumer's own pending entries again first (the caller could not commit them)."""
        self._pending_from = "0"

    def statistics(self) -> IngressStatistics:
        return IngressStatistics(self.stream, self.group, self.consumer, self.read_entries, self.claimed, self.acked,
                                 self.rejected)

    async def _reject(self, entries: Sequence[tuple[IngressEntry, str]]) -> None:
        with _errors(f"dead-letter {self.stream}"), trio.fail_after(self._op_timeout_s):
            async with self._client.pipeline(transaction=False) as p:
                for entry, reason in entries:
                    p.xadd(self.dead_stream, {"stream": self.stream, "entry_id": entry.entry_id,
                                              "reason": reason[:1000], "fields": json.dumps(entry.fields)},
                           trim_strategy=coredis.PureToken.MAXLEN, threshold=self._dead_max,
                           trim_operator=coredis.PureToken.APPROXIMATELY)
                p.xack(self.stream, self.group, [e.entry_id for e, _ in entries])


# ---- ingress: pub/sub channels (at most once) ----------------------------------------------------


def envelope_from_channel(channel: str, data: str) -> Envelope:
    """A message published on a channel: the channel is the type, the data (JSON) the payload. Raises BadMessage.

    Data that is a JSON object of envelope fields with ``type`` is taken as an
    envelope (as the AMQP ingress does); data that is not JSON is a string payload.
    """
    try:
        obj = loads_json(data)
    except ValueError:
        obj = data
    if isinstance(obj, dict) and "type" in obj and obj.keys() <= {"message_id", "timestamp", "type", "payload",
                                                                   "metadata", "seq"}:
        return Envelope.from_wire(obj)
    return Envelope.from_fields(channel, obj)


class ChannelIngress:
    """Envelopes from ``PSUBSCRIBE`` patterns, at most once; made by :func:`open_channel_ingress`.

    Async iterator of envelopes. Messages that arrive while ``buffer`` are
    waiting, or that are not valid, are dropped and counted (``dropped``,
    ``invalid``): Redis pub/sub keeps nothing for a slow or absent reader anyway.
    """

    def __init__(self, buffer: int, max_message_bytes: int) -> None:
        self._send, self._receive = trio.open_memory_channel[Envelope](buffer)
        self._max_message_bytes = max_message_bytes
        self.received = 0
        self.dropped = 0
        self.invalid = 0

    def _on_message(self, message: Mapping[str, Any]) -> None:
        # runs in coredis's reader task: never blocks, so its own buffer never grows
        self.received += 1
        if len(message["data"]) > self._max_message_bytes:
            self.invalid += 1
            log.debug("redis channel %r: dropped a message of %d bytes", message.get("channel"), len(message["data"]))
            return
        try:
            env = envelope_from_channel(_text(message["channel"]), _text(message["data"]))
        except (BadMessage, UnicodeDecodeError) as exc:
            self.invalid += 1
            log.debug("redis channel %r: dropped an invalid message: %s", message.get("channel"), exc)
            return
        try:
            self._send.send_nowait(env)
        except trio.WouldBlock:
            self.dropped += 1

    def __aiter__(self) -> ChannelIngress:
        return self

    async def __anext__(self) -> Envelope:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def receive_batch(self, most: int) -> list[Envelope]:
        """Wait for one envelope, then take what else is waiting, up to ``most``."""
        batch = [await self._receive.receive()]
        while len(batch) < most:
            try:
                batch.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        return batch


@contextlib.asynccontextmanager
async def open_channel_ingress(redis_log: RedisLog, patterns: Sequence[str], *, buffer: int = 1000,
                               max_message_bytes: int = 1_048_576) -> AsyncIterator[ChannelIngress]:
    """Subscribe to channel patterns (``PSUBSCRIBE``) for as long as the context is open.

    Error handling: a lost connection ends the context with :class:`RedisUnavailable`
    (no silent resubscribe: the caller's supervise loop opens it again and
    counts the outage; what was published meanwhile is gone, as pub/sub goes).
    """
    ingress = ChannelIngress(buffer, max_message_bytes)
    handlers = {p: ingress._on_message for p in patterns}
    try:
        async with redis_log.client.pubsub(pattern_handlers=handlers, retry_policy=None,  # type: ignore[arg-type]
                                           ignore_subscribe_messages=True):
            yield ingress
    except BaseExceptionGroup as group:
        _raise_single(group, "channel ingress")
        raise
    except _CLIENT_ERRORS as exc:
        raise _translate(exc, "channel ingress") or RedisUnavailable(str(exc)) from exc
