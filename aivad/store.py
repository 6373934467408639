"""The store: the single writer that assigns ``seq``, and the history readers.

Every message is committed before anyone is told about it: a producer's ``ok``,
an AMQP ack and a subscriber's push all happen after the transaction that gave
the message its ``seq``. One writer task drains a bounded queue of pending
writes and commits as many as are waiting in one transaction (group commit),
with the blocking SQLite calls in a worker thread — one thread crossing per
batch, not per message. Readers use their own connections (WAL mode lets them
run beside the writer).

``seq`` is SQLite's ``AUTOINCREMENT`` row id: strictly increasing in commit
order and never reused, even after retention has deleted the newest rows.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import json
import logging
import math
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import attrs
import outcome
import trio

from .boundary import describe
from .config import StoreConfig
from .envelope import Envelope, compile_pattern, literal_prefix
from .protocol import OpError

__all__ = ["Appended", "History", "Store", "StoreClosed", "StoredMessage", "Write", "insert_envelopes", "serve_store"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    stored_at REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_type_seq ON messages (type, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
-- the history's epoch (DESIGN §4.3): made once, with the database; a new file is a new history
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    group_id TEXT,
    result TEXT,
    error TEXT,
    history TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
-- the tasks a restart takes up again, in order (Dispatcher.recover), and no others: a task leaves
-- this index when it ends, so it stays as small as the work in flight. (An index of every task's
-- state, which no query used, moved an entry on every change of state: two more pages in the WAL
-- per change; docs/performance.md, "Pages per task".)
DROP INDEX IF EXISTS tasks_state;
CREATE INDEX IF NOT EXISTS tasks_unfinished ON tasks (created_at) WHERE state NOT IN ('completed', 'dead');
CREATE INDEX IF NOT EXISTS tasks_group ON tasks (group_id) WHERE group_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL,
    body TEXT NOT NULL,
    detail TEXT NOT NULL
);
-- the AMQP bridge (aivad/amqp.py): RPC replies and dead-task copies waiting for the broker,
-- and the seqs of task.*/group.*/system.* messages that came in through AMQP (never sent back)
CREATE TABLE IF NOT EXISTS amqp_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    properties TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS amqp_skip (seq INTEGER PRIMARY KEY);
"""

#: rows read per query while filtering a wildcard pattern in Python
_SCAN_CHUNK = 2000
#: how often the WAL is checkpointed into the database (outside the writer)
_CHECKPOINT_INTERVAL_S = 1.0
#: upper bounds (seconds) of the commit latency histogram
COMMIT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, float("inf"))


class StoreClosed(Exception):
    """The store is draining or stopped and takes no more writes."""


def _failed_write(exc: BaseException) -> OpError:
    """What a write waiting on a failed commit raises: ``internal``, with the cause in one line."""
    return OpError("internal", f"the store could not commit: {describe(exc, 120)}")


@attrs.frozen
class Appended:
    """What a producer is told after commit: the message's seq, and whether it was a duplicate."""

    seq: int
    duplicate: bool


@attrs.frozen
class StoredMessage:
    """A committed message: its seq, its topic, and its envelope as JSON (with ``seq``)."""

    seq: int
    type: str
    json: str


@attrs.frozen
class History:
    """Messages matching a pattern, and how far the read looked.

    ``scanned_through`` is how far the read looked: every matching message up
    to it is in ``messages`` unless ``messages`` hit the limit. It is the newest
    seq the read could see unless the scan budget stopped it earlier (then
    ``complete`` is false). ``retention_floor`` is the newest seq retention had
    deleted, in the same snapshot: a reader that was at or past it missed nothing.
    """

    messages: list[StoredMessage]
    scanned_through: int
    retention_floor: int = 0
    complete: bool = True

    def within(self, max_bytes: int) -> History:
        """The first messages that fit in ``max_bytes`` (at least one), read as scanned through the
        last of them: a page is bounded in bytes as in count, and paging moves on from where it stopped."""
        size = 0
        for i, message in enumerate(self.messages):
            size += len(message.json)
            if size > max_bytes and i:
                kept = self.messages[:i]
                return History(kept, kept[-1].seq, self.retention_floor, complete=False)
        return self

    def page(self, after: int, limit: int) -> dict[str, Any]:
        """The fields of a history reply: the envelopes, and ``last_seq`` to ask after next (DESIGN §4.3).

        ``last_seq`` is the seq of the last message returned; when the page is not
        full because the scan budget ran out before the newest message, it is the
        seq scanned through instead, so asking after it moves on (a client pages
        until ``last_seq`` stops moving). Otherwise ``after`` when nothing matched.
        """
        last_seq = self.messages[-1].seq if self.messages else after
        if not self.complete and len(self.messages) < limit:
            last_seq = max(last_seq, self.scanned_through)
        return {"messages": [json.loads(m.json) for m in self.messages], "last_seq": last_seq}


