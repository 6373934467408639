"""WebSocket fan-out: aivad (publish → commit → delivery) beside two storage-less baselines.

Usage::

    python bench/fanout.py            # full run, ~3-5 minutes on 2 vCPU
    python bench/fanout.py --quick    # smoke test, < 60 s
    python bench/fanout.py --json     # the same figures as one JSON object on stdout

Servers, each in its own child process, started and stopped here:

* ``aivad``: ``aivad serve`` with a temporary store, once per ``--sync`` mode
  (``NORMAL``, the default users get, survives a crash of aivad but not of the
  OS; ``FULL`` survives power loss too, and keeps the store's writer in a thread
  of its own). Every publish is committed to SQLite before it is acknowledged
  and delivered.
* ``broadcast``: a bare ``websockets`` (asyncio) server that answers the same
  ``subscribe`` / ``publish`` frames as aivad and fans each publish out with
  ``websockets.broadcast()`` — no storage, no routing, no backpressure: the
  practical limit for Python.
* ``socketio``: python-socketio ``AsyncServer`` under uvicorn (ASGI, default
  options); subscribers join a room, each publish is an event whose handler
  ``emit``\\ s to the room and acknowledges — the original system's design.

Clients: ONE client process (this one) runs every connection on asyncio with a
minimal WebSocket client written on ``asyncio.Protocol`` (RFC 6455 framing, no
extensions; Socket.IO spoken as raw Engine.IO v4 text packets over the
``websocket`` transport). It parses nothing but a timestamp per message, so it
costs a few µs per delivery and is not the bottleneck; each row reports the CPU
share of the server and of the client process so that can be checked.

Measured, per server, with the same clients and the same 200-byte payload:

* saturated throughput: one publisher pipelines ``--messages-1`` publishes
  (window ``--window`` unacknowledged) to 1 subscriber, and ``--messages-100``
  to ``--subscribers`` subscribers; deliveries/s = deliveries / (first publish
  sent → last delivery read); p50/p99 latency = publish time stamped in the
  payload → frame read by the subscriber (same clock, same process). Median of
  ``--runs`` runs, servers interleaved within each run.
* CPU: the server process's CPU time (all threads) per published message
  and deliveries per server CPU-second — the comparison that holds when
  other tenants load the machine (their share is printed as "other").
* paced latency: the publisher sends at a fixed rate, half of aivad's (first
  ``--sync`` mode) saturated 1-subscriber rate, to 1 and to N subscribers.
* idle memory: RSS of the server process before and after ``--idle``
  connections that each subscribe to their own pattern (join their own room).

Everything listens on 127.0.0.1 only. The machine is shared and noisy: compare
within one run, as ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import datetime
import gc
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    ChildServer,
    cpu_seconds,
    free_port,
    machine,
    machine_busy_seconds,
    percentile,
    python_argv,
    raise_nofile,
    rss_bytes,
    self_cpu_seconds,
)

HOST = "127.0.0.1"
TOPIC = "bench.x"
PATTERN = "bench.#"
ROOM = "bench"
_TS = re.compile(rb'"bench_t":\s*([0-9.eE+-]+)')

GOALS = {
    "vs_socketio_100": 2.0,       # aivad / python-socketio deliveries/s, 100 subscribers, at least
    "vs_broadcast_100": 0.5,      # aivad / websockets.broadcast deliveries/s, 100 subscribers, at least
    "rate_1": 5000.0,             # messages/s stored and delivered to 1 subscriber, at least
    "paced_p99_ms": 10.0,         # p99 at half that rate, below
    "idle_kb": 20.0,              # resident KB per idle subscribed connection, at most (issue 13 item 4)
}


# ---- a minimal asyncio WebSocket client ---------------------------------------------------------


def _mask(payload: bytes) -> bytes:
    key = os.urandom(4)
    n = len(payload)
    if n == 0:
        return key
    stream = (key * (n // 4 + 1))[:n]
    return key + (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def client_frame(payload: bytes, opcode: int = 1) -> bytes:
    """A masked, final client → server frame."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0xFF, n)
    return head + _mask(payload)


