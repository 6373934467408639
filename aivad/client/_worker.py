"""The Worker helper: run handlers for task types on a connection of its own (DESIGN §4.3, §4.6).

    worker = Worker("ws://127.0.0.1:8765/", concurrency=4, name="scanner-1")

    @worker.handler("scan.run")
    async def scan(task: TaskContext) -> dict:
        await task.progress(0.5, note="half way")      # also the heartbeat
        return {"open_ports": [22]}

    await worker.run()                  # until cancelled (or worker.stop())
    async with worker.running(): ...    # started and ready inside the block
    worker.run_forever()                # blocking; SIGINT/SIGTERM stop it gracefully

Why this shape:

- **A handler is a unit of work with its own error boundary and cancel scope.**
  Its return value becomes ``task.result``; an exception becomes ``task.fail``
  (``retryable: false`` for :class:`PermanentError` and the worker's
  ``permanent_errors``); ``Cancelled`` passes. The scope's deadline is the
  task's own ``deadline`` (converted once from wall clock to the loop's clock):
  past it the daemon has ended the attempt, so nothing is sent.
- **Never more than ``concurrency`` handlers at once**, counted until a
  handler really ends: sync handlers run in threads with
  ``abandon_on_cancel=False``, so a slot is held until the thread returns
  (a thread cannot be interrupted; it may call ``task.check_cancelled()``).
- **Handlers outlive connections.** When the connection drops, the handlers of
  that connection are cancelled (the daemon retries their tasks, and would
  ignore their results), and the worker reconnects with capped backoff and says
  ``worker.hello`` again.
- **Tokens** (``Worker(url, token=…)``): each connection presents the token on
  its handshake; with a callable, a refresher task in that connection's task
  group asks for the next token before expiry and sends ``auth``, so the
  connection (and the handlers running on it) is never closed with 4001. A
  token the daemon refuses (HTTP 401, also after asking the callable once
  more) ends :meth:`Worker.run` with ``AivadError("unauthorized")``.
- **Drain, don't kill.** :meth:`Worker.stop` sends ``worker.drain`` (the daemon
  sends it no new task from then on, and hands back without counting an attempt
  any task that reached it in that instant), lets the running ones finish within
  ``shutdown_grace_s`` — their results go out as they come — and cancels the rest.
"""

from __future__ import annotations

import inspect
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final, TypeVar

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import attrs

from aivad.client._client import decode_frame, encode_frame, open_connection
from aivad.client._model import AivadConnectionError, AivadError, Backoff, ClientOptions
from aivad.client._token import (
    CLOSE_UNAUTHENTICATED,
    TokenProvider,
    TokenSource,
    check_token_provider,
    token_source,
)
from aivad.client._ws import HandshakeRejected, WebSocketClosed, WebSocketConnection
from aivad.envelope import check_topic

__all__ = ["PermanentError", "TaskContext", "Worker", "WorkerStatistics"]

log = logging.getLogger(__name__)

Handler = Callable[["TaskContext"], Any]
H = TypeVar("H", bound=Handler)

#: hello errors after which another try (after backoff) can help
_RETRYABLE_HELLO: Final = frozenset({"overloaded", "internal", "timeout"})


class PermanentError(Exception):
    """Raise from a handler when retrying cannot help: ``task.fail`` with ``retryable: false``.

    The task is dead-lettered at once; ``error`` is the message (``str(exc)``).
    """


class TaskAbandoned(Exception):
    """``progress`` was refused: the daemon already ended this attempt (timeout, heartbeat).

    Raised into a sync handler's thread by :meth:`TaskContext.progress_blocking`;
    async handlers are cancelled instead.
    """


@attrs.frozen
class WorkerStatistics:
    connected: bool
    connects: int
    running: int
    completed: int
    failed: int
    #: attempts whose handler was cancelled (deadline, connection lost, shutdown) or refused
    abandoned: int


