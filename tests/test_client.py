"""The Python client (``aivad.client``) against the real daemon, plus its WebSocket transport.

Test policy for this module:

- The transport (``aivad.client._ws``) is tested against a tiny wsproto server
  written here, because the daemon never fragments, pings or over-sends: those
  paths need a peer we control byte for byte.
- Everything else talks to a real daemon: in process (``daemon`` /
  ``start_daemon``) for speed, a real ``aivad serve`` (``daemon_proc``) where a
  signal, a SIGKILL or a second event loop is the point.
- Reconnect tests take the daemon away for real (cancel it, SIGKILL it, drain
  it, make it close 4008) and assert the one promise: every message once, in
  ascending seq, no gap.
- The client runs under trio (pytest-trio), under asyncio (``anyio.run`` in a
  sync test) and through the blocking facade.
- Real sockets: a real ``trio.fail_after``, never autojump.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)

import aivad.client
from aivad.client import (
    AivadConnectionError,
    AivadError,
    BlockingClient,
    ClientOptions,
    Envelope,
    Gap,
)
from aivad.client._ws import HandshakeRejected, WebSocketClosed, connect_websocket, parse_ws_url
from aivad.envelope import BadMessage
from tests.conftest import DaemonProcess, InProcessDaemon, start_daemon

FAST = ClientOptions(reconnect_initial_s=0.02, reconnect_max_s=0.2, request_timeout_s=10.0)


async def daemon_in_scope(
    nursery: trio.Nursery, directory: Path, **sections: dict[str, Any]
) -> tuple[InProcessDaemon, trio.CancelScope]:
    """An in-process daemon with its own cancel scope, so a test can kill and restart it."""

    async def run(*, task_status: trio.TaskStatus[tuple[InProcessDaemon, trio.CancelScope]]) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                task_status.started((await start_daemon(inner, directory, **sections), scope))

    result: tuple[InProcessDaemon, trio.CancelScope] = await nursery.start(run)
    return result


# ---- a scripted wsproto server for the transport --------------------------------


@asynccontextmanager
async def scripted_server(script: Callable[[trio.SocketStream, WSConnection], Any]) -> AsyncIterator[str]:
    """Serve one WebSocket handshake per connection, then run ``script(stream, ws)``."""

    async def handle(stream: trio.SocketStream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        while True:
            ws.receive_data(await stream.receive_some(65536))
            events = list(ws.events())
            if any(isinstance(e, Request) for e in events):
                await stream.send_all(ws.send(AcceptConnection()))
                break
        await script(stream, ws)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield f"ws://127.0.0.1:{port}/some/path?x=1"
        nursery.cancel_scope.cancel()


async def next_events(stream: trio.SocketStream, ws: WSConnection) -> list[Any]:
    while True:
        events = list(ws.events())
        if events:
            return events
        data = await stream.receive_some(65536)
        ws.receive_data(data or None)


def test_parse_ws_url() -> None:
    assert parse_ws_url("ws://127.0.0.1:8765/") == ("127.0.0.1", 8765, "/", False)
    assert parse_ws_url("ws://h/p?q=1") == ("h", 80, "/p?q=1", False)
    assert parse_ws_url("wss://h") == ("h", 443, "/", True)
    with pytest.raises(ValueError, match="not a WebSocket URL"):
        parse_ws_url("http://h/")


async def test_transport_fragments_ping_and_close() -> None:
    """Fragmented messages are reassembled, pings answered, the peer's close surfaces with its code."""
    seen: list[Any] = []

    async def script(stream: trio.SocketStream, ws: WSConnection) -> None:
        await stream.send_all(ws.send(TextMessage(data="hel", message_finished=False)))
        await stream.send_all(ws.send(Ping(payload=b"p1")))  # control frame between fragments
        await stream.send_all(ws.send(TextMessage(data="lo ✓", message_finished=True)))
        while not any(isinstance(e, TextMessage) for e in seen):  # the pong, then the client's message
            seen.extend(await next_events(stream, ws))  # (one read may bring both)
        await stream.send_all(ws.send(CloseConnection(code=4008, reason="slow consumer")))
        seen.extend(await next_events(stream, ws))

    with trio.fail_after(10):
        async with scripted_server(script) as url:
            conn = await connect_websocket(url)
            assert await conn.receive() == "hello ✓"
            await conn.send("from client")
            with pytest.raises(WebSocketClosed) as caught:
                await conn.receive()
            assert caught.value.code == 4008
            assert caught.value.reason == "slow consumer"
            await conn.aclose()
            await trio.sleep(0.05)
    assert isinstance(seen[0], Pong)
    assert seen[0].payload == b"p1"
    assert seen[1].data == "from client"
    assert isinstance(seen[2], CloseConnection)
    assert seen[2].code == 4008  # our answer echoes the code