@attrs.frozen
class DeadLetter:
    id: int
    kind: str
    reason: str
    created_at: float
    body: str
    detail: dict[str, Any]


@attrs.frozen
class DeadLetterPage:
    """The letters of one read, oldest first, and the ``after`` of the next read (None: the queue
    was read to its end). A read filtered by kind may stop short of ``limit`` — the cluster's queue
    reads a bounded number of letters per call — so paging goes by ``next_after``, not by the last
    letter returned."""

    letters: list[DeadLetter]
    next_after: int | None


@attrs.frozen
class StoreStatistics:
    last_seq: int
    retention_floor: int
    stored_messages: int
    write_queue_depth: int
    write_queue_size: int
    commits: int
    committed_messages: int
    duplicates: int
    commit_seconds_total: float
    last_commit_seconds: float
    #: cumulative (upper bound in seconds, commits) pairs, the last bound +inf
    commit_seconds_buckets: tuple[tuple[float, int], ...]
    #: commits that failed (disk full, I/O error), and why the last one did while it still does
    failed_commits: int = 0
    failure: str | None = None
    #: pauses of the writer between two commits for the WAL's checkpoint to catch up (``wal_max_bytes``)
    wal_catch_ups: int = 0
    #: the oldest dead letters deleted to keep ``dead_letters_kept``
    dead_letters_dropped: int = 0


def _body_with_seq(body: str, seq: int) -> str:
    """Splice ``"seq":N`` into stored JSON: the row is written before its seq is known."""
    return f'{body[:-1]},"seq":{seq}}}'


class Write:
    """One unit of work for the writer: run by the single writer inside a savepoint."""

    __slots__ = ("apply", "bulk", "committed", "done", "error", "isolated", "lazy", "messages", "result")

    def __init__(
        self,
        apply: Callable[[sqlite3.Connection, Write], Any],
        isolated: bool = True,
        committed: Callable[[Write], None] | None = None,
        bulk: bool = False,
        lazy: bool = False,
    ) -> None:
        self.apply = apply
        #: nobody waits for it: it may wait ``[store] lazy_write_delay_s`` for others to share its commit
        self.lazy = lazy
        #: one statement over many rows (retention, a purge): committed in a worker thread, where
        #: SQLite runs it without the GIL, rather than on the event loop (see Store._commit)
        self.bulk = bulk
        #: called in trio right after the commit, before anyone waiting is woken (in commit order)
        self.committed = committed
        #: in its own savepoint, so its failure leaves its batch neighbours alone; plain
        #: appends cannot fail on their own (duplicates are answered, not raised) and skip it
        self.isolated = isolated
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.messages: list[StoredMessage] = []

    async def wait(self) -> Any:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class _WriterThread:
    """The one thread that runs the writer's SQLite calls: a queue in, a trio wakeup out.

    ``trio.to_thread.run_sync`` hands every call to its thread cache, which cost
    a fifth of the daemon's time on the task path (bench/dispatch.py under
    py-spy); a dedicated thread fed by a ``SimpleQueue`` costs one put and one
    ``run_sync_soon`` per batch, and keeps the write connection on one thread.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="aivad-store-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in the writer thread. Not cancellable: a commit, once begun, finishes."""
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()
        done: list[outcome.Outcome[Any]] = []

        def job() -> None:
            done.append(outcome.capture(fn, *args))
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(trio.lowlevel.reschedule, task)

        self._jobs.put(job)
        await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        return done[0].unwrap()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)


class _WriteLocked(sqlite3.OperationalError):
    """Another connection (another process) holds the database's write lock."""


#: how long a commit waits for another connection's write lock before its batch fails
_LOCK_WAIT_S = 5.0


