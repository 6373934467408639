"""Tasks across a cluster's nodes (DESIGN §5): the dispatcher on the task book in Redis.

A node runs the single-node :class:`~aivad.dispatcher.Dispatcher` — its
workers, strategies, attempt scopes and settle decisions — with the task's
state kept in Redis (:class:`aivad.redis.RedisTaskBook`) instead of the local
store. Every change of a task is one compare-and-set on its version that
appends its events to the cluster log in the same step, so:

* **A task reaches a worker on any node.** Every node holds the unfinished
  tasks of the cluster in memory: those accepted here, and those it learns of
  from the log's ``task.*`` events (it reads their records, one read per tail
  batch). A node whose local worker is free claims a queued task by moving it
  to ``dispatched`` under its name; of two nodes claiming one task, one wins and
  the other learns where it went.
* **A task ends exactly once.** The end is a CAS too; a second end (the
  worker's node and a node that took the task over after the first seemed
  dead) fails and changes nothing.
* **A dead node's tasks run again elsewhere.** Each node checks the running
  set every heartbeat interval; an attempt whose node's heartbeat expired
  fails as ``worker_lost`` (retried with backoff, or dead-lettered when its
  attempts are used up). A node that restarts under its name retries what it
  ran itself at once.
* **status, collect, request and the dead-letter queue work from every node**:
  records are in Redis, ends are handed to waiters from the tail, dead letters
  are in Redis (``RedisDeadLetters``).

What is weaker than on one node: the AMQP bridge's RPC reply of a task is
written to the ending node's local outbox just after the end is in Redis, not
in the same step (a node killed between the two loses that reply); strategies
choose among the workers of the node that claims.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Sequence
from typing import Any, NoReturn, cast

import attrs
import trio

from .boundary import Faults
from .cluster import ClusterLog
from .config import TasksConfig
from .dispatcher import (
    Attempt,
    Dispatcher,
    Failure,
    Settlement,
    TaskState,
    TaskView,
    Worker,
    _event,
)
from .envelope import Envelope, now_rfc3339
from .protocol import OpError
from .redis import RedisLogError
from .redis.tasks import RedisDeadLetters, RedisTaskBook, TaskChange, TaskRecord, letter_json
from .store import Store, StoreClosed, StoredMessage, Write, insert_envelopes
from .tasks import ACTIVE_STATES, TaskSpec

__all__ = ["ClusterDispatcher", "serve_cluster_dispatcher"]

log = logging.getLogger(__name__)

_ENDED = ("completed", "dead")
#: how long a task whose claim Redis did not answer waits before it is tried again
_CLAIM_RETRY_S = 1.0
#: an outcome Redis did not take is sent again after this, doubling up to _RETRY_MAX_S
_RETRY_INITIAL_S = 0.25
#: the task events after which the task's record is read: the task is queued (new, again, due
#: later) or ended. The others (dispatched, started, progress, failed) change nothing another
#: node acts on — a node that tries to claim a task it still thinks queued loses the CAS and
#: reads the record then. (Events are read as hints only: anyone with publish rights can send
#: a ``task.completed``; the record decides.)
_READ_AFTER = frozenset({"task.created", "task.retrying", "task.completed", "task.dead_lettered"})
#: own events remembered for the tail to skip, at most
_OWN_REMEMBERED = 100_000
_RETRY_MAX_S = 5.0


class _RemoteWorker:
    """A worker of another node on an affinity ring: never free here — its own node claims its keys' tasks."""

    free = 0

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id


class _Submitted:
    """The answer of ``submit_many``: already in Redis when returned."""

    def __init__(self, results: list[tuple[str, bool]]) -> None:
        self.result = results

    async def wait(self) -> list[tuple[str, bool]]:
        return self.result


def _rows(events: Sequence[Envelope]) -> list[tuple[str, str, str]]:
    return [(e.message_id, e.type, e.to_json()) for e in events]


def _view(found: TaskRecord) -> TaskView:
    spec = found.spec
    return TaskView(spec.task_id, spec.type, found.state, found.attempts, found.result, found.error, spec.group_id,
                    found.history, spec.to_json_dict())


