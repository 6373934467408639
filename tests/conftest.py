"""Test policy for aivad.

- Real parts, no mocks: the daemon under test is the real one — in process
  (``daemon`` fixture: ``run_daemon`` in the test's nursery, fast) or as a real
  ``aivad serve`` subprocess (``daemon_proc``: for signals, exit codes, kill -9).
  RabbitMQ and Redis are real servers started by the test run on loopback
  (``tests/broker_fixtures.py``), never mocks.
- Every daemon gets its own free ports and its own temp dir, so tests can run
  in parallel without interfering.
- Logic with time in it (retries, backoff, deadlines) runs on trio's
  ``MockClock(autojump_threshold=0)`` with exact assertions. Tests with real
  sockets never autojump; they use a real ``trio.fail_after`` so a hang fails
  instead of stalling the run.
- Tests never assert on wall-clock speed: speed is measured in ``bench/``.
- Bad input is tested on every input path: the daemon must answer with the
  documented error and keep serving.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from aivad.config import Config, load_config, parse_config
from aivad.daemon import Endpoints, run_daemon

pytest_plugins = ["tests.broker_fixtures", "tests.cluster_fixtures"]

REPO = Path(__file__).resolve().parent.parent


#: this run's own directory in the system temp dir, made on first use: every daemon's directory is in it
_run_dir: Path | None = None


def short_tmp_dir() -> Path:
    """A temp dir with a short path (unix socket paths are limited to 107 bytes), in this run's directory.

    A test may leave it behind (a daemon process, a cluster node): :func:`pytest_sessionfinish`
    removes the run's directory when every test passed, and keeps it, with the daemons' logs,
    for a look after a failure.
    """
    global _run_dir
    if _run_dir is None:
        _run_dir = Path(tempfile.mkdtemp(prefix="aivad-run-"))
    return Path(tempfile.mkdtemp(prefix="d-", dir=_run_dir))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _run_dir is None:
        return
    if exitstatus == 0:
        for _ in range(3):  # a daemon process still stopping may write into it meanwhile
            shutil.rmtree(_run_dir, ignore_errors=True)
            if not _run_dir.exists():
                break
            time.sleep(0.5)
    else:
        with contextlib.suppress(OSError):
            _run_dir.rmdir()  # nothing in it to look at (its tests' own directories were removed)
        if _run_dir.exists():
            print(f"\nthe daemons' directories (logs) of this run are kept in {_run_dir}", file=sys.stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_config(directory: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config document for a daemon living in ``directory`` on free ports."""
    doc: dict[str, Any] = {
        "websocket": {"host": "127.0.0.1", "port": 0},
        "control": {"socket": str(directory / "control.sock")},
        "store": {"path": str(directory / "aivad.db"), "synchronous": "NORMAL"},
        "shutdown": {"grace_s": 5.0},
    }
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    return doc


test_config.__test__ = False  # type: ignore[attr-defined]


@pytest.fixture
def tmp_dir() -> Iterator[Path]:
    directory = short_tmp_dir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@attrs.define
class InProcessDaemon:
    cfg: Config
    endpoints: Endpoints

    @property
    def ws_url(self) -> str:
        return self.endpoints.ws_url

    @property
    def control_path(self) -> str:
        return self.endpoints.control_path


async def start_daemon(nursery: trio.Nursery, directory: Path, **sections: dict[str, Any]) -> InProcessDaemon:
    cfg = parse_config(test_config(directory, **sections))
    endpoints = await nursery.start(partial(run_daemon, cfg, handle_signals=False))
    return InProcessDaemon(cfg, endpoints)


async def start_daemon_from_file(nursery: trio.Nursery, directory: Path, **sections: dict[str, Any]) -> InProcessDaemon:
    """An in-process daemon run from ``directory/config.toml``, so :func:`reload_daemon` can change it."""
    path = directory / "config.toml"
    path.write_text(to_toml(test_config(directory, **sections)))
    cfg = load_config(path)
    endpoints = await nursery.start(partial(run_daemon, cfg, config_path=path, handle_signals=False))
    return InProcessDaemon(cfg, endpoints)


