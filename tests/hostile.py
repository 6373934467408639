"""Hostile peers for tests: raw WebSocket handshakes and frames, TCP resets, bad input.

Nothing here imports aivad: a peer that attacks the daemon must not share its
codec. The pieces:

- :func:`reset` closes a socket with ``SO_LINGER 0``, so the peer sees a TCP RST
  (not a FIN) — at any point: mid-handshake, mid-frame, after the upgrade.
- :func:`handshake_request` / :func:`encode_frame` build the bytes of an upgrade
  request and of client frames, including ones RFC 6455 forbids (unmasked, RSV
  bits, bad opcodes, a length that lies).
- :class:`RawClient` is a blocking WebSocket client over a plain socket that
  sends exactly the bytes it is given and parses what the server sends;
  :class:`AsyncRawClient` is the same on trio, for many peers at once.
- ``*_strategy`` functions and :data:`HOSTILE_*` constants are hypothesis
  strategies and values for bad input: wrong types, huge numbers, NaN,
  deep nesting, strings at and one over the 255-character limit of every
  id-like field, lone surrogates, invalid UTF-8.

:class:`Raw` lets a generated JSON object carry a literal that ``json.dumps``
cannot write (``1e999``, 10,000 levels of nesting): :func:`render` puts it in.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import select
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import trio
from hypothesis import strategies as st

__all__ = [
    "DEEP_NESTING",
    "HOSTILE_LITERALS",
    "HOSTILE_SCALARS",
    "ID_LIMIT",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONTINUATION",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "AsyncRawClient",
    "FrameParser",
    "HandshakeRefused",
    "Raw",
    "RawClient",
    "encode_frame",
    "handshake_request",
    "hostile_value_strategy",
    "id_string_strategy",
    "render",
    "reset",
    "reset_trio",
    "split_frames",
]

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

#: the length limit of every id-like field of DESIGN §2/§4.3 (topics, patterns, message ids, group ids …)
ID_LIMIT = 255
_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# ---- sockets --------------------------------------------------------------------------


def reset(sock: socket.socket) -> None:
    """Close ``sock`` so the peer gets a TCP RST: ``SO_LINGER`` on with a zero timeout."""
    with contextlib.suppress(OSError):  # already reset by the peer: closing is all that is left
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def handshake_request(
    host: str, port: int, *, path: str = "/", key: str | None = None, headers: Sequence[tuple[str, str]] = ()
) -> bytes:
    """The bytes of a complete WebSocket upgrade request (RFC 6455 §4.1)."""
    key = key or base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()


def encode_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length: int | None = None,
) -> bytes:
    """One frame as a client writes it; every knob can break RFC 6455 on purpose.

    ``rsv``: the three reserved bits (0..7); ``mask=False``: an unmasked client
    frame; ``length``: the length the header claims, whatever the payload is.
    """
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0x0F)
    mask_bit = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, mask_bit | n))
    elif n < 65536:
        head = bytes((b0, mask_bit | 126)) + struct.pack("!H", n)
    else:
        head = bytes((b0, mask_bit | 127)) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _mask(key, payload)


def _mask(key: bytes, payload: bytes) -> bytes:
    n = len(payload)
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(n, "little")


def split_frames(opcode: int, payload: bytes, cuts: Iterable[int], *, ping_between: bool = False) -> list[bytes]:
    """A message as fragments cut at byte offsets ``cuts`` (a cut may split a UTF-8 character:
    only the whole message must be valid); ``ping_between`` puts a ping among the fragments (legal)."""
    points = sorted({c for c in cuts if 0 < c < len(payload)})
    pieces = [payload[a:b] for a, b in itertools.pairwise([0, *points, len(payload)])]
    frames = []
    for i, piece in enumerate(pieces):
        frames.append(encode_frame(opcode if i == 0 else OP_CONTINUATION, piece, fin=i == len(pieces) - 1))
        if ping_between and i == 0 and len(pieces) > 1:
            frames.append(encode_frame(OP_PING, b"between"))
    return frames


class HandshakeRefused(Exception):
    """The server answered the upgrade with something else than 101 (or closed)."""

    def __init__(self, status: int | None, head: bytes) -> None:
        super().__init__(f"handshake refused: {status} {head[:200]!r}")
        self.status = status
        self.head = head


@attrs.frozen
class Close:
    code: int | None  # None: a close frame without a code
    reason: bytes


class FrameParser:
    """Server frames → ``(opcode, payload)`` pairs, data messages reassembled (text as ``bytes``:
    the test decides whether it is UTF-8); ``closed`` is the server's close frame once one came."""

    def __init__(self, buffered: bytes = b"") -> None:
        self._buffer = bytearray(buffered)
        self._parts: list[bytes] = []
        self._opcode: int | None = None
        self.closed: Close | None = None

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buffer += data
        buf, out, pos = self._buffer, [], 0
        while len(buf) - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            assert not b1 & 0x80, "the server masked a frame"
            n, head = b1 & 0x7F, 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                (n,) = struct.unpack_from("!H", buf, pos + 2)
                head = 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                (n,) = struct.unpack_from("!Q", buf, pos + 2)
                head = 10
            if len(buf) - pos < head + n:
                break
            payload = bytes(buf[pos + head : pos + head + n])
            pos += head + n
            opcode, fin = b0 & 0x0F, b0 & 0x80
            if opcode >= 0x8:
                if opcode == OP_CLOSE and self.closed is None:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                    self.closed = Close(code, payload[2:])
                out.append((opcode, payload))
                continue
            if opcode != OP_CONTINUATION:
                self._opcode = opcode
            self._parts.append(payload)
            if fin:
                assert self._opcode is not None, "continuation frame from the server with no message"
                out.append((self._opcode, b"".join(self._parts)))
                self._parts, self._opcode = [], None
        del buf[:pos]
        return out


