"""aivad.wsserver: the server side of a WebSocket after the handshake, against raw client frames.

The peer here is tests/hostile.py's codec (not aivad's), over a real socket pair; the daemon test
at the end sends frames in the same packet as the upgrade request, through trio-websocket's
handshake and the hand-over of what came behind it.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import itertools
import json
import math
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from aivad.websocket import Connection
from aivad.wsserver import Closed, ServerSocket
from tests.conftest import InProcessDaemon, control_async, reload_daemon, start_daemon_from_file
from tests.hostile import (
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    AsyncRawClient,
    Close,
    FrameParser,
    check_upgrade,
    encode_frame,
    handshake_request,
)
from tests.wsclient import connect


@asynccontextmanager
async def _pair(
    received: bytes = b"", *, max_message_bytes: int = 1 << 20, message_timeout_s: float = 30.0
) -> AsyncIterator[tuple[ServerSocket, trio.SocketStream]]:
    a, b = trio.socket.socketpair()
    server, peer = trio.SocketStream(a), trio.SocketStream(b)
    async with server, peer:
        yield ServerSocket(
            server, received, max_message_bytes=max_message_bytes, close_timeout_s=5.0,
            message_timeout_s=message_timeout_s,
        ), peer


async def _frames(peer: trio.SocketStream, parser: FrameParser) -> list[tuple[int, bytes]]:
    """What the server sent next; [] at EOF."""
    data = await peer.receive_some(65536)
    return parser.feed(data) if data else []


def _text(payload: str) -> bytes:
    return encode_frame(OP_TEXT, payload.encode())


def _close(code: int, reason: bytes = b"") -> bytes:
    return encode_frame(OP_CLOSE, struct.pack("!H", code) + reason)


async def test_bytes_that_came_behind_the_request_are_read_first_and_a_read_is_cut_at_the_limit() -> None:
    b = _text("b")
    async with _pair(_text("a") + b[:3]) as (server, peer):  # the second frame is split
        await peer.send_all(b[3:] + _text("c"))
        with trio.fail_after(5):
            got = await server.receive(8)
            while len(got) < 3:
                got += await server.receive(8)
            assert got == ["a", "b", "c"]
            await peer.send_all(b"".join(_text(str(i)) for i in range(5)))
            assert await server.receive(2) == ["0", "1"]  # the rest of that read waits for the next call
            assert await server.receive(2) == ["2", "3"]
            assert await server.receive(2) == ["4"]


async def test_the_pings_of_one_read_get_one_pong_for_the_last() -> None:
    """RFC 6455 §5.5.3 lets a pong answer only the most recent ping: a flood costs one write per read."""
    async with _pair() as (server, peer):
        parser = FrameParser()
        with trio.fail_after(5):
            await peer.send_all(b"".join(encode_frame(OP_PING, b"%d" % i) for i in range(100)) + _text("after"))
            assert await server.receive(8) == ["after"]
            assert await _frames(peer, parser) == [(OP_PONG, b"99")]


async def _read_all(peer: trio.SocketStream, parser: FrameParser, count: int) -> list[tuple[int, bytes]]:
    got: list[tuple[int, bytes]] = []
    while len(got) < count:
        data = await peer.receive_some(1 << 20)
        assert data, f"EOF after {len(got)} frames"
        got += parser.feed(data)
    return got


async def test_what_a_write_now_leaves_goes_first_so_no_frame_is_cut_by_another() -> None:
    """A non-blocking write that the socket takes only part of keeps the rest as ``tail``: no other
    write may start (``can_write_now`` is False), and both ways of writing under the lock — the
    sender's ``send`` and a pong from the reader — put the tail out before their own frame."""
    big = encode_frame(OP_TEXT, b"x" * (4 << 20), mask=False)  # more than any socket buffer takes at once
    async with _pair() as (server, peer):
        assert server.can_write_now()
        server.write_now(big)
        assert server.tail and not server.can_write_now()
        parser = FrameParser()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.send, encode_frame(OP_TEXT, b"after", mask=False))
                assert await _read_all(peer, parser, 2) == [(OP_TEXT, b"x" * (4 << 20)), (OP_TEXT, b"after")]
            assert server.tail == b"" and server.can_write_now()

            server.write_now(big)
            assert server.tail
            await peer.send_all(encode_frame(OP_PING, b"p") + _text("m"))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.receive, 8)  # answers the ping under the lock: the tail first
                assert await _read_all(peer, parser, 2) == [(OP_TEXT, b"x" * (4 << 20)), (OP_PONG, b"p")]


