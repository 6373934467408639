"""AMQP frames cut out of one read buffer: aiormq's frame reader without its per-frame costs.

Why: AMQP ingest is bound by the daemon's GIL, and half of the daemon's CPU per message is
the bridge's asyncio thread reading frames (docs/performance.md, "Where issue 13 stands
(stop 24)"). aiormq's ``FrameReceiver`` takes an ``asyncio.Lock``, a ``BytesIO`` and three
``StreamReader.readexactly`` awaits per frame — three frames per delivery. This reader
takes what the socket has (up to 64 KiB a read) and cuts every whole frame out of it with
no await; pamqp still unmarshals each frame. bench/amqp_frames.py (30,000 deliveries of
200-byte bodies fed from memory): 15.2 µs per delivery with aiormq's reader, 9.5 with this
one, 8.6 of them pamqp's unmarshalling; through bench/amqp_ingest.py, RabbitMQ → aivad → a
WebSocket subscriber went from 0.95–1.04× raw aiormq to 1.05–1.22× (docs/performance.md).

It also bounds a frame's size, which aiormq does not: a frame header that claims more than
:data:`MAX_FRAME_BYTES` ends the connection before anything is buffered for it (RabbitMQ's
``frame_max`` is 128 KiB unless configured otherwise).

How it is put in place: aiormq builds its reader as ``FrameReceiver(reader)`` inside
``Connection.connect`` and has no hook for another, so :func:`lean_frames` replaces the
module's ``FrameReceiver`` with a chooser that builds this reader only for a connection opened inside
:func:`lean_frames` (a context variable) — the bridge's own — and aiormq's for any other
(bench/amqp_ingest.py's raw-aiormq baseline runs in the same process). tests/test_amqp_frames.py
pins what this relies on, so an aiormq that changes it fails there.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import struct
from collections.abc import Iterator
from typing import Any, Final

import aiormq.connection
import pamqp.frame
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp.exceptions import PAMQPException

__all__ = ["MAX_FRAME_BYTES", "LeanFrameReceiver", "lean_frames"]

#: the largest frame accepted (header and end octet included); larger ends the connection
MAX_FRAME_BYTES: Final = 16 * 1024 * 1024
_READ_BYTES: Final = 65536
_HEADER: Final = struct.Struct(">BHI")  # type, channel, payload size
_HEADER_BYTES: Final = 7

_lean: contextvars.ContextVar[bool] = contextvars.ContextVar("aivad_lean_amqp_frames", default=False)
_AIORMQ_RECEIVER: Final = aiormq.connection.FrameReceiver


class LeanFrameReceiver:
    """What aiormq asks of its frame receiver — ``get_frame()`` and async iteration, each
    yielding pamqp's ``(bytes, channel, frame)`` — read out of one buffer.

    Errors as aiormq's: the peer closing mid-frame, or a socket error, is
    :class:`AMQPConnectionError`; a frame pamqp cannot read, or one over
    :data:`MAX_FRAME_BYTES`, is :class:`InvalidFrameError`; an AMQP protocol header instead
    of a frame (the broker does not speak our version) is :class:`ProtocolSyntaxError`.
    A clean end of the stream between frames ends the iteration.
    """

    __slots__ = ("_buffer", "_position", "_reader", "started")

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._buffer = b""
        self._position = 0
        self.started = False

    def __aiter__(self) -> LeanFrameReceiver:
        return self

    async def get_frame(self) -> tuple[int, int, Any]:
        buffer, position = self._buffer, self._position
        while True:
            available = len(buffer) - position
            wanted = _HEADER_BYTES
            if available >= _HEADER_BYTES:
                if not self.started:
                    if buffer.startswith(b"AMQP", position):
                        raise ProtocolSyntaxError("Unexpected AMQP protocol header")
                    self.started = True
                wanted = _HEADER.unpack_from(buffer, position)[2] + _HEADER_BYTES + 1
                if wanted > MAX_FRAME_BYTES:
                    raise InvalidFrameError(f"a frame of {wanted} bytes (at most {MAX_FRAME_BYTES})")
                if available >= wanted:
                    self._position = position + wanted
                    try:
                        return pamqp.frame.unmarshal(buffer[position:position + wanted])
                    except PAMQPException as exc:
                        raise InvalidFrameError(str(exc)) from exc
            buffer, position = await self._read_until(buffer[position:], wanted), 0
            self._buffer, self._position = buffer, position

    #: ``async for`` steps straight into :meth:`get_frame` (no coroutine in between, per frame)
    __anext__ = get_frame

    async def _read_until(self, start: bytes, wanted: int) -> bytes:
        """``start`` and what the socket gives after it, at least ``wanted`` bytes in all
        (joined once: a frame that spans many reads is not copied once per read)."""
        parts, have = [start], len(start)
        while have < wanted:
            try:
                data = await self._reader.read(max(_READ_BYTES, wanted - have))
            except OSError as exc:
                raise AMQPConnectionError(f"Server communication error: {exc!r}") from exc
            if not data:
                if have:
                    raise AMQPConnectionError(f"Server connection unexpectedly closed, {have} bytes into a frame")
                raise StopAsyncIteration
            parts.append(data)
            have += len(data)
        return b"".join(parts)


def _frame_receiver(reader: asyncio.StreamReader) -> Any:
    """What ``aiormq.connection.FrameReceiver(reader)`` builds once :func:`lean_frames` has run."""
    return LeanFrameReceiver(reader) if _lean.get() else _AIORMQ_RECEIVER(reader)


@contextlib.contextmanager
def lean_frames() -> Iterator[None]:
    """Open the aiormq connections of this block with :class:`LeanFrameReceiver`.

    The first call puts the chooser in aiormq's place (once, for the process); connections
    opened outside the block keep aiormq's own reader."""
    aiormq.connection.FrameReceiver = _frame_receiver  # type: ignore[misc,assignment]
    token = _lean.set(True)
    try:
        yield
    finally:
        _lean.reset(token)
