"""Epoch and the per-peer bounds of issue 9 (DESIGN §4.3, §4.8 "Limits"), against real daemons.

Test policy for this module: each bound is set small in the daemon's config and
then hit for real — over a real WebSocket, with real frames — and each test shows
both sides: the peer that hit it gets the documented error or close, and nothing
it was refused is stored, delivered or dispatched.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import sqlite3
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed

from tests.conftest import (
    DaemonProcess,
    InProcessDaemon,
    control_async,
    reload_daemon,
    start_daemon,
    start_daemon_from_file,
)
from tests.hostile import check_upgrade, encode_frame, handshake_request, read_http_head
from tests.wsclient import connect, no_more_messages


async def test_publish_needs_a_payload_and_null_is_one(daemon: InProcessDaemon) -> None:
    with trio.fail_after(10):
        async with connect(daemon.ws_url) as c:
            missing = await c.request({"op": "publish", "type": "a.b"})
            assert (missing["op"], missing["code"]) == ("error", "bad_request"), missing
            assert "payload" in missing["message"]
            assert (await c.publish("a.b", None))["seq"] == 1
            history = await c.ok({"op": "history", "pattern": "#"})
            assert [m["payload"] for m in history["messages"]] == [None]


async def test_epoch_is_made_with_the_history_and_a_stranger_epoch_replays_from_the_oldest(tmp_dir: Path) -> None:
    first_dir, second_dir = tmp_dir / "one", tmp_dir / "two"
    first_dir.mkdir()
    second_dir.mkdir()
    proc = DaemonProcess(first_dir, store={"retention_max_messages": 3, "retention_interval_s": 0.1})
    proc.start()
    try:
        with trio.fail_after(20):
            async with connect(proc.ws_url) as c:
                ok = await c.ok({"op": "subscribe", "pattern": "e.#"})
                epoch = ok["epoch"]
                assert isinstance(epoch, str) and 0 < len(epoch) <= 64
                for i in range(6):
                    await c.publish("e.x", i)
                await c.messages(6)
                # retention keeps the newest 3 (seq 4..6)
                while len((await c.ok({"op": "history", "pattern": "e.#"}))["messages"]) > 3:
                    await trio.sleep(0.05)
                await c.ok({"op": "unsubscribe", "pattern": "e.#"})
                # the same epoch: an ordinary resume
                same = await c.ok({"op": "subscribe", "pattern": "e.#", "since": 5, "epoch": epoch})
                assert (same["recovered"], same["epoch"], "epoch_changed" in same) == (True, epoch, False)
                assert [m["msg"]["seq"] for m in await c.messages(1)] == [6]
                await c.ok({"op": "unsubscribe", "pattern": "e.#"})
                # another epoch: since means nothing here; replay from the oldest kept
                other = await c.ok({"op": "subscribe", "pattern": "e.#", "since": 5, "epoch": "not-this-one"})
                assert (other["recovered"], other["epoch_changed"], other["epoch"]) == (False, True, epoch)
                assert [m["msg"]["seq"] for m in await c.messages(3)] == [4, 5, 6]
                await c.ok({"op": "unsubscribe", "pattern": "e.#"})
                # a since above the newest seq: the history it knew is gone
                ahead = await c.ok({"op": "subscribe", "pattern": "e.#", "since": 99})
                assert (ahead["recovered"], ahead["last_seq"], "gap" in ahead) == (False, 6, False)
                assert [m["msg"]["seq"] for m in await c.messages(3)] == [4, 5, 6]
                assert await no_more_messages(c)
        proc.stop()
        proc.start()  # the same database: the same epoch
        async with connect(proc.ws_url) as c:
            assert (await c.ok({"op": "subscribe", "pattern": "e.#"}))["epoch"] == epoch
        proc.stop()
        shutil.copy(proc.config_path, second_dir / "config.toml")
        fresh = DaemonProcess(second_dir)  # a new database: a new epoch
        fresh.start()
        try:
            async with connect(fresh.ws_url) as c:
                reply = await c.ok({"op": "subscribe", "pattern": "e.#", "since": 5, "epoch": epoch})
                assert reply["epoch"] != epoch and reply["epoch_changed"] is True and reply["recovered"] is False
        finally:
            fresh.stop()
    finally:
        proc.stop()


async def test_an_epoch_that_is_not_a_short_string_is_bad_request(daemon: InProcessDaemon) -> None:
    with trio.fail_after(10):
        async with connect(daemon.ws_url) as c:
            for epoch in (5, "", "e" * 65, ["x"]):
                reply = await c.request({"op": "subscribe", "pattern": "a", "epoch": epoch})
                assert (reply["op"], reply["code"]) == ("error", "bad_request"), (epoch, reply)
            assert (await c.ok({"op": "subscribe", "pattern": "a", "epoch": "e" * 64}))["epoch_changed"] is True


async def test_publish_and_dispatch_rates_per_connection(nursery: trio.Nursery, tmp_dir: Path) -> None:
    """A burst of 5 with (nearly) no refill: the sixth publish and dispatch are overloaded and not
    stored; another connection has its own bucket."""
    d = await start_daemon(nursery, tmp_dir, limits={"publish_rate_per_s": 0.001, "publish_burst": 5,
                                                     "dispatch_rate_per_s": 0.001, "dispatch_burst": 5})
    with trio.fail_after(10):
        async with connect(d.ws_url) as flood, connect(d.ws_url) as other:
            replies = [await flood.request({"op": "publish", "type": "f.x", "payload": i}) for i in range(7)]
            assert [r["op"] for r in replies] == ["ok"] * 5 + ["error"] * 2
            assert replies[5]["code"] == "overloaded"
            tasks = [await flood.request({"op": "dispatch", "type": "t.x", "payload": i}) for i in range(6)]
            assert [r["op"] for r in tasks] == ["ok"] * 5 + ["error"]
            assert tasks[5]["code"] == "overloaded"
            assert (await other.publish("f.x", "mine"))["op"] == "ok"
            history = await other.ok({"op": "history", "pattern": "f.#"})
            assert [m["payload"] for m in history["messages"]] == [0, 1, 2, 3, 4, "mine"]


async def test_history_scans_a_bounded_number_of_rows_and_paging_moves_on(nursery: trio.Nursery, tmp_dir: Path) -> None:
    d = await start_daemon(nursery, tmp_dir, store={"history_scan_rows": 100})
    with trio.fail_after(20):
        async with connect(d.ws_url) as c:
            for i in range(350):
                await c.publish("noise.x", i)
            await c.publish("rare.y", "needle")
            after, pages, found = 0, 0, []
            while True:
                page = await c.ok({"op": "history", "pattern": "*.y", "after": after, "limit": 10})
                found += page["messages"]
                pages += 1
                if page["last_seq"] == after:
                    break
                assert page["last_seq"] <= after + 100  # never more than the budget per call
                after = page["last_seq"]
            assert [m["payload"] for m in found] == ["needle"] and pages == 5
            # an exact type uses the index: no budget, found at once
            exact = await c.ok({"op": "history", "pattern": "rare.y", "after": 0, "limit": 10})
            assert [m["seq"] for m in exact["messages"]] == [351]


async def test_a_client_that_reads_nothing_while_big_messages_flow_is_closed_4008(tmp_dir: Path) -> None:
    """The bound is in bytes: 8 messages of 300 KB overflow a 1 MB send buffer long before 1024
    frames would; the stalled client is closed with 4008 and the daemon's memory stays flat."""
    proc = DaemonProcess(tmp_dir, websocket={"send_buffer_bytes": 1_000_000, "max_frame_bytes": 400_000})
    proc.start()
    try:
        assert proc.proc is not None
        with trio.fail_after(30):
            async with connect(proc.ws_url) as stalled, connect(proc.ws_url) as pub, connect(proc.ws_url) as ok:
                await stalled.ok({"op": "subscribe", "pattern": "big.#"})
                await ok.ok({"op": "subscribe", "pattern": "big.#"})
                # the stalled client stops reading: its socket buffers fill, then the daemon's outbox
                rss_before = _rss_kb(proc.proc.pid)
                big = "x" * 300_000
                for _ in range(40):
                    await pub.publish("big.blob", big)
                    await ok.next_message()
                status = proc.control({"cmd": "status"})["status"]
                assert status["websocket"]["slow_consumer_closes"] == 1, status["websocket"]
                assert _rss_kb(proc.proc.pid) - rss_before < 30_000  # 40 x 300 KB flowed; far less stayed
                assert (await ok.ok({"op": "ping"}))["op"] == "pong"
                with pytest.raises(ConnectionClosed) as closed:  # what it had been sent, then the close
                    while True:
                        await stalled.ws.get_message()
                assert closed.value.reason.code == 4008
    finally:
        proc.stop()


