"""The cluster log on Redis (DESIGN §5): one history with one global seq, tails, retention, node heartbeats.

What lives in Redis
===================

Every key is ``<prefix>{log}:<name>``: the hash tag ``{log}`` puts them all in
one slot, so the scripts below (which touch several keys atomically) also run on
a Redis Cluster. (A prefix that carries its own hash tag, e.g. ``{app}:``, wins:
the first ``{...}`` of a key is its tag.) The log is one stream, so one shard
holds it either way: Redis Cluster gives no write scaling to one log.

* ``meta`` (hash): ``epoch``, ``seq`` (the last seq handed out), ``floor`` (the
  newest seq retention has deleted), ``t`` (the newest stored-at time, ms),
  ``created_ms``.
* ``stream`` (stream): one entry per message, entry ID ``<seq>-0``, fields
  ``t`` (stored-at, ms, server clock, never decreasing), ``type`` and ``d`` (the
  envelope JSON without ``seq``; ``"seq":N`` is spliced in when read, as the
  embedded store does). Since IDs are seqs, "after seq N" is ``XRANGE N+1 +`` /
  ``XREAD N-0``, with no mapping table.
* ``ids`` (sorted set): member ``message_id``, score its seq. ``ZSCORE`` is the
  de-duplication lookup (O(1)) and ``ZREMRANGEBYSCORE -inf floor`` trims it
  together with the log: its size follows retention, the de-duplication window
  is exactly what the log still holds (the embedded store's rule). Per-id keys
  with a TTL would need a second clock, could expire while the message is still
  kept (then a retry would be stored twice) and cost a key each.
* ``nodes`` (hash name → JSON) and ``node-expiry`` (sorted set name → expiry,
  ms): heartbeats.

Guarantees
==========

* **append** is one ``EVALSHA`` per batch (at most ``max_batch`` messages and
  about ``max_batch_bytes``; longer inputs are split and sent in order), and
  concurrent callers share batches (group commit, one script call in flight per
  handle, as the embedded store commits). The script checks the epoch, then
  per message: a known ``message_id`` answers its
  original seq (``duplicate``), else ``HINCRBY seq``, ``XADD <seq>-0``, ``ZADD
  ids``. A script runs atomically, so seq order is commit order on every node.
  The call returns only after Redis answered.
* A lost reply (connection dropped, timeout, cancellation) does not mean the
  script did not run: retry with the same ``message_id`` s; the retry is
  answered as a duplicate with the original seq.
* **epoch**: a random id written once into ``meta`` (HSETNX semantics, by
  :meth:`RedisLog.reopen`). Every append and read checks it; when Redis lost
  the log (FLUSHALL, a restart without persistence, eviction) the epoch is gone
  or different and the call raises :class:`EpochChanged` — nothing is ever
  appended into a log that lost its epoch. The caller adopts the new log with
  ``reopen()``.
* **a log that went back in time** (same epoch, counter below a seq a node
  has seen: Redis lost acknowledged writes but not the log — an OS crash under
  ``appendfsync everysec``, a failover to a lagging replica, an older snapshot
  restored) would hand out seqs a second time. Every append carries the newest
  seq its node saw and the script refuses below it; a tail checks the counter
  against its position: both raise :class:`LogRewound` (an
  :class:`EpochChanged`), and ``reopen()`` gives that log a new epoch, keeps
  its entries and moves the counter up.
* **seq after a loss**: a new epoch starts an empty log whose counter and floor
  begin at the highest seq the reopening node had seen (``seq_floor``; any later
  node bumps the counter further up to what it saw). So a seq is not handed out
  twice as long as one surviving node saw the newest one, and a client without
  the epoch asking ``since`` below that point is told of a gap instead of being
  fed new messages under old numbers.
* **tail** reads ``XREAD BLOCK`` and, in the same pipeline after it, the epoch,
  the floor and the counter: a reader learns a gap (entries retention deleted
  before it read them) exactly, and notices a lost or rewound log within
  ``tail_block_s`` even when idle.
* **retention** (:meth:`RedisLog.trim`, :meth:`RedisLog.apply_retention`)
  deletes by age (binary search over the ``t`` fields, which never decrease,
  then ``XTRIM MINID``) and by count (``XTRIM MAXLEN``), at most
  ``trim_max_delete`` entries per call (one script call must not stall Redis),
  moves ``floor`` and trims ``ids`` to it.

Redis must run with ``maxmemory-policy noeviction`` (evicting the stream or
``meta`` would lose the log); appends then fail with ``OOM`` as
:class:`RedisUnavailable`. Durability of an acknowledged append is Redis's
(:meth:`RedisLog.durability` reads it): ``appendonly yes`` with ``appendfsync
always`` for "acknowledged means on disk"; ``everysec`` survives a crash of
Redis but loses up to about a second (more if the disk stalls) when the
machine goes down; replicas are asynchronous, so a failover can lose what the
old primary acknowledged — both show up here as :class:`LogRewound`.

Errors
======

:class:`RedisUnavailable`: the connection failed, a reply did not come within
``op_timeout_s``, or Redis refused for a passing reason (``LOADING``, ``OOM``,
``READONLY``, ``MISCONF``, ``BUSY``…) — try again later; :func:`run_with_backoff`
is the caller's supervise loop. :class:`RedisOverloaded`: ``max_pending``
messages already wait for the group commit — answer ``overloaded``.
:class:`EpochChanged` (and :class:`LogRewound`): the log is not the one this
handle knew — tell subscribers (``epoch_changed``), ``reopen()``, start the
tail again. Anything else (:class:`RedisLogError`) is a bug or a
misconfiguration (a key of the wrong type).
"""
from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import attrs
import coredis
import trio
import trio.lowlevel

