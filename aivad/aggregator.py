"""The aggregator: collect the results of many tasks, request/response, group events.

Results are read from the store, never kept only in memory, so a caller that
reconnects can collect again and get the same answer. Waiting is a
``trio.Event`` per collect, registered on each pending task before the
dispatcher can end it (no await in between), under the collect's deadline.
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
        return attrs.asdict(self)


class Aggregator:
    def __init__(
        self, cfg: TasksConfig, dispatcher: Dispatcher, store: Store, nursery: trio.Nursery, faults: Faults
    ) -> None:
        self.cfg = cfg
        self._dispatcher = dispatcher
        self._store = store
        self._nursery = nursery
        self._faults = faults
        self._waiters: dict[str, set[trio.Event]] = {}
        dispatcher.on_end.append(self._task_ended)

    def _task_ended(self, view: TaskView) -> None:
        for event in self._waiters.pop(view.task_id, ()):
            event.set()
        if view.group_id is not None and not self._dispatcher.groups_running[view.group_id]:
            # the group's last running task
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

    def _watch(self, task_ids: list[str], event: trio.Event) -> list[str]:
        """Register ``event`` on every id still running; returns those ids. Sync: no wakeup is lost."""
        pending = [t for t in task_ids if t in self._dispatcher.tasks]
        for task_id in pending:
            self._waiters.setdefault(task_id, set()).add(event)
        return pending

    def _unwatch(self, task_ids: list[str], event: trio.Event) -> None:
        for task_id in task_ids:
            waiters = self._waiters.get(task_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[task_id]

    async def collect(
        self, task_ids: list[str] | None, group_id: str | None, timeout_s: float, min_results: int | None
    ) -> CollectResult:
        """Wait until every task ended, ``min_results`` completed, or the timeout; partial results then."""
        deadline = trio.current_time() + timeout_s
        if task_ids is None:
            assert group_id is not None
        else:
            known = {v.task_id for v in await self._dispatcher.views(task_ids)} | set(self._dispatcher.tasks)
            unknown = [t for t in task_ids if t not in known]
            if unknown:
                raise OpError("not_found", f"unknown task ids: {', '.join(unknown[:5])}")
        completed: dict[str, Any] = {}
        failed: dict[str, Any] = {}
        while True:
            ids = (
                task_ids
                if task_ids is not None
                else [v.task_id for v in await self._dispatcher.views(group_id=group_id)]
            )
            changed = trio.Event()
            running = set(self._watch(ids, changed))
            try:
                for task_id in running:  # running again (a dead-letter replay): not ended any more
                    completed.pop(task_id, None)
                    failed.pop(task_id, None)
                # only the tasks that ended since the last look are read: a wake costs what changed
                fresh = [t for t in ids if t not in running and t not in completed and t not in failed]
                for view in await self._dispatcher.views(fresh):
                    if view.state == "completed":
                        completed[view.task_id] = view.result
                    elif view.state == "dead":
                        failed[view.task_id] = view.error
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
                    await changed.wait()
            finally:
                self._unwatch(ids, changed)

    async def request(self, spec: TaskSpec, timeout_s: float) -> dict[str, Any]:
        """Dispatch and wait for the result; a task not done in time is abandoned (``timeout``)."""
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
