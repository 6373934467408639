"""The WebSocket edge: one nursery per connection, DESIGN §4.3 ops.

Each connection has the handler task (reads frames itself, through :mod:`aivad.wsserver`, and runs
ops in order) and a bounded outbox. The service's one writer task (:meth:`WebSocketService.write_queued`)
takes everything a connection has queued and hands it to the kernel in one non-blocking system call
— pre-built frames, serialised once per message and shared by every subscriber — which is where
the fan-out speed comes from. A connection gets a sender task of its own only when a write must
wait (the socket's buffer is full, or another write is under way): that write has a deadline, and a
peer that reads nothing is closed with 4008. The replier (answers pipelined ``publish`` ops in
order, after their commit), the auth-deadline task and tasks for waiting ops are made when a
connection first needs them: most connections only subscribe, and what an idle connection holds
is what thousands of them cost (docs/performance.md).

trio-websocket does the opening handshake; :mod:`aivad.wsserver` holds the connection after it
(the private names that takes are pinned there).
"""

from __future__ import annotations

import logging
import math
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest

from .auth import console_origins, origin_allowed
from .boundary import Faults, describe
from .config import ConfigError, WebSocketConfig
from .envelope import rfc3339
from .limits import Admission, PeerGate, peer_of, refuse
from .ops import Caller, Operations, Pending
from .protocol import (
    OpError,
    decode_request,
    dumps,
    field,
    parse_collect,
    parse_envelope,
    parse_history,
    parse_pattern,
    parse_subscribe,
    parse_timeout,
    parse_worker_hello,
    request_ref,
)
from .router import Subscription
from .sdnotify import listen_fds
from .store import Appended
from .tasks import parse_task_spec
from .wsframes import OP_TEXT, encode_frame
from .wsserver import Closed, ServerSocket, read_request, request_host

if TYPE_CHECKING:
    from .dispatcher import Worker

__all__ = ["WebSocketService", "serve_websocket"]

log = logging.getLogger(__name__)

CLOSE_GOING_AWAY = 1001
#: not authenticated in time, or the token expired (DESIGN §4.3, fixed)
CLOSE_UNAUTHENTICATED = 4001
CLOSE_SLOW_CONSUMER = 4008
#: close codes counted on their own (aivad_websocket_closes_total); a peer may send any 3000–4999
CLOSE_CODES_COUNTED = frozenset({1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1011, 4001, 4008})
#: one write (the writer's non-blocking send, or a sender's send_all) takes at most this many queued bytes
_MAX_WRITE_BYTES = 1 << 20
#: connections the writer serves between two scheduler passes
_WRITES_PER_TURN = 256
#: a sender that waited for a frame through two sweeps this far apart ends; the next frame starts
#: another (an idle connection holds no sender task: docs/performance.md, idle memory)
IDLE_SENDER_S = 1.0


def text_frame(payload: bytes) -> bytes:
    """A final text frame; server → client frames are never masked."""
    return encode_frame(OP_TEXT, payload, mask=False)


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
    #: TCP connections open, handshakes among them, and those refused before a handshake, by why
    sockets: int = 0
    handshakes: int = 0
    refused: dict[str, int] = attrs.field(factory=dict)
    #: connections ended, by close code
    closes: dict[str, int] = attrs.field(factory=dict)


#: a held batch: the refs to answer, its pending results, and how one result becomes an ok reply
_Pending = tuple[list[Any], Pending, Callable[[Any], dict[str, Any]]]

#: an op: (connection, frame) → the fields of its ok reply, or None for no reply
OpHandler = Callable[["Connection", dict[str, Any]], Awaitable[dict[str, Any] | None]]