async def test_a_write_now_to_a_reset_or_closed_socket_marks_the_connection_lost() -> None:
    async with _pair() as (server, peer):
        peer.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, struct.pack("ii", 1, 0))
        await peer.aclose()  # RST
        with trio.fail_after(5):
            while server.closed is None:  # the first write may still be taken; the reset shows on a later one
                server.write_now(_text("x"))
                await trio.sleep(0.01)
        assert server.closed == Closed(1006) and not server.can_write_now()
        assert not await server.send(_text("y"))
    async with _pair() as (server, peer):
        await server.stream.aclose()  # its descriptor is gone (and may be another socket's by now)
        assert server.can_write_now()  # it does not know yet
        server.write_now(_text("x"))
        assert server.closed == Closed(1006)


async def test_the_peers_close_is_answered_with_its_code_then_the_tcp_connection_ends() -> None:
    async with _pair() as (server, peer):
        parser = FrameParser()
        with trio.fail_after(5):
            await peer.send_all(encode_frame(OP_PING, b"are you there") + _text("first"))
            assert await server.receive(8) == ["first"]
            assert await _frames(peer, parser) == [(OP_PONG, b"are you there")]
            await peer.send_all(_text("before") + _close(4000, b"bye") + _text("after") + encode_frame(OP_PING, b"x"))
            assert await server.receive(8) == ["before"]  # what came before the close is handed on
            assert await server.receive(8) == []
            assert server.closed == Closed(4000, "bye")
            assert await _frames(peer, parser) == [(OP_CLOSE, struct.pack("!H", 4000))]  # no pong after it
            assert await _frames(peer, parser) == []  # the server closed the TCP connection first (RFC 6455 §7.1.1)
            assert await server.receive(8) == []


async def test_a_close_with_no_code_is_answered_with_an_empty_one() -> None:
    async with _pair() as (server, peer):
        with trio.fail_after(5):
            await peer.send_all(encode_frame(OP_CLOSE, b""))
            assert await server.receive(8) == []
            assert server.closed == Closed(1005, "")
            assert await _frames(peer, FrameParser()) == [(OP_CLOSE, b"")]


async def test_a_violation_is_answered_with_its_close_code_after_the_messages_before_it() -> None:
    for bad, code in (
        (encode_frame(OP_TEXT, b"x", mask=False), 1002),  # unmasked client frame
        (encode_frame(OP_TEXT, b"\xff\xfe"), 1007),  # not UTF-8
        (encode_frame(OP_TEXT, b"x" * 101), 1009),  # over max_message_bytes
        (_close(999), 1002),  # a close code no peer may send
    ):
        async with _pair(max_message_bytes=100) as (server, peer):
            parser = FrameParser()
            with trio.fail_after(5):
                await peer.send_all(_text("fine") + bad)
                assert await server.receive(8) == ["fine"]
                assert await server.receive(8) == []
                assert server.closed is not None and server.closed.code == code, bad
                await _frames(peer, parser)
                assert parser.closed is not None and parser.closed.code == code
                assert await _frames(peer, parser) == []


async def test_a_lower_max_message_bytes_applies_to_the_next_frame() -> None:
    async with _pair(max_message_bytes=1000) as (server, peer):
        with trio.fail_after(5):
            await peer.send_all(_text("x" * 500))
            assert await server.receive(8) == ["x" * 500]
            server.max_message_bytes = 100  # a reload
            await peer.send_all(_text("x" * 500))
            assert await server.receive(8) == []
            assert server.closed is not None and server.closed.code == 1009


