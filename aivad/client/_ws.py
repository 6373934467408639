"""A small WebSocket client: h11 for the handshake, :mod:`aivad.wsframes` for frames, over anyio.

Why not a library with its own event loop: the client must run under trio *and*
asyncio, so the only I/O here is anyio's ``connect_tcp``; h11 parses the HTTP
upgrade and :mod:`aivad.wsframes` does framing, masking and validation (it
replaced wsproto's framing here: 13% less CPU per round trip in a driver, 5% in
a worker, docs/performance.md). What this module adds is the part a sans-I/O
codec leaves to its caller:

- a cap on the reassembled message size (a peer that sends more gets close
  1009 and :class:`WebSocketClosed`), and the close code RFC 6455 assigns to any
  other violation (1002, 1007);
- answering pings and close frames;
- one send lock, so frames reach the socket whole and in order even when
  several tasks send;
- closing under a bounded, shielded deadline, so a dead peer never hangs a
  ``finally``.

Exactly one task may call :meth:`WebSocketConnection.receive` at a time; any
number may call :meth:`~WebSocketConnection.send`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Final
from urllib.parse import urlsplit

import anyio
import anyio.abc
import h11

from aivad.wsframes import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameError,
    FrameReader,
    close_answer,
    close_payload,
    encode_frame,
    parse_close,
)

__all__ = [
    "HandshakeRejected",
    "WebSocketClosed",
    "WebSocketConnection",
    "connect_websocket",
    "parse_ws_url",
]

log = logging.getLogger(__name__)

#: Close code recorded when the TCP connection ended without a close frame.
CLOSE_ABNORMAL: Final = 1006
_RECEIVE_CHUNK: Final = 65536
_MAX_REJECT_BODY: Final = 4096
_ACCEPT_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WebSocketClosed(Exception):
    """The connection is closed; ``code`` and ``reason`` are the peer's (or ours, or 1006)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"WebSocket closed with code {code}" + (f": {reason}" if reason else ""))
        self.code = code
        self.reason = reason


