"""Tokens for the client (DESIGN §4.6, §4.8): what each connection presents, and when to ask again.

``connect(url, token=…)``, ``BlockingClient(url, token=…)`` and
``Worker(url, token=…)`` take a string or a callable (sync or async) returning
one. Every connection presents the current token as ``Authorization: Bearer``
on its handshake. One :class:`TokenSource` per client (or worker) holds it:

- **When to ask again.** The token's ``exp`` is read from its JWT payload
  without verifying it (the daemon verifies; the client only needs a date). The
  callable is asked again ``min(token_refresh_before_s, half the remaining
  life)`` before ``exp`` (:meth:`TokenSource.keep_fresh`), and whenever a new
  connection finds the token due, expired, or refused (close 4001, HTTP 401).
  When ``exp`` cannot be read, the ``expires_at`` of a refresh's ``auth`` reply
  is used instead.
- **One ask for all connections.** Concurrent askers share one call of the
  callable; each change of the token gets a new *generation*, and a connection
  records the generation it presented, so the one task that refreshes can tell
  which open connections still need an ``auth`` frame.
- **Sync callables run in a worker thread**, so a blocking fetch (an HTTP call
  to an identity provider, reading a file) never stalls the event loop; async
  ones are awaited in the loop. A callable that raises is treated like an
  unreachable daemon (:class:`AivadConnectionError`, retried with backoff where
  connections are retried); one that returns no string is a programming error
  (``AivadError("unauthorized")``).
- **A string cannot be refreshed.** Its connections end with 4001 at its expiry
  (plus the daemon's ``leeway_s``); the reconnect presents it again and the
  daemon refuses the handshake with HTTP 401, which the client raises as
  ``AivadError("unauthorized")``.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Final, NoReturn

import anyio
import anyio.to_thread

from aivad.client._model import AivadConnectionError, AivadError

__all__ = [
    "CLOSE_UNAUTHENTICATED",
    "TokenProvider",
    "TokenSource",
    "check_token_provider",
    "token_expiry",
    "token_source",
]

log = logging.getLogger(__name__)

#: what ``token=`` accepts: a JWT, or a callable (sync or async) returning a fresh one
TokenProvider = str | Callable[[], str | Awaitable[str]]

#: close code: not authenticated in time, or the token expired (DESIGN §4.3)
CLOSE_UNAUTHENTICATED: Final = 4001
#: a token that lives shorter than twice this is still not asked for more often
_MIN_ASK_INTERVAL_S: Final = 0.25
#: a refresh is not retried sooner than this (a callable handing out the same token, a refused one)
_MIN_RETRY_S: Final = 1.0
#: what an HTTP header can carry of a JWT: visible ASCII, no spaces (a CR/LF would split the request)
_HEADER_SAFE: Final = re.compile(r"[\x21-\x7e]+")
_MAX_TOKEN_CHARS: Final = 64 * 1024


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (seconds since the epoch), read without verifying anything.

    None when ``token`` is not a JWT with a numeric ``exp``: the client then
    has no date to refresh by, and the daemon will refuse such a token anyway.
    """
    parts = token.split(".")
    if len(parts) != 3 or len(token) > _MAX_TOKEN_CHARS:
        return None
    body = parts[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, binascii.Error):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, int | float) and not isinstance(exp, bool) and math.isfinite(exp):
        return float(exp)
    return None


