"""The server side of one WebSocket: trio-websocket's opening handshake, then frames on the raw stream.

Why: trio-websocket reads every frame through wsproto (a frame object, a generator step and an
incremental UTF-8 decoder per frame), then its reader task and a memory channel hand each message to
the handler, one task switch per message — about a fifth of the daemon's main thread at the dispatch
peak (docs/performance.md, "Reading frames"). After the handshake a connection here is read by its
handler task itself, through :class:`aivad.wsframes.FrameReader` (the codec the client already uses;
the server already wrote its frames with it), and everything one ``receive_some`` brought is handed on
at once. A connection holds no reader task, no channel and no wsproto state.

trio-websocket still does the opening handshake: h11 and wsproto parse and check the request, and
answer it (accept, or reject with a status and a body). Taking the connection over after the request
uses private names, pinned to the versions in pyproject by tests/test_websocket_internals.py:
``WebSocketConnection._reader_task`` and ``_get_request`` (read until the request is in, then stop),
``WebSocketConnection._wsproto.handshake._h11_connection`` (the bytes that came right behind the
request: a client may send frames before it has read our 101) and ``WebSocketRequest._event`` (the
request's ``Host``).

One task reads (:meth:`ServerSocket.receive`); any task writes, holding ``send_lock``
(:meth:`ServerSocket.send`), or without waiting when no write is under way (:meth:`ServerSocket.write_now`:
one non-blocking system call, no lock, no deadline, no task switch — the path of nearly every
write, docs/performance.md "Writing without a task"). What RFC 6455 leaves to the endpoint is here:
the pings of one read are answered with one pong, for the last (§5.5.3: a flood of pings costs one
write per read, not one per ping), a close frame is answered with its code and the TCP connection
closed (§5.5.1, §7.1.1: the server closes first), a violation is answered with the close code
§7.4.1 assigns to it (1002, 1007, 1009), a message (a frame, or all the fragments of one) not
finished within ``message_timeout_s`` of its first byte with 1008 (a peer that sends half a frame
and then nothing would hold its connection, and the memory of the part it sent, for as long as it
likes), and a close we start waits for the peer's answer at most ``close_timeout_s`` before the
TCP connection is cut.
"""

from __future__ import annotations

import math
import os
from typing import Final

import attrs
import trio
from trio_websocket import WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection

from .wsframes import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameError,
    FrameReader,
    close_answer,
    close_payload,
    encode_frame,
    parse_close,
)

__all__ = ["Closed", "ServerSocket", "read_request", "request_host"]

#: bytes asked of the stream per read: what one read brings is handed on as one batch
RECEIVE_CHUNK: Final = 65536
#: the close code recorded when the TCP connection ended without a close frame
CLOSE_ABNORMAL: Final = 1006
#: a message not finished in time (RFC 6455 §7.4.1: a message that violates the endpoint's policy)
CLOSE_POLICY: Final = 1008


@attrs.frozen
class Closed:
    """How a connection ended: the code of the first close frame sent either way, or 1006."""

    code: int
    reason: str = ""


async def read_request(stream: trio.abc.Stream, timeout_s: float) -> tuple[WebSocketRequest, bytes] | None:
    """trio-websocket reads the opening handshake's request; its reader stops once the request is in.

    Returns the request and the bytes that came right behind it, or None when no complete request
    came within ``timeout_s`` or the peer left or broke HTTP first (trio-websocket has answered
    a malformed request with 400 then)."""
    connection = WebSocketConnection(stream, WSConnection(ConnectionType.SERVER), message_queue_size=0)
    request: WebSocketRequest | None = None
    async with trio.open_nursery() as nursery:
        with trio.move_on_after(timeout_s) as waiting:

            async def read() -> None:
                await connection._reader_task()
                waiting.cancel()  # EOF, reset or a protocol error: no request will come

            nursery.start_soon(read, name="websocket handshake reader")
            request = await connection._get_request()
        nursery.cancel_scope.cancel()  # (cancelled in receive_some: no byte it read is lost)
    if request is None:
        return None
    return request, connection._wsproto.handshake._h11_connection.trailing_data[0]


def request_host(request: WebSocketRequest) -> str:
    """The handshake request's ``Host``."""
    return request._event.host


