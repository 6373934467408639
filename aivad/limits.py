"""What one peer may cost the others: token buckets and per-address admission — sync, no I/O.

DESIGN §3 and §4.8: every bound comes from config, and exceeding one is an
explicit ``overloaded`` (or a refused handshake, or a documented close), never
a stall of other clients. The edges own the objects (a bucket per connection,
one gate per listener); the numbers come from ``[limits]`` and ``[websocket]``.
"""

from __future__ import annotations

import contextlib
import http
from collections import Counter

import attrs
import trio

__all__ = ["REFUSALS", "Admission", "GateStatistics", "PeerGate", "TokenBucket", "peer_of", "refuse"]


class TokenBucket:
    """Tokens that refill at a rate, at most ``burst`` saved up; a rate of 0 means no limit.

    The rate and burst are given at each :meth:`take`, not kept: a bucket follows a
    reloaded ``[limits]`` at once (its saved tokens are cut to a smaller burst).
    Time is trio's clock, so tests drive it with ``MockClock``.
    """

    __slots__ = ("_stamp", "_tokens")

    def __init__(self) -> None:
        self._tokens: float | None = None  # full at the first take
        self._stamp = 0.0

    def take(self, rate_per_s: float, burst: float, n: int = 1) -> bool:
        """Take ``n`` tokens if there are that many (then True); else take none (False)."""
        if not rate_per_s:
            return True
        burst = max(burst, 1.0)
        now = trio.current_time()
        tokens = burst if self._tokens is None else min(burst, self._tokens + (now - self._stamp) * rate_per_s)
        self._stamp = now
        if tokens < n:
            self._tokens = tokens
            return False
        self._tokens = tokens - n
        return True


@attrs.define(eq=False)
class Admission:
    """One accepted TCP connection, from accept to close: its address and whether it is still handshaking."""

    address: str
    handshaking: bool = True


@attrs.frozen
class GateStatistics:
    connections: int
    handshakes: int
    addresses: int
    refused: dict[str, int]


#: gate refusals: why → (HTTP status, body); written before any byte of the request is read
REFUSALS = {
    "connections": (503, "too many connections"),
    "handshakes": (503, "too many handshakes in progress"),
    "per_address": (429, "too many connections from your address"),
}


def peer_of(stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]) -> tuple[str, int] | None:
    """An accepted connection's peer (address, port), looked up once: after a reset the socket
    cannot say (None: reset before anyone looked — nothing to serve)."""
    socket_stream = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    try:
        address, port = socket_stream.socket.getpeername()[:2]
    except OSError:
        return None
    return str(address), int(port)


async def refuse(stream: trio.abc.Stream, why: str) -> None:
    """Answer a connection the gate did not admit (``why``: a key of :data:`REFUSALS`) with a
    plain HTTP error, then close it (the WebSocket and the HTTP server alike)."""
    status, text = REFUSALS[why]
    body = f"aivad: {text}\n".encode()
    head = f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: text/plain\r\n"
    response = head.encode() + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body
    with trio.move_on_after(1.0):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(response)
    # what the peer sent meanwhile (its request) is read and dropped, briefly: closing a socket with
    # unread data resets the connection, and the peer could lose the answer before reading it
    with trio.move_on_after(_DRAIN_S), contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        drained = 0
        while drained < _DRAIN_BYTES and (data := await stream.receive_some(_DRAIN_BYTES)):
            drained += len(data)
    await trio.aclose_forcefully(stream)


#: how long, and how many bytes, a refused connection's request is read before it is closed
_DRAIN_S = 0.1
_DRAIN_BYTES = 65536


class PeerGate:
    """Admits TCP connections before any byte is read: totals, per address, handshakes in progress.

    A flood of half-open handshakes from one address can then hold at most
    ``max_per_address`` sockets, and all the floods together at most
    ``max_handshakes``; a well-behaved client from another address still gets in.
    """

    def __init__(self, max_connections: int, max_per_address: int, max_handshakes: int) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.max_handshakes = max_handshakes
        self._per_address: Counter[str] = Counter()
        self._total = 0
        self._handshakes = 0
        self._refused: Counter[str] = Counter()

    def enter(self, address: str) -> Admission | str:
        """Admit a connection from ``address``: an :class:`Admission` to give back with :meth:`leave`,
        or why not (``connections``, ``per_address``, ``handshakes``: also a metric label)."""
        if self._total >= self.max_connections:
            why = "connections"
        elif self._per_address[address] >= self.max_per_address:
            why = "per_address"
        elif self._handshakes >= self.max_handshakes:
            why = "handshakes"
        else:
            self._total += 1
            self._per_address[address] += 1
            self._handshakes += 1
            return Admission(address)
        self._refused[why] += 1
        return why

    def handshake_done(self, admission: Admission) -> None:
        if admission.handshaking:
            admission.handshaking = False
            self._handshakes -= 1

    def leave(self, admission: Admission) -> None:
        self.handshake_done(admission)
        self._total -= 1
        self._per_address[admission.address] -= 1
        if not self._per_address[admission.address]:
            del self._per_address[admission.address]

    def statistics(self) -> GateStatistics:
        return GateStatistics(self._total, self._handshakes, len(self._per_address), dict(self._refused))
