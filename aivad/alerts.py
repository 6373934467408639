"""The daemon's own system events (DESIGN §2): ``system.health_check`` and ``system.alert``.

An operator subscribed to ``system.#`` — or a pager fed from the AMQP events
exchange, where the daemon forwards its own ``system.*`` messages — learns of
trouble without reading logs:

* ``system.health_check`` every ``[system] health_interval_s`` seconds, with the
  status summary (uptime, connections, rates, queue depths, engines' state);
* ``system.alert`` ``{"level", "code", "message"}`` whenever the daemon handles a
  fault: a unit of work ended by its error boundary, a store that fails or works
  again, a broker lost or back, a slow consumer closed, a dead letter.

Raising an alert is synchronous and never blocks or fails: the fault handlers
call it from anywhere. Alerts are rate-limited per code (at most one each
``alert_interval_s``; the next one says how many were held back) and wait in a
bounded queue. When the store cannot take them — a failing store is one of the
faults worth telling — the batch in hand is tried again every second until the
store works again (so ``store_failed`` arrives, followed by ``store_recovered``);
meanwhile the queue fills and what no longer fits is dropped and counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal, NoReturn

import attrs
import trio

from .config import SystemConfig
from .envelope import Envelope
from .protocol import OpError
from .store import Store, StoreClosed

__all__ = ["AlertStatistics", "Alerts", "Level", "serve_system_events"]

log = logging.getLogger(__name__)

Level = Literal["info", "warning", "error"]

#: how long an alert's message may be (peer input can end up in it)
MAX_ALERT_MESSAGE = 500


@attrs.frozen
class AlertStatistics:
    raised: dict[str, int]
    suppressed: int
    dropped: int


class Alerts:
    """Where the fault handlers report; :func:`serve_system_events` stores what passes the rate limit."""

    def __init__(self, cfg: SystemConfig) -> None:
        self._cfg = cfg
        self._send, self.receive = trio.open_memory_channel[Envelope](cfg.alert_queue)
        self._last_sent: dict[str, float] = {}
        self._held_back: Counter[str] = Counter()
        self._raised: Counter[str] = Counter()
        self._suppressed = 0
        self._dropped = 0

    def reconfigure(self, cfg: SystemConfig) -> None:
        """A reload: the rate limit changes at once (the queue keeps its size)."""
        self._cfg = cfg

    def alert(self, level: Level, code: str, message: str) -> None:
        """Report a handled fault. Never blocks, never raises."""
        self._raised[code] += 1
        now = trio.current_time()
        last = self._last_sent.get(code)
        if last is not None and now - last < self._cfg.alert_interval_s:
            self._held_back[code] += 1
            self._suppressed += 1
            return
        self._last_sent[code] = now
        payload: dict[str, Any] = {"level": level, "code": code, "message": message[:MAX_ALERT_MESSAGE]}
        held_back = self._held_back.pop(code, 0)
        if held_back:
            payload["suppressed"] = held_back  # alerts of this code held back since the last one
        env = Envelope.from_fields("system.alert", payload, {"source": "aivad"})
        try:
            self._send.send_nowait(env)
        except trio.WouldBlock:
            self._dropped += 1

    def listener(self, level: Level, code: str) -> Callable[[str], None]:
        """``alert`` with ``level`` and ``code`` fixed: a callback for a service that reports one kind of fault."""
        return lambda message: self.alert(level, code, message)

    def statistics(self) -> AlertStatistics:
        return AlertStatistics(dict(self._raised), self._suppressed, self._dropped)


async def serve_system_events(
    cfg: SystemConfig,
    alerts: Alerts,
    store: Store,
    summary: Callable[[], dict[str, Any]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Store ``system.alert`` events as they come, and ``system.health_check`` every interval.

    Returns: never. Error handling: an event the store cannot take (failing or
    draining) is dropped and counted; the loops go on.
    """
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_store_alerts, alerts, store)
        nursery.start_soon(_health_checks, cfg, store, summary)
        task_status.started()
        await trio.sleep_forever()
    raise AssertionError("unreachable")


#: how long the alert writer waits before trying a batch again while the store fails
_RETRY_S = 1.0


async def _store_alerts(alerts: Alerts, store: Store) -> NoReturn:
    while True:
        env = await alerts.receive.receive()
        batch = [env]
        while True:
            try:
                batch.append(alerts.receive.receive_nowait())
            except trio.WouldBlock:
                break
        while not await _append(store, batch):
            if store.failure is None:  # draining, not failing: these will not be stored
                alerts._dropped += len(batch)
                break
            await trio.sleep(_RETRY_S)


async def _health_checks(cfg: SystemConfig, store: Store, summary: Callable[[], dict[str, Any]]) -> NoReturn:
    while True:
        await trio.sleep(cfg.health_interval_s)
        await _append(store, [Envelope.from_fields("system.health_check", summary(), {"source": "aivad"})])


async def _append(store: Store, envelopes: list[Envelope]) -> bool:
    """Store the daemon's own events; False when the store could not (it says why elsewhere)."""
    try:
        await store.append_many(envelopes)
    except (StoreClosed, OpError) as exc:
        log.debug("system events not stored: %s", exc)
        return False
    return True
