"""End to end against a real ``aivad serve`` subprocess, with clients not built on trio.

kill -9 durability, drain on SIGTERM / SIGINT / ``aivad drain`` (close 1001,
exit 0), SIGHUP reload, and the control socket's ownership. Every wait has a
timeout (subprocess, socket or websocket ``recv``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import websockets
import websockets.sync.client as ws_sync

from tests.conftest import DaemonProcess, short_tmp_dir, test_config, to_toml

#: the installed console script (what users run; it imports only the client side), else ``python -m aivad``
_AIVAD = [str(Path(sys.executable).with_name("aivad"))] if Path(sys.executable).with_name("aivad").exists() \
    else [sys.executable, "-m", "aivad"]


def aivad(proc: DaemonProcess, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``aivad`` CLI against ``proc`` (found through ``$AIVAD_SOCKET``)."""
    return subprocess.run([*_AIVAD, *args], input=input, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "AIVAD_SOCKET": proc.control_path})


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def history(proc: DaemonProcess, pattern: str = "#") -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    after = 0
    while True:
        reply = proc.control({"cmd": "history", "pattern": pattern, "after": after, "limit": 1000})
        assert reply["ok"], reply
        if not reply["messages"]:
            return messages
        messages += reply["messages"]
        after = reply["last_seq"]


def close_code(ws: ws_sync.ClientConnection, timeout_s: float = 10.0) -> int:
    """Read until the server closes; the code it closed with."""
    try:
        while True:
            ws.recv(timeout=timeout_s)
    except websockets.ConnectionClosed as closed:
        assert closed.rcvd is not None, "closed without a close frame from the server"  # noqa: PT017
        return closed.rcvd.code
    raise AssertionError("unreachable")


def rewrite_config(proc: DaemonProcess, change: Callable[[dict[str, Any]], None]) -> None:
    doc = tomllib.loads(proc.config_path.read_text())
    change(doc)
    proc.config_path.write_text(to_toml(doc))


# ---- a client not built on trio -------------------------------------------------------


def test_asyncio_websockets_client_publishes_and_subscribes(daemon_proc: DaemonProcess) -> None:
    async def scenario() -> None:
        async with websockets.connect(daemon_proc.ws_url) as sub, websockets.connect(daemon_proc.ws_url) as pub:
            await sub.send(json.dumps({"op": "subscribe", "pattern": "notifications.frontend.evt-42.#", "ref": "s"}))
            ok = json.loads(await sub.recv())
            epoch = ok.pop("epoch")
            assert isinstance(epoch, str) and epoch
            assert ok == {"op": "ok", "ref": "s", "pattern": "notifications.frontend.evt-42.#", "last_seq": 0,
                          "recovered": True}
            for i, topic in enumerate(["notifications.frontend.evt-42.chat", "notifications.frontend.evt-43.chat",
                                       "notifications.frontend.evt-42"]):
                await pub.send(json.dumps({"op": "publish", "type": topic, "payload": {"i": i}, "ref": i}))
            acks = [json.loads(await pub.recv()) for _ in range(3)]
            assert [(a["op"], a["ref"], a["seq"]) for a in acks] == [("ok", 0, 1), ("ok", 1, 2), ("ok", 2, 3)]
            got = [json.loads(await asyncio.wait_for(sub.recv(), 10)) for _ in range(2)]
            assert [(g["op"], g["msg"]["seq"], g["msg"]["payload"]) for g in got] == [
                ("message", 1, {"i": 0}), ("message", 3, {"i": 2})]
            await sub.send(json.dumps({"op": "ping", "ref": "p"}))
            assert json.loads(await asyncio.wait_for(sub.recv(), 10)) == {"op": "pong", "ref": "p"}
            # resume after a reconnect: everything after the last seen seq, once
            async with websockets.connect(daemon_proc.ws_url) as again:
                await again.send(json.dumps({"op": "subscribe", "pattern": "#", "since": 1}))
                assert json.loads(await again.recv())["op"] == "ok"
                seqs = [json.loads(await asyncio.wait_for(again.recv(), 10))["msg"]["seq"] for _ in range(2)]
                assert seqs == [2, 3]

    asyncio.run(asyncio.wait_for(scenario(), 20))


# ---- kill -9 ---------------------------------------------------------------------------


