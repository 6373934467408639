"""The WebSocket edge: trio-websocket server, one nursery per connection, DESIGN §4.3 ops.

Each connection has three tasks: the reader (parses frames, runs ops in order),
the replier (answers pipelined ``publish`` ops in order, after their commit) and
the sender (writes whatever is queued in its bounded outbox). The sender takes
everything already queued and writes it with one ``send_all`` of pre-built
frames — serialised once per message, shared by every subscriber — which is
where the fan-out speed comes from (docs/performance.md).

Writing pre-built frames beside trio-websocket uses two private attributes of
its connection (``_stream`` and ``_stream_lock``) and ``_max_message_size`` for
the live-reloadable frame limit; ``tests/test_websocket_internals.py`` pins them
to the trio-websocket version in pyproject.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, WebSocketServer

from .config import WebSocketConfig
from .protocol import OpError, decode_request, dumps, field, parse_envelope, parse_history, parse_pattern, parse_subscribe, request_ref
from .router import Router, Subscription
from .stats import Ingest
from .store import Appended, Store, StoreClosed, _Write

__all__ = ["WebSocketService", "serve_websocket"]

log = logging.getLogger(__name__)

CLOSE_GOING_AWAY = 1001
CLOSE_SLOW_CONSUMER = 4008
#: the sender writes at most this many bytes per send_all
_MAX_WRITE_BYTES = 1 << 20


def text_frame(payload: bytes) -> bytes:
    """An unmasked, final RFC 6455 text frame (server → client frames are never masked)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


def encode_push(pattern_json: str, msg_json: str) -> bytes:
    return text_frame(f'{{"op":"message","pattern":{pattern_json},"msg":{msg_json}}}'.encode())


def _frame(obj: Any) -> bytes:
    return text_frame(dumps(obj).encode())


@attrs.frozen
class WebSocketStatistics:
    connections: int
    subscriptions: int
    slow_consumer_closes: int
    frames_in: int
    errors_sent: int


#: an op: (connection, frame) → the fields of its ok reply, or None for no reply
OpHandler = Callable[["Connection", dict[str, Any]], Awaitable[dict[str, Any] | None]]


class Connection:
    """One client connection: its subscriptions, its outbox, and its ops."""

    encode = staticmethod(encode_push)

    def __init__(self, service: WebSocketService, ws: WebSocketConnection) -> None:
        self.service = service
        self.ws = ws
        self.subscriptions: dict[str, Subscription] = {}
        self._outbox, self._outbox_rx = trio.open_memory_channel[bytes](service.cfg.send_buffer_frames)
        self._pending, self._pending_rx = trio.open_memory_channel[tuple[Any, _Write]](
            service.cfg.max_inflight_publishes
        )
        self._slow = False
        self.nursery: trio.Nursery | None = None

    # ---- the Sink protocol of the router -----------------------------------

    def offer(self, frame: bytes) -> bool:
        try:
            self._outbox.send_nowait(frame)
        except trio.WouldBlock:
            return False
        return True

    async def put(self, frame: bytes) -> None:
        await self._outbox.send(frame)

    def overflowed(self) -> None:
        if not self._slow:
            self._slow = True
            self.service.slow_consumer_closes += 1
            log.warning("closing %s: slow consumer (send buffer full)", self.ws.remote)
            for sub in self.subscriptions.values():
                self.service.router.remove(sub)

    # ---- tasks --------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._send_loop)
                nursery.start_soon(self._reply_loop)
                await self._read_loop()
                nursery.cancel_scope.cancel()
        finally:
            for sub in self.subscriptions.values():
                self.service.router.remove(sub)

    async def _send_loop(self) -> None:
        """Write what is queued, in one ``send_all`` per batch; close 4008 on overflow."""
        ws = self.ws
        receive_nowait = self._outbox_rx.receive_nowait
        while True:
            frame = await self._outbox_rx.receive()
            if self._slow:
                break
            frames, size = [frame], len(frame)
            while size < _MAX_WRITE_BYTES:
                try:
                    frame = receive_nowait()
                except trio.WouldBlock:
                    break
                frames.append(frame)
                size += len(frame)
            async with ws._stream_lock:
                if ws._close_reason is not None:
                    return
                try:
                    await ws._stream.send_all(b"".join(frames))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            if self._slow:
                break
        with trio.move_on_after(self.service.cfg.close_timeout_s):
            await ws.aclose(CLOSE_SLOW_CONSUMER, "slow consumer")

    async def _reply_loop(self) -> None:
        """Answer pipelined publishes in order, each once its commit is done."""
        async for ref, write in self._pending_rx:
            try:
                (appended,) = await write.wait()
            except Exception as exc:
                log.error("publish failed in the store: %s", exc)
                await self.put(self.service.error_frame(ref, "internal", "the store could not commit"))
                continue
            assert isinstance(appended, Appended)
            await self.put(_frame({"op": "ok", "ref": ref, "seq": appended.seq, "duplicate": appended.duplicate}))

    async def _read_loop(self) -> None:
        ws = self.ws
        while True:
            try:
                message = await ws.get_message()
            except ConnectionClosed:
                return
            self.service.frames_in += 1
            await self._handle(message)

    async def _handle(self, message: str | bytes) -> None:
        """Parse and run one frame; every failure becomes an error frame, never a close."""
        ref: Any = None
        try:
            frame = decode_request(message)
            ref = request_ref(frame)
            op = field(frame, "op", str)
            handler = self.service.ops.get(op)
            if handler is None:
                raise OpError("unknown_op", f"unknown op: {op[:64]}")
            reply = await handler(self, frame)
            if reply is not None:
                await self.put(_frame({"op": "ok", "ref": ref, **reply}))
        except OpError as exc:
            await self.put(self.service.error_frame(ref, exc.code, exc.message))
        except Exception:  # the error boundary of one frame: Cancelled passes
            log.exception("op failed on %s", self.ws.remote)
            await self.put(self.service.error_frame(ref, "internal", "internal error"))

    async def defer_publish(self, ref: Any, write: _Write) -> None:
        await self._pending.send((ref, write))


