"""The WebSocket protocol of DESIGN §4.3 against an in-process daemon over real sockets.

Each test runs under a real ``trio.fail_after`` (no autojump with real sockets).
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import websockets
import websockets.sync.client as ws_sync
from trio_websocket import open_websocket_url

from tests.conftest import InProcessDaemon, control_async, reload_daemon, start_daemon, start_daemon_from_file
from tests.wsclient import connect, no_more_messages


async def test_publish_then_subscribers_get_it_once_with_seq(daemon: InProcessDaemon) -> None:
    with trio.fail_after(10):
        async with connect(daemon.ws_url) as sub, connect(daemon.ws_url) as pub:
            ok = await sub.ok({"op": "subscribe", "pattern": "scan.*"})
            assert ok["pattern"] == "scan.*" and ok["recovered"] is True and ok["last_seq"] == 0
            reply = await pub.publish("scan.completed", {"scan_id": "123"}, metadata={"source": "scanner"})
            assert reply == {"op": "ok", "ref": reply["ref"], "seq": 1, "duplicate": False}
            await pub.publish("scan.a.b", 1)  # does not match scan.*
            frame = await sub.next_message()
            assert frame["op"] == "message" and frame["pattern"] == "scan.*"
            msg = frame["msg"]
            assert msg["seq"] == 1 and msg["type"] == "scan.completed" and msg["payload"] == {"scan_id": "123"}
            assert msg["metadata"] == {"source": "scanner"} and msg["message_id"] and msg["timestamp"].endswith("Z")
            assert await no_more_messages(sub)


async def test_duplicate_message_id_answers_original_seq_and_is_not_delivered(daemon: InProcessDaemon) -> None:
    with trio.fail_after(10):
        async with connect(daemon.ws_url) as sub, connect(daemon.ws_url) as pub:
            await sub.ok({"op": "subscribe", "pattern": "#"})
            first = await pub.publish("a.b", 1, message_id="m-1")
            again = await pub.publish("a.b", 2, message_id="m-1")
            assert (first["seq"], first["duplicate"]) == (1, False)
            assert (again["seq"], again["duplicate"]) == (1, True)
            assert (await sub.next_message())["msg"]["payload"] == 1
            assert await no_more_messages(sub)


async def test_seq_from_producer_is_ignored(daemon: InProcessDaemon) -> None:
    with trio.fail_after(10):
        async with connect(daemon.ws_url) as c:
            await c.publish("x", 1)
            reply = await c.publish("x", 2, seq=999)
            assert reply["seq"] == 2


async def test_one_message_several_patterns_of_one_connection(daemon: InProcessDaemon) -> None:
    with trio.fail_after(10):
        async with connect(daemon.ws_url) as c:
            for pattern in ("#", "a.*", "a.b", "*.b", "x.#"):
                await c.ok({"op": "subscribe", "pattern": pattern})
            await c.publish("a.b", "hi")
            frames = await c.messages(4)
            assert sorted(f["pattern"] for f in frames) == ["#", "*.b", "a.*", "a.b"]
            assert {f["msg"]["seq"] for f in frames} == {1}
            assert await no_more_messages(c)


async def test_unsubscribe_stops_delivery_and_unknown_is_not_found(daemon: InProcessDaemon) -> None:
    with trio.fail_after(10):
        async with connect(daemon.ws_url) as c:
            await c.ok({"op": "subscribe", "pattern": "t"})
            assert (await c.ok({"op": "unsubscribe", "pattern": "t"}))["pattern"] == "t"
            await c.publish("t", 1)
            assert await no_more_messages(c)
            reply = await c.request({"op": "unsubscribe", "pattern": "t"})
            assert reply["op"] == "error" and reply["code"] == "not_found"


async def test_history_pages_by_last_seq(daemon: InProcessDaemon) -> None:
    with trio.fail_after(10):
        async with connect(daemon.ws_url) as c:
            for i in range(5):
                await c.publish(f"notifications.frontend.evt-42.{'chat' if i % 2 else 'status'}", i)
                await c.publish("other.topic", i)
            page = await c.ok({"op": "history", "pattern": "notifications.frontend.evt-42.#", "limit": 2})
            assert [m["payload"] for m in page["messages"]] == [0, 1]
            page2 = await c.ok({"op": "history", "pattern": "notifications.frontend.evt-42.#",
                                "after": page["last_seq"], "limit": 100})
            assert [m["payload"] for m in page2["messages"]] == [2, 3, 4]
            empty = await c.ok({"op": "history", "pattern": "notifications.frontend.evt-42.#",
                                "after": page2["last_seq"]})
            assert empty["messages"] == [] and empty["last_seq"] == page2["last_seq"]
            chats = await c.ok({"op": "history", "pattern": "*.*.*.chat"})
            assert [m["payload"] for m in chats["messages"]] == [1, 3]
            exact = await c.ok({"op": "history", "pattern": "other.topic", "after": 4})
            assert all(m["seq"] > 4 and m["type"] == "other.topic" for m in exact["messages"])


async def test_subscribe_since_replays_then_goes_live_without_gap_or_duplicate(daemon: InProcessDaemon) -> None:
    with trio.fail_after(20):
        async with connect(daemon.ws_url) as pub:
            for i in range(1200):  # more than one replay batch
                await pub.send({"op": "publish", "type": "r.x" if i % 3 else "r.y", "payload": i, "ref": i})
            for _ in range(1200):
                await pub.receive()
            async with connect(daemon.ws_url) as sub:
                ok = await sub.ok({"op": "subscribe", "pattern": "r.x", "since": 100})
                assert ok["last_seq"] == 1200 and ok["recovered"] is True
                await pub.publish("r.x", "live")
                expected = [s for s in range(101, 1201) if (s - 1) % 3] + [1201]
                got = [f["msg"]["seq"] for f in await sub.messages(len(expected))]
                assert got == expected
                assert await no_more_messages(sub)


async def test_resume_race_while_others_publish(daemon: InProcessDaemon) -> None:
    """Subscribers resume from random points while publishers run: every seq once, ascending."""
    total = 600
    with trio.fail_after(30):
        async with connect(daemon.ws_url) as pub:
            for i in range(200):
                await pub.publish("race.t", i)

            async def publisher() -> None:
                async with connect(daemon.ws_url) as p:
                    for i in range(200, total):
                        await p.publish("race.t", i)

            async def resumer(since: int) -> None:
                async with connect(daemon.ws_url) as s:
                    await s.ok({"op": "subscribe", "pattern": "race.#", "since": since})
                    got = [f["msg"]["seq"] for f in await s.messages(total - since)]
                    assert got == list(range(since + 1, total + 1))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(publisher)
                for since in (0, 50, 150, 199):
                    nursery.start_soon(resumer, since)
                    await trio.sleep(0.01)


async def test_bad_frames_get_errors_and_the_connection_stays_open(daemon: InProcessDaemon) -> None:
    cases = [
        ("not json", "bad_json", None),
        ("[1, 2]", "bad_request", None),
        ('"a string"', "bad_request", None),
        (json.dumps({"ref": 1}), "bad_request", 1),
        (json.dumps({"op": "fly", "ref": "r"}), "unknown_op", "r"),
        (json.dumps({"op": 7, "ref": 2}), "bad_request", 2),
        (json.dumps({"op": "publish", "ref": 3}), "bad_request", 3),
        (json.dumps({"op": "publish", "type": "bad..topic", "ref": 4}), "bad_request", 4),
        (json.dumps({"op": "publish", "type": "x" * 256, "ref": 5}), "bad_request", 5),
        (json.dumps({"op": "publish", "type": "a b", "ref": 6}), "bad_request", 6),
        (json.dumps({"op": "publish", "type": "ok", "metadata": [1], "ref": 7}), "bad_request", 7),
        (json.dumps({"op": "publish", "type": "ok", "message_id": 5, "ref": 8}), "bad_request", 8),
        (json.dumps({"op": "subscribe", "pattern": "a.**", "ref": 9}), "bad_request", 9),
        (json.dumps({"op": "subscribe", "ref": 10}), "bad_request", 10),
        (json.dumps({"op": "subscribe", "pattern": "a", "since": -1, "ref": 11}), "bad_request", 11),
        (json.dumps({"op": "subscribe", "pattern": "a", "since": "5", "ref": 12}), "bad_request", 12),
        (json.dumps({"op": "history", "pattern": "#", "limit": 1001, "ref": 13}), "bad_request", 13),
        (json.dumps({"op": "history", "pattern": "#", "limit": True, "ref": 14}), "bad_request", 14),
        (json.dumps({"op": "ping", "ref": {"nested": 1}}), "bad_request", None),
        ("[" * 100_000 + "]" * 100_000, "bad_json", None),
        # Python reads these, no browser does (RFC 8259): refused, so never stored and sent on
        ('{"op":"publish","type":"nan.t","payload":NaN,"ref":15}', "bad_json", None),
        ('{"op":"publish","type":"inf.t","payload":{"x":[-Infinity]},"ref":16}', "bad_json", None),
        ('{"op":"publish","type":"big.t","payload":1e999,"ref":17}', "bad_json", None),
        (b"\x00\x01binary", "bad_request", None),
    ]
    with trio.fail_after(10):
        async with connect(daemon.ws_url) as c:
            for frame, code, ref in cases:
                await c.send(frame)
                reply = await c.receive()
                assert reply["op"] == "error" and reply["code"] == code, (frame[:40], reply)
                assert reply["ref"] == ref and reply["message"]
            assert (await c.publish("still.works", 1))["seq"] == 1


async def test_oversize_frame_closes_1009_and_others_are_untouched(nursery: trio.Nursery, tmp_dir) -> None:  # type: ignore[no-untyped-def]
    d = await start_daemon(nursery, tmp_dir, websocket={"max_frame_bytes": 4096})
    with trio.fail_after(10):
        async with connect(d.ws_url) as bystander:
            await bystander.ok({"op": "subscribe", "pattern": "#"})

            def oversize() -> int:  # a client not built on trio: the websockets library
                with ws_sync.connect(d.ws_url, max_size=None) as ws:
                    ws.send(json.dumps({"op": "publish", "type": "big", "payload": "x" * 5000}))
                    with pytest.raises(websockets.ConnectionClosed) as closed:
                        ws.recv()
                    assert closed.value.rcvd is not None
                    return closed.value.rcvd.code

            assert await trio.to_thread.run_sync(oversize) == 1009
            assert (await bystander.publish("after.big", 1))["seq"] == 1
            assert (await bystander.next_message())["msg"]["type"] == "after.big"
            # counted by close code, and a handshake that never completes by why
            with trio.socket.socket() as half:
                await half.connect(("127.0.0.1", d.endpoints.ws_port))
                await half.send(b"GET / HTTP/1.1\r\nHost: x\r\n")  # ... and then nothing, and gone
            ws = (await control_async(d.control_path, {"cmd": "status"}))["status"]["websocket"]
            while ws["refused"].get("handshake_incomplete", 0) < 1:
                await trio.sleep(0.05)
                ws = (await control_async(d.control_path, {"cmd": "status"}))["status"]["websocket"]
            assert ws["closes"] == {"1009": 1}


async def test_subscription_limit_is_overloaded_not_a_crash(nursery: trio.Nursery, tmp_dir) -> None:  # type: ignore[no-untyped-def]
    d = await start_daemon(nursery, tmp_dir, websocket={"max_subscriptions": 3000})
    with trio.fail_after(60):
        async with connect(d.ws_url) as c:
            for start in range(0, 3000, 500):  # pipelined, in windows the buffers can hold
                for i in range(start, start + 500):
                    await c.send({"op": "subscribe", "pattern": f"p.{i}.#", "ref": i})
                replies = [await c.receive() for _ in range(500)]
                assert all(r["op"] == "ok" for r in replies)
            reply = await c.request({"op": "subscribe", "pattern": "one.more"})
            assert reply["code"] == "overloaded"
            dup = await c.request({"op": "subscribe", "pattern": "p.7.#"})
            assert dup["code"] == "bad_request"
            await c.publish("p.2999.z", 1)
            frame = await c.next_message()
            assert frame["pattern"] == "p.2999.#"


async def test_slow_consumer_is_closed_4008_and_resumes_without_loss(nursery: trio.Nursery, tmp_dir) -> None:  # type: ignore[no-untyped-def]
    d = await start_daemon(nursery, tmp_dir, websocket={"send_buffer_frames": 16})
    payload = "y" * 20_000  # large frames fill the socket buffers quickly

    def flood_a_client_that_reads_nothing() -> tuple[list[int], int]:
        """Runs in a thread on the websockets library (a client not built on trio)."""
        with ws_sync.connect(d.ws_url, max_queue=1) as slow:
            slow.send(json.dumps({"op": "subscribe", "pattern": "flood", "ref": 1}))
            assert json.loads(slow.recv())["op"] == "ok"
            with ws_sync.connect(d.ws_url) as pub:
                for i in range(400):
                    pub.send(json.dumps({"op": "publish", "type": "flood", "payload": {"i": i, "pad": payload}}))
                    assert json.loads(pub.recv())["op"] == "ok"
            seen = []
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    seen.append(json.loads(slow.recv())["msg"]["seq"])
            assert closed.value.rcvd is not None
            return seen, closed.value.rcvd.code

    with trio.fail_after(60):
        seen, code = await trio.to_thread.run_sync(flood_a_client_that_reads_nothing)
        assert code == 4008
        async with connect(d.ws_url) as again:
            # every flood message, in seq order (the daemon's own system.alert of the close has a seq too)
            stored: list[int] = []
            while len(stored) < 400:
                page = await again.ok({"op": "history", "pattern": "flood", "after": stored[-1] if stored else 0,
                                       "limit": 40})
                stored += [m["seq"] for m in page["messages"]]
            assert seen == stored[: len(seen)] and len(seen) < 400
            await again.ok({"op": "subscribe", "pattern": "flood", "since": seen[-1] if seen else 0})
            rest = [f["msg"]["seq"] for f in await again.messages(400 - len(seen))]
            assert seen + rest == stored


async def test_a_broken_connection_does_not_touch_another(daemon: InProcessDaemon) -> None:
    with trio.fail_after(10):
        async with connect(daemon.ws_url) as healthy:
            await healthy.ok({"op": "subscribe", "pattern": "#"})
            stream = await trio.open_tcp_stream("127.0.0.1", int(daemon.ws_url.rsplit(":", 1)[1].strip("/")))
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n garbage \x00\xff")
            await stream.aclose()
            async with open_websocket_url(daemon.ws_url) as ws:
                await ws.send_message(json.dumps({"op": "subscribe", "pattern": "#", "ref": 1}))
            await healthy.publish("still.here", 1)
            assert (await healthy.next_message())["msg"]["type"] == "still.here"


async def test_ping_pong_and_any_path(daemon: InProcessDaemon) -> None:
    with trio.fail_after(10):
        async with connect(daemon.ws_url + "some/path?x=1") as c:
            assert await c.request({"op": "ping", "ref": "p"}) == {"op": "pong", "ref": "p"}


async def test_a_client_that_stops_reading_then_vanishes_is_released(nursery: trio.Nursery, tmp_dir) -> None:  # type: ignore[no-untyped-def]
    """Its reader is blocked on a full outbox when the peer goes: the connection must still end."""
    d = await start_daemon(nursery, tmp_dir, websocket={"send_buffer_frames": 16})

    def ping_without_reading() -> None:
        with ws_sync.connect(d.ws_url) as ws:
            for i in range(20_000):  # pongs pile up: the kernel buffers fill, then the outbox
                ws.send(json.dumps({"op": "ping", "ref": i, "pad": "z" * 200}))
            ws.socket.close()  # vanish without a closing handshake

    with trio.fail_after(30):
        with contextlib.suppress(Exception):
            await trio.to_thread.run_sync(ping_without_reading)
        stream = await trio.open_unix_socket(d.control_path)
        async with stream:
            while True:
                await stream.send_all(b'{"cmd":"status"}\n')
                line = b""
                while not line.endswith(b"\n"):
                    line += await stream.receive_some(65536)
                if json.loads(line)["status"]["websocket"]["connections"] == 0:
                    break
                await trio.sleep(0.05)


def _retention_settled(history: list[dict[str, Any]]) -> bool:
    """The daemon's system.alert of the slow consumer's close is stored (asynchronously, a moment
    after the close) and retention has brought the history back to its 10 newest: only then can a
    resume be sure no retention pass deletes what its replay has not reached."""
    alerted = any(m["type"] == "system.alert" and m["payload"]["code"] == "slow_consumer" for m in history)
    return alerted and len(history) <= 10


async def test_retention_overtaking_a_stalled_replay_closes_4008_and_the_resume_reports_the_gap(
    nursery: trio.Nursery, tmp_dir: Path
) -> None:
    """A client stalls in the middle of a deep replay; retention (turned on by a reload) then
    deletes past its position. It must not be handed the messages after the hole as if they
    followed: it is closed 4008, and its resume is told the exact gap."""
    sections: dict[str, dict[str, Any]] = {
        "websocket": {"send_buffer_frames": 16, "replay_batch": 20},
        "store": {"retention_max_messages": 0, "retention_interval_s": 0.05},  # none while history is written
    }
    d = await start_daemon_from_file(nursery, tmp_dir, **sections)
    total, pad = 400, "z" * 64_000  # 25 MB: far more than the socket buffers hold
    stalled, go = threading.Event(), threading.Event()

    def stall_in_the_replay() -> tuple[list[int], int]:
        """On the websockets library in a thread: read one message, stop reading, then read to the close."""
        with ws_sync.connect(d.ws_url, max_queue=1, max_size=None) as slow:
            slow.send(json.dumps({"op": "subscribe", "pattern": "bulk", "since": 0, "ref": 1}))
            assert json.loads(slow.recv())["recovered"] is True
            seen = [json.loads(slow.recv())["msg"]["seq"]]
            stalled.set()
            go.wait(30)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:  # (bounded: a daemon that skips the hole never closes, the test must still end)
                    seen.append(json.loads(slow.recv(timeout=10))["msg"]["seq"])
            assert closed.value.rcvd is not None
            return seen, closed.value.rcvd.code

    with trio.fail_after(60):
        async with connect(d.ws_url) as pub:
            for i in range(total):
                await pub.publish("bulk", {"i": i, "pad": pad})
        result: list[tuple[list[int], int]] = []

        async def run_slow_client() -> None:
            result.append(await trio.to_thread.run_sync(stall_in_the_replay))

        async with trio.open_nursery() as inner:
            inner.start_soon(run_slow_client)
            await trio.to_thread.run_sync(stalled.wait, 30)
            await trio.sleep(0.3)  # the replay fills the socket buffers and the outbox, then waits
            sections["store"]["retention_max_messages"] = 10
            reply = await reload_daemon(d, tmp_dir, **sections)
            assert "store.retention_max_messages" in reply["applied"], reply
            async with connect(d.ws_url) as c:
                while len((await c.ok({"op": "history", "pattern": "bulk", "limit": 11}))["messages"]) > 10:
                    await trio.sleep(0.05)
            go.set()
        seen, code = result[0]
        assert code == 4008
        assert seen == list(range(1, len(seen) + 1)), "no message after the hole was handed on"
        assert len(seen) < total - 10
        async with connect(d.ws_url) as again:
            while not _retention_settled((await again.ok({"op": "history", "pattern": "#", "limit": 11}))["messages"]):
                await trio.sleep(0.05)
            resumed = await again.ok({"op": "subscribe", "pattern": "bulk", "since": seen[-1]})
            assert resumed["recovered"] is False
            # the hole ends where retention stopped (the daemon's own system.alert of the close counts
            # among the 10 newest messages it keeps, so fewer than 10 of them may be bulk); the replay
            # starts right after it
            first, floor = resumed["gap"]
            assert first == seen[-1] + 1 and total - 10 <= floor < total
            assert [f["msg"]["seq"] for f in await again.messages(total - floor)] == list(range(floor + 1, total + 1))
