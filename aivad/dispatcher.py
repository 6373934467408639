"""The dispatcher: task queue → workers, a cancel scope per attempt, one place that decides.

Every accepted task is in the store before anyone hears of it, and ends exactly
once: ``completed`` or ``dead``. Tasks wait in per-type priority heaps (FIFO
within a priority; optional aging so low priority cannot starve). When a worker
has free capacity, a strategy picks the worker for the head task: round robin,
least connections (fewest in flight relative to concurrency) or affinity
(consistent hashing of ``affinity_key`` — or the type — over the workers of
that type, so a joining worker moves few keys).

Each attempt runs in its own task, inside a ``trio.CancelScope`` whose deadline
is the attempt's timeout — pulled in to ``now + heartbeat`` and pushed out by
each ``task.progress``. A result, a failure report or the loss of the worker
cancels the scope after recording why; an expired deadline cancels it by
itself. Either way ``_settle`` alone decides: done, retry after backoff, or
dead-letter. Shutdown cancels from outside: the attempt is not settled and the
task is handed back as queued.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, Protocol

import attrs
import trio

from .boundary import Faults
from .config import TasksConfig
from .envelope import Envelope, derived_id, now_rfc3339
from .protocol import OpError
from .store import Store, StoreClosed, Write, insert_envelopes
from .tasks import ACTIVE_STATES, STATES, TaskSpec, backoff_s

__all__ = ["Dispatcher", "TaskView", "Worker", "WorkerLink", "WorkerView", "serve_dispatcher"]

log = logging.getLogger(__name__)

_VNODES = 64  # points per worker on an affinity ring


# ---- outcomes of one attempt ------------------------------------------------------


@attrs.frozen
class Success:
    result: Any


@attrs.frozen
class Failure:
    """The worker reported a failure, or the attempt ended without a result."""

    kind: str  # failed | timeout | heartbeat | worker_lost | abandoned
    error: Any
    retryable: bool


@attrs.frozen
class HandedBack:
    """Shutdown: the attempt does not count; the task goes back to the queue."""


Outcome = Success | Failure | HandedBack


@attrs.frozen
class Settlement:
    """How a task's attempt (or the task, when abandoned) ends: what is stored, in one write."""

    state: str  # queued (handed back) | retrying | completed | dead
    events: list[Envelope]
    result: Any = None
    error: Any = None
    #: set when the task goes to the dead-letter queue, with why
    dead_reason: str | None = None
    #: the view handed to on_end (completed or dead)
    ended: TaskView | None = None
    delay: float = 0.0


# ---- in-memory state ----------------------------------------------------------------


class WorkerLink(Protocol):
    """How the dispatcher reaches a worker (a WebSocket connection, in aivad.websocket)."""

    async def send_task(self, frame: dict[str, Any]) -> None:
        """Queue the ``task`` frame for the worker (waiting for room, never for the worker)."""


class Worker:
    """A peer that said ``worker.hello``; the dispatcher reaches it through its ``link``."""

    def __init__(self, link: WorkerLink, name: str, types: list[str], concurrency: int) -> None:
        self.worker_id = uuid.uuid4().hex[:12]
        self.link = link
        self.name = name or self.worker_id
        self.types = types
        self.concurrency = concurrency
        self.in_flight: dict[str, Attempt] = {}
        self.done = 0
        self.failed = 0
        self.dispatched = 0
        self.connected_at = datetime.now(UTC)
        #: said worker.drain: gets no new task, and what it still holds when it leaves is handed back
        self.draining = False

    @property
    def free(self) -> int:
        return self.concurrency - len(self.in_flight)


class TaskState:
    """A task that has not ended yet."""

    def __init__(self, spec: TaskSpec, state: str, attempts: int, history: list[dict[str, Any]]) -> None:
        self.spec = spec
        self.state = state
        self.attempts = attempts
        self.history = history
        self.attempt: Attempt | None = None
        #: the record's version in a cluster's task book (aivad.cluster_tasks); unused on one node
        self.version = 0