async def test_a_close_we_start_ends_when_the_peer_answers_and_nothing_after_it_is_handed_on() -> None:
    async with _pair() as (server, peer):
        parser = FrameParser()
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                got: list[list[str | bytes]] = []

                async def read() -> None:
                    while messages := await server.receive(8):
                        got.append(messages)
                    got.append([])

                nursery.start_soon(read)
                nursery.start_soon(server.aclose, 4008, "slow consumer")
                assert await _frames(peer, parser) == [(OP_CLOSE, struct.pack("!H", 4008) + b"slow consumer")]
                await peer.send_all(_text("late") + _close(4008))  # sent before it read our close
            assert got == [[]]  # "late" came after our close frame: not handed on
            assert server.closed == Closed(4008, "slow consumer")
            assert await _frames(peer, parser) == []


async def test_a_close_we_start_gives_up_on_a_silent_peer_after_close_timeout_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with _pair() as (server, peer):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.receive, 8)
            start = trio.current_time()
            await server.aclose(1001, "going away")  # the peer reads nothing and answers nothing
            assert trio.current_time() - start == pytest.approx(5.0)
        assert server.closed == Closed(1001, "going away")
        parser = FrameParser()
        assert await _frames(peer, parser) == [(OP_CLOSE, struct.pack("!H", 1001) + b"going away")]
        assert await _frames(peer, parser) == []


async def _stalled(server: ServerSocket, peer: trio.SocketStream, *pieces: bytes) -> tuple[float, list[str | bytes]]:
    """Send ``pieces`` 20 s apart while the server reads: how long after the first one the server's
    reading ended (inf: not within 1,000 s of the last), and what it handed on."""
    got: list[str | bytes] = []
    start = trio.current_time()
    ended = math.inf

    async def read() -> None:
        nonlocal ended
        while messages := await server.receive(8):
            got.extend(messages)
        ended = trio.current_time() - start

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        for piece in pieces:
            with contextlib.suppress(trio.BrokenResourceError):
                await peer.send_all(piece)
            await trio.sleep(20)
        nursery.cancel_scope.deadline = trio.current_time() + 1000
    return ended, got


async def test_a_frame_not_finished_within_message_timeout_s_closes_the_connection_with_1008(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Half a frame and then silence: 1008 once ``message_timeout_s`` has passed since its first byte
    (the same for a frame that trickles in, piece after piece, and for a fragmented message whose
    fragments, and pings between them, keep coming but not its final frame), and the TCP connection
    is cut — its answer is not awaited."""
    frame = _text("x" * 100)
    first, ping = encode_frame(OP_TEXT, b"first", fin=False), encode_frame(OP_PING, b"p")
    more = encode_frame(OP_CONTINUATION, b"more", fin=False)
    for pieces in ([frame[:10]], [frame[:10], frame[10:20], frame[20:30]], [first, ping + more, ping + more]):
        async with _pair(message_timeout_s=30.0) as (server, peer):
            ended, got = await _stalled(server, peer, *pieces)
            assert got == [] and ended == pytest.approx(30.0)
            assert server.closed == Closed(1008, "message not finished within 30 s")
            parser, sent = FrameParser(), []
            while data := await peer.receive_some(65536):  # until EOF: cut at once after the close
                sent += parser.feed(data)
            assert sent[-1] == (OP_CLOSE, struct.pack("!H", 1008) + b"message not finished within 30 s")
            assert set(sent[:-1]) <= {(OP_PONG, b"p")}


async def test_frames_that_keep_coming_whole_are_never_timed_out_even_when_every_read_ends_inside_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The time is per frame: reads that each finish a frame and start the next one, 20 s apart
    (longer in all than ``message_timeout_s``), close nothing."""
    frames = b"".join(_text(str(i)) for i in range(4))
    cuts = [0, 5, 12, 19, len(frames)]  # every piece but the last ends inside a frame (each is 7 bytes)
    pieces = [frames[a:b] for a, b in itertools.pairwise(cuts)]
    async with _pair(message_timeout_s=30.0) as (server, peer):
        ended, got = await _stalled(server, peer, *pieces)
        assert got == ["0", "1", "2", "3"] and server.closed is None and ended == math.inf


async def test_frames_in_the_same_packet_as_the_upgrade_request_are_run(daemon: InProcessDaemon) -> None:
    """A client may write frames before it has read the 101: the daemon runs them in order."""
    key = base64.b64encode(os.urandom(16)).decode()
    port = daemon.endpoints.ws_port
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                handshake_request("127.0.0.1", port, key=key)
                + encode_frame(OP_TEXT, json.dumps({"op": "ping", "ref": 1}).encode())
                + encode_frame(OP_TEXT, json.dumps({"op": "ping", "ref": 2}).encode())
            )
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(65536)
            head, _, rest = data.partition(b"\r\n\r\n")
            check_upgrade(head + b"\r\n\r\n", key)
            parser = FrameParser()
            frames = parser.feed(rest)
            while len(frames) < 2:
                frames += parser.feed(await stream.receive_some(65536))
            assert [json.loads(payload) for _, payload in frames] == [
                {"op": "pong", "ref": 1},
                {"op": "pong", "ref": 2},
            ]