from aivad.envelope import Envelope, check_topic, compile_pattern
from aivad.protocol import parse_json
from aivad.store import Appended, StoredMessage

from .client import (
    EpochChanged,
    LogRewound,
    RedisLogError,
    RedisSettings,
    RedisUnavailable,
    _client,
    _errors,
    _int,
    _raise_single,
    _raw_reply,
    _Script,
    _text,
)
from .group_commit import GroupCommit
from .lua import APPEND_LUA, HEARTBEAT_LUA, LIVE_NODES_LUA, OPEN_LUA, TRIM_LUA

log = logging.getLogger(__name__)


# ---- results -------------------------------------------------------------------------------


@attrs.frozen
class LogHistory:
    """Messages matching a pattern with seq > ``after``, and how far the read looked.

    Every matching message with ``after < seq <= scanned_through`` is in
    ``messages`` (ascending): the next page asks ``after = scanned_through``,
    also when ``messages`` is empty because the scan budget ran out first.
    ``retention_floor`` is the newest seq retention had deleted, read in the
    same snapshot as the entries: a reader whose ``after`` is below it missed
    ``after + 1 .. retention_floor``. ``last_seq`` is the newest seq in the log.
    """

    messages: list[StoredMessage]
    scanned_through: int
    retention_floor: int
    last_seq: int
    epoch: str
    #: entries looked at (bounded by the scan budget)
    scanned: int

    def page(self, after: int) -> dict[str, Any]:
        """The fields of a history reply (DESIGN §4.3): envelopes and ``last_seq`` to ask after next."""
        last_seq = self.messages[-1].seq if self.messages else after
        return {"messages": [json.loads(m.json) for m in self.messages], "last_seq": last_seq}


@attrs.frozen
class Gap:
    """Seqs ``first .. last`` (inclusive) that retention deleted before a reader got them."""

    first: int
    last: int


@attrs.frozen
class TailBatch:
    """What one tail read returns: committed messages in seq order, after an optional gap."""

    messages: list[StoredMessage]
    gap: Gap | None
    #: the tail's position after this batch (the newest seq it has passed)
    position: int


@attrs.frozen
class Trimmed:
    """One retention call: entries deleted, the floor now, and whether more is due (budget hit)."""

    deleted: int
    floor: int
    more: bool


@attrs.frozen
class LogInfo:
    epoch: str | None
    last_seq: int
    retention_floor: int
    length: int
    ids: int
    created_ms: int