async def test_one_message_bigger_than_the_send_buffer_reaches_a_client_that_keeps_up(tmp_dir: Path) -> None:
    """send_buffer_bytes bounds what waits for a client, not the size of one message: a subscriber
    with nothing queued gets a 300 KB message through a 64 KiB buffer and stays connected."""
    proc = DaemonProcess(tmp_dir, websocket={"send_buffer_bytes": 65536, "max_frame_bytes": 400_000})
    proc.start()
    try:
        with trio.fail_after(30):
            async with connect(proc.ws_url) as sub, connect(proc.ws_url) as pub:
                await sub.ok({"op": "subscribe", "pattern": "big.#"})
                for i in range(3):
                    await pub.publish("big.blob", str(i) * 300_000)
                    assert (await sub.next_message())["msg"]["payload"] == str(i) * 300_000
                assert proc.control({"cmd": "status"})["status"]["websocket"]["slow_consumer_closes"] == 0
                assert (await sub.ok({"op": "ping"}))["op"] == "pong"
    finally:
        proc.stop()


async def test_a_reload_of_limits_reaches_connections_already_open(nursery: trio.Nursery, tmp_dir: Path) -> None:
    """[limits] is live: a connection opened under a rate of 2 publishes gets the new rate at once."""
    tight = {"publish_rate_per_s": 0.001, "publish_burst": 2}
    d = await start_daemon_from_file(nursery, tmp_dir, limits=tight)
    with trio.fail_after(10):
        async with connect(d.ws_url) as c:
            replies = [await c.request({"op": "publish", "type": "r.x", "payload": i}) for i in range(3)]
            assert [r["op"] for r in replies] == ["ok", "ok", "error"]
            reply = await reload_daemon(d, tmp_dir, limits={"publish_rate_per_s": 0.0})
            assert reply["ok"] is True, reply
            replies = [await c.request({"op": "publish", "type": "r.x", "payload": i}) for i in range(20)]
            assert {r["op"] for r in replies} == {"ok"}  # no limit now, on the same connection
            await reload_daemon(d, tmp_dir, limits=tight)
            replies = [await c.request({"op": "publish", "type": "r.x", "payload": i}) for i in range(3)]
            assert [r["op"] for r in replies] == ["error"] * 3  # limited again: its burst was spent before


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _stalled_subscriber(port: int, pattern: str) -> socket.socket:
    """A subscriber that never reads after its subscribe is answered: a raw socket, not a client
    library whose reader task would go on reading (and close 1009 on a message over its own limit)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(handshake_request("127.0.0.1", port, key=key))
    head, rest = read_http_head(sock, 10)
    check_upgrade(head, key)
    sock.sendall(encode_frame(0x1, json.dumps({"op": "subscribe", "pattern": pattern}).encode()))
    while b'"op":"ok"' not in rest:
        rest += sock.recv(4096)
    return sock


async def test_a_write_that_makes_no_way_ends_the_connection_after_write_timeout_s(tmp_dir: Path) -> None:
    """A subscriber that reads nothing, fed too little to fill its send buffer: the write the daemon
    has begun cannot finish, and after write_timeout_s the connection is cut (a slow consumer)."""
    proc = DaemonProcess(tmp_dir, websocket={"write_timeout_s": 1.0, "max_frame_bytes": 2_000_000})
    proc.start()
    stalled = _stalled_subscriber(proc.ws_port, "big.#")
    try:
        with trio.fail_after(30):
            async with connect(proc.ws_url) as pub:
                for _ in range(4):  # 6 MB: more than the socket buffers hold, less than send_buffer_bytes
                    await pub.publish("big.blob", "x" * 1_500_000)
                while proc.control({"cmd": "status"})["status"]["websocket"]["slow_consumer_closes"] < 1:
                    await trio.sleep(0.1)
                assert (await pub.ok({"op": "ping"}))["op"] == "pong"
                while proc.control({"cmd": "status"})["status"]["websocket"]["connections"] > 1:
                    await trio.sleep(0.1)
    finally:
        stalled.close()
        proc.stop()


def _lock_the_store(path: str) -> sqlite3.Connection:
    """Another process's write lock on the daemon's real database: its commits wait (busy_timeout)."""
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    return blocker


async def test_max_inflight_publishes_counts_publishes_awaiting_their_commit(nursery: trio.Nursery,
                                                                            tmp_dir: Path) -> None:
    """With commits held, a client that pipelines 100 publishes has at most max_inflight_publishes
    of them submitted: one write is committing and the writes waiting behind it hold the rest of the
    4 permits, one publish at least each — at most 3 writes, not one per batch read."""
    d = await start_daemon(nursery, tmp_dir, websocket={"max_inflight_publishes": 4})
    async with connect(d.ws_url) as c:
        await c.publish("warm.up", 0)
        blocker = _lock_the_store(d.cfg.store.path)
        try:
            for i in range(100):
                await c.send({"op": "publish", "type": "inflight.x", "payload": i, "ref": i})
            await trio.sleep(0.5)
            store = (await control_async(d.control_path, {"cmd": "status"}))["status"]["store"]
            assert store["write_queue_depth"] <= 3, store["write_queue_depth"]
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        with trio.fail_after(20):
            replies = [await c.receive() for _ in range(100)]
        assert [r["ref"] for r in replies] == list(range(100)) and {r["op"] for r in replies} == {"ok"}


async def test_a_history_page_is_bounded_in_bytes_and_paging_moves_on(nursery: trio.Nursery, tmp_dir: Path) -> None:
    d = await start_daemon(nursery, tmp_dir, limits={"history_page_bytes": 65536})
    with trio.fail_after(20):
        async with connect(d.ws_url) as c:
            for i in range(10):
                await c.publish("page.x", f"{i}" + "x" * 20_000)  # ~20 KB each: 3 fit in 64 KiB
            after, pages, seen = 0, [], []
            while True:
                page = await c.ok({"op": "history", "pattern": "page.#", "after": after, "limit": 100})
                if page["last_seq"] == after:
                    break
                pages.append(len(page["messages"]))
                seen += [m["payload"][0] for m in page["messages"]]
                after = page["last_seq"]
    assert seen == [str(i) for i in range(10)] and max(pages) == 3 and len(pages) == 4
