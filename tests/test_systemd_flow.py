"""A real ``aivad serve`` with a datagram socket standing in for systemd's NOTIFY_SOCKET.

start → READY=1 (after the listeners are up) → WATCHDOG=1 pings → SIGHUP:
RELOADING=1 + MONOTONIC_USEC, then READY=1 → a refused reload still ends in
READY=1 → SIGTERM: STOPPING=1 → exit 0.
"""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

from tests.conftest import DaemonProcess


def _datagrams(sock: socket.socket, until: str, timeout_s: float = 15.0) -> list[str]:
    """Datagrams received until one contains ``until``."""
    got = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if until in got[-1]:
            return got
    raise AssertionError(f"no {until!r} in {got}")


def test_notify_start_watchdog_reload_drain(tmp_dir: Path) -> None:
    notify_path = tmp_dir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    proc = DaemonProcess(tmp_dir)
    try:
        proc.start(env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "200000"})
        first = _datagrams(sock, "READY=1")
        ready = first[-1].split("\n")
        assert "READY=1" in ready and any(line.startswith("STATUS=") for line in ready)
        assert proc.control({"cmd": "status"})["ok"]  # READY came when the control socket already answered
        assert len([d for d in _datagrams(sock, "WATCHDOG=1") if "WATCHDOG=1" in d]) >= 1
        _datagrams(sock, "WATCHDOG=1")  # and again: it keeps pinging from the loop

        proc.config_path.write_text(proc.config_path.read_text() + "\n[log]\nlevel = \"DEBUG\"\n")
        proc.signal(signal.SIGHUP)
        reload = _datagrams(sock, "RELOADING=1")[-1].split("\n")
        assert any(line.startswith("MONOTONIC_USEC=") and int(line.split("=")[1]) > 0 for line in reload)
        _datagrams(sock, "READY=1")

        proc.config_path.write_text(proc.config_path.read_text() + "\n[bogus]\n")
        result = proc.cli("reload")
        assert result.returncode == 1 and "bogus" in result.stderr
        _datagrams(sock, "RELOADING=1")
        _datagrams(sock, "READY=1")

        proc.signal(signal.SIGTERM)
        _datagrams(sock, "STOPPING=1")
        assert proc.wait() == 0
    finally:
        proc.stop()
        sock.close()