class Attempt:
    def __init__(self, task: TaskState, worker: Worker, number: int, timeout_s: float) -> None:
        self.task = task
        self.worker = worker
        self.number = number
        now = trio.current_time()
        self.hard_deadline = now + timeout_s
        heartbeat = task.spec.heartbeat_s
        self.scope = trio.CancelScope(
            deadline=min(self.hard_deadline, now + heartbeat) if heartbeat else self.hard_deadline
        )
        self.outcome: Outcome | None = None
        #: its worker slot is given back (Dispatcher._release)
        self.released = False
        self.started_wall = time.time()
        self.progressed = False

    def finish(self, outcome: Outcome) -> bool:
        """Record how the attempt ended (first report wins) and end its scope."""
        if self.outcome is not None:
            return False
        self.outcome = outcome
        self.scope.cancel()
        return True

    def heartbeat(self) -> None:
        if self.task.spec.heartbeat_s:
            self.scope.deadline = min(self.hard_deadline, trio.current_time() + self.task.spec.heartbeat_s)

    def expired(self) -> Failure:
        if trio.current_time() >= self.hard_deadline:
            return Failure("timeout", f"attempt {self.number} timed out after {self.task.spec.timeout_s:g} s", True)
        return Failure("heartbeat", f"no progress for {self.task.spec.heartbeat_s:g} s (heartbeat)", True)


@attrs.frozen
class TaskView:
    """What ``task.status`` and ``aivad task`` report."""

    task_id: str
    type: str
    state: str
    attempts: int
    result: Any = None
    error: Any = None
    group_id: str | None = None
    history: list[dict[str, Any]] = attrs.field(factory=list)
    spec: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class WorkerView:
    worker_id: str
    name: str
    types: list[str]
    concurrency: int
    in_flight: int
    done: int
    failed: int
    connected_since: str
    draining: bool = False


@attrs.frozen
class DispatcherStatistics:
    tasks_by_state: dict[str, int]
    workers: int
    retries: int
    dead_lettered: int
    completed: int


# ---- SQL, run inside store writes ------------------------------------------------------


def _event(kind: str, spec: TaskSpec, state: str, attempt: int, unique: str = "", **extra: Any) -> Envelope:
    payload = {"task_id": spec.task_id, "type": spec.type, "state": state, "attempt": attempt, **extra}
    if spec.group_id is not None:
        payload["group_id"] = spec.group_id
    message_id = derived_id("aivad", spec.task_id, kind, f"{attempt}{unique}")
    # built directly: the topics are the daemon's own, the ids its own making (no producer input to check)
    return Envelope(message_id, now_rfc3339(), kind, payload, {"source": "aivad"})


def _update(conn: sqlite3.Connection, task: TaskState, **columns: Any) -> None:
    columns = {
        "state": task.state,
        "attempts": task.attempts,
        "history": json.dumps(task.history),
        "updated_at": time.time(),
        **columns,
    }
    assignments = ", ".join(f"{name} = ?" for name in columns)
    conn.execute(f"UPDATE tasks SET {assignments} WHERE task_id = ?", (*columns.values(), task.spec.task_id))


def _row_view(row: tuple[Any, ...]) -> TaskView:
    task_id, task_type, spec, state, attempts, group_id, result, error, history = row
    return TaskView(
        task_id,
        task_type,
        state,
        attempts,
        json.loads(result) if result else None,
        json.loads(error) if error else None,
        group_id,
        json.loads(history),
        json.loads(spec),
    )


_VIEW_COLUMNS = "task_id, type, spec, state, attempts, group_id, result, error, history"
#: what a restart takes up again, oldest first; its WHERE is the store's ``tasks_unfinished`` index's,
#: so it reads that index (only the tasks in flight) and not every task ever run
UNFINISHED_TASKS_SQL = (
    "SELECT spec, state, attempts, history FROM tasks WHERE state NOT IN ('completed', 'dead') ORDER BY created_at"
)


# ---- the service ------------------------------------------------------------------------