class Dialect:
    """How one kind of server is spoken to: aivad's protocol (also the bare baseline's) or Socket.IO."""

    name = "aivad"
    path = "/"
    message_prefix = b'{"op":"message"'

    def __init__(self) -> None:
        self._refs = 0

    async def open(self, conn: Conn) -> None:
        return

    def subscribe(self, pattern: str) -> bytes:
        return json.dumps({"op": "subscribe", "pattern": pattern, "ref": "s"}).encode()

    def is_subscribed(self, frame: bytes) -> bool:
        if b'"op":"error"' in frame:
            raise RuntimeError(f"subscribe refused: {frame[:200]!r}")
        return b'"op":"ok"' in frame

    def publish(self, payload_json: str) -> bytes:
        self._refs += 1
        return f'{{"op":"publish","type":"{TOPIC}","payload":{payload_json},"ref":{self._refs}}}'.encode()

    def is_ack(self, frame: bytes) -> bool:
        if frame.startswith(b'{"op":"ok"'):
            return True
        if b'"op":"error"' in frame:
            raise RuntimeError(f"publish refused: {frame[:200]!r}")
        return False

    def control(self, frame: bytes) -> bytes | None:
        """A reply the protocol needs (Engine.IO ping), or None."""
        return None


class SocketIODialect(Dialect):
    """Socket.IO v5 over Engine.IO v4, websocket transport only, default namespace."""

    name = "socketio"
    path = "/socket.io/?EIO=4&transport=websocket"
    message_prefix = b'42["message"'

    async def open(self, conn: Conn) -> None:
        opened = await conn.recv()
        if not opened.startswith(b"0{"):
            raise RuntimeError(f"no Engine.IO open packet: {opened[:200]!r}")
        conn.send(b"40")
        connected = await conn.recv()
        if not connected.startswith(b"40"):
            raise RuntimeError(f"no Socket.IO connect packet: {connected[:200]!r}")

    def subscribe(self, pattern: str) -> bytes:
        return b'420["join",' + json.dumps(pattern).encode() + b"]"

    def is_subscribed(self, frame: bytes) -> bool:
        return frame.startswith(b"430")

    def publish(self, payload_json: str) -> bytes:
        self._refs += 1
        return f'42{self._refs}["publish",{{"type":"{TOPIC}","payload":{payload_json}}}]'.encode()

    def is_ack(self, frame: bytes) -> bool:
        return frame.startswith(b"43")

    def control(self, frame: bytes) -> bytes | None:
        return b"3" if frame == b"2" else None