class ClusterDispatcher(Dispatcher):
    """The dispatcher of one node of a cluster; made and run by :func:`serve_cluster_dispatcher`."""

    def __init__(self, cfg: TasksConfig, store: Store, nursery: trio.Nursery, faults: Faults,
                 book: RedisTaskBook, dead_letters: RedisDeadLetters, cluster: ClusterLog) -> None:
        super().__init__(cfg, store, nursery, faults)
        self._book = book
        self._dead_letters = dead_letters
        self._cluster = cluster
        self.node_name = cluster.node_name
        #: task_id → the end event seen in the log (or None): records to read and take
        self._stale: dict[str, dict[str, Any] | None] = {}
        self._stale_wake = trio.Event()
        #: one change at a time per task: each CAS expects the version the previous one left
        self._locks: dict[str, trio.Lock] = {}
        #: copy this node's task events into the local store (for the AMQP bridge's outbox)
        self.copy_events = False
        #: message_ids of this node's own task events the tail has not brought back yet
        self._own: dict[str, bool] = {}
        #: every record is to be read again (the tail missed events)
        self._resync = False
        #: the other nodes' affinity workers by type, and the heartbeat list they were read from
        self._affinity: dict[str, tuple[str, ...]] = {}
        self._affinity_seen_nodes: object = None

    # ---- the task book ------------------------------------------------------------------

    def _record(self, task: TaskState, state: str, *, owner: str = "", result: Any = None, error: Any = None,
                delay: float = 0.0) -> dict[str, Any]:
        return {"spec": task.spec.to_json_dict(), "state": state, "attempts": task.attempts,
                "history": task.history, "result": result, "error": error, "owner": owner,
                "due_at": time.time() + delay, "updated_at": time.time()}

    async def _change(self, task: TaskState, record: dict[str, Any], events: Sequence[Envelope], *,
                      open: str = "=", owner: str = "=", letter: str = "", ended: TaskView | None = None) -> bool:
        """One CAS change of ``task``'s record, expecting the version memory holds, with ``events``.

        True when it took; else another node changed the task first, and its record is read again.
        """
        lock = self._locks.setdefault(task.spec.task_id, trio.Lock())
        try:
            async with lock:
                (version,) = await self._book_change(
                    [TaskChange(task.spec.task_id, task.version, record, _rows(events), open, owner, letter)])
                if version > 0:
                    task.version = version
                    self._remember_own([e.message_id for e in events])
                    await self._copy_local(events, ended)
                    return True
        finally:
            if not lock.statistics().tasks_waiting and not lock.locked():
                self._locks.pop(task.spec.task_id, None)
        self._mark_stale(task.spec.task_id, None)
        return False

    async def _copy_local(self, events: Sequence[Envelope], ended: TaskView | None) -> None:
        """After a change took: what this node's own edges need of it in the local store.

        The events, when ``copy_events`` (the AMQP bridge publishes this node's task events
        from the store's outbox; the journal does not forward them back into the log), and
        the ``end_writes`` rows of an end (the AMQP RPC reply). A write after the change, not
        in it: a node killed between the two loses those copies (docs/cluster.md says so).
        """
        copy = list(events) if self.copy_events else []
        if not copy and (ended is None or not self.end_writes):
            return

        def write(conn: sqlite3.Connection, w: Write) -> None:
            insert_envelopes(conn, w, copy)
            if ended is not None:
                self._write_end(conn, ended)

        try:
            await (await self._store.submit(write)).wait()
        except StoreClosed:
            pass  # draining
        except OpError as exc:
            log.error("cluster tasks: the local copy of a task's change failed: %s", exc.message)

    def _remember_own(self, message_ids: Sequence[str]) -> None:
        """The events of a change this node made: the tail skips them (no record read for them)."""
        for message_id in message_ids:
            self._own[message_id] = True
        while len(self._own) > _OWN_REMEMBERED:  # a tail that missed some (a gap): forget the oldest
            del self._own[next(iter(self._own))]

    async def _book_change(self, changes: Sequence[TaskChange]) -> list[int]:
        try:
            return await self._book.change(changes)
        except RedisLogError as exc:
            raise OpError("overloaded", f"the task book (Redis) is unreachable now: {exc}") from None

    # ---- affinity across nodes ----------------------------------------------------------------

    def _ring(self, task_type: str) -> tuple[list[int], list[Worker]]:
        self._remote_affinity()  # drops the rings whose remote workers changed since they were built
        return super()._ring(task_type)

    def _ring_members(self, task_type: str) -> list[Worker]:
        """This node's workers and, from the other nodes' heartbeats, theirs: the ring is the cluster's."""
        remote = self._remote_affinity().get(task_type, ())
        return [*super()._ring_members(task_type), *(cast(Worker, _RemoteWorker(w)) for w in remote)]

    def _remote_affinity(self) -> dict[str, tuple[str, ...]]:
        """type → the other nodes' affinity workers, as their last heartbeats say (rings rebuilt on a change)."""
        nodes = self._cluster.nodes
        if nodes is not self._affinity_seen_nodes:
            self._affinity_seen_nodes = nodes
            remote: dict[str, list[str]] = {}
            for node in nodes:
                affinity = node.info.get("affinity")
                if node.name == self.node_name or not isinstance(affinity, dict):
                    continue
                for task_type, ids in affinity.items():
                    if isinstance(ids, list):
                        remote.setdefault(str(task_type), []).extend(str(i) for i in ids[:self.cfg.max_workers])
            fresh = {t: tuple(sorted(ids)) for t, ids in remote.items()}
            for task_type in set(fresh) | set(self._affinity):
                if fresh.get(task_type) != self._affinity.get(task_type):
                    self._rings.pop(task_type, None)
            self._affinity = fresh
        return self._affinity

    # ---- submitting ------------------------------------------------------------------------

    async def submit_many(self, specs: list[TaskSpec]) -> _Submitted:  # type: ignore[override]
        """Put new tasks in the task book (each with its ``task.created`` event); returns once Redis answered."""
        if self.draining:
            raise OpError("overloaded", "aivad is draining")
        if len(self.tasks) + len(specs) > self.cfg.max_queued:
            raise OpError("overloaded", f"{len(self.tasks)} tasks unfinished in the cluster (max_queued)")
        fresh = [TaskState(spec, "queued", 0, []) for spec in specs]
        changes = [
            TaskChange(t.spec.task_id, 0, self._record(t, "queued"),
                       _rows([_event("task.created", t.spec, "queued", 0, priority=t.spec.priority)]), open="+",
                       owner="")
            for t in fresh
        ]
        versions = await self._book_change(changes)
        results = []
        for task, version, change in zip(fresh, versions, changes, strict=True):
            if version > 0:
                self._remember_own([mid for mid, _, _ in change.events])
            if version > 0 and task.spec.task_id not in self.tasks:
                task.version = version
                self._track(task)
                self._enqueue(task)
            results.append((task.spec.task_id, version <= 0))
        return _Submitted(results)

    # ---- attempts ----------------------------------------------------------------------------

    async def _begin(self, attempt: Attempt) -> bool:
        """Claim the task for this node: the CAS that moves it to ``dispatched`` here."""
        task, worker = attempt.task, attempt.worker
        event = _event("task.dispatched", task.spec, "dispatched", task.attempts, worker=worker.name,
                       node=self.node_name)
        try:
            claimed = await self._change(task, self._record(task, "dispatched", owner=self.node_name), [event],
                                         owner=self.node_name)
        except OpError as exc:
            log.warning("task %s: cannot claim it now (%s); tried again in %gs", task.spec.task_id[:64],
                        exc.message, _CLAIM_RETRY_S)
            task.attempts -= 1
            task.state = "retrying"
            self._retry_after(task, _CLAIM_RETRY_S)
            return False
        if not claimed:
            task.attempts -= 1  # another node has it; the record read says where it is
        return claimed

    async def _record_progress(self, task: TaskState, events: list[Envelope]) -> None:
        try:
            await self._change(task, self._record(task, task.state, owner=self.node_name), events)
        except OpError as exc:  # progress is news, not state: the attempt goes on
            log.warning("task %s: progress not recorded: %s", task.spec.task_id[:64], exc.message)

    async def _store_settlement(self, task: TaskState, settlement: Settlement) -> bool:
        state = settlement.state
        letter = ""
        if settlement.dead_reason is not None:
            letter = "+" + letter_json("task", settlement.dead_reason, json.dumps(task.spec.to_json_dict()),
                                       {"task_id": task.spec.task_id, "attempts": task.history,
                                        "error": settlement.error})
        record = self._record(task, state, result=settlement.result, error=settlement.error,
                              delay=settlement.delay)
        if state == "queued" and not settlement.events:  # handed back: the other nodes must hear it is free
            settlement = attrs.evolve(settlement, events=[_event(
                "task.retrying", task.spec, "queued", task.attempts, f":handback-{uuid.uuid4().hex[:8]}",
                reason="handed_back")])
        delay = _RETRY_INITIAL_S
        while True:  # the outcome is known: kept until Redis takes it (else the task would run again)
            try:
                stored = await self._change(task, record, settlement.events, open="-" if state in _ENDED else "=",
                                            owner="", letter=letter, ended=settlement.ended)
                break
            except OpError as exc:
                if exc.code != "overloaded":
                    raise
                log.warning("task %s: its %s waits for Redis: %s", task.spec.task_id[:64], state, exc.message)
                await trio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
        if not stored:
            log.info("task %s: ended or taken over elsewhere first; this outcome (%s) is dropped",
                     task.spec.task_id[:64], state)
            return False
        return True

    async def abandon(self, task_id: str, reason: str) -> None:
        task = self.tasks.get(task_id)
        if task is not None and task.attempt is None and task.state in ACTIVE_STATES:
            # its attempt runs on another node: end it here; that node's own end will not take
            await self._abandon_waiting(task, reason)
            return
        await super().abandon(task_id, reason)

    # ---- what the log says the other nodes did -------------------------------------------------

    def log_committed(self, messages: list[StoredMessage]) -> None:
        """The cluster log's tail hook: note the tasks whose records changed (read by :meth:`_refresh_loop`)."""
        for message in messages:
            if message.type not in _READ_AFTER:
                continue
            try:
                envelope = json.loads(message.json)
                payload, message_id = envelope["payload"], envelope["message_id"]
                task_id = payload["task_id"]
            except (ValueError, KeyError, TypeError):
                continue  # not one of ours
            if self._own.pop(message_id, False):
                continue  # this node's own change: memory has it already
            if isinstance(task_id, str):
                end = payload if message.type in ("task.completed", "task.dead_lettered") else None
                self._mark_stale(task_id, end)

    def _mark_stale(self, task_id: str, end: dict[str, Any] | None) -> None:
        if end is not None or task_id not in self._stale:
            self._stale[task_id] = end
        self._stale_wake.set()

    def resync(self, why: str) -> None:
        """The cluster log's reset hook (the tail skipped a gap, the log is new): events may have
        been missed, so every task's record is read again — the open ones and those in memory."""
        log.warning("cluster tasks: reading every task again: %s", why)
        self._resync = True
        self._stale_wake.set()

    async def _refresh_loop(self) -> NoReturn:
        """Read the records of the tasks the log said changed, and take what is newer than memory."""
        while True:
            await self._stale_wake.wait()
            self._stale_wake = trio.Event()
            if self._resync:
                try:
                    open_ids = await self._book.open_ids(self.cfg.max_queued)
                except RedisLogError as exc:
                    log.warning("cluster tasks: cannot list the open tasks now: %s", exc)
                    await trio.sleep(_CLAIM_RETRY_S)
                    self._stale_wake.set()
                    continue
                self._resync = False
                for task_id in [*open_ids, *self.tasks]:
                    self._stale.setdefault(task_id, None)
            stale, self._stale = self._stale, {}
            try:
                records = await self._book.records(list(stale))
            except RedisLogError as exc:
                log.warning("cluster tasks: cannot read %d changed tasks now: %s", len(stale), exc)
                self._stale = stale | self._stale
                await trio.sleep(_CLAIM_RETRY_S)
                self._stale_wake.set()
                continue
            for task_id, end in stale.items():
                found = records.get(task_id)
                if found is not None:
                    self._adopt(task_id, found)
                elif end is not None and (task := self.tasks.get(task_id)) is not None:  # record already dropped
                    state = "completed" if "result" in end else "dead"
                    task.state = state
                    self._end(task, self._ended_view(task, state, end.get("result"), end.get("error")), here=False)

    def _adopt(self, task_id: str, found: TaskRecord) -> None:
        """Take a record newer than what memory holds of the task."""
        state = found.state
        if task_id in self._locks:
            return  # a change of this node is in flight: it takes the record, or its failure reads it again
        task = self.tasks.get(task_id)
        if task is None:
            if state in _ENDED:
                return
            task = TaskState(found.spec, state, found.attempts, found.history)
            task.version = found.version
            self._track(task)
        elif found.version <= task.version:
            return
        attempt = task.attempt
        if attempt is not None and not (state in ACTIVE_STATES and found.owner == self.node_name):
            # the attempt here lost its task (its node seemed dead, it was abandoned, another node
            # claimed it first): it ends unstored — its CAS, expecting the version memory still
            # holds, fails and reads the record again, and that read is taken
            attempt.finish(Failure("abandoned", f"the task is {state} elsewhere now", False))
            return
        task.version = found.version
        task.attempts, task.history = found.attempts, found.history
        task.state = state
        if state in _ENDED:
            self._end(task, _view(found), here=False)
        elif state == "queued":
            self._enqueue(task)
        elif state == "retrying":
            self._retry_after(task, max(0.0, found.due_at - time.time()))
        elif attempt is None and found.owner == self.node_name:
            self._retry_interrupted(task, "this node no longer runs this attempt")

    def _retry_interrupted(self, task: TaskState, why: str) -> None:
        what = f"task {task.spec.task_id[:64]} interrupted"
        self._faults.start_soon(self._nursery, "dispatcher.interrupted", what, self._interrupted, task, why)

    async def _interrupted(self, task: TaskState, why: str, owner: str | None = None) -> None:
        """An attempt no worker will report on (its node stopped): it failed as ``worker_lost``."""
        history = {"attempt": task.attempts, "outcome": "worker_lost", "error": why, "ended": now_rfc3339()}
        settlement = self._failed(task, task.attempts, Failure("worker_lost", why, True), history)
        task.history.append(history)
        if settlement.state == "dead":
            settlement = attrs.evolve(settlement, ended=self._ended_view(task, "dead", None, settlement.error))
        if await self._store_settlement(task, settlement):
            if owner is not None:
                log.warning("task %s: node %s stopped during attempt %d; %s", task.spec.task_id[:64], owner,
                            task.attempts, settlement.state)
            self._apply(task, settlement)

    async def _reap_loop(self, interval_s: float) -> NoReturn:
        """Retry the attempts of nodes whose heartbeat expired (any node may; the CAS lets one do it)."""
        quiet_since = trio.current_time()
        while True:
            await trio.sleep(interval_s)
            live = {node.name for node in self._cluster.nodes}
            if self._cluster.failure is not None or self.node_name not in live:
                quiet_since = trio.current_time()
                continue  # this node's own view of the cluster is not current
            if trio.current_time() - quiet_since < 3 * interval_s:
                continue  # after Redis was away every node's heartbeat had lapsed: let them all beat again
            try:
                orphans = [t for t, owner in (await self._book.running()).items() if owner not in live]
                if orphans:  # the view above is up to a heartbeat old: a node that joined since is not in it
                    live = {node.name for node in await self._cluster.redis.live_nodes()}
                records = await self._book.records(orphans) if orphans else {}
            except RedisLogError as exc:
                log.warning("cluster tasks: cannot look for a stopped node's tasks: %s", exc)
                continue
            for task_id, found in records.items():
                owner = found.owner
                if found.state not in ACTIVE_STATES or owner in live:
                    continue
                self._adopt(task_id, found)
                task = self.tasks.get(task_id)
                if task is not None and task.attempt is None:
                    await self._interrupted(task, f"node {owner} stopped during attempt {task.attempts}", owner)

    # ---- queries -----------------------------------------------------------------------------

    async def _records(self, task_ids: Sequence[str]) -> dict[str, TaskRecord]:
        try:
            return await self._book.records(task_ids)
        except RedisLogError as exc:
            raise OpError("overloaded", f"the task book (Redis) is unreachable now: {exc}") from None

    def _live_view(self, task_id: str, found: TaskRecord) -> TaskView:
        view = _view(found)
        task = self.tasks.get(task_id)
        if task is not None and task.version >= found.version:  # memory is ahead of what was read
            view = TaskView(task_id, view.type, task.state, task.attempts, view.result, view.error,
                            view.group_id, list(task.history), view.spec)
        return view

    async def view(self, task_id: str) -> TaskView | None:
        found = (await self._records([task_id])).get(task_id)
        return self._live_view(task_id, found) if found is not None else None

    async def views(self, task_ids: list[str] | None = None, *, group_id: str | None = None,
                    state: str | None = None, limit: int = 1000) -> list[TaskView]:
        try:
            if task_ids is None and group_id is not None:
                task_ids = await self._book.group_ids(group_id, self.cfg.max_collect_ids)
            elif task_ids is None:
                open_ids = [t.spec.task_id for t in self.tasks.values() if state is None or t.state == state]
                ended = [] if state in ACTIVE_STATES else await self._book.ended_ids(limit)
                task_ids = list(dict.fromkeys([*reversed(open_ids), *ended]))
        except RedisLogError as exc:
            raise OpError("overloaded", f"the task book (Redis) is unreachable now: {exc}") from None
        found = await self._records(task_ids)
        views = [self._live_view(t, found[t]) for t in task_ids if t in found]
        if state is not None:
            views = [v for v in views if v.state == state]
        return views[:limit] if group_id is None else views

    # ---- dead letters --------------------------------------------------------------------------

    async def replay(self, dead_letter_id: int) -> str:
        letters = (await self._dead_letters.dead_letters(None, 1, dead_letter_id - 1)).letters
        if not letters or letters[0].id != dead_letter_id:
            raise OpError("not_found", f"no replayable dead letter {dead_letter_id}")
        if letters[0].kind != "task":
            raise OpError("bad_request",
                          f"dead letter {dead_letter_id} is a {letters[0].kind}, not a task: not replayable")
        spec = TaskSpec(**json.loads(letters[0].body))
        found = (await self._records([spec.task_id])).get(spec.task_id)
        task = TaskState(spec, "queued", 0, [])
        task.version = found.version if found is not None else 0
        event = _event("task.retrying", spec, "queued", 0, f":replay{dead_letter_id}", reason="replay")
        if found is None or found.state != "dead" or not await self._change(
                task, self._record(task, "queued"), [event], open="+", owner="", letter=f"-{dead_letter_id}"):
            raise OpError("not_found", f"no replayable dead letter {dead_letter_id}")
        if spec.task_id not in self.tasks:
            self._track(task)
            self._enqueue(task)
        return spec.task_id

    # ---- start --------------------------------------------------------------------------------

    async def recover(self) -> None:
        """Load the cluster's unfinished tasks; retry at once the attempts this node ran before it stopped."""
        ids = await self._book.open_ids(self.cfg.max_queued)
        records = await self._book.records(ids)
        mine = 0
        for task_id in ids:
            found = records.get(task_id)
            if found is None:
                continue
            self._adopt(task_id, found)
            if found.state in ACTIVE_STATES and found.owner == self.node_name:
                mine += 1
        if ids:
            log.info("cluster tasks: %d unfinished in the cluster (%d were in flight here)", len(ids), mine)