class Store:
    """Appends, history and dead letters; created and run by :func:`serve_store`.

    ``last_seq`` is the newest seq whose commit the daemon has processed: the
    router has been handed every message up to it. Subscribers use it to decide,
    without awaiting, when a replay has caught up with the live stream.
    """

    def __init__(self, cfg: StoreConfig, writer: sqlite3.Connection, thread: _WriterThread | None) -> None:
        self._cfg = cfg
        self._writer = writer
        self._thread = thread
        self._send, self._receive = trio.open_memory_channel[Write](cfg.write_queue)
        self._readers: list[sqlite3.Connection] = []
        self._reader_limit = trio.CapacityLimiter(cfg.read_connections)
        self._client_limit = trio.CapacityLimiter(cfg.history_concurrency)
        self._on_commit: list[Callable[[list[StoredMessage]], None]] = []
        self._on_failure: list[Callable[[str | None], None]] = []
        #: why the last commit (or retention round) failed; None once one succeeds again (/readyz)
        self.failure: str | None = None
        self._failures = 0
        self._closed = False
        self._writer_done = trio.Event()
        self._commits = 0
        self._committed_messages = 0
        self._duplicates = 0
        self._commit_seconds_total = 0.0
        self._last_commit_seconds = 0.0
        self._commit_buckets = [0] * len(COMMIT_BUCKETS_S)
        #: set by the checkpointer: the WAL is past ``wal_max_bytes`` (it did not start over); the writer
        #: checkpoints itself before its next commit
        self.wal_behind = False
        self._wal_catch_ups = 0
        self._dead_letters_dropped = 0
        self._dead_letters_warned_at = -math.inf
        self.last_seq: int = writer.execute(
            "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0)"
        ).fetchone()[0]
        self.retention_floor: int = self._meta(writer, "retention_floor")
        self._stored_messages: int = writer.execute("SELECT count(*) FROM messages").fetchone()[0]
        #: the history's epoch, fixed when the database was created (DESIGN §4.3)
        self.epoch: str = writer.execute("SELECT value FROM info WHERE key = 'epoch'").fetchone()[0]

    # ---- writes -------------------------------------------------------------

    def on_commit(self, callback: Callable[[list[StoredMessage]], None]) -> None:
        """Call ``callback(messages)`` after every commit, in seq order. It must not block."""
        self._on_commit.append(callback)

    def on_failure(self, callback: Callable[[str | None], None]) -> None:
        """Call ``callback(why)`` when writing starts failing, ``callback(None)`` when it works again."""
        self._on_failure.append(callback)

    def _set_failure(self, exc: BaseException | None) -> None:
        """Record a failed commit (``exc``) or a good one (None); listeners hear of each change."""
        if exc is None:
            if self.failure is None:
                return
            self.failure = None
            log.warning("store: commits work again")
        else:
            self._failures += 1
            was_ok = self.failure is None
            self.failure = describe(exc, 300)
            log.error("store: a commit failed: %s", self.failure)
            if not was_ok:
                return
        for callback in self._on_failure:
            callback(self.failure)

    async def submit(
        self,
        apply: Callable[[sqlite3.Connection, Write], Any],
        *,
        isolated: bool = True,
        committed: Callable[[Write], None] | None = None,
        bulk: bool = False,
        lazy: bool = False,
    ) -> Write:
        """Queue a write (waiting for room in the bounded queue); await ``.wait()`` for its result."""
        if self._closed:
            raise StoreClosed("the store is draining")
        write = Write(apply, isolated, committed, bulk, lazy)
        try:
            await self._send.send(write)
        except trio.ClosedResourceError:
            raise StoreClosed("the store is draining") from None
        return write

    async def submit_append(
        self, envelopes: Sequence[Envelope], *, committed: Callable[[Write], None] | None = None
    ) -> Write:
        """Queue envelopes for storage; the write's result is a ``list[Appended]``."""
        rows = [(e.message_id, e.type, e.to_json()) for e in envelopes]  # JSON on this side, not under the writer
        return await self.submit(lambda conn, write: insert_rows(conn, write, rows), isolated=False,
                                 committed=committed)

    async def append_many(self, envelopes: Sequence[Envelope]) -> list[Appended]:
        """Store envelopes in one transaction; returns after commit, in order."""
        write = await self.submit_append(envelopes)
        result: list[Appended] = await write.wait()
        return result

    async def append(self, envelope: Envelope) -> Appended:
        return (await self.append_many([envelope]))[0]

    async def add_dead_letter(self, kind: str, reason: str, body: str, detail: dict[str, Any]) -> int:
        """Keep something that could not be processed (poison message, dead task); returns its id."""
        write = await self.submit(lambda conn, _: self.insert_dead_letter(conn, kind, reason, body, detail))
        result: int = await write.wait()
        return result

    @property
    def dead_letters_kept(self) -> int:
        """``[store] dead_letters_kept`` now (a reload changes it): a cluster's dead-letter stream keeps as many."""
        return self._cfg.dead_letters_kept

    def insert_dead_letter(
        self, conn: sqlite3.Connection, kind: str, reason: str, body: str, detail: dict[str, Any]
    ) -> int:
        """Insert a dead letter inside a write (in the writer's thread); returns its id.

        The table keeps the newest ``dead_letters_kept`` (a peer that sends the AMQP bridge
        nothing but garbage fills it, each letter as big as a message may be): past that, the
        oldest go in the same write, with the dead tasks they could have replayed
        (aivad/task_retention.py), counted in ``dead_letters_dropped`` and logged.
        """
        letter_id = _insert_dead_letter(conn, kind, reason, body, detail)
        floor = letter_id - self.dead_letters_kept
        if floor > 0 and (dropped := _drop_dead_letters_through(conn, floor)):
            self._dead_letters_dropped += dropped
            if time.monotonic() >= self._dead_letters_warned_at + 60:
                self._dead_letters_warned_at = time.monotonic()
                log.warning("the dead-letter table is full ([store] dead_letters_kept = %d): the oldest go "
                            "(%d so far)", self._cfg.dead_letters_kept, self._dead_letters_dropped)
        return letter_id

    async def _commit(self, batch: list[Write]) -> float:
        """Commit ``batch`` in the writer's own thread (``synchronous = FULL``), else right here.

        With NORMAL a commit only writes into the OS page cache (WAL; the
        checkpoint's fsync runs on a connection of its own, :func:`_serve_checkpoints`),
        so it runs in the trio thread: in a thread of its own every SQLite statement
        handed the GIL back and forth with the busy trio thread, and bench/dispatch.py's
        daemon spent ~260 µs of writer-thread CPU per task round trip on that
        (docs/performance.md, "The writer in the trio thread"). FULL keeps its
        fsync per commit off the event loop. A batch that finds another
        process holding the write lock waits for it in a worker thread, never here;
        so does a batch with a bulk write (a retention round deleting many rows is one
        SQLite step, run without the GIL there).
        """
        if self._thread is not None:
            return float(await self._thread.call(self._commit_batch, batch, _LOCK_WAIT_S))
        if not any(write.bulk for write in batch):
            try:
                return self._commit_batch(batch, 0.0)
            except _WriteLocked:
                pass
        return await trio.to_thread.run_sync(self._commit_batch, batch, _LOCK_WAIT_S)

    def _commit_batch(self, batch: list[Write], lock_wait_s: float) -> float:
        """Every write in its own savepoint, one commit for all (in whichever thread :meth:`_commit` chose)."""
        started = time.perf_counter()
        conn = self._writer
        _begin_immediate(conn, lock_wait_s)
        try:
            for write in batch:
                if not write.isolated:
                    write.result = write.apply(conn, write)
                    continue
                conn.execute("SAVEPOINT w")
                try:
                    write.result = write.apply(conn, write)
                except Exception as exc:  # noqa: BLE001 - one bad write must not fail its neighbours
                    conn.execute("ROLLBACK TO w")
                    write.error = exc
                    write.messages = []
                conn.execute("RELEASE w")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite may have rolled back already (disk full, I/O error)
                conn.execute("ROLLBACK")
            raise
        return time.perf_counter() - started

    async def _write_loop(self) -> None:
        """Drain the queue: take what is waiting (up to ``max_batch``), commit, then tell everyone."""
        try:
            await self._drain_queue()
        finally:
            self._writer_done.set()

    async def _drain_queue(self) -> None:
        async with self._receive:
            async for first in self._receive:
                if self.wal_behind:
                    await self._catch_up_wal()
                # one scheduler pass first: writes from tasks that are already runnable join this commit
                await trio.lowlevel.checkpoint()
                batch = [first]
                self._take_waiting(batch)
                if all(write.lazy for write in batch):
                    await self._wait_for_company(batch)
                await self._commit_and_tell(batch)

    def _take_waiting(self, batch: list[Write]) -> None:
        """Add the writes already queued to ``batch`` (up to ``max_batch``)."""
        while len(batch) < self._cfg.max_batch:
            try:
                batch.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break

    async def _wait_for_company(self, batch: list[Write]) -> None:
        """Hold a batch of lazy writes for ``lazy_write_delay_s`` or until a write someone waits for comes.

        Why: a task's dispatch record (nobody waits for it) is queued while the writer is idle
        and would be a commit of its own; held, it shares the commit of the task's end (or of
        the next task) — a commit and its WAL pages fewer per task, and with ``synchronous =
        FULL`` an fsync fewer. Cancelled meanwhile (the daemon stops), the batch is committed
        before the writer goes: what was queued stays queued-then-committed, as before.
        """
        try:
            with trio.move_on_after(self._cfg.lazy_write_delay_s):
                while len(batch) < self._cfg.max_batch:
                    try:
                        write = await self._receive.receive()
                    except trio.EndOfChannel:
                        return
                    batch.append(write)
                    if not write.lazy:
                        self._take_waiting(batch)
                        return
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                await self._commit_and_tell(batch)
            raise

    async def _commit_and_tell(self, batch: list[Write]) -> None:
        """Commit ``batch``, then tell its writers and listeners; a failed commit fails its writes only."""
        try:
            seconds = await self._commit(batch)
        except Exception as exc:  # noqa: BLE001 - disk full, I/O error, a bad write: fail these, go on
            self._set_failure(exc)
            failed = _failed_write(exc)
            for write in batch:
                write.error = failed
                write.messages = []
                write.done.set()
            return
        self._after_commit(batch, seconds)
        if self.failure is not None:
            self._set_failure(None)

    async def _catch_up_wal(self) -> None:
        """Checkpoint between two commits, so the next one starts the WAL over.

        Why: SQLite starts the WAL over only in a write transaction that began after a
        checkpoint had copied all of it. The checkpoints beside the writer
        (:func:`_serve_checkpoints`) end while the writer is inside a transaction, whose commit
        then appends again — so under a steady stream of writes the WAL never started over and
        grew without bound (2.6 GB in 45 s under bench/dispatch.py, the database 112 MB, until
        the disk would be full). Most of the copying is done by them; this copies what came
        since their last round. ``journal_size_limit`` then cuts the file back.
        """
        self.wal_behind = False
        self._wal_catch_ups += 1
        try:
            if self._thread is not None:
                await self._thread.call(_checkpoint, self._writer)
            else:
                await trio.to_thread.run_sync(_checkpoint, self._writer)
        except sqlite3.Error as exc:  # an I/O error: the checkpointer asks again next round
            log.warning("WAL checkpoint failed: %s", exc)

    def _after_commit(self, batch: list[Write], seconds: float) -> None:
        messages = [m for write in batch for m in write.messages]
        self._commits += 1
        self._commit_seconds_total += seconds
        self._last_commit_seconds = seconds
        self._commit_buckets[bisect.bisect_left(COMMIT_BUCKETS_S, seconds)] += 1
        if messages:
            self.last_seq = messages[-1].seq
            self._stored_messages += len(messages)
            self._committed_messages += len(messages)
            for callback in self._on_commit:
                callback(messages)
        for write in batch:
            if isinstance(write.result, list):
                self._duplicates += sum(1 for r in write.result if isinstance(r, Appended) and r.duplicate)
            if write.committed is not None and write.error is None:
                write.committed(write)
            write.done.set()

    async def drain(self) -> None:
        """Take no more writes; return once every queued write has been committed."""
        self._closed = True
        await self._send.aclose()
        await self._writer_done.wait()

    def reconfigure(self, cfg: StoreConfig) -> None:
        """Take new retention limits (the path and queue sizes need a restart)."""
        self._cfg = cfg

    # ---- retention ----------------------------------------------------------

    async def apply_retention(self, max_messages: int, max_age_s: float) -> int:
        """Delete the oldest messages beyond the count and age limits; returns how many went."""

        def trim(conn: sqlite3.Connection, _: Write) -> tuple[int, int]:
            floor = 0
            if max_messages:
                row = conn.execute(
                    "SELECT seq FROM messages ORDER BY seq DESC LIMIT 1 OFFSET ?", (max_messages,)
                ).fetchone()
                floor = row[0] if row else 0
            if max_age_s:
                row = conn.execute(
                    "SELECT max(seq) FROM messages WHERE stored_at < ?", (time.time() - max_age_s,)
                ).fetchone()
                floor = max(floor, row[0] or 0)
            if floor <= 0:
                return 0, 0
            deleted = conn.execute("DELETE FROM messages WHERE seq <= ?", (floor,)).rowcount
            floor = max(floor, self._meta(conn, "retention_floor"))
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('retention_floor', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (floor,),
            )
            return deleted, floor

        write = await self.submit(trim, bulk=True)
        deleted, floor = await write.wait()
        if deleted:
            self.retention_floor = max(self.retention_floor, floor)
            self._stored_messages -= deleted
            log.info("retention dropped %d messages, floor now seq %d", deleted, self.retention_floor)
        return int(deleted)

    # ---- reads --------------------------------------------------------------

    async def read(self, fn: Callable[[sqlite3.Connection], Any], *, client: bool = False) -> Any:
        """Run ``fn(connection)`` on a reader connection in a worker thread.

        ``client``: a read a peer asked for (``history``). Those share a pool of
        their own (``history_concurrency``), so a flood of them cannot starve
        replays and the daemon's own reads, which use ``read_connections``.
        """
        async with self._client_limit if client else self._reader_limit:
            conn = self._readers.pop() if self._readers else self._connect_reader()
            try:
                return await trio.to_thread.run_sync(fn, conn)
            finally:
                self._readers.append(conn)

    def _connect_reader(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._cfg.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA query_only = ON")
        return conn

    async def history(self, pattern: str, after: int, limit: int, *, client: bool = False) -> History:
        """Up to ``limit`` messages matching ``pattern`` with seq > ``after``, ascending.

        A wildcard pattern looks at no more than ``history_scan_rows`` rows per
        call: ``scanned_through`` says how far it got, and the next call goes on
        from there (a pattern that matches nothing over a large table costs each
        call a bounded read, and pages still move on).
        """
        scan_rows = self._cfg.history_scan_rows
        history: History = await self.read(
            lambda conn: self._history(conn, pattern, after, limit, scan_rows), client=client
        )
        return history

    @staticmethod
    def _history(conn: sqlite3.Connection, pattern: str, after: int, limit: int, scan_rows: int) -> History:
        conn.execute("BEGIN")  # one snapshot: the rows, scanned_through and the floor agree
        try:
            newest, floor = conn.execute(
                "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0), "
                "coalesce((SELECT value FROM meta WHERE key = 'retention_floor'), 0)"
            ).fetchone()
            prefix, exact = literal_prefix(pattern)
            if exact:  # the (type, seq) index finds them: no scan to bound
                rows = conn.execute(
                    "SELECT seq, type, body FROM messages WHERE type = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                    (pattern, after, newest, limit),
                ).fetchall()
                messages = [StoredMessage(s, t, _body_with_seq(b, s)) for s, t, b in rows]
                return History(messages, newest, floor)
            # the budget bounds the seq range looked at (the primary key): at most scan_rows rows
            upper = min(newest, max(after, floor) + scan_rows)
            if prefix:
                where = "(type = ? OR (type >= ? AND type < ?)) AND seq > ? AND seq <= ?"
                bounds: tuple[Any, ...] = (prefix, prefix + ".", prefix + "/")
            else:
                where, bounds = "seq > ? AND seq <= ?", ()
            matches = compile_pattern(pattern)
            messages = []
            cursor = after
            while len(messages) < limit:
                rows = conn.execute(
                    f"SELECT seq, type, body FROM messages WHERE {where} ORDER BY seq LIMIT ?",
                    (*bounds, cursor, upper, _SCAN_CHUNK),
                ).fetchall()
                for seq, topic, body in rows:
                    if matches(topic):
                        messages.append(StoredMessage(seq, topic, _body_with_seq(body, seq)))
                        if len(messages) == limit:
                            break
                if len(rows) < _SCAN_CHUNK:
                    break
                cursor = rows[-1][0]
            return History(messages, upper, floor, complete=upper >= newest)
        finally:
            conn.execute("COMMIT")

    async def dead_letters(self, kind: str | None = None, limit: int = 100, after_id: int = 0) -> DeadLetterPage:
        def read(conn: sqlite3.Connection) -> DeadLetterPage:
            rows = conn.execute(
                "SELECT id, kind, reason, created_at, body, detail FROM dead_letters "
                "WHERE id > ? AND (? IS NULL OR kind = ?) ORDER BY id LIMIT ?",
                (after_id, kind, kind, limit),
            ).fetchall()
            letters = [DeadLetter(i, k, r, c, b, json.loads(d)) for i, k, r, c, b, d in rows]
            return DeadLetterPage(letters, letters[-1].id if len(letters) == limit else None)

        return await self.read(read)  # type: ignore[no-any-return]

    async def purge_dead_letters(self) -> int:
        """Delete every dead letter, and the dead tasks with them: a dead task's row is kept while its
        letter may replay it (aivad/task_retention.py), and no longer."""

        def purge(conn: sqlite3.Connection, _: Write) -> int:
            conn.execute("DELETE FROM tasks WHERE state = 'dead'")
            return int(conn.execute("DELETE FROM dead_letters").rowcount)

        write = await self.submit(purge, bulk=True)
        purged: int = await write.wait()
        return purged

    # ---- introspection ------------------------------------------------------

    @staticmethod
    def _meta(conn: sqlite3.Connection, key: str) -> int:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            last_seq=self.last_seq,
            retention_floor=self.retention_floor,
            stored_messages=self._stored_messages,
            write_queue_depth=self._send.statistics().current_buffer_used,
            write_queue_size=self._cfg.write_queue,
            commits=self._commits,
            committed_messages=self._committed_messages,
            duplicates=self._duplicates,
            commit_seconds_total=self._commit_seconds_total,
            last_commit_seconds=self._last_commit_seconds,
            commit_seconds_buckets=tuple(
                zip(COMMIT_BUCKETS_S, itertools.accumulate(self._commit_buckets), strict=True)
            ),
            failed_commits=self._failures,
            failure=self.failure,
            wal_catch_ups=self._wal_catch_ups,
            dead_letters_dropped=self._dead_letters_dropped,
        )

    def close_readers(self) -> None:
        for conn in self._readers:
            conn.close()
        self._readers.clear()


