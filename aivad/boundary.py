"""Error boundaries: a unit of work that fails ends alone (DESIGN §3, "No peer can stop or stall the daemon").

A service starts units of work into its nursery — a WebSocket connection, a
task attempt, a group check, a control session. An exception escaping one of
them would cancel the nursery and, through it, the daemon: one peer's frame
could stop every other peer's notifications. So every such ``start_soon`` goes
through :meth:`Faults.start_soon`, which

* lets ``Cancelled`` through (cancellation is how scopes end; it is not a fault),
* logs anything else once, naming the unit of work it belongs to,
* counts it by the unit's *kind* (a fixed, small set: a metric label), and
* tells the listeners (``system.alert``), then ends only that unit.

What is *not* isolated: the services themselves. A bug in the dispatcher's
pump or the store's writer is a broken invariant of the daemon; it stops the
daemon on purpose, and systemd restarts it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from .exceptions import sole_exception

__all__ = ["FaultStatistics", "Faults", "describe"]

log = logging.getLogger(__name__)

#: called with (kind, what, exception) after a unit of work was ended by its boundary
FaultListener = Callable[[str, str, BaseException], None]


def describe(exc: BaseException, limit: int = 200) -> str:
    """``Type: message`` of the one exception inside ``exc``, cut to ``limit`` characters.

    Peer input can end up in exception messages: never let it grow a log line
    or an alert without bound.
    """
    leaf = sole_exception(exc) or exc
    text = f"{type(leaf).__name__}: {leaf}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


@attrs.frozen
class FaultStatistics:
    #: units of work ended by their error boundary, by kind
    by_kind: dict[str, int]


class Faults:
    """Where a daemon's units of work are isolated and their failures counted."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._listeners: list[FaultListener] = []

    def on_fault(self, listener: FaultListener) -> None:
        """Call ``listener(kind, what, exc)`` for every fault; it must not block or raise."""
        self._listeners.append(listener)

    def record(self, kind: str, what: str, exc: BaseException) -> None:
        """Count and log a fault of ``kind`` in the unit ``what`` (a short description)."""
        self._counts[kind] += 1
        log.error("%s ended by its error boundary (%s): %s", kind, what[:200], describe(exc), exc_info=exc)
        for listener in self._listeners:
            listener(kind, what, exc)

    async def isolated(self, kind: str, what: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``fn(*args)``; an exception other than cancellation ends it and is recorded.

        ``except*`` splits a group: a unit whose own nursery raised an error
        together with ``Cancelled`` records the error and lets the cancellation on.
        """
        try:
            await fn(*args)
        except* Exception as group:  # noqa: BLE001 - this is the boundary: recorded, then ended
            self.record(kind, what, group)

    def start_soon(
        self, nursery: trio.Nursery, kind: str, what: str, fn: Callable[..., Awaitable[Any]], *args: Any
    ) -> None:
        """``nursery.start_soon(fn, *args)`` behind an error boundary of ``kind``."""
        nursery.start_soon(self.isolated, kind, what, fn, *args, name=f"{kind} {what[:60]}")

    def statistics(self) -> FaultStatistics:
        return FaultStatistics(dict(self._counts))
