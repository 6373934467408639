"""A subscription that survives reconnects and never yields a message twice.

Why a connection of its own, read directly by the iterating task:

- the daemon's answer to a slow consumer is closing the connection (4008);
  with one subscription per connection that costs only this subscription a
  resume, never the client's publishes;
- no background task and no queue between socket and consumer: a consumer
  that stops iterating stops reading, TCP pushes back to the daemon, and the
  daemon's own bounded buffer decides. The store is the buffer, not our RAM;
- no nursery lives inside an async generator (STYLE.md pitfalls): this is a
  plain object with ``__anext__``.

Tokens (``connect(url, token=…)``): the connection presents the client's
current token on its handshake. Refreshing it needs no task here either: the
client's one refresher task sends ``auth`` on this connection
(:meth:`Subscription._reauthenticate`, a send only) and the reply is read
among the other frames by whoever iterates. That also covers a consumer that
is not iterating (busy, or pushing back): its connection is refreshed all the
same. A close 4001 (the token expired anyway) is one more reconnect, with a
fresh token; ``{"op":"unsubscribed"}`` (a refresh narrowed the rights) ends
the subscription with ``AivadError(reason)`` instead of resubscribing.

Resume rule: the subscription remembers the last ``seq`` it yielded (or, when
started with ``since=None``, the daemon's ``last_seq`` at the first
``subscribe``) and re-subscribes with ``since`` = that seq. Anything with
``seq <=`` that is dropped, so a replay overlapping what was already seen
cannot produce a duplicate.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

import anyio

from aivad.client._client import decode_frame, encode_frame, envelope_from_wire, open_connection
from aivad.client._model import (
    AivadConnectionError,
    AivadError,
    Backoff,
    Gap,
    SubscriptionStatistics,
)
from aivad.client._token import CLOSE_UNAUTHENTICATED
from aivad.client._ws import HandshakeRejected, WebSocketClosed, WebSocketConnection
from aivad.envelope import Envelope, check_pattern

if TYPE_CHECKING:
    from aivad.client._client import Client

__all__ = ["Subscription"]

log = logging.getLogger(__name__)

#: Subscribe errors worth another try on a new connection; the rest are the caller's to fix.
_RETRYABLE_CODES: Final = frozenset({"overloaded", "internal", "timeout"})
_KEEPALIVE_REF: Final = "keepalive"
#: refs of our ``auth`` frames: this prefix and the token's generation
_AUTH_REF: Final = "auth-"
_CLOSE_REASONS: Final = {
    4008: "slow consumer",
    1001: "going away",
    1006: "connection lost",
    CLOSE_UNAUTHENTICATED: "token expired",
}


class _TimedOut:
    pass


_TIMED_OUT: Final = _TimedOut()


class Subscription:
    """Messages matching ``pattern``, in ascending ``seq``, across reconnects.

    Use as ``async with client.subscribe(p) as sub: async for env in sub: ...``.
    Entering waits until the daemon confirmed the subscription, so a message
    published afterwards is certain to arrive. Plain ``async for`` without
    ``async with`` works too (it subscribes on the first ``__anext__``); the
    subscription is then closed when the client is.

    Attributes a front end reads: ``last_seq`` (the resume point), ``gap``
    (the latest :class:`Gap` the daemon reported, or None) and
    :meth:`statistics`.

    Error handling: connection loss of any kind (4008, 1001, 4001, TCP reset,
    the daemon restarting) is handled here with capped exponential backoff;
    only a subscribe the daemon refuses for good (``bad_request``,
    ``forbidden``, …), a token it refuses on the handshake (``unauthorized``)
    or its ending the subscription (``unsubscribed``: ``AivadError(reason)``,
    e.g. ``forbidden`` after a token refresh narrowed the rights) raise
    AivadError, and AivadConnectionError once ``max_disconnected_s`` is
    exceeded. The iterator ends when the subscription or its client is closed.
    """

    def __init__(
        self,
        client: Client,
        pattern: str,
        since: int | None = None,
        on_gap: Callable[[Gap], None] | None = None,
        epoch: str | None = None,
    ) -> None:
        self.pattern = check_pattern(pattern)
        if since is not None and (not isinstance(since, int) or since < 0):
            raise ValueError("since must be a seq (int >= 0) or None")
        self._client = client
        self._options = client.options
        self._floor = since
        self._on_gap = on_gap
        self.gap: Gap | None = None
        #: the history ``last_seq`` belongs to (DESIGN §4.3); sent back with every resume
        self.epoch = epoch
        self._conn: WebSocketConnection | None = None
        self._tokens = client._tokens
        #: the generation of the token ``_conn`` last presented (handshake or ``auth``)
        self._token_gen = 0
        self._subscribed = False
        self._sub_ref: int | None = None
        self._ready: deque[Envelope] = deque()
        self._closed = False
        self._ever_connected = False
        self._backoff = Backoff(self._options.reconnect_initial_s, self._options.reconnect_max_s)
        self._down_since: float | None = None
        self._ping_outstanding = False
        self._reconnects = 0
        self._gaps = 0
        self._duplicates = 0
        self._delivered = 0
        if client._closed:
            raise AivadConnectionError("client is closed")
        client._subscriptions.add(self)

    # ------------------------------------------------------------ public

    @property
    def last_seq(self) -> int | None:
        """The resume point: the last seq yielded (or the start point); None before the first ``ok``."""
        return self._floor

    def statistics(self) -> SubscriptionStatistics:
        return SubscriptionStatistics(
            pattern=self.pattern,
            connected=self._subscribed,
            last_seq=self._floor,
            reconnects=self._reconnects,
            gaps=self._gaps,
            duplicates_dropped=self._duplicates,
            delivered=self._delivered,
        )

    async def __aenter__(self) -> Self:
        await self._ensure_subscribed()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Envelope:
        """The next message with a seq above every one yielded before."""
        while True:
            if self._closed:
                raise StopAsyncIteration
            while self._ready:
                env = self._ready.popleft()
                assert env.seq is not None
                if self._floor is not None and env.seq <= self._floor:
                    self._duplicates += 1
                    continue
                self._floor = env.seq
                self._delivered += 1
                return env
            await self._ensure_subscribed()
            if self._closed:
                continue
            frame = await self._receive_frame(self._options.keepalive_s)
            if frame is _TIMED_OUT:
                await self._keepalive()
            elif isinstance(frame, dict):
                await self._handle(frame)

    async def aclose(self) -> None:
        """Unsubscribe by closing this subscription's connection. Idempotent, bounded.

        A task blocked in ``__anext__`` then gets StopAsyncIteration.
        """
        self._closed = True
        self._client._subscriptions.discard(self)
        conn, self._conn = self._conn, None
        self._subscribed = False
        if conn is not None:
            await conn.aclose()

    # ----------------------------------------------------------- machinery

    async def _ensure_subscribed(self) -> None:
        """Connect and subscribe (with backoff) until the daemon said ``ok``, or closed."""
        while not self._closed and not self._subscribed:
            if self._conn is None:
                await self._connect_and_send_subscribe()
                continue
            frame = await self._receive_frame(self._options.request_timeout_s)
            if frame is _TIMED_OUT:
                await self._drop("no reply to subscribe")
            elif isinstance(frame, dict):
                if frame.get("ref") == self._sub_ref and frame.get("op") in ("ok", "error"):
                    await self._on_subscribe_reply(frame)
                else:
                    await self._handle(frame)

    async def _connect_and_send_subscribe(self) -> None:
        if self._ever_connected or self._down_since is not None:
            now = anyio.current_time()
            if self._down_since is None:
                self._down_since = now
            limit = self._options.max_disconnected_s
            if limit is not None and now - self._down_since > limit:
                self._closed = True
                self._client._subscriptions.discard(self)
                raise AivadConnectionError(f"subscription {self.pattern!r}: daemon unreachable for more than {limit} s")
            await anyio.sleep(self._backoff.next_delay())
            if self._closed:
                return
        try:
            conn, token_gen = await open_connection(self._client.url, self._options, self._tokens)
        except AivadError:
            await self.aclose()  # the daemon refused the token (HTTP 401), a fresh one too
            raise
        except AivadConnectionError as exc:
            rejected = exc.__cause__
            if isinstance(rejected, HandshakeRejected) and 400 <= rejected.status < 500:
                await self.aclose()  # the daemon refuses us as such: retrying cannot help
                raise
            log.info("subscription %r: %s", self.pattern, exc)
            if self._down_since is None:
                self._down_since = anyio.current_time()
            return
        if self._closed:
            await conn.aclose()
            return
        self._conn = conn
        self._token_gen = token_gen
        self._ever_connected = True
        self._ping_outstanding = False
        tokens = self._tokens
        if tokens is not None and tokens.token is not None and token_gen < tokens.generation:
            # refreshed while we connected (the refresher found no connection here): catch up first
            await self._reauthenticate(tokens.token, tokens.generation)
        self._sub_ref = self._client._ref()
        frame: dict[str, Any] = {"op": "subscribe", "ref": self._sub_ref, "pattern": self.pattern}
        if self._floor is not None:
            frame["since"] = self._floor
        if self.epoch is not None:
            frame["epoch"] = self.epoch
        try:
            await conn.send(encode_frame(frame, None))
        except WebSocketClosed as exc:
            await self._drop(f"closed with {exc.code}")

    async def _on_subscribe_reply(self, frame: dict[str, Any]) -> None:
        if frame.get("op") == "error":
            code, message = str(frame.get("code", "internal")), str(frame.get("message", ""))
            if code in _RETRYABLE_CODES:
                await self._drop(f"subscribe failed: {code}: {message}")
                return
            await self.aclose()
            raise AivadError(code, message)
        self._subscribed = True
        self._down_since = None
        self._backoff.reset()
        last_seq = frame.get("last_seq")
        if self._floor is None and isinstance(last_seq, int):
            self._floor = last_seq
        if isinstance(frame.get("epoch"), str):
            self.epoch = frame["epoch"]
        log.debug("subscription %r: subscribed after seq %s", self.pattern, self._floor)
        if frame.get("recovered") is False:
            raw = frame.get("gap")
            if isinstance(raw, list) and len(raw) == 2 and all(isinstance(x, int) for x in raw):
                gap = Gap(raw[0], raw[1])
            else:
                # another history (epoch changed, or our seq is beyond its newest): the replay
                # starts at its oldest message, and every seq of it is new to us
                gap = Gap(None, None)
                self._floor = 0
            self.gap = gap
            self._gaps += 1
            log.warning(
                "subscription %r: seqs %s..%s are no longer stored; resuming from the oldest kept",
                self.pattern,
                gap.first,
                gap.last,
            )
            if self._on_gap is not None:
                self._on_gap(gap)

    async def _handle(self, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        if op == "message":
            if frame.get("pattern") != self.pattern:
                log.debug("subscription %r: ignoring a message for pattern %r", self.pattern, frame.get("pattern"))
                return
            try:
                self._ready.append(envelope_from_wire(frame.get("msg")))
            except ValueError as exc:
                log.error("subscription %r: dropping a malformed message: %s", self.pattern, exc)
                return
            if len(self._ready) > self._options.subscription_buffer:
                # Only possible while waiting for ``ok``; the store has them all, resume instead of growing.
                await self._drop("more messages before the subscribe reply than subscription_buffer")
        elif op == "unsubscribed":
            if frame.get("pattern") != self.pattern:
                log.debug("subscription %r: ignoring unsubscribed for pattern %r", self.pattern, frame.get("pattern"))
                return
            reason = frame.get("reason")
            code = reason if isinstance(reason, str) and reason else "forbidden"
            log.warning("subscription %r: ended by the daemon (%s)", self.pattern, code)
            await self.aclose()
            raise AivadError(code, f"the daemon ended the subscription to {self.pattern!r}")
        elif op == "error":
            ref = frame.get("ref")
            if isinstance(ref, str) and ref.startswith(_AUTH_REF):
                log.warning("subscription %r: the daemon refused the refreshed token: %s: %s",
                            self.pattern, frame.get("code"), frame.get("message"))
                if self._tokens is not None and ref.removeprefix(_AUTH_REF).isdigit():
                    self._tokens.refused(int(ref.removeprefix(_AUTH_REF)))
                return
            log.warning(
                "subscription %r: daemon reported %s: %s", self.pattern, frame.get("code"), frame.get("message")
            )
        elif op not in ("pong", "ok"):
            log.debug("subscription %r: ignoring a %r frame", self.pattern, op)

    async def _receive_frame(self, timeout_s: float | None) -> dict[str, Any] | _TimedOut | None:
        """The next frame; ``_TIMED_OUT`` after ``timeout_s`` of silence; None if the connection ended."""
        conn = self._conn
        if conn is None:
            return None
        try:
            with anyio.move_on_after(timeout_s):
                text = await conn.receive()
                self._ping_outstanding = False
                return decode_frame(text)
        except WebSocketClosed as exc:
            if exc.code == CLOSE_UNAUTHENTICATED and self._tokens is not None:
                self._tokens.invalidate(self._token_gen)  # the reconnect asks for a fresh one
            reason = _CLOSE_REASONS.get(exc.code, exc.reason)
            await self._drop(f"closed with {exc.code} ({reason})", exc.code)
            return None
        return _TIMED_OUT

    async def _reauthenticate(self, token: str, generation: int) -> None:
        """Send ``auth`` with a refreshed token on this subscription's connection.

        Called by the client's refresher task (and by ourselves after a
        reconnect that raced a refresh). Only a send: the reply is read by
        ``__anext__`` with the other frames (``ok`` ignored, ``error``
        reported to the token source), so this never competes for ``receive``.
        Error handling: a closed connection needs nothing (the reconnect
        presents the new token on its handshake).
        """
        conn = self._conn
        if conn is None or self._closed or self._token_gen >= generation:
            return
        self._token_gen = generation
        frame = {"op": "auth", "ref": f"{_AUTH_REF}{generation}", "token": token}
        with contextlib.suppress(WebSocketClosed):
            await conn.send(encode_frame(frame, None))

    async def _keepalive(self) -> None:
        """After ``keepalive_s`` of silence ping; after another without an answer reconnect."""
        conn = self._conn
        if conn is None:
            return
        if self._ping_outstanding:
            await self._drop("no answer to a keepalive ping")
            return
        self._ping_outstanding = True
        try:
            await conn.send(encode_frame({"op": "ping", "ref": _KEEPALIVE_REF}, None))
        except WebSocketClosed as exc:
            await self._drop(f"closed with {exc.code}", exc.code)

    async def _drop(self, why: str, code: int | None = None) -> None:
        """Forget the current connection; the next read reconnects and resumes after ``last_seq``."""
        conn, self._conn = self._conn, None
        was_subscribed, self._subscribed = self._subscribed, False
        self._ready.clear()
        if conn is not None:
            await conn.aclose(1000, why[:120])
        if self._closed:
            return
        self._reconnects += 1
        if self._down_since is None:
            self._down_since = anyio.current_time()
        level = logging.WARNING if code == 4008 else logging.INFO
        log.log(
            level,
            "subscription %r: %s; resuming after seq %s%s",
            self.pattern,
            why,
            self._floor,
            "" if was_subscribed else " (was not yet subscribed)",
        )