@attrs.frozen
class Durability:
    """What Redis promises about an acknowledged append (see docs: "Redis client" / cluster notes).

    ``appendonly`` with ``appendfsync == "always"``: on disk before the answer.
    ``"everysec"``: up to about a second lost on a crash of the machine (not of
    Redis alone). No AOF: a restart loses the log (a new epoch).
    ``maxmemory_policy`` must be ``noeviction``: evicting keys would cut the log.
    """

    appendonly: bool
    appendfsync: str
    maxmemory_policy: str

    @property
    def warnings(self) -> list[str]:
        found = []
        if self.maxmemory_policy != "noeviction":
            found.append(f"maxmemory-policy is {self.maxmemory_policy}: Redis may evict parts of the log "
                         "(set noeviction)")
        if not self.appendonly:
            found.append("appendonly is off: a Redis restart loses the log (clients see a new epoch)")
        return found


@attrs.frozen
class NodeInfo:
    """A live node: its name, what it reported, when it was last seen (server clock, Unix seconds)."""

    name: str
    info: dict[str, Any]
    last_seen: float
    expires: float


@attrs.frozen
class RedisLogStatistics:
    epoch: str
    #: the newest seq this handle has seen (appended, tailed or read)
    last_seq: int
    appended: int
    duplicates: int
    append_calls: int
    #: messages waiting for the group commit now (bounded by ``max_pending``)
    pending: int
    tail_reads: int
    errors: int
    last_error: str | None


_APPEND = _Script(APPEND_LUA)
_OPEN = _Script(OPEN_LUA)
_TRIM = _Script(TRIM_LUA)
_HEARTBEAT = _Script(HEARTBEAT_LUA)
_LIVE_NODES = _Script(LIVE_NODES_LUA)

def _with_seq(body: bytes, seq: int) -> str:
    """Splice ``"seq":N`` into stored JSON (stored without it: the seq is given inside the script)."""
    return f'{body[:-1].decode()},"seq":{seq}}}'


#: entries of the log stream that its append script did not write (another writer), skipped so far
_foreign_entries = 0


def _entry(entry: Sequence[Any]) -> tuple[int, StoredMessage | None]:
    """A raw stream entry of the log → its seq, and the message (seq, type, envelope JSON with seq).

    The message is None for an entry the append script did not write — other
    fields, a type that is not a topic, a body that is not a JSON object — as
    anyone with write access to Redis can add: it is skipped (logged, never
    delivered), and readers move past its seq.
    """
    global _foreign_entries
    ident, fields = entry
    seq = int(ident[:ident.index(b"-")])
    try:
        if fields is None or len(fields) != 6 or fields[0] != b"t" or fields[2] != b"type" or fields[4] != b"d":
            raise ValueError("not an entry of the append script")
        topic = check_topic(fields[3].decode())
        if not isinstance(parse_json(fields[5]), dict):
            raise ValueError("the body is not a JSON object")
        return seq, StoredMessage(seq, topic, _with_seq(fields[5], seq))
    except (ValueError, UnicodeDecodeError) as exc:  # BadMessage is a ValueError
        _foreign_entries += 1
        if _foreign_entries in (1, 10, 100) or _foreign_entries % 1000 == 0:
            log.warning("redis log: skipped the foreign entry %s (%s); %d so far", _text(ident), exc,
                        _foreign_entries)
        return seq, None


# ---- the log ---------------------------------------------------------------------------------


def _row_size(row: tuple[str, str, str]) -> int:
    """What an append row counts against ``max_batch_bytes``: its envelope's JSON."""
    return len(row[2])


