"""Plain values the client hands out and takes in: results, options, errors, statistics.

No I/O here, so the shapes of the public API can be read in one place.
"""

from __future__ import annotations

import random
from typing import Any

import attrs

__all__ = [
    "AivadConnectionError",
    "AivadError",
    "Backoff",
    "ClientOptions",
    "ClientStatistics",
    "CollectResult",
    "Gap",
    "Published",
    "RetryPolicy",
    "SubscriptionStatistics",
    "TaskStatus",
]


class AivadError(Exception):
    """The daemon answered with an ``error`` frame (DESIGN §4.3), or refused us otherwise.

    ``code`` is one of the fixed codes (``bad_request``, ``overloaded``,
    ``timeout``, …) so callers can branch on it; ``message`` is for humans.
    Also ``unauthorized`` when the daemon refused the token on the handshake
    (HTTP 401), and the ``reason`` (``forbidden``) when it ended a
    subscription with ``unsubscribed``.
    """

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class AivadConnectionError(ConnectionError):
    """No usable connection to the daemon: it could not be reached, or the
    connection ended before the reply came (also: a token callable raised).

    When it ends a call that is not idempotent (``dispatch``, ``request``), the
    daemon may or may not have acted on it. ``close_code`` is the WebSocket
    close code when the daemon closed the connection (4008 slow consumer,
    1001 going away, 1009 frame too large, 4001 token expired), else None.
    """

    def __init__(self, message: str, close_code: int | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code


@attrs.frozen
class ClientOptions:
    """Tuning knobs of :func:`aivad.client.connect`; every buffer has a bound here.

    - ``max_message_bytes``: largest message accepted from the daemon (a history
      page of 1000 messages can be several MiB); a larger one closes with 1009.
    - ``max_frame_bytes``: largest frame sent; checked before sending, so a too
      large publish fails with ``AivadError("too_large")`` instead of the daemon
      closing the whole connection (its default limit is 1 MiB). None: no check.
    - ``max_in_flight``: calls awaiting a reply on one connection (pipelining);
      more callers wait for a free slot.
    - ``request_timeout_s``: bound on one call, reconnects and retries included.
      None: wait forever.
    - ``reconnect_initial_s`` / ``reconnect_max_s``: capped exponential backoff
      (±20 % jitter) between reconnect attempts.
    - ``max_disconnected_s``: a subscription gives up (raises
      AivadConnectionError) after being unable to reconnect for this long.
      None: keep trying forever.
    - ``keepalive_s``: a subscription that heard nothing for this long sends a
      ``ping``; with no answer within another ``keepalive_s`` it reconnects, so
      a half-open TCP connection cannot stall it forever. None: off.
    - ``subscription_buffer``: messages a subscription holds that arrived
      before its ``ok``; more than that drops the connection and resumes.
    - ``token_refresh_before_s``: with ``token=`` a callable, ask it for the
      next token this long before the current one expires (at most half the
      token's remaining life, so a short-lived token is refreshed halfway).
    """

    connect_timeout_s: float = 10.0
    close_timeout_s: float = 5.0
    request_timeout_s: float | None = 30.0
    max_message_bytes: int = 16 * 1024 * 1024
    max_frame_bytes: int | None = 1024 * 1024
    max_in_flight: int = 256
    reconnect_initial_s: float = 0.1
    reconnect_max_s: float = 5.0
    max_disconnected_s: float | None = None
    keepalive_s: float | None = 30.0
    subscription_buffer: int = 1024
    token_refresh_before_s: float = 60.0


@attrs.frozen
class Published:
    """The daemon's answer to a publish: the stored ``seq``, and whether that
    ``message_id`` had been stored before (then ``seq`` is the original one)."""

    seq: int
    duplicate: bool
    message_id: str


@attrs.frozen
class Gap:
    """Seqs a resumed subscription can no longer replay (retention dropped them).

    Inclusive range; a front end that sees one should reload its view. Both
    ends are None when the daemon's history is another than the one the resume
    point came from (its ``epoch`` changed): everything from its oldest message
    is then delivered, and what was shown before may not exist any more.
    """

    first: int | None
    last: int | None


@attrs.frozen
class RetryPolicy:
    """``retry_policy`` of a ``dispatch``; fields left None use the daemon's defaults."""

    max_attempts: int | None = None
    backoff_factor: float | None = None
    max_backoff: float | None = None

    def to_wire(self) -> dict[str, Any]:
        return {k: v for k, v in attrs.asdict(self).items() if v is not None}


@attrs.frozen
class TaskStatus:
    """Answer to ``task.status``: ``state`` is one of queued, dispatched,
    running, retrying, completed, dead."""

    task_id: str
    state: str
    attempts: int
    result: Any = None
    error: Any = None


@attrs.frozen
class CollectResult:
    """Answer to ``collect``: partial results are normal, ``reason`` says why it returned
    (``all_done``, ``min_results`` or ``timeout``)."""

    completed: dict[str, Any]
    failed: dict[str, Any]
    pending: list[str]
    reason: str


@attrs.frozen
class ClientStatistics:
    connected: bool
    connects: int
    in_flight: int
    subscriptions: int


@attrs.frozen
class SubscriptionStatistics:
    pattern: str
    connected: bool
    last_seq: int | None
    reconnects: int
    gaps: int
    duplicates_dropped: int
    delivered: int


class Backoff:
    """Capped exponential backoff with ±20 % jitter (so clients that lost the
    daemon together do not all come back in the same millisecond)."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self._initial_s = initial_s
        self._max_s = max_s
        self._attempt = 0

    def reset(self) -> None:
        self._attempt = 0

    def next_delay(self) -> float:
        delay = min(self._max_s, self._initial_s * 2.0**self._attempt)
        self._attempt = min(self._attempt + 1, 62)
        jitter: float = random.uniform(0.8, 1.2)
        return delay * jitter