class Connection:
    """One client connection: its caller, subscriptions, outbox, and ops.

    The outbox is bounded twice: in frames (``send_buffer_frames``) and in bytes
    (``send_buffer_bytes``), so a client that reads nothing while large messages
    flow costs at most that many bytes before it is closed with 4008.
    """

    encode = staticmethod(encode_push)

    __slots__ = (
        "_auth_deadline", "_background", "_batch", "_batch_op", "_idle", "_inflight", "_max_bytes", "_max_frames",
        "_nursery", "_opened", "_outbox", "_pending", "_queued_bytes", "_retire", "_room",
        "_sender", "_sending", "_slow", "_writing", "caller", "service", "sock", "subscriptions", "worker",
    )  # fmt: skip

    def __init__(self, service: WebSocketService, sock: ServerSocket, caller: Caller) -> None:
        self.service = service
        self.sock = sock
        self.caller = caller
        self.subscriptions: dict[str, Subscription] = {}
        #: frames queued for the sender; a list, not a memory channel: an idle connection's empty list
        #: costs 56 bytes where a channel's state, deque and two endpoints cost ~1.7 KB (docs/performance.md)
        self._outbox: list[bytes] = []
        self._queued_bytes = 0
        self._max_frames = service.cfg.send_buffer_frames
        self._max_bytes = service.cfg.send_buffer_bytes
        #: the sender while it waits for a frame (woken by :meth:`_wake`)
        self._sender: trio.lowlevel.Task | None = None
        #: a sender task exists: the first frame queued starts it in the connection's nursery, and it
        #: ends once idle (retire_if_idle), so an idle connection holds no sender task (~1.6 KB)
        self._sending = False
        #: the sender was found waiting by the last sweep; ``_retire``: the next wake-up ends it
        self._idle = False
        self._retire = False
        self._room: trio.Event | None = None  # set when the sender took frames and someone waits for room
        #: the sender's write in progress (its deadline is pulled in when the connection is slow)
        self._writing: trio.CancelScope | None = None
        # made at the first publish / first waiting op: a connection that only
        # subscribes (most of them) carries no replier task, channel or semaphore
        self._pending: trio.MemorySendChannel[_Pending] | None = None
        #: publishes and dispatches awaiting their commit: max_inflight_publishes permits, one per item
        self._inflight: trio.Semaphore | None = None
        self._batch_op = ""
        self._batch: list[tuple[Any, Any]] = []
        self._background: trio.Semaphore | None = None
        self._nursery: trio.Nursery | None = None
        self._slow = False
        self.worker: Worker | None = None
        self._opened = trio.current_time()
        #: closes the connection with 4001 at its deadline (made when there is one to keep)
        self._auth_deadline: trio.CancelScope | None = None

    # ---- identity (DESIGN §4.8) ---------------------------------------------

    def set_caller(self, caller: Caller) -> None:
        """New rights (an ``auth``): subscriptions they no longer allow end with ``unsubscribed``; a worker
        they no longer let work all its types is drained."""
        self.caller = caller
        for pattern, sub in list(self.subscriptions.items()):
            if not self.service.ops.may_keep(caller, pattern):
                del self.subscriptions[pattern]
                self.service.ops.unsubscribe(sub)
                self.offer(_frame({"op": "unsubscribed", "pattern": pattern, "reason": "forbidden"}))
        if self.worker is not None:
            self.service.ops.rights_changed(caller, self.worker)
        self._arm_auth_deadline()

    def _arm_auth_deadline(self) -> None:
        """Close with 4001 ``auth_timeout_s`` after opening while not authenticated, or when the
        token expires (its ``exp`` plus the leeway, converted once to trio's clock)."""
        auth = self.service.ops.auth
        deadline = math.inf
        if not self.caller.authenticated:
            deadline = self._opened + auth.auth_timeout_s
        elif self.caller.expires_at is not None:
            deadline = trio.current_time() + (self.caller.expires_at + auth.leeway_s - time.time())
        if self._auth_deadline is not None:
            self._auth_deadline.deadline = deadline
        elif deadline < math.inf and self._nursery is not None:
            self._auth_deadline = trio.CancelScope(deadline=deadline)
            self._nursery.start_soon(self._close_at_auth_deadline, self._auth_deadline)

    async def _close_at_auth_deadline(self, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep_forever()
        why = "not authenticated in time" if not self.caller.authenticated else "token expired"
        log.info("closing %s with 4001: %s", self.caller.peer, why)
        await self.sock.aclose(CLOSE_UNAUTHENTICATED, why)

    # ---- the Sink protocol of the router -----------------------------------

    def offer(self, frame: bytes) -> bool:
        """Queue a live message unless the byte or frame bound is reached (then: a slow consumer).

        A message bigger than the byte bound still goes to a client that has nothing queued:
        a client that keeps up is not closed for one large message (memory stays within the
        bound plus that message)."""
        if not self._has_room(len(frame)):
            return False
        self._queue(frame)
        return True

    async def put(self, frame: bytes) -> None:
        """Queue ``frame``, waiting for room in frames and in bytes (one frame bigger than the
        byte bound still goes, alone: a history page is bounded on its own)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._has_room(len(frame)):
            if self._room is None:
                self._room = trio.Event()
            await self._room.wait()
        self._queue(frame)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _has_room(self, size: int) -> bool:
        if len(self._outbox) >= self._max_frames:
            return False
        return not self._queued_bytes or self._queued_bytes + size <= self._max_bytes

    def _queue(self, frame: bytes) -> None:
        self._outbox.append(frame)
        self._queued_bytes += len(frame)
        self.service.wants_write(self)

    def write_now(self) -> None:
        """The writer's turn (:meth:`WebSocketService.write_queued`): what is queued goes in one
        non-blocking system call when nothing else writes; what that leaves, or what cannot go now,
        is the sender task's (the path with a deadline and a 4008 for a peer that reads nothing)."""
        if not self._outbox or self._slow or self._nursery is None:
            return  # written already; or closing (the sender was woken by _close_slow); or over
        sock = self.sock
        if self._writing is None and (not self._sending or self._sender is not None) and sock.can_write_now():
            frames, size = self._take()
            self._took(size)
            sock.write_now(b"".join(frames))
            if not (self._outbox or sock.tail) or sock.closed is not None:
                return  # all out; or lost (the reader sees it too, and later writes end the connection)
        self._wake()

    def hand_to_sender(self) -> None:
        """The writer failed on this connection: its sender task writes what is queued."""
        self._wake()

    def _took(self, size: int) -> None:
        """Frames of ``size`` bytes left the outbox: room for a ``put`` waiting on it."""
        self._queued_bytes -= size
        if self._room is not None:
            self._room.set()
            self._room = None

    def _wake(self) -> None:
        """Wake the sender if it waits for a frame; start one if there is none."""
        if self._sender is not None:
            trio.lowlevel.reschedule(self._sender)
            self._sender = None
        elif not self._sending and self._nursery is not None:
            self._sending = True
            self._nursery.start_soon(self._send_loop, self._nursery.cancel_scope, name="websocket sender")

    def retire_if_idle(self) -> None:
        """Called every ``IDLE_SENDER_S``: a sender that has waited for a frame since the call
        before ends (the next frame queued starts another)."""
        if self._sender is None:
            self._idle = False
        elif self._idle:
            self._retire = True
            self._wake()
        else:
            self._idle = True

    def _stop_waiting(self, raise_cancel: object) -> trio.lowlevel.Abort:
        self._sender = None
        return trio.lowlevel.Abort.SUCCEEDED

    def overflowed(self) -> None:
        self._close_slow("send buffer full")

    def overtaken(self) -> None:
        self._close_slow("retention deleted messages its replay had not reached")

    def _close_slow(self, why: str) -> None:
        if not self._slow:
            self._slow = True
            self.service.slow_consumer_closes += 1
            log.warning("closing %s: slow consumer (%s)", self.caller.peer, why)
            self.service.on_slow_consumer(f"closed {self.caller.peer} with 4008: {why}")
            if self._writing is not None:  # its write waits on a peer that reads nothing: give it a
                # little longer, then abort (a half-written frame cannot be followed by a close frame)
                self._writing.deadline = min(
                    self._writing.deadline, trio.current_time() + self.service.cfg.close_timeout_s
                )
            for sub in self.subscriptions.values():
                self.service.ops.unsubscribe(sub)
            self._wake()  # an idle sender closes before writing anything

    # ---- the WorkerLink protocol of the dispatcher ----------------------------

    async def send_task(self, frame: dict[str, Any]) -> None:
        await self.put(_frame(frame))

    # ---- tasks --------------------------------------------------------------

    async def run(self) -> None:
        """Run frames in order until the peer closes; take everything one read brought (up to
        ``receive_buffer_frames``), so publishes among them share a commit.

        The read loop is in this frame, not in a call below it: this coroutine lives as long as the
        connection, and every frame of its await chain is held that long (~250 bytes each)."""
        receive = self.sock.receive
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery  # the first frame queued starts the sender in it
                self._arm_auth_deadline()
                try:
                    while True:
                        messages = await receive(self.service.cfg.receive_buffer_frames)
                        if not messages:
                            break
                        self.service.frames_in += len(messages)
                        for message in messages:
                            await self._handle(message, nursery)
                        del messages, message  # not held while waiting for the next frame
                        await self.flush_batch()
                finally:  # before the nursery closes: a frame queued later must not start a task in it
                    self._nursery = None
                nursery.cancel_scope.cancel()
        finally:
            self.service.count_close(self.sock.closed)
            for sub in self.subscriptions.values():
                self.service.ops.unsubscribe(sub)
            if self.worker is not None:
                self.service.ops.worker_gone(self.worker)

    async def _send_loop(self, connection: trio.CancelScope) -> None:
        """Write what is queued, in one ``send_all`` per batch; close 4008 on overflow.

        When the sender stops (peer gone, closed, slow), the whole ``connection`` ends:
        a reader or replier blocked on the full outbox must not wait forever. When it has only
        waited for a frame through two sweeps (``retire_if_idle``) it ends alone: the connection
        stays, and the next frame queued starts another sender."""
        retired = False
        try:
            sock = self.sock
            while True:
                if not self._outbox and not self._slow and not sock.tail:
                    self._sender = trio.lowlevel.current_task()
                    await trio.lowlevel.wait_task_rescheduled(self._stop_waiting)
                    self._idle = False
                    if self._retire:
                        self._retire = False
                        if not self._outbox and not self._slow and not sock.tail:
                            retired = True
                            return
                else:  # as a channel's receive() did: a scheduler pass, so more is queued for this write
                    await trio.lowlevel.cancel_shielded_checkpoint()
                if self._slow:
                    break
                # one scheduler pass first: frames other tasks are about to queue go in the same write
                await trio.lowlevel.checkpoint()
                frames, size = self._take()
                self._took(size)
                # the write — and the wait for the lock, which the reader holds while it sends a
                # pong or a close to a peer that may read nothing — can be cut short (_close_slow)
                with trio.CancelScope(deadline=trio.current_time() + self.service.cfg.write_timeout_s) as self._writing:
                    if not await sock.send(b"".join(frames)):
                        return
                aborted, self._writing = self._writing.cancelled_caught, None
                if aborted:  # a write that made no way in time (write_timeout_s), or a slow consumer's:
                    # part of a frame may be out, so no close frame can follow — the connection is cut
                    self._close_slow("a write did not finish in time")
                    await trio.aclose_forcefully(sock.stream)
                    return
                if self._slow:
                    break
            await sock.aclose(CLOSE_SLOW_CONSUMER, "slow consumer")
        finally:
            if retired:
                self._sending = False
            else:
                connection.cancel()

    def _take(self) -> tuple[list[bytes], int]:
        """The queued frames of one write (up to ``_MAX_WRITE_BYTES``, at least one) and their size."""
        outbox, size = self._outbox, self._queued_bytes
        if size <= _MAX_WRITE_BYTES:
            self._outbox = []
            return outbox, size
        size = 0
        for n, frame in enumerate(outbox, 1):
            size += len(frame)
            if size >= _MAX_WRITE_BYTES and n < len(outbox):
                taken = outbox[:n]
                del outbox[:n]
                return taken, size
        self._outbox = []
        return outbox, size

    async def _reply_loop(self, pending: trio.MemoryReceiveChannel[_Pending]) -> None:
        """Answer batched writes (publish, dispatch) in order, each once its commit is done."""
        async for refs, batch, reply in pending:
            frames = [
                self.service.error_frame(ref, r.code, r.message)
                if isinstance(r, OpError)
                else _frame({"op": "ok", "ref": ref, **reply(r)})
                for ref, r in zip(refs, await batch.wait(), strict=True)
            ]
            self._release(len(refs))
            await self.put(b"".join(frames))

    def _release(self, n: int) -> None:
        assert self._inflight is not None
        for _ in range(n):
            self._inflight.release()

    async def batch(self, op: str, ref: Any, item: Any) -> None:
        """Hold a publish/dispatch until the frames read ahead are done: then one write for all."""
        if self._batch and (self._batch_op != op or len(self._batch) >= self.service.cfg.max_inflight_publishes):
            await self.flush_batch()
        self._batch_op = op
        self._batch.append((ref, item))

    async def flush_batch(self) -> None:
        """Hand what ``batch`` held to the operations in one call; the replier answers after the commit."""
        if not self._batch:
            return
        op, held = self._batch_op, self._batch
        self._batch = []
        refs = [ref for ref, _ in held]
        items = [item for _, item in held]
        if self._inflight is None:
            self._inflight = trio.Semaphore(self.service.cfg.max_inflight_publishes)
        for _ in refs:  # a batch is at most max_inflight_publishes: this cannot wait on itself
            await self._inflight.acquire()
        ops = self.service.ops
        reply: Callable[[Any], dict[str, Any]]
        try:
            if op == "publish":
                batch, reply = await ops.publish_many(self.caller, items), _publish_reply
            else:
                batch, reply = await ops.dispatch_many(self.caller, items), _dispatch_reply
        except OpError as exc:
            self._release(len(refs))
            await self.put(b"".join(self.service.error_frame(r, exc.code, exc.message) for r in refs))
            return
        if self._pending is None:
            assert self._nursery is not None
            self._pending, pending = trio.open_memory_channel[_Pending](self.service.cfg.max_inflight_publishes)
            self._nursery.start_soon(self._reply_loop, pending, name="websocket replier")
        await self._pending.send((refs, batch, reply))

    async def _handle(self, message: str | bytes, nursery: trio.Nursery) -> None:
        """Parse and run one frame; every failure becomes an error frame, never a close."""
        ref: Any = None
        try:
            frame = decode_request(message)
            ref = request_ref(frame)
            op = field(frame, "op", str)
            handler = OPS.get(op)
            if handler is None:
                raise OpError("unknown_op", f"unknown op: {op[:64]}")
            if op not in OPEN_OPS:
                self.service.ops.require_authenticated(self.caller)
            if op not in BATCHED_OPS:
                await self.flush_batch()  # writes stay in the order the client sent them
            if op in WAITING_OPS:  # may wait long: run beside the reader, bounded
                if self._background is None:
                    self._background = trio.Semaphore(self.service.cfg.max_inflight_publishes)
                await self._background.acquire()
                nursery.start_soon(self._run_waiting, handler, frame, ref)
                return
            reply = await handler(self, frame)
            if reply is not None and (ref is not None or op not in WORKER_OPS):
                await self.put(_frame({"op": "ok", "ref": ref, **reply}))
        except OpError as exc:
            await self.put(self.service.error_frame(ref if ref is not None else exc.ref, exc.code, exc.message))
        except Exception:  # the error boundary of one frame: Cancelled passes
            log.exception("op failed on %s", self.caller.peer)
            await self.put(self.service.error_frame(ref, "internal", "internal error"))

    async def _run_waiting(self, handler: OpHandler, frame: dict[str, Any], ref: Any) -> None:
        try:
            reply = await handler(self, frame)
            await self.put(_frame({"op": "ok", "ref": ref, **(reply or {})}))
        except OpError as exc:
            await self.put(self.service.error_frame(ref, exc.code, exc.message))
        except Exception:
            log.exception("op failed on %s", self.caller.peer)
            await self.put(self.service.error_frame(ref, "internal", "internal error"))
        finally:
            assert self._background is not None
            self._background.release()


class WebSocketService:
    """The running server: its connections, its op table, drain and reconfigure."""

    def __init__(
        self, cfg: WebSocketConfig, ops: Operations, faults: Faults, on_slow_consumer: Callable[[str], None]
    ) -> None:
        self.cfg = cfg
        self.ops = ops
        self.on_slow_consumer = on_slow_consumer
        self.connections: set[Connection] = set()
        self.port = 0
        self.draining = False
        self.slow_consumer_closes = 0
        self.frames_in = 0
        self.errors_sent = 0
        self.faults = faults
        #: (scheme, port) of the daemon's own HTTP server, whose pages (the console) may connect
        self.console: tuple[str, int] | None = None
        #: handshakes refused after they were read, by why (the gate counts those refused before)
        self.refused: Counter[str] = Counter()
        #: connections ended, by close code (codes outside CLOSE_CODES_COUNTED: "other")
        self.closes: Counter[str] = Counter()
        self.gate = PeerGate(cfg.max_connections, cfg.max_connections_per_address, cfg.max_handshakes)
        self._accepting: trio.CancelScope | None = None
        self._handlers_done = trio.Event()
        #: connections with frames queued since the writer's last turn, in the order they queued
        self._to_write: dict[Connection, None] = {}
        #: the writer task while it waits for a connection to write
        self._writer: trio.lowlevel.Task | None = None

    def wants_write(self, conn: Connection) -> None:
        """``conn`` queued a frame: the writer's next turn writes it (one wake-up for all connections)."""
        self._to_write[conn] = None
        if self._writer is not None:
            trio.lowlevel.reschedule(self._writer)
            self._writer = None

    async def write_queued(self) -> NoReturn:
        """Write every connection's queued frames, each in one non-blocking system call.

        Why a task of its own: a commit queues a frame on every subscribed connection, and waking each
        connection's sender task cost three scheduler passes, a cancel scope, a lock and trio's
        ``send_all`` per delivery — twice the CPU of a saturated delivery when messages come one by
        one (docs/performance.md, "Writing without a task"). Here one wake-up and one system call per
        connection do it; a connection whose socket does not take everything at once goes on in its
        sender task. Each connection's write is its own error boundary."""
        def stop_waiting(raise_cancel: object) -> trio.lowlevel.Abort:
            self._writer = None
            return trio.lowlevel.Abort.SUCCEEDED

        while True:
            if not self._to_write:
                self._writer = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(stop_waiting)
            # one scheduler pass first: frames other tasks are about to queue go in the same writes
            await trio.lowlevel.checkpoint()
            batch, self._to_write = self._to_write, {}
            for n, conn in enumerate(batch, 1):
                try:
                    conn.write_now()
                except Exception as exc:  # noqa: BLE001 - one connection's boundary: recorded; its sender goes on
                    self.faults.record("websocket.write", conn.caller.peer, exc)
                    conn.hand_to_sender()
                if n % _WRITES_PER_TURN == 0:
                    await trio.lowlevel.checkpoint()  # thousands of subscribers: let the others run between

    async def retire_idle_senders(self) -> NoReturn:
        """End the sender task of every connection idle for ``IDLE_SENDER_S`` to twice that.

        Each sweep is its own error boundary: one that fails is recorded and the next runs (this task
        lives in the handlers' nursery, where an escaping error would end the whole server)."""
        while True:
            await trio.sleep(IDLE_SENDER_S)
            try:
                for conn in self.connections:
                    conn.retire_if_idle()
            except Exception as exc:  # noqa: BLE001 - the sweep's boundary: recorded, then the next sweep
                self.faults.record("websocket.sweep", "idle senders", exc)

    def error_frame(self, ref: Any, code: str, message: str) -> bytes:
        self.errors_sent += 1
        return _frame({"op": "error", "ref": ref, "code": code, "message": message})

    def reconfigure(self, cfg: WebSocketConfig) -> None:
        """Apply live-changeable limits: new connections and new frames use them."""
        self.cfg = cfg
        self.ops.router.replay_batch = cfg.replay_batch
        self.gate.max_connections = cfg.max_connections
        self.gate.max_per_address = cfg.max_connections_per_address
        self.gate.max_handshakes = cfg.max_handshakes
        for conn in self.connections:
            conn.sock.max_message_bytes = cfg.max_frame_bytes
            conn.sock.close_timeout_s = cfg.close_timeout_s
            conn.sock.message_timeout_s = cfg.message_timeout_s

    async def serve_stream(self, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]) -> None:
        """One accepted TCP connection: admitted by the gate, then handshake and ops behind an error boundary."""
        found = peer_of(stream)
        if found is None:
            await stream.aclose()
            return
        address, peer = found[0], f"{found[0]}:{found[1]}"
        admission = self.gate.enter(address)
        if isinstance(admission, str):
            await refuse(stream, admission)
            return
        try:  # the connection's error boundary: Faults.isolated, written out here, as this frame lives as
            # long as the connection and one more (isolated's) would too (~400 bytes per connection)
            await self._serve_connection(stream, admission, peer)
        except* Exception as group:  # noqa: BLE001 - this is the boundary: recorded, then ended
            self.faults.record("websocket.connection", peer, group)
        finally:
            self.gate.leave(admission)

    async def _serve_connection(self, stream: trio.abc.Stream, admission: Admission, peer: str) -> None:
        """The handshake (:func:`aivad.wsserver.read_request`: a peer that goes away during it ends
        it at once, where trio-websocket would hold the socket, and a handshake slot, until the
        handshake timeout), then the connection's ops until it closes. A peer that goes away at
        any point is not a fault of the daemon: what that raises ends the connection quietly."""
        try:  # (one frame, not two: this coroutine lives as long as the connection)
            cfg = self.cfg
            try:
                found = await read_request(stream, cfg.handshake_timeout_s)
                if found is None:  # no complete request within handshake_timeout_s, or the peer left
                    self.refused["handshake_incomplete"] += 1
                    return
                request, received = found
                del found
                self.gate.handshake_done(admission)
                caller = await self._admit(request, peer)
                if caller is None:
                    return
                try:
                    await request.accept()
                except ConnectionClosed:
                    return  # the peer left during the handshake
                del request  # (this frame lives as long as the connection: what it holds is kept)
                sock = ServerSocket(
                    stream,
                    received,
                    max_message_bytes=cfg.max_frame_bytes,
                    close_timeout_s=cfg.close_timeout_s,
                    message_timeout_s=cfg.message_timeout_s,
                )
                del received
                conn = Connection(self, sock, caller)
                self.connections.add(conn)
                try:
                    await conn.run()
                finally:
                    self.connections.discard(conn)
                    if self.draining and not self.connections:
                        self._handlers_done.set()
            finally:
                await trio.aclose_forcefully(stream)  # closed even when cancelled (the daemon stops)
        except* (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            await trio.aclose_forcefully(stream)

    def count_close(self, reason: Closed | None) -> None:
        """Count a connection's end by its close code (1006: no close frame; a peer's own codes: "other")."""
        code = 1006 if reason is None else reason.code
        self.closes[str(code) if code in CLOSE_CODES_COUNTED else "other"] += 1

    async def _admit(self, request: WebSocketRequest, peer: str) -> Caller | None:
        """The handshake request is complete: check its origin and token. The caller to accept it
        for, or None once it is rejected."""
        if self.draining:
            await request.reject(503, body=b"aivad: draining, not accepting connections\n")
            return None
        headers = {name.lower(): value for name, value in request.headers}
        origin = headers.get(b"origin")
        if origin is not None and not self._origin_allowed(origin.decode("latin-1"), request_host(request)):
            self.refused["origin"] += 1
            await request.reject(403, body=b"aivad: this origin is not allowed (websocket.allowed_origins)\n")
            return None
        caller = self.ops.caller("websocket", peer, self.ops.quota())
        authorization = headers.get(b"authorization")
        if authorization is not None:
            scheme, _, token = authorization.decode("latin-1").partition(" ")
            try:
                if scheme.lower() != "bearer":
                    raise OpError("unauthorized", "Authorization must be: Bearer <token>")
                caller = self.ops.authenticate(caller, token.strip())
            except OpError as exc:
                self.refused["unauthorized"] += 1
                await request.reject(401, body=f"aivad: {exc.message}\n".encode())
                return None
        return caller

    def _origin_allowed(self, origin: str, host: str) -> bool:
        """``allowed_origins``, or the origin of our own console: the address (or ``localhost``) the
        client reached us by, on the ``[http]`` server's port and scheme."""
        own = console_origins(host, *self.console) if self.console is not None else []
        return origin_allowed(origin, self.cfg.allowed_origins, own)

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
                    nursery.start_soon(conn.sock.aclose, CLOSE_GOING_AWAY, "aivad is draining")
            await self._handlers_done.wait()

    def statistics(self) -> WebSocketStatistics:
        gate = self.gate.statistics()
        return WebSocketStatistics(
            connections=len(self.connections),
            subscriptions=sum(len(c.subscriptions) for c in self.connections),
            slow_consumer_closes=self.slow_consumer_closes,
            frames_in=self.frames_in,
            errors_sent=self.errors_sent,
            sockets=gate.connections,
            handshakes=gate.handshakes,
            refused=dict(Counter(gate.refused) + self.refused),
            closes=dict(self.closes),
        )


# ---- ops --------------------------------------------------------------------


async def _op_ping(conn: Connection, frame: dict[str, Any]) -> dict[str, Any] | None:
    await conn.put(_frame({"op": "pong", "ref": frame.get("ref")}))
    return None


async def _op_auth(conn: Connection, frame: dict[str, Any]) -> dict[str, Any] | None:
    """The first frame of a browser (or a refresh later): the token's identity replaces the connection's."""
    caller = conn.service.ops.authenticate(conn.caller, frame.get("token"))
    conn.set_caller(caller)
    expires_at = None if caller.expires_at is None else rfc3339(caller.expires_at)
    return {"sub": caller.sub, "expires_at": expires_at}


async def _op_subscribe(conn: Connection, frame: dict[str, Any]) -> dict[str, Any] | None:
    request = parse_subscribe(frame)
    pattern = request.pattern
    if pattern in conn.subscriptions:
        raise OpError("bad_request", f"already subscribed to {pattern}")
    if len(conn.subscriptions) >= conn.service.cfg.max_subscriptions:
        raise OpError("overloaded", f"at most {conn.service.cfg.max_subscriptions} subscriptions per connection")
    resume = conn.service.ops.subscribe(conn.caller, pattern, request.since, request.epoch)
    await conn.put(_frame({"op": "ok", "ref": frame.get("ref"), **resume.reply_fields(pattern)}))
    sub = Subscription(conn, pattern)
    conn.subscriptions[pattern] = sub
    try:
        await conn.service.ops.follow(sub, resume)
    except Exception as exc:  # noqa: BLE001 - the ok is sent: this ends the subscription, not a 2nd reply
        log.error("the replay of %r for %s failed: %s", pattern[:64], conn.caller.peer, describe(exc))
        del conn.subscriptions[pattern]
        conn.service.ops.unsubscribe(sub)
        await conn.put(_frame({"op": "unsubscribed", "pattern": pattern, "reason": "internal"}))
    return None


async def _op_unsubscribe(conn: Connection, frame: dict[str, Any]) -> dict[str, Any] | None:
    pattern = parse_pattern(frame)
    sub = conn.subscriptions.pop(pattern, None)
    if sub is None:
        raise OpError("not_found", f"not subscribed to {pattern}")
    conn.service.ops.unsubscribe(sub)
    return {"pattern": pattern}


async def _op_publish(conn: Connection, frame: dict[str, Any]) -> dict[str, Any] | None:
    await conn.batch("publish", frame.get("ref"), parse_envelope(frame))
    return None


def _publish_reply(appended: Appended) -> dict[str, Any]:
    return {"seq": appended.seq, "duplicate": appended.duplicate}


def _dispatch_reply(result: tuple[str, bool]) -> dict[str, Any]:
    task_id, duplicate = result
    return {"task_id": task_id, "duplicate": True} if duplicate else {"task_id": task_id}


async def _op_history(conn: Connection, frame: dict[str, Any]) -> dict[str, Any] | None:
    request = parse_history(frame)
    history = await conn.service.ops.history(conn.caller, request.pattern, request.after, request.limit)
    return history.page(request.after, request.limit)


# ---- task ops (DESIGN §4.3, second table) ---------------------------------------------


def _worker_of(conn: Connection) -> Worker:
    if conn.worker is None:
        raise OpError("bad_request", "not a worker: send worker.hello first")
    return conn.worker


async def _op_worker_hello(conn: Connection, frame: dict[str, Any]) -> dict[str, Any] | None:
    if conn.worker is not None:
        raise OpError("bad_request", "this connection already said worker.hello")
    hello = parse_worker_hello(frame)
    conn.worker = conn.service.ops.worker_hello(conn.caller, conn, hello.name, hello.types, hello.concurrency)
    return {"worker_id": conn.worker.worker_id}


async def _op_worker_drain(conn: Connection, frame: dict[str, Any]) -> dict[str, Any] | None:
    conn.service.ops.worker_drain(_worker_of(conn))
    return {}


async def _op_task_progress(conn: Connection, frame: dict[str, Any]) -> dict[str, Any] | None:
    worker = _worker_of(conn)
    progress = field(frame, "progress", (int, float), 0)
    if not 0 <= progress <= 1:
        raise OpError("bad_request", "progress must be 0..1")
    await conn.service.ops.task_progress(worker, field(frame, "task_id", str), progress, frame.get("note"))
    return {}


async def _op_task_result(conn: Connection, frame: dict[str, Any]) -> dict[str, Any] | None:
    conn.service.ops.task_result(_worker_of(conn), field(frame, "task_id", str), frame.get("result"))
    return {}


async def _op_task_fail(conn: Connection, frame: dict[str, Any]) -> dict[str, Any] | None:
    retryable = field(frame, "retryable", bool, True)
    conn.service.ops.task_fail(_worker_of(conn), field(frame, "task_id", str), frame.get("error"), retryable)
    return {}


async def _op_dispatch(conn: Connection, frame: dict[str, Any]) -> dict[str, Any] | None:
    await conn.batch("dispatch", frame.get("ref"), parse_task_spec(frame, conn.service.ops.tasks))
    return None


async def _op_task_status(conn: Connection, frame: dict[str, Any]) -> dict[str, Any] | None:
    view = await conn.service.ops.task(conn.caller, field(frame, "task_id", str))
    reply = {"task_id": view.task_id, "type": view.type, "state": view.state, "attempts": view.attempts}
    if view.state == "completed":
        reply["result"] = view.result
    elif view.error is not None:
        reply["error"] = view.error
    return reply


async def _op_collect(conn: Connection, frame: dict[str, Any]) -> dict[str, Any] | None:
    ops = conn.service.ops
    request = parse_collect(frame, ops.tasks.max_collect_ids, ops.tasks.request_timeout_s)
    result = await ops.collect(conn.caller, request.task_ids, request.group_id, request.timeout_s, request.min_results)
    return result.to_wire()


async def _op_request(conn: Connection, frame: dict[str, Any]) -> dict[str, Any] | None:
    ops = conn.service.ops
    timeout = parse_timeout(frame, ops.tasks.request_timeout_s)
    spec = parse_task_spec({**frame, "timeout": timeout or None}, ops.tasks)
    return await ops.request(conn.caller, spec, timeout)


OPS: dict[str, OpHandler] = {
    "auth": _op_auth,
    "subscribe": _op_subscribe,
    "unsubscribe": _op_unsubscribe,
    "publish": _op_publish,
    "history": _op_history,
    "ping": _op_ping,
    "worker.hello": _op_worker_hello,
    "worker.drain": _op_worker_drain,
    "task.progress": _op_task_progress,
    "task.result": _op_task_result,
    "task.fail": _op_task_fail,
    "dispatch": _op_dispatch,
    "task.status": _op_task_status,
    "collect": _op_collect,
    "request": _op_request,
}
#: ops served before authentication (DESIGN §4.8)
OPEN_OPS = frozenset({"auth", "ping"})
#: ops held by Connection.batch: those read ahead together are stored in one write
BATCHED_OPS = frozenset({"publish", "dispatch"})
#: worker frames: answered only on error, or when they carry a ref
WORKER_OPS = frozenset({"worker.drain", "task.progress", "task.result", "task.fail"})
#: ops that wait for other parties: they run beside the reader so the connection keeps working
WAITING_OPS = frozenset({"collect", "request"})


async def serve_websocket(
    cfg: WebSocketConfig,
    ops: Operations,
    faults: Faults,
    on_slow_consumer: Callable[[str], None],
    *,
    task_status: trio.TaskStatus[WebSocketService] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Accept WebSocket connections until cancelled; ``drain()`` stops intake first.

    Returns: never. Resource handling: connection handlers live in a nursery that
    outlives the accept loop, so a drain can close them with 1001 after the
    listener is gone. Error handling: a failing op is answered with an error
    frame; a broken connection ends only its own nursery.
    """
    service = WebSocketService(cfg, ops, faults, on_slow_consumer)
    async with trio.open_nursery() as handlers:
        handlers.start_soon(service.retire_idle_senders, name="websocket idle senders")
        handlers.start_soon(service.write_queued, name="websocket writer")
        # under socket activation systemd has bound the port (systemd/aivad.socket); else bind it here
        inherited = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in listen_fds()]
        listeners = inherited or await trio.open_tcp_listeners(cfg.port, host=cfg.host)
        service.port = listeners[0].socket.getsockname()[1]
        served: list[trio.abc.Listener[Any]] = list(listeners)
        if cfg.tls_cert_file:  # wss:// — the TLS handshake counts as part of the opening handshake
            context = tls_context(cfg.tls_cert_file, cfg.tls_key_file)
            served = [trio.SSLListener(listener, context, https_compatible=True) for listener in listeners]
        with trio.CancelScope() as accepting:
            service._accepting = accepting
            async with trio.open_nursery() as acceptor:
                await acceptor.start(
                    partial(trio.serve_listeners, service.serve_stream, served, handler_nursery=handlers)
                )
                scheme = "wss" if cfg.tls_cert_file else "ws"
                log.info("websocket listening on %s://%s:%d/", scheme, cfg.host, service.port)
                task_status.started(service)
        await trio.sleep_forever()  # drained: handlers finish in their own nursery
    raise AssertionError("unreachable")


def tls_context(cert_file: str, key_file: str, section: str = "websocket") -> ssl.SSLContext:
    """A server TLS context from PEM files; an unusable pair is a ConfigError (``aivad serve`` exits 2)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{section}.tls_cert_file: cannot use {cert_file} with {key_file}: {exc}") from None
    return context


