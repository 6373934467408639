"""The composition root: ``run_daemon`` builds the nursery tree of DESIGN §3.

Services start downstream-first — the store before anything that writes to
it, the router before anything that subscribes — each with ``nursery.start``,
so when ``run_daemon`` reports started, every listener is bound and serving.

Stopping is a drain, not a kill: the first SIGTERM/SIGINT (or ``aivad drain``)
stops intake, closes WebSocket connections with 1001, lets the store commit
what it has queued, then cancels the root — all within ``shutdown.grace_s``.
A second signal cancels at once.
"""

from __future__ import annotations

import logging
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import __version__, control
from .aggregator import Aggregator, serve_aggregator
from .alerts import Alerts, serve_system_events
from .amqp import AmqpBridge, serve_amqp
from .auth import TokenVerifier
from .boundary import Faults, describe
from .cluster import ClusterLog, serve_cluster_log
from .cluster_tasks import serve_cluster_dispatcher
from .config import Config, ConfigError, load_config
from .dispatcher import Dispatcher, TaskView, serve_dispatcher
from .http import Api, serve_http
from .journal import Journal, serve_journal
from .logs import set_level
from .metrics import LoopLag, MetricsRenderer, serve_loop_lag
from .ops import DeadLetterBook, Intake, Operations
from .protocol import OpError
from .redis import RedisDeadLetters
from .redis_ingest import RedisIngest, serve_redis_ingest
from .router import Router
from .sdnotify import Notifier, serve_watchdog
from .stats import Ingest
from .store import Store, serve_store
from .task_retention import serve_task_retention
from .websocket import WebSocketService, serve_websocket, tls_context

__all__ = ["Daemon", "Endpoints", "ReloadOutcome", "run_daemon"]

log = logging.getLogger(__name__)

#: config keys applied without a restart (section → keys); everything else needs one
LIVE_KEYS: dict[str, frozenset[str]] = {
    "websocket": frozenset(
        {"max_frame_bytes", "send_buffer_frames", "send_buffer_bytes", "max_subscriptions", "max_inflight_publishes",
         "max_connections", "max_connections_per_address", "max_handshakes", "replay_batch",
         "handshake_timeout_s", "close_timeout_s", "message_timeout_s", "write_timeout_s"}
    ),
    "log": frozenset({"level"}),
    "shutdown": frozenset({"grace_s"}),
    "store": frozenset({"retention_max_messages", "retention_max_age_s", "retention_interval_s", "dead_letters_kept"}),
    "system": frozenset({"alert_interval_s"}),
    "tasks": frozenset({"default_strategy", "strategies", "aging_s"}),
    "amqp": frozenset({"prefetch"}),
    "limits": frozenset(
        {"publish_rate_per_s", "publish_burst", "dispatch_rate_per_s", "dispatch_burst", "history_page_bytes"}
    ),
}


@attrs.frozen
class Endpoints:
    """Where a started daemon can be reached."""

    ws_port: int
    control_path: str
    http_port: int | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/"


@attrs.frozen
class ReloadOutcome:
    applied: list[str]
    needs_restart: list[str]
    error: str | None = None


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    changed = []
    for field in attrs.fields(type(old)):
        a, b = getattr(old, field.name), getattr(new, field.name)
        key = f"{prefix}{field.name}"
        if attrs.has(type(a)):
            changed += _changed_keys(a, b, key + ".")
        elif a != b:
            changed.append(key)
    return changed


