"""The aggregator: collect the results of many tasks, request/response, group events.

A task's end is handed to whoever waits for it, from memory: the dispatcher
tells ``on_end`` after the commit that ended the task, with the result or the
final error, and each waiting collect (a ``request`` is one) gets that view
there — no store read on the way. The store is read only for the tasks that
had ended before the collect looked at them (they are no longer in the
dispatcher's memory), so a caller that reconnects can collect again and gets
the same answer. A waiter is registered on each task still in memory in the
same synchronous step that finds it there (no await in between): an end cannot
slip between the look and the registration. A group's waiter is registered on
the group before its members are read, so a member that joins and ends while
the collect looks is handed over too.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import attrs
import trio

from .boundary import Faults
from .config import TasksConfig
from .dispatcher import Dispatcher, TaskView
from .envelope import Envelope, derived_id
from .protocol import OpError
from .store import Store
from .tasks import TaskSpec

__all__ = ["Aggregator", "CollectResult", "serve_aggregator"]

log = logging.getLogger(__name__)


@attrs.frozen
class CollectResult:
    completed: dict[str, Any]
    failed: dict[str, Any]
    pending: list[str]
    reason: str  # all_done | min_results | timeout

    def to_wire(self) -> dict[str, Any]:
        """The reply's fields; the results themselves in it, not deep copies (they can be large)."""
        return attrs.asdict(self, recurse=False)


class _Waiter:
    """One collect's wait: the views of the watched tasks that ended, and the event that wakes it."""

    __slots__ = ("ended", "event")

    def __init__(self) -> None:
        self.ended: dict[str, TaskView] = {}
        self.event = trio.Event()

    def hand(self, view: TaskView) -> None:
        self.ended[view.task_id] = view
        self.event.set()