async def test_transport_message_too_big_closes_1009() -> None:
    closed_with: list[int] = []

    async def script(stream: trio.SocketStream, ws: WSConnection) -> None:
        await stream.send_all(ws.send(TextMessage(data="x" * 600, message_finished=False)))
        await stream.send_all(ws.send(TextMessage(data="y" * 600, message_finished=True)))
        for event in await next_events(stream, ws):
            if isinstance(event, CloseConnection):
                closed_with.append(event.code)

    with trio.fail_after(10):
        async with scripted_server(script) as url:
            conn = await connect_websocket(url, max_message_bytes=1000)
            with pytest.raises(WebSocketClosed) as caught:
                await conn.receive()
            assert caught.value.code == 1009
            await trio.sleep(0.1)
    assert closed_with == [1009]


async def test_transport_connection_lost_is_1006() -> None:
    async def script(stream: trio.SocketStream, ws: WSConnection) -> None:
        await stream.aclose()

    with trio.fail_after(10):
        async with scripted_server(script) as url:
            conn = await connect_websocket(url)
            with pytest.raises(WebSocketClosed) as caught:
                await conn.receive()
            assert caught.value.code == 1006
            with pytest.raises(WebSocketClosed):
                await conn.send("too late")


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"\x81\x82abcd\x00\x00", 1002),  # a masked frame from a server
        (b"\xc1\x01x", 1002),  # RSV1: compression nobody agreed to
        (b"\x83\x01x", 1002),  # a reserved opcode
        (b"\x81\x02\xff\xfe", 1007),  # text that is not UTF-8
        (b"\x89\x7e\x00\x80" + b"p" * 128, 1002),  # a ping over 125 bytes
    ],
)
async def test_transport_protocol_violations_close_with_their_code(raw: bytes, code: int) -> None:
    """A hostile server's frame ends the connection with RFC 6455's close code, on both sides."""
    sent_back: list[int] = []

    async def script(stream: trio.SocketStream, ws: WSConnection) -> None:
        await stream.send_all(raw)
        with contextlib.suppress(Exception):  # wsproto may refuse to parse what it gets back after that
            for event in await next_events(stream, ws):
                if isinstance(event, CloseConnection):
                    sent_back.append(event.code)

    with trio.fail_after(10):
        async with scripted_server(script) as url:
            conn = await connect_websocket(url)
            with pytest.raises(WebSocketClosed) as caught:
                await conn.receive()
            assert caught.value.code == code
            await trio.sleep(0.1)
    assert sent_back == [code]


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\n\r\nbusy!", "rejected with HTTP 503"),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         b"Sec-WebSocket-Accept: bm90IHRoZSByaWdodCBrZXk=\r\n\r\n", "Sec-WebSocket-Accept"),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n", "websocket"),
        (b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\n\r\nnope", "rejected with HTTP 403"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "bad WebSocket handshake response"),
        (b"", "closed during the WebSocket handshake"),
    ],
)
async def test_handshake_answers_that_are_not_websocket_fail_clearly(answer: bytes, error: str) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(65536)
        await stream.send_all(answer)
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            with pytest.raises((OSError, HandshakeRejected), match=error) as caught:
                await connect_websocket(f"ws://127.0.0.1:{port}/")
            if isinstance(caught.value, HandshakeRejected):  # with its body, however it ended
                assert (caught.value.status, caught.value.body) in ((503, b"busy!"), (403, b"nope"))
            nursery.cancel_scope.cancel()


async def test_connect_refused_is_a_connection_error(tmp_dir: Path) -> None:
    from tests.conftest import free_port

    with trio.fail_after(10), pytest.raises(AivadConnectionError, match="cannot connect"):
        async with aivad.client.connect(f"ws://127.0.0.1:{free_port()}/"):
            pass