class Daemon:
    """The running services, as the control commands and the signal handler see them."""

    def __init__(self, cfg: Config, config_path: str | None, notifier: Notifier) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.notifier = notifier
        self.started_at = time.time()
        self.ingest = Ingest()
        self.faults = Faults()
        self.alerts = Alerts(cfg.system)
        self.faults.on_fault(
            lambda kind, what, exc: self.alerts.alert("error", "unit_failed", f"{kind} ({what}): {describe(exc)}")
        )
        self.store: Store
        #: where messages live: the embedded store, or the cluster's Redis log ([redis] enabled)
        self.messages: Store | ClusterLog
        self.cluster: ClusterLog | None = None
        #: forwards this node's own commits (task.*, group.*, system.*, AMQP ingest) into the cluster log
        self.journal: Journal | None = None
        self.redis_ingest: RedisIngest | None = None
        self.api: Api | None = None
        self.router: Router
        self.websocket: WebSocketService
        self.dispatcher: Dispatcher
        self.aggregator: Aggregator
        self.control: control.ControlService
        self.ops: Operations
        self.amqp: AmqpBridge | None = None
        self.loop_lag = LoopLag()
        self.drain_requested = trio.Event()
        self.intake = Intake()
        self._reload_lock = trio.Lock()

    def uptime_s(self) -> float:
        return time.time() - self.started_at

    def readiness(self) -> list[str]:
        """Why the daemon is not ready (empty: ready) — ``/readyz``."""
        reasons = []
        if not self.intake.open:
            reasons.append("draining")
        if self.store.failure is not None:
            reasons.append(f"store: commits fail ({self.store.failure})")
        if self.cluster is not None and self.cluster.failure is not None:
            reasons.append(f"redis: {self.cluster.failure}")
        if self.amqp is not None:
            amqp = self.amqp.statistics()
            for queue, consuming in amqp.consuming.items():
                if not consuming:
                    reasons.append(f"amqp: enabled but not consuming {queue} ({amqp.last_error or 'connecting'})")
        return reasons

    def task_counts(self) -> dict[str, int]:
        return self.dispatcher.statistics().tasks_by_state

    def extra_metrics(self) -> list[Any]:
        return self._amqp_metrics() + self._cluster_metrics() + self._api_metrics()

    def _api_metrics(self) -> list[Any]:
        if self.api is None:
            return []
        errors = CounterMetricFamily("aivad_http_api_errors", "HTTP API error replies, by code.", labels=["code"])
        for code, n in sorted(self.api.errors.items()):
            errors.add_metric([code], n)
        gate = self.api.gate.statistics()
        refused = CounterMetricFamily("aivad_http_connections_refused",
                                      "HTTP connections refused before a byte was read, by why.", labels=["reason"])
        for reason, n in sorted(gate.refused.items()):
            refused.add_metric([reason], n)
        open_ = GaugeMetricFamily("aivad_http_connections", "Open HTTP connections.", value=gate.connections)
        return [errors, refused, open_]

    def _cluster_metrics(self) -> list[Any]:
        """This node's view of the cluster (every node serves its own /metrics: scrape them all)."""
        if self.cluster is None or self.journal is None:
            return []
        cluster, journal = self.cluster.statistics(), self.journal.statistics()
        metrics: list[Any] = [
            GaugeMetricFamily("aivad_cluster_nodes", "Live nodes of the cluster, as this node sees them.",
                              value=len(cluster.nodes)),
            GaugeMetricFamily("aivad_cluster_redis_up", "1 while Redis answers this node.",
                              value=int(cluster.failure is None)),
            GaugeMetricFamily("aivad_cluster_last_seq", "The newest seq of the cluster log this node has read.",
                              value=cluster.last_seq),
            GaugeMetricFamily("aivad_cluster_journal_behind", "Local commits not yet forwarded into the cluster log.",
                              value=journal["behind"]),
            CounterMetricFamily("aivad_cluster_overloaded", "Publishes refused: [redis] max_pending already waiting.",
                                value=cluster.overloaded),
        ]
        if self.redis_ingest is not None and self.redis_ingest.stream is not None:
            stream = self.redis_ingest.stream.statistics()
            metrics.append(CounterMetricFamily("aivad_redis_ingress_dead_letters",
                                               "Ingest stream entries dead-lettered (bad entries).",
                                               value=self.redis_ingest.dead_lettered))
            metrics.append(CounterMetricFamily("aivad_redis_ingress_claimed",
                                               "Ingest stream entries taken over from another consumer.",
                                               value=stream.claimed))
        return metrics

    def _amqp_metrics(self) -> list[Any]:
        if self.amqp is None:
            return []
        amqp = self.amqp.statistics()
        consuming = GaugeMetricFamily("aivad_amqp_consuming", "1 while deliveries of the queue can arrive.",
                                      labels=["queue"])
        for queue, on in sorted(amqp.consuming.items()):
            consuming.add_metric([queue], int(on))
        return [
            consuming,
            GaugeMetricFamily("aivad_amqp_connected", "1 while connected to RabbitMQ.", value=int(amqp.connected)),
            CounterMetricFamily("aivad_amqp_reconnects", "Connections to RabbitMQ made again.", value=amqp.reconnects),
            GaugeMetricFamily("aivad_amqp_outbox", "Publishes waiting for the broker.", value=amqp.outbox_depth),
            CounterMetricFamily("aivad_amqp_outbox_dropped", "Publishes dropped: outbox full.",
                                value=amqp.outbox_dropped),
        ]

    def request_drain(self, why: str) -> None:
        if not self.drain_requested.is_set():
            log.info("drain requested (%s)", why)
            self.drain_requested.set()

    async def reload_command(self) -> dict[str, Any]:
        """The ``reload`` command's answer; a refused config is ``bad_request`` (``aivad reload`` exits 1)."""
        outcome = await self.reload()
        if outcome.error is not None:
            raise OpError("bad_request", f"config refused, the old one stays: {outcome.error}")
        return {"applied": outcome.applied, "needs_restart": outcome.needs_restart}

    async def reload(self) -> ReloadOutcome:
        """Re-read the config; apply what can change live; refuse a broken one."""
        async with self._reload_lock:
            self.notifier.reloading()
            try:
                outcome = self._reload()
                if self.amqp is not None and "amqp.prefetch" in outcome.applied:
                    await self.amqp.set_prefetch(self.cfg.amqp.prefetch)
                return outcome
            finally:
                self.notifier.ready(self.summary())

    def _reload(self) -> ReloadOutcome:
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return ReloadOutcome([], [], str(exc))
        changed = _changed_keys(self.cfg, new)
        applied = [k for k in changed if k.partition(".")[2] in LIVE_KEYS.get(k.partition(".")[0], ())]
        needs_restart = [k for k in changed if k not in applied]
        self.cfg = attrs.evolve(self.cfg, **{
            section: attrs.evolve(getattr(self.cfg, section), **{k: getattr(getattr(new, section), k) for k in keys})
            for section, keys in LIVE_KEYS.items()
        })
        self.websocket.reconfigure(self.cfg.websocket)
        self.ops.reconfigure(self.cfg.limits, self.cfg.tasks)
        self.dispatcher.cfg = self.aggregator.cfg = self.cfg.tasks
        self.store.reconfigure(self.cfg.store)
        if self.cluster is not None:
            self.cluster.reconfigure(self.cfg.store)
        set_level(self.cfg.log.level)
        self.alerts.reconfigure(self.cfg.system)
        if needs_restart:
            log.warning("reload: these keys change only after a restart: %s", ", ".join(needs_restart))
        log.info("reload applied: %s", ", ".join(applied) or "nothing changed")
        return ReloadOutcome(applied, needs_restart)

    def store_alert(self, why: str | None) -> None:
        if why is None:
            self.alerts.alert("info", "store_recovered", "the store commits again")
        else:
            self.alerts.alert("error", "store_failed", f"the store cannot commit: {why}")

    def redis_alert(self, why: str | None) -> None:
        if why is None:
            self.alerts.alert("info", "redis_back", "Redis is reachable again")
        else:
            self.alerts.alert("error", "redis_lost", f"Redis: {why}")

    def journal_gap(self, why: str) -> None:
        self.alerts.alert("error", "journal_gap", why)

    def node_info(self) -> dict[str, Any]:
        """What this node's heartbeat says of it (``status`` → ``cluster.nodes``)."""
        ws = self.websocket.statistics() if hasattr(self, "websocket") else None
        return {"connections": ws.connections if ws else 0, "subscriptions": ws.subscriptions if ws else 0,
                "workers": len(self.dispatcher.workers) if hasattr(self, "dispatcher") else 0,
                # other nodes put these on their affinity rings: one key, one worker of the cluster
                "affinity": self.dispatcher.affinity_workers() if hasattr(self, "dispatcher") else {}}

    def dead_letter_alert(self, view: TaskView) -> None:
        if view.state == "dead":
            self.alerts.alert(
                "warning", "dead_letter", f"task {view.task_id} ({view.type[:100]}) dead after {view.attempts} attempts"
            )

    def health_summary(self) -> dict[str, Any]:
        """The payload of ``system.health_check``: a short form of ``status``."""
        ws = self.websocket.statistics()
        store = self.store.statistics()
        ingest = self.ingest.statistics()
        tasks = self.dispatcher.statistics()
        summary: dict[str, Any] = {
            "uptime_s": round(self.uptime_s(), 1),
            "ready": not self.readiness(),
            "not_ready_because": self.readiness(),
            "connections": ws.connections,
            "subscriptions": ws.subscriptions,
            "rate_10s": round(ingest.rate_10s, 2),
            "rate_60s": round(ingest.rate_60s, 2),
            "last_seq": self.messages.last_seq,
            "store_write_queue": store.write_queue_depth,
            "tasks_queued": tasks.tasks_by_state.get("queued", 0),
            "tasks_running": tasks.tasks_by_state.get("running", 0) + tasks.tasks_by_state.get("dispatched", 0),
            "workers": tasks.workers,
            "faults": sum(self.faults.statistics().by_kind.values()),
        }
        if self.amqp is not None:
            amqp = self.amqp.statistics()
            summary["amqp"] = {"connected": amqp.connected, "consuming": amqp.consuming, "outbox": amqp.outbox_depth}
        return summary

    def summary(self) -> str:
        ws = self.websocket.statistics()
        rate = self.ingest.statistics().rate_10s
        queued = self.task_counts().get("queued", 0)
        return (f"{ws.connections} connections, {ws.subscriptions} subscriptions, {rate:.0f} msgs/s, "
                f"{queued} tasks queued, last seq {self.messages.last_seq}")

    def status(self) -> dict[str, Any]:
        """The ``status`` command's answer: a snapshot of every service."""
        store = self.store.statistics()
        ws = self.websocket.statistics()
        router = self.router.statistics()
        ingest = self.ingest.statistics()
        return {
            "version": __version__,
            "uptime_s": round(self.uptime_s(), 3),
            "ready": not self.readiness(),
            "not_ready_because": self.readiness(),
            "draining": not self.intake.open,
            "websocket": {"port": self.websocket.port, **attrs.asdict(ws)},
            "control": {"socket": str(Path(self.cfg.control.socket).resolve()), "sessions": self.control.sessions},
            "store": {"path": str(Path(self.cfg.store.path).resolve()),
                      **attrs.asdict(store, filter=lambda a, _: a.name != "commit_seconds_buckets")},
            **({"cluster": {**attrs.asdict(self.cluster.statistics()), "journal": self.journal.statistics()}}
               if self.cluster is not None and self.journal is not None else {}),
            **({"redis_ingress": self.redis_ingest.statistics()} if self.redis_ingest is not None else {}),
            **({"http": attrs.asdict(self.api.gate.statistics())} if self.api is not None else {}),
            "router": attrs.asdict(router),
            "tasks": attrs.asdict(self.dispatcher.statistics()),
            "amqp": attrs.asdict(self.amqp.statistics()) if self.amqp else {"enabled": False},
            "ingest": {
                "by_ingress": ingest.by_ingress,
                "rate_10s": round(ingest.rate_10s, 2),
                "rate_60s": round(ingest.rate_60s, 2),
            },
        }

    async def drain(self, root: trio.CancelScope) -> None:
        """Stop intake, close clients with 1001, commit what is queued, then stop."""
        self.intake.open = False
        self.notifier.stopping("draining")
        root.deadline = min(root.deadline, trio.current_time() + self.cfg.shutdown.grace_s)
        self.control.drain()
        await self.dispatcher.drain(self.cfg.shutdown.grace_s / 2)
        await self.websocket.drain()
        if self.amqp is not None:
            await self.amqp.stop_consuming()
        if self.cluster is not None:
            await self.cluster.drain()
        await self.store.drain()
        log.info("drained; stopping")
        root.cancel()