class Conn(asyncio.Protocol):
    """One WebSocket connection. Setup frames are awaited with ``recv``; once ``sink`` or
    ``on_ack`` is set, message frames and acknowledgements are handled inline."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self._upgraded = False
        self._fragments: list[bytes] | None = None
        self._inbox: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[None] = self._loop.create_future()
        self.closed: asyncio.Future[str] = self._loop.create_future()
        self.sink: Sink | None = None
        self.on_ack: Callable[[], None] | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"connection lost: {exc!r}" if exc else "connection closed"
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        if not self.closed.done():
            self.closed.set_result(reason)
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionError(reason))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError(reason))

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self._buf + data if self._buf else data
        if not self._upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                return
            status = buf[: buf.find(b"\r\n")]
            buf = buf[end + 4:]
            if b" 101 " not in status:
                self._fail(f"handshake refused: {status!r}")
                return
            self._upgraded = True
            self.handshake.set_result(None)
        # the hot path: count message frames and read their timestamp in place, without copies
        sink, prefix, search = self.sink, self.dialect.message_prefix, _TS.search
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, length = buf[pos], buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length, head = (buf[pos + 2] << 8) | buf[pos + 3], 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2: pos + 10], "big"), 10
            start, end = pos + head, pos + head + length
            if end > n:
                break
            pos = end
            if b0 == 0x81 and sink is not None and buf.startswith(prefix, start):
                m = search(buf, start, end)
                sink.count += 1
                if m is not None:
                    sink.latencies.append(now - float(m.group(1)))
                continue
            self._frame(b0, buf[start:end], now)
        if sink is not None and sink.count >= sink.expected and not sink.done.done():
            sink.last = now
            sink.done.set_result(None)
        self._buf = buf[pos:]

    def _frame(self, b0: int, payload: bytes, now: float) -> None:
        opcode = b0 & 0x0F
        if opcode >= 8:
            if opcode == 9:
                self.write(client_frame(payload, 0xA))
            elif opcode == 8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self._fail(f"closed by server with {code} {payload[2:]!r}")
                if self.transport is not None:
                    self.transport.close()
            return
        if not b0 & 0x80:  # a fragment: keep until FIN
            self._fragments = [*(self._fragments or []), payload]
            return
        if self._fragments is not None:
            payload = b"".join([*self._fragments, payload])
            self._fragments = None
        self._text(payload, now)

    # -- frames
    def _text(self, frame: bytes, now: float) -> None:
        sink = self.sink
        if sink is not None and frame.startswith(self.dialect.message_prefix):
            sink.delivered(frame, now)
            return
        on_ack = self.on_ack
        if on_ack is not None:
            try:
                acked = self.dialect.is_ack(frame)
            except RuntimeError as exc:  # a refused publish: the measurement ends now, with why, not at its timeout
                self._fail(str(exc))
                self.abort()
                return
            if acked:
                on_ack()
                return
        reply = self.dialect.control(frame)
        if reply is not None:
            self.send(reply)
            return
        self._inbox.append(frame)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send(self, payload: bytes) -> None:
        self.write(client_frame(payload))

    async def recv(self, timeout_s: float = 30.0) -> bytes:
        while not self._inbox:
            if self.closed.done():
                raise ConnectionError(self.closed.result())
            self._waiter = self._loop.create_future()
            await asyncio.wait_for(self._waiter, timeout_s)
        return self._inbox.popleft()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def connect(port: int, dialect: Dialect, timeout_s: float = 30.0) -> Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: Conn(dialect), HOST, port)
    key = base64.b64encode(os.urandom(16)).decode()
    assert conn.transport is not None
    conn.transport.write(
        f"GET {dialect.path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await asyncio.wait_for(conn.handshake, timeout_s)
    await dialect.open(conn)
    return conn


async def subscribe(conn: Conn, pattern: str) -> None:
    conn.send(conn.dialect.subscribe(pattern))
    while not conn.dialect.is_subscribed(await conn.recv()):
        pass


# ---- one measurement ----------------------------------------------------------------------------


class Sink:
    """What every subscriber of one measurement has read: counts and latencies."""

    def __init__(self, subscribers: int, messages: int) -> None:
        self.expected = subscribers * messages
        self.count = 0
        self.latencies: list[float] = []
        self.last = 0.0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def delivered(self, frame: bytes, now: float) -> None:
        self.count += 1
        m = _TS.search(frame)
        if m is not None:
            self.latencies.append(now - float(m.group(1)))
        self.last = now
        if self.count >= self.expected and not self.done.done():
            self.done.set_result(None)


def payload_json(size: int) -> Callable[[], str]:
    """A JSON object of about ``size`` bytes carrying the publish time."""
    pad = "x" * max(0, size - len('{"bench_t":1234567.123456789,"pad":""}'))

    def make() -> str:
        return f'{{"bench_t":{time.perf_counter():.9f},"pad":"{pad}"}}'

    return make


async def wait_quiet(max_wait_s: float, threshold: float = 0.5) -> float:
    """Wait (at most ``max_wait_s``) until the rest of the machine uses < ``threshold`` cores; returns that load."""
    deadline = time.perf_counter() + max_wait_s
    while True:
        busy0, own0, t0 = machine_busy_seconds(), self_cpu_seconds(), time.perf_counter()
        await asyncio.sleep(0.3)
        other = (machine_busy_seconds() - busy0 - (self_cpu_seconds() - own0)) / (time.perf_counter() - t0)
        if other < threshold or time.perf_counter() >= deadline:
            return max(0.0, other)


async def publish(pub: Conn, messages: int, make: Callable[[], str], *, window: int, rate: float | None,
                  started: float) -> None:
    """Send ``messages`` publishes on ``pub``, at most ``window`` unacknowledged, several frames per write;
    paced at ``rate`` messages/s from ``started`` (a ``perf_counter`` time) when given, else as fast as acks allow."""
    acks, sent = 0, 0
    room = asyncio.Event()

    def on_ack() -> None:
        nonlocal acks
        acks += 1
        room.set()

    pub.on_ack = on_ack
    pub.closed.add_done_callback(lambda _: room.set())  # a refused publish or a lost connection: stop waiting
    while sent < messages and not pub.closed.done():
        if rate is not None:
            due = int((time.perf_counter() - started) * rate) + 1
            if due <= sent:
                await asyncio.sleep((sent + 1) / rate - (time.perf_counter() - started))
                continue
            k = min(due - sent, window - (sent - acks), messages - sent)
        else:
            k = min(64, window - (sent - acks), messages - sent)
        if k <= 0:
            room.clear()
            await room.wait()
            continue
        pub.write(b"".join(client_frame(pub.dialect.publish(make())) for _ in range(k)))
        sent += k
        await asyncio.sleep(0)


async def measure(server: Server, subscribers: int, messages: int, *, window: int, payload_bytes: int,
                  rate: float | None = None, timeout_s: float = 180.0) -> dict[str, Any]:
    """Connect N subscribers and a publisher, publish ``messages``, wait for every delivery."""
    dialect_cls = server.dialect
    subs = await asyncio.gather(*(connect(server.port, dialect_cls()) for _ in range(subscribers)))
    await asyncio.gather(*(subscribe(c, PATTERN if dialect_cls is Dialect else ROOM) for c in subs))
    pub = await connect(server.port, dialect_cls())
    sink = Sink(subscribers, messages)
    for c in subs:
        c.sink = sink
    make = payload_json(payload_bytes)
    await asyncio.sleep(0.2)  # let the server settle after the connections
    gc.collect()
    gc.disable()  # no collector pauses inside the timed part (the client allocates little)
    srv_cpu0, cli_cpu0, busy0 = cpu_seconds(server.pid), self_cpu_seconds(), machine_busy_seconds()
    started = time.perf_counter()
    error = ""
    try:
        async with asyncio.timeout(timeout_s):
            await publish(pub, messages, make, window=window, rate=rate, started=started)
            waits: list[asyncio.Future[Any]] = [sink.done, *(c.closed for c in subs)]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    except TimeoutError:
        error = f"timeout after {timeout_s:.0f} s"
    finished = sink.last if sink.done.done() else time.perf_counter()
    srv_cpu, cli_cpu = cpu_seconds(server.pid) - srv_cpu0, self_cpu_seconds() - cli_cpu0
    other_cpu = max(0.0, machine_busy_seconds() - busy0 - srv_cpu - cli_cpu)
    gc.enable()
    closed = [c.closed.result() for c in subs if c.closed.done()]
    if not sink.done.done() and not error:
        error = closed[0] if closed else "incomplete"
    if closed and not error:
        error = f"{len(closed)} subscriber(s) closed: {closed[0]}"
    for c in [*subs, pub]:
        c.abort()
    elapsed = finished - started
    lat = sorted(sink.latencies)
    result = {
        "server": server.name, "subscribers": subscribers, "messages": messages, "rate": rate,
        "deliveries": sink.count, "expected": sink.expected, "seconds": elapsed,
        "deliveries_per_s": sink.count / elapsed if elapsed > 0 else 0.0,
        "messages_per_s": sink.count / subscribers / elapsed if elapsed > 0 else 0.0,
        "p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3,
        "max_ms": (lat[-1] * 1e3) if lat else float("nan"),
        "server_cpu": srv_cpu / elapsed if elapsed > 0 else 0.0,
        "client_cpu": cli_cpu / elapsed if elapsed > 0 else 0.0,
        "other_cpu": other_cpu / elapsed if elapsed > 0 else 0.0,
        "server_us_per_message": srv_cpu / max(1, sink.count // subscribers) * 1e6,
        "server_us_per_delivery": srv_cpu / max(1, sink.count) * 1e6,
        "deliveries_per_server_cpu_s": sink.count / srv_cpu if srv_cpu > 0 else 0.0,
        "error": error,
    }
    await asyncio.sleep(0.3)  # let the server drop the closed connections
    return result


async def idle_memory(server: Server, connections: int, batch: int = 200) -> dict[str, Any]:
    """RSS of the server before and after ``connections`` idle, subscribed connections."""
    dialect_cls = server.dialect

    async def one(i: int) -> Conn:
        conn = await connect(server.port, dialect_cls(), timeout_s=60)
        pattern = f"idle.c{i}.#" if dialect_cls is Dialect else f"idle-{i}"
        await subscribe(conn, pattern)
        return conn

    warm = await asyncio.gather(*(one(i) for i in range(min(100, connections))))  # import/allocate lazily-made things
    for c in warm:
        c.abort()
    await asyncio.sleep(1.0)
    before = rss_bytes(server.pid)
    conns: list[Conn] = []
    started = time.perf_counter()
    for lo in range(0, connections, batch):
        conns += await asyncio.gather(*(one(i) for i in range(lo, min(connections, lo + batch))))
    connect_s = time.perf_counter() - started
    await asyncio.sleep(1.0)
    after = rss_bytes(server.pid)
    alive = sum(1 for c in conns if not c.closed.done())
    for c in conns:
        c.abort()
    await asyncio.sleep(1.5)
    return {"server": server.name, "connections": connections, "alive": alive,
            "rss_before": before, "rss_after": after,
            "bytes_per_connection": (after - before) / connections, "connect_seconds": connect_s}


# ---- the servers --------------------------------------------------------------------------------


class Server:
    def __init__(self, name: str, label: str, dialect: type[Dialect], child: ChildServer) -> None:
        self.name = name
        self.label = label
        self.dialect = dialect
        self.child = child

    @property
    def port(self) -> int:
        return self.child.port

    @property
    def pid(self) -> int:
        return self.child.pid


def aivad_server(tmp: Path, sync: str, idle: int = 0) -> Server:
    """``aivad serve`` on a temporary store; its connection limits let ``idle`` connections in from one address."""
    port = free_port()
    home = tmp / f"aivad-{sync.lower()}"
    home.mkdir()
    config = home / "config.toml"
    config.write_text(
        f'[websocket]\nhost = "{HOST}"\nport = {port}\n'
        f'max_connections_per_address = {max(1000, idle + 1000)}\nmax_connections = {max(10_000, idle + 1000)}\n\n'
        f'[control]\nsocket = "{home / "control.sock"}"\n\n'
        f'[store]\npath = "{home / "aivad.db"}"\nsynchronous = "{sync}"\n\n'
        '[log]\nlevel = "WARNING"\n\n'
        # one publisher pipelines every message of a run: the per-connection rate limit must not be what is measured
        '[limits]\npublish_rate_per_s = 0.0\n'
    )
    child = ChildServer(f"aivad-{sync}", python_argv("-m", "aivad", "serve", "--config", str(config)),
                        port, home / "aivad.log")
    return Server(f"aivad_{sync.lower()}", f"aivad ({sync})", Dialect, child)


def baseline_server(tmp: Path, kind: str) -> Server:
    port = free_port()
    child = ChildServer(kind, python_argv(__file__, "--serve", kind, "--port", str(port)), port, tmp / f"{kind}.log")
    if kind == "broadcast":
        return Server("broadcast", "websockets.broadcast", Dialect, child)
    return Server("socketio", "python-socketio", SocketIODialect, child)


def _envelope(seq: int, type_: str, payload: Any) -> dict[str, Any]:
    return {"message_id": uuid.uuid4().hex, "type": type_, "payload": payload, "metadata": {},
            "timestamp": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "seq": seq}


def serve_broadcast(port: int) -> None:
    """Bare websockets: aivad's subscribe/publish frames, ``websockets.broadcast``, nothing stored."""
    from websockets.asyncio.server import broadcast, serve

    subscribers: dict[Any, str] = {}
    seq = 0

    async def handler(ws: Any) -> None:
        nonlocal seq
        try:
            async for raw in ws:
                req = json.loads(raw)
                op = req.get("op")
                if op == "publish":
                    seq += 1
                    frame = {"op": "message", "pattern": PATTERN, "msg": _envelope(seq, req["type"], req["payload"])}
                    broadcast(subscribers, json.dumps(frame, separators=(",", ":")))
                    await ws.send(json.dumps({"op": "ok", "ref": req.get("ref"), "seq": seq, "duplicate": False},
                                             separators=(",", ":")))
                elif op == "subscribe":
                    subscribers[ws] = req["pattern"]
                    await ws.send(json.dumps({"op": "ok", "ref": req.get("ref"), "pattern": req["pattern"],
                                              "last_seq": seq, "recovered": True}, separators=(",", ":")))
        finally:
            subscribers.pop(ws, None)

    async def main() -> None:
        async with serve(handler, HOST, port, compression=None, max_size=1 << 20) as server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def serve_socketio(port: int) -> None:
    """python-socketio AsyncServer on uvicorn: join a room, publish = emit to the room, then ack."""
    import signal

    import socketio  # type: ignore[import-untyped]
    import uvicorn

    sio = socketio.AsyncServer(async_mode="asgi")
    seq = 0

    @sio.event  # type: ignore[untyped-decorator]
    async def join(sid: str, room: str) -> bool:
        await sio.enter_room(sid, room)
        return True

    @sio.event  # type: ignore[untyped-decorator]
    async def publish(sid: str, data: dict[str, Any]) -> dict[str, Any]:
        nonlocal seq
        seq += 1
        seq_now = seq
        room = data["type"].split(".", 1)[0]
        await sio.emit("message", {"pattern": PATTERN, "msg": _envelope(seq_now, data["type"], data["payload"])},
                       room=room)
        return {"seq": seq_now, "duplicate": False}

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(socketio.ASGIApp(sio), host=HOST, port=port, log_level="warning", access_log=False)