class Aggregator:
    def __init__(
        self, cfg: TasksConfig, dispatcher: Dispatcher, store: Store, nursery: trio.Nursery, faults: Faults
    ) -> None:
        self.cfg = cfg
        self._dispatcher = dispatcher
        self._store = store
        self._nursery = nursery
        self._faults = faults
        #: task_id → the collects waiting for it (each is handed the task's end once, then forgotten)
        self._waiters: dict[str, set[_Waiter]] = {}
        #: group_id → the collects waiting on the whole group (handed every member's end)
        self._group_waiters: dict[str, set[_Waiter]] = {}
        dispatcher.on_any_end.append(self._task_ended)
        dispatcher.on_end.append(self._check_group_soon)

    def _task_ended(self, view: TaskView) -> None:
        """After the commit that ended the task (here or, in a cluster, on another node): hand its
        view to whoever waits for it."""
        for waiter in self._waiters.pop(view.task_id, ()):
            waiter.hand(view)
        if view.group_id is not None:
            for waiter in self._group_waiters.get(view.group_id, ()):
                waiter.hand(view)

    def _check_group_soon(self, view: TaskView) -> None:
        """After this node ended a task: the node that ends a group's last task says so."""
        if view.group_id is not None and view.group_id not in self._dispatcher.group_tasks:  # its last task
            what = f"group {view.group_id[:64]}"
            self._faults.start_soon(self._nursery, "aggregator.group_check", what, self._check_group, view.group_id)

    async def _check_group(self, group_id: str) -> None:
        """Publish ``group.completed`` once every task of the group has ended."""
        views = await self._dispatcher.views(group_id=group_id)
        if not views or any(v.state not in ("completed", "dead") for v in views):
            return
        completed = sum(1 for v in views if v.state == "completed")
        payload = {"group_id": group_id, "tasks": len(views), "completed": completed, "dead": len(views) - completed}
        message_id = derived_id("aivad:group", group_id, "completed", len(views))
        await self._store.append(Envelope.from_fields("group.completed", payload, {"source": "aivad"}, message_id))

    def _watch(self, task_ids: list[str], waiter: _Waiter) -> set[str]:
        """Register ``waiter`` on every id still running; returns those ids. Sync: no wakeup is lost."""
        running = self._dispatcher.tasks
        pending = {t for t in task_ids if t in running}
        for task_id in pending:
            self._waiters.setdefault(task_id, set()).add(waiter)
        return pending

    def _unwatch(self, task_ids: set[str], waiter: _Waiter) -> None:
        for task_id in task_ids:
            waiters = self._waiters.get(task_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[task_id]

    async def collect(
        self, task_ids: list[str] | None, group_id: str | None, timeout_s: float, min_results: int | None
    ) -> CollectResult:
        """Wait until every task ended, ``min_results`` completed, or the timeout; partial results then.

        Ends are handed over from memory as they happen; the store is read only for
        the tasks that were not running when looked at (ended before, or unknown).
        """
        deadline = trio.current_time() + timeout_s
        waiter = _Waiter()
        watched: set[str] = set()
        completed: dict[str, Any] = {}
        failed: dict[str, Any] = {}

        def take(view: TaskView) -> None:
            if view.state == "completed":
                completed[view.task_id] = view.result
            elif view.state == "dead":
                failed[view.task_id] = view.error

        watched_group = group_id if task_ids is None else None
        if watched_group is not None:
            # registered before the members are read: one that joins and ends meanwhile is handed over
            self._group_waiters.setdefault(watched_group, set()).add(waiter)
        try:
            members: dict[str, None] = {}
            if task_ids is None:
                assert group_id is not None
                for view in await self._dispatcher.views(group_id=group_id):
                    members[view.task_id] = None
                    if view.task_id not in self._dispatcher.tasks:
                        take(view)
            else:
                # watched before the read (one that ends meanwhile is handed over); only the ids not
                # running now can have ended before: those alone are read
                watched |= self._watch(task_ids, waiter)
                looked_up = [t for t in dict.fromkeys(task_ids) if t not in watched]
                if looked_up:
                    found = await self._dispatcher.views(looked_up)
                    known = {v.task_id for v in found} | set(self._dispatcher.tasks)
                    unknown = [t for t in looked_up if t not in known]
                    if unknown:
                        raise OpError("not_found", f"unknown task ids: {', '.join(unknown[:5])}")
                    for view in found:
                        if view.task_id not in self._dispatcher.tasks:
                            take(view)
            while True:
                if task_ids is None:
                    assert group_id is not None
                    members.update(self._dispatcher.group_tasks.get(group_id, {}))
                    members.update(dict.fromkeys(waiter.ended))
                    ids = list(members)
                else:
                    ids = task_ids
                waiter.event = trio.Event()
                running_ids = self._watch(ids, waiter)
                watched |= running_ids
                for task_id in running_ids:  # running again (a dead-letter replay): not ended any more
                    completed.pop(task_id, None)
                    failed.pop(task_id, None)
                    waiter.ended.pop(task_id, None)
                for view in waiter.ended.values():  # handed over by the end itself: no store read
                    take(view)
                waiter.ended.clear()
                # neither running nor ended as far as memory knows (a replay between its commit and its
                # queueing): the store says where it is
                unsure = [t for t in ids if t not in running_ids and t not in completed and t not in failed]
                if unsure:
                    for view in await self._dispatcher.views(unsure):
                        if view.task_id not in self._dispatcher.tasks:
                            take(view)
                pending = [t for t in ids if t not in completed and t not in failed]
                reason = None
                if not pending:
                    reason = "all_done"
                elif min_results is not None and len(completed) >= min_results:
                    reason = "min_results"
                elif trio.current_time() >= deadline:
                    reason = "timeout"
                if reason is not None:
                    if reason == "timeout" and group_id is not None:
                        await self._store.append(
                            Envelope.from_fields(
                                "group.timeout", {"group_id": group_id, "pending": pending[:1000]}, {"source": "aivad"}
                            )
                        )
                    return CollectResult(completed, failed, pending, reason)
                with trio.move_on_at(deadline):
                    await waiter.event.wait()
        finally:
            self._unwatch(watched, waiter)
            if watched_group is not None:
                group_waiters = self._group_waiters[watched_group]
                group_waiters.discard(waiter)
                if not group_waiters:
                    del self._group_waiters[watched_group]

    async def request(self, spec: TaskSpec, timeout_s: float) -> dict[str, Any]:
        """Dispatch and wait for the result; a task not done in time is abandoned (``timeout``).

        The result (or the final error) is handed over by the end of the task, from memory.
        """
        task_id, _ = await self._dispatcher.submit(spec)
        result = await self.collect([task_id], None, timeout_s, None)
        if result.reason == "timeout":
            await self._dispatcher.abandon(task_id, f"request timed out after {timeout_s:g} s")
            raise OpError("timeout", f"no result for task {task_id} within {timeout_s:g} s")
        if task_id in result.failed:
            raise OpError("internal", f"task {task_id} failed: {result.failed[task_id]}")
        return {"task_id": task_id, "result": result.completed[task_id]}


async def serve_aggregator(
    cfg: TasksConfig,
    dispatcher: Dispatcher,
    store: Store,
    faults: Faults | None = None,
    *,
    task_status: trio.TaskStatus[Aggregator] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Own the aggregator's background work (group checks, each behind an error boundary) until cancelled."""
    async with trio.open_nursery() as nursery:
        task_status.started(Aggregator(cfg, dispatcher, store, nursery, faults or Faults()))
        await trio.sleep_forever()
    raise AssertionError("unreachable")