def test_kill_9_keeps_every_acknowledged_message(daemon_proc: DaemonProcess) -> None:
    acked: dict[str, int] = {}
    enough = threading.Event()
    errors: list[BaseException] = []

    def publish_until_killed() -> None:
        """Pipelined publishes in windows of 32; records every ok it reads."""
        try:
            with ws_sync.connect(daemon_proc.ws_url) as ws:
                n = 0
                while True:
                    window = [f"m-{n + i}" for i in range(32)]
                    for mid in window:
                        ws.send(json.dumps({"op": "publish", "type": "durable.x", "payload": mid,
                                            "message_id": mid, "ref": mid}))
                    for _ in window:
                        reply = json.loads(ws.recv(timeout=10))
                        assert reply["op"] == "ok", reply
                        acked[reply["ref"]] = reply["seq"]
                    n += len(window)
                    if len(acked) >= 300:
                        enough.set()
        except (websockets.ConnectionClosed, ConnectionError):
            pass  # the daemon was killed under us
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
            enough.set()

    publisher = threading.Thread(target=publish_until_killed)
    publisher.start()
    try:
        assert enough.wait(20), "publisher made no progress"
    finally:
        daemon_proc.kill()  # SIGKILL, mid-stream
        publisher.join(20)
    assert not errors, errors
    assert not publisher.is_alive()
    assert daemon_proc.proc is not None and daemon_proc.proc.returncode == -signal.SIGKILL
    snapshot = dict(acked)
    assert len(snapshot) >= 300
    # the dead daemon left its socket file behind: the restart replaces it
    assert stat.S_ISSOCK(os.stat(daemon_proc.control_path).st_mode)
    daemon_proc.start()
    stored = {m["message_id"]: m["seq"] for m in history(daemon_proc, "durable.x")}
    missing = {mid: seq for mid, seq in snapshot.items() if stored.get(mid) != seq}
    assert not missing, f"{len(missing)} acknowledged messages lost or renumbered, e.g. {list(missing.items())[:3]}"
    seqs = sorted(stored.values())
    assert seqs == sorted(set(seqs))
    # a retry of an acknowledged message is a duplicate with the original seq; new ones get larger seqs
    mid, seq = next(iter(snapshot.items()))
    retry = daemon_proc.control({"cmd": "publish", "type": "durable.x", "payload": None, "message_id": mid})
    assert (retry["seq"], retry["duplicate"]) == (seq, True)
    new = daemon_proc.control({"cmd": "publish", "type": "durable.x", "payload": "after restart"})
    assert new["ok"] and new["seq"] > max(seqs)
    assert daemon_proc.control({"cmd": "status"})["status"]["store"]["last_seq"] == new["seq"]


# ---- drain ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "aivad drain"])
def test_drain_closes_clients_with_1001_and_exits_0(daemon_proc: DaemonProcess, how: str) -> None:
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(ws_sync.connect(daemon_proc.ws_url)) for _ in range(3)]
        clients[0].send(json.dumps({"op": "subscribe", "pattern": "#", "ref": 1}))
        assert json.loads(clients[0].recv(timeout=10))["op"] == "ok"
        clients[1].send(json.dumps({"op": "publish", "type": "before.drain", "payload": None, "ref": 1}))
        assert json.loads(clients[1].recv(timeout=10))["seq"] == 1
        started = time.monotonic()
        if how == "aivad drain":
            result = aivad(daemon_proc, "drain")
            assert result.returncode == 0 and result.stdout.strip() == "draining", result.stderr
        else:
            daemon_proc.signal(getattr(signal, how))
        assert [close_code(c) for c in clients] == [1001, 1001, 1001]
        assert daemon_proc.wait(10) == 0, daemon_proc.log()
        assert time.monotonic() - started < 5.0, "exited within shutdown.grace_s"
    assert not os.path.exists(daemon_proc.control_path), "the control socket is removed on exit"
    assert "Traceback" not in daemon_proc.log()
    daemon_proc.start()  # what was acknowledged before the drain is still there
    assert [m["type"] for m in history(daemon_proc)] == ["before.drain"]


# ---- reload -----------------------------------------------------------------------------


