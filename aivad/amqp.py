"""EDGE: the RabbitMQ bridge of DESIGN §4.5 — with its frame reader (:mod:`aivad.amqp_frames`),
the only module that imports aiormq.

The bridge
==========

aiormq runs on its **own asyncio event loop in a dedicated thread**; trio never
runs asyncio code and ``trio_asyncio`` is not imported (it changes asyncio for
the whole process). Measured here (see ``bench/amqp_ingest.py`` and
docs/architecture.md): aiormq under trio-asyncio consumed at 0.2x a raw aiormq
loop, a thread handing deliveries to trio one by one at 0.5x. What makes the
difference is the number of hops per message, so the hot path has none:

* The connection reads its frames with :mod:`aivad.amqp_frames`: every whole frame
  cut out of one read buffer, not three awaits, a lock and a buffer per frame.
* The consumer callback (asyncio thread) only appends the delivery to a list
  under a lock; the channel's reader calls it itself, with no asyncio task per
  delivery (:func:`_deliver_in_reader`). When the list goes from empty to
  non-empty it wakes trio with one ``TrioToken.run_sync_soon`` — one
  cross-thread call per batch, not per message.
* The trio side takes the whole list, validates each delivery, hands all the
  envelopes to the store in one ``append_many`` (one group commit), and only
  then acknowledges the batch with a single ``basic_ack(multiple=True)`` up to
  the highest delivery tag, scheduled on the asyncio loop with
  ``call_soon_threadsafe`` (fire and forget, FIFO with everything else on the
  loop).
* Control operations (connect, declare, consume, publish with confirms, close)
  are rare; each is one ``run_coroutine_threadsafe`` awaited from trio.

Guarantees
==========

* Ack after commit: nothing is acknowledged before the store committed it. A
  crash, a cancellation or a lost connection before the ack means RabbitMQ
  redelivers; the store answers a known ``message_id`` as a duplicate, so it
  is stored once. (A message with no ``message_id`` anywhere gets a fresh one,
  so for those delivery is at least once: producers should set it.)
* Poison (not JSON, or an envelope that fails validation): a copy with the
  reason in ``x-aivad-reason`` is published to the dead-letter exchange with
  confirms, a row goes into the store's dead-letter table, and then the
  original is acknowledged — a plain ``basic_reject`` could not carry the
  reason. Other dead-lettering by the broker (``x-dead-letter-exchange`` on
  the events queue) still works.
* Broker lost: the supervisor reconnects with capped exponential backoff and
  jitter, re-declares the topology and consumes again. ``statistics()`` shows
  ``connected``, ``consuming`` per queue (true only between ConsumeOk and the
  loss of the channel, the connection or the consumer), the reconnect count
  and the last error.
* Tasks (when a dispatcher is given): ``tasks_queue`` is consumed on a channel
  of its own (delivery tags, prefetch and ``multiple=True`` acks are per
  channel). Each delivery becomes a :class:`~aivad.tasks.TaskSpec` — the body
  holds the ``dispatch`` op's fields (JSON that is not an object is the
  payload), the routing key is the type when the body has none, the AMQP
  ``priority`` counts when the body has none, ``message_id`` is the task_id —
  and is submitted to the dispatcher one after the other (FIFO within a
  priority holds); the batch is acked once every task in it is committed. A
  known task_id is a duplicate: acked, not stored twice. An invalid spec is
  dead-lettered like a poison event.
* RPC: a task whose delivery had ``reply_to`` keeps it (and ``correlation_id``)
  in its stored spec; when it ends, ``{"task_id", "state", "result"|"error"}``
  goes to the default exchange with routing key ``reply_to`` and that
  ``correlation_id``, through the outbox; its row is written inside the write
  that ends the task (the dispatcher's ``end_writes`` hook). A dead task is also
  copied to the dead-letter exchange with ``x-aivad-reason``.
* Own events and the outbox live in the store, so a restart loses nothing
  waiting: the ``task.*``, ``group.*`` and ``system.*`` messages after the
  cursor ``meta.amqp_forwarded_seq`` are read in seq order, published with
  confirms and the cursor moved (one write per confirmed batch);
  :meth:`forward_committed`, the store's after-commit hook, only wakes the
  publisher. Such messages that came in through AMQP are listed in
  ``amqp_skip`` by the ingest's own transaction and never sent back. RPC
  replies, dead-task copies and :meth:`AmqpBridge.publish_event` are rows of
  ``amqp_outbox``, deleted once confirmed. Both are bounded by ``outbox_max``
  (the oldest dropped and counted). What was not confirmed is sent again after
  a reconnect. Own events carry ``x-aivad-origin: <node id>`` and are skipped
  (acked, not stored) when they come back through the events queue.
* Cancellation (SIGTERM): the connection is closed under a shielded,
  bounded scope; closing returns every unacknowledged delivery to the queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import json
import logging
import os
import random
import socket
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from decimal import Decimal
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, NoReturn, Protocol, TypeVar

import aiormq
import aiormq.abc
import attrs
import trio
from pamqp import commands as spec

from .amqp_frames import lean_frames
from .boundary import Faults, describe
from .config import AmqpConfig, TasksConfig
from .envelope import BadMessage, Envelope, derived_id
from .protocol import OpError, loads_json
from .store import Appended, StoreClosed, StoredMessage, Write, insert_rows
from .tasks import TaskSpec, parse_task_spec

if TYPE_CHECKING:
    from .dispatcher import TaskView

__all__ = [
    "ORIGIN_HEADER",
    "OWN_EVENT_ROOTS",
    "REASON_HEADER",
    "TASK_FIELDS",
    "AmqpBridge",
    "AmqpLost",
    "AmqpStatistics",
    "envelope_from_amqp",
    "serve_amqp",
    "task_spec_from_amqp",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: header on the daemon's own events: the node id; such messages are never re-ingested
ORIGIN_HEADER = "x-aivad-origin"
#: header on dead-lettered copies: why aivad could not take the message
REASON_HEADER = "x-aivad-reason"
#: the ingress name messages from RabbitMQ are counted under
INGRESS = "amqp"
#: dead-letter table ``kind`` of a poison AMQP delivery (an event or a task spec)
DEAD_LETTER_KIND = "amqp.poison"
#: first words of the topics :meth:`AmqpBridge.forward_committed` sends to the events exchange
OWN_EVENT_ROOTS = frozenset({"task", "group", "system"})
#: the fields of a task body: those of the ``dispatch`` op (DESIGN §4.3)
TASK_FIELDS = frozenset({"type", "payload", "priority", "retry_policy", "timeout", "heartbeat", "affinity_key",
                         "group_id"})
#: longest AMQP ``message_id`` taken as a task_id (task event ids add ~40 characters to it)
MAX_TASK_ID_LENGTH = 200

_ENVELOPE_FIELDS = frozenset({"message_id", "timestamp", "type", "payload", "metadata", "seq"})
# Broker-internal and aivad's own headers are not message metadata.
_SKIP_HEADER_PREFIXES = ("x-death", "x-first-death-", "x-last-death-", "x-aivad-")


class AmqpLost(Exception):
    """The connection, a channel or the consumer went away (or the store failed a write); the supervisor reconnects."""


#: how the bridge reports a handled fault (aivad.alerts.Alerts.alert: level, code, message)
Alert = Callable[[Literal["info", "warning", "error"], str, str], None]


class Counter(Protocol):
    """Where stored messages are counted per ingress (aivad.stats.Ingest fits)."""

    def count(self, ingress: str, n: int = 1) -> None: ...


class Sink(Protocol):
    """What the bridge needs of the store (aivad.store.Store fits)."""

    async def submit(self, apply: Callable[[sqlite3.Connection, Write], Any], *, isolated: bool = True,
                     committed: Callable[[Write], None] | None = None) -> Write: ...

    async def read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any: ...

    async def add_dead_letter(self, kind: str, reason: str, body: str, detail: dict[str, Any]) -> int: ...


class LetterSink(Protocol):
    """Where a poison delivery is kept (the store, or the cluster's dead-letter queue)."""

    async def add_dead_letter(self, kind: str, reason: str, body: str, detail: dict[str, Any]) -> int: ...


#: ``await settled(seq)``: returns once the store's commits through ``seq`` are where an ack may promise them
Settled = Callable[[int], Awaitable[None]]


class TaskSink(Protocol):
    """What the bridge needs of the dispatcher (aivad.dispatcher.Dispatcher fits)."""

    cfg: TasksConfig  # the task defaults; a reload replaces it
    draining: bool
    on_end: list[Callable[[TaskView], None]]
    end_writes: list[Callable[[sqlite3.Connection, TaskView], None]]

    async def submit_many(self, specs: list[TaskSpec]) -> Write: ...


@attrs.frozen
class AmqpStatistics:
    """A snapshot of the bridge; ``consuming`` maps queue name → deliveries can arrive now.

    ``delivered``, ``acked`` and ``rejected`` count both queues; ``tasks_*``
    the tasks queue alone; ``replies`` the RPC replies queued for publishing.
    """

    connected: bool
    consuming: dict[str, bool]
    reconnects: int
    last_error: str | None
    delivered: int
    stored: int
    duplicates: int
    acked: int
    rejected: int
    skipped_own: int
    batches: int
    published: int
    outbox_depth: int
    outbox_dropped: int
    tasks_submitted: int = 0
    tasks_duplicates: int = 0
    tasks_rejected: int = 0
    replies: int = 0
    dead_tasks: int = 0
    #: ended by a bug at its error boundary: no reconnecting (see the log)
    stopped: bool = False


# ---- mapping (pure) -------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """AMQP field-table values → JSON values (bytes as UTF-8, timestamps as RFC 3339)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, dt.datetime):
        return _rfc3339(value)
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _rfc3339(value: dt.datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _loads(body: bytes, max_bytes: int | None) -> Any:
    """The body's JSON; a body over ``max_bytes`` is refused unread (``[amqp] max_body_bytes``)."""
    if max_bytes is not None and len(body) > max_bytes:
        raise BadMessage(f"body is {len(body)} bytes, over max_body_bytes ({max_bytes})")
    try:
        return loads_json(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadMessage(f"body is not JSON: {exc}") from None


def envelope_from_amqp(
    body: bytes,
    routing_key: str,
    *,
    message_id: str | None = None,
    timestamp: dt.datetime | None = None,
    correlation_id: str | None = None,
    reply_to: str | None = None,
    headers: Mapping[str, Any] | None = None,
    max_body_bytes: int | None = None,
) -> Envelope:
    """Turn one AMQP delivery into an envelope (DESIGN §4.5). Raises BadMessage.

    A JSON object whose keys are envelope fields and that has ``type`` is taken
    as an envelope; any other JSON value becomes the payload, with the routing
    key as the type. AMQP properties fill what the body leaves open: the
    envelope's own ``message_id``/``timestamp``/metadata keys win. A body over
    ``max_body_bytes`` is refused before it is parsed.
    """
    obj = _loads(body, max_body_bytes)
    if isinstance(obj, dict) and "type" in obj and obj.keys() <= _ENVELOPE_FIELDS:
        typ, payload = obj["type"], obj.get("payload")
        metadata = obj.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise BadMessage("metadata must be an object")
        metadata = dict(metadata or {})
        msg_id, stamp = obj.get("message_id"), obj.get("timestamp")
    else:
        if not routing_key:
            raise BadMessage("a non-envelope body needs a routing key to be its type")
        typ, payload, metadata, msg_id, stamp = routing_key, obj, {}, None, None
    if msg_id is None and message_id:
        msg_id = message_id
    if stamp is None and timestamp is not None:
        stamp = _rfc3339(timestamp)
    if correlation_id is not None:
        metadata.setdefault("correlation_id", correlation_id)
    if reply_to is not None:
        metadata.setdefault("reply_to", reply_to)
    if headers:
        for key, value in headers.items():
            if not key.startswith(_SKIP_HEADER_PREFIXES):
                metadata.setdefault(key, _jsonable(value))
    if typ is not None and not isinstance(typ, str):
        raise BadMessage("type must be a string")
    return Envelope.from_fields(typ, payload, metadata, msg_id, stamp)


def task_spec_from_amqp(
    body: bytes,
    routing_key: str,
    defaults: TasksConfig,
    *,
    message_id: str | None = None,
    priority: int | None = None,
    reply_to: str | None = None,
    correlation_id: str | None = None,
    max_body_bytes: int | None = None,
) -> TaskSpec:
    """Turn one delivery of the tasks queue into a task spec (DESIGN §4.5). Raises BadMessage.

    A JSON object is a task spec with the ``dispatch`` op's fields (another key
    is an error: a misspelt ``priorty`` must not pass unnoticed); any other JSON
    value (``30``, ``"text"``, a list) is the payload. When there is no ``type``
    the routing key is the type; when there is no ``priority`` the AMQP
    ``priority`` property counts (capped at 9, the top of aivad's scale);
    ``message_id`` becomes the task_id (else one is generated); ``reply_to`` and
    ``correlation_id`` are kept in the spec for the RPC reply. A body over
    ``max_body_bytes`` is refused before it is parsed.
    """
    obj = _loads(body, max_body_bytes)
    if isinstance(obj, dict):
        unknown = obj.keys() - TASK_FIELDS
        if unknown:
            raise BadMessage(f"unknown task fields {', '.join(sorted(unknown))} (a task is an object with "
                             f"{', '.join(sorted(TASK_FIELDS))}; any other JSON value is taken as the payload)")
        frame = dict(obj)
    else:
        frame = {"payload": obj}
    if frame.get("type") is None:
        if not routing_key:
            raise BadMessage("a task without type needs a routing key to be its type")
        frame["type"] = routing_key
    if frame.get("priority") is None and priority is not None:
        frame["priority"] = max(0, min(int(priority), 9))
    if message_id is not None and not 0 < len(message_id) <= MAX_TASK_ID_LENGTH:
        raise BadMessage(f"message_id must be 1..{MAX_TASK_ID_LENGTH} characters to be a task_id")
    try:
        task = parse_task_spec(frame, defaults, task_id=message_id or None)
    except OpError as exc:
        raise BadMessage(exc.message) from None
    return attrs.evolve(task, reply_to=reply_to or None, correlation_id=correlation_id or None)


def _properties(message_id: str, timestamp: str, typ: str, metadata: Mapping[str, Any],
                node_id: str) -> spec.Basic.Properties:
    try:
        stamp = dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        stamp = None
    corr = metadata.get("correlation_id")
    return spec.Basic.Properties(
        content_type="application/json",
        delivery_mode=2,
        message_id=message_id,
        timestamp=stamp,
        correlation_id=corr if isinstance(corr, str) else None,
        message_type=typ,
        app_id="aivad",
        headers={ORIGIN_HEADER: node_id},
    )


def _properties_for(env: Envelope, node_id: str) -> spec.Basic.Properties:
    return _properties(env.message_id, env.timestamp, env.type, env.metadata, node_id)


def _dead_letter_properties(props: spec.Basic.Properties, reason: str, exchange: str,
                            routing_key: str) -> spec.Basic.Properties:
    headers = dict(props.headers or {})
    headers[REASON_HEADER] = reason[:1000]
    headers["x-aivad-original-exchange"] = exchange
    headers["x-aivad-original-routing-key"] = routing_key
    # user_id must name the publishing user, expiration would drop the copy: leave them out.
    return spec.Basic.Properties(
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        headers=headers,
        delivery_mode=2,
        priority=props.priority,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        message_id=props.message_id,
        timestamp=props.timestamp,
        message_type=props.message_type,
        app_id=props.app_id,
    )


def _dead_task_reason(view: TaskView) -> str:
    """The dispatcher's wording of why a task is dead, from what its view keeps."""
    last = view.history[-1] if view.history else {}
    outcome = last.get("outcome", "dead")
    if outcome == "abandoned" and "attempt" not in last:
        return f"abandoned: {last.get('error')}"
    max_attempts = view.spec.get("max_attempts")
    if isinstance(max_attempts, int) and view.attempts >= max_attempts:
        return f"{outcome}: {view.attempts} of {max_attempts} attempts used"
    return f"{outcome}: not retryable"


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


# ---- the outbox in the store ---------------------------------------------------------
#
# Own events are not copied anywhere: the messages table has them, with their seq. The
# meta key ``amqp_forwarded_seq`` is how far they have been published (confirmed); the
# publisher reads what follows it. ``amqp_skip`` holds the seqs of own-root messages that
# came in through AMQP (written in the ingest's transaction): those are never sent back.
# RPC replies and dead-task copies are rows of ``amqp_outbox``, published in id order and
# deleted once confirmed.

#: meta key: the newest seq whose own events have all been published (or were never to be)
CURSOR_KEY = "amqp_forwarded_seq"
#: persist a cursor that only skipped other messages once it is this far ahead
_CURSOR_PERSIST_STEP = 10_000
_OWN_WHERE = " OR ".join(f"(type = '{r}' OR (type >= '{r}.' AND type < '{r}/'))" for r in sorted(OWN_EVENT_ROOTS))
_PROPERTY_FIELDS = ("content_type", "delivery_mode", "correlation_id", "reply_to", "message_id", "message_type",
                    "app_id", "headers")


def _is_own(topic: str) -> bool:
    return topic.partition(".")[0] in OWN_EVENT_ROOTS


def _props_to_json(props: spec.Basic.Properties) -> str:
    return json.dumps({f: getattr(props, f) for f in _PROPERTY_FIELDS if getattr(props, f) is not None})


def _props_from_json(text: str) -> spec.Basic.Properties:
    return spec.Basic.Properties(**json.loads(text))


@attrs.frozen
class _Pending:
    """What the publisher reads in one snapshot: outbox rows and own events after the cursor."""

    rows: list[tuple[int, str, str, bytes, spec.Basic.Properties]]
    events: list[tuple[int, str, str]]  # (seq, type, envelope JSON with seq)
    #: the cursor may move here once ``events`` are confirmed (every own event up to it is in them)
    scanned_through: int


def _read_cursor(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (CURSOR_KEY,)).fetchone()
    return int(row[0]) if row else 0


def _read_pending(conn: sqlite3.Connection, cursor: int, limit: int) -> _Pending:
    conn.execute("BEGIN")  # one snapshot: the rows and scanned_through agree
    try:
        newest = conn.execute(
            "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0)"
        ).fetchone()[0]
        rows = [(i, e, k, bytes(b), _props_from_json(p)) for i, e, k, p, b in conn.execute(
            "SELECT id, exchange, routing_key, properties, body FROM amqp_outbox ORDER BY id LIMIT ?", (limit,))]
        events = [(seq, t, f'{b[:-1]},"seq":{seq}}}') for seq, t, b in conn.execute(
            f"SELECT seq, type, body FROM messages m WHERE seq > ? AND seq <= ? AND ({_OWN_WHERE}) "
            "AND NOT EXISTS (SELECT 1 FROM amqp_skip s WHERE s.seq = m.seq) ORDER BY seq LIMIT ?",
            (cursor, newest, limit))]
        through = events[-1][0] if len(events) == limit else newest
        return _Pending(rows, events, max(through, cursor))
    finally:
        conn.execute("COMMIT")


def _count_pending(conn: sqlite3.Connection, cursor: int) -> tuple[int, int, int]:
    """(cursor in the store, own events after it, outbox rows)."""
    cursor = max(cursor, _read_cursor(conn))
    events = conn.execute(
        f"SELECT count(*) FROM messages m WHERE seq > ? AND ({_OWN_WHERE}) "
        "AND NOT EXISTS (SELECT 1 FROM amqp_skip s WHERE s.seq = m.seq)", (cursor,)).fetchone()[0]
    rows = conn.execute("SELECT count(*) FROM amqp_outbox").fetchone()[0]
    return cursor, int(events), int(rows)


def _skip_oldest_events(conn: sqlite3.Connection, _: Write, cursor: int, n: int) -> int:
    """Move the cursor past the ``n`` oldest own events (the outbox is over its bound); returns it."""
    row = conn.execute(
        f"SELECT max(seq) FROM (SELECT seq FROM messages m WHERE seq > ? AND ({_OWN_WHERE}) "
        "AND NOT EXISTS (SELECT 1 FROM amqp_skip s WHERE s.seq = m.seq) ORDER BY seq LIMIT ?)", (cursor, n),
    ).fetchone()
    cursor = max(cursor, int(row[0] or 0))
    _set_cursor(conn, cursor)
    return cursor


def _set_cursor(conn: sqlite3.Connection, cursor: int) -> None:
    conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                 "ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)", (CURSOR_KEY, cursor))
    conn.execute("DELETE FROM amqp_skip WHERE seq <= ?", (cursor,))


def _confirmed(conn: sqlite3.Connection, _: Write, last_row: int | None, cursor: int) -> None:
    """One write per confirmed batch: the rows go, the cursor moves."""
    if last_row is not None:
        conn.execute("DELETE FROM amqp_outbox WHERE id <= ?", (last_row,))
    _set_cursor(conn, cursor)


def _insert_rows(conn: sqlite3.Connection, items: list[tuple[str, str, bytes, spec.Basic.Properties]],
                 bound: int) -> int:
    """Queue RPC replies / dead-task copies; past ``bound`` rows the oldest go. Returns how many went."""
    conn.executemany("INSERT INTO amqp_outbox (exchange, routing_key, properties, body) VALUES (?, ?, ?, ?)",
                     [(e, k, _props_to_json(p), b) for e, k, b, p in items])
    (newest,) = conn.execute("SELECT coalesce(max(id), 0) FROM amqp_outbox").fetchone()
    return int(conn.execute("DELETE FROM amqp_outbox WHERE id <= ?", (newest - bound,)).rowcount)


# ---- the asyncio thread -------------------------------------------------------------


class _LoopThread:
    """An asyncio loop running in a thread of its own; trio talks to it in two ways.

    ``call`` runs a coroutine there and awaits it from trio (cancellation of the
    trio side cancels the asyncio task); ``call_soon`` schedules a plain
    callback there and returns at once.
    """

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self.loop = asyncio.new_event_loop()
        self._token = token
        self._thread = threading.Thread(target=self._run, name="aivad-amqp-asyncio", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            for _ in range(10):  # cancelling a task may start another (aiormq's close path does)
                tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
                if not tasks:
                    break
                for t in tasks:
                    t.cancel()
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    async def stop(self, limit_s: float) -> None:
        """Stop the loop and join the thread; shielded and bounded by ``limit_s``."""
        with contextlib.suppress(RuntimeError):  # already closed
            self.loop.call_soon_threadsafe(self.loop.stop)
        with trio.move_on_after(limit_s, shield=True):
            await trio.to_thread.run_sync(self._thread.join, abandon_on_cancel=True)
        if self._thread.is_alive():
            log.warning("amqp: asyncio thread did not stop within %.1fs", limit_s)

    async def call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        done = trio.Event()
        token = self._token

        def wake(_: concurrent.futures.Future[T]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(fn(*args), self.loop)
        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            raise
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise AmqpLost(f"{getattr(fn, '__name__', fn)} was cancelled on the asyncio side") from None

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)


# Errors after which a new connection may help. Anything else is a bug and crashes the service.
#: what ends a session and makes the supervisor connect again: the broker or the network went
#: away, or the store failed a write (the deliveries stay unacked and come back). Not RuntimeError
#: or a plain OSError: those are bugs, and reconnecting would repeat them forever (they end the
#: service at its error boundary instead, and /readyz says so).
_RETRYABLE: tuple[type[BaseException], ...] = (
    AmqpLost,
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,  # a RuntimeError: the channel closed under us
    ConnectionError,
    TimeoutError,
    socket.gaierror,
)


class _Consumer:
    """One consumed queue: the hand-off from the asyncio thread, and its state across sessions.

    The asyncio side appends deliveries to ``pending`` under ``lock`` and wakes
    trio once per batch; trio swaps the list out. ``stopped`` means this queue
    takes no more (the daemon is draining): nothing more of it is acked, and
    what it holds returns to the queue when the channel closes.
    """

    def __init__(self, queue: str, token: trio.lowlevel.TrioToken) -> None:
        self.queue = queue
        self._token = token
        self.lock = threading.Lock()
        self.pending: list[aiormq.abc.DeliveredMessage] = []
        self.wake_pending = False
        self.wake_send, self.wake_receive = trio.open_memory_channel[None](1)
        self.busy = False
        self.batch_done = trio.Event()
        self.consuming = False
        self.stopped = False
        self.delivered = 0

    def on_message(self, message: aiormq.abc.DeliveredMessage) -> None:
        """The consumer callback: a non-blocking hand-off, one trio wake per batch.

        Called by the channel's reader itself (:func:`_deliver_in_reader`), so it
        must not block and does not raise.
        """
        with self.lock:
            self.pending.append(message)
            self.delivered += 1
            if self.wake_pending:
                return
            self.wake_pending = True
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._wake)

    def _wake(self) -> None:  # runs in trio
        with contextlib.suppress(trio.WouldBlock):
            self.wake_send.send_nowait(None)

    def take(self) -> list[aiormq.abc.DeliveredMessage]:
        with self.lock:
            batch, self.pending = self.pending, []
            self.wake_pending = False
        return batch

    def forget(self) -> None:
        """The channel is gone: the broker requeues what it delivered; it comes again."""
        with self.lock:
            self.pending = []

    @property
    def settled(self) -> bool:
        return not self.pending and not self.busy


def _deliver_in_reader(channel: aiormq.abc.AbstractChannel,
                      hand_off: Callable[[aiormq.abc.DeliveredMessage], None]) -> None:
    """Make ``channel``'s reader hand each delivery to ``hand_off`` itself, with no task.

    aiormq starts an asyncio task per delivery to run the consumer callback (a
    task, a done callback and a future-store entry each time): measured on the
    bridge, 10–25 µs of the 120–130 µs of CPU it spent per message, under the GIL that
    the trio thread needs too (docs/performance.md, "Without a task per
    delivery"). The hand-off never blocks, so the reader can call it.

    This replaces aiormq's private ``Channel._on_deliver_frame`` on this one
    channel and reads the delivery with its private helpers; tests/test_amqp.py
    pins them, so an aiormq that changes them fails there, not in production.
    Deliveries for a consumer tag the channel no longer has (cancelled) are
    dropped as aiormq drops them: the broker requeues them with the channel.
    """
    read_header = channel._Channel__get_content_header  # type: ignore[attr-defined]
    read_content = channel._read_content  # type: ignore[attr-defined]

    async def on_deliver_frame(frame: spec.Basic.Deliver) -> None:
        message = await read_content(frame, await read_header())
        if frame.consumer_tag in channel.consumers:  # type: ignore[attr-defined]
            hand_off(message)

    channel._on_deliver_frame = on_deliver_frame  # type: ignore[attr-defined]


class _Session:
    """What belongs to one connection; replaced as a whole on reconnect."""

    __slots__ = ("cancelled", "channels", "connection", "consumer_tags", "publish_channel")

    def __init__(self, connection: aiormq.abc.AbstractConnection) -> None:
        self.connection = connection
        self.publish_channel: aiormq.abc.AbstractChannel | None = None
        #: queue name → the channel its consumer runs on (one channel per queue: tags and acks are per channel)
        self.channels: dict[str, aiormq.abc.AbstractChannel] = {}
        self.consumer_tags: dict[str, str] = {}
        #: fail when the broker cancels one of our consumers
        self.cancelled: list[asyncio.Future[None]] = []


#: an outbox row on its way into the store: (exchange, routing key, body, properties)
_Outgoing = tuple[str, str, bytes, spec.Basic.Properties]


class AmqpBridge:
    """The AMQP service's state; created and run by :func:`serve_amqp`.

    Public: :meth:`publish_event`, :meth:`forward_committed`, :meth:`statistics`, :meth:`stop_consuming`.
    """

    def __init__(self, cfg: AmqpConfig, store: Sink, ingest: Counter | None = None,
                 dispatcher: TaskSink | None = None, alert: Alert | None = None,
                 settled: Settled | None = None, letters: LetterSink | None = None) -> None:
        self._cfg = cfg
        #: where poison deliveries go (the store's table; in a cluster, the queue in Redis)
        self._letters: LetterSink = letters or store
        #: in a cluster: waits until the local commits through a seq are in the cluster's log, so an
        #: ack means "in the history every node serves", not only in this node's journal
        self._settled = settled
        self._alert: Alert = alert or (lambda level, code, message: None)
        self._store = store
        self._ingest = ingest
        self._dispatcher = dispatcher
        self.node_id = cfg.node_id or f"{socket.gethostname()}:{os.getpid()}"  # config.toml: host name and pid
        token = trio.lowlevel.current_trio_token()
        self._thread = _LoopThread(token)
        self._events = _Consumer(cfg.events_queue, token)
        self._tasks = _Consumer(cfg.tasks_queue, token) if dispatcher is not None else None
        self._consumers = [self._events] + ([self._tasks] if self._tasks is not None else [])
        self._session: _Session | None = None
        self._reached_consuming = False
        self._draining = False
        #: message_ids of AMQP deliveries being committed now: not forwarded back to the broker
        self._ingesting: set[str] = set()
        # the outbox lives in the store (see _read_pending); here: the cursor and what is
        # known to wait. RPC replies and dead-task copies go in with the task's end (end_writes)
        #: outbox rows dropped (over ``outbox_max``) by writes that ended tasks, not yet counted
        self._dropped_in_writes: list[int] = []
        self._outbox_event = trio.Event()  # set when there may be something to publish
        self._cursor = 0  # own events up to here are published (or were never to be)
        self._persisted_cursor = 0
        self._events_waiting = 0  # own events after the cursor (an estimate between recounts)
        self._rows_waiting = 0  # outbox rows in the store
        # statistics
        self._connected = False
        self._stopped = False
        self._reconnects = 0
        self._last_error: str | None = None
        self._stored = 0
        self._duplicates = 0
        self._acked = 0
        self._rejected = 0
        self._skipped_own = 0
        self._batches = 0
        self._published = 0
        self._outbox_dropped = 0
        self._tasks_submitted = 0
        self._tasks_duplicates = 0
        self._tasks_rejected = 0
        self._replies = 0
        self._dead_tasks = 0

    # ---- public ------------------------------------------------------------------

    def statistics(self) -> AmqpStatistics:
        return AmqpStatistics(
            connected=self._connected,
            consuming={c.queue: c.consuming for c in self._consumers},
            reconnects=self._reconnects,
            last_error=self._last_error,
            delivered=sum(c.delivered for c in self._consumers),
            stored=self._stored,
            duplicates=self._duplicates,
            acked=self._acked,
            rejected=self._rejected,
            skipped_own=self._skipped_own,
            batches=self._batches,
            published=self._published,
            outbox_depth=self._events_waiting + self._rows_waiting,
            outbox_dropped=self._outbox_dropped,
            tasks_submitted=self._tasks_submitted,
            tasks_duplicates=self._tasks_duplicates,
            tasks_rejected=self._tasks_rejected,
            replies=self._replies,
            dead_tasks=self._dead_tasks,
            stopped=self._stopped,
        )

    async def publish_event(self, env: Envelope) -> None:
        """Send one of the daemon's own events (not stored as a message) to ``events_exchange``.

        It waits in the store's outbox (bounded by ``outbox_max``) until the broker confirms it;
        returns once it is committed there.
        """
        await self._store_rows([(self._cfg.events_exchange, env.type, env.to_json().encode(),
                                 _properties_for(env, self.node_id))])

    def forward_committed(self, messages: list[StoredMessage]) -> None:
        """The store's after-commit hook: wake the publisher when ``task.*``, ``group.*`` or ``system.*`` came.

        Nothing is copied: the publisher reads those messages from the store, after
        its cursor (messages that came in through AMQP are not sent back; the body is
        the stored envelope, ``seq`` included). Never blocks.
        """
        ingesting = self._ingesting
        own = sum(1 for m in messages
                  if m.seq > self._cursor and _is_own(m.type)
                  and not (ingesting and json.loads(m.json)["message_id"] in ingesting))
        if own:
            self._events_waiting += own
            self._outbox_event.set()

    async def stop_consuming(self, grace_s: float | None = None) -> None:
        """Drain: cancel the consumers, settle what was delivered, take no more.

        Returns once nothing delivered is pending, or after ``grace_s`` (default:
        the config's); whatever is still unacked returns to the queue on close.
        """
        self._draining = True
        session = self._session
        with trio.move_on_after(self._cfg.grace_s if grace_s is None else grace_s):
            for consumer in self._consumers:
                if session is not None and consumer.queue in session.consumer_tags:
                    with contextlib.suppress(*_RETRYABLE):
                        await self._thread.call(self._aio_cancel_consumer, session, consumer.queue)
                consumer.consuming = False
            for consumer in self._consumers:
                while not consumer.settled:
                    await consumer.batch_done.wait()

    async def set_prefetch(self, prefetch: int) -> None:
        """Apply a reloaded ``[amqp] prefetch`` to the consumer channels now (and to later sessions)."""
        self._cfg = attrs.evolve(self._cfg, prefetch=prefetch)
        session = self._session
        if session is None:
            return
        for channel in list(session.channels.values()):
            with contextlib.suppress(*_RETRYABLE):
                await self._thread.call(self._aio_qos, channel, prefetch)

    @staticmethod
    async def _aio_qos(channel: aiormq.abc.AbstractChannel, prefetch: int) -> None:
        await channel.basic_qos(prefetch_count=prefetch)

    # ---- outbox --------------------------------------------------------------------

    def _dropped(self, n: int) -> None:
        if not n:
            return
        before = self._outbox_dropped
        self._outbox_dropped += n
        if before < 100 or before // 1000 != self._outbox_dropped // 1000:
            log.warning("amqp: outbox full (%d), %d entries dropped so far", self._cfg.outbox_max,
                        self._outbox_dropped)

    async def _store_rows(self, items: list[_Outgoing]) -> None:
        """One store write: the rows go into ``amqp_outbox``; past ``outbox_max`` the oldest go."""
        bound = self._cfg.outbox_max
        write = await self._store.submit(lambda conn, _: _insert_rows(conn, items, bound))
        dropped: int = await write.wait()
        self._rows_waiting = min(self._rows_waiting + len(items), bound)
        self._dropped(dropped)
        self._outbox_event.set()

    def _write_end_rows(self, conn: sqlite3.Connection, view: TaskView) -> None:
        """The dispatcher's ``end_writes`` hook, in the write that ends the task: its outbox rows
        commit with its end, so a crash cannot end a task and lose its RPC reply."""
        rows = self._end_rows(view)
        if rows:
            self._dropped_in_writes.append(_insert_rows(conn, rows, self._cfg.outbox_max))

    def _task_ended(self, view: TaskView) -> None:
        """The dispatcher's ``on_end`` hook, after that commit: count the rows, wake the outbox."""
        rows = 0
        if view.spec.get("reply_to"):
            self._replies += 1
            rows += 1
        if view.state == "dead":
            self._dead_tasks += 1
            rows += 1
        if rows:
            self._rows_waiting = min(self._rows_waiting + rows, self._cfg.outbox_max)
            while self._dropped_in_writes:
                self._dropped(self._dropped_in_writes.pop())
            self._outbox_event.set()

    def _end_rows(self, view: TaskView) -> list[_Outgoing]:
        """The RPC reply, and a dead task's copy for the dead-letter exchange."""
        rows: list[_Outgoing] = []
        task_spec = view.spec
        reply_to = task_spec.get("reply_to")
        correlation_id = task_spec.get("correlation_id")
        if reply_to:
            reply: dict[str, Any] = {"task_id": view.task_id, "state": view.state}
            if view.state == "completed":
                reply["result"] = view.result
            else:
                reply["error"] = view.error
            props = spec.Basic.Properties(
                content_type="application/json",
                correlation_id=correlation_id,
                message_id=derived_id("aivad", view.task_id, "reply"),
                message_type=view.type,
                app_id="aivad",
                headers={ORIGIN_HEADER: self.node_id},
            )
            rows.append(("", reply_to, _dumps(reply), props))
        if view.state == "dead":
            reason = _dead_task_reason(view)
            body = {"task_id": view.task_id, "type": view.type, "state": view.state, "attempts": view.attempts,
                    "error": view.error, "reason": reason, "group_id": view.group_id, "history": view.history,
                    "spec": task_spec}
            props = spec.Basic.Properties(
                content_type="application/json",
                delivery_mode=2,
                correlation_id=correlation_id,
                reply_to=reply_to,
                message_id=derived_id("aivad", view.task_id, "dead"),
                message_type=view.type,
                app_id="aivad",
                headers={ORIGIN_HEADER: self.node_id, REASON_HEADER: reason[:1000], "x-aivad-task-id": view.task_id},
            )
            rows.append((self._cfg.dead_letter_exchange, view.type, _dumps(body), props))
        return rows

    def _stopped_by_bug(self) -> None:
        self._stopped = True
        self._last_error = "stopped after an internal error (see the log)"
        for consumer in self._consumers:
            consumer.consuming = False

    # ---- supervisor (trio) ------------------------------------------------------

    async def _supervise(self) -> NoReturn:
        cfg = self._cfg
        delay = cfg.reconnect_initial_s
        attempts = 0
        while True:
            if attempts:
                self._reconnects += 1
            attempts += 1
            self._reached_consuming = False
            try:
                await self._run_session()
            except* _RETRYABLE as group:
                exc = group.exceptions[0]
                while isinstance(exc, BaseExceptionGroup):
                    exc = exc.exceptions[0]
                self._last_error = f"{type(exc).__name__}: {exc}"[:500]
                log.warning("amqp: %s; reconnecting", self._last_error)
                if self._reached_consuming or attempts == 1:
                    self._alert("warning", "amqp_lost", f"RabbitMQ: {self._last_error}; reconnecting")
            if self._reached_consuming:  # the backoff starts over after a session that worked
                delay = cfg.reconnect_initial_s
            sleep_s = random.uniform(delay / 2, delay)  # jitter
            delay = min(delay * 2, cfg.reconnect_max_s)
            await trio.sleep(sleep_s)

    async def _run_session(self) -> NoReturn:
        """One connection's life; ends by raising when it is lost."""
        connection = await self._thread.call(self._aio_connect)
        session = _Session(connection)
        try:
            await self._thread.call(self._aio_setup, session)
            self._session = session
            self._connected = True
            if self._last_error is not None:
                self._alert("info", "amqp_back", f"RabbitMQ: connected again to {_censor(self._cfg.url)}")
            self._last_error = None
            log.info("amqp: connected to %s", _censor(self._cfg.url))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch, session)
                nursery.start_soon(self._publish_loop, session)
                for consumer in self._consumers:
                    if not (self._draining or consumer.stopped):
                        await self._thread.call(self._aio_consume, session, consumer)
                        consumer.consuming = not (self._draining or consumer.stopped)
                        self._reached_consuming = True
                        log.info("amqp: consuming %s", consumer.queue)
                    nursery.start_soon(self._consume_loop, session, consumer)
        finally:
            self._connected = False
            self._session = None
            for consumer in self._consumers:
                consumer.consuming = False
                consumer.forget()
            with trio.move_on_after(self._cfg.grace_s, shield=True):
                with contextlib.suppress(*_RETRYABLE):
                    await self._thread.call(self._aio_close, session)
        raise AssertionError("unreachable: the session's tasks never return")

    async def _watch(self, session: _Session) -> NoReturn:
        await self._thread.call(self._aio_wait_lost, session)
        raise AmqpLost("connection lost")  # pragma: no cover - _aio_wait_lost raises

    # ---- consume (trio side) ----------------------------------------------------

    async def _consume_loop(self, session: _Session, consumer: _Consumer) -> NoReturn:
        cfg = self._cfg
        process = self._process_tasks if consumer is self._tasks else self._process_events
        while True:
            await consumer.wake_receive.receive()
            batch = consumer.take()
            consumer.busy = True
            try:
                for start in range(0, len(batch), cfg.batch_max):
                    chunk = batch[start:start + cfg.batch_max]
                    channel = session.channels.get(consumer.queue)
                    live = [m for m in chunk if m.channel is channel]  # older channels' deliveries come again
                    if live and not consumer.stopped:
                        await process(session, consumer, live)
            finally:
                consumer.busy = False
                consumer.batch_done.set()
                consumer.batch_done = trio.Event()

    def _ack(self, session: _Session, consumer: _Consumer, message: aiormq.abc.DeliveredMessage, n: int) -> None:
        """Acknowledge everything of ``consumer`` up to ``message`` (one ``multiple=True`` ack)."""
        tag = message.delivery.delivery_tag  # type: ignore[union-attr]
        self._thread.call_soon(self._aio_ack, session.channels[consumer.queue], tag)
        self._acked += n
        self._batches += 1

    async def _process_events(self, session: _Session, consumer: _Consumer,
                              live: list[aiormq.abc.DeliveredMessage]) -> None:
        envelopes: list[Envelope] = []
        poison: list[tuple[aiormq.abc.DeliveredMessage, str]] = []
        node_id = self.node_id
        for message in live:
            props = message.header.properties
            headers = props.headers
            if headers and headers.get(ORIGIN_HEADER) == node_id:
                self._skipped_own += 1
                continue
            try:
                envelopes.append(envelope_from_amqp(
                    message.body,
                    message.delivery.routing_key or "",  # type: ignore[union-attr]
                    message_id=props.message_id,
                    timestamp=props.timestamp,
                    correlation_id=props.correlation_id,
                    reply_to=props.reply_to,
                    headers=headers,
                    max_body_bytes=self._cfg.max_body_bytes,
                ))
            except BadMessage as exc:
                poison.append((message, str(exc)))
        if envelopes:
            ids = {env.message_id for env in envelopes}
            self._ingesting |= ids
            rows = [(e.message_id, e.type, e.to_json()) for e in envelopes]
            try:
                write = await self._store.submit(lambda conn, w: _ingest(conn, w, rows), isolated=False)
                results: list[Appended] = await write.wait()
            except StoreClosed:
                await self._idle_until_cancelled(session)
            except Exception as exc:  # unacked, they come again after the reconnect
                raise AmqpLost(f"the store failed a batch of {len(rows)}: {describe(exc)}") from exc
            finally:
                self._ingesting -= ids
            if self._settled is not None and results:
                await self._settled(max(r.seq for r in results))
            dups = sum(1 for r in results if r.duplicate)
            self._duplicates += dups
            self._stored += len(results) - dups
            if self._ingest is not None and len(results) > dups:
                self._ingest.count(INGRESS, len(results) - dups)
        for message, reason in poison:
            await self._dead_letter(session, consumer, message, reason)
        self._ack(session, consumer, live[-1], len(live))

    async def _process_tasks(self, session: _Session, consumer: _Consumer,
                             live: list[aiormq.abc.DeliveredMessage]) -> None:
        """Submit the batch's tasks in one write, in delivery order (FIFO within a priority), then ack them at once."""
        dispatcher = self._dispatcher
        assert dispatcher is not None
        specs = []
        for message in live:
            props = message.header.properties
            try:
                specs.append(task_spec_from_amqp(
                    message.body,
                    message.delivery.routing_key or "",  # type: ignore[union-attr]
                    dispatcher.cfg,
                    message_id=props.message_id,
                    priority=props.priority,
                    reply_to=props.reply_to,
                    correlation_id=props.correlation_id,
                    max_body_bytes=self._cfg.max_body_bytes,
                ))
            except BadMessage as exc:
                await self._dead_letter(session, consumer, message, str(exc))
                self._tasks_rejected += 1
        if specs and not await self._submit(specs):
            # the daemon is draining: nothing of this batch was stored; it returns to the queue on close
            await self._stop_consumer(session, consumer)
            return
        self._ack(session, consumer, live[-1], len(live))

    async def _submit(self, specs: list[TaskSpec]) -> bool:
        """Hand tasks to the dispatcher in one write; False when it takes no more (draining)."""
        dispatcher = self._dispatcher
        assert dispatcher is not None
        while True:
            if dispatcher.draining:
                return False
            try:
                write = await dispatcher.submit_many(specs)
                # Shielded once queued: a task without a message_id has a generated task_id, so a
                # redelivery after a cancelled wait would be stored again. Bounded, in case the
                # store itself is gone (a hard stop).
                with trio.move_on_after(self._cfg.grace_s, shield=True) as scope:
                    results = await write.wait()
                if scope.cancelled_caught:
                    raise AmqpLost(f"submitting {len(specs)} tasks took longer than grace_s")
            except StoreClosed:
                return False
            except OpError as exc:
                if exc.code == "internal":
                    raise AmqpLost(f"the store failed {len(specs)} tasks: {exc.message}") from exc
                if exc.code != "overloaded":
                    raise
                if dispatcher.draining:
                    return False
                log.warning("amqp: %s; %d tasks wait", exc.message, len(specs))
                await trio.sleep(0.5)  # full (max_queued): what is unacked waits in RabbitMQ, bounded by prefetch
                continue
            duplicates = sum(1 for _, duplicate in results if duplicate)
            self._tasks_duplicates += duplicates
            self._tasks_submitted += len(specs) - duplicates
            return True

    async def _stop_consumer(self, session: _Session, consumer: _Consumer) -> None:
        log.info("amqp: %s takes no more (draining)", consumer.queue)
        consumer.stopped = True
        consumer.consuming = False
        with contextlib.suppress(*_RETRYABLE):
            await self._thread.call(self._aio_cancel_consumer, session, consumer.queue)

    async def _idle_until_cancelled(self, session: _Session) -> NoReturn:
        """The store is draining: take no more; what is unacked returns to the queue on close."""
        log.info("amqp: store closed, consuming stopped")
        self._draining = True
        for consumer in self._consumers:
            consumer.consuming = False
            with contextlib.suppress(*_RETRYABLE):
                await self._thread.call(self._aio_cancel_consumer, session, consumer.queue)
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def _dead_letter(self, session: _Session, consumer: _Consumer, message: aiormq.abc.DeliveredMessage,
                           reason: str) -> None:
        cfg = self._cfg
        delivery = message.delivery
        routing_key = delivery.routing_key or ""  # type: ignore[union-attr]
        exchange = delivery.exchange or ""  # type: ignore[union-attr]
        props = message.header.properties
        copy = _dead_letter_properties(props, reason, exchange, routing_key)
        await self._thread.call(self._aio_publish, session, cfg.dead_letter_exchange, routing_key,
                                message.body, copy)
        detail = {
            "exchange": exchange,
            "routing_key": routing_key,
            "queue": consumer.queue,
            "message_id": props.message_id,
            "headers": _jsonable(props.headers or {}),
        }
        body = message.body
        if len(body) > cfg.max_body_bytes:  # kept whole on the dead-letter exchange; here its head
            detail["body_bytes"] = len(body)
            body = body[:cfg.max_body_bytes]
        await self._letters.add_dead_letter(DEAD_LETTER_KIND, reason, body.decode("utf-8", errors="backslashreplace"),
                                          detail)
        self._rejected += 1
        log.warning("amqp: dead-lettered a delivery from %s (routing key %r): %s", consumer.queue, routing_key,
                    reason)
        self._alert("warning", "dead_letter", f"AMQP delivery from {consumer.queue} dead-lettered: {reason}")

    # ---- publish (trio side) ----------------------------------------------------

    async def _load_outbox(self) -> None:
        """Read the cursor and what waits; over ``outbox_max`` own events, skip the oldest (counted)."""
        cursor, events, rows = await self._store.read(lambda conn: _count_pending(conn, self._cursor))
        self._cursor = self._persisted_cursor = cursor
        excess = events - self._cfg.outbox_max
        if excess > 0:
            write = await self._store.submit(lambda conn, w: _skip_oldest_events(conn, w, cursor, excess))
            self._cursor = self._persisted_cursor = await write.wait()
            self._dropped(excess)
            events -= excess
        self._events_waiting, self._rows_waiting = events, rows

    async def _publish_loop(self, session: _Session) -> NoReturn:
        """Publish the store's outbox in order with confirms; one store write per confirmed batch."""
        cfg = self._cfg
        exchange = cfg.events_exchange
        await self._load_outbox()
        while True:
            self._outbox_event = trio.Event()
            cursor = self._cursor
            pending: _Pending = await self._store.read(partial(_read_pending, cursor=cursor, limit=cfg.publish_window))
            items: list[_Outgoing] = [(e, k, b, p) for _, e, k, b, p in pending.rows]
            for _, topic, body in pending.events:
                obj = json.loads(body)
                items.append((exchange, topic, body.encode(), _properties(
                    obj["message_id"], obj["timestamp"], topic, obj.get("metadata") or {}, self.node_id)))
            if items:
                await self._thread.call(self._aio_publish_many, session, items)
            last_row = pending.rows[-1][0] if pending.rows else None
            moved = pending.scanned_through - self._persisted_cursor
            if items or moved >= _CURSOR_PERSIST_STEP:
                through = pending.scanned_through
                write = await self._store.submit(partial(_confirmed, last_row=last_row, cursor=through))
                await write.wait()
                self._persisted_cursor = through
            self._cursor = pending.scanned_through
            self._published += len(items)
            self._rows_waiting = max(0, self._rows_waiting - len(pending.rows))
            self._events_waiting = max(0, self._events_waiting - len(pending.events))
            if len(pending.rows) < cfg.publish_window and len(pending.events) < cfg.publish_window:
                if not pending.rows and not pending.events:
                    self._events_waiting = 0
                await self._outbox_event.wait()

    # ---- asyncio side (runs in the bridge thread) ------------------------------

    async def _aio_connect(self) -> aiormq.abc.AbstractConnection:
        async with asyncio.timeout(self._cfg.connect_timeout_s):
            with lean_frames():
                return await aiormq.connect(self._cfg.url,
                                            client_properties={"connection_name": f"aivad@{self.node_id}"})

    async def _aio_setup(self, session: _Session) -> None:
        cfg = self._cfg
        conn = session.connection
        async with asyncio.timeout(cfg.connect_timeout_s):
            publish = await _open_channel(conn, publisher_confirms=True)
            await publish.exchange_declare(cfg.events_exchange, exchange_type="topic", durable=True)
            await publish.exchange_declare(cfg.tasks_exchange, exchange_type="topic", durable=True)
            await publish.exchange_declare(cfg.dead_letter_exchange, exchange_type="fanout", durable=True)
            await publish.queue_declare(cfg.dead_letter_queue, durable=True)
            await publish.queue_bind(cfg.dead_letter_queue, cfg.dead_letter_exchange, "")
            await publish.queue_declare(cfg.events_queue, durable=True,
                                        arguments={"x-dead-letter-exchange": cfg.dead_letter_exchange})
            await publish.queue_bind(cfg.events_queue, cfg.events_exchange, cfg.events_binding_key)
            await publish.queue_declare(cfg.tasks_queue, durable=True,
                                        arguments={"x-max-priority": cfg.tasks_max_priority})
            await publish.queue_bind(cfg.tasks_queue, cfg.tasks_exchange, cfg.tasks_binding_key)
            session.publish_channel = publish
            for consumer in self._consumers:
                channel = await _open_channel(conn, publisher_confirms=False)
                await channel.basic_qos(prefetch_count=cfg.prefetch)
                session.channels[consumer.queue] = channel
                cancelled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                channel.on_consumer_cancel_callbacks.add(_on_cancel(cancelled, consumer.queue))
                session.cancelled.append(cancelled)

    async def _aio_consume(self, session: _Session, consumer: _Consumer) -> None:
        channel = session.channels[consumer.queue]
        _deliver_in_reader(channel, consumer.on_message)
        # aiormq takes a plain function too (it wraps it); its own task-per-delivery path is not used
        ok = await channel.basic_consume(consumer.queue, consumer.on_message, no_ack=False)  # type: ignore[arg-type]
        assert ok.consumer_tag is not None
        session.consumer_tags[consumer.queue] = ok.consumer_tag

    async def _aio_cancel_consumer(self, session: _Session, queue: str) -> None:
        channel = session.channels.get(queue)
        tag = session.consumer_tags.pop(queue, None)
        if channel is not None and tag is not None and not channel.is_closed:
            await channel.basic_cancel(tag)

    async def _aio_wait_lost(self, session: _Session) -> NoReturn:
        watched: list[asyncio.Future[Any]] = [session.connection.closing]
        for channel in (session.publish_channel, *session.channels.values()):
            if channel is not None:
                watched.append(channel.closing)
        watched += session.cancelled
        try:
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for future in watched:
                if future not in session.cancelled and not future.done():
                    future.cancel()  # observers only: this does not close anything
        future = done.pop()
        reason = None if future.cancelled() else future.exception()
        raise AmqpLost(f"{reason or 'closed'}")

    def _aio_ack(self, channel: aiormq.abc.AbstractChannel, delivery_tag: int) -> None:
        if channel.is_closed:
            return  # the broker requeued these; they come again and are de-duplicated
        task = asyncio.get_running_loop().create_task(_ack(channel, delivery_tag))
        task.add_done_callback(_log_task_error)

    async def _aio_publish(self, session: _Session, exchange: str, routing_key: str, body: bytes,
                           properties: spec.Basic.Properties) -> None:
        channel = session.publish_channel
        assert channel is not None
        confirm = await channel.basic_publish(body, exchange=exchange, routing_key=routing_key,
                                              properties=properties)
        if not isinstance(confirm, spec.Basic.Ack):
            raise AmqpLost(f"publish to {exchange!r} not confirmed: {confirm!r}")

    async def _aio_publish_many(self, session: _Session,
                                items: list[tuple[str, str, bytes, spec.Basic.Properties]]) -> None:
        channel = session.publish_channel
        assert channel is not None
        confirms = await asyncio.gather(*(
            channel.basic_publish(body, exchange=exchange, routing_key=key, properties=props)
            for exchange, key, body, props in items
        ))
        if not all(isinstance(c, spec.Basic.Ack) for c in confirms):
            raise AmqpLost("a publish was not confirmed by the broker")

    async def _aio_close(self, session: _Session) -> None:
        with contextlib.suppress(Exception):
            await session.connection.close()


async def _open_channel(conn: aiormq.abc.AbstractConnection, *, publisher_confirms: bool) -> aiormq.abc.AbstractChannel:
    """``conn.channel()``; aiormq raises a plain RuntimeError when the connection is closing: that is a loss."""
    try:
        return await conn.channel(publisher_confirms=publisher_confirms)
    except RuntimeError as exc:
        if conn.is_closed:
            raise AmqpLost(f"connection closed while opening a channel: {exc}") from None
        raise


def _ingest(conn: sqlite3.Connection, write: Write, rows: list[tuple[str, str, str]]) -> list[Appended]:
    """Store deliveries; the own-root ones go into ``amqp_skip`` in the same transaction (never sent back)."""
    results = insert_rows(conn, write, rows)
    own = [(m.seq,) for m in write.messages if _is_own(m.type)]
    if own:
        conn.executemany("INSERT OR IGNORE INTO amqp_skip (seq) VALUES (?)", own)
    return results


def _on_cancel(cancelled: asyncio.Future[None], queue: str) -> Callable[[Any], None]:
    def on_cancel(_frame: Any) -> None:
        if not cancelled.done():
            cancelled.set_exception(AmqpLost(f"consumer on {queue} cancelled by the broker"))

    return on_cancel


async def _ack(channel: aiormq.abc.AbstractChannel, delivery_tag: int) -> None:
    await channel.basic_ack(delivery_tag, multiple=True, wait=False)


def _log_task_error(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("amqp: ack not sent: %s", task.exception())


def _censor(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


async def serve_amqp(
    cfg: AmqpConfig,
    store: Sink,
    *,
    ingest: Counter | None = None,
    dispatcher: TaskSink | None = None,
    faults: Faults | None = None,
    alert: Alert | None = None,
    settled: Settled | None = None,
    letters: LetterSink | None = None,
    task_status: trio.TaskStatus[AmqpBridge] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run the AMQP bridge until cancelled (DESIGN §4.5).

    Returns: never. ``started()`` is called at once with the :class:`AmqpBridge`
    (readiness of the embedded path does not wait on the broker): the
    connection is made in the background and retried with capped exponential
    backoff; watch ``statistics().consuming``. With a ``dispatcher`` the tasks
    queue is consumed too, and its ``on_end`` hook sends RPC replies and
    dead-task copies (removed again when the bridge stops).

    Resource handling: one thread runs the asyncio loop aiormq needs; on
    cancellation the connection is closed (unacked deliveries go back to the
    queue) and the thread is joined, both shielded and bounded by ``grace_s``.

    Error handling: broker and network errors, and store errors on ingest, are
    retried with backoff. A bug (anything else) ends the bridge at its error
    boundary — logged, counted, alerted — and it stays stopped: the embedded path
    serves on, ``statistics().stopped`` and /readyz say why. Without ``faults``
    (tests of the bridge alone) a bug propagates.
    """
    bridge = AmqpBridge(cfg, store, ingest, dispatcher, alert, settled, letters)
    await bridge._load_outbox()
    bridge._thread.start()
    if dispatcher is not None:
        dispatcher.end_writes.append(bridge._write_end_rows)
        dispatcher.on_end.append(bridge._task_ended)
    try:
        task_status.started(bridge)
        if faults is None:
            await bridge._supervise()
        await faults.isolated("amqp.bridge", _censor(cfg.url), bridge._supervise)
        bridge._stopped_by_bug()
        await trio.sleep_forever()
    finally:
        if dispatcher is not None:
            dispatcher.end_writes.remove(bridge._write_end_rows)
            dispatcher.on_end.remove(bridge._task_ended)
        await bridge._thread.stop(cfg.grace_s)