class Dispatcher:
    def __init__(self, cfg: TasksConfig, store: Store, nursery: trio.Nursery, faults: Faults) -> None:
        self.cfg = cfg
        self._store = store
        self._nursery = nursery
        self._faults = faults
        self.tasks: dict[str, TaskState] = {}
        #: group_id → the ids of its tasks not yet ended, in the order they were queued
        #: (group.completed is due when none is left)
        self.group_tasks: dict[str, dict[str, None]] = {}
        self.workers: dict[str, Worker] = {}
        self._by_type: dict[str, list[Worker]] = {}
        self._rings: dict[str, tuple[list[int], list[Worker]]] = {}
        self._ready: dict[str, list[tuple[float, int, str]]] = {}
        self._order = itertools.count()
        self._round_robin: dict[str, int] = {}
        self._wake = trio.Event()
        self._idle = trio.Event()
        #: attempts started and not yet settled (also those of workers that left)
        self._in_flight = 0
        self.draining = False
        self._retries = 0
        self._dead = 0
        self._completed = 0
        #: called with (task view) when this node ends a task (completed or dead), after commit
        self.on_end: list[Callable[[TaskView], None]] = []
        #: called with (task view) for every end this node learns of: its own, and in a
        #: cluster the other nodes' (what collect and request wait for)
        self.on_any_end: list[Callable[[TaskView], None]] = []
        #: called inside the write that ends a task, in the store's writer thread: rows that
        #: must commit with the end or not at all (the AMQP bridge's RPC reply)
        self.end_writes: list[Callable[[sqlite3.Connection, TaskView], None]] = []

    # ---- submitting --------------------------------------------------------------------

    async def submit(self, spec: TaskSpec) -> tuple[str, bool]:
        """Store a new task (and its ``task.created`` event); returns (task_id, duplicate) after commit."""
        write = await self.submit_many([spec])
        ((task_id, duplicate),) = await write.wait()
        return task_id, duplicate

    async def submit_many(self, specs: list[TaskSpec]) -> Write:
        """Queue new tasks in one write; its result is ``[(task_id, duplicate), …]``.

        A task is queued for workers right after the commit (never before: a
        crash cannot lose a task a producer was told about), in the given order.
        """
        if self.draining:
            raise OpError("overloaded", "aivad is draining")
        if len(self.tasks) + len(specs) > self.cfg.max_queued:
            raise OpError("overloaded", f"{len(self.tasks)} tasks unfinished (max_queued)")

        def insert(conn: sqlite3.Connection, write: Write) -> list[tuple[str, bool]]:
            now = time.time()
            results = []
            for spec in specs:
                row = conn.execute(
                    "INSERT INTO tasks (task_id, type, spec, state, group_id, created_at, updated_at) "
                    "VALUES (?, ?, ?, 'queued', ?, ?, ?) ON CONFLICT (task_id) DO NOTHING RETURNING task_id",
                    (spec.task_id, spec.type, json.dumps(spec.to_json_dict()), spec.group_id, now, now),
                ).fetchone()
                if row is not None:
                    insert_envelopes(conn, write, [_event("task.created", spec, "queued", 0, priority=spec.priority)])
                results.append((spec.task_id, row is None))
            return results

        def accept(write: Write) -> None:
            for spec, (_, duplicate) in zip(specs, write.result, strict=True):
                if not duplicate:
                    task = TaskState(spec, "queued", 0, [])
                    self._track(task)
                    self._enqueue(task)

        return await self._store.submit(insert, isolated=False, committed=accept)

    def _track(self, task: TaskState) -> None:
        """A task not yet ended: in ``tasks``, and counted in its group."""
        self.tasks[task.spec.task_id] = task
        if task.spec.group_id is not None:
            self.group_tasks.setdefault(task.spec.group_id, {})[task.spec.task_id] = None

    def _enqueue(self, task: TaskState) -> None:
        priority = task.spec.priority
        key = trio.current_time() / self.cfg.aging_s - priority if self.cfg.aging_s else -priority
        heapq.heappush(self._ready.setdefault(task.spec.type, []), (key, next(self._order), task.spec.task_id))
        self._wake.set()

    # ---- workers ----------------------------------------------------------------------

    def add_worker(self, link: WorkerLink, name: str, types: list[str], concurrency: int) -> Worker:
        if len(self.workers) >= self.cfg.max_workers:
            raise OpError("overloaded", f"at most {self.cfg.max_workers} workers")
        worker = Worker(link, name, types, concurrency)
        self.workers[worker.worker_id] = worker
        for task_type in types:
            self._by_type.setdefault(task_type, []).append(worker)
            self._rings.pop(task_type, None)
        log.info("worker %s joined: %.200s × %d", worker.name, ", ".join(types), concurrency)
        self._wake.set()
        return worker

    def drain_worker(self, worker: Worker) -> None:
        """``worker.drain``: send it nothing more; it finishes what it has, then leaves."""
        if worker.draining:
            return
        worker.draining = True
        self._make_ineligible(worker)
        log.info("worker %s drains with %d tasks in flight", worker.name, len(worker.in_flight))

    def _make_ineligible(self, worker: Worker) -> None:
        for task_type in worker.types:
            workers = self._by_type.get(task_type, [])
            if worker in workers:
                workers.remove(worker)
                self._rings.pop(task_type, None)

    def remove_worker(self, worker: Worker) -> None:
        """The worker's connection is gone: its attempts end as worker_lost (handed back if it drained)."""
        if self.workers.pop(worker.worker_id, None) is None:
            return
        self._make_ineligible(worker)
        for attempt in list(worker.in_flight.values()):
            # a draining worker did not run what reached it after its drain: that attempt does not count
            attempt.finish(
                HandedBack() if worker.draining else Failure("worker_lost", f"worker {worker.name} disconnected", True)
            )
        log.info("worker %s left with %d tasks in flight", worker.name, len(worker.in_flight))

    def _ring(self, task_type: str) -> tuple[list[int], list[Worker]]:
        ring = self._rings.get(task_type)
        if ring is None:
            points = sorted(
                ((_hash(f"{w.worker_id}#{i}"), w) for w in self._ring_members(task_type) for i in range(_VNODES)),
                key=lambda point: point[0],
            )
            ring = self._rings[task_type] = ([p for p, _ in points], [w for _, w in points])
        return ring

    def _ring_members(self, task_type: str) -> list[Worker]:
        """The workers on the affinity ring of ``task_type``: this dispatcher's eligible ones."""
        return list(self._by_type.get(task_type, []))

    def affinity_workers(self) -> dict[str, list[str]]:
        """The ids of the eligible workers of each affinity-dispatched type (a cluster node's heartbeat says them)."""
        strategies, default = self.cfg.strategies, self.cfg.default_strategy
        return {t: [w.worker_id for w in workers] for t, workers in self._by_type.items()
                if workers and strategies.get(t, default) == "affinity"}

    def _pick(self, task: TaskState) -> Worker | None:
        """The worker for ``task`` by its type's strategy, or None (the task keeps waiting)."""
        task_type = task.spec.type
        workers = self._by_type.get(task_type)
        if not workers:
            return None
        strategy = self.cfg.strategies.get(task_type, self.cfg.default_strategy)
        if strategy == "affinity":
            hashes, owners = self._ring(task_type)
            target = owners[bisect.bisect(hashes, _hash(task.spec.affinity_key or task_type)) % len(owners)]
            return target if target.free > 0 else None
        if strategy == "round_robin":
            start = self._round_robin.get(task_type, 0)
            for i in range(len(workers)):
                worker = workers[(start + i) % len(workers)]
                if worker.free > 0:
                    self._round_robin[task_type] = (start + i + 1) % len(workers)
                    return worker
            return None
        free = [w for w in workers if w.free > 0]
        return min(free, key=lambda w: (len(w.in_flight) / w.concurrency, w.dispatched)) if free else None

    # ---- dispatching ------------------------------------------------------------------

    async def _pump(self) -> NoReturn:
        """Hand ready tasks to free workers whenever something changed."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if not self.draining:
                self._dispatch_ready()

    def _dispatch_ready(self) -> None:
        for task_type, heap in self._ready.items():
            if not heap or not any(w.free > 0 for w in self._by_type.get(task_type, ())):
                continue
            waiting: list[tuple[float, int, str]] = []  # tasks whose affinity target is busy: they keep their place
            while heap and len(waiting) < 1000:
                entry = heapq.heappop(heap)
                task = self.tasks.get(entry[2])
                if task is None or task.state not in ("queued", "retrying"):
                    continue  # ended while queued (abandoned)
                worker = self._pick(task)
                if worker is None:
                    waiting.append(entry)
                    if not any(w.free > 0 for w in self._by_type.get(task_type, ())):
                        break
                    continue
                self._start_attempt(task, worker)
            for entry in waiting:
                heapq.heappush(heap, entry)

    def _start_attempt(self, task: TaskState, worker: Worker) -> None:
        task.attempts += 1
        task.state = "dispatched"
        attempt = Attempt(task, worker, task.attempts, task.spec.timeout_s)
        task.attempt = attempt
        worker.in_flight[task.spec.task_id] = attempt
        worker.dispatched += 1
        if not self._in_flight:
            self._idle = trio.Event()
        self._in_flight += 1
        what = f"task {task.spec.task_id[:64]} attempt {attempt.number}"
        self._faults.start_soon(self._nursery, "dispatcher.attempt", what, self._run_attempt, attempt)

    async def _run_attempt(self, attempt: Attempt) -> None:
        task, worker = attempt.task, attempt.worker
        spec = task.spec
        deadline = datetime.now(UTC) + timedelta(seconds=spec.timeout_s)
        frame = {
            "op": "task",
            "task": {
                "task_id": spec.task_id,
                "type": spec.type,
                "payload": spec.payload,
                "attempt": attempt.number,
                "deadline": deadline.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            },
        }
        history = {
            "attempt": attempt.number,
            "worker": worker.name,
            "worker_id": worker.worker_id,
            "started": now_rfc3339(),
        }
        try:
            if not await self._begin(attempt):
                return  # another node took the task first (a cluster): it runs there
            with attempt.scope:
                await worker.link.send_task(frame)
                await trio.sleep_forever()
            outcome = attempt.outcome or attempt.expired()
            await self._settle(attempt, outcome, history)
        finally:
            # however it ended (settled, shutdown — the next start retries it —, or a fault):
            # it holds no worker slot, and a drain waiting for attempts in flight counts it done
            self._release(attempt)
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _begin(self, attempt: Attempt) -> bool:
        """Record that the attempt is dispatched; False when the task is not this node's to run."""
        task, worker = attempt.task, attempt.worker
        event = _event("task.dispatched", task.spec, "dispatched", task.attempts, worker=worker.name)

        def write(conn: sqlite3.Connection, w: Write) -> None:
            _update(conn, task, state="dispatched")
            insert_envelopes(conn, w, [event])

        # queued before the settle's write, so committed before it, or with it: nothing waits for it
        # (lazy: it waits for the next commit, usually the task's end, to share it)
        await self._store.submit(write, isolated=False, lazy=True)
        return True

    # ---- reports from workers -----------------------------------------------------------

    def _attempt_of(self, worker: Worker, task_id: Any) -> Attempt:
        attempt = worker.in_flight.get(task_id) if isinstance(task_id, str) else None
        if attempt is None or attempt.outcome is not None:
            log.warning(
                "ignoring a report for task %.64r from worker %s: no attempt of it is in flight there",
                task_id,
                worker.name,
            )
            raise OpError("not_found", f"task {str(task_id)[:64]} is not in flight on this worker")
        return attempt

    async def progress(self, worker: Worker, task_id: Any, progress: float, note: Any) -> None:
        attempt = self._attempt_of(worker, task_id)
        attempt.heartbeat()
        task = attempt.task
        events = []
        if not attempt.progressed:
            attempt.progressed = True
            task.state = "running"
            events.append(_event("task.started", task.spec, "running", attempt.number))
        extra = {"progress": progress} | ({"note": note} if note is not None else {})
        events.append(
            _event("task.progress", task.spec, task.state, attempt.number, f":{uuid.uuid4().hex[:8]}", **extra)
        )
        await self._record_progress(task, events)

    async def _record_progress(self, task: TaskState, events: list[Envelope]) -> None:
        state = task.state

        def write(conn: sqlite3.Connection, w: Write) -> None:
            if state == "running":
                conn.execute(
                    "UPDATE tasks SET state = 'running' WHERE task_id = ? AND state = 'dispatched'",
                    (task.spec.task_id,),
                )
            insert_envelopes(conn, w, events)

        await self._store.submit(write, isolated=False)

    def result(self, worker: Worker, task_id: Any, result: Any) -> None:
        self._attempt_of(worker, task_id).finish(Success(result))

    def fail(self, worker: Worker, task_id: Any, error: Any, retryable: bool) -> None:
        self._attempt_of(worker, task_id).finish(Failure("failed", error, retryable))

    # ---- the one place that decides -------------------------------------------------------

    def _release(self, attempt: Attempt) -> None:
        """The attempt holds its worker's slot no more (once, however it ended)."""
        if attempt.released:
            return
        attempt.released = True
        attempt.worker.in_flight.pop(attempt.task.spec.task_id, None)
        if attempt.task.attempt is attempt:
            attempt.task.attempt = None
        self._wake.set()

    async def _settle(self, attempt: Attempt, outcome: Outcome, history: dict[str, Any]) -> None:
        task, worker, spec = attempt.task, attempt.worker, attempt.task.spec
        self._release(attempt)
        if self.draining and isinstance(outcome, Failure) and outcome.kind == "worker_lost":
            outcome = HandedBack()
        history |= {"ended": now_rfc3339()}
        events: list[Envelope] = []
        dead_reason = None
        delay = 0.0
        # the new state is taken in memory only once it is committed: until then
        # task.status reads the old one, never "completed" without its result
        if isinstance(outcome, HandedBack):
            task.attempts -= 1
            state = "queued"
            history |= {"outcome": "handed_back"}
        elif isinstance(outcome, Success):
            worker.done += 1
            state = "completed"
            history |= {"outcome": "completed"}
            events.append(_event("task.completed", spec, "completed", attempt.number, result=outcome.result))
        else:
            worker.failed += 1
            history |= {"outcome": outcome.kind, "error": outcome.error}
            failed = self._failed(task, attempt.number, outcome, history)
            state, events, dead_reason, delay = failed.state, failed.events, failed.dead_reason, failed.delay
        task.history.append(history)
        error = outcome.error if isinstance(outcome, Failure) else None
        result = outcome.result if isinstance(outcome, Success) else None
        ended = self._ended_view(task, state, result, error) if state in ("completed", "dead") else None
        settlement = Settlement(state, events, result, error, dead_reason, ended, delay)
        try:
            if not await self._store_settlement(task, settlement):
                return  # the task ended or moved elsewhere first (a cluster): that stands
        except StoreClosed:
            return  # stopping: the store still holds the attempt as begun, and the next start retries it
        except OpError as exc:  # the store failed (internal): run the task again rather than lose its end
            log.error("task %s: its end could not be stored (%s); it runs again", spec.task_id[:64], exc.message)
            settlement = attrs.evolve(settlement, state="retrying", delay=backoff_s(spec, max(task.attempts, 1)))
        self._apply(task, settlement)

    def _failed(self, task: TaskState, number: int, outcome: Failure, history: dict[str, Any]) -> Settlement:
        """How attempt ``number`` of ``task`` failing goes on: a retry after backoff, or the dead-letter queue.

        Its events, state, delay and dead reason (``ended`` is left for the caller, who
        appends ``history`` to the task first).
        """
        spec = task.spec
        events = [_event("task.failed", spec, "failed", number, error=outcome.error, reason=outcome.kind)]
        if outcome.retryable and task.attempts < spec.max_attempts:
            delay = backoff_s(spec, task.attempts)
            events.append(_event("task.retrying", spec, "retrying", number, delay_s=round(delay, 3)))
            return Settlement("retrying", events, error=outcome.error, delay=delay)
        dead_reason = (
            f"{outcome.kind}: not retryable"
            if not outcome.retryable
            else f"{outcome.kind}: {task.attempts} of {spec.max_attempts} attempts used"
        )
        events.append(_event("task.dead_lettered", spec, "dead", number, error=outcome.error, reason=dead_reason))
        return Settlement("dead", events, error=outcome.error, dead_reason=dead_reason)

    async def _store_settlement(self, task: TaskState, settlement: Settlement) -> bool:
        """Commit how the task goes on (one write, with its events and dead letter); True once committed."""
        spec, state, error = task.spec, settlement.state, settlement.error

        def write(conn: sqlite3.Connection, w: Write) -> None:
            _update(
                conn,
                task,
                state=state,
                result=json.dumps(settlement.result) if state == "completed" else None,
                error=json.dumps(error) if error is not None else None,
            )
            if settlement.dead_reason is not None:
                self._store.insert_dead_letter(
                    conn,
                    "task",
                    settlement.dead_reason,
                    json.dumps(spec.to_json_dict()),
                    {"task_id": spec.task_id, "attempts": task.history, "error": error},
                )
            insert_envelopes(conn, w, settlement.events)
            if settlement.ended is not None:
                self._write_end(conn, settlement.ended)

        await (await self._store.submit(write)).wait()
        return True

    def _apply(self, task: TaskState, settlement: Settlement) -> None:
        """After the commit: the task's new state in memory (queued again, a retry timer, or its end)."""
        task.state = settlement.state
        if settlement.state == "retrying":
            self._retries += 1
            self._retry_after(task, settlement.delay)
        elif settlement.state == "queued":
            self._enqueue(task)
        else:
            assert settlement.ended is not None
            self._end(task, settlement.ended)

    def _retry_after(self, task: TaskState, delay: float) -> None:
        what = f"task {task.spec.task_id[:64]} retry"
        self._faults.start_soon(self._nursery, "dispatcher.retry", what, self._requeue_after, task, delay)

    async def _requeue_after(self, task: TaskState, delay: float) -> None:
        await trio.sleep(delay)
        if task.state == "retrying" and task.spec.task_id in self.tasks:
            self._enqueue(task)

    def _ended_view(self, task: TaskState, state: str, result: Any, error: Any) -> TaskView:
        return TaskView(
            task.spec.task_id,
            task.spec.type,
            state,
            task.attempts,
            result,
            error,
            task.spec.group_id,
            task.history,
            task.spec.to_json_dict(),
        )

    def _write_end(self, conn: sqlite3.Connection, view: TaskView) -> None:
        for write_rows in self.end_writes:
            write_rows(conn, view)

    def _end(self, task: TaskState, view: TaskView, *, here: bool = True) -> None:
        """After the commit that ended ``task``: forget it, tell the hooks; count it when ``here``
        (this node ended it: each node's statistics and metrics count its own ends)."""
        self.tasks.pop(task.spec.task_id, None)
        group_id = task.spec.group_id
        if group_id is not None and (running := self.group_tasks.get(group_id)) is not None:
            running.pop(task.spec.task_id, None)
            if not running:
                del self.group_tasks[group_id]
        for callback in self.on_any_end:
            callback(view)
        if here:
            if task.state == "completed":
                self._completed += 1
            else:
                self._dead += 1
            for callback in self.on_end:
                callback(view)

    async def abandon(self, task_id: str, reason: str) -> None:
        """End a task nobody waits for any more (a timed-out ``request``): dead, with ``reason``."""
        task = self.tasks.get(task_id)
        if task is None:
            return
        if task.attempt is not None:
            task.attempt.finish(Failure("abandoned", reason, False))
            return
        if task.state not in ("queued", "retrying"):
            return  # its attempt is being settled: that outcome stands
        await self._abandon_waiting(task, reason)

    async def _abandon_waiting(self, task: TaskState, reason: str) -> None:
        """End a task that no attempt of this node runs: dead, with ``reason``."""
        state = task.state
        task.state = "dead"
        task.history.append({"outcome": "abandoned", "error": reason, "ended": now_rfc3339()})
        spec = task.spec
        events = [_event("task.dead_lettered", spec, "dead", task.attempts, error=reason, reason="abandoned")]
        settlement = Settlement("dead", events, None, reason, f"abandoned: {reason}",
                                self._ended_view(task, "dead", None, reason))
        if await self._store_settlement(task, settlement):
            self._apply(task, settlement)
        else:
            task.state = state  # not ended here after all (a cluster): the record read again says where it is

    # ---- queries ----------------------------------------------------------------------------

    async def view(self, task_id: str) -> TaskView | None:
        def read(conn: sqlite3.Connection) -> TaskView | None:
            row = conn.execute(f"SELECT {_VIEW_COLUMNS} FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            return _row_view(row) if row else None

        found: TaskView | None = await self._store.read(read)
        task = self.tasks.get(task_id)
        if found is not None and task is not None:  # memory is ahead of the store for live tasks
            found = attrs.evolve(found, state=task.state, attempts=task.attempts, history=list(task.history))
        return found

    async def types_of(self, task_ids: list[str]) -> list[str]:
        """The types of the known tasks among ``task_ids``: from memory, the store read only for the rest."""
        types = {t: task.spec.type for t in task_ids if (task := self.tasks.get(t)) is not None}
        rest = [t for t in task_ids if t not in types]
        if rest:
            types |= {v.task_id: v.type for v in await self.views(rest)}
        return [types[t] for t in task_ids if t in types]  # in the given order

    async def views(
        self,
        task_ids: list[str] | None = None,
        *,
        group_id: str | None = None,
        state: str | None = None,
        limit: int = 1000,
    ) -> list[TaskView]:
        def read(conn: sqlite3.Connection) -> list[TaskView]:
            if task_ids is not None:
                found = {}
                for start in range(0, len(task_ids), 500):
                    chunk = task_ids[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    for row in conn.execute(f"SELECT {_VIEW_COLUMNS} FROM tasks WHERE task_id IN ({marks})", chunk):
                        found[row[0]] = _row_view(row)
                return [found[t] for t in task_ids if t in found]
            if group_id is not None:
                rows = conn.execute(
                    f"SELECT {_VIEW_COLUMNS} FROM tasks WHERE group_id = ? ORDER BY created_at", (group_id,)
                )
            else:
                rows = conn.execute(
                    f"SELECT {_VIEW_COLUMNS} FROM tasks WHERE (? IS NULL OR state = ?) "
                    "ORDER BY created_at DESC LIMIT ?",
                    (state, state, limit),
                )
            return [_row_view(row) for row in rows]

        views: list[TaskView] = await self._store.read(read)
        return [
            attrs.evolve(v, state=t.state, attempts=t.attempts) if (t := self.tasks.get(v.task_id)) else v
            for v in views
        ]

    def worker_views(self) -> list[WorkerView]:
        return [
            WorkerView(
                w.worker_id,
                w.name,
                w.types,
                w.concurrency,
                len(w.in_flight),
                w.done,
                w.failed,
                w.connected_at.isoformat(timespec="seconds").replace("+00:00", "Z"),
                w.draining,
            )
            for w in self.workers.values()
        ]

    def statistics(self) -> DispatcherStatistics:
        counts = dict.fromkeys(STATES, 0)
        for task in self.tasks.values():
            counts[task.state] += 1
        counts["completed"] = self._completed
        counts["dead"] = self._dead
        return DispatcherStatistics(counts, len(self.workers), self._retries, self._dead, self._completed)

    # ---- dead letters -----------------------------------------------------------------------

    async def replay(self, dead_letter_id: int) -> str:
        """Queue a dead task again with a fresh attempt budget; returns its task_id."""

        def take(conn: sqlite3.Connection, _: Write) -> tuple[str, str] | None:
            row = conn.execute("SELECT kind, body FROM dead_letters WHERE id = ?", (dead_letter_id,)).fetchone()
            if row is None:
                return None
            kind, body = row
            if kind != "task":
                raise OpError("bad_request", f"dead letter {dead_letter_id} is a {kind}, not a task: not replayable")
            spec = json.loads(body)
            updated = conn.execute(
                "UPDATE tasks SET state = 'queued', attempts = 0, error = NULL, updated_at = ? "
                "WHERE task_id = ? AND state = 'dead'",
                (time.time(), spec["task_id"]),
            ).rowcount
            if not updated:  # the task is not dead (any more): the letter stays, as it was
                return None
            conn.execute("DELETE FROM dead_letters WHERE id = ?", (dead_letter_id,))
            return spec["task_id"], body

        taken = await (await self._store.submit(take)).wait()
        if taken is None:
            raise OpError("not_found", f"no replayable dead letter {dead_letter_id}")
        task_id, body = taken
        spec = TaskSpec(**json.loads(body))
        task = TaskState(spec, "queued", 0, [])
        self._track(task)
        self._enqueue(task)
        return str(task_id)

    # ---- start and stop ---------------------------------------------------------------------

    async def recover(self) -> None:
        """After a restart: queued tasks wait again; those that were in flight are retried."""

        def read(conn: sqlite3.Connection) -> list[tuple[str, str, int, str]]:
            return conn.execute(UNFINISHED_TASKS_SQL).fetchall()

        rows = await self._store.read(read)
        interrupted = []
        for spec_json, state, attempts, history in rows:
            task = TaskState(TaskSpec(**json.loads(spec_json)), state, attempts, json.loads(history))
            if state in ACTIVE_STATES:
                task.history.append(
                    {
                        "attempt": attempts,
                        "outcome": "interrupted",
                        "error": "the daemon stopped during this attempt",
                        "ended": now_rfc3339(),
                    }
                )
                task.state = "retrying"
                interrupted.append(task)
            self._track(task)
            self._enqueue(task)
        if interrupted:

            def write(conn: sqlite3.Connection, w: Write) -> None:
                for task in interrupted:
                    _update(conn, task)
                    insert_envelopes(
                        conn,
                        w,
                        [_event("task.retrying", task.spec, "retrying", task.attempts, ":restart", reason="restart")],
                    )

            await (await self._store.submit(write)).wait()
        if rows:
            log.info("recovered %d unfinished tasks (%d were in flight)", len(rows), len(interrupted))

    async def drain(self, wait_s: float) -> None:
        """Dispatch nothing new; let attempts in flight end for ``wait_s``; hand the rest back."""
        self.draining = True
        if self._in_flight:
            with trio.move_on_after(wait_s):
                await self._idle.wait()
        for worker in list(self.workers.values()):
            for attempt in list(worker.in_flight.values()):
                attempt.finish(HandedBack())
        if self._in_flight:
            await self._idle.wait()  # set when the last attempt's settle is done


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


async def serve_dispatcher(
    cfg: TasksConfig,
    store: Store,
    faults: Faults | None = None,
    *,
    task_status: trio.TaskStatus[Dispatcher] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Recover unfinished tasks, then dispatch until cancelled.

    Returns: never. Resource handling: attempts live in this service's nursery;
    cancelling it ends them unsettled — their tasks stay in the store and are
    retried by the next start. Error handling: each attempt and retry timer has its own
    error boundary (a fault releases its worker slot; a failed store write runs the task
    again after backoff); a bug in the pump itself stops the daemon.
    """
    async with trio.open_nursery() as nursery:
        dispatcher = Dispatcher(cfg, store, nursery, faults or Faults())
        await dispatcher.recover()
        nursery.start_soon(dispatcher._pump)
        task_status.started(dispatcher)
        await trio.sleep_forever()
    raise AssertionError("unreachable")