def insert_envelopes(conn: sqlite3.Connection, write: Write, envelopes: Sequence[Envelope]) -> list[Appended]:
    """Store envelopes inside a write (duplicates by message_id answered, not stored).

    Any write may call it, so a state change and the event announcing it commit together.
    """
    return insert_rows(conn, write, [(e.message_id, e.type, e.to_json()) for e in envelopes])


def insert_rows(conn: sqlite3.Connection, write: Write, rows: Sequence[tuple[str, str, str]]) -> list[Appended]:
    """``insert_envelopes`` for rows already encoded: (message_id, type, envelope JSON).

    One ``SELECT … IN`` per 500 ids finds the duplicates, then one ``executemany``
    inserts the rest with their seqs given here: the store's single writer is the
    only one inserting, inside this transaction, so the next seq is the
    AUTOINCREMENT counter + 1 (a row per statement with ``RETURNING`` cost a
    third more per row).
    """
    now = time.time()
    seqs: dict[str, int] = {}
    ids = list(dict.fromkeys(message_id for message_id, _, _ in rows))
    for start in range(0, len(ids), _IDS_PER_SELECT):
        chunk = ids[start:start + _IDS_PER_SELECT]
        marks = ",".join("?" * len(chunk))
        seqs.update(conn.execute(f"SELECT message_id, seq FROM messages WHERE message_id IN ({marks})", chunk))
    (last,) = conn.execute("SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0)").fetchone()
    results = []
    fresh = []
    for message_id, topic, body in rows:
        seq = seqs.get(message_id)
        if seq is not None:
            results.append(Appended(seq, duplicate=True))
            continue
        last += 1
        seqs[message_id] = last
        fresh.append((last, message_id, topic, now, body))
        results.append(Appended(last, duplicate=False))
    _insert_messages(conn, fresh)
    write.messages += [StoredMessage(seq, topic, _body_with_seq(body, seq)) for seq, _, topic, _, body in fresh]
    return results