async def test_a_reload_sets_the_frame_limit_and_timeouts_of_open_connections(
    nursery: trio.Nursery, tmp_dir: Path
) -> None:
    d = await start_daemon_from_file(nursery, tmp_dir)
    with trio.fail_after(10):
        async with connect(d.ws_url) as client:
            await client.ok({"op": "subscribe", "pattern": "reload.#"})
            port = d.endpoints.ws_port
            (conn,) = [o for o in gc.get_objects() if type(o) is Connection and o.service.port == port]
            reply = await reload_daemon(
                d, tmp_dir, websocket={"max_frame_bytes": 4096, "close_timeout_s": 0.25, "message_timeout_s": 7.0}
            )
            assert reply["ok"], reply
            assert conn.sock.max_message_bytes == 4096 and conn.sock.close_timeout_s == 0.25
            assert conn.sock.message_timeout_s == 7.0


async def test_peers_that_stall_or_reset_mid_frame_leave_a_well_behaved_client_served(
    nursery: trio.Nursery, tmp_dir: Path
) -> None:
    """Half a frame, then silence (its connection waits, costing one partial frame, until
    ``message_timeout_s`` closes it with 1008) or a reset (its connection ends, counted 1006): another
    client's publish and subscription go on meanwhile."""
    daemon = await start_daemon_from_file(nursery, tmp_dir, websocket={"message_timeout_s": 2.0})
    port = daemon.endpoints.ws_port
    frame = encode_frame(OP_TEXT, json.dumps({"op": "publish", "type": "half.x", "payload": "x" * 1000}).encode())
    with trio.fail_after(10):
        peers = [await AsyncRawClient.connect("127.0.0.1", port) for _ in range(2)]
        stalled, resetting = peers
        try:
            await stalled.send(frame[: len(frame) // 2])
            await resetting.send(frame[: len(frame) // 2])
            resetting.reset()
            async with connect(daemon.ws_url) as client:
                await client.ok({"op": "subscribe", "pattern": "well.#"})
                assert (await client.publish("well.behaved", 1))["seq"] >= 1
                assert (await client.next_message())["msg"]["payload"] == 1
                status = (await control_async(daemon.control_path, {"cmd": "status"}))["status"]["websocket"]
                while status["closes"].get("1006", 0) < 1:  # the reset peer's connection is gone
                    await trio.sleep(0.02)
                    status = (await control_async(daemon.control_path, {"cmd": "status"}))["status"]["websocket"]
                assert status["connections"] == 2  # the stalled peer and the client
                while not stalled.eof:
                    await stalled.receive()
                assert stalled.closed == Close(1008, b"message not finished within 2 s")
                while status["closes"].get("1008", 0) < 1:  # and its connection is gone
                    await trio.sleep(0.02)
                    status = (await control_async(daemon.control_path, {"cmd": "status"}))["status"]["websocket"]
                assert status["connections"] == 1
                assert (await client.publish("well.behaved", 2))["seq"] >= 2
        finally:
            stalled.reset()  # (a close frame now would only be more of its half frame's payload)