def _parse_rfc3339(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def token_source(token: TokenProvider | None, refresh_before_s: float) -> TokenSource | None:
    """The :class:`TokenSource` for a ``token=`` argument; None for no token (None or ``""``).

    Raises TypeError for anything but a string or a callable.
    """
    check_token_provider(token)
    if token is None or token == "":
        return None
    return TokenSource(token, refresh_before_s)


def check_token_provider(token: object) -> None:
    """Raise TypeError unless ``token`` is None, a string or a callable."""
    if token is not None and not isinstance(token, str) and not callable(token):
        raise TypeError("token must be a string or a callable returning one")


class TokenSource:
    """The current token of one client (or worker), and when to ask the callable again.

    Times: ``exp`` is wall clock; it is converted once, when a token is taken,
    to the event loop's clock, which every deadline here uses. So a source
    belongs to one event loop: make it inside the loop that uses it.
    """

    def __init__(
        self, provider: TokenProvider, refresh_before_s: float, *, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self._provider = provider
        self._wall_clock = wall_clock  # tests on a virtual clock pass one that moves with it
        self._refresh_before_s = refresh_before_s
        self._token: str | None = provider if isinstance(provider, str) else None
        #: bumped each time the token changes; 1 for a string token
        self.generation = 1 if self._token is not None else 0
        self._exp: float | None = None  # wall clock
        self._expires_at: float | None = None  # loop clock
        self._refresh_at: float | None = None  # loop clock; None: no refresh planned
        self._invalid = False  # the daemon refused this generation (401, 4001, a refused auth)
        self._asks = 0
        self._lock = anyio.Lock()
        self._changed: anyio.Event | None = None  # made by a waiter, set (and dropped) on each change
        if self._token is not None:
            _check_header_safe(self._token)
            self._exp = token_expiry(self._token)

    @property
    def refreshable(self) -> bool:
        """A callable can be asked again; a string cannot."""
        return not isinstance(self._provider, str)

    @property
    def token(self) -> str | None:
        """The latest token (None before a callable was first asked)."""
        return self._token

    @property
    def asks(self) -> int:
        """How often the callable returned a token."""
        return self._asks

    async def current(self) -> tuple[str, int]:
        """The token a new connection presents, with its generation.

        The one taken before, unless it is due for a refresh, expired, or was
        refused: then the callable is asked (once for all who ask at the same time).
        """
        if self._token is not None and not self._stale():
            return self._token, self.generation
        return await self._ask(self._asks)

    def invalidate(self, generation: int) -> None:
        """The daemon refused ``generation`` (HTTP 401, close 4001): the next :meth:`current` asks again."""
        if generation == self.generation and self.refreshable:
            self._invalid = True

    def refused(self, generation: int) -> None:
        """A refresh's ``auth`` was refused: new connections ask again; the refresher retries later."""
        if generation == self.generation:
            self.invalidate(generation)
            self._retry_later()

    def note_expires_at(self, generation: int, expires_at: object) -> None:
        """The ``expires_at`` of an ``auth`` reply: the expiry to refresh by when the token's own is unreadable."""
        if generation != self.generation or self._exp is not None or self._token is None:
            return
        exp = _parse_rfc3339(expires_at)
        if exp is not None:
            self._schedule(exp, previous_exp=None)

    async def keep_fresh(
        self, reauthenticate: Callable[[str, int], Awaitable[None]], generation: int
    ) -> NoReturn:
        """Ask the callable ahead of each expiry; call ``reauthenticate(token, generation)``
        whenever the token is newer than ``generation`` (ours, or one a reconnect fetched).

        Returns: never (cancel it). Error handling: a failing callable is logged
        and asked again later (half the remaining life, not sooner than 1 s);
        ``reauthenticate`` must handle its own errors.
        """
        seen = generation
        while True:
            if self.generation <= seen and await self._wait_due_or_newer(seen):
                try:
                    await self._ask(self._asks)
                except (AivadConnectionError, AivadError) as exc:
                    log.warning("cannot refresh the token: %s; asking again later", exc)
                    self._retry_later()
                    continue
            if self.generation > seen and self._token is not None:
                seen = self.generation
                await reauthenticate(self._token, seen)

    # ---- machinery ---------------------------------------------------------------

    def _stale(self) -> bool:
        now = anyio.current_time()
        due = self._refresh_at is not None and now >= self._refresh_at
        expired = self._expires_at is not None and now >= self._expires_at
        return self.refreshable and (self._invalid or due or expired)

    async def _wait_due_or_newer(self, seen: int) -> bool:
        """True when the refresh is due; False when the token changed meanwhile (someone else asked)."""
        while True:
            if self._changed is None:
                self._changed = anyio.Event()
            changed = self._changed
            at = self._refresh_at
            if at is not None and anyio.current_time() >= at:
                return True
            with anyio.CancelScope(deadline=math.inf if at is None else at):
                await changed.wait()
                if self.generation > seen:
                    return False
                continue  # rescheduled: wait for the new time
            return True

    async def _ask(self, asks_seen: int) -> tuple[str, int]:
        async with self._lock:
            if self._asks != asks_seen and self._token is not None and not self._stale():
                return self._token, self.generation  # another connection just asked
            if not self.refreshable:
                assert self._token is not None
                return self._token, self.generation
            token = await self._call_provider()
            self._take(token)
            return token, self.generation

    async def _call_provider(self) -> str:
        provider = self._provider
        assert callable(provider)
        try:
            if _is_async(provider):
                result: object = provider()
            else:  # a blocking fetch must not stall the loop; abandoned (not awaited) if we are cancelled
                result = await anyio.to_thread.run_sync(provider, abandon_on_cancel=True)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:  # the callable's own failure: like a daemon that cannot be reached
            raise AivadConnectionError(f"the token callable failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(result, str) or not result:
            raise AivadError("unauthorized", f"the token callable returned {type(result).__name__}, not a token")
        _check_header_safe(result)
        return result

    def _take(self, token: str) -> None:
        previous_exp = self._exp
        if token != self._token:
            self.generation += 1
            self._token = token
        self._asks += 1
        self._invalid = False
        self._exp = token_expiry(token)
        self._expires_at = self._refresh_at = None
        if self._exp is not None:
            self._schedule(self._exp, previous_exp)
        self._notify()

    def _schedule(self, exp: float, previous_exp: float | None) -> None:
        now = anyio.current_time()
        remaining = exp - self._wall_clock()
        self._expires_at = now + remaining
        if remaining <= 0:
            # expired already: nothing to refresh ahead of; a connection presenting it is
            # refused (HTTP 401), which asks again once and then raises ``unauthorized``
            self._refresh_at = None
        elif previous_exp is not None and exp <= previous_exp:
            # the same (or an older) token again, e.g. a cache that renews late: try again halfway
            log.info("the token callable returned a token that expires no later than the last one")
            self._retry_later()
        else:
            lead = min(self._refresh_before_s, remaining / 2)
            self._refresh_at = now + max(remaining - lead, _MIN_ASK_INTERVAL_S)
        self._notify()

    def _retry_later(self) -> None:
        """Plan another ask halfway to expiry; none when that is too close (then 4001 and a reconnect follow)."""
        self._refresh_at = None
        if self._expires_at is not None:
            half = (self._expires_at - anyio.current_time()) / 2
            if half >= _MIN_RETRY_S:
                self._refresh_at = anyio.current_time() + half
        self._notify()


    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None


def _check_header_safe(token: str) -> None:
    if len(token) > _MAX_TOKEN_CHARS or not _HEADER_SAFE.fullmatch(token):
        raise AivadError("unauthorized", "the token is not a JWT (an Authorization header cannot carry it)")


def _is_async(fn: Callable[..., object]) -> bool:
    while hasattr(fn, "func"):  # functools.partial
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004