class RedisLog:
    """The cluster log; made by :func:`open_redis_log`, used from trio tasks.

    Public: :meth:`append_many`, :meth:`append`, :meth:`append_rows`,
    :meth:`history`, :meth:`tail`, :meth:`info`, :meth:`trim`,
    :meth:`apply_retention`, :meth:`reopen`, :meth:`durability`,
    :meth:`heartbeat`, :meth:`live_nodes`, :meth:`forget_node`,
    :meth:`statistics`; ``epoch``, ``last_seq`` and ``settings``.
    """

    def __init__(self, client: coredis.Redis[bytes], settings: RedisSettings) -> None:
        self._client = client
        self.settings = settings
        k = settings.key
        self._log_keys = [k("meta"), k("stream"), k("ids")]
        self._meta, self._stream, self._ids = self._log_keys
        self._node_keys = [k("nodes"), k("node-expiry")]
        #: the epoch this handle trusts; set by reopen()
        self.epoch = ""
        #: the newest seq this handle has seen; the floor of a new log after a loss
        self.last_seq = 0
        self._appended = 0
        self._duplicates = 0
        self._append_calls = 0
        #: group commit: appends of concurrent callers share a script call
        self._appends = GroupCommit[tuple[str, str, str], Appended](
            "append", self._send_appends, max_items=settings.max_batch, max_bytes=settings.max_batch_bytes,
            size_of=_row_size, max_pending=settings.max_pending,
        )
        self._tail_reads = 0
        self._errors = 0
        self._last_error: str | None = None

    @property
    def client(self) -> coredis.Redis[bytes]:
        """The coredis client (for the other modules of this package; nothing else should need it)."""
        return self._client

    @contextlib.contextmanager
    def _guard(self, what: str, epoch: str | None = None) -> Iterator[None]:
        try:
            with _errors(what, self.epoch if epoch is None else epoch, self.last_seq):
                yield
        except RedisLogError as exc:
            self._errors += 1
            self._last_error = str(exc)
            raise

    def op_deadline(self) -> contextlib.AbstractContextManager[trio.CancelScope]:
        """The scope one Redis call runs in: ``op_timeout_s`` (then :class:`RedisUnavailable`)."""
        return trio.fail_after(self.settings.op_timeout_s)

    def _saw(self, seq: int) -> None:
        if seq > self.last_seq:
            self.last_seq = seq

    # ---- epoch ----------------------------------------------------------------------

    async def reopen(self, seq_floor: int = 0) -> bool:
        """Adopt the log in Redis, creating it (a new epoch) when there is none; True if the epoch is new.

        A new log's counter and floor start at ``max(seq_floor, last_seq)`` (the
        newest seq this handle saw), so seqs are not handed out twice after Redis
        lost the log. The log this handle knew but with its counter below that
        (:class:`LogRewound`) gets a new epoch, keeps its entries, and its counter
        moves up. Call at start and after :class:`EpochChanged`.
        """
        with self._guard("open the log"), trio.fail_after(self.settings.op_timeout_s):
            epoch, outcome = await _OPEN(self._client, self._log_keys,
                                         [uuid.uuid4().hex, max(seq_floor, self.last_seq), self.epoch])
        previous, self.epoch = self.epoch, _text(epoch)
        if outcome == 1:
            log.info("redis log %s created epoch %s (was %s)", self._stream, self.epoch, previous or "none")
        elif outcome == 2:
            log.warning("redis log %s went back in time (lost acknowledged entries): new epoch %s (was %s), "
                        "seqs go on after %d", self._stream, self.epoch, previous, self.last_seq)
        elif previous and previous != self.epoch:
            log.warning("redis log %s: adopted epoch %s (was %s)", self._stream, self.epoch, previous)
        return bool(outcome)

    # ---- append ---------------------------------------------------------------------

    async def append_many(self, envelopes: Sequence[Envelope]) -> list[Appended]:
        """Store envelopes in order; returns after Redis answered, one result per envelope.

        Raises :class:`RedisUnavailable` (the outcome is unknown: retry with the
        same envelopes, duplicates are answered with the original seq) or
        :class:`EpochChanged` (nothing of this call was stored in the new log).
        """
        return await self.append_rows([(e.message_id, e.type, e.to_json()) for e in envelopes])

    async def append(self, envelope: Envelope) -> Appended:
        return (await self.append_many([envelope]))[0]

    async def append_rows(self, rows: Sequence[tuple[str, str, str]]) -> list[Appended]:
        """``append_many`` for rows already encoded: (message_id, type, envelope JSON without seq).

        Group commit (:class:`~aivad.redis.group_commit.GroupCommit`): the rows, cut into chunks of
        at most ``max_batch`` messages / ``max_batch_bytes``, go out with other callers' waiting
        ones in one script call; one call is in flight per handle, as in the embedded store.

        Raises :class:`RedisOverloaded` when ``max_pending`` messages already wait.
        """
        return await self._appends.submit(rows)

    async def _send_appends(self, rows: list[tuple[str, str, str]]) -> list[Appended]:
        """One append script call for ``rows``, bounded by ``op_timeout_s``."""
        args: list[str | bytes | int] = [self.epoch, self.last_seq]
        for message_id, topic, body in rows:
            args += (message_id, topic, body)
        with self._guard("append"), trio.fail_after(self.settings.op_timeout_s):
            seqs = await _APPEND(self._client, self._log_keys, args)
        self._append_calls += 1
        results = [Appended(s, False) if s > 0 else Appended(-s, True) for s in seqs]
        duplicates = sum(1 for r in results if r.duplicate)
        self._duplicates += duplicates
        self._appended += len(results) - duplicates
        if results:
            self._saw(max(r.seq for r in results))
        return results

    # ---- reads ----------------------------------------------------------------------

    async def info(self) -> LogInfo:
        """The log's epoch (None: no log), newest seq, floor, length and de-dup index size, in one snapshot."""
        with self._guard("info"), trio.fail_after(self.settings.op_timeout_s):
            async with self._client.pipeline(transaction=True) as p:
                meta = p.hmget(self._meta, ["epoch", "seq", "floor", "created_ms"])
                length = p.xlen(self._stream)
                ids = p.zcard(self._ids)
            epoch, seq, floor, created = await meta
            info = LogInfo(_text(epoch) or None, _int(seq), _int(floor), await length, await ids, _int(created))
        if info.epoch == self.epoch:
            self._saw(info.last_seq)
        return info

    async def history(self, pattern: str, after: int = 0, limit: int = 100, scan_budget: int = 10_000
                      ) -> LogHistory:
        """Up to ``limit`` messages matching ``pattern`` with seq > ``after``, ascending.

        Looks at ``scan_budget`` entries at most, in snapshots of up to
        ``history_chunk`` entries (each atomic with the floor and the epoch); see
        :class:`LogHistory` for what the result promises. Filtering happens here
        with :func:`aivad.envelope.compile_pattern`.

        Raises :class:`EpochChanged` when the log is not this handle's.
        """
        if limit < 1 or scan_budget < 1:
            raise ValueError("limit and scan_budget must be >= 1")
        matches = compile_pattern(pattern)
        messages: list[StoredMessage] = []
        cursor = after
        scanned = 0
        floor = newest = 0
        epoch = self.epoch
        chunk = min(max(limit, 64), self.settings.history_chunk)
        while True:
            count = min(chunk, scan_budget - scanned)
            # the newest seq this handle knew *before* the read: the tail or an append may raise
            # last_seq while the read is out, and a snapshot older than that is not a log gone back
            known = self.last_seq
            with self._guard("history"), trio.fail_after(self.settings.op_timeout_s):
                async with self._client.pipeline(transaction=True) as p:
                    meta = p.hmget(self._meta, ["epoch", "seq", "floor"])
                    read = p.create_request(b"XRANGE", self._stream, cursor + 1, b"+", b"COUNT", count,
                                            callback=_raw_reply)
                raw_epoch, raw_seq, raw_floor = await meta
                entries = await read
            if _text(raw_epoch) != epoch:
                raise EpochChanged(epoch, _text(raw_epoch) or None)
            newest, chunk_floor = _int(raw_seq), _int(raw_floor)
            if newest < known:
                raise LogRewound(epoch, newest, known)
            if chunk_floor > floor:
                floor = chunk_floor
                if floor > cursor:
                    # retention ran between two snapshots: what was read below the floor goes too,
                    # so the result is "everything after the floor", not a silent hole
                    messages = [m for m in messages if m.seq > floor]
                    cursor = floor
            scanned += len(entries)
            for entry in entries:
                cursor, message = _entry(entry)
                if message is not None and matches(message.type):
                    messages.append(message)
                    if len(messages) == limit:
                        break
            if len(messages) == limit:
                break
            if len(entries) < count:
                cursor = max(cursor, newest)  # reached the end of the log
                break
            if scanned >= scan_budget:
                break
            chunk = min(chunk * 2, self.settings.history_chunk)
        self._saw(newest)
        return LogHistory(messages, cursor, floor, newest, epoch, scanned)

    def tail(self, after: int, *, count: int | None = None) -> LogTail:
        """A reader of every message with seq > ``after``, in seq order, as they are committed.

        ``after`` is a seq of this log (at most its newest: a position above the
        counter reads as :class:`LogRewound`). A client's ``since`` above the
        newest seq is the caller's to answer (``recovered: false``), not a tail's.
        """
        return LogTail(self, after, count or self.settings.tail_count)

    async def _tail_read(self, position: int, count: int
                         ) -> tuple[list[tuple[int, StoredMessage | None]], str, int, int]:
        block_ms = max(1, round(self.settings.tail_block_s * 1000))
        timeout = self.settings.tail_block_s + self.settings.op_timeout_s
        with self._guard("tail"), trio.fail_after(timeout):
            async with self._client.pipeline(transaction=False, timeout=timeout) as p:
                read = p.create_request(b"XREAD", b"COUNT", count, b"BLOCK", block_ms, b"STREAMS", self._stream,
                                        f"{position}-0", callback=_raw_reply)
                meta = p.hmget(self._meta, ["epoch", "floor", "seq"])  # runs after XREAD returned
            found = await read
            raw_epoch, raw_floor, raw_seq = await meta
        self._tail_reads += 1
        entries = found.get(self._stream.encode(), ()) if found else ()
        return [_entry(e) for e in entries], _text(raw_epoch), _int(raw_floor), _int(raw_seq)

    # ---- retention ------------------------------------------------------------------

    async def trim(self, max_messages: int = 0, max_age_s: float = 0.0, *, now_ms: int | None = None) -> Trimmed:
        """Delete the oldest entries beyond ``max_messages`` and older than ``max_age_s`` (0 = no limit).

        At most ``trim_max_delete`` entries per call; ``more`` says another call
        is due. ``now_ms`` replaces the server clock (Unix ms) for the age limit.
        The de-duplication index is trimmed to the new floor in the same script.
        """
        args: list[str | bytes | int] = [max_messages, round(max_age_s * 1000), now_ms or 0,
                                         self.settings.trim_max_delete, self.epoch]
        with self._guard("trim"), trio.fail_after(self.settings.op_timeout_s):
            deleted, floor, more = await _TRIM(self._client, self._log_keys, args)
        if deleted:
            log.info("redis log %s: retention deleted %d entries, floor now %d", self._stream, deleted, floor)
        return Trimmed(int(deleted), int(floor), bool(more))

    async def apply_retention(self, max_messages: int = 0, max_age_s: float = 0.0) -> int:
        """:meth:`trim` until nothing more is due; returns how many entries went.

        Any node may run it, at any time, beside the others: each call is one
        atomic script, and a call with nothing to delete costs a few reads.
        """
        deleted = 0
        while True:
            trimmed = await self.trim(max_messages, max_age_s)
            deleted += trimmed.deleted
            if not trimmed.more:
                return deleted
            await trio.lowlevel.checkpoint()

    async def durability(self) -> Durability | None:
        """Redis's persistence and eviction settings (``CONFIG GET``); None where CONFIG is not allowed."""
        try:
            with _errors("config get"), trio.fail_after(self.settings.op_timeout_s):
                async with self._client.pipeline(transaction=False) as p:
                    replies = [p.config_get([name]) for name in ("appendonly", "appendfsync", "maxmemory-policy")]
                values = [next(iter((await r).values()), b"") for r in replies]
        except RedisUnavailable:
            raise
        except RedisLogError as exc:  # e.g. CONFIG renamed or forbidden (managed Redis)
            log.debug("redis log: no CONFIG GET: %s", exc)
            return None
        appendonly, appendfsync, policy = (_text(v) for v in values)
        return Durability(appendonly == "yes", appendfsync, policy)

    # ---- nodes ------------------------------------------------------------------------

    async def heartbeat(self, node_name: str, info: Mapping[str, Any], ttl_s: float) -> None:
        """Say this node is alive for ``ttl_s`` more seconds, with ``info`` (JSON: connections, subscriptions…)."""
        body = json.dumps(dict(info), separators=(",", ":"))
        with self._guard("heartbeat"), trio.fail_after(self.settings.op_timeout_s):
            await _HEARTBEAT(self._client, self._node_keys, [node_name, body, max(1, round(ttl_s * 1000))])

    async def live_nodes(self, limit: int = 1000) -> list[NodeInfo]:
        """Every node whose last heartbeat has not expired (server clock), by name."""
        with self._guard("live nodes"), trio.fail_after(self.settings.op_timeout_s):
            reply = await _LIVE_NODES(self._client, self._node_keys, [limit])
        nodes = []
        for i in range(1, len(reply), 2):
            try:  # written by the heartbeat script — or by anyone who can write to Redis
                name, obj = _text(reply[i]), parse_json(reply[i + 1])
                info = obj["info"]
                if not isinstance(info, dict):
                    raise TypeError("info is not an object")
                nodes.append(NodeInfo(name[:200], info, float(obj["last_seen_ms"]) / 1000,
                                      float(obj["expires_ms"]) / 1000))
            except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
                log.warning("redis: skipped a heartbeat that is not one (%s)", exc)
        return sorted(nodes, key=lambda n: n.name)

    async def forget_node(self, node_name: str) -> None:
        """Remove a node at once (a clean shutdown), instead of waiting for its heartbeat to expire."""
        nodes, expiry = self._node_keys
        with self._guard("forget node"), trio.fail_after(self.settings.op_timeout_s):
            async with self._client.pipeline(transaction=True) as p:
                p.hdel(nodes, [node_name])
                p.zrem(expiry, [node_name])

    def statistics(self) -> RedisLogStatistics:
        return RedisLogStatistics(self.epoch, self.last_seq, self._appended, self._duplicates, self._append_calls,
                                  self._appends.pending, self._tail_reads, self._errors, self._last_error)