class ServerSocket:
    """One accepted WebSocket: read by one task, written by any under ``send_lock``.

    ``closed`` is None while open; then how it ended (:class:`Closed`). A writer checks it under
    ``send_lock`` before writing: once a close frame went either way, no data frame may follow."""

    __slots__ = (
        "_close_by", "_done", "_finished", "_message_by", "_reader", "_ready", "_socket", "close_timeout_s", "closed",
        "message_timeout_s", "send_lock", "stream", "tail",
    )  # fmt: skip

    def __init__(
        self,
        stream: trio.abc.Stream,
        received: bytes,
        *,
        max_message_bytes: int,
        close_timeout_s: float,
        message_timeout_s: float = math.inf,
    ) -> None:
        self.stream = stream
        self.send_lock = trio.StrictFIFOLock()
        self.close_timeout_s = close_timeout_s
        self.message_timeout_s = message_timeout_s
        #: while a message is partly read: when the connection fails if its rest has not come
        self._message_by = math.inf
        self.closed: Closed | None = None
        self._reader = FrameReader(masked=True, max_message_bytes=max_message_bytes)
        self._reader.feed(received)
        #: frames parsed and not handed on yet (more than one receive's limit came in one read)
        self._ready: list[tuple[int, str | bytes]] = []
        #: once we sent a close frame: until when the peer's answer is awaited
        self._close_by = math.inf
        #: reading is over: the TCP connection is closed
        self._done = False
        #: made by a task waiting in :meth:`aclose` for the reader to see the peer's close
        self._finished: trio.Event | None = None
        #: the plain TCP socket written by write_now (None under TLS: its records are written by the stream)
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        #: what write_now's system call left: it goes first, under ``send_lock``, before any other bytes
        self.tail = b""

    @property
    def max_message_bytes(self) -> int:
        return self._reader.max_message_bytes

    @max_message_bytes.setter
    def max_message_bytes(self, size: int) -> None:  # a reload: the next frame header is checked against it
        self._reader.max_message_bytes = size

    async def receive(self, limit: int) -> list[str | bytes]:
        """The next messages, at least one and at most ``limit``, in order; an empty list once the
        connection is closed (``closed`` says how). Messages that came before a close frame are
        handed on first; none that came after our own close frame are."""
        while True:
            ready = self._ready
            if ready:
                messages: list[str | bytes] = []
                ping: bytes | None = None  # the last one of this batch: one pong answers it (RFC 6455 §5.5.3)
                taken = 0
                for opcode, payload in ready:
                    taken += 1
                    if opcode <= OP_BINARY:  # text or binary (continuations are reassembled)
                        if self.closed is None:
                            messages.append(payload)
                            if len(messages) == limit:
                                break
                    elif opcode == OP_PING:
                        ping = payload  # type: ignore[assignment]
                    elif opcode == OP_CLOSE:
                        await self._close_received(payload)  # type: ignore[arg-type]
                        break
                    # a pong carries nothing for us
                if ping is not None and self.closed is None:  # a flood of pings costs one write per read
                    await self._send_control(encode_frame(OP_PONG, ping, mask=False))
                if self._done or taken == len(ready):
                    ready.clear()
                else:
                    del ready[:taken]
                    await trio.lowlevel.checkpoint()  # more is read: let the others run between batches
                if messages:
                    return messages
                continue
            if self._done:
                return []
            try:
                ready += self._reader.events()
            except FrameError as exc:  # the connection fails (RFC 6455 §7.1.7): what follows cannot be
                await self._send_close(exc.code, exc.reason)  # read as frames, so the close is not awaited
                await self._finish()
                continue
            if ready:
                if not self._reader.fragmented:  # frames came whole: the next one's time starts with its first
                    self._message_by = math.inf  # byte (a fragmented message has its time as a whole)
                continue
            if not self._reader.in_message:
                self._message_by = math.inf
            elif self._message_by == math.inf:  # the last read ended inside a frame (or between fragments)
                self._message_by = trio.current_time() + self.message_timeout_s
            data: bytes | bytearray | None
            try:
                deadline = min(self._close_by, self._message_by)
                if deadline < math.inf:
                    with trio.move_on_at(deadline):
                        data = await self.stream.receive_some(RECEIVE_CHUNK)
                    if deadline <= trio.current_time():
                        data = None
                else:
                    data = await self.stream.receive_some(RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if data is None and self._close_by > trio.current_time():  # a message not finished in time: what
                # follows cannot be read as frames, so the close is not awaited (as for a violation)
                await self._send_close(CLOSE_POLICY, f"message not finished within {self.message_timeout_s:g} s")
                await self._finish()
                continue
            if not data:  # EOF, reset, closed by aclose, or no answer to our close in time
                await self._finish()
                continue
            self._reader.feed(data)

    async def _close_received(self, payload: bytes) -> None:
        """The peer's close frame: answered with its code (or a violation's) if it closes first; then
        the TCP connection ends (RFC 6455 §7.1.1: the server closes first)."""
        if self.closed is None:
            try:
                self.closed = Closed(*parse_close(payload))
                answer = close_answer(self.closed.code)
            except FrameError as exc:
                self.closed = Closed(exc.code, exc.reason)
                answer = close_payload(exc.code, exc.reason)
            await self._send_control(encode_frame(OP_CLOSE, answer, mask=False))
        await self._finish()

    def can_write_now(self) -> bool:
        """:meth:`write_now` may be called: a plain socket, open, and no write under way or left over."""
        return self._socket is not None and self.closed is None and not self.tail and not self.send_lock.locked()

    def write_now(self, data: bytes) -> None:
        """Hand ``data`` to the kernel in one non-blocking system call (only when :meth:`can_write_now`).

        What the socket's buffer does not take stays in ``tail``: the caller has it written by
        :meth:`send` (with its deadline) before anything else goes. A connection found reset is
        ``lost``; ``data`` is dropped with it."""
        assert self._socket is not None
        try:
            sent = os.write(self._socket.fileno(), data)
        except BlockingIOError:
            sent = 0
        except OSError:  # reset, or closed meanwhile (fileno -1): nothing more goes out
            self.lost()
            return
        if sent < len(data):
            self.tail = data[sent:]

    async def send(self, data: bytes) -> bool:
        """Write ``tail`` and ``data`` holding ``send_lock``; False once the connection is closed or lost.

        No deadline of its own: the caller's scope bounds it (part of a frame may be out when it is
        cut short, so the caller then cuts the connection)."""
        async with self.send_lock:
            if self.closed is not None:
                return False
            return await self._write(data)

    async def _write(self, data: bytes) -> bool:
        """Under ``send_lock``: the tail first (what a non-blocking write left of a frame), then ``data``."""
        if self.tail:
            data, self.tail = self.tail + data, b""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.lost()
            return False
        return True

    async def _send_control(self, frame: bytes) -> None:
        """Write a control frame once the writer before it is done (whose write has a deadline of its
        own), within ``close_timeout_s``: a peer that does not take it is cut off (part of the frame
        may be out, nothing can follow it)."""
        sent = False
        async with self.send_lock:
            with trio.move_on_after(self.close_timeout_s):
                sent = await self._write(frame)
        if not sent:
            await self._finish()

    async def _send_close(self, code: int, reason: str) -> None:
        """Start the closing handshake: our close frame, then the peer's answer awaited until ``_close_by``."""
        if self.closed is None:
            self.closed = Closed(code, reason)
            self._close_by = trio.current_time() + self.close_timeout_s
            await self._send_control(encode_frame(OP_CLOSE, close_payload(code, reason), mask=False))

    def lost(self) -> None:
        """A writer found the TCP connection gone."""
        if self.closed is None:
            self.closed = Closed(CLOSE_ABNORMAL)

    async def _finish(self) -> None:
        self.lost()
        self._done = True
        if self._finished is not None:
            self._finished.set()
        await trio.aclose_forcefully(self.stream)

    async def aclose(self, code: int, reason: str = "") -> None:
        """Close from any task but the reader: our close frame, the reader waited for while it reads the
        peer's answer (at most ``close_timeout_s``), then the TCP connection closed."""
        await self._send_close(code, reason)
        if not self._done and self._close_by < math.inf:
            if self._finished is None:
                self._finished = trio.Event()
            with trio.move_on_at(self._close_by):
                await self._finished.wait()
        await self._finish()
