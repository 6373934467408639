"""The async client: request/reply over one pipelined WebSocket, subscriptions on their own.

Why this shape:

- **One connection for calls, pipelined.** Every call gets a fresh ``ref``; a
  reader task matches replies to waiters, so hundreds of publishes can be in
  flight on one socket (bounded by ``max_in_flight``). Adding an op is one
  method calling :meth:`Client._call`.
- **Reconnect on demand.** When the call connection drops, the next call opens
  a new one. Calls that are safe to repeat (``publish`` — it always carries a
  ``message_id``, so the daemon stores it once —, ``history``, ``ping``,
  ``task.status``, ``collect``) are retried with backoff within
  ``request_timeout_s``; the others raise :class:`AivadConnectionError`.
- **A connection per subscription** (see ``_subscription.py``): the daemon
  closes a slow consumer's whole connection (4008); a slow reader of one
  subscription must not take publishes or other subscriptions down with it.
- **One refresher task per client** (``token=`` a callable, ``_token.py``):
  it asks for the next token before the current one expires and sends
  ``auth`` on the call connection and on every subscription's connection. A
  subscription's own loop could not do it: a consumer busy with a message, or
  one that simply stopped iterating (that is how it pushes back), would not
  run it in time, and its connection would be closed with 4001. One task per
  client is the same cost however many subscriptions there are, and the
  subscriptions keep having no task of their own; they only read the ``auth``
  reply among their frames.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc

from aivad.client._model import (
    AivadConnectionError,
    AivadError,
    Backoff,
    ClientOptions,
    ClientStatistics,
    CollectResult,
    Gap,
    Published,
    RetryPolicy,
    TaskStatus,
)
from aivad.client._token import CLOSE_UNAUTHENTICATED, TokenProvider, TokenSource, token_source
from aivad.client._ws import HandshakeRejected, WebSocketClosed, WebSocketConnection, connect_websocket
from aivad.envelope import Envelope, check_pattern, check_topic, new_id

if TYPE_CHECKING:
    from aivad.client._results import ResultCallback, ResultWatcher
    from aivad.client._subscription import Subscription

__all__ = ["Client", "connect", "envelope_from_wire", "open_connection"]

log = logging.getLogger(__name__)

#: Error codes after which repeating an idempotent call can help.
_RETRYABLE_CODES: Final = frozenset({"overloaded"})
#: Close codes after which repeating is pointless (our frame itself is the problem).
_FATAL_CLOSE_CODES: Final = frozenset({1009})
_DEFAULT: Final[Any] = object()


def envelope_from_wire(msg: object) -> Envelope:
    """Turn a stored envelope from the daemon into an :class:`Envelope` with its ``seq``.

    Not validated again (the daemon did that when storing it); unknown fields a
    newer daemon may add are dropped. Raises ValueError if ``type`` or ``seq``
    is missing, because without ``seq`` nothing can be de-duplicated.
    """
    if not isinstance(msg, dict):
        raise ValueError("envelope is not a JSON object")
    seq = msg.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(msg.get("type"), str):
        raise ValueError("envelope without an integer seq or a type")
    metadata = msg.get("metadata")
    return Envelope(
        message_id=str(msg.get("message_id", "")),
        timestamp=str(msg.get("timestamp", "")),
        type=msg["type"],
        payload=msg.get("payload"),
        metadata=metadata if isinstance(metadata, dict) else {},
        seq=seq,
    )


def encode_frame(frame: dict[str, Any], max_frame_bytes: int | None) -> str:
    """JSON-encode a client frame; raise ``AivadError("too_large")`` before sending an oversize one.

    ``NaN`` and infinities are ``AivadError("bad_request")`` here: they are not JSON (RFC 8259),
    the daemon refuses them as ``bad_json`` without the call's ``ref``, so the call could not
    be answered.
    """
    try:
        text = json.dumps(frame, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as exc:
        raise AivadError("bad_request", f"cannot be sent as JSON: {exc}") from None
    if max_frame_bytes is not None and len(text) > max_frame_bytes // 4:
        size = len(text.encode("utf-8"))
        if size > max_frame_bytes:
            raise AivadError("too_large", f"frame of {size} bytes exceeds max_frame_bytes={max_frame_bytes}")
    return text


def decode_frame(text: str) -> dict[str, Any] | None:
    """Parse a daemon frame; None (logged) for anything that is not a JSON object."""
    try:
        frame = json.loads(text)
    except ValueError:
        log.warning("daemon sent a frame that is not JSON: %.200r", text)
        return None
    if not isinstance(frame, dict):
        log.warning("daemon sent a frame that is not a JSON object: %.200r", text)
        return None
    return frame


def reply_or_raise(frame: dict[str, Any]) -> dict[str, Any]:
    """Return an ``ok``/``pong`` reply, or raise :class:`AivadError` for an ``error`` one."""
    if frame.get("op") == "error":
        raise AivadError(str(frame.get("code", "internal")), str(frame.get("message", "")))
    return frame


async def _open(url: str, options: ClientOptions, token: str | None) -> WebSocketConnection:
    """One handshake, presenting ``token``; every way it can fail mapped onto our errors."""
    headers = () if token is None else (("Authorization", f"Bearer {token}"),)
    try:
        return await connect_websocket(
            url,
            max_message_bytes=options.max_message_bytes,
            connect_timeout_s=options.connect_timeout_s,
            close_timeout_s=options.close_timeout_s,
            headers=headers,
        )
    except HandshakeRejected as exc:
        if exc.status == 401:
            detail = exc.body.decode("utf-8", "replace").strip().removeprefix("aivad: ")[:200]
            raise AivadError("unauthorized", f"{url}: the daemon refused the token (HTTP 401: {detail})") from exc
        raise AivadConnectionError(f"{url}: {exc}") from exc
    except TimeoutError as exc:
        raise AivadConnectionError(f"{url}: connect timed out after {options.connect_timeout_s} s") from exc
    except OSError as exc:
        raise AivadConnectionError(f"{url}: cannot connect: {exc}") from exc


async def open_connection(
    url: str, options: ClientOptions, tokens: TokenSource | None = None
) -> tuple[WebSocketConnection, int]:
    """Connect to the daemon, presenting the current token of ``tokens`` on the handshake.

    Returns: the connection, and the generation of the token it presented (0: none).
    Error handling: ``AivadError("unauthorized")`` when the daemon refuses the
    token (HTTP 401) — retrying the same token is pointless, so a callable is
    asked again once first and a string not at all; AivadConnectionError for
    every other failure (also a token callable that raised), which is worth a
    retry.
    """
    if tokens is None:
        return await _open(url, options, None), 0
    token, generation = await tokens.current()
    try:
        return await _open(url, options, token), generation
    except AivadError:
        tokens.invalidate(generation)
        if not tokens.refreshable:
            raise
        log.info("%s: the daemon refused the token; asking the token callable again", url)
    token, generation = await tokens.current()
    try:
        return await _open(url, options, token), generation
    except AivadError:
        tokens.invalidate(generation)
        raise


class _Slot:
    """Where the reader task leaves the reply for one waiting call."""

    __slots__ = ("error", "event", "reply")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.reply: dict[str, Any] | None = None
        self.error: BaseException | None = None


class _Session:
    """One call connection: the reader task and the table of calls awaiting replies."""

    def __init__(
        self, conn: WebSocketConnection, options: ClientOptions, tokens: TokenSource | None = None, token_gen: int = 0
    ) -> None:
        self.conn = conn
        self._options = options
        self._pending: dict[int, _Slot] = {}
        self.lost: AivadConnectionError | None = None
        self._tokens = tokens
        #: the generation of the token this connection last presented (handshake or ``auth``)
        self.token_gen = token_gen

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def run_reader(self) -> None:
        """Route replies to their callers until the connection ends, then fail the rest.

        Error handling: connection loss ends the reader quietly (the next call
        reconnects); a bug raises into the client's task group on purpose.
        """
        try:
            while True:
                frame = decode_frame(await self.conn.receive())
                if frame is not None:
                    self._route(frame)
        except WebSocketClosed as exc:
            if exc.code == CLOSE_UNAUTHENTICATED and self._tokens is not None:
                self._tokens.invalidate(self.token_gen)  # the next connection asks for a fresh one
            self._fail_all(AivadConnectionError(f"connection to the daemon closed: {exc}", exc.code))

    def _route(self, frame: dict[str, Any]) -> None:
        ref = frame.get("ref")
        slot = self._pending.get(ref) if isinstance(ref, int) and not isinstance(ref, bool) else None
        if slot is None:
            if frame.get("op") == "error":
                log.warning("daemon reported %s: %s", frame.get("code"), frame.get("message"))
            else:
                log.debug("dropping a %s frame with no waiting call (ref=%r)", frame.get("op"), ref)
            return
        slot.reply = frame
        slot.event.set()

    def _fail_all(self, error: AivadConnectionError) -> None:
        self.lost = error
        for slot in self._pending.values():
            slot.error = error
            slot.event.set()
        self._pending.clear()

    async def call(self, ref: int, text: str) -> dict[str, Any]:
        if self.lost is not None:
            raise self.lost
        slot = _Slot()
        self._pending[ref] = slot
        try:
            try:
                await self.conn.send(text)
            except WebSocketClosed as exc:
                raise self.lost or AivadConnectionError(f"connection to the daemon closed: {exc}", exc.code) from None
            await slot.event.wait()
        finally:
            self._pending.pop(ref, None)
        if slot.error is not None:
            raise slot.error
        assert slot.reply is not None
        return reply_or_raise(slot.reply)


class Client:
    """A connection to the aivad daemon. Get one from :func:`connect`.

    All methods may be called concurrently from many tasks.
    """

    def __init__(
        self, url: str, options: ClientOptions, task_group: anyio.abc.TaskGroup, tokens: TokenSource | None = None
    ) -> None:
        self.url = url
        self.options = options
        self._tg = task_group
        self._tokens = tokens
        self._session: _Session | None = None
        self._connect_lock = anyio.Lock()
        self._in_flight = anyio.Semaphore(options.max_in_flight)
        self._next_ref = 0
        self._connects = 0
        self._closed = False
        self._subscriptions: set[Subscription] = set()
        self._results: ResultWatcher | None = None
        self._results_lock = anyio.Lock()

    # ---------------------------------------------------------------- core

    def _ref(self) -> int:
        self._next_ref += 1
        return self._next_ref

    async def _get_session(self) -> _Session:
        session = self._session
        if session is not None and session.lost is None:
            return session
        async with self._connect_lock:
            session = self._session
            if session is not None and session.lost is None:
                return session
            if self._closed:
                raise AivadConnectionError("client is closed")
            conn, token_gen = await open_connection(self.url, self.options, self._tokens)
            self._connects += 1
            session = _Session(conn, self.options, self._tokens, token_gen)
            self._session = session
            self._tg.start_soon(session.run_reader, name=f"aivad client reader {self.url}")
            tokens = self._tokens
            if tokens is not None and tokens.token is not None and token_gen < tokens.generation:
                # refreshed while we connected: the refresher saw no session to send it to
                self._tg.start_soon(self._reauthenticate_session, session, tokens.token, tokens.generation)
            return session

    # ---------------------------------------------------------------- tokens

    async def _reauthenticate_all(self, token: str, generation: int) -> None:
        """Present a refreshed token on every open connection (DESIGN §4.8 refresh).

        Called by the client's one refresher task (:meth:`TokenSource.keep_fresh`
        in the task group of :func:`connect`): the call connection gets an
        ``auth`` call, each subscription's connection an ``auth`` frame whose
        reply its own iterator reads (see ``Subscription._reauthenticate``).
        Concurrently, so one stuck connection delays no other.
        """
        async with anyio.create_task_group() as tg:
            session = self._session
            if session is not None:
                tg.start_soon(self._reauthenticate_session, session, token, generation)
            for sub in list(self._subscriptions):
                tg.start_soon(sub._reauthenticate, token, generation)

    async def _reauthenticate_session(self, session: _Session, token: str, generation: int) -> None:
        """``auth`` with the refreshed token on the call connection.

        Error handling: a refused token is logged and the refresh retried later
        (the daemon keeps the old identity until it expires); a lost connection
        needs nothing (the next one presents the new token on its handshake).
        """
        tokens = self._tokens
        if tokens is None or session.lost is not None or session.token_gen >= generation:
            return
        session.token_gen = generation
        ref = self._ref()
        try:
            with anyio.fail_after(self.options.request_timeout_s):
                reply = await session.call(ref, encode_frame({"op": "auth", "ref": ref, "token": token}, None))
        except AivadError as exc:
            log.warning("the daemon refused the refreshed token (%s); asking again later", exc)
            tokens.refused(generation)
        except (AivadConnectionError, TimeoutError) as exc:
            log.info("token refresh on the call connection: %s", exc)
        else:
            tokens.note_expires_at(generation, reply.get("expires_at"))
            log.debug("token refreshed on the call connection (sub %s)", reply.get("sub"))

    async def _call(
        self, op: str, fields: dict[str, Any], *, idempotent: bool, timeout_s: float | None = _DEFAULT
    ) -> dict[str, Any]:
        """Send one op and return its ``ok`` reply; the one path every op takes.

        Error handling: ``error`` frame → AivadError (``overloaded`` retried when
        idempotent); connection loss → AivadConnectionError, or a retry on a new
        connection when ``idempotent``; TimeoutError after ``timeout_s``
        (default ``request_timeout_s``) in all.
        """
        reply, _ = await self._call_counted(op, fields, idempotent=idempotent, timeout_s=timeout_s)
        return reply

    async def _call_counted(
        self, op: str, fields: dict[str, Any], *, idempotent: bool, timeout_s: float | None = _DEFAULT
    ) -> tuple[dict[str, Any], int]:
        """:meth:`_call`, also returning how many attempts it took."""
        if timeout_s is _DEFAULT:
            timeout_s = self.options.request_timeout_s
        backoff = Backoff(self.options.reconnect_initial_s, self.options.reconnect_max_s)
        attempts = 0
        with anyio.fail_after(timeout_s):
            while True:
                attempts += 1
                ref = self._ref()
                text = encode_frame({"op": op, "ref": ref, **fields}, self.options.max_frame_bytes)
                try:
                    async with self._in_flight:
                        session = await self._get_session()
                        return await session.call(ref, text), attempts
                except AivadConnectionError as exc:
                    if not idempotent or self._closed or exc.close_code in _FATAL_CLOSE_CODES:
                        raise
                    delay = backoff.next_delay()
                    log.info("%s: %s; retrying in %.2f s", op, exc, delay)
                except AivadError as exc:
                    if not idempotent or exc.code not in _RETRYABLE_CODES:
                        raise
                    delay = backoff.next_delay()
                    log.info("%s: daemon is overloaded; retrying in %.2f s", op, delay)
                await anyio.sleep(delay)

    async def aclose(self) -> None:
        """Close every subscription and the call connection. Idempotent, bounded."""
        self._closed = True
        for sub in list(self._subscriptions):
            await sub.aclose()
        session = self._session
        if session is not None:
            await session.conn.aclose()

    def statistics(self) -> ClientStatistics:
        session = self._session
        return ClientStatistics(
            connected=session is not None and session.lost is None,
            connects=self._connects,
            in_flight=session.in_flight if session is not None else 0,
            subscriptions=len(self._subscriptions),
        )

    # ----------------------------------------------------------------- ops

    async def publish(
        self,
        topic: str,
        payload: Any = None,
        *,
        metadata: dict[str, Any] | None = None,
        message_id: str | None = None,
    ) -> Published:
        """Store one message; returns once the daemon has committed it.

        A ``message_id`` is generated when absent, which is what makes the
        automatic retry after a lost connection safe: the daemon stores each id
        once. ``duplicate`` is reported as the daemon sees it, except that our
        own retry of a generated id does not count as a duplicate.
        Raises BadMessage (a ValueError) for an invalid topic before sending.
        """
        check_topic(topic)
        generated = message_id is None
        mid = new_id() if message_id is None else message_id
        fields: dict[str, Any] = {"type": topic, "payload": payload, "message_id": mid}
        if metadata is not None:
            fields["metadata"] = metadata
        reply, attempts = await self._call_counted("publish", fields, idempotent=True)
        duplicate = bool(reply.get("duplicate", False))
        if generated and attempts > 1:
            duplicate = False
        return Published(seq=int(reply["seq"]), duplicate=duplicate, message_id=mid)

    async def history(self, pattern: str, after: int = 0, limit: int = 100) -> tuple[list[Envelope], int]:
        """One page of stored messages matching ``pattern`` with ``seq > after``, ascending.

        Returns ``(messages, last_seq)``; ask for the next page with ``after=last_seq``.
        """
        check_pattern(pattern)
        reply = await self._call("history", {"pattern": pattern, "after": after, "limit": limit}, idempotent=True)
        messages = [envelope_from_wire(m) for m in reply.get("messages", [])]
        return messages, int(reply.get("last_seq", after))

    async def ping(self) -> float:
        """Round trip to the daemon; returns the seconds it took."""
        start = time.perf_counter()
        await self._call("ping", {}, idempotent=True)
        return time.perf_counter() - start

    def subscribe(
        self,
        pattern: str,
        since: int | None = None,
        *,
        epoch: str | None = None,
        on_gap: Callable[[Gap], None] | None = None,
    ) -> Subscription:
        """A resuming subscription to ``pattern``; use ``async with`` and ``async for``.

        ``since``: replay stored messages with ``seq > since`` first (None: only
        messages stored after the subscription starts). ``epoch``: the history
        ``since`` was taken from (``Subscription.epoch`` of an earlier one); when
        the daemon's history is another, the replay starts at its oldest message.
        ``on_gap`` is called (synchronously, in the iterating task) when the
        daemon reports that retention dropped part of what a (re)subscribe asked
        for, or that the history is not the one ``since`` came from.
        See :class:`~aivad.client.Subscription`.
        """
        from aivad.client._subscription import Subscription

        return Subscription(self, pattern, since, on_gap, epoch)

    async def dispatch(
        self,
        type: str,
        payload: Any = None,
        *,
        priority: str | int | None = None,
        retry_policy: RetryPolicy | dict[str, Any] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the task's per-attempt limit, sent to the daemon
        heartbeat: float | None = None,
        affinity_key: str | None = None,
        group_id: str | None = None,
    ) -> str:
        """Queue a task for a worker; returns its ``task_id``.

        Not retried after a lost connection (the daemon may already have queued it).
        """
        check_topic(type)
        fields: dict[str, Any] = {"type": type, "payload": payload}
        if retry_policy is not None:
            fields["retry_policy"] = retry_policy.to_wire() if isinstance(retry_policy, RetryPolicy) else retry_policy
        optional = {
            "priority": priority,
            "timeout": timeout,
            "heartbeat": heartbeat,
            "affinity_key": affinity_key,
            "group_id": group_id,
        }
        fields.update({k: v for k, v in optional.items() if v is not None})
        reply = await self._call("dispatch", fields, idempotent=False)
        return str(reply["task_id"])

    async def get_task_status(self, task_id: str) -> TaskStatus:
        """State, attempts and result or error of one task."""
        reply = await self._call("task.status", {"task_id": task_id}, idempotent=True)
        return TaskStatus(
            task_id=str(reply.get("task_id", task_id)),
            state=str(reply.get("state", "")),
            attempts=int(reply.get("attempts", 0)),
            result=reply.get("result"),
            error=reply.get("error"),
        )

    async def collect_all(
        self,
        task_ids: Iterable[str] | None = None,
        timeout: float = 30.0,  # noqa: ASYNC109 - the daemon's collect deadline (DESIGN §4.6 signature)
        *,
        group_id: str | None = None,
        min_results: int | None = None,
    ) -> CollectResult:
        """Wait up to ``timeout`` s for tasks (by ids or group); partial results on timeout."""
        fields: dict[str, Any] = {"timeout": timeout}
        if task_ids is not None:
            fields["task_ids"] = list(task_ids)
        if group_id is not None:
            fields["group_id"] = group_id
        if min_results is not None:
            fields["min_results"] = min_results
        reply = await self._call("collect", fields, idempotent=True, timeout_s=self._beyond(timeout))
        return CollectResult(
            completed=dict(reply.get("completed", {})),
            failed=dict(reply.get("failed", {})),
            pending=list(reply.get("pending", [])),
            reason=str(reply.get("reason", "")),
        )

    async def request_response(
        self,
        type: str,
        payload: Any = None,
        timeout: float = 30.0,  # noqa: ASYNC109 - the daemon's request deadline (DESIGN §4.6 signature)
    ) -> Any:
        """Run one task like an RPC call and return its result.

        Raises AivadError (``timeout`` when no worker answered in time, or the
        task's failure) — the daemon owns the deadline; ours only adds slack.
        """
        check_topic(type)
        reply = await self._call(
            "request",
            {"type": type, "payload": payload, "timeout": timeout},
            idempotent=False,
            timeout_s=self._beyond(timeout),
        )
        return reply.get("result")

    async def on_result(self, task_id: str, callback: ResultCallback) -> None:
        """Call ``callback(TaskStatus)`` once, when the task ends (``completed`` or ``dead``).

        Returns once the callback is registered (at once-fired if the task has
        already ended). ``TaskStatus.result`` holds the result, ``error`` the
        final error; ``attempts`` the attempt that ended it. A sync callback
        runs in the client's reader task (keep it short); an async one is
        started as a task of the client. Exceptions in callbacks are logged.
        Callbacks not yet fired when the client closes are dropped, and so
        are they (logged) when the daemon ends those subscriptions (e.g.
        ``forbidden`` after a token refresh narrowed the rights).

        Built on the ``task.completed`` / ``task.dead_lettered`` events, so a
        reconnect (or a daemon restart) loses nothing: the subscriptions resume
        from the last seq seen. Raises AivadError(``not_found``) for an unknown task.
        """
        watcher = self._results
        if watcher is None:
            async with self._results_lock:
                if self._results is None:
                    from aivad.client._results import ResultWatcher

                    new = ResultWatcher(self)
                    await new.start()
                    self._results = new
                watcher = self._results
        watcher.add(task_id, callback)
        try:
            status = await self.get_task_status(task_id)
        except BaseException:
            watcher.discard(task_id, callback)
            raise
        if status.state in ("completed", "dead"):
            watcher.fire(status)

    def _beyond(self, server_timeout_s: float) -> float | None:
        """A client deadline that lets the daemon's own deadline fire first."""
        base = self.options.request_timeout_s
        return None if base is None else server_timeout_s + base


@asynccontextmanager
async def connect(
    url: str = "ws://127.0.0.1:8765/",
    *,
    token: TokenProvider | None = None,
    options: ClientOptions | None = None,
) -> AsyncIterator[Client]:
    """Connect to the daemon at ``url``; ``async with connect(url, token=…) as client: ...``.

    ``token``: a JWT (a string), or a callable (sync or async) returning one.
    Every connection of the client presents it as ``Authorization: Bearer``.
    A callable is asked again ``options.token_refresh_before_s`` (at most half
    the token's life) before ``exp``, and the new token is sent with the
    ``auth`` op on every open connection, so none is closed with 4001. A string
    cannot be refreshed: at its expiry the daemon closes with 4001, the client
    reconnects and the daemon refuses the expired token, which raises
    ``AivadError("unauthorized")`` from the next call or iteration.

    Returns: a :class:`Client`, usable until the block ends.
    Resource handling: the reader task (and, with a token callable, the one
    refresher task) live in a task group owned by this context; leaving it
    closes every subscription and connection (bounded by ``close_timeout_s``).
    Error handling: AivadConnectionError at once if the daemon cannot be
    reached, ``AivadError("unauthorized")`` at once if it refuses the token. An
    exception raised in the block propagates as itself, not wrapped in an
    exception group.
    """
    options = options or ClientOptions()
    tokens = token_source(token, options.token_refresh_before_s)
    conn, token_gen = await open_connection(url, options, tokens)  # outside the task group: fail fast, unwrapped
    body_error: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            client = Client(url, options, tg, tokens)
            session = _Session(conn, options, tokens, token_gen)
            client._session = session
            client._connects = 1
            tg.start_soon(session.run_reader, name=f"aivad client reader {url}")
            if tokens is not None and tokens.refreshable:
                tg.start_soon(tokens.keep_fresh, client._reauthenticate_all, token_gen, name=f"aivad token {url}")
            try:
                yield client
            except BaseException as exc:  # noqa: BLE001 - not swallowed: re-raised below
                # Re-raised below, outside the task group, so it is not wrapped in a group.
                body_error = exc
            finally:
                await client.aclose()
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await conn.aclose()
    if body_error is not None:
        raise body_error