class RawClient:
    """A blocking WebSocket client over a plain socket: it sends the bytes it is given.

    ``receive`` returns what arrived (see :class:`FrameParser`); ``closed`` is the
    server's close frame once one came, ``eof`` true once the server's side of
    the TCP connection ended.
    """

    def __init__(self, sock: socket.socket, buffered: bytes = b"") -> None:
        self.sock = sock
        self._pending = buffered
        self.parser = FrameParser()
        self.eof = False

    @property
    def closed(self) -> Close | None:
        return self.parser.closed

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        path: str = "/",
        headers: Sequence[tuple[str, str]] = (),
        timeout_s: float = 10.0,
    ) -> RawClient:
        """Open a TCP connection and complete the upgrade; raises HandshakeRefused or OSError."""
        sock = socket.create_connection((host, port), timeout=timeout_s)
        try:
            key = base64.b64encode(os.urandom(16)).decode()
            sock.sendall(handshake_request(host, port, path=path, key=key, headers=headers))
            head, rest = read_http_head(sock, timeout_s)
            check_upgrade(head, key)
        except BaseException:
            sock.close()
            raise
        return cls(sock, rest)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: bytes, timeout_s: float = 30.0) -> None:
        self.sock.settimeout(timeout_s)
        self.sock.sendall(data)

    def send_text(self, text: str | bytes) -> None:
        self.send(encode_frame(OP_TEXT, text.encode() if isinstance(text, str) else text))

    def send_json(self, obj: Any) -> None:
        self.send_text(json.dumps(obj))

    def receive(self, timeout_s: float = 0.0) -> list[tuple[int, bytes]]:
        """What the server sent, waiting up to ``timeout_s`` for the first bytes (0: only what is there)."""
        data, self._pending = self._pending, b""
        if not self.eof:
            ready, _, _ = select.select([self.sock], [], [], 0 if data else timeout_s)
            while ready:
                try:
                    chunk = self.sock.recv(1 << 20)
                except (ConnectionResetError, BrokenPipeError):
                    chunk = b""
                if not chunk:
                    self.eof = True
                    break
                data += chunk
                ready, _, _ = select.select([self.sock], [], [], 0)
        return self.parser.feed(data)

    def close(self, code: int = 1000, timeout_s: float = 5.0) -> None:
        """The closing handshake: send a close frame, read until the server's, then close the socket."""
        try:
            if self.closed is None:
                self.send(encode_frame(OP_CLOSE, struct.pack("!H", code)))
            deadline = time.monotonic() + timeout_s
            while self.closed is None and not self.eof and time.monotonic() < deadline:
                self.receive(deadline - time.monotonic())
        except OSError:
            pass
        finally:
            self.sock.close()

    def reset(self) -> None:
        reset(self.sock)


class AsyncRawClient:
    """The trio form of :class:`RawClient`, for tests that run many peers at once."""

    def __init__(self, stream: trio.SocketStream, buffered: bytes) -> None:
        self.stream = stream
        self._pending = buffered
        self.parser = FrameParser()
        self.eof = False

    @property
    def closed(self) -> Close | None:
        return self.parser.closed

    @classmethod
    async def connect(cls, host: str, port: int, *, receive_buffer: int | None = None) -> AsyncRawClient:
        """Open a TCP connection (with a small ``SO_RCVBUF`` if asked) and complete the upgrade."""
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if receive_buffer is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            await sock.connect((host, port))
            stream = trio.SocketStream(sock)
            key = base64.b64encode(os.urandom(16)).decode()
            await stream.send_all(handshake_request(host, port, key=key))
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            check_upgrade(head + b"\r\n\r\n", key)
        except BaseException:
            sock.close()
            raise
        return cls(stream, rest)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_json(self, obj: Any) -> None:
        await self.send(encode_frame(OP_TEXT, json.dumps(obj).encode()))

    async def receive(self) -> list[tuple[int, bytes]]:
        """The frames of the next bytes that arrive ([] at EOF: then ``eof`` is true)."""
        data, self._pending = self._pending, b""
        if not data:
            try:
                data = await self.stream.receive_some(1 << 16)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                self.eof = True
                return []
        return self.parser.feed(data)

    async def close(self, code: int = 1000) -> None:
        """The closing handshake (bounded by the caller's cancel scope), then close the socket."""
        try:
            if self.closed is None:
                await self.send(encode_frame(OP_CLOSE, struct.pack("!H", code)))
            while self.closed is None and not self.eof:
                await self.receive()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.stream.socket.close()

    def reset(self) -> None:
        reset_trio(self.stream.socket)