class WebSocketService:
    """The running server: its connections, its op table, drain and reconfigure."""

    def __init__(self, cfg: WebSocketConfig, store: Store, router: Router, ingest: Ingest) -> None:
        self.cfg = cfg
        self.store = store
        self.router = router
        self.ingest = ingest
        self.connections: set[Connection] = set()
        self.ops: dict[str, OpHandler] = {
            "subscribe": _op_subscribe,
            "unsubscribe": _op_unsubscribe,
            "publish": _op_publish,
            "history": _op_history,
            "ping": _op_ping,
        }
        self.port = 0
        self.draining = False
        self.slow_consumer_closes = 0
        self.frames_in = 0
        self.errors_sent = 0
        self._server: WebSocketServer | None = None
        self._accepting: trio.CancelScope | None = None
        self._handlers_done = trio.Event()

    def error_frame(self, ref: Any, code: str, message: str) -> bytes:
        self.errors_sent += 1
        return _frame({"op": "error", "ref": ref, "code": code, "message": message})

    def reconfigure(self, cfg: WebSocketConfig) -> None:
        """Apply live-changeable limits: new connections and new frames use them."""
        self.cfg = cfg
        if self._server is not None:
            self._server._max_message_size = cfg.max_frame_bytes
        for conn in self.connections:
            conn.ws._max_message_size = cfg.max_frame_bytes

    async def handle(self, request: WebSocketRequest) -> None:
        if self.draining or len(self.connections) >= self.cfg.max_connections:
            await request.reject(503, body=b"aivad: not accepting connections\n")
            return
        ws = await request.accept()
        ws._max_message_size = self.cfg.max_frame_bytes
        conn = Connection(self, ws)
        self.connections.add(conn)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            if self.draining and not self.connections:
                self._handlers_done.set()

    async def drain(self) -> None:
        """Stop accepting, close every connection with 1001, wait for their handlers."""
        self.draining = True
        if self._accepting is not None:
            self._accepting.cancel()
        if not self.connections:
            return
        with trio.move_on_after(self.cfg.close_timeout_s):
            async with trio.open_nursery() as nursery:
                for conn in list(self.connections):
                    nursery.start_soon(conn.ws.aclose, CLOSE_GOING_AWAY, "aivad is draining")
            await self._handlers_done.wait()

    def statistics(self) -> WebSocketStatistics:
        return WebSocketStatistics(
            connections=len(self.connections),
            subscriptions=sum(len(c.subscriptions) for c in self.connections),
            slow_consumer_closes=self.slow_consumer_closes,
            frames_in=self.frames_in,
            errors_sent=self.errors_sent,
        )