class TaskContext:
    """What a handler gets: the task, and a way to report progress.

    ``deadline`` is the attempt's wall-clock deadline (UTC); ``attempt`` counts from 1.
    """

    def __init__(self, worker: Worker, session: _Session, frame: dict[str, Any]) -> None:
        self.task_id: str = str(frame["task_id"])
        self.type: str = str(frame["type"])
        self.payload: Any = frame.get("payload")
        self.attempt: int = int(frame.get("attempt", 1))
        self.deadline: datetime | None = _parse_deadline(frame.get("deadline"))
        self.worker_name = worker.name
        self._session = session
        self._scope: anyio.CancelScope | None = None
        self.abandoned = False

    def __repr__(self) -> str:
        return f"<TaskContext {self.type} {self.task_id} attempt {self.attempt}>"

    async def progress(self, fraction: float, note: Any = None) -> None:
        """Report progress (0..1) — this is also the heartbeat of tasks dispatched with ``heartbeat``.

        Returns once the daemon has taken it. When the daemon answers that this
        attempt is no longer in flight (it timed out or missed its heartbeat),
        the handler is cancelled: its result would be ignored.
        """
        if not 0 <= fraction <= 1:
            raise ValueError("progress must be between 0 and 1")
        fields: dict[str, Any] = {"task_id": self.task_id, "progress": fraction}
        if note is not None:
            fields["note"] = note
        try:
            await self._session.call("task.progress", fields)
        except AivadError as exc:
            if exc.code != "not_found":
                raise
            log.info("task %s attempt %d: the daemon ended it already; cancelling the handler",
                     self.task_id, self.attempt)
            self.abandoned = True
            if self._scope is not None:
                self._scope.cancel()
            await anyio.lowlevel.checkpoint()
        except AivadConnectionError:
            await anyio.lowlevel.checkpoint()  # the connection is gone: the handler is being cancelled

    def progress_blocking(self, fraction: float, note: Any = None) -> None:
        """:meth:`progress` for a sync handler (it runs in a worker thread).

        Raises TaskAbandoned when the daemon ended the attempt, and the host's
        cancellation (deadline, shutdown) as ``check_cancelled`` does.
        """
        anyio.from_thread.run(self.progress, fraction, note)
        if self.abandoned:
            raise TaskAbandoned(f"task {self.task_id} attempt {self.attempt} ended on the daemon's side")

    def check_cancelled(self) -> None:
        """In a sync handler: raise if this attempt was cancelled (deadline, connection lost, shutdown)."""
        anyio.from_thread.check_cancelled()


class _Session:
    """One worker connection: replies to our refs, and the attempts it brought."""

    def __init__(self, conn: WebSocketConnection, options: ClientOptions, token_gen: int = 0) -> None:
        self.conn = conn
        self.options = options
        #: the generation of the token this connection presented (handshake or ``auth``)
        self.token_gen = token_gen
        self._next_ref = 0
        self._pending: dict[int, list[Any]] = {}  # ref → [event, reply]
        self.lost: AivadConnectionError | None = None
        self.runs: dict[tuple[str, int], TaskContext] = {}
        self.worker_id = ""

    async def send(self, text: str) -> bool:
        """Send a frame with no reply expected; False when the connection is gone."""
        if self.lost is not None:
            return False
        try:
            await self.conn.send(text)
        except WebSocketClosed:
            return False
        return True

    async def call(self, op: str, fields: dict[str, Any]) -> dict[str, Any]:
        if self.lost is not None:
            raise self.lost
        self._next_ref += 1
        ref = self._next_ref
        slot: list[Any] = [anyio.Event(), None]
        self._pending[ref] = slot
        try:
            text = encode_frame({"op": op, "ref": ref, **fields}, self.options.max_frame_bytes)
            if not await self.send(text):
                raise self.lost or AivadConnectionError("connection to the daemon closed")
            with anyio.fail_after(self.options.request_timeout_s):
                await slot[0].wait()
        finally:
            self._pending.pop(ref, None)
        reply = slot[1]
        if isinstance(reply, AivadConnectionError):
            raise reply
        if reply.get("op") == "error":
            raise AivadError(str(reply.get("code", "internal")), str(reply.get("message", "")))
        return dict(reply)

    def route_reply(self, frame: dict[str, Any]) -> bool:
        ref = frame.get("ref")
        slot = self._pending.get(ref) if isinstance(ref, int) and not isinstance(ref, bool) else None
        if slot is None:
            return False
        slot[1] = frame
        slot[0].set()
        return True

    def mark_lost(self, error: AivadConnectionError) -> None:
        if self.lost is None:
            self.lost = error
        for slot in self._pending.values():
            slot[1] = error
            slot[0].set()
        for ctx in self.runs.values():
            if ctx._scope is not None:
                ctx._scope.cancel()