class HandshakeRejected(Exception):
    """The server answered the upgrade request with an HTTP status instead of 101."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"WebSocket handshake rejected with HTTP {status}")
        self.status = status
        self.body = body


def parse_ws_url(url: str) -> tuple[str, int, str, bool]:
    """Split ``ws://host:port/path?query`` into ``(host, port, target, tls)``.

    Raises ValueError for anything but ``ws://`` / ``wss://`` with a host, so a
    typo in a URL fails at once instead of as a confusing connect error later.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"not a WebSocket URL (ws:// or wss://): {url!r}")
    if not parts.hostname:
        raise ValueError(f"WebSocket URL has no host: {url!r}")
    tls = parts.scheme == "wss"
    port = parts.port or (443 if tls else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return parts.hostname, port, target, tls


class WebSocketConnection:
    """An open client WebSocket. Create it with :func:`connect_websocket`.

    Resource handling: owns the byte stream; :meth:`aclose` (idempotent) closes it.
    Error handling: every way the connection can end surfaces as
    :class:`WebSocketClosed` from :meth:`send` / :meth:`receive`; the close code
    says why (1006 when the TCP connection simply went away).
    """

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        received: bytes = b"",
        *,
        max_message_bytes: int,
        close_timeout_s: float,
    ) -> None:
        self._stream = stream
        self._reader = FrameReader(masked=False, max_message_bytes=max_message_bytes)
        self._reader.feed(received)  # what arrived right behind the handshake response
        self._events: deque[tuple[int, str | bytes]] = deque()
        self._close_timeout_s = close_timeout_s
        # uncontended, the lock does not yield: the send right after it does
        self._send_lock = anyio.Lock(fast_acquire=True)
        self._closed: WebSocketClosed | None = None
        self._close_sent = False
        self._stream_closed = False

    @property
    def closed(self) -> WebSocketClosed | None:
        """None while open; afterwards the close that ended the connection."""
        return self._closed

    async def send(self, text: str) -> None:
        """Send one text message. Raises WebSocketClosed if the connection is closed."""
        frame = encode_frame(OP_TEXT, text.encode("utf-8"), mask=True)
        async with self._send_lock:
            if self._closed is not None:
                raise self._closed
            await self._send_raw_locked(frame)

    async def receive(self) -> str:
        """Return the next complete text message (binary ones are decoded as UTF-8).

        Answers pings and close frames on the way. Raises WebSocketClosed once
        the connection is closed; messages that arrived before the close frame
        are returned first.
        """
        while True:
            while self._events:
                opcode, payload = self._events.popleft()
                if opcode == OP_TEXT:
                    return payload  # type: ignore[return-value]
                if opcode == OP_BINARY:
                    return bytes(payload).decode("utf-8", "replace")  # type: ignore[arg-type]
                await self._control(opcode, payload)  # type: ignore[arg-type]
            if self._closed is not None:
                raise self._closed
            try:
                self._events.extend(self._reader.events())
            except FrameError as exc:
                log.warning("closing the WebSocket: %s", exc.reason)
                await self.aclose(exc.code, exc.reason)
                continue
            if self._events:
                continue
            try:
                data = await self._stream.receive(_RECEIVE_CHUNK)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                self._set_closed(CLOSE_ABNORMAL, "connection lost")
                await self._close_stream()
                continue
            self._reader.feed(data)

    async def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            with contextlib.suppress(WebSocketClosed):  # closing anyway: the reader will see why
                async with self._send_lock:
                    if self._closed is None:
                        await self._send_raw_locked(encode_frame(OP_PONG, payload, mask=True))
        elif opcode == OP_CLOSE:
            try:
                code, reason = parse_close(payload)
            except FrameError as exc:
                await self.aclose(exc.code, exc.reason)
                return
            self._set_closed(code, reason)
            self._events.clear()  # nothing after a close frame counts (RFC 6455 §5.5.1)
            if not self._close_sent:  # answer the close with its code (RFC 6455 §5.5.1)
                self._close_sent = True
                with anyio.move_on_after(self._close_timeout_s, shield=True), contextlib.suppress(WebSocketClosed):
                    await self._send_raw(encode_frame(OP_CLOSE, close_answer(code), mask=True))
            await self._close_stream()
        # a pong carries nothing for us

    async def _send_raw(self, data: bytes) -> None:
        async with self._send_lock:
            await self._send_raw_locked(data)

    async def _send_raw_locked(self, data: bytes) -> None:
        try:
            await self._stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self._set_closed(CLOSE_ABNORMAL, "connection lost")
            await self._close_stream()
            raise self._closed from None  # type: ignore[misc]

    def _set_closed(self, code: int, reason: str) -> None:
        if self._closed is None:
            self._closed = WebSocketClosed(code, reason)

    async def _close_stream(self) -> None:
        if not self._stream_closed:
            self._stream_closed = True
            with anyio.CancelScope(shield=True):
                await self._stream.aclose()

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close politely: send a close frame, then close TCP.

        The peer's answering close frame is not awaited: another task may own
        :meth:`receive`, and the daemon treats a TCP close after our close frame
        as a clean close.

        Safe to call from any task, any number of times, also while another task
        is blocked in :meth:`receive` (that task then gets WebSocketClosed).
        Shielded and bounded by ``close_timeout_s``, so it may be awaited in a
        ``finally`` of a cancelled task.
        """
        with anyio.move_on_after(self._close_timeout_s, shield=True):
            if self._closed is None and not self._close_sent and not self._stream_closed:
                self._set_closed(code, reason)
                self._close_sent = True
                with contextlib.suppress(WebSocketClosed):
                    await self._send_raw(encode_frame(OP_CLOSE, close_payload(code, reason), mask=True))
            self._set_closed(code, reason)
        await self._close_stream()


def _accept_token(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + _ACCEPT_GUID).digest())  # RFC 6455 fixes SHA-1 here


async def _handshake(
    stream: anyio.abc.ByteStream, url: str, host_header: str, target: str, extra_headers: Sequence[tuple[str, str]]
) -> bytes:
    """Upgrade to WebSocket; returns the bytes that came right after the 101 response."""
    key = base64.b64encode(os.urandom(16))
    http = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET",
        target=target,
        headers=[
            ("Host", host_header),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", key.decode()),
            ("Sec-WebSocket-Version", "13"),
            *extra_headers,
        ],
    )
    await stream.send(http.send(request))
    reject_status = 0
    reject_body = bytearray()
    while True:
        try:
            event = http.next_event()
        except h11.RemoteProtocolError as exc:
            raise OSError(f"{url}: bad WebSocket handshake response: {exc}") from None
        if event is h11.NEED_DATA:
            try:
                http.receive_data(await stream.receive(_RECEIVE_CHUNK))
            except anyio.EndOfStream:
                if not reject_status:
                    raise OSError(f"{url}: connection closed during the WebSocket handshake") from None
                http.receive_data(b"")  # a rejection's body may end with the connection
        elif isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            headers = {name: value for name, value in event.headers}
            connection = {token.strip() for token in headers.get(b"connection", b"").lower().split(b",")}
            if headers.get(b"upgrade", b"").lower() != b"websocket" or b"upgrade" not in connection:
                raise OSError(f"{url}: the 101 response does not upgrade to websocket")
            if headers.get(b"sec-websocket-accept") != _accept_token(key):
                raise OSError(f"{url}: bad Sec-WebSocket-Accept in the handshake response")
            if b"sec-websocket-extensions" in headers:
                raise OSError(f"{url}: the server chose an extension that was not offered")
            return http.trailing_data[0]
        elif isinstance(event, h11.Response):
            reject_status = event.status_code
        elif isinstance(event, h11.Data):
            reject_body += event.data[: _MAX_REJECT_BODY - len(reject_body)]
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            raise HandshakeRejected(reject_status, bytes(reject_body))


async def connect_websocket(
    url: str,
    *,
    max_message_bytes: int = 16 * 1024 * 1024,
    connect_timeout_s: float = 10.0,
    close_timeout_s: float = 5.0,
    ssl_context: ssl.SSLContext | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> WebSocketConnection:
    """Open a TCP connection to ``url`` and complete the WebSocket handshake.

    ``headers`` are added to the upgrade request (``Authorization: Bearer …``).

    Returns: an open :class:`WebSocketConnection`; the caller must ``aclose()`` it.
    Error handling: OSError when the host cannot be reached or answers with
    something that is not a WebSocket handshake, TimeoutError when TCP +
    handshake take longer than ``connect_timeout_s``, HandshakeRejected when the
    server answers with an HTTP error, ValueError for a bad URL.
    """
    host, port, target, tls = parse_ws_url(url)
    host_header = host if port == (443 if tls else 80) else f"{host}:{port}"
    if ":" in host and not host.startswith("["):  # IPv6 literal
        host_header = f"[{host}]" if port == (443 if tls else 80) else f"[{host}]:{port}"
    with anyio.fail_after(connect_timeout_s):
        if tls:
            stream: anyio.abc.ByteStream = await anyio.connect_tcp(
                host, port, tls=True, ssl_context=ssl_context, tls_hostname=host
            )
        else:
            stream = await anyio.connect_tcp(host, port)
        try:
            received = await _handshake(stream, url, host_header, target, headers)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            raise
    return WebSocketConnection(
        stream, received, max_message_bytes=max_message_bytes, close_timeout_s=close_timeout_s
    )