async def _serve_status(daemon: Daemon, interval_s: float = 10.0, *, task_status: trio.TaskStatus[None]) -> None:
    """Keep systemd's STATUS= line current (``systemctl status aivad`` shows it)."""
    task_status.started()
    if not daemon.notifier.enabled:
        return
    while True:
        await trio.sleep(interval_s)
        daemon.notifier.status(daemon.summary())


async def _watch_signals(daemon: Daemon, root: trio.CancelScope, *, task_status: trio.TaskStatus[None]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:
                await daemon.reload()
            elif daemon.drain_requested.is_set():
                log.warning("second %s: stopping now", signal.Signals(signum).name)
                root.cancel()
            else:
                daemon.request_drain(signal.Signals(signum).name)


async def run_daemon(
    cfg: Config,
    *,
    config_path: str | None = None,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[Endpoints] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run every service until drained or cancelled.

    ``handle_signals=False`` is for running several daemons in one process (tests).
    Returns after a drain; raises if a service crashed (systemd restarts us).
    """
    notifier = Notifier.from_environ() if handle_signals else Notifier.from_environ({})
    # key files are read once, here, before any service starts: a bad one is a ConfigError (exit 2)
    verifier = TokenVerifier(cfg.auth) if cfg.auth.hmac_secret_file or cfg.auth.public_key_file else None
    if cfg.http.enabled and cfg.http.tls_cert_file:  # hypercorn loads it itself, later: try it now
        tls_context(cfg.http.tls_cert_file, cfg.http.tls_key_file, "http")
    daemon = Daemon(cfg, config_path, notifier)
    async with trio.open_nursery() as root:
        # first: keeps pinging systemd while the store opens in its thread
        await root.start(serve_watchdog, notifier)
        if handle_signals:
            await root.start(_watch_signals, daemon, root.cancel_scope)
        daemon.store = await root.start(serve_store, cfg.store)
        daemon.store.on_failure(daemon.store_alert)
        daemon.messages = daemon.store
        if cfg.redis.enabled:  # the history is the cluster's (DESIGN §5): a node is ready once it has it
            daemon.cluster = daemon.messages = await root.start(
                serve_cluster_log, cfg.redis, cfg.cluster, cfg.store, daemon.node_info
            )
            daemon.cluster.on_failure(daemon.redis_alert)
            daemon.cluster.on_name_taken(lambda why: daemon.alerts.alert("error", "node_name_taken", why))
        daemon.router = Router(daemon.messages, cfg.websocket.replay_batch)
        if daemon.cluster is not None:
            daemon.cluster.on_reset(daemon.router.overtake_all)
            daemon.journal = await root.start(serve_journal, daemon.store, daemon.cluster, daemon.journal_gap)
        letters: DeadLetterBook = daemon.store
        if daemon.cluster is not None:  # tasks and dead letters are the cluster's, in Redis (DESIGN §5)
            letters = RedisDeadLetters(daemon.cluster.redis, lambda: daemon.store.dead_letters_kept)
            daemon.dispatcher = await root.start(partial(serve_cluster_dispatcher, cfg.tasks, daemon.store,
                                                         daemon.cluster, cfg.cluster.heartbeat_interval_s,
                                                         daemon.faults, copy_events=cfg.amqp.enabled))
        else:
            daemon.dispatcher = await root.start(serve_dispatcher, cfg.tasks, daemon.store, daemon.faults)
            await root.start(serve_task_retention, daemon.store, daemon.dispatcher.on_end, cfg.tasks.ended_kept)
        daemon.aggregator = await root.start(
            serve_aggregator, cfg.tasks, daemon.dispatcher, daemon.store, daemon.faults
        )
        daemon.dispatcher.on_end.append(daemon.dead_letter_alert)
        # in a cluster an AMQP ack waits until the delivery is in the cluster log, not only in the journal
        settled = daemon.journal.forwarded_through if daemon.journal is not None else None
        if cfg.amqp.enabled:  # started() at once: readiness of the embedded path does not wait on the broker
            daemon.amqp = await root.start(partial(serve_amqp, cfg.amqp, daemon.store, ingest=daemon.ingest,
                                                   dispatcher=daemon.dispatcher, faults=daemon.faults,
                                                   alert=daemon.alerts.alert,
                                                   settled=settled, letters=letters))
            daemon.store.on_commit(daemon.amqp.forward_committed)  # task.*, group.*, system.* → events exchange
        daemon.ops = Operations(
            store=daemon.store,
            messages=daemon.messages,
            router=daemon.router,
            dispatcher=daemon.dispatcher,
            aggregator=daemon.aggregator,
            ingest=daemon.ingest,
            intake=daemon.intake,
            limits=cfg.limits,
            tasks=cfg.tasks,
            status=daemon.status,
            drain=daemon.request_drain,
            reload=daemon.reload_command,
            auth=cfg.auth,
            verifier=verifier,
            dead_letters=letters,
        )
        slow_consumer = daemon.alerts.listener("warning", "slow_consumer")
        if daemon.cluster is not None and (cfg.redis.ingest_stream or cfg.redis.ingest_channels):
            daemon.redis_ingest = await root.start(serve_redis_ingest, cfg.redis, daemon.cluster.redis, daemon.ops,
                                                   cfg.cluster.node_name, daemon.faults)
        daemon.websocket = await root.start(serve_websocket, cfg.websocket, daemon.ops, daemon.faults, slow_consumer)
        daemon.control = await root.start(control.serve_control, cfg.control, daemon.ops, daemon.faults)
        await root.start(serve_loop_lag, daemon.loop_lag)
        await root.start(serve_system_events, cfg.system, daemon.alerts, daemon.store, daemon.health_summary)
        await root.start(_serve_status, daemon)
        http_port = None
        if cfg.http.enabled:
            ws_scheme = "wss" if cfg.websocket.tls_cert_file else "ws"
            api = daemon.api = Api(cfg.http, daemon.ops, lambda: (ws_scheme, daemon.websocket.port))
            http_port = await root.start(partial(serve_http, cfg.http, daemon.readiness, MetricsRenderer(daemon), api,
                                                 faults=daemon.faults))
            daemon.websocket.console = ("https" if cfg.http.tls_cert_file else "http", http_port)
        endpoints = Endpoints(daemon.websocket.port, cfg.control.socket, http_port)
        notifier.ready(daemon.summary())
        log.info("aivad %s ready: ws://%s:%d/, control %s", __version__, cfg.websocket.host,
                 endpoints.ws_port, cfg.control.socket)
        task_status.started(endpoints)
        await daemon.drain_requested.wait()
        await daemon.drain(root.cancel_scope)
