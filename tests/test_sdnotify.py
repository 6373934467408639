"""sd_notify against a real AF_UNIX datagram socket standing in for systemd.

Policy: the "systemd" side is a real socket bound in a temp dir (or in the
abstract namespace), read non-blocking, with SO_PASSCRED so the sender PID
can be checked the way systemd checks it for NotifyAccess=main. The notifier
never awaits socket I/O (sendto is non-blocking), so the watchdog cadence is
tested on trio's autojump clock with exact times; the blocked-loop test uses
real time but asserts only on what arrived, never on how fast.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from aivad.sdnotify import Notifier, serve_watchdog


class FakeSystemd:
    """A bound datagram socket that collects notifications with their sender PID."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    async def wait(self) -> list[tuple[int, dict[str, str]]]:
        """Wait until at least one datagram is queued, then take them all."""
        await trio.lowlevel.wait_readable(self.sock)
        return self.receive()

    def receive(self) -> list[tuple[int, dict[str, str]]]:
        """Every datagram queued now, as (sender pid, fields); never blocks."""
        out: list[tuple[int, dict[str, str]]] = []
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except BlockingIOError:
                return out
            pid = -1
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid, _uid, _gid = struct.unpack("iII", payload[:12])
            fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
            out.append((pid, fields))


def _bind(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(address)
    sock.setblocking(False)
    return sock


@pytest.fixture(params=["path", "abstract"])
def systemd(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FakeSystemd]:
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        sock = _bind(path)
        env_value = path
    else:
        name = f"aivad-test-{uuid.uuid4().hex}"
        sock = _bind("\0" + name)
        env_value = "@" + name
    with sock:
        yield FakeSystemd(sock, env_value)


def test_ready_from_own_pid(systemd: FakeSystemd) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": systemd.env_value})
    assert notifier.enabled
    assert notifier.ready(status="serving on ws://127.0.0.1:8765")
    assert systemd.receive() == [(os.getpid(), {"READY": "1", "STATUS": "serving on ws://127.0.0.1:8765"})]
    notifier.close()


def test_every_message_kind(systemd: FakeSystemd) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": systemd.env_value})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.ready()
    assert notifier.status("draining:\n3 connections left")
    assert notifier.stopping(status="draining")
    assert notifier.watchdog()
    got = [fields for _pid, fields in systemd.receive()]
    assert got[0]["RELOADING"] == "1"
    assert before <= int(got[0]["MONOTONIC_USEC"]) <= after
    assert got[1:] == [
        {"READY": "1"},
        {"STATUS": "draining: 3 connections left"},  # one line: no field smuggled in
        {"STOPPING": "1", "STATUS": "draining"},
        {"WATCHDOG": "1"},
    ]
    notifier.close()


def test_no_notify_socket_is_a_noop(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    assert not notifier.ready()
    assert not notifier.reloading()
    assert not notifier.stopping()
    assert caplog.records == []


def test_missing_socket_warns_once_and_recovers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "later.sock")
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    with caplog.at_level(logging.INFO, logger="aivad.sdnotify"):
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.watchdog()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert path in warnings[0].getMessage()
        with _bind(path) as sock:
            assert notifier.watchdog()
            assert sock.recv(100) == b"WATCHDOG=1"
        assert any("works again" in r.getMessage() for r in caplog.records)
    notifier.close()


def test_full_queue_drops_instead_of_blocking(systemd: FakeSystemd, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": systemd.env_value})
    # Nobody reads: the kernel queue (net.unix.max_dgram_qlen) fills up.
    results = [notifier.watchdog() for _ in range(1000)]
    assert results[0]
    assert not results[-1]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    notifier.close()


@pytest.mark.parametrize("raw", ["relative/path.sock", "vsock:2:1234"])
def test_unusable_notify_socket_is_ignored(raw: str, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": raw})
    assert not notifier.enabled
    assert "NOTIFY_SOCKET" in caplog.text


def test_watchdog_interval_from_environ(systemd: FakeSystemd) -> None:
    base = {"NOTIFY_SOCKET": systemd.env_value}
    assert Notifier.from_environ({**base, "WATCHDOG_USEC": "30000000"}).watchdog_interval_s == 15.0
    own = {**base, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_environ(own).watchdog_interval_s == 15.0
    other = {**base, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_environ(other).watchdog_interval_s is None
    assert Notifier.from_environ({**base, "WATCHDOG_USEC": "soon"}).watchdog_interval_s is None
    assert Notifier.from_environ({"WATCHDOG_USEC": "30000000"}).watchdog_interval_s is None


async def test_watchdog_cadence(systemd: FakeSystemd, autojump_clock: trio.testing.MockClock) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": systemd.env_value, "WATCHDOG_USEC": "2000000"})
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        await nursery.start(serve_watchdog, notifier)
        # A ping at once, then one every WATCHDOG_USEC/2 = 1 s: exactly one per
        # second, looked at halfway between two pings.
        for k in range(6):
            await trio.sleep_until(start + k + 0.5)
            assert systemd.receive() == [(os.getpid(), {"WATCHDOG": "1"})], f"second {k}"
        nursery.cancel_scope.cancel()
    notifier.close()


async def test_no_watchdog_returns_at_once(systemd: FakeSystemd, autojump_clock: trio.testing.MockClock) -> None:
    for env in (
        {},
        {"NOTIFY_SOCKET": systemd.env_value},
        {"NOTIFY_SOCKET": systemd.env_value, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)},
    ):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_watchdog, Notifier.from_environ(env))
        assert trio.current_time() == 0
    assert systemd.receive() == []


async def test_blocked_loop_stops_the_pings(systemd: FakeSystemd) -> None:
    """The reason the pings come from a trio task: a stuck loop must look dead."""
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": systemd.env_value, "WATCHDOG_USEC": "100000"})
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_watchdog, notifier)
            await systemd.wait()  # pinging: every 50 ms
            time.sleep(0.5)  # noqa: ASYNC251  -- the loop is blocked for ten intervals...
            assert systemd.receive() == []  # ...and nothing was sent meanwhile
            assert await systemd.wait()  # it resumes once the loop runs again
            nursery.cancel_scope.cancel()
    notifier.close()