# ---- ops --------------------------------------------------------------------


async def _op_ping(conn: Connection, frame: dict[str, Any]) -> dict[str, Any] | None:
    await conn.put(_frame({"op": "pong", "ref": frame.get("ref")}))
    return None


async def _op_subscribe(conn: Connection, frame: dict[str, Any]) -> dict[str, Any] | None:
    request = parse_subscribe(frame)
    pattern, since = request.pattern, request.since
    if pattern in conn.subscriptions:
        raise OpError("bad_request", f"already subscribed to {pattern}")
    if len(conn.subscriptions) >= conn.service.cfg.max_subscriptions:
        raise OpError("overloaded", f"at most {conn.service.cfg.max_subscriptions} subscriptions per connection")
    router = conn.service.router
    resume = router.resume_point(since)
    reply: dict[str, Any] = {"op": "ok", "ref": frame.get("ref"), "pattern": pattern,
                             "last_seq": resume.last_seq, "recovered": resume.recovered}
    if resume.gap is not None:
        reply["gap"] = list(resume.gap)
    await conn.put(_frame(reply))
    sub = Subscription(conn, pattern)
    conn.subscriptions[pattern] = sub
    await router.follow(sub, resume.last_seq if since is None else since)
    return None


async def _op_unsubscribe(conn: Connection, frame: dict[str, Any]) -> dict[str, Any] | None:
    pattern = parse_pattern(frame)
    sub = conn.subscriptions.pop(pattern, None)
    if sub is None:
        raise OpError("not_found", f"not subscribed to {pattern}")
    conn.service.router.remove(sub)
    return {"pattern": pattern}


async def _op_publish(conn: Connection, frame: dict[str, Any]) -> dict[str, Any] | None:
    if conn.service.draining:
        raise OpError("overloaded", "aivad is draining")
    envelope = parse_envelope(frame)
    try:
        write = await conn.service.store.submit_append([envelope])
    except StoreClosed:
        raise OpError("overloaded", "aivad is draining") from None
    conn.service.ingest.count("websocket")
    await conn.defer_publish(frame.get("ref"), write)
    return None


async def _op_history(conn: Connection, frame: dict[str, Any]) -> dict[str, Any] | None:
    request = parse_history(frame)
    history = await conn.service.store.history(request.pattern, request.after, request.limit)
    messages = [json.loads(m.json) for m in history.messages]
    last_seq = history.messages[-1].seq if history.messages else request.after
    return {"messages": messages, "last_seq": last_seq}


async def serve_websocket(
    cfg: WebSocketConfig,
    store: Store,
    router: Router,
    ingest: Ingest,
    *,
    task_status: trio.TaskStatus[WebSocketService] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Accept WebSocket connections until cancelled; ``drain()`` stops intake first.

    Returns: never. Resource handling: connection handlers live in a nursery that
    outlives the accept loop, so a drain can close them with 1001 after the
    listener is gone. Error handling: a failing op is answered with an error
    frame; a broken connection ends only its own nursery.
    """
    service = WebSocketService(cfg, store, router, ingest)
    async with trio.open_nursery() as handlers:
        listeners = await trio.open_tcp_listeners(cfg.port, host=cfg.host)
        server = WebSocketServer(
            service.handle,
            listeners,
            handler_nursery=handlers,
            max_message_size=cfg.max_frame_bytes,
            connect_timeout=cfg.handshake_timeout_s,
            disconnect_timeout=cfg.close_timeout_s,
        )
        service._server = server
        with trio.CancelScope() as accepting:
            service._accepting = accepting
            async with trio.open_nursery() as acceptor:
                await acceptor.start(server.run)
                service.port = server.port
                log.info("websocket listening on ws://%s:%d/", cfg.host, service.port)
                task_status.started(service)
        await trio.sleep_forever()  # drained: handlers finish in their own nursery
    raise AssertionError("unreachable")
