"""The cluster's history (DESIGN §5): the Redis log, as the router and the operations see a store.

With ``[redis] enabled`` every node of one ``prefix`` shares one log in Redis
(``aivad.redis.RedisLog``: one global seq assigned by a script together with
the append and the ``message_id`` de-duplication). This module makes that log
look like the embedded store to the rest of the daemon:

* **Appends** are queued (``submit_append``, bounded by ``[store]
  write_queue``) and sent by one writer task — pipelined publishes of a
  connection share a script call, as they share a commit in SQLite. A producer
  is answered only after Redis answered. Redis unreachable: ``overloaded``
  (the producer retries with the same ``message_id``; a duplicate is answered
  with the original seq).
* **Delivery is the tail**: every node reads the log from its position (``XREAD
  BLOCK``) and hands each batch to its router, in seq order. A node's own
  publishes reach its subscribers the same way as everyone else's — one path,
  so the order is the log's on every node. ``last_seq`` is the tail's position,
  changed only in the step that calls the ``on_commit`` callbacks (the
  invariant ``Router.follow`` relies on to join a replay to the live stream).
* **A node that fell behind**: the tail resumes from its position after Redis
  comes back, without a gap; if retention deleted what it had not read, the
  router's live subscriptions end as slow consumers (4008) and their clients'
  resumes are told the exact gap. A lost log (a new ``epoch``) ends them too:
  the clients resubscribe and get ``epoch_changed``.
* Retention runs on every node (each call is one atomic script; running it
  twice is harmless); each node keeps a heartbeat with its connections and
  subscriptions, which ``status`` shows as ``cluster``.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import attrs
import trio

from .config import ClusterConfig, RedisConfig, StoreConfig
from .envelope import Envelope
from .protocol import OpError
from .redis import (
    EpochChanged,
    LogTail,
    NodeInfo,
    RedisLog,
    RedisLogError,
    RedisOverloaded,
    RedisSettings,
    RedisUnavailable,
    open_redis_log,
)
from .store import Appended, History, StoreClosed, StoredMessage

__all__ = ["ClusterLog", "ClusterStatistics", "LogWrite", "serve_cluster_log"]

log = logging.getLogger(__name__)

#: how long the tail waits before reading again after Redis failed it (doubles up to reconnect_max_s)
_RETRY_INITIAL_S = 0.2


class LogWrite:
    """Appends submitted together; ``wait()`` returns their results after Redis answered (or raises OpError)."""

    __slots__ = ("committed", "done", "error", "messages", "result", "rows")

    def __init__(self, rows: list[tuple[str, str, str]], committed: Callable[[LogWrite], None] | None) -> None:
        self.rows = rows
        self.committed = committed
        self.done = trio.Event()
        self.result: list[Appended] = []
        self.error: OpError | None = None
        #: the messages this write stored (not the duplicates): what the ingest counters count
        self.messages: list[Appended] = []

    async def wait(self) -> list[Appended]:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


@attrs.frozen
class ClusterStatistics:
    node_name: str
    epoch: str
    last_seq: int
    retention_floor: int
    write_queue_depth: int
    appended: int
    duplicates: int
    failure: str | None
    nodes: list[dict[str, Any]]
    #: messages answered ``overloaded`` because [redis] max_pending were already waiting
    overloaded: int = 0


class ClusterLog:
    """The Redis log behind the router and the operations; made and run by :func:`serve_cluster_log`."""

    def __init__(self, redis_log: RedisLog, store_cfg: StoreConfig, node_name: str) -> None:
        self.redis = redis_log
        self._cfg = store_cfg
        self.node_name = node_name
        self.epoch = redis_log.epoch
        self.last_seq = 0
        self.retention_floor = 0
        #: why Redis cannot be used now (None: it can) — /readyz
        self.failure: str | None = None
        self._on_commit: list[Callable[[list[StoredMessage]], None]] = []
        self._on_failure: list[Callable[[str | None], None]] = []
        #: called when what was routed can no longer be trusted (a gap in the tail, a new epoch)
        self._on_reset: list[Callable[[str], None]] = []
        self._send, self._receive = trio.open_memory_channel[LogWrite](store_cfg.write_queue)
        self._reader_limit = trio.CapacityLimiter(store_cfg.read_connections)
        self._client_limit = trio.CapacityLimiter(store_cfg.history_concurrency)
        self._closed = False
        self._writer_done = trio.Event()
        self._appended = 0
        self._duplicates = 0
        self._overloaded = 0
        self.nodes: list[NodeInfo] = []
        self._on_name_taken: list[Callable[[str], None]] = []

    # ---- what the router and the operations use (the store's shape) -------------------

    def on_commit(self, callback: Callable[[list[StoredMessage]], None]) -> None:
        """Call ``callback(messages)`` for every batch the tail reads, in seq order. It must not block."""
        self._on_commit.append(callback)

    def on_failure(self, callback: Callable[[str | None], None]) -> None:
        """Call ``callback(why)`` when Redis starts failing, ``callback(None)`` when it works again."""
        self._on_failure.append(callback)

    def on_name_taken(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(why)`` when another process heartbeats under this node's name."""
        self._on_name_taken.append(callback)

    def on_reset(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(why)`` when live subscribers must resume: the tail skipped a gap, or the log is new."""
        self._on_reset.append(callback)

    async def submit_append(
        self, envelopes: Sequence[Envelope], *, committed: Callable[[LogWrite], None] | None = None
    ) -> LogWrite:
        """Queue envelopes for the log (waiting for room); ``await .wait()`` for ``list[Appended]``."""
        if self._closed:
            raise StoreClosed("the log takes no more writes (draining)")
        write = LogWrite([(e.message_id, e.type, e.to_json()) for e in envelopes], committed)
        try:
            await self._send.send(write)
        except trio.ClosedResourceError:
            raise StoreClosed("the log takes no more writes (draining)") from None
        return write

    async def append_many(self, envelopes: Sequence[Envelope]) -> list[Appended]:
        return await (await self.submit_append(envelopes)).wait()

    async def append(self, envelope: Envelope) -> Appended:
        return (await self.append_many([envelope]))[0]

    async def history(self, pattern: str, after: int, limit: int, *, client: bool = False) -> History:
        """Up to ``limit`` messages matching ``pattern`` after ``after``, looking at ``history_scan_rows`` at most."""
        async with self._client_limit if client else self._reader_limit:
            try:
                found = await self.redis.history(pattern, after, limit, self._cfg.history_scan_rows)
            except RedisUnavailable as exc:
                raise OpError("overloaded", f"the history is unreachable now: {exc}") from None
            except EpochChanged:
                raise OpError("overloaded", "the history changed (a new epoch): try again") from None
        self.retention_floor = max(self.retention_floor, found.retention_floor)
        return History(found.messages, found.scanned_through, found.retention_floor,
                       complete=found.scanned_through >= found.last_seq)

    async def drain(self) -> None:
        """Take no more writes; return once every queued write has been answered."""
        self._closed = True
        await self._send.aclose()
        await self._writer_done.wait()

    def statistics(self) -> ClusterStatistics:
        stats = self.redis.statistics()
        nodes = [{"name": n.name, **n.info, "last_seen": n.last_seen} for n in self.nodes]
        return ClusterStatistics(self.node_name, self.epoch, self.last_seq, self.retention_floor,
                                 self._send.statistics().current_buffer_used, stats.appended, stats.duplicates,
                                 self.failure, nodes, self._overloaded)

    # ---- failure bookkeeping -------------------------------------------------------------

    def _set_failure(self, why: str | None) -> None:
        """Record that Redis fails (``why``) or works (None); listeners hear of each change."""
        if why is None:
            if self.failure is None:
                return
            self.failure = None
            log.warning("redis: reachable again")
        else:
            was_ok, self.failure = self.failure is None, why
            if not was_ok:
                return
            log.error("redis: %s", why)
        for callback in self._on_failure:
            callback(why)

    # ---- the writer -------------------------------------------------------------------

    async def _write_loop(self) -> None:
        """Send what is queued, all of it at once (RedisLog group-commits and splits big batches)."""
        try:
            async with self._receive:
                async for first in self._receive:
                    await trio.lowlevel.checkpoint()  # writes already runnable join this call
                    batch = [first]
                    while True:
                        try:
                            batch.append(self._receive.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    await self._write(batch)
        finally:
            self._writer_done.set()

    async def _write(self, batch: list[LogWrite]) -> None:
        rows = [row for write in batch for row in write.rows]
        error: OpError | None = None
        try:
            results = await self.redis.append_rows(rows)
        except RedisOverloaded as exc:
            self._overloaded += len(rows)
            error = OpError("overloaded", str(exc))
        except RedisUnavailable as exc:
            self._set_failure(f"unreachable: {exc}")
            error = OpError("overloaded", "the history (Redis) is unreachable now: try again")
        except EpochChanged:
            error = OpError("overloaded", "the history changed (a new epoch): try again")
        except RedisLogError as exc:
            log.error("redis: an append failed: %s", exc)
            error = OpError("internal", "the history (Redis) refused the write")
        else:
            self._set_failure(None)
        start = 0
        for write in batch:
            if error is not None:
                write.error = error
            else:
                write.result = results[start:start + len(write.rows)]
                write.messages = [r for r in write.result if not r.duplicate]
                start += len(write.rows)
                self._appended += len(write.messages)
                self._duplicates += len(write.result) - len(write.messages)
                if write.committed is not None:
                    write.committed(write)
            write.done.set()

    # ---- the tail: every node's one path from the log to its router ---------------------------

    async def _tail_loop(self) -> NoReturn:
        tail = None
        delay = _RETRY_INITIAL_S
        while True:
            try:
                if tail is None:  # (re)start: from the newest seq there is
                    tail = await self._tail_from_newest()
                batch = await tail.read()
            except EpochChanged as exc:  # (before RedisLogError: it is one)
                log.error("redis: %s; adopting the log now in Redis", exc)
                try:
                    await self.redis.reopen(self.last_seq)
                    # the new log's epoch, newest seq and floor before the reset: a client it closes may
                    # resubscribe at once, and its resume must start where the new log does (a resume from
                    # the old floor read as overtaken by retention, and was closed once more)
                    tail = await self._tail_from_newest()
                except RedisLogError as again:
                    self._set_failure(f"cannot adopt the log: {again}")
                    await trio.sleep(delay)
                    delay = min(delay * 2, 10.0)
                    continue
                self._reset(f"the history is a new one (epoch {self.redis.epoch})")
                continue
            except RedisLogError as exc:  # unreachable, or what is in the log's keys is not the log's data
                why = "unreachable" if isinstance(exc, RedisUnavailable) else "the log is unreadable"
                self._set_failure(f"{why}: {exc}")
                await trio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            delay = _RETRY_INITIAL_S
            self._set_failure(None)
            if batch.gap is not None:
                self.retention_floor = max(self.retention_floor, batch.gap.last)
                self._reset(f"retention deleted seq {batch.gap.first}..{batch.gap.last} before this node read it")
            # the two lines the replay invariant rests on: no await between them (Router.follow)
            self.last_seq = batch.position
            for callback in self._on_commit:
                callback(batch.messages)

    async def _tail_from_newest(self) -> LogTail:
        """A tail from the log's newest seq; this node's epoch, last seq and floor are the log's from now on
        (set together, after the only await)."""
        info = await self.redis.info()
        self.epoch = self.redis.epoch
        self.last_seq, self.retention_floor = info.last_seq, info.retention_floor
        return self.redis.tail(self.last_seq)

    def _reset(self, why: str) -> None:
        log.warning("redis: live subscribers resume: %s", why)
        for callback in self._on_reset:
            callback(why)

    # ---- retention and heartbeats --------------------------------------------------------------

    async def _retention_loop(self) -> NoReturn:
        while True:
            await trio.sleep(self._cfg.retention_interval_s)
            cfg = self._cfg
            if not cfg.retention_max_messages and not cfg.retention_max_age_s:
                continue
            try:
                if await self.redis.apply_retention(cfg.retention_max_messages, cfg.retention_max_age_s):
                    info = await self.redis.info()
                    self.retention_floor = max(self.retention_floor, info.retention_floor)
            except RedisLogError as exc:  # unreachable, a new epoch, unreadable: the tail deals with it
                log.warning("redis: retention round failed: %s", exc)

    def reconfigure(self, cfg: StoreConfig) -> None:
        self._cfg = cfg

    async def _heartbeat_loop(
        self,
        interval_s: float,
        info: Callable[[], dict[str, Any]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Say this node is alive; learn the others. A heartbeat of this name from another
        process (two nodes given one ``node_name``) is logged and announced, once.

        Only from the second heartbeat on: before the first, what stands under this name may be this
        node's own previous run (restarted within the record's time to live), which writes no more.

        ``started()`` once the first heartbeat was tried: a node claims tasks only after the
        other nodes can see it alive — a claim by a node they do not see yet is an orphan to
        their reapers, which would run the task a second time."""
        instance = uuid.uuid4().hex
        told = False
        ours_written = False
        first = True
        while True:
            try:
                # read before writing: what stands under this name now was written by the last heartbeat of it
                before = await self.redis.live_nodes()
                await self.redis.heartbeat(self.node_name, {**info(), "instance": instance}, ttl_s=3 * interval_s)
                self.nodes = await self.redis.live_nodes()
                other = next((n for n in before if n.name == self.node_name
                              and n.info.get("instance", instance) != instance), None)
                if other is not None and ours_written and not told:
                    told = True
                    why = f"another process runs as cluster node {self.node_name!r}: give each node its own " \
                          "[cluster] node_name"
                    log.error("cluster: %s", why)
                    for callback in self._on_name_taken:
                        callback(why)
                ours_written = True
            except RedisUnavailable as exc:
                self._set_failure(f"unreachable: {exc}")
            except EpochChanged:
                pass  # the tail adopts the new log
            except RedisLogError as exc:  # the tail says so too (readiness); the heartbeat tries again
                log.warning("redis: heartbeat failed: %s", exc)
            if first:
                first = False
                task_status.started()
            await trio.sleep(interval_s)


def settings_for(cfg: RedisConfig, node_name: str) -> RedisSettings:
    return RedisSettings(
        url=cfg.url,
        prefix=cfg.prefix,
        op_timeout_s=cfg.op_timeout_s,
        max_pending=cfg.max_pending,
        max_connections=cfg.max_connections,
        client_name=f"aivad:{node_name}"[:100].replace(" ", "_"),
    )


async def serve_cluster_log(
    redis_cfg: RedisConfig,
    cluster_cfg: ClusterConfig,
    store_cfg: StoreConfig,
    node_info: Callable[[], dict[str, Any]],
    *,
    task_status: trio.TaskStatus[ClusterLog] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Open the Redis log (waiting for Redis, with backoff), then tail, write, trim and heartbeat until cancelled.

    Returns: never. ``started()`` once the log is open: a node without its
    history is not ready (systemd's READY=1 waits for it). Resource handling:
    the Redis connections close on exit and the node is forgotten at once.
    Error handling: Redis lost later is waited out (readiness says so, appends
    answer ``overloaded``); a new epoch is adopted and announced to subscribers.
    """
    settings = settings_for(redis_cfg, cluster_cfg.node_name)
    delay = _RETRY_INITIAL_S
    while True:
        try:
            async with open_redis_log(settings) as redis_log:
                cluster = ClusterLog(redis_log, store_cfg, cluster_cfg.node_name)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(cluster._write_loop)
                        nursery.start_soon(cluster._tail_loop)
                        nursery.start_soon(cluster._retention_loop)
                        await nursery.start(cluster._heartbeat_loop, cluster_cfg.heartbeat_interval_s, node_info)
                        log.info("cluster node %s on %s, log epoch %s", cluster_cfg.node_name,
                                 settings.url.rpartition("@")[2], cluster.epoch)
                        task_status.started(cluster)
                        await trio.sleep_forever()
                finally:
                    with trio.move_on_after(1.0, shield=True), contextlib.suppress(RedisLogError):
                        await redis_log.forget_node(cluster_cfg.node_name)
        except RedisUnavailable as exc:  # only before started(): later, every loop waits Redis out itself
            log.warning("redis: cannot open the log (%s); again in %.1fs", exc, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, redis_cfg.reconnect_max_s)