# ---- request / reply against the daemon ------------------------------------------


async def test_publish_history_ping(daemon: InProcessDaemon) -> None:
    with trio.fail_after(10):
        async with aivad.client.connect(daemon.ws_url) as client:
            first = await client.publish("scan.completed", {"scan_id": "1"}, metadata={"source": "t"})
            second = await client.publish("scan.started", [1, 2], message_id="fixed-id")
            again = await client.publish("scan.started", [1, 2], message_id="fixed-id")
            assert second.seq > first.seq
            assert not first.duplicate
            assert not second.duplicate
            assert again.duplicate
            assert again.seq == second.seq
            messages, last_seq = await client.history("scan.*", after=0, limit=10)
            assert [m.seq for m in messages] == [first.seq, second.seq]
            assert last_seq == second.seq
            assert isinstance(messages[0], Envelope)
            assert messages[0].payload == {"scan_id": "1"}
            assert messages[0].metadata == {"source": "t"}
            assert messages[0].message_id == first.message_id
            assert messages[1].message_id == "fixed-id"
            assert await client.history("scan.*", after=last_seq) == ([], last_seq)
            assert await client.ping() >= 0


async def test_pipelined_publishes(daemon: InProcessDaemon) -> None:
    """Hundreds of concurrent publishes on one connection each get their own reply."""
    results: dict[int, int] = {}
    with trio.fail_after(20):
        async with aivad.client.connect(daemon.ws_url, options=ClientOptions(max_in_flight=64)) as client:

            async def one(i: int) -> None:
                results[i] = (await client.publish("load.test", {"i": i})).seq

            async with trio.open_nursery() as nursery:
                for i in range(500):
                    nursery.start_soon(one, i)
            assert client.statistics().connects == 1
            messages, _ = await client.history("load.test", limit=1000)
    assert len(set(results.values())) == 500
    by_seq = {m.seq: m.payload["i"] for m in messages}
    assert all(by_seq[seq] == i for i, seq in results.items())


async def test_errors(daemon: InProcessDaemon) -> None:
    with trio.fail_after(10):
        async with aivad.client.connect(daemon.ws_url) as client:
            with pytest.raises(AivadError) as caught:
                await client.history("a.#", limit=5000)
            assert caught.value.code == "bad_request"
            with pytest.raises(BadMessage):
                await client.publish("not a topic!", 1)
            with pytest.raises(AivadError) as caught:
                await client.publish("big.one", "x" * (2 * 1024 * 1024))
            assert caught.value.code == "too_large"
            for not_json in (float("nan"), float("inf"), [-float("inf")]):  # the daemon would refuse it, unanswerable
                with pytest.raises(AivadError, match="cannot be sent as JSON") as caught:
                    await client.publish("not.json", not_json)
                assert caught.value.code == "bad_request"
            assert (await client.publish("still.works", 1)).seq > 0  # the connection survived


async def test_body_exception_is_not_wrapped(daemon: InProcessDaemon) -> None:
    with trio.fail_after(10), pytest.raises(KeyError):
        async with aivad.client.connect(daemon.ws_url):
            raise KeyError("mine")