async def serve_cluster_dispatcher(
    cfg: TasksConfig,
    store: Store,
    cluster: ClusterLog,
    heartbeat_interval_s: float,
    faults: Faults | None = None,
    *,
    copy_events: bool = False,
    task_status: trio.TaskStatus[ClusterDispatcher] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Load the cluster's unfinished tasks, then dispatch, follow the log and retry dead nodes' tasks until cancelled.

    Returns: never. Resource handling: as :func:`aivad.dispatcher.serve_dispatcher`;
    an attempt cut off by cancellation stays ``dispatched`` under this node's name —
    retried by this node's next start, or by another node once its heartbeat expired.
    Error handling: Redis unreachable at start is waited out (backoff); later, reads
    and claims try again, and a change that cannot be stored is answered ``overloaded``.
    ``copy_events``: this node's task events are copied into its store too (for the AMQP
    bridge's outbox, which publishes them to the events exchange).
    """
    def letters_kept() -> int:
        return store.dead_letters_kept

    book = RedisTaskBook(cluster.redis, cfg.ended_kept, letters_kept)
    async with trio.open_nursery() as nursery:
        dispatcher = ClusterDispatcher(cfg, store, nursery, faults or Faults(), book,
                                       RedisDeadLetters(cluster.redis, letters_kept), cluster)
        dispatcher.copy_events = copy_events
        cluster.on_commit(dispatcher.log_committed)  # before the load: nothing changed meanwhile is missed
        cluster.on_reset(dispatcher.resync)
        delay = 0.2
        while True:
            try:
                await dispatcher.recover()
                break
            except RedisLogError as exc:
                log.warning("cluster tasks: cannot load the task book (%s); again in %.1fs", exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 10.0)
        nursery.start_soon(dispatcher._pump)
        nursery.start_soon(dispatcher._refresh_loop)
        nursery.start_soon(dispatcher._reap_loop, heartbeat_interval_s)
        task_status.started(dispatcher)
        await trio.sleep_forever()
    raise AssertionError("unreachable")