class Worker:
    """Runs registered handlers for the tasks the daemon sends (see the module docstring).

    - ``concurrency``: handlers running at once (async and sync together); sent in ``worker.hello``.
    - ``name``: shown by ``aivad workers`` and in attempt histories.
    - ``shutdown_grace_s``: how long :meth:`stop` lets running handlers finish before cancelling them.
    - ``permanent_errors``: exception types that fail a task with ``retryable: false``
      (besides :class:`PermanentError`).
    - ``token``: a JWT, or a callable (sync or async) returning one, asked again
      before each expiry (see :func:`aivad.client.connect`).
    - ``options``: connection knobs shared with the client (``connect_timeout_s``,
      ``reconnect_initial_s`` / ``reconnect_max_s``, ``max_disconnected_s`` — None:
      reconnect forever —, ``max_frame_bytes``, ``request_timeout_s`` for hello/progress,
      ``token_refresh_before_s``).

    Error handling: a handler's exception fails its task, nothing else; an
    exception of the worker itself (a refused ``worker.hello``, a refused
    token) ends :meth:`run`.
    """

    def __init__(
        self,
        url: str = "ws://127.0.0.1:8765/",
        *,
        concurrency: int = 1,
        name: str | None = None,
        shutdown_grace_s: float = 10.0,
        permanent_errors: tuple[type[BaseException], ...] = (),
        token: TokenProvider | None = None,
        options: ClientOptions | None = None,
    ) -> None:
        if not 1 <= concurrency <= 10_000:
            raise ValueError("concurrency must be 1..10000")
        self.url = url
        self.concurrency = concurrency
        self.name = name or ""
        self.shutdown_grace_s = shutdown_grace_s
        self.permanent_errors: tuple[type[BaseException], ...] = (PermanentError, *permanent_errors)
        self.options = options or ClientOptions()
        check_token_provider(token)
        self._token = token
        #: made in :meth:`run`: its deadlines are on the clock of the loop that runs
        self._tokens: TokenSource | None = None
        self._handlers: dict[str, tuple[Handler, bool]] = {}
        self._active = False
        self._connects = 0
        self._completed = 0
        self._failed = 0
        self._abandoned = 0
        self._session: _Session | None = None
        self._running_count = 0
        self._runs: set[TaskContext] = set()
        self._session_was_up = False

    # ---- registration -------------------------------------------------------------

    def register(self, task_type: str, fn: Handler) -> None:
        """Run ``fn(task: TaskContext)`` for tasks of ``task_type``; async functions run in the
        event loop, plain ones in a thread. Register before :meth:`run`."""
        check_topic(task_type, "task type")
        if self._active:
            raise RuntimeError("register handlers before the worker runs (worker.hello lists the types)")
        self._handlers[task_type] = (fn, _is_async(fn))

    def handler(self, task_type: str) -> Callable[[H], H]:
        """Decorator form of :meth:`register`: ``@worker.handler("scan.run")``."""

        def decorate(fn: H) -> H:
            self.register(task_type, fn)
            return fn

        return decorate

    @property
    def types(self) -> list[str]:
        return list(self._handlers)

    def statistics(self) -> WorkerStatistics:
        session = self._session
        return WorkerStatistics(
            connected=session is not None and session.lost is None,
            connects=self._connects,
            running=self._running_count,
            completed=self._completed,
            failed=self._failed,
            abandoned=self._abandoned,
        )

    # ---- running ---------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Take tasks until :meth:`stop` (then returns after the drain) or cancellation.

        ``task_status.started()`` is called once the first ``worker.hello`` was
        accepted, so ``await tg.start(worker.run)`` returns a worker that is ready.

        Returns: after a graceful :meth:`stop`. Resource handling: handlers live
        in a task group that outlives each connection; cancelling ``run`` cancels
        them at once and closes the connection (the daemon retries their tasks).
        Error handling: connection loss → reconnect with backoff (until
        ``options.max_disconnected_s``, then AivadConnectionError); a
        ``worker.hello`` the daemon refuses for good → AivadError.
        """
        if not self._handlers:
            raise ValueError("no handlers registered")
        if self._active:
            raise RuntimeError("this worker is already running")
        tokens = token_source(self._token, self.options.token_refresh_before_s)  # a bad string raises here
        self._active = True
        self._tokens = tokens
        self._stop_requested = anyio.Event()
        self._stopped = anyio.Event()
        self._ready = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        self._draining = False
        self._fatal: BaseException | None = None
        self._slots = anyio.CapacityLimiter(self.concurrency)  # async handlers and threads alike
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._connection_loop, name=f"aivad worker {self.name} connection")
                await self._ready.wait()
                if self._fatal is None:
                    task_status.started()
                    await self._stop_requested.wait()
                    if self._fatal is None:
                        await self._drain()
                tg.cancel_scope.cancel()
        finally:
            session, self._session = self._session, None
            if session is not None:
                session.mark_lost(AivadConnectionError("worker stopped"))
                await session.conn.aclose()
            self._active = False
            self._stopped.set()
        if self._fatal is not None:
            raise self._fatal

    def request_stop(self) -> None:
        """Begin a graceful stop (sync; safe to call more than once). :meth:`run` returns after it."""
        if self._active and not self._stop_requested.is_set():
            self._stop_requested.set()

    async def stop(self) -> None:
        """Stop taking tasks, let running ones finish within ``shutdown_grace_s``, cancel the rest,
        send the results and close. Returns when :meth:`run` has returned."""
        if not self._active:
            return
        self.request_stop()
        await self._stopped.wait()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Worker]:
        """``async with worker.running():`` — ready (hello accepted) inside; a graceful stop on exit."""
        error: BaseException | None = None  # raised below, outside the task group: not wrapped in a group
        async with anyio.create_task_group() as tg:
            try:
                await tg.start(self.run)
            except Exception as exc:  # noqa: BLE001 - raised below, unwrapped
                error = exc
            else:
                try:
                    yield self
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    error = exc
                finally:
                    await self.stop()
        if error is not None:
            raise error

    def run_forever(self, *, backend: str = "trio") -> None:
        """Blocking :meth:`run` for sync programs: the first SIGINT/SIGTERM stops gracefully,
        the second cancels at once."""

        async def main() -> None:
            async with anyio.create_task_group() as tg:

                async def watch_signals() -> None:
                    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                        async for signum in signals:
                            if self._active and not self._stop_requested.is_set():
                                log.info("%s: stopping (drain up to %g s)", signal.Signals(signum).name,
                                         self.shutdown_grace_s)
                                self.request_stop()
                            else:
                                tg.cancel_scope.cancel()

                tg.start_soon(watch_signals)
                await self.run()
                tg.cancel_scope.cancel()

        anyio.run(main, backend=backend)

    # ---- the connection ---------------------------------------------------------------

    async def _connection_loop(self) -> None:
        backoff = Backoff(self.options.reconnect_initial_s, self.options.reconnect_max_s)
        down_since: float | None = None
        while not self._draining:
            try:
                await self._connect_once(backoff)
            except AivadError as exc:
                if exc.code not in _RETRYABLE_HELLO:
                    self._fail(exc)
                    return
                log.warning("worker %s: hello refused (%s); retrying", self.name, exc)
            except AivadConnectionError as exc:
                rejected = exc.__cause__
                if isinstance(rejected, HandshakeRejected) and 400 <= rejected.status < 500:
                    self._fail(exc)
                    return
                log.info("worker %s: %s", self.name, exc)
            if self._draining:
                return
            now = anyio.current_time()
            down_since = now if self._session_was_up else (down_since or now)
            self._session_was_up = False
            limit = self.options.max_disconnected_s
            if limit is not None and now - down_since > limit:
                self._fail(AivadConnectionError(f"worker {self.name}: daemon unreachable for more than {limit} s"))
                return
            await anyio.sleep(backoff.next_delay())

    def _fail(self, exc: BaseException) -> None:
        self._fatal = exc
        self._ready.set()
        self._stop_requested.set()

    async def _connect_once(self, backoff: Backoff) -> None:
        """Connect, say hello, read frames until the connection ends."""
        conn, token_gen = await open_connection(self.url, self.options, self._tokens)
        session = _Session(conn, self.options, token_gen)
        refused: AivadError | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._read_loop, session, tg.cancel_scope)
                if self._tokens is not None and self._tokens.refreshable:
                    tg.start_soon(self._tokens.keep_fresh, partial(self._reauthenticate, session), token_gen)
                try:
                    reply = await session.call("worker.hello", {
                        "types": self.types, "concurrency": self.concurrency, "name": self.name})
                except (AivadError, AivadConnectionError, TimeoutError) as exc:
                    if isinstance(exc, AivadError):
                        refused = exc
                    tg.cancel_scope.cancel()
                    return
                session.worker_id = str(reply.get("worker_id", ""))
                self._connects += 1
                self._session = session
                self._session_was_up = True
                backoff.reset()
                log.info("worker %s connected as %s: %s x %d", self.name, session.worker_id,
                         ", ".join(self.types), self.concurrency)
                self._ready.set()
        finally:
            if self._session is session:
                self._session = None
            session.mark_lost(session.lost or AivadConnectionError("connection to the daemon closed"))
            await conn.aclose()
            if refused is not None:
                raise refused

    async def _read_loop(self, session: _Session, scope: anyio.CancelScope) -> None:
        try:
            while True:
                frame = decode_frame(await session.conn.receive())
                if frame is None:
                    continue
                if frame.get("op") == "task":
                    self._take(session, frame.get("task"))
                elif not session.route_reply(frame) and frame.get("op") == "error":
                    # a report for an attempt the daemon already ended (late result): expected, harmless
                    log.info("worker %s: daemon reported %s: %s", self.name, frame.get("code"), frame.get("message"))
        except WebSocketClosed as exc:
            log.info("worker %s: connection closed (%d %s)", self.name, exc.code, exc.reason)
            if exc.code == CLOSE_UNAUTHENTICATED and self._tokens is not None:
                self._tokens.invalidate(session.token_gen)  # the reconnect asks for a fresh one
            session.mark_lost(AivadConnectionError(f"connection to the daemon closed: {exc}", exc.code))
            scope.cancel()

    async def _reauthenticate(self, session: _Session, token: str, generation: int) -> None:
        """``auth`` with a refreshed token on this connection (called by its refresher task).

        Error handling: a refused token is logged and the refresh retried later
        (the daemon keeps the old identity until it expires); a lost connection
        needs nothing (the reconnect presents the new token on its handshake).
        """
        assert self._tokens is not None
        if session.lost is not None or session.token_gen >= generation:
            return
        session.token_gen = generation
        try:
            reply = await session.call("auth", {"token": token})
        except AivadError as exc:
            log.warning("worker %s: the daemon refused the refreshed token (%s); asking again later", self.name, exc)
            self._tokens.refused(generation)
        except (AivadConnectionError, TimeoutError) as exc:
            log.info("worker %s: token refresh: %s", self.name, exc)
        else:
            self._tokens.note_expires_at(generation, reply.get("expires_at"))

    # ---- one task ---------------------------------------------------------------------

    def _take(self, session: _Session, task: Any) -> None:
        if not isinstance(task, dict) or not isinstance(task.get("task_id"), str):
            log.warning("worker %s: ignoring a malformed task frame: %.200r", self.name, task)
            return
        if self._draining:
            # not run: when the connection closes the daemon retries it
            log.info("worker %s: draining; not running task %s", self.name, task["task_id"])
            return
        ctx = TaskContext(self, session, task)
        key = (ctx.task_id, ctx.attempt)
        session.runs[key] = ctx
        self._runs.add(ctx)
        self._running_count += 1
        self._idle = anyio.Event() if self._idle.is_set() else self._idle
        self._tg.start_soon(self._run_task, session, ctx, key, name=f"aivad task {ctx.type} {ctx.task_id}")

    async def _run_task(self, session: _Session, ctx: TaskContext, key: tuple[str, int]) -> None:
        try:
            text = await self._run_handler(session, ctx)
            if text is None:
                self._abandoned += 1
            else:
                await session.send(text)
        finally:
            session.runs.pop(key, None)
            self._runs.discard(ctx)
            self._running_count -= 1
            if self._running_count == 0:
                self._idle.set()

    async def _take_slot(self) -> None:
        """A free slot without a trip through the event loop (the usual case: the
        daemon never sends more tasks than ``concurrency``); else wait for one.
        A handler whose scope is already cancelled (connection lost, deadline
        passed) does not start: that checks without yielding."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        try:
            self._slots.acquire_nowait()
        except anyio.WouldBlock:
            await self._slots.acquire()

    async def _run_handler(self, session: _Session, ctx: TaskContext) -> str | None:
        """Run the handler in its own scope; the frame to send, or None when nothing should be."""
        fn, is_async = self._handlers.get(ctx.type, (None, False))
        if fn is None:
            self._failed += 1
            return _frame({"op": "task.fail", "task_id": ctx.task_id, "retryable": False,
                           "error": f"worker {self.name} has no handler for {ctx.type}"}, None)
        deadline = _local_deadline(ctx.deadline)
        outcome: tuple[str, Any] | None = None
        with anyio.CancelScope(deadline=deadline) as scope:
            ctx._scope = scope
            if session.lost is not None:
                scope.cancel()
            try:
                if is_async:
                    await self._take_slot()
                    try:
                        result = fn(ctx)
                        if inspect.isawaitable(result):
                            result = await result
                    finally:
                        self._slots.release()
                else:  # the thread holds the slot until it returns, even if we are cancelled
                    result = await anyio.to_thread.run_sync(fn, ctx, limiter=self._slots)
                outcome = ("result", result)
            except self.permanent_errors as exc:
                outcome = ("permanent", exc)
            except TaskAbandoned:
                outcome = None
            except Exception as exc:  # noqa: BLE001 - the error boundary of one task: Cancelled passes
                outcome = ("retry", exc)
        if outcome is None or scope.cancelled_caught or ctx.abandoned or session.lost is not None:
            return None
        kind, value = outcome
        if kind == "result":
            try:
                text = _frame({"op": "task.result", "task_id": ctx.task_id, "result": value},
                              self.options.max_frame_bytes)
            except (TypeError, ValueError, AivadError) as exc:
                log.error("task %s: result cannot be sent: %s", ctx.task_id, exc)
                self._failed += 1
                return _frame({"op": "task.fail", "task_id": ctx.task_id, "retryable": False,
                               "error": f"result cannot be sent: {exc}"[:2000]}, None)
            self._completed += 1
            return text
        self._failed += 1
        retryable = kind == "retry"
        if retryable:
            log.warning("task %s (%s) attempt %d failed", ctx.task_id, ctx.type, ctx.attempt, exc_info=value)
        error = str(value) if isinstance(value, PermanentError) else f"{type(value).__name__}: {value}"
        return _frame({"op": "task.fail", "task_id": ctx.task_id, "error": error[:4000], "retryable": retryable},
                      None)

    # ---- stopping -----------------------------------------------------------------------

    async def _drain(self) -> None:
        self._draining = True
        log.info("worker %s: draining (%d running, grace %g s)", self.name, self._running_count,
                 self.shutdown_grace_s)
        session = self._session
        if session is not None and session.lost is None:
            await session.send(_frame({"op": "worker.drain"}, None))  # no new tasks for us
        with anyio.move_on_after(self.shutdown_grace_s):
            await self._idle.wait()
        if self._running_count:
            log.warning("worker %s: cancelling %d handlers still running after the grace", self.name,
                        self._running_count)
            for ctx in list(self._runs):
                if ctx._scope is not None:
                    ctx._scope.cancel()
            await self._idle.wait()  # async handlers end at once; threads when they return
        session = self._session
        if session is not None:
            await session.conn.aclose()


def _frame(obj: dict[str, Any], max_frame_bytes: int | None) -> str:
    return encode_frame(obj, max_frame_bytes)


def _is_async(fn: Callable[..., Any]) -> bool:
    while hasattr(fn, "func"):  # functools.partial
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004


def _parse_deadline(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _local_deadline(deadline: datetime | None) -> float:
    """The wall-clock deadline on the event loop's clock (converted once, here at the edge)."""
    if deadline is None:
        return float("inf")
    return anyio.current_time() + (deadline.timestamp() - time.time())