async def test_publish_reconnects_after_daemon_restart(tmp_dir: Path) -> None:
    """A publish after the daemon restarted goes out on a new connection, stored once."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            d, scope = await daemon_in_scope(nursery, tmp_dir)
            async with aivad.client.connect(d.ws_url, options=FAST) as client:
                a = await client.publish("x.y", 1)
                scope.cancel()
                await trio.sleep(0.1)
                _, scope = await daemon_in_scope(nursery, tmp_dir, websocket={"port": d.endpoints.ws_port})
                b = await client.publish("x.y", 2)
                assert b.seq == a.seq + 1
                assert not b.duplicate
                assert client.statistics().connects == 2
            nursery.cancel_scope.cancel()


# ---- subscriptions ------------------------------------------------------------------


async def test_subscribe_live_and_replay(daemon: InProcessDaemon) -> None:
    with trio.fail_after(10):
        async with aivad.client.connect(daemon.ws_url) as client:
            early = await client.publish("evt.1.chat", "before")
            async with client.subscribe("evt.1.#") as live, client.subscribe("evt.1.#", since=0) as replay:
                assert live.last_seq == early.seq  # since=None: starts after what is stored
                await client.publish("evt.2.chat", "other event")
                late = await client.publish("evt.1.chat", "after")
                got = await live.__anext__()
                assert (got.seq, got.payload) == (late.seq, "after")
                assert [(await replay.__anext__()).seq for _ in range(2)] == [early.seq, late.seq]
                assert replay.gap is None


async def test_subscribe_bad_pattern(daemon: InProcessDaemon) -> None:
    with trio.fail_after(10):
        async with aivad.client.connect(daemon.ws_url) as client:
            with pytest.raises(BadMessage):
                client.subscribe("a..b")


async def collect(sub: aivad.client.Subscription, n: int, into: list[Envelope]) -> None:
    async for env in sub:
        into.append(env)
        if len(into) == n:
            return


async def test_subscription_resumes_after_daemon_restart(tmp_dir: Path) -> None:
    """The daemon dies mid-stream and comes back on the same port and db: no gap, no dup."""
    got: list[Envelope] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            d, scope = await daemon_in_scope(nursery, tmp_dir)
            async with aivad.client.connect(d.ws_url, options=FAST) as client, client.subscribe("t.#") as sub:
                for i in range(10):
                    await client.publish("t.a", i)
                async for env in sub:
                    got.append(env)
                    if len(got) == 5:
                        break
                scope.cancel()  # abrupt: connections reset, no close frame
                await trio.sleep(0.1)
                await daemon_in_scope(nursery, tmp_dir, websocket={"port": d.endpoints.ws_port})
                for i in range(10, 20):
                    await client.publish("t.a", i)
                await collect(sub, 20, got)
                stats = sub.statistics()
            nursery.cancel_scope.cancel()
    assert [e.payload for e in got] == list(range(20))
    seqs = [e.seq for e in got if e.seq is not None]
    assert seqs == sorted(set(seqs))
    assert len(seqs) == 20
    assert stats.reconnects >= 1
    assert stats.gaps == 0


async def test_a_subscription_on_a_new_history_starts_at_its_oldest_message(tmp_dir: Path) -> None:
    """The daemon comes back with another store (a new epoch): seqs start over there. The
    subscription reports it (a Gap with no ends), keeps the new epoch, and delivers the new
    history from its first message instead of skipping every seq it had already seen."""
    got: list[Envelope] = []
    gaps: list[Gap] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            d, scope = await daemon_in_scope(nursery, tmp_dir)
            async with aivad.client.connect(d.ws_url, options=FAST) as client, client.subscribe(
                "t.#", on_gap=gaps.append
            ) as sub:
                for i in range(5):
                    await client.publish("t.a", i)
                await collect(sub, 5, got)
                first_epoch = sub.epoch
                scope.cancel()
                await trio.sleep(0.1)
                for suffix in ("", "-wal", "-shm"):  # the history is lost
                    (tmp_dir / f"aivad.db{suffix}").unlink(missing_ok=True)
                await daemon_in_scope(nursery, tmp_dir, websocket={"port": d.endpoints.ws_port})
                for i in range(5, 8):
                    await client.publish("t.a", i)
                await collect(sub, 8, got)
            nursery.cancel_scope.cancel()
    assert [e.payload for e in got] == list(range(8))
    assert [e.seq for e in got[5:]] == [1, 2, 3]
    assert gaps == [Gap(None, None)]
    assert first_epoch is not None and sub.epoch is not None and sub.epoch != first_epoch


async def test_slow_consumer_4008_resumes(tmp_dir: Path) -> None:
    """A subscriber that stops reading is closed with 4008 by the daemon and resumes without loss."""
    n = 400
    got: list[Envelope] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            d = await start_daemon(nursery, tmp_dir, websocket={"send_buffer_frames": 16})
            async with aivad.client.connect(d.ws_url, options=FAST) as client, client.subscribe("bulk.#") as sub:
                blob = "z" * 64_000  # enough to fill the kernel buffers and then the outbox
                for i in range(n):
                    await client.publish("bulk.item", {"i": i, "blob": blob})
                await collect(sub, n, got)
                stats = sub.statistics()
            nursery.cancel_scope.cancel()
    assert [e.payload["i"] for e in got] == list(range(n))
    assert stats.reconnects >= 1, "expected the daemon to close the slow consumer"


async def test_gap_is_reported(tmp_dir: Path) -> None:
    """Retention dropped what a resume asks for: recovered false, a Gap, replay from the oldest kept."""
    gaps: list[Gap] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            d = await start_daemon(nursery, tmp_dir, store={"retention_max_messages": 5, "retention_interval_s": 0.05})
            async with aivad.client.connect(d.ws_url) as client:
                seqs = [(await client.publish("r.x", i)).seq for i in range(20)]
                for _ in range(200):  # retention runs every 50 ms
                    if len((await client.history("r.x", limit=100))[0]) <= 5:
                        break
                    await trio.sleep(0.05)
                async with client.subscribe("r.#", since=0, on_gap=gaps.append) as sub:
                    first = await sub.__anext__()
                    assert sub.gap is not None
                    assert sub.gap == gaps[0]
            nursery.cancel_scope.cancel()
    assert gaps[0].first == 1
    assert gaps[0].last is not None
    assert first.seq is not None
    assert gaps[0].last < first.seq
    assert first.seq == seqs[-5]


# ---- a real subprocess: SIGKILL, drain, another event loop ------------------------------


async def test_subscription_survives_sigkill_and_drain(daemon_proc: DaemonProcess) -> None:
    got: list[Envelope] = []
    with trio.fail_after(60):
        async with (
            aivad.client.connect(daemon_proc.ws_url, options=FAST) as client,
            client.subscribe("k.#", since=0) as sub,
        ):
            for i in range(5):
                await client.publish("k.v", i)
            await collect(sub, 5, got)
            await trio.to_thread.run_sync(daemon_proc.kill)
            await trio.to_thread.run_sync(daemon_proc.start)
            for i in range(5, 10):
                await client.publish("k.v", i)
            await collect(sub, 10, got)
            # drain: the daemon closes with 1001, exits 0; we come back and resume
            daemon_proc.signal(signal.SIGTERM)
            assert await trio.to_thread.run_sync(daemon_proc.wait) == 0
            await trio.to_thread.run_sync(daemon_proc.start)
            for i in range(10, 15):
                await client.publish("k.v", i)
            await collect(sub, 15, got)
            assert sub.statistics().reconnects >= 2
    assert [e.payload for e in got] == list(range(15))


def test_asyncio_backend(daemon_proc: DaemonProcess) -> None:
    """The same client under asyncio (anyio picks the backend)."""

    async def main() -> list[Any]:
        async with (
            aivad.client.connect(daemon_proc.ws_url, options=FAST) as client,
            client.subscribe("aio.#") as sub,
        ):
            published = await asyncio.gather(*(client.publish("aio.x", i) for i in range(50)))
            assert len({p.seq for p in published}) == 50
            out = []
            async for env in sub:
                out.append(env.payload)
                if len(out) == 50:
                    break
            messages, _ = await client.history("aio.#", limit=100)
            assert len(messages) == 50
            return out

    got = anyio.run(main, backend="asyncio")
    assert sorted(got) == list(range(50))


def test_blocking_client(daemon_proc: DaemonProcess) -> None:
    with BlockingClient(daemon_proc.ws_url, options=FAST) as client:
        with client.subscribe("blk.#") as sub:
            published = [client.publish("blk.a", i) for i in range(3)]
            it = iter(sub)
            got = [next(it) for _ in range(3)]
            assert [e.seq for e in got] == [p.seq for p in published]
        messages, last_seq = client.history("blk.#")
        assert [m.payload for m in messages] == [0, 1, 2]
        assert last_seq == published[-1].seq
        assert client.ping() >= 0

        # a subscription closed from another thread ends the iteration
        with client.subscribe("blk.#", since=0) as sub2:
            received: list[Envelope] = []

            def reader() -> None:
                received.extend(sub2)

            thread = threading.Thread(target=reader)
            thread.start()
            while len(received) < 3:
                threading.Event().wait(0.01)
            sub2.close()
            thread.join(10)
            assert not thread.is_alive()
            assert [e.payload for e in received] == [0, 1, 2]


def test_frames_on_the_wire_are_documented_ops(daemon_proc: DaemonProcess) -> None:
    """The client only speaks DESIGN §4.3: a raw frame check of what subscribe sends."""
    frames: list[dict[str, Any]] = []

    async def main() -> None:
        conn = await connect_websocket(daemon_proc.ws_url)
        try:
            await conn.send(json.dumps({"op": "subscribe", "ref": 1, "pattern": "w.#", "since": 0}))
            frames.append(json.loads(await conn.receive()))
        finally:
            await conn.aclose()

    anyio.run(main, backend="trio")
    assert frames[0]["op"] == "ok"
    assert frames[0]["ref"] == 1
    assert frames[0]["recovered"] is True


async def test_live_subscription_starts_right_after_last_seq(daemon: InProcessDaemon) -> None:
    """``subscribe`` without ``since`` while others publish: the first message is ``last_seq + 1``.

    DESIGN §4.3: ``last_seq`` is the newest seq stored when the subscription
    starts, so nothing after it may be skipped — the client resumes from it.
    """
    with trio.fail_after(30):
        async with aivad.client.connect(daemon.ws_url) as client, trio.open_nursery() as nursery:

            async def hammer() -> None:
                while True:
                    await client.publish("race.x", None)

            for _ in range(4):
                nursery.start_soon(hammer)
            for _ in range(30):
                async with client.subscribe("race.#") as sub:
                    start = sub.last_seq
                    assert start is not None
                    first = await sub.__anext__()
                    assert first.seq == start + 1
            nursery.cancel_scope.cancel()


async def test_silent_connection_is_replaced_by_keepalive() -> None:
    """A daemon that stops answering (half-open TCP) is detected by the keepalive ping."""
    subscribes: list[dict[str, Any]] = []

    async def script(stream: trio.SocketStream, ws: WSConnection) -> None:
        while True:
            for event in await next_events(stream, ws):
                if not isinstance(event, TextMessage):
                    continue
                frame = json.loads(event.data)
                if frame["op"] != "subscribe":
                    continue  # the first connection swallows the keepalive ping: it "hangs"
                subscribes.append(frame)
                ok = {"op": "ok", "ref": frame["ref"], "pattern": frame["pattern"], "last_seq": 7, "recovered": True}
                await stream.send_all(ws.send(TextMessage(data=json.dumps(ok))))
                if len(subscribes) == 2:
                    msg = {
                        "message_id": "m",
                        "timestamp": "2026-01-01T00:00:00Z",
                        "type": "a.b",
                        "payload": 1,
                        "metadata": {},
                        "seq": 8,
                    }
                    push = {"op": "message", "pattern": "a.#", "msg": msg}
                    await stream.send_all(ws.send(TextMessage(data=json.dumps(push))))

    options = ClientOptions(keepalive_s=0.1, reconnect_initial_s=0.01)
    with trio.fail_after(10):
        async with (
            scripted_server(script) as url,
            aivad.client.connect(url, options=options) as client,
            client.subscribe("a.#") as sub,
        ):
            env = await sub.__anext__()
            assert env.seq == 8
            assert sub.statistics().reconnects == 1
    assert "since" not in subscribes[0]
    assert subscribes[1]["since"] == 7  # resumed from the daemon's last_seq of the first subscribe


async def test_a_101_without_connection_upgrade_is_not_a_websocket() -> None:
    """RFC 6455 §4.1: the client fails a 101 that lacks ``Connection: Upgrade``, even with the right accept."""

    async def handle(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(65536)
        key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                              b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            with pytest.raises(OSError, match="does not upgrade to websocket"):
                await connect_websocket(f"ws://127.0.0.1:{port}/")
            nursery.cancel_scope.cancel()


async def test_nothing_after_the_peers_close_frame_is_delivered() -> None:
    async def script(stream: trio.SocketStream, ws: WSConnection) -> None:
        await stream.send_all(b"\x81\x05first" + b"\x88\x02\x03\xe8" + b"\x81\x0bafter-close")  # one chunk
        with contextlib.suppress(Exception):
            await next_events(stream, ws)

    with trio.fail_after(10):
        async with scripted_server(script) as url:
            conn = await connect_websocket(url)
            assert await conn.receive() == "first"
            with pytest.raises(WebSocketClosed) as caught:
                await conn.receive()
            assert caught.value.code == 1000
