"""``Client.on_result``: call back once a task has ended, robust across reconnects.

Why events and not a background ``collect``: the daemon publishes
``task.completed`` and ``task.dead_lettered`` (payload ``task_id``, ``state``,
``attempt``, ``result`` / ``error``), and a :class:`Subscription` resumes after
a reconnect from the last seq it saw — the store is the buffer, so an end that
happens while we are disconnected is still delivered. One watcher per client,
two subscriptions (one per topic, so ``task.progress`` traffic never reaches
us), a dict lookup per event: O(1) however many tasks are watched. A
``collect`` per watched task would instead hold a waiting op per task on the
daemon (bounded per connection) and re-read the store on each wake.

The race "the task ended before the subscription was active" is closed by
asking ``task.status`` after registering: the first of the two that reports
the end fires the callback; the other finds nothing registered.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from aivad.client._model import AivadError, TaskStatus

if TYPE_CHECKING:
    from aivad.client._client import Client
    from aivad.client._subscription import Subscription

__all__ = ["ResultCallback", "ResultWatcher"]

log = logging.getLogger(__name__)

ResultCallback = Callable[[TaskStatus], Any]
TERMINAL_TOPICS: Final = ("task.completed", "task.dead_lettered")


class ResultWatcher:
    """Callbacks by task id, fired from the two terminal-event subscriptions."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._callbacks: dict[str, list[ResultCallback]] = {}
        self._subs: list[Subscription] = []

    @property
    def watched(self) -> int:
        return len(self._callbacks)

    async def start(self) -> None:
        """Subscribe to both topics; returns once the daemon confirmed both."""
        for topic in TERMINAL_TOPICS:
            sub = self._client.subscribe(topic)
            await sub.__aenter__()
            self._subs.append(sub)
            self._client._tg.start_soon(self._follow, sub, name=f"aivad on_result {topic}")

    def add(self, task_id: str, callback: ResultCallback) -> None:
        self._callbacks.setdefault(task_id, []).append(callback)

    def discard(self, task_id: str, callback: ResultCallback) -> None:
        callbacks = self._callbacks.get(task_id)
        if callbacks and callback in callbacks:
            callbacks.remove(callback)
            if not callbacks:
                del self._callbacks[task_id]

    async def _follow(self, sub: Subscription) -> None:
        try:
            await self._follow_events(sub)
        except AivadError as exc:
            # e.g. ``forbidden`` after a token refresh narrowed the rights: this watcher is done; the
            # next ``on_result`` starts a new one (and hears the refusal itself)
            log.error("on_result: the subscription to %s ended (%s); %d callbacks dropped",
                      sub.pattern, exc, len(self._callbacks))
            self._callbacks.clear()
            if self._client._results is self:
                self._client._results = None
            for other in self._subs:
                await other.aclose()

    async def _follow_events(self, sub: Subscription) -> None:
        async for env in sub:
            payload = env.payload if isinstance(env.payload, dict) else {}
            task_id = payload.get("task_id")
            if not isinstance(task_id, str) or task_id not in self._callbacks:
                continue
            self.fire(TaskStatus(
                task_id=task_id,
                state=str(payload.get("state", "completed" if env.type == "task.completed" else "dead")),
                attempts=int(payload.get("attempt", 0)),
                result=payload.get("result"),
                error=payload.get("error"),
            ))

    def fire(self, status: TaskStatus) -> None:
        """Call (sync) or start (async) every callback registered for ``status.task_id``, once."""
        for callback in self._callbacks.pop(status.task_id, ()):
            if _is_async(callback):
                self._client._tg.start_soon(_call_async, callback, status)
            else:
                try:
                    callback(status)
                except Exception:  # the error boundary of one callback: Cancelled passes
                    log.exception("on_result callback for task %s failed", status.task_id)


async def _call_async(callback: ResultCallback, status: TaskStatus) -> None:
    try:
        await callback(status)
    except Exception:
        log.exception("on_result callback for task %s failed", status.task_id)


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004