async def reload_daemon(d: InProcessDaemon, directory: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """Rewrite the config file of :func:`start_daemon_from_file` with ``sections`` and reload; the reply."""
    (directory / "config.toml").write_text(to_toml(test_config(directory, **sections)))
    return await control_async(d.control_path, {"cmd": "reload"})


async def control_async(path: str, request: dict[str, Any]) -> dict[str, Any]:
    """One request on the control socket from trio (no aivad code): its reply line."""
    async with await trio.open_unix_socket(path) as stream:
        await stream.send_all(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            data += await stream.receive_some(65536)
    return dict(json.loads(data))


@pytest.fixture
async def daemon(nursery: trio.Nursery, tmp_dir: Path) -> InProcessDaemon:
    """An in-process daemon on free ports in its own temp dir, cancelled at teardown (with the nursery)."""
    return await start_daemon(nursery, tmp_dir)


# ---- the real subprocess ---------------------------------------------------------


def poll_until(condition: Callable[[], object], timeout_s: float, what: str | Callable[[], str],
               every_s: float = 0.05) -> None:
    """Wait, blocking, until ``condition()`` holds — a real subprocess's state, which no test clock
    drives; fail the test with ``what`` (called for the message when it is a callable) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            pytest.fail(f"after {timeout_s} s: {what() if callable(what) else what}")
        time.sleep(every_s)


def control_request(path: str, request: dict[str, Any], timeout_s: float = 10.0) -> dict[str, Any]:
    """One request on the control socket, blocking, with a plain socket (no aivad code)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout_s)
        s.connect(path)
        s.sendall(json.dumps(request).encode() + b"\n")
        return dict(json.loads(s.makefile("rb").readline()))


class DaemonProcess:
    """A real ``aivad serve`` subprocess with its own config, ports and temp dir."""

    def __init__(self, directory: Path, **sections: dict[str, Any]) -> None:
        self.directory = directory
        self.ws_port = free_port()
        sections["websocket"] = {**sections.get("websocket", {}), "port": self.ws_port}
        doc = test_config(directory, **sections)
        self.config_path = directory / "config.toml"
        self.config_path.write_text(to_toml(doc))
        self.control_path = doc["control"]["socket"]
        self.db_path = doc["store"]["path"]
        self.log_path = directory / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/"

    def start(
        self, env: dict[str, str] | None = None, timeout_s: float = 20.0, rlimits: dict[int, int] | None = None
    ) -> None:
        """Start and wait until the control socket answers; ``rlimits`` (resource.RLIMIT_* → soft
        limit) apply to the daemon alone, e.g. a file size limit that makes its disk "full". The hard
        limit stays, so a test can lift the soft one again with ``resource.prlimit``."""

        def limit() -> None:
            for which, value in (rlimits or {}).items():
                resource.setrlimit(which, (value, resource.getrlimit(which)[1]))

        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aivad", "serve", "--config", str(self.config_path)],
            stdout=log, stderr=log, env={**os.environ, **(env or {})}, cwd=self.directory,
            preexec_fn=limit if rlimits else None,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"aivad serve exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError, ValueError):
                if self.control({"cmd": "status"}).get("ok"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"aivad serve did not become ready:\n{self.log()}")

    def control(self, request: dict[str, Any], timeout_s: float = 10.0) -> dict[str, Any]:
        return control_request(self.control_path, request, timeout_s)

    def sigterm_mid_intake(self, progress: Callable[[], int], at_least: int) -> None:
        """Start, wait until ``progress()`` reaches ``at_least``, SIGTERM: it must exit 0 within the grace."""
        self.start()
        try:
            deadline = time.monotonic() + 30
            while progress() < at_least:
                if time.monotonic() >= deadline:
                    pytest.fail(self.log())
                time.sleep(0.01)
            self.signal(signal.SIGTERM)
            assert self.wait(5.0 + 2) == 0, self.log()  # within shutdown.grace_s of the test config
        finally:
            self.stop()

    def cli(self, *args: str, input: str | None = None, timeout_s: float = 20.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "aivad", *args], input=input, capture_output=True, text=True,
            timeout=timeout_s, env={**os.environ, "AIVAD_SOCKET": self.control_path},
        )

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout_s: float = 20.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def to_toml(doc: dict[str, Any]) -> str:
    """Enough TOML for test configs: tables of scalars and lists."""
    lines = []
    for section, values in doc.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def daemon_proc(tmp_dir: Path) -> Iterator[DaemonProcess]:
    """A started ``aivad serve`` subprocess; stopped (SIGTERM, then SIGKILL) at teardown."""
    proc = DaemonProcess(tmp_dir)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
