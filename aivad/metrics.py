"""Prometheus text exposition of the daemon's statistics snapshots, and the loop-lag probe.

Nothing here counts: every figure comes from a service's ``statistics()``
snapshot at scrape time, rendered with prometheus-client's metric families into
a registry private to this daemon (several daemons can share a process in tests).
Names marked fixed in DESIGN §4.7 must not change.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["LoopLag", "MetricsRenderer", "serve_loop_lag"]

#: DESIGN task states: every one is reported, zero or not, so dashboards have a series
TASK_STATES = ("queued", "dispatched", "running", "retrying", "completed", "dead")


class LoopLag:
    """How late the trio loop woke a task that asked to sleep: a blocked loop shows here first."""

    def __init__(self) -> None:
        self.last_s = 0.0
        self.max_s = 0.0


async def serve_loop_lag(lag: LoopLag, interval_s: float = 0.5, *, task_status: trio.TaskStatus[None]) -> None:
    task_status.started()
    while True:
        before = trio.current_time()
        await trio.sleep(interval_s)
        lag.last_s = max(0.0, trio.current_time() - before - interval_s)
        lag.max_s = max(lag.max_s, lag.last_s)


class _DaemonCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def collect(self) -> Iterator[Metric]:
        d = self._daemon
        ingest = d.ingest.statistics()
        store = d.store.statistics()
        ws = d.websocket.statistics()
        router = d.router.statistics()

        ingested = CounterMetricFamily("aivad_messages_ingested", "Messages stored, by ingress.", labels=["ingress"])
        for ingress in sorted({"websocket", "control", "amqp", *ingest.by_ingress}):
            ingested.add_metric([ingress], ingest.by_ingress.get(ingress, 0))
        yield ingested
        yield CounterMetricFamily("aivad_deliveries", "Messages handed to subscribers.", value=router.deliveries)
        yield GaugeMetricFamily("aivad_websocket_connections", "Open WebSocket connections.", value=ws.connections)
        yield GaugeMetricFamily("aivad_websocket_subscriptions", "Live subscriptions.", value=router.subscriptions)
        yield CounterMetricFamily(
            "aivad_slow_consumer_closes", "Connections closed with 4008 (slow consumer).", value=ws.slow_consumer_closes
        )
        yield CounterMetricFamily("aivad_websocket_errors_sent", "Error frames sent to clients.", value=ws.errors_sent)
        yield GaugeMetricFamily("aivad_store_messages", "Messages kept in the history.", value=store.stored_messages)
        yield GaugeMetricFamily("aivad_store_last_seq", "Newest committed seq.", value=store.last_seq)
        yield GaugeMetricFamily(
            "aivad_store_write_queue", "Writes waiting for the single writer.", value=store.write_queue_depth
        )
        yield CounterMetricFamily("aivad_store_duplicates", "Publishes answered as duplicates.", value=store.duplicates)
        buckets = [(("+Inf" if le == float("inf") else repr(le)), count) for le, count in store.commit_seconds_buckets]
        yield HistogramMetricFamily(
            "aivad_store_commit_seconds",
            "Duration of one group commit.",
            buckets=buckets,
            sum_value=store.commit_seconds_total,
        )
        tasks = GaugeMetricFamily("aivad_tasks", "Tasks by state.", labels=["state"])
        counts = d.task_counts()
        for state in TASK_STATES:
            tasks.add_metric([state], counts.get(state, 0))
        yield tasks
        dispatcher = d.dispatcher.statistics()
        yield GaugeMetricFamily("aivad_workers", "Connected workers.", value=dispatcher.workers)
        yield from _by_label("aivad_units_failed", "Units of work ended by their error boundary, by kind.", "kind",
                             d.faults.statistics().by_kind)
        alerts = d.alerts.statistics()
        yield from _by_label("aivad_alerts", "system.alert raised, by code (before the rate limit).", "code",
                             alerts.raised)
        yield CounterMetricFamily("aivad_alerts_dropped", "system.alert not stored: queue full or store failing.",
                                  value=alerts.dropped)
        yield from _by_label("aivad_connections_refused", "Connections refused before the handshake, by why.",
                             "reason", ws.refused)
        yield from _by_label("aivad_websocket_closes", "WebSocket connections ended, by close code (1006: no close "
                             "frame; a peer's own 3000-4999 codes: other).", "code", ws.closes)
        ops = d.ops.statistics()
        yield from _by_label("aivad_requests_refused", "Requests refused by a rule of the operations layer, by why.",
                             "reason", ops.refused)
        yield from _by_label("aivad_auth_unauthorized", "Tokens refused, and requests before authentication, by why.",
                             "reason", ops.unauthorized)
        yield from _by_label("aivad_auth_forbidden", "Requests outside the caller's grants, by the right needed.",
                             "right", ops.forbidden)
        yield CounterMetricFamily("aivad_store_failed_commits", "Commits that failed (disk full, I/O error).",
                                  value=store.failed_commits)
        yield CounterMetricFamily("aivad_store_wal_catch_ups", "Pauses of the writer for the WAL's checkpoint to "
                                  "catch up, past [store] wal_max_bytes.", value=store.wal_catch_ups)
        yield CounterMetricFamily("aivad_store_dead_letters_dropped", "The oldest dead letters deleted to keep "
                                  "[store] dead_letters_kept.", value=store.dead_letters_dropped)
        yield CounterMetricFamily("aivad_task_retries", "Attempts that ended in a retry.", value=dispatcher.retries)
        yield CounterMetricFamily("aivad_dead_letters", "Tasks dead-lettered.", value=dispatcher.dead_lettered)
        yield from d.extra_metrics()
        yield GaugeMetricFamily(
            "aivad_event_loop_lag_seconds", "Lateness of the last 0.5 s loop tick.", value=d.loop_lag.last_s
        )
        yield GaugeMetricFamily("aivad_uptime_seconds", "Seconds since start.", value=d.uptime_s())


def _by_label(name: str, documentation: str, label: str, counts: dict[str, int]) -> Iterator[Metric]:
    """A counter family with one series per key of ``counts`` (keys are a small, fixed set)."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, count in sorted(counts.items()):
        family.add_metric([key], count)
    yield family


class MetricsRenderer:
    """``metrics_text()`` for the HTTP service: one private registry per daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_DaemonCollector(daemon))

    def __call__(self) -> bytes:
        return generate_latest(self._registry)