def _insert_messages(conn: sqlite3.Connection, rows: list[tuple[int, str, str, float, str]]) -> None:
    """Insert message rows: a few at a time with ``executemany``, many as multi-row ``INSERT``s.

    Why: ``sqlite3`` lets go of the GIL around every step of a statement, and ``executemany``
    steps once per row. Where another thread wants the GIL all the time (the AMQP bridge's
    asyncio thread, parsing deliveries), each row then waits to take it back: in
    ``bench/sqlite_writer.py`` part 4, 500 rows per commit cost 16.5 µs of wall time per row
    that way against 2.2 with multi-row ``INSERT``s of up to :data:`_ROWS_PER_INSERT` rows (one
    step each), and 2.7 against 2.0 with no thread beside. With random message ids a
    microbench measured multi-row ~0.6 µs per row dearer alone, so batches under
    :data:`_MULTI_ROW_FROM` rows (a publish, a task's event) keep ``executemany``.
    """
    if len(rows) < _MULTI_ROW_FROM:
        conn.executemany(_INSERT_MESSAGE_SQL, rows)
        return
    start = 0
    while start < len(rows):
        left = len(rows) - start
        n = _ROWS_PER_INSERT if left >= _ROWS_PER_INSERT else 1 << (left.bit_length() - 1)  # few distinct SQLs
        conn.execute(_multi_row_insert_sql(n), list(itertools.chain.from_iterable(rows[start:start + n])))
        start += n


