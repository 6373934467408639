"""The control socket (DESIGN §4.4) over a real unix socket, and the ``aivad`` CLI (§4.1).

The socket tests run an in-process daemon; the CLI tests run the real
``aivad`` command against a real ``aivad serve`` subprocess. Real sockets:
a real ``trio.fail_after`` or subprocess timeout everywhere.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

from tests.conftest import (
    DaemonProcess,
    InProcessDaemon,
    poll_until,
    reload_daemon,
    start_daemon,
    start_daemon_from_file,
)
from tests.wsclient import connect

#: the installed console script (what users run; it imports only the client side), else ``python -m aivad``
_AIVAD = [str(Path(sys.executable).with_name("aivad"))] if Path(sys.executable).with_name("aivad").exists() \
    else [sys.executable, "-m", "aivad"]


def aivad(proc: DaemonProcess, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``aivad`` CLI against ``proc`` (found through ``$AIVAD_SOCKET``)."""
    return subprocess.run([*_AIVAD, *args], input=input, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "AIVAD_SOCKET": proc.control_path})


class LineClient:
    """A plain control-socket client: JSON lines out, JSON lines in."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = b""

    @classmethod
    async def open(cls, path: str) -> LineClient:
        return cls(await trio.open_unix_socket(path))

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send(self, obj: Any) -> None:
        await self.send_raw(json.dumps(obj).encode() + b"\n")

    async def read_line(self) -> dict[str, Any] | None:
        """The next reply line, or None at end of stream."""
        while b"\n" not in self._buffer:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                assert not self._buffer, self._buffer[:200]
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return dict(json.loads(line))

    async def request(self, obj: Any) -> dict[str, Any]:
        await self.send(obj)
        reply = await self.read_line()
        assert reply is not None
        return reply

    async def ok(self, obj: Any) -> dict[str, Any]:
        reply = await self.request(obj)
        assert reply["ok"] is True, reply
        return reply


async def call(path: str, obj: Any) -> dict[str, Any]:
    client = await LineClient.open(path)
    try:
        return await client.request(obj)
    finally:
        await client.aclose()


async def status(path: str) -> dict[str, Any]:
    reply = await call(path, {"cmd": "status"})
    assert reply["ok"], reply
    return dict(reply["status"])


# ---- commands -------------------------------------------------------------------------


async def test_socket_file_is_mode_0600(daemon: InProcessDaemon) -> None:
    mode = os.stat(daemon.control_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


async def test_status_reports_every_service(daemon: InProcessDaemon) -> None:
    with trio.fail_after(15):
        first = await status(daemon.control_path)
        assert first["uptime_s"] >= 0 and first["ready"] is True and first["draining"] is False
        assert first["store"]["last_seq"] == 0 and first["store"]["stored_messages"] == 0
        assert first["websocket"]["connections"] == 0 and first["websocket"]["subscriptions"] == 0
        async with connect(daemon.ws_url) as ws:
            await ws.ok({"op": "subscribe", "pattern": "a.#"})
            await ws.ok({"op": "subscribe", "pattern": "#"})
            await ws.publish("a.b", 1)
            client = await LineClient.open(daemon.control_path)
            try:
                for i in range(3):
                    assert (await client.ok({"cmd": "publish", "type": "a.c", "payload": i}))["seq"] == i + 2
                now = (await client.ok({"cmd": "status", "ref": "s1"}))
                assert now["ref"] == "s1"
                s = now["status"]
                assert s["uptime_s"] >= first["uptime_s"]
                assert s["websocket"]["connections"] == 1 and s["websocket"]["subscriptions"] == 2
                assert s["router"]["subscriptions"] == 2
                assert s["store"]["last_seq"] == 4 and s["store"]["stored_messages"] == 4
                assert s["ingest"]["by_ingress"] == {"websocket": 1, "control": 3}
                assert s["control"]["sessions"] >= 1
                assert Path(s["control"]["socket"]).samefile(daemon.control_path)  # noqa: ASYNC240
                assert s["router"]["deliveries"] >= 0
                # rates count completed seconds: within ~1 s the recent publishes show up
                while (await client.ok({"cmd": "status"}))["status"]["ingest"]["rate_10s"] <= 0:
                    await trio.sleep(0.1)
                rates = (await client.ok({"cmd": "status"}))["status"]["ingest"]
                assert 0 < rates["rate_10s"] <= 0.4 + 1e-9 and 0 < rates["rate_60s"] <= 4 / 60 + 0.01
            finally:
                await client.aclose()


async def test_publish_and_history(daemon: InProcessDaemon) -> None:
    with trio.fail_after(10):
        client = await LineClient.open(daemon.control_path)
        try:
            one = await client.ok({"cmd": "publish", "type": "scan.completed", "payload": {"scan_id": "1"},
                                   "metadata": {"source": "cli"}, "message_id": "m-1", "ref": 7})
            assert one == {"ok": True, "ref": 7, "seq": 1, "duplicate": False}
            again = await client.ok({"cmd": "publish", "type": "scan.completed", "payload": 2, "message_id": "m-1"})
            assert (again["seq"], again["duplicate"]) == (1, True)
            await client.ok({"cmd": "publish", "type": "scan.other.deep", "payload": None, "seq": 99})
            await client.ok({"cmd": "publish", "type": "other", "payload": None})
            history = await client.ok({"cmd": "history", "pattern": "scan.#"})
            seqs = [m["seq"] for m in history["messages"]]  # a duplicate may leave a gap in seq
            assert len(seqs) == 2 and seqs[0] == 1 < seqs[1] and history["last_seq"] == seqs[1]
            msg = history["messages"][0]
            assert msg["payload"] == {"scan_id": "1"} and msg["metadata"] == {"source": "cli"}
            assert msg["message_id"] == "m-1" and msg["type"] == "scan.completed"
            page = await client.ok({"cmd": "history", "pattern": "#", "after": 1, "limit": 1})
            assert [m["seq"] for m in page["messages"]] == seqs[1:] and page["last_seq"] == seqs[1]
            empty = await client.ok({"cmd": "history", "pattern": "nothing.*", "after": 2})
            assert empty["messages"] == [] and empty["last_seq"] == 2
            for bad in (
                {"cmd": "publish"},
                {"cmd": "publish", "type": "bad..topic"},
                {"cmd": "publish", "type": "ok", "metadata": "x"},
                {"cmd": "history"},
                {"cmd": "history", "pattern": "a.**"},
                {"cmd": "history", "pattern": "#", "limit": 0},
                {"cmd": "history", "pattern": "#", "after": -1},
                {"cmd": "tail", "pattern": "#", "since": "1"},
            ):
                reply = await client.request({**bad, "ref": "r"})
                assert reply["ok"] is False and reply["error"]["code"] == "bad_request", (bad, reply)
                assert reply["ref"] == "r" and reply["error"]["message"]
        finally:
            await client.aclose()


async def test_tail_replays_then_streams_live_until_the_client_closes(daemon: InProcessDaemon) -> None:
    with trio.fail_after(15):
        pub = await LineClient.open(daemon.control_path)
        for i in range(3):
            await pub.ok({"cmd": "publish", "type": "t.x" if i != 1 else "u.x", "payload": i})
        tail = await LineClient.open(daemon.control_path)
        first = await tail.request({"cmd": "tail", "pattern": "t.*", "since": 0})
        assert first.pop("epoch")
        assert first == {"ok": True, "pattern": "t.*", "last_seq": 3, "recovered": True}
        replayed = [await tail.read_line() or {} for _ in range(2)]
        assert [(r["op"], r["pattern"], r["msg"]["seq"]) for r in replayed] == [
            ("message", "t.*", 1), ("message", "t.*", 3)]
        await pub.ok({"cmd": "publish", "type": "u.x", "payload": "no"})
        await pub.ok({"cmd": "publish", "type": "t.y", "payload": "live"})
        live = await tail.read_line()
        assert live is not None and live["msg"]["seq"] == 5 and live["msg"]["payload"] == "live"
        assert (await status(daemon.control_path))["router"]["subscriptions"] == 1
        await tail.aclose()
        while (await status(daemon.control_path))["router"]["subscriptions"]:
            await trio.sleep(0.02)
        # a tail without since starts at the newest message
        tail2 = await LineClient.open(daemon.control_path)
        first = await tail2.request({"cmd": "tail", "pattern": "#"})
        assert first["last_seq"] == 5 and first["recovered"] is True
        await pub.ok({"cmd": "publish", "type": "t.z", "payload": "next"})
        nxt = await tail2.read_line()
        assert nxt is not None and nxt["msg"]["seq"] == 6
        await tail2.aclose()
        assert (await pub.ok({"cmd": "publish", "type": "t.x", "payload": None}))["seq"] == 7
        await pub.aclose()


async def test_a_tail_overtaken_by_retention_is_told_and_closed(nursery: trio.Nursery, tmp_dir: Path) -> None:
    """A tail that stalls mid-replay while retention deletes past it gets the documented
    error line and EOF, never the messages after the hole as if they followed."""
    sections: dict[str, dict[str, Any]] = {
        "control": {"tail_buffer_lines": 16},
        "websocket": {"replay_batch": 20},
        "store": {"retention_max_messages": 0, "retention_interval_s": 0.05},
    }
    d = await start_daemon_from_file(nursery, tmp_dir, **sections)
    pad = "p" * 16_000  # 400 lines of 16 KB: far more than a unix socket buffers
    with trio.fail_after(30):
        pub = await LineClient.open(d.control_path)
        for i in range(400):
            await pub.ok({"cmd": "publish", "type": "bulk", "payload": {"i": i, "pad": pad}})
        tail = await LineClient.open(d.control_path)
        assert (await tail.request({"cmd": "tail", "pattern": "bulk", "since": 0}))["recovered"] is True
        seen = [(await tail.read_line() or {})["msg"]["seq"]]
        await trio.sleep(0.3)  # not reading: the replay fills the socket and the tail buffer, then waits
        sections["store"]["retention_max_messages"] = 10
        assert "store.retention_max_messages" in (await reload_daemon(d, tmp_dir, **sections))["applied"]
        while len((await pub.ok({"cmd": "history", "pattern": "bulk", "limit": 11}))["messages"]) > 10:
            await trio.sleep(0.05)
        while (line := await tail.read_line()) is not None and "msg" in line:
            seen.append(line["msg"]["seq"])
        assert line == {"ok": False, "error": {"code": "overloaded", "message": "tail fell behind; resume with since"}}
        assert await tail.read_line() is None
        assert seen == list(range(1, len(seen) + 1)) and len(seen) < 390
        await tail.aclose()
        await pub.aclose()


async def test_tail_clients_vanishing_mid_stream_leave_the_daemon_serving(daemon: InProcessDaemon) -> None:
    with trio.fail_after(20):
        async with connect(daemon.ws_url) as ws:
            for i in range(300):
                await ws.send({"op": "publish", "type": "flood.x", "payload": {"i": i, "pad": "p" * 500}, "ref": i})
            for _ in range(300):
                await ws.receive()
            tails = [await LineClient.open(daemon.control_path) for _ in range(10)]
            for tail in tails:
                await tail.send({"cmd": "tail", "pattern": "flood.#", "since": 0})
            for tail in tails[:5]:
                assert (await tail.read_line()) is not None  # the ok line
            for tail in tails:  # close without reading the replay
                await tail.aclose()
            await ws.publish("flood.x", "after")
            while (await status(daemon.control_path))["router"]["subscriptions"]:
                await trio.sleep(0.02)
            assert (await status(daemon.control_path))["store"]["last_seq"] == 301


# ---- garbage ------------------------------------------------------------------------------

GARBAGE = [
    (b"not json\n", "bad_json"),
    (b"{\n", "bad_json"),
    (b"[1, 2]\n", "bad_request"),
    (b'"status"\n', "bad_request"),
    (b"42\n", "bad_request"),
    (b"null\n", "bad_request"),
    (b"{}\n", "bad_request"),
    (b'{"cmd": 5}\n', "bad_request"),
    (b'{"cmd": null}\n', "bad_request"),
    (b'{"cmd": "fly"}\n', "unknown_op"),
    (b'{"cmd": "status", "ref": {"a": 1}}\n', "bad_request"),
    (b'{"cmd": "\xff\xfe"}\n', "bad_json"),
    (b"\xc3\x28\n", "bad_json"),
    (b'{"cmd": "status", "ref": NaN}\n', "bad_json"),
    (b'{"cmd": "status", "ref": 1e999}\n', "bad_json"),
    (b"[" * 50_000 + b"]" * 50_000 + b"\n", "bad_json"),  # last: over the 4 KiB lines of the test below
]


async def test_garbage_lines_get_error_lines_and_the_session_stays_usable(daemon: InProcessDaemon) -> None:
    with trio.fail_after(10):
        client = await LineClient.open(daemon.control_path)
        try:
            for line, code in GARBAGE:
                await client.send_raw(line)
                reply = await client.read_line()
                assert reply is not None and reply["ok"] is False, (line[:30], reply)
                assert reply["error"]["code"] == code and reply["error"]["message"], (line[:30], reply)
            await client.send_raw(b"\n\n   \n\r\n")  # blank lines are skipped, no reply
            reply = await client.ok({"cmd": "status", "ref": 1})
            assert reply["ref"] == 1
            err = await client.request({"cmd": "fly", "ref": "x"})
            assert err == {"ok": False, "ref": "x", "error": {"code": "unknown_op", "message": "unknown command: fly"}}
            # several requests in one write are answered in order
            await client.send_raw(b'{"cmd":"status","ref":1}\nnope\n{"cmd":"status","ref":2}\n')
            replies = [await client.read_line() for _ in range(3)]
            assert [(r["ok"], r.get("ref")) for r in replies if r] == [(True, 1), (False, None), (True, 2)]
        finally:
            await client.aclose()


async def test_an_endless_line_gets_too_large_and_is_closed(nursery: trio.Nursery, tmp_dir: Path) -> None:
    d = await start_daemon(nursery, tmp_dir, control={"max_line_bytes": 1024})
    with trio.fail_after(10):
        client = await LineClient.open(d.control_path)
        try:
            with pytest.raises(trio.BrokenResourceError):  # the daemon closes before we finish writing
                for _ in range(100):
                    await client.send_raw(b"x" * 4096)
                    await trio.lowlevel.checkpoint()
                raise trio.BrokenResourceError
            reply = await client.read_line()
            assert reply is not None and reply["error"]["code"] == "too_large"
            # closed: an orderly end, or a reset because our unread bytes were dropped
            with contextlib.suppress(trio.BrokenResourceError):
                assert await client.read_line() is None, "closed after too_large"
        finally:
            await client.aclose()
        assert (await call(d.control_path, {"cmd": "publish", "type": "after.big", "payload": None}))["seq"] == 1


async def test_an_over_long_line_with_its_newline_gets_too_large(nursery: trio.Nursery, tmp_dir: Path) -> None:
    d = await start_daemon(nursery, tmp_dir, control={"max_line_bytes": 1024})
    with trio.fail_after(10):
        client = await LineClient.open(d.control_path)
        try:
            reply = await client.request({"cmd": "publish", "type": "big", "payload": "x" * 5000})
            assert reply["ok"] is False and reply["error"]["code"] == "too_large", reply
        finally:
            await client.aclose()


async def test_many_bad_clients_at_once_and_the_daemon_keeps_serving(nursery: trio.Nursery, tmp_dir: Path) -> None:
    d = await start_daemon(nursery, tmp_dir, control={"max_line_bytes": 4096})

    async def bad_client(i: int) -> None:
        client = await LineClient.open(d.control_path)
        try:
            kind = i % 5
            if kind == 0:  # garbage, then a good request on the same session
                for line, _ in GARBAGE[:-1]:
                    await client.send_raw(line)
                    assert (await client.read_line())["ok"] is False  # type: ignore[index]
                assert (await client.ok({"cmd": "status"}))["ok"]
            elif kind == 1:  # half a line, then hang up
                await client.send_raw(b'{"cmd": "pub')
            elif kind == 2:  # an endless line
                try:
                    for _ in range(10):
                        await client.send_raw(b"y" * 4096)
                except trio.BrokenResourceError:
                    pass
            elif kind == 3:  # connect and leave
                pass
            else:  # a tail, closed at once
                await client.send({"cmd": "tail", "pattern": "#", "since": 0})
        finally:
            await client.aclose()

    with trio.fail_after(20):
        async with connect(d.ws_url) as ws:
            await ws.ok({"op": "subscribe", "pattern": "#"})
            async with trio.open_nursery() as clients:
                for i in range(100):
                    clients.start_soon(bad_client, i)
            reply = await call(d.control_path, {"cmd": "publish", "type": "still.serving", "payload": 1})
            assert reply["ok"] and reply["seq"] == 1
            assert (await ws.next_message())["msg"]["type"] == "still.serving"
            while (s := await status(d.control_path))["control"]["sessions"] > 1:
                await trio.sleep(0.02)
            assert s["router"]["subscriptions"] == 1


# ---- the CLI against a real daemon --------------------------------------------------------


def test_cli_status_human_and_json(daemon_proc: DaemonProcess) -> None:
    daemon_proc.control({"cmd": "publish", "type": "a.b", "payload": 1})
    human = aivad(daemon_proc, "status")
    assert human.returncode == 0, human.stderr
    assert "last seq 1" in human.stdout and "websocket" in human.stdout and "msgs/s" in human.stdout
    as_json = daemon_proc.cli("status", "--json")  # python -m aivad works too
    assert as_json.returncode == 0, as_json.stderr
    s = json.loads(as_json.stdout)
    assert s["store"]["last_seq"] == 1 and s["store"]["stored_messages"] == 1
    assert s["websocket"]["port"] == daemon_proc.ws_port
    assert {"uptime_s", "websocket", "store", "ingest", "router"} <= set(s)


def test_cli_publish_and_history(daemon_proc: DaemonProcess) -> None:
    one = aivad(daemon_proc, "publish", "scan.completed", '{"scan_id": "123"}')
    assert (one.returncode, one.stdout.strip()) == (0, "stored as seq 1"), one.stderr
    two = aivad(daemon_proc, "publish", "scan.completed", "-", "--json", "--message-id", "m-1",
                          "--metadata", '{"source": "stdin"}', input='{"n": 2}\n')
    assert two.returncode == 0, two.stderr
    assert json.loads(two.stdout) == {"seq": 2, "duplicate": False}
    dup = aivad(daemon_proc, "publish", "scan.completed", "3", "--message-id", "m-1")
    assert (dup.returncode, dup.stdout.strip()) == (0, "duplicate of seq 2")
    no_payload = aivad(daemon_proc, "publish", "ping.me")
    assert no_payload.returncode == 0
    history = aivad(daemon_proc, "history", "scan.*", "--json")
    assert history.returncode == 0, history.stderr
    page = json.loads(history.stdout)
    assert [(m["seq"], m["payload"]) for m in page["messages"]] == [(1, {"scan_id": "123"}), (2, {"n": 2})]
    assert page["messages"][1]["metadata"] == {"source": "stdin"} and page["last_seq"] == 2
    human = aivad(daemon_proc, "history", "#", "--after", "1", "--limit", "1")
    assert human.returncode == 0
    lines = human.stdout.splitlines()
    assert len(lines) == 1 and "scan.completed" in lines[0] and lines[0].split()[0] == "2"
    empty = aivad(daemon_proc, "history", "nothing.#")
    assert empty.returncode == 0 and empty.stdout == "" and "no messages" in empty.stderr


def test_cli_dlq_list_pages_and_filters(daemon_proc: DaemonProcess) -> None:
    """Three dead tasks (requests nobody worked, abandoned): listed a page at a time, by kind."""
    from websockets.sync.client import connect as ws_connect

    with ws_connect(f"ws://127.0.0.1:{daemon_proc.ws_port}/") as ws:
        for i in range(3):
            ws.send(json.dumps({"op": "request", "type": "nobody.runs", "payload": i, "timeout": 0.05, "ref": i}))
            assert json.loads(ws.recv(10))["ref"] == i
    poll_until(lambda: len(daemon_proc.control({"cmd": "dlq.list"})["dead_letters"]) == 3, 10, "three dead letters")

    first = aivad(daemon_proc, "dlq", "list", "--limit", "2")
    assert first.returncode == 0, first.stderr
    rows = [line.split() for line in first.stdout.splitlines()]
    assert [(row[1], len(row[2])) for row in rows] == [("task", 20)] * 2  # kind, a UTC time to the second
    assert first.stderr == f"more: aivad dlq list --after {rows[1][0]} --limit 2\n"
    rest = aivad(daemon_proc, "dlq", "list", "--after", rows[1][0], "--limit", "2", "--kind", "task")
    assert rest.returncode == 0 and rest.stderr == "", rest.stderr
    assert len(rest.stdout.splitlines()) == 1 and int(rest.stdout.split()[0]) > int(rows[1][0])

    page = json.loads(aivad(daemon_proc, "dlq", "list", "--json", "--limit", "2").stdout)
    assert [d["id"] for d in page["dead_letters"]] == [int(row[0]) for row in rows]
    assert page["next_after"] == int(rows[1][0]) and page["dead_letters"][0]["type"] == "nobody.runs"
    other = aivad(daemon_proc, "dlq", "list", "--kind", "amqp.poison")
    assert (other.returncode, other.stdout, other.stderr) == (0, "", "no dead letters of kind amqp.poison\n")
    assert json.loads(aivad(daemon_proc, "dlq", "list", "--json", "--kind", "redis").stdout) == {
        "dead_letters": [], "next_after": None}
    bad = aivad(daemon_proc, "dlq", "list", "--limit", "0")
    assert bad.returncode != 0 and "limit must be 1..10000" in bad.stderr


def test_cli_tail_prints_messages_as_they_arrive(daemon_proc: DaemonProcess) -> None:
    daemon_proc.control({"cmd": "publish", "type": "t.old", "payload": "old"})
    tail = subprocess.Popen(
        [*_AIVAD, "tail", "t.*", "--since", "0", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "AIVAD_SOCKET": daemon_proc.control_path},
    )
    try:
        assert tail.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(tail.stdout, selectors.EVENT_READ)

            def read_line(timeout_s: float = 10.0) -> dict[str, Any]:
                assert sel.select(timeout_s), "tail printed nothing"
                return dict(json.loads(tail.stdout.readline()))  # type: ignore[union-attr]

            assert read_line()["payload"] == "old"
            daemon_proc.control({"cmd": "publish", "type": "x.no", "payload": "skip"})
            daemon_proc.control({"cmd": "publish", "type": "t.new", "payload": "new"})
            msg = read_line()
            assert (msg["seq"], msg["type"], msg["payload"]) == (3, "t.new", "new")
    finally:
        tail.terminate()
        tail.wait(10)
        tail.stdout.close()  # type: ignore[union-attr]
        tail.stderr.close()  # type: ignore[union-attr]
    assert daemon_proc.control({"cmd": "status"})["ok"]


def test_cli_exit_codes(daemon_proc: DaemonProcess, tmp_dir: Path) -> None:
    cases: dict[str, tuple[tuple[str, ...], str | None]] = {
        "ok": (("status",), None),
        "invalid topic": (("publish", "bad..topic", "1"), None),
        "limit too big": (("history", "#", "--limit", "5000"), None),
        "bad json": (("publish", "a.b", "{not json"), None),
        "bad stdin": (("publish", "a.b", "-"), "nope"),
        "missing TYPE": (("publish",), None),
        "not an int": (("history", "#", "--limit", "many"), None),
        "no such command": (("nosuchcommand",), None),
        "no command": ((), None),
        "unreachable": (("status", "--socket", str(tmp_dir / "nobody-here.sock")), None),
        "missing config": (("status", "--config", str(tmp_dir / "missing.toml")), None),
    }
    with ThreadPoolExecutor(len(cases)) as pool:  # each is a python start-up: run them side by side
        futures = {name: pool.submit(aivad, daemon_proc, *args, input=stdin) for name, (args, stdin) in cases.items()}
        results = {name: future.result() for name, future in futures.items()}
    codes = {name: r.returncode for name, r in results.items()}
    assert codes == {
        "ok": 0,
        "invalid topic": 1, "limit too big": 1,
        "bad json": 2, "bad stdin": 2, "missing TYPE": 2, "not an int": 2, "no such command": 2, "no command": 2,
        "missing config": 2,
        "unreachable": 3,
    }, {name: results[name].stderr for name in codes}
    assert "bad_request" in results["invalid topic"].stderr
    assert "PAYLOAD_JSON" in results["bad json"].stderr
    assert "cannot reach" in results["unreachable"].stderr
    # nothing of that was stored
    assert daemon_proc.control({"cmd": "status"})["status"]["store"]["last_seq"] == 0


def test_cli_help_of_every_subcommand_has_examples() -> None:
    commands = ["serve", "status", "publish", "tail", "history", "drain", "reload"]

    def help_of(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*_AIVAD, command, "--help"], capture_output=True, text=True, timeout=30)

    with ThreadPoolExecutor(len(commands)) as pool:
        results = dict(zip(commands, pool.map(help_of, commands), strict=True))
    for command, result in results.items():
        assert result.returncode == 0, (command, result.stderr)
        assert "examples:" in result.stdout, command
        assert f"aivad {command}" in result.stdout.split("examples:")[1], command


# ---- tail ending: hang-up and slow client ----------------------------------------------------


async def test_a_tail_client_hanging_up_is_not_an_error(
    daemon: InProcessDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(15), caplog.at_level(logging.WARNING, logger="aivad"):
        async with connect(daemon.ws_url) as ws:
            for i in range(300):
                await ws.send({"op": "publish", "type": "t.x", "payload": "p" * 1000, "ref": i})
            for _ in range(300):
                await ws.receive()
        tail = await LineClient.open(daemon.control_path)
        first = await tail.request({"cmd": "tail", "pattern": "#", "since": 0})
        assert first["ok"]
        assert (await tail.read_line())["msg"]["seq"] == 1  # type: ignore[index]
        await trio.sleep(0.2)  # the daemon fills the socket buffer with the rest of the replay
        await tail.aclose()  # hang up with the replay unread, as Ctrl-C on `aivad tail` does
        while (await status(daemon.control_path))["router"]["subscriptions"]:
            await trio.sleep(0.02)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert not errors, [r.getMessage() for r in errors]


async def test_a_slow_tail_client_gets_overloaded_and_is_closed(nursery: trio.Nursery, tmp_dir: Path) -> None:
    d = await start_daemon(nursery, tmp_dir, control={"tail_buffer_lines": 16})
    with trio.fail_after(30):
        tail = await LineClient.open(d.control_path)
        try:
            assert (await tail.request({"cmd": "tail", "pattern": "#"}))["ok"]
            async with connect(d.ws_url) as ws:  # flood while the tail reads nothing
                for start in range(0, 1000, 100):
                    for i in range(start, start + 100):
                        await ws.send({"op": "publish", "type": "flood", "payload": "p" * 4000, "ref": i})
                    for _ in range(100):
                        await ws.receive()
            lines = []
            with trio.move_on_after(2):
                while (line := await tail.read_line()) is not None:
                    lines.append(line)
            seqs = [line["msg"]["seq"] for line in lines if line.get("op") == "message"]
            assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) < 1000
            errors = [line for line in lines if line.get("ok") is False]
            assert [e["error"]["code"] for e in errors] == ["overloaded"], errors
            assert line is None, "the session is closed after overloaded"
        finally:
            await tail.aclose()
        assert (await call(d.control_path, {"cmd": "publish", "type": "after", "payload": None}))["seq"] == 1001