class LogTail:
    """Reads committed messages after a position, in seq order (``RedisLog.tail``).

    ``await read()`` (or ``async for batch in tail``) returns the next
    :class:`TailBatch` as soon as there is one, waiting in ``XREAD BLOCK``
    rounds of ``tail_block_s``. Every read also checks the epoch this tail was
    made under and the retention floor:

    * a gap (entries deleted by retention before this tail read them) comes as
      ``batch.gap``, with the messages after it;
    * a changed or lost log raises :class:`EpochChanged`, one that went back
      below this tail's position :class:`LogRewound` (a kind of it);
    * a lost connection raises :class:`RedisUnavailable`. The tail keeps its
      ``position``: calling ``read()`` again later resumes without a gap or a
      duplicate.
    """

    def __init__(self, redis_log: RedisLog, after: int, count: int) -> None:
        self._log = redis_log
        self.position = after
        self.epoch = redis_log.epoch
        self._count = count

    def __aiter__(self) -> LogTail:
        return self

    async def __anext__(self) -> TailBatch:
        return await self.read()

    async def read(self) -> TailBatch:
        while True:
            position = self.position
            read, epoch, floor, counter = await self._log._tail_read(position, self._count)
            if epoch != self.epoch:
                raise EpochChanged(self.epoch, epoch or None)
            if counter < position:
                raise LogRewound(epoch, counter, position)
            gap = None
            if read:  # (foreign entries among them count for the position, not as messages)
                first = read[0][0]
                if first > position + 1 and floor > position:
                    gap = Gap(position + 1, min(floor, first - 1))
                self.position = read[-1][0]
            elif floor > position:
                gap = Gap(position + 1, floor)
                self.position = floor
            if read or gap:
                self._log._saw(self.position)
                return TailBatch([m for _, m in read if m is not None], gap, self.position)


@contextlib.asynccontextmanager
async def open_redis_log(settings: RedisSettings, *, seq_floor: int = 0) -> AsyncIterator[RedisLog]:
    """Connect, adopt (or create) the log, and close the connections on exit.

    Resource handling: the coredis client's connections live in a task group
    inside this context (structured: nothing outlives it). Error handling: an
    unreachable Redis raises :class:`RedisUnavailable` here; inside, each call
    raises on its own and the connection pool reconnects on the next call.
    """
    client = _client(settings)
    try:
        async with client:
            redis_log = RedisLog(client, settings)
            await redis_log.reopen(seq_floor)
            durability = await redis_log.durability()
            for warning in durability.warnings if durability else ():
                log.warning("redis log %s: %s", settings.url.rpartition("@")[2], warning)
            yield redis_log
    except BaseExceptionGroup as group:
        _raise_single(group, "redis log")
        raise