_INSERT_MESSAGE_SQL = "INSERT INTO messages (seq, message_id, type, stored_at, body) VALUES (?, ?, ?, ?, ?)"
#: rows per multi-row INSERT (5 parameters each: far below SQLite's limit of 32,766)
_ROWS_PER_INSERT = 128
#: the smallest batch inserted by multi-row INSERTs
_MULTI_ROW_FROM = 32


@functools.cache
def _multi_row_insert_sql(n: int) -> str:
    return _INSERT_MESSAGE_SQL + ", (?, ?, ?, ?, ?)" * (n - 1)


#: ids looked up per SELECT … IN (SQLite's default limit of host parameters is far above it)
_IDS_PER_SELECT = 500


def _insert_dead_letter(conn: sqlite3.Connection, kind: str, reason: str, body: str, detail: dict[str, Any]) -> int:
    cur = conn.execute(
        "INSERT INTO dead_letters (kind, reason, created_at, body, detail) VALUES (?, ?, ?, ?, ?)",
        (kind, reason, time.time(), body, json.dumps(detail)),
    )
    return int(cur.lastrowid or 0)


def _drop_dead_letters_through(conn: sqlite3.Connection, floor: int) -> int:
    """Delete the letters with id <= ``floor`` (a range of the primary key: as many rows as go) and
    the dead tasks of those that were tasks' (found by the task_id in the letter's detail, not in its
    body, which holds the whole payload); how many letters went."""
    conn.execute(
        "DELETE FROM tasks WHERE state = 'dead' AND task_id IN "
        "(SELECT json_extract(detail, '$.task_id') FROM dead_letters WHERE id <= ? AND kind = 'task')",
        (floor,),
    )
    return int(conn.execute("DELETE FROM dead_letters WHERE id <= ?", (floor,)).rowcount)