def test_sighup_lowers_max_frame_bytes_live(daemon_proc: DaemonProcess) -> None:
    def big(n: int) -> str:
        return json.dumps({"op": "publish", "type": "frame.size", "payload": "x" * n, "ref": n})

    with ws_sync.connect(daemon_proc.ws_url) as before:
        before.send(big(3000))  # fine under the default limit
        assert json.loads(before.recv(timeout=10))["op"] == "ok"
        rewrite_config(daemon_proc, lambda doc: doc["websocket"].update(max_frame_bytes=2048))
        daemon_proc.signal(signal.SIGHUP)
        wait_for(lambda: "reload applied: websocket.max_frame_bytes" in daemon_proc.log(), what="reload")
        with ws_sync.connect(daemon_proc.ws_url, max_size=None) as new:
            new.send(big(1000))
            assert json.loads(new.recv(timeout=10))["op"] == "ok"
            new.send(big(3000))
            assert close_code(new) == 1009
        before.send(big(3000))  # a connection opened before the reload: new frames use the new limit too
        assert close_code(before) == 1009
    assert daemon_proc.control({"cmd": "status"})["ok"]


def test_a_broken_config_on_reload_is_refused_and_the_old_one_stays(daemon_proc: DaemonProcess) -> None:
    ok = aivad(daemon_proc, "reload")
    assert ok.returncode == 0 and ok.stdout.startswith("reloaded: nothing changed"), (ok.stdout, ok.stderr)
    rewrite_config(daemon_proc, lambda doc: doc["websocket"].update(max_frame_bytes=10))
    refused = aivad(daemon_proc, "reload")
    assert refused.returncode == 1 and "websocket.max_frame_bytes" in refused.stderr, refused.stderr
    rewrite_config(daemon_proc, lambda doc: doc["websocket"].update(max_frame_bytes=2048, max_frame_byts=1))
    daemon_proc.signal(signal.SIGHUP)
    wait_for(lambda: daemon_proc.log().count("reload refused") >= 2, what="the refusal in the log")
    assert "max_frame_byts" in daemon_proc.log()
    daemon_proc.config_path.write_text("[websocket\nnot toml")
    assert aivad(daemon_proc, "reload").returncode == 1
    # still serving, with the old limit (1 MiB, not 2048)
    with ws_sync.connect(daemon_proc.ws_url) as ws:
        ws.send(json.dumps({"op": "publish", "type": "still.old.limit", "payload": "x" * 5000, "ref": 1}))
        assert json.loads(ws.recv(timeout=10))["op"] == "ok"
    assert daemon_proc.proc is not None and daemon_proc.proc.poll() is None


# ---- the control socket belongs to one daemon -------------------------------------------------


def _second_daemon(first: DaemonProcess) -> subprocess.CompletedProcess[str]:
    """Start another daemon (own ports, own store) on the first one's control socket."""
    directory = short_tmp_dir()
    doc = test_config(directory, control={"socket": first.control_path})
    config = directory / "config.toml"
    config.write_text(to_toml(doc))
    try:
        return subprocess.run([sys.executable, "-m", "aivad", "serve", "--config", str(config)],
                              capture_output=True, text=True, timeout=20, cwd=directory)
    finally:
        for p in sorted(directory.rglob("*"), reverse=True):
            p.unlink() if not p.is_dir() else p.rmdir()
        directory.rmdir()


def test_a_second_daemon_on_the_same_control_socket_does_not_steal_it(daemon_proc: DaemonProcess) -> None:
    inode = os.stat(daemon_proc.control_path).st_ino
    second = _second_daemon(daemon_proc)
    assert second.returncode != 0
    assert "another aivad is serving" in second.stderr
    assert os.stat(daemon_proc.control_path).st_ino == inode, "the socket file was replaced"
    reply = daemon_proc.control({"cmd": "publish", "type": "first.still.serves", "payload": None})
    assert reply["ok"] and reply["seq"] == 1
    assert aivad(daemon_proc, "status").returncode == 0


def test_a_second_daemon_exits_2_with_one_line(daemon_proc: DaemonProcess) -> None:
    second = _second_daemon(daemon_proc)
    assert second.returncode == 2
    assert "Traceback" not in second.stderr
    assert "cannot start" in second.stderr and "another aivad is serving" in second.stderr


def test_stale_socket_file_of_a_killed_daemon_is_replaced(tmp_dir: Path) -> None:
    proc = DaemonProcess(tmp_dir)
    proc.start()
    try:
        proc.kill()
        assert stat.S_ISSOCK(os.stat(proc.control_path).st_mode), "SIGKILL leaves the socket file behind"
        result = aivad(proc, "status")
        assert result.returncode == 3, "a stale socket file is unreachable"
        proc.start()
        assert stat.S_IMODE(os.stat(proc.control_path).st_mode) == 0o600
        assert aivad(proc, "status").returncode == 0
    finally:
        proc.stop()