# ---- the run ------------------------------------------------------------------------------------


def _median_row(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run with the median ``key`` (runs that failed only if all failed); the other runs' figures beside."""
    ok = [r for r in rows if not r["error"]] or rows
    ok = sorted(ok, key=lambda r: r[key])
    mid = dict(ok[len(ok) // 2])
    mid["runs"] = [{"deliveries_per_s": round(r["deliveries_per_s"]), "p99_ms": round(r["p99_ms"], 2),
                    "other_cpu": round(r["other_cpu"], 2)} for r in rows]
    mid["errors"] = [r["error"] for r in rows if r["error"]]
    return mid


async def run(args: argparse.Namespace, servers: list[Server], say: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {"memory": {}}
    if args.idle:
        for s in servers:
            if s.name.startswith("aivad") and s is not servers[0]:
                continue  # the store's sync mode does not change memory per connection
            say(f"idle memory: {s.label}, {args.idle} connections")
            out["memory"][s.name] = await idle_memory(s, args.idle)
    if args.idle_only:
        out["ratios"] = ratios(out, servers)
        return out

    async def rounds(cases: list[tuple[str, int, int, float | None]], median_of: str) -> None:
        raw: dict[str, dict[str, list[dict[str, Any]]]] = {key: {} for key, *_ in cases}
        for r in range(args.runs):  # servers interleaved within each run: noise hits all of them
            for s in servers:
                for key, subs, n, rate in cases:
                    pace = f" at {rate:,.0f} msg/s" if rate else ""
                    say(f"run {r + 1}/{args.runs}: {s.label}, {subs} subscriber(s) x {n}{pace}")
                    await wait_quiet(args.quiet_wait_s)
                    row = await measure(s, subs, n, window=args.window, payload_bytes=args.payload_bytes, rate=rate)
                    raw[key].setdefault(s.name, []).append(row)
                    if row["error"]:
                        say(f"  ! {row['error']}")
        for key in raw:
            out[key] = {name: _median_row(rows, median_of) for name, rows in raw[key].items()}

    await rounds([("saturated_1", 1, args.messages_1, None),
                  ("saturated_n", args.subscribers, args.messages_n, None)], "deliveries_per_s")
    first = servers[0].name
    out["paced_rate_1"] = rate_1 = float(max(10, round(out["saturated_1"][first]["messages_per_s"] / 2)))
    out["paced_rate_n"] = rate_n = float(max(10, round(out["saturated_n"][first]["messages_per_s"] / 2)))
    await rounds([("paced_1", 1, max(10, int(rate_1 * args.paced_s)), rate_1),
                  ("paced_n", args.subscribers, max(10, int(rate_n * args.paced_s)), rate_n)], "p99_ms")
    out["ratios"] = ratios(out, servers)
    return out


def ratios(out: dict[str, Any], servers: list[Server]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for s in servers:
        if not s.name.startswith("aivad"):
            continue
        mem = out["memory"].get(s.name) or next((v for k, v in out["memory"].items() if k.startswith("aivad")), None)
        bare = out["memory"].get("broadcast")
        r: dict[str, Any] = {"idle_kb": mem["bytes_per_connection"] / 1024 if mem else None}
        r["idle_vs_broadcast"] = (mem["bytes_per_connection"] / bare["bytes_per_connection"]
                                  if mem and bare and bare["bytes_per_connection"] > 0 else None)
        if "saturated_n" not in out:  # --idle-only
            r["goals_met"] = {"idle_kb": r["idle_kb"] is not None and r["idle_kb"] <= GOALS["idle_kb"]}
            res[s.name] = r
            continue
        sat_n, sat_1 = out["saturated_n"], out["saturated_1"]
        mine = sat_n[s.name]["deliveries_per_s"]
        r |= {
            "vs_socketio_100": mine / sat_n["socketio"]["deliveries_per_s"] if "socketio" in sat_n else None,
            "vs_broadcast_100": mine / sat_n["broadcast"]["deliveries_per_s"] if "broadcast" in sat_n else None,
            "vs_socketio_1": (sat_1[s.name]["deliveries_per_s"] / sat_1["socketio"]["deliveries_per_s"]
                              if "socketio" in sat_1 else None),
            "vs_broadcast_1": (sat_1[s.name]["deliveries_per_s"] / sat_1["broadcast"]["deliveries_per_s"]
                               if "broadcast" in sat_1 else None),
            "rate_1": sat_1[s.name]["messages_per_s"],
            "paced_p99_ms": out["paced_1"][s.name]["p99_ms"],
        }
        # the same comparisons per CPU-second of the server process: what the server would do with a
        # whole core to itself; robust when other tenants share the machine (their load is in "other")
        for case, rows in (("100", sat_n), ("1", sat_1)):
            for base in ("socketio", "broadcast"):
                r[f"cpu_vs_{base}_{case}"] = (
                    rows[s.name]["deliveries_per_server_cpu_s"] / rows[base]["deliveries_per_server_cpu_s"]
                    if base in rows and rows[base]["deliveries_per_server_cpu_s"] else None)
        r["goals_met"] = {
            "vs_socketio_100": r["vs_socketio_100"] is not None and r["vs_socketio_100"] >= GOALS["vs_socketio_100"],
            "vs_broadcast_100": (r["vs_broadcast_100"] is not None
                                 and r["vs_broadcast_100"] >= GOALS["vs_broadcast_100"]),
            "rate_1": r["rate_1"] >= GOALS["rate_1"],
            "paced_p99_ms": r["paced_p99_ms"] < GOALS["paced_p99_ms"] and not out["paced_1"][s.name]["error"],
            "idle_kb": r["idle_kb"] is not None and r["idle_kb"] <= GOALS["idle_kb"],
        }
        res[s.name] = r
    return res


def table(result: dict[str, Any]) -> str:
    labels: dict[str, str] = result["servers"]
    args = argparse.Namespace(**result["config"])
    m = result["machine"]
    ident = result.get("aivad")
    lines = [
        *([f"aivad {ident['version']} from {ident['path']} ({ident['commit']})"] if ident else []),
        f"fan-out over WebSocket, {m['cpus']} CPU ({m['cpu_model']}), Python {m['python']}; "
        f"payload {args.payload_bytes} B, window {args.window}, median of {args.runs} run(s)",
        "",
        f"{'':30}{'deliv/s':>9}{'msg/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'srv cpu':>8}{'µs/msg':>7}"
        f"{'cli cpu':>8}{'other':>6}",
    ]
    sections = (
        ("saturated_1", f"1 subscriber, {args.messages_1} messages, as fast as possible"),
        ("saturated_n", f"{args.subscribers} subscribers, {args.messages_n} messages, as fast as possible"),
        ("paced_1", f"1 subscriber, paced at {result.get('paced_rate_1', 0):.0f} msg/s (half aivad's peak)"),
        ("paced_n", f"{args.subscribers} subscribers, paced at {result.get('paced_rate_n', 0):.0f} msg/s "
                    "(half aivad's peak)"),
    )
    for key, title in sections:
        rows = result.get(key) or {}
        if not rows:
            continue
        lines.append(title)
        for name, row in rows.items():
            flag = f"  ! {row['error']}" if row["error"] else ""
            lines.append(
                f"  {labels[name]:28}{row['deliveries_per_s']:>9,.0f}{row['messages_per_s']:>8,.0f}"
                f"{row['p50_ms']:>8.2f}{row['p99_ms']:>8.2f}{row['server_cpu']:>8.0%}"
                f"{row['server_us_per_message']:>7,.0f}{row['client_cpu']:>8.0%}{row['other_cpu']:>6.0%}{flag}"
            )
    if result["memory"]:
        lines.append("idle subscribed connections: resident memory of the server process")
        bare = result["memory"].get("broadcast")
        for name, mem in result["memory"].items():
            label = labels[name] if not name.startswith("aivad") else "aivad"
            ratio = (f", {mem['bytes_per_connection'] / bare['bytes_per_connection']:.2f}x websockets.broadcast"
                     if bare and name != "broadcast" and bare["bytes_per_connection"] > 0 else "")
            lines.append(
                f"  {label:32}{mem['bytes_per_connection'] / 1024:>8.1f} KB/conn  "
                f"({mem['rss_before'] / 2**20:.1f} → {mem['rss_after'] / 2**20:.1f} MiB, {mem['alive']} of "
                f"{mem['connections']} alive{ratio})"
            )
    lines.append("srv cpu: server process (all threads) / wall; µs/msg: server CPU per published message; "
                 "cli cpu: the client process; other: the rest of the machine (cores)")
    def fmt(v: float | None, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    for name, r in result["ratios"].items():
        mark = {key: "ok" if met else "MISSED" for key, met in r["goals_met"].items()}
        subs = args.subscribers
        idle = (f"  idle connection: {fmt(r['idle_kb'], '.1f')} KB (goal <= {GOALS['idle_kb']:g}) {mark['idle_kb']}; "
                f"{fmt(r.get('idle_vs_broadcast'), '.2f')}x websockets.broadcast's")
        if "rate_1" not in r:  # --idle-only
            lines += [f"{labels[name]} against the goals (issue 13 item 4)", idle]
            continue
        lines += [
            f"{labels[name]} against the goals (issue 2 item 12)",
            f"  {subs} subs, deliveries/s vs python-socketio: {fmt(r['vs_socketio_100'], '.2f')}x "
            f"(goal >= {GOALS['vs_socketio_100']:g}x) {mark['vs_socketio_100']}",
            f"  {subs} subs, deliveries/s vs websockets.broadcast: {fmt(r['vs_broadcast_100'], '.2f')}x "
            f"(goal >= {GOALS['vs_broadcast_100']:g}x) {mark['vs_broadcast_100']}",
            f"  1 sub, vs python-socketio {fmt(r['vs_socketio_1'], '.2f')}x, vs websockets.broadcast "
            f"{fmt(r['vs_broadcast_1'], '.2f')}x",
            f"  per server CPU-second: {subs} subs vs python-socketio {fmt(r.get('cpu_vs_socketio_100'), '.2f')}x, "
            f"vs websockets.broadcast {fmt(r.get('cpu_vs_broadcast_100'), '.2f')}x; 1 sub vs python-socketio "
            f"{fmt(r.get('cpu_vs_socketio_1'), '.2f')}x, vs websockets.broadcast "
            f"{fmt(r.get('cpu_vs_broadcast_1'), '.2f')}x",
            f"  1 sub, stored and delivered: {r['rate_1']:,.0f} msg/s (goal >= {GOALS['rate_1']:,.0f}) "
            f"{mark['rate_1']}",
            f"  1 sub, p99 at half that rate: {r['paced_p99_ms']:.2f} ms (goal < {GOALS['paced_p99_ms']:g}) "
            f"{mark['paced_p99_ms']}",
            idle,
        ]
    return "\n".join(lines)


def aivad_identity() -> dict[str, str]:
    """Which aivad the child processes import (PYTHONPATH may point at another checkout)."""
    probe = subprocess.run(
        [sys.executable, "-c", "import aivad, os; print(aivad.__version__); print(os.path.dirname(aivad.__file__))"],
        capture_output=True, text=True, check=True,
    )
    version, where = probe.stdout.split("\n")[:2]
    commit = subprocess.run(["git", "-C", where, "describe", "--always", "--dirty"], capture_output=True, text=True)
    return {"version": version, "path": where, "commit": commit.stdout.strip() or "?"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small counts for a smoke test (< 60 s)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--subscribers", type=int, default=100, help="subscribers of the fan-out case (default 100)")
    p.add_argument("--messages-1", type=int, default=20000, help="messages to 1 subscriber (default 20000)")
    p.add_argument("--messages-n", type=int, default=1000, help="messages to N subscribers (default 1000)")
    p.add_argument("--paced-s", type=float, default=4.0, help="seconds of each paced run (default 4)")
    p.add_argument("--idle", type=int, default=5000, help="idle connections for the memory figure (0: skip)")
    p.add_argument("--idle-only", action="store_true", help="measure idle memory only (with --idle, default 5000)")
    p.add_argument("--runs", type=int, default=3, help="saturated runs per case; the median is shown (default 3)")
    p.add_argument("--window", type=int, default=256, help="unacknowledged publishes in flight (default 256)")
    p.add_argument("--payload-bytes", type=int, default=200, help="payload size (default 200)")
    p.add_argument("--sync", default="NORMAL,FULL", help="aivad store.synchronous modes, comma separated; "
                   "the first is the one compared (default NORMAL,FULL: the daemon's default first)")
    p.add_argument("--servers", default="aivad,broadcast,socketio", help="which servers (default all three)")
    p.add_argument("--quiet-wait-s", type=float, default=1.0,
                   help="before each measurement, wait up to this long for other load on the machine to drop "
                        "below half a core (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, stores)")
    p.add_argument("--table", metavar="JSON", help="print the table of a result saved with --json, and exit")
    p.add_argument("--serve", choices=["broadcast", "socketio"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.messages_1, args.messages_n, args.paced_s = 2000, 200, 1.5
        args.idle, args.runs, args.quiet_wait_s = min(args.idle, 500), 1, 0.0
        args.sync = args.sync.split(",")[0]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    if args.serve == "broadcast":
        serve_broadcast(args.port)
        return 0
    if args.serve == "socketio":
        serve_socketio(args.port)
        return 0

    def say(line: str) -> None:
        print(f"# {line}", file=sys.stderr, flush=True)

    raise_nofile(2 * args.idle + 2 * args.subscribers + 1024)
    wanted = [w.strip() for w in args.servers.split(",") if w.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="aivad-fanout-"))
    servers: list[Server] = []
    try:
        if "aivad" in wanted:
            modes = [sync.strip().upper() for sync in args.sync.split(",") if sync.strip()]
            servers += [aivad_server(tmp, sync, args.idle) for sync in modes]
        servers += [baseline_server(tmp, kind) for kind in ("broadcast", "socketio") if kind in wanted]
        for s in servers:
            say(f"starting {s.label} on {HOST}:{s.port}")
            s.child.start()
        result = asyncio.run(run(args, servers, say))
        result["machine"] = machine()
        if "aivad" in wanted:
            result["aivad"] = aivad_identity()
        result["config"] = {k: v for k, v in vars(args).items() if k not in ("serve", "port")}
        result["goals"] = GOALS
        result["servers"] = {s.name: s.label for s in servers}
    finally:
        for s in servers:
            code = s.child.stop()
            if code not in (0, None, -15):
                say(f"{s.label} exited with {code}; log: {s.child.log}")
        if args.keep:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