def _begin_immediate(conn: sqlite3.Connection, wait_s: float) -> None:
    """Take the write lock, waiting up to ``wait_s`` for another connection that holds it.

    The writer's connection has no busy timeout of its own, so with ``wait_s = 0``
    a held lock is known at once (:class:`_WriteLocked`) and the event loop does
    not sleep in SQLite's busy handler; the waiting is done here, in a thread.
    """
    deadline = time.monotonic() + wait_s
    pause = 0.001
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise
            if time.monotonic() >= deadline:
                raise _WriteLocked(str(exc)) from None
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def open_database(cfg: StoreConfig) -> sqlite3.Connection:
    """Open (creating) the database in WAL mode for the single writer."""
    path = Path(cfg.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    # before anything is written (a file that exists keeps its page size: SQLite ignores this then).
    # Every commit appends each page it changed to the WAL and the checkpoint copies it again, so
    # the page is the unit a task's few changed rows cost: 1 KiB pages halve what a paced request
    # writes against SQLite's 4 KiB (docs/performance.md, "Smaller pages")
    conn.execute(f"PRAGMA page_size = {int(cfg.page_size)}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {cfg.synchronous}")
    conn.execute(f"PRAGMA busy_timeout = {int(_LOCK_WAIT_S * 1000)}")  # creating the schema may wait
    # checkpoints run beside the writer (_serve_checkpoints), not inside one of its commits:
    # an automatic checkpoint copies and syncs the WAL while every producer waits
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    # a WAL started over is cut back to this size (it only grows past it between two checkpoints)
    conn.execute(f"PRAGMA journal_size_limit = {int(cfg.wal_max_bytes)}")
    conn.executescript(_SCHEMA)
    conn.execute("INSERT INTO info (key, value) VALUES ('epoch', ?) ON CONFLICT (key) DO NOTHING", (_new_epoch(),))
    # from here no busy timeout: a commit that finds the write lock taken waits in _begin_immediate, off the loop
    conn.execute("PRAGMA busy_timeout = 0")
    return conn


def _new_epoch() -> str:
    """An opaque, practically unique id: a client that kept another one knows its seqs mean nothing here."""
    return uuid.uuid4().hex[:16]


async def serve_store(cfg: StoreConfig, *, task_status: trio.TaskStatus[Store] = trio.TASK_STATUS_IGNORED) -> NoReturn:
    """Open the database and run the single writer until cancelled.

    Returns: never. Resource handling: the connections close on exit; a commit,
    once begun, finishes (SQLite is not interrupted).
    Error handling: a failed commit (disk full, I/O error) fails that batch's writes
    with ``internal`` and the writer goes on (``failure`` and the listeners of
    :meth:`Store.on_failure` say so until a commit works again); an unreadable
    database raises at start, before ``started()``.
    """
    thread = _WriterThread() if cfg.synchronous == "FULL" else None
    try:
        writer = await (thread.call(open_database, cfg) if thread else trio.to_thread.run_sync(open_database, cfg))
    except BaseException:
        if thread:
            thread.stop()
        raise
    store = Store(cfg, writer, thread)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store._write_loop)
            nursery.start_soon(_serve_retention, store)
            nursery.start_soon(_serve_checkpoints, store, cfg)
            log.info("store %s open, last seq %d", cfg.path, store.last_seq)
            task_status.started(store)
            await trio.sleep_forever()
    finally:
        store.close_readers()
        if thread:
            thread.stop()
        writer.close()
    raise AssertionError("unreachable")