def reset_trio(sock: trio.socket.SocketType) -> None:
    """:func:`reset` for a trio socket."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def check_upgrade(head: bytes, key: str) -> None:
    """Raise HandshakeRefused unless ``head`` is a 101 answering ``key``."""
    status = _status(head)
    if status != 101 or accept_key(key).encode() not in head:
        raise HandshakeRefused(status, head)


def read_http_head(sock: socket.socket, timeout_s: float) -> tuple[bytes, bytes]:
    """Read an HTTP response head: (head, the bytes after it). EOF first: what came, and b''."""
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data, b""
        data += chunk
        if len(data) > 1 << 20:
            raise HandshakeRefused(None, data)
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _status(head: bytes) -> int | None:
    parts = head.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None


# ---- bad input ------------------------------------------------------------------------


@attrs.frozen
class Raw:
    """A JSON literal put verbatim into a rendered document (see :func:`render`)."""

    text: str


def render(obj: Any) -> str:
    """``obj`` as JSON text, every :class:`Raw` inside replaced by its literal.

    Strings are ASCII-escaped, so a lone surrogate travels as ``\\ud800`` (valid
    JSON text, a string no UTF-8 encoder can write).
    """
    raws: list[str] = []

    def swap(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(value.text)
            return f"\x00raw{len(raws) - 1}\x00"
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        return value

    text = json.dumps(swap(obj))
    for i, literal in enumerate(raws):
        text = text.replace(json.dumps(f"\x00raw{i}\x00"), literal, 1)
    return text


def nested(depth: int, kind: str = "list") -> Raw:
    """``depth`` levels of arrays (or objects) as a literal: far deeper than any decoder's recursion limit."""
    if kind == "list":
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a":' * depth + "1" + "}" * depth)


DEEP_NESTING = nested(10_000)

#: literals json.dumps will not write, or writes differently
HOSTILE_LITERALS = (
    Raw("NaN"),
    Raw("Infinity"),
    Raw("-Infinity"),
    Raw("1e999"),
    Raw("-1e999"),
    Raw("-0"),
    Raw("-0.0e-0"),
    Raw("1E400"),
    Raw("123456789012345678901234567890123456789"),
    Raw("0.1e-99999"),
    DEEP_NESTING,
    nested(10_000, "object"),
    nested(900),
)

#: values json.dumps writes, each wrong for some field
HOSTILE_SCALARS: tuple[Any, ...] = (
    1e308,
    -1e308,
    2**80,
    -(2**80),
    2**63,
    2**64,
    -1,
    0,
    -0.0,
    5e-324,
    0.5,
    float("nan"),
    float("inf"),
    float("-inf"),
    True,
    False,
    None,
    "",
    " ",
    "\x00",
    "\ud800",
    "a\udfffb",
    "é",
    "\u2028",
    "#",
    "*",
    "..",
    "a" * (ID_LIMIT + 1),
)


def id_string_strategy(word: str = "a", *, dots: bool = True) -> st.SearchStrategy[str]:
    """Id-like strings around the limit: 1, 254, 255 (valid) and 0, 256, 10,000 characters, and
    short ones with odd characters; ``dots`` makes them dot-separated words (topics, patterns)."""
    def of_length(n: int) -> str:
        if not dots or n < 3:
            return word * n
        return ((word + ".") * n)[: n - 1] + word  # words of one character, never two dots in a row

    lengths = st.sampled_from([1, 2, ID_LIMIT - 1, ID_LIMIT, ID_LIMIT + 1, 0, 10_000])
    odd = st.text(
        alphabet=st.sampled_from(["a", "Z", "0", "_", "-", ".", "*", "#", " ", "é", "\x00", "\ud800", "\n", "/"]),
        min_size=1,
        max_size=12,
    )
    return st.one_of(lengths.map(of_length), odd)


def hostile_value_strategy() -> st.SearchStrategy[Any]:
    """Any bad value for a field: hostile scalars and literals, containers, or an id-like string."""
    return st.one_of(
        st.sampled_from(HOSTILE_SCALARS),
        st.sampled_from(HOSTILE_LITERALS),
        st.sampled_from([[], {}, [1, 2], {"a": None}, [None] * 100, {"op": "ping"}]),
        id_string_strategy(),
        st.integers(),
        st.floats(),
    )
