"""Real RabbitMQ and Redis for tests and benchmarks, started without systemd.

Both run on loopback, on free ports, in a private temporary directory, and are
stopped by TERM to the PID recorded at start — never by name, so they can run
beside another broker (a developer's, CI's) without touching it.

Installs the Debian packages when the servers are missing (we run as root).
The facts behind the RabbitMQ recipe (private HOME for the Erlang cookie,
``NAME@localhost``, an own epmd, loopback-only distribution, calling
``/usr/lib/rabbitmq/bin/rabbitmqctl`` directly) are in
``shared/notes/measured-here.md``.

Synchronous on purpose: pytest fixtures, ``bench/`` scripts and
``python -m tests.brokers`` (start both, print URLs, wait for Ctrl-C) all use it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aivad.config import AmqpConfig

__all__ = [
    "RabbitMQ",
    "Redis",
    "ensure_installed",
    "free_port",
    "start_rabbitmq",
    "start_redis",
]

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_ports(n: int) -> list[int]:
    # Hold them all open together so the n ports are distinct.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def ensure_installed() -> None:
    """Install rabbitmq-server and redis-server from Debian's packages when missing."""
    if (RABBIT_BIN / "rabbitmq-server").exists() and shutil.which("redis-server") and shutil.which("epmd"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "rabbitmq-server", "redis-server"],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def _stop_pid(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> None:
    """TERM the process we started, wait; KILL its own process group if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group we created with start_new_session
        proc.wait(5)


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not listening on 127.0.0.1:{port} after {timeout:.0f}s")


class RabbitMQ:
    """A RabbitMQ node of our own: ``url``, ``port``, ``stop()``, ``restart()``, ``ctl()``.

    Resource handling: everything lives under ``base`` (a temp dir removed by
    ``stop(remove=True)``); two PIDs are ours, epmd's and the server's.
    """

    def __init__(self, base: Path | None = None, name: str = "aivadtest") -> None:
        self.base = Path(base) if base else Path(tempfile.mkdtemp(prefix="aivad-rabbit-"))
        self.name = name
        self.nodename = f"{name}@localhost"
        self.port, self.epmd_port, self.dist_port = _free_ports(3)
        self.home = self.base / "home"
        self._server: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self._write_files()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def pid(self) -> int | None:
        return self._server.pid if self._server else None

    def _write_files(self) -> None:
        for sub in ("home", "mnesia", "log", "etc"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "etc" / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            "log.console = false\n"
            "log.file.level = warning\n"
            # Tests fill queues; the default 50 MB disk alarm would block publishers on small disks.
            "disk_free_limit.absolute = 1MB\n"
        )
        (self.base / "etc" / "enabled_plugins").write_text("[].\n")
        (self.base / "etc" / "rabbitmq-env.conf").write_text("")

    def env(self) -> dict[str, str]:
        """The environment for rabbitmq-server and rabbitmqctl: private, loopback only."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.home),
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_EPMD_PORT=str(self.epmd_port),
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CONFIG_FILE=str(self.base / "etc" / "rabbitmq"),
            RABBITMQ_MNESIA_BASE=str(self.base / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base / "etc" / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(self.base / "etc" / "rabbitmq-env.conf"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> RabbitMQ:
        """Start epmd (once) and the node; return when AMQP is accepted."""
        env = self.env()
        if self._epmd is None or self._epmd.poll() is not None:
            self._epmd = subprocess.Popen(
                ["epmd", "-address", "127.0.0.1", "-port", str(self.epmd_port)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        out = open(self.base / "log" / "server.out", "ab")  # noqa: SIM115 - owned by the child
        try:
            self._server = subprocess.Popen(
                [str(RABBIT_BIN / "rabbitmq-server")],
                env=env,
                cwd=self.base,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            out.close()
        try:
            self._await_startup(timeout)
            _wait_port(self.port, self._server, timeout, "rabbitmq-server")
        except BaseException:
            self.stop(remove=False)
            raise
        return self

    def _await_startup(self, timeout: float) -> None:
        # await_startup fails at once while the node has not yet registered with epmd: retry.
        assert self._server is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                self.ctl("await_startup", "--timeout", str(max(1, int(left))), timeout=left + 10)
                return
            except RuntimeError:
                if self._server.poll() is not None:
                    raise RuntimeError(
                        f"rabbitmq-server exited with {self._server.returncode}{self.log_tail()}"
                    ) from None
                if time.monotonic() + 0.3 > deadline:
                    raise
                time.sleep(0.3)

    def ctl(self, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        """Run ``rabbitmqctl ARGS`` against this node; returns stdout."""
        res = subprocess.run(
            [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.nodename, *args],
            env=self.env(),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if check and res.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} exited {res.returncode}: "
                f"{res.stderr.decode(errors='replace')[-2000:]}{self.log_tail()}"
            )
        return res.stdout.decode(errors="replace")

    def queue_counts(self) -> dict[str, tuple[int, int]]:
        """``{queue: (ready, unacknowledged)}`` from rabbitmqctl."""
        out = self.ctl("list_queues", "-q", "--no-table-headers", "name", "messages_ready",
                       "messages_unacknowledged")
        counts = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3:
                counts[parts[0]] = (int(parts[1]), int(parts[2]))
        return counts

    def log_tail(self, n: int = 2000) -> str:
        path = self.base / "log" / "server.out"
        try:
            return "\n--- server.out ---\n" + path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop_server(self) -> None:
        """Stop the node only (epmd stays, so a restart keeps the same ports)."""
        if self._server is not None:
            _stop_pid(self._server)
            self._server = None

    def restart(self, down_s: float = 0.0) -> None:
        """Stop and start on the same port and data dir (durable queues survive)."""
        self.stop_server()
        if down_s:
            time.sleep(down_s)
        self.start()

    def stop(self, remove: bool = True) -> None:
        self.stop_server()
        if self._epmd is not None:
            _stop_pid(self._epmd, 5)
            self._epmd = None
        if remove:
            shutil.rmtree(self.base, ignore_errors=True)


class Redis:
    """A redis-server of our own: ``url``, ``port``, ``stop()``, ``stop_server()``, ``restart()``.

    ``appendonly=True`` keeps the data across ``restart()`` (an AOF in ``base``,
    fsync as ``appendfsync`` says); without it a restart loses everything, as a
    Redis without persistence does.
    """

    def __init__(self, base: Path | None = None, *, appendonly: bool = False, appendfsync: str = "everysec") -> None:
        self.base = Path(base) if base else Path(tempfile.mkdtemp(prefix="aivad-redis-"))
        self.port = free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = 10.0) -> Redis:
        out = open(self.base / "redis.out", "ab")  # noqa: SIM115 - owned by the child
        try:
            self._proc = subprocess.Popen(
                ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                 "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", self.appendfsync,
                 "--daemonize", "no", "--dir", str(self.base)],
                cwd=self.base,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            out.close()
        try:
            _wait_port(self.port, self._proc, timeout, "redis-server")
            deadline = time.monotonic() + timeout
            while True:
                res = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True, check=False)
                if res.stdout.strip() == b"PONG":
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis-server does not answer PING: {res.stdout.strip()!r}")
                time.sleep(0.05)
        except BaseException:
            self.stop_server()  # keep base: a failed restart must not delete the data
            raise
        return self

    def stop_server(self) -> None:
        """Stop the server only (SIGTERM: with appendonly the AOF is flushed); ``base`` stays."""
        if self._proc is not None:
            _stop_pid(self._proc, 10)
            self._proc = None

    def flushall(self) -> None:
        """Lose everything (as a Redis without persistence does when it restarts)."""
        subprocess.run(["redis-cli", "-p", str(self.port), "flushall"], check=True, capture_output=True, timeout=10)

    def restart(self, down_s: float = 0.0) -> None:
        """Stop and start again on the same port and data directory."""
        self.stop_server()
        if down_s:
            time.sleep(down_s)
        self.start()

    def stop(self, remove: bool = True) -> None:
        self.stop_server()
        if remove:
            shutil.rmtree(self.base, ignore_errors=True)


def declare_events_topology(url: str, cfg: AmqpConfig) -> None:
    """Declare the events exchange, queue and dead-letter exchange as the bridge does (with
    pika, a client sharing no code with aivad), so the queue can be filled before it starts."""
    import pika  # type: ignore[import-untyped]  # a test/bench dependency, not the daemon's

    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.exchange_declare(cfg.events_exchange, "topic", durable=True)
        ch.exchange_declare(cfg.dead_letter_exchange, "fanout", durable=True)
        ch.queue_declare(cfg.events_queue, durable=True,
                         arguments={"x-dead-letter-exchange": cfg.dead_letter_exchange})
        ch.queue_bind(cfg.events_queue, cfg.events_exchange, cfg.events_binding_key)
    finally:
        conn.close()


def start_rabbitmq() -> RabbitMQ:
    """Install if needed, start a private node, return it (call ``.stop()``)."""
    ensure_installed()
    return RabbitMQ().start()


def start_redis() -> Redis:
    """Install if needed, start a private redis-server, return it (call ``.stop()``)."""
    ensure_installed()
    return Redis().start()


def main() -> None:
    """``python -m tests.brokers [install]``.

    ``install``: install the Debian packages if missing, then exit (for CI, before
    the test run). Without it: start both servers, print their URLs, and stop them
    by PID on Ctrl-C or SIGTERM.
    """
    if sys.argv[1:] == ["install"]:
        ensure_installed()
        return
    rabbit = start_rabbitmq()
    redis = start_redis()
    print(f"AIVAD_TEST_AMQP_URL={rabbit.url}\nAIVAD_TEST_REDIS_URL={redis.url}", flush=True)
    try:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        redis.stop()
        rabbit.stop()


if __name__ == "__main__":
    main()