async def _serve_checkpoints(store: Store, cfg: StoreConfig) -> NoReturn:
    """Copy the WAL into the database every ``_CHECKPOINT_INTERVAL_S``, on a connection of its own.

    A PASSIVE checkpoint never blocks the writer or the readers. A WAL past
    ``[store] wal_max_bytes`` did not start over since the last round (under a
    steady stream of writes it never does by itself): the writer is told
    (``Store.wal_behind``) and checkpoints between two of its commits.
    """
    conn = await trio.to_thread.run_sync(lambda: sqlite3.connect(cfg.path, check_same_thread=False))
    try:
        page_bytes = (await trio.to_thread.run_sync(conn.execute, "PRAGMA page_size")).fetchone()[0]
        while True:
            await trio.sleep(_CHECKPOINT_INTERVAL_S)
            try:
                _, frames, _ = await trio.to_thread.run_sync(_checkpoint, conn)
            except sqlite3.Error as exc:  # e.g. an I/O error: the WAL grows until it works again
                log.warning("WAL checkpoint failed: %s", exc)
                continue
            if frames * page_bytes > cfg.wal_max_bytes:  # it did not start over since: see Store._catch_up_wal
                store.wal_behind = True
    finally:
        conn.close()


def _checkpoint(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """A PASSIVE checkpoint: (busy, frames in the WAL, frames copied into the database)."""
    busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return int(busy), int(frames), int(copied)


async def _serve_retention(store: Store) -> None:
    """Trim the history every ``retention_interval_s`` (count and age limits; 0 = off).

    Reads the limits each round, so a reload changes them without a restart.
    """
    while True:
        await trio.sleep(store._cfg.retention_interval_s)
        cfg = store._cfg
        if not cfg.retention_max_messages and not cfg.retention_max_age_s:
            continue
        try:
            await store.apply_retention(cfg.retention_max_messages, cfg.retention_max_age_s)
        except StoreClosed:
            return
        except OpError as exc:  # the store failed (store.failure says so); the next round tries again
            log.warning("retention round failed: %s", exc.message)
