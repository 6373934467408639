"""aivad.amqp_frames: the bridge's AMQP frame reader, against aiormq's on the same bytes.

Test policy: the reader is fed real AMQP frames (marshalled by pamqp, the codec aiormq
uses) split at every byte, cut short, oversized, garbled and random, and must give
aiormq's frames or aiormq's errors, never another exception; a real RabbitMQ shows that a
connection opened inside ``lean_frames`` reads with it (and delivers a body bigger than a
frame), one opened outside keeps aiormq's; the aiormq internals it relies on are pinned.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
import re
import socket
import threading
import uuid
from pathlib import Path
from typing import Any

import aiormq
import aiormq.connection
import pamqp.body
import pamqp.frame
import pamqp.header
import pamqp.heartbeat
import pytest
import trio
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp import commands

from aivad.amqp import serve_amqp
from aivad.amqp_frames import MAX_FRAME_BYTES, LeanFrameReceiver, lean_frames
from aivad.config import AmqpConfig, StoreConfig
from aivad.store import serve_store
from tests.brokers import RabbitMQ

_ERRORS = (AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError)


def deliveries(n: int, body: bytes = b'{"n": 1}') -> bytes:
    """n deliveries as a broker sends them: method, content header, body frame (if any) each."""
    props = commands.Basic.Properties(delivery_mode=2, message_id="m-1", content_type="application/json",
                                      headers={"x-k": "v"})
    out = []
    for i in range(n):
        out.append(pamqp.frame.marshal(commands.Basic.Deliver("ctag", i + 1, False, "ex", "a.b"), 1))
        out.append(pamqp.frame.marshal(pamqp.header.ContentHeader(0, len(body), props), 1))
        if body:  # an empty body has no body frame (pamqp cannot read an empty one)
            out.append(pamqp.frame.marshal(pamqp.body.ContentBody(body), 1))
    return b"".join(out)


def read_all(receiver_class: Any, chunks: list[bytes], *, eof: bool = True,
             error: Exception | None = None) -> tuple[list[Any], BaseException | None]:
    """Every frame ``receiver_class`` reads from ``chunks``, and the error it ended with."""

    async def main() -> tuple[list[Any], BaseException | None]:
        reader = asyncio.StreamReader()
        receiver = receiver_class(reader)
        frames: list[Any] = []

        async def feed() -> None:
            for chunk in chunks:
                reader.feed_data(chunk)
                await asyncio.sleep(0)
            if error is not None:
                reader.set_exception(error)
            elif eof:
                reader.feed_eof()

        feeder = asyncio.create_task(feed())
        try:
            async with asyncio.timeout(10):
                async for frame in receiver:
                    frames.append(frame)
        except Exception as exc:  # noqa: BLE001 - what the reader ended with is the result
            return frames, exc
        finally:
            await feeder
        return frames, None

    return asyncio.run(main())


def as_tuples(frames: list[Any]) -> list[tuple[int, int, bytes]]:
    """Comparable frames: each marshalled again (pamqp's frames have no value equality)."""
    return [(size, channel, pamqp.frame.marshal(frame, channel)) for size, channel, frame in frames]


def test_the_frames_are_aiormqs_however_the_bytes_are_split() -> None:
    heartbeat = pamqp.frame.marshal(pamqp.heartbeat.Heartbeat(), 0)  # an empty frame, between and at the end
    stream = deliveries(10, b"x" * 300) + heartbeat + deliveries(10, b"") + heartbeat
    expected, _ = read_all(aiormq.connection.FrameReceiver, [stream])  # (its end of stream is timing's)
    assert len(expected) == 10 * 3 + 1 + 10 * 2 + 1
    for chunks in ([stream], [stream[i:i + 1] for i in range(len(stream))],
                   [stream[i:i + 97] for i in range(0, len(stream), 97)]):
        frames, error = read_all(LeanFrameReceiver, chunks)
        assert error is None
        assert as_tuples(frames) == as_tuples(expected)


def test_a_stream_cut_mid_frame_is_a_connection_error_and_between_frames_an_end() -> None:
    stream = deliveries(2)
    frames, error = read_all(LeanFrameReceiver, [stream[:-3]])
    assert len(frames) == 5 and isinstance(error, AMQPConnectionError)
    frames, error = read_all(LeanFrameReceiver, [stream[:4]])  # not even a header
    assert frames == [] and isinstance(error, AMQPConnectionError)
    frames, error = read_all(LeanFrameReceiver, [stream])
    assert len(frames) == 6 and error is None


def test_a_socket_error_is_a_connection_error() -> None:
    frames, error = read_all(LeanFrameReceiver, [deliveries(1)], error=ConnectionResetError("reset"))
    assert len(frames) == 3 and isinstance(error, AMQPConnectionError)


def test_a_frame_over_the_limit_ends_the_connection_before_its_payload_is_read() -> None:
    header = bytes([3]) + (1).to_bytes(2, "big") + (MAX_FRAME_BYTES).to_bytes(4, "big")
    frames, error = read_all(LeanFrameReceiver, [deliveries(1) + header], eof=False)
    assert len(frames) == 3 and isinstance(error, InvalidFrameError)
    at_the_limit = bytes([3]) + (1).to_bytes(2, "big") + (MAX_FRAME_BYTES - 8).to_bytes(4, "big")
    frames, error = read_all(LeanFrameReceiver, [at_the_limit + b"y" * (MAX_FRAME_BYTES - 8) + b"\xce"])
    assert error is None and frames[0][2].value == b"y" * (MAX_FRAME_BYTES - 8)


def test_a_garbled_frame_is_an_invalid_frame() -> None:
    stream = bytearray(deliveries(1))
    stream[-1] = 0  # the body frame's end octet
    frames, error = read_all(LeanFrameReceiver, [bytes(stream)])
    assert len(frames) == 2 and isinstance(error, InvalidFrameError)


def test_a_protocol_header_instead_of_a_frame_is_a_protocol_error() -> None:
    frames, error = read_all(LeanFrameReceiver, [b"AMQP\x00\x00\x09\x01"])
    assert frames == [] and isinstance(error, ProtocolSyntaxError)


def test_random_bytes_give_frames_or_aiormqs_errors_only() -> None:
    rng = random.Random(13)
    good = deliveries(3)
    for _ in range(300):
        noise = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        if rng.random() < 0.5:  # a valid start, then garbage
            noise = good[:rng.randrange(len(good))] + noise
        _, error = read_all(LeanFrameReceiver, [noise])
        assert error is None or isinstance(error, _ERRORS), repr(error)


def test_aiormq_builds_and_reads_its_frame_receiver_as_pinned() -> None:
    """lean_frames replaces ``aiormq.connection.FrameReceiver``: a release that builds or reads
    it otherwise fails here."""
    connect = inspect.getsource(aiormq.connection.Connection.connect)
    assert "frame_receiver = FrameReceiver(reader)" in connect
    assert "await frame_receiver.get_frame()" in connect
    reader_loop = inspect.getsource(aiormq.connection.Connection._Connection__reader)  # type: ignore[attr-defined]
    assert "async for weight, channel, frame in frame_receiver" in reader_loop
    rpc = inspect.getsource(aiormq.connection.Connection._rpc)
    assert "frame_receiver.get_frame()" in rpc


def test_a_connection_opened_inside_lean_frames_reads_with_it(rabbitmq: RabbitMQ) -> None:
    queue = f"t-frames-{uuid.uuid4().hex[:8]}"
    big = random.Random(1).randbytes(300_000)  # three frames' worth

    def receiver_of(conn: aiormq.abc.AbstractConnection) -> Any:
        return conn._reader_task.get_coro().cr_frame.f_locals["frame_receiver"]  # type: ignore[attr-defined]

    async def main() -> tuple[type, type, list[bytes]]:
        with lean_frames():
            lean = await aiormq.connect(rabbitmq.url)
        plain = await aiormq.connect(rabbitmq.url)
        try:
            channel = await lean.channel()
            await channel.queue_declare(queue, auto_delete=True)
            bodies = [b"small", big, b"", b"last"]
            for body in bodies:
                await channel.basic_publish(body, routing_key=queue)
            got: list[bytes] = []
            for _ in bodies:
                message = await channel.basic_get(queue, no_ack=True)
                got.append(message.body)
            return type(receiver_of(lean)), type(receiver_of(plain)), got
        finally:
            await lean.close()
            await plain.close()

    lean_type, plain_type, got = asyncio.run(main())
    assert lean_type is LeanFrameReceiver
    assert plain_type is not LeanFrameReceiver
    assert got == [b"small", big, b"", b"last"]


@pytest.mark.parametrize("size", [0, 1, 131_064, 131_065, 400_000])
def test_bodies_around_the_frame_size_arrive_whole(size: int) -> None:
    body = random.Random(size).randbytes(size)
    props = commands.Basic.Properties()
    frames = [pamqp.frame.marshal(commands.Basic.Deliver("ctag", 1, False, "ex", "a.b"), 1),
              pamqp.frame.marshal(pamqp.header.ContentHeader(0, len(body), props), 1)]
    for start in range(0, len(body), 131_064):
        frames.append(pamqp.frame.marshal(pamqp.body.ContentBody(body[start:start + 131_064]), 1))
    got, error = read_all(LeanFrameReceiver, [b"".join(frames)])
    assert error is None
    assert b"".join(f[2].value for f in got[2:]) == body


# ---- a hostile broker ------------------------------------------------------------


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the client closed")
        data += chunk
    return data


def _read_frame(conn: socket.socket) -> bytes:
    header = _read_exactly(conn, 7)
    return header + _read_exactly(conn, int.from_bytes(header[3:7], "big") + 1)


class HostileBroker:
    """A TCP server that speaks AMQP 0-9-1's opening handshake (Start, Tune, OpenOk) to every
    client, then sends ``attack`` and, with ``close``, closes; else it waits for the client to."""

    def __init__(self, attack: bytes, *, close: bool) -> None:
        self.attack, self.close = attack, close
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.opened = 0  # connections that got through the handshake to the attack
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        server: Any = {"product": "hostile",
                       "capabilities": {"publisher_confirms": True, "basic.nack": True, "consumer_cancel_notify": True}}
        with conn, contextlib.suppress(OSError):
            conn.settimeout(20)
            _read_exactly(conn, 8)  # the protocol header
            conn.sendall(pamqp.frame.marshal(commands.Connection.Start(
                server_properties=server,
                mechanisms="PLAIN", locales="en_US"), 0))
            _read_frame(conn)  # Start-Ok
            conn.sendall(pamqp.frame.marshal(commands.Connection.Tune(channel_max=2047, frame_max=131072,
                                                                      heartbeat=0), 0))
            _read_frame(conn)  # Tune-Ok
            _read_frame(conn)  # Open
            conn.sendall(pamqp.frame.marshal(commands.Connection.OpenOk(), 0))
            self.opened += 1
            conn.sendall(self.attack)
            if not self.close:
                while conn.recv(65536):
                    pass

    def stop(self) -> None:
        self.listener.close()


_OPEN_OK = pamqp.frame.marshal(commands.Channel.OpenOk(), 1)
#: what the broker sends after the handshake, whether it then closes, and a pattern of what the
#: bridge must record as its last error (the bound on a frame's size shows in three of them; a
#: close with the client's frames unread reaches it as a reset, or as a close)
_ATTACKS = {
    # a header that claims 4 GiB: aiormq's own reader would wait for it to arrive, in memory
    "a frame of 4 GiB": (bytes([1]) + (0).to_bytes(2, "big") + (0xFFFF_FFF0).to_bytes(4, "big"), False,
                         f"at most {MAX_FRAME_BYTES}"),
    "a frame whose end octet is wrong": (_OPEN_OK[:-1] + b"\x00", False, "InvalidFrameError"),
    "a method no one knows": (bytes([1, 0, 1, 0, 0, 0, 5]) + b"\x7f\x7f\x7f\x7f\x00\xce", False,
                              "InvalidFrameError"),
    "random bytes": (random.Random(7).randbytes(4096), False, f"at most {MAX_FRAME_BYTES}"),
    "a frame cut short, then closed": (_OPEN_OK[:5], True, "closed|reset"),
    "the protocol header again": (b"AMQP\x00\x00\x09\x01", False, f"at most {MAX_FRAME_BYTES}"),
}


@pytest.mark.parametrize("attack", list(_ATTACKS))
async def test_the_bridge_survives_a_broker_that_sends_bad_frames(attack: str, tmp_path: Path) -> None:
    payload, close, recorded = _ATTACKS[attack]
    broker = HostileBroker(payload, close=close)
    sfx = uuid.uuid4().hex[:8]
    cfg = AmqpConfig(enabled=True, url=f"amqp://guest:guest@127.0.0.1:{broker.port}/",
                     events_queue=f"q-{sfx}", tasks_queue=f"tq-{sfx}", dead_letter_queue=f"dq-{sfx}",
                     reconnect_initial_s=0.05, reconnect_max_s=0.2, connect_timeout_s=2.0, grace_s=1.0)
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                store = await nursery.start(serve_store, StoreConfig(path=str(tmp_path / "aivad.db")))
                bridge = await nursery.start(serve_amqp, cfg, store)
                while broker.opened < 3 or bridge.statistics().reconnects < 2:
                    await trio.sleep(0.05)
                stats = bridge.statistics()
                assert re.search(recorded, stats.last_error or ""), stats
                assert not stats.stopped, stats  # a broker's bytes are a lost connection, never a bug
                nursery.cancel_scope.cancel()
    finally:
        broker.stop()
