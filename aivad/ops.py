"""The operations every edge calls: a caller's identity and rights in, domain results out.

DESIGN §3: "Authorization is decided in one place that every edge calls." Each
edge — WebSocket ops, control and HTTP commands — parses its wire into a call
here and turns the result, or the :class:`~aivad.protocol.OpError`, back into
its wire. What is decided here, once for every edge: rights, draining, a
connection's publish and dispatch rates, ingest counting, and the budgets of
client reads. Nothing here knows a socket, a frame or an HTTP status.

Batches: the WebSocket edge reads pipelined publishes (and dispatches) ahead and
hands them over together, so they share one commit. :meth:`Operations.publish_many`
decides each item on its own — a forbidden one fails alone — and submits the rest
in one write; the edge awaits :meth:`Pending.wait` and answers each item.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Literal, Protocol, TypeVar

import attrs

from .aggregator import Aggregator, CollectResult
from .auth import EVERYTHING, NOTHING, Rights, TokenVerifier, Unauthorized
from .cluster import ClusterLog, LogWrite
from .config import AuthConfig, LimitsConfig, TasksConfig
from .dispatcher import Dispatcher, TaskView, Worker, WorkerLink, WorkerView
from .envelope import Envelope
from .limits import TokenBucket
from .logs import Throttle
from .protocol import OpError
from .router import Resume, Router, Subscription
from .stats import Ingest
from .store import Appended, DeadLetter, DeadLetterPage, History, Store, StoreClosed, Write
from .tasks import TaskSpec

__all__ = ["Caller", "Intake", "Operations", "Pending", "Quota"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: refused tokens are logged at most once per reason this often (a flood must not fill the journal)
AUDIT_INTERVAL_S = 10.0


class Quota:
    """One connection's (or one HTTP peer's) publish and dispatch rates: token buckets.

    The rates are ``[limits]`` as they are at each request (``limits()``), so a reload
    reaches the connections already open.
    """

    __slots__ = ("_dispatch", "_limits", "_publish")

    def __init__(self, limits: Callable[[], LimitsConfig]) -> None:
        self._limits = limits
        self._publish = TokenBucket()
        self._dispatch = TokenBucket()

    def take(self, kind: Literal["publish", "dispatch"]) -> bool:
        cfg = self._limits()
        if kind == "publish":
            return self._publish.take(cfg.publish_rate_per_s, cfg.publish_burst)
        return self._dispatch.take(cfg.dispatch_rate_per_s, cfg.dispatch_burst)


@attrs.frozen
class Caller:
    """Who asks, through which edge, with which rights (DESIGN §4.8).

    ``sub`` is the token's subject (None: anonymous or the control socket);
    ``ingress`` names the edge for the ingest counters (websocket, control, http);
    ``peer`` says where from, for logs (an address, never a token); ``quota``
    holds the connection's rates (None: not limited, the control socket).
    """

    rights: Rights
    ingress: str
    sub: str | None = None
    peer: str = ""
    quota: Quota | None = None
    #: False until a token was verified where ``[auth] required = true``: every op but auth/ping
    #: is then ``unauthorized``
    authenticated: bool = True
    #: when the token's rights end (unix seconds; None: never)
    expires_at: float | None = None


class Intake:
    """Whether the daemon takes new work: false once a drain has begun."""

    def __init__(self) -> None:
        self.open = True

    def require_open(self) -> None:
        if not self.open:
            raise OpError("overloaded", "aivad is draining")


def _short(text: str, limit: int = 64) -> str:
    """A peer's string in an error message: never echoed whole."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _sift(
    items: Sequence[T], names: list[str], refusal: Callable[[str], OpError | None]
) -> tuple[list[T], dict[int, OpError]]:
    """The items that pass, and the refused ones by position (``names[i]`` is what item i is judged by)."""
    allowed: list[T] = []
    rejected: dict[int, OpError] = {}
    for i, (item, name) in enumerate(zip(items, names, strict=True)):
        error = refusal(name)
        if error is None:
            allowed.append(item)
        else:
            rejected[i] = error
    return allowed, rejected


@attrs.frozen
class OperationsStatistics:
    #: requests refused by a rule of this layer, by why: forbidden, publish_rate, dispatch_rate
    refused: dict[str, int]
    #: tokens refused (and ops before authentication), by reason (aivad.auth.REASONS, missing, no_key)
    unauthorized: dict[str, int]
    #: requests outside the caller's grants, by the right they needed
    forbidden: dict[str, int]


class Committing(Protocol):
    """A write on its way into the store or the cluster log."""

    async def wait(self) -> Any: ...


class Pending:
    """A batch submitted together: per item, an error decided before the write, or its result after the commit."""

    def __init__(self, size: int, rejected: dict[int, OpError], write: Committing | None) -> None:
        self._size = size
        self._rejected = rejected
        self._write = write

    async def wait(self) -> list[Any]:
        """Each item's result, or the :class:`OpError` it failed with, in submission order."""
        results: list[Any] = []
        if self._write is not None:
            try:
                results = list(await self._write.wait())
            except OpError as exc:  # the commit failed: every item of it did
                results = [exc] * (self._size - len(self._rejected))
        done = iter(results)
        return [self._rejected[i] if i in self._rejected else next(done) for i in range(self._size)]


class DeadLetterBook(Protocol):
    """Where dead letters are kept: the embedded store, or the cluster's Redis (one queue for every node).

    A failure of its engine is an :class:`OpError`, as the store's commits fail.
    """

    async def add_dead_letter(self, kind: str, reason: str, body: str, detail: dict[str, Any]) -> int: ...

    async def dead_letters(self, kind: str | None = None, limit: int = 100, after_id: int = 0
                           ) -> DeadLetterPage: ...

    async def purge_dead_letters(self) -> int: ...


class Operations:
    """Every operation of every edge, with its checks. Built once by the composition root."""

    def __init__(
        self,
        *,
        store: Store,
        messages: Store | ClusterLog,
        router: Router,
        dispatcher: Dispatcher,
        aggregator: Aggregator,
        ingest: Ingest,
        intake: Intake,
        limits: LimitsConfig,
        tasks: TasksConfig,
        status: Callable[[], dict[str, Any]],
        drain: Callable[[str], None],
        reload: Callable[[], Awaitable[dict[str, Any]]],
        auth: AuthConfig,
        verifier: TokenVerifier | None = None,
        dead_letters: DeadLetterBook | None = None,
    ) -> None:
        self.store = store
        #: the dead-letter queue (the store's, or in a cluster the one in Redis)
        self.letters: DeadLetterBook = dead_letters or store
        #: where messages are appended and read (the embedded store, or the cluster's log)
        self.messages = messages
        self.router = router
        self.dispatcher = dispatcher
        self.aggregator = aggregator
        self.ingest = ingest
        self.intake = intake
        self.limits = limits
        self.tasks = tasks
        self._status = status
        self._drain = drain
        self._reload = reload
        self._refused: Counter[str] = Counter()
        self.auth = auth
        self._verifier = verifier
        self._unauthorized: Counter[str] = Counter()
        self._forbidden_by_right: Counter[str] = Counter()
        self._audit = Throttle(log, AUDIT_INTERVAL_S)
        #: every quota's view of ``[limits]``: one function, not a closure per connection (~250 bytes each)
        self._current_limits: Callable[[], LimitsConfig] = lambda: self.limits

    def quota(self) -> Quota:
        """A new connection's (or HTTP peer's) rates, following ``[limits]`` through reloads."""
        return Quota(self._current_limits)

    def reconfigure(self, limits: LimitsConfig, tasks: TasksConfig) -> None:
        self.limits = limits
        self.tasks = tasks

    def statistics(self) -> OperationsStatistics:
        return OperationsStatistics(dict(self._refused), dict(self._unauthorized), dict(self._forbidden_by_right))

    # ---- identity (DESIGN §4.8) ----------------------------------------------------------------

    def caller(self, ingress: str, peer: str = "", quota: Quota | None = None) -> Caller:
        """Whoever connects, before any token: every right while ``[auth] required = false``, else none."""
        if self.auth.required:
            return Caller(NOTHING, ingress, peer=peer, quota=quota, authenticated=False)
        return Caller(EVERYTHING, ingress, peer=peer, quota=quota)

    def authenticate(self, caller: Caller, token: object) -> Caller:
        """``caller`` with the identity ``token`` proves: ``unauthorized`` if it proves none (nothing
        changes), ``forbidden`` if it is another subject's than the one already authenticated."""
        if self._verifier is None:
            raise self._unauthorized_for(caller, "no_key", "this daemon is configured to take no tokens")
        try:
            identity = self._verifier.verify(token)
        except Unauthorized as exc:
            raise self._unauthorized_for(caller, exc.reason, exc.message) from None
        if caller.sub is not None and identity.sub != caller.sub:
            raise self._forbidden("sub", "another subject: a refresh keeps the subject of the first token")
        return attrs.evolve(
            caller, rights=identity.rights, sub=identity.sub, authenticated=True, expires_at=identity.expires_at
        )

    def _unauthorized_for(self, caller: Caller, reason: str, message: str) -> OpError:
        """Count and log (throttled, never the token) a refused authentication."""
        self._unauthorized[reason] += 1
        self._audit.warning(f"unauthorized:{reason}", "refused a token from %s (%s): %s",
                            caller.peer or caller.ingress, reason, message)
        return OpError("unauthorized", message)

    def require_authenticated(self, caller: Caller) -> None:
        """Before authentication (``[auth] required = true``), only ``auth`` and ``ping`` are served."""
        self._gate(caller)

    def _gate(self, caller: Caller) -> None:
        if not caller.authenticated:
            raise self._unauthorized_for(caller, "missing", "authenticate first: send auth with a token")

    def _forbidden(self, right: str, name: str) -> OpError:
        self._refused["forbidden"] += 1
        self._forbidden_by_right[right] += 1
        return OpError("forbidden", f"no {right} grant for {_short(name)}")

    def _refusal(self, caller: Caller, kind: Literal["publish", "dispatch"], name: str) -> OpError | None:
        """Why ``caller`` may not publish to topic ``name`` (or dispatch task type ``name``) now, or None.

        The rights come first: a forbidden request does not spend the connection's rate.
        """
        allowed = caller.rights.may_publish(name) if kind == "publish" else caller.rights.may_dispatch(name)
        if not allowed:
            return self._forbidden(kind, name)
        if caller.quota is not None and not caller.quota.take(kind):
            self._refused[f"{kind}_rate"] += 1
            return OpError("overloaded", f"{kind} rate limit of this connection reached: slow down")
        return None

    # ---- messages ----------------------------------------------------------------------------

    async def publish_many(self, caller: Caller, envelopes: Sequence[Envelope]) -> Pending:
        """Store what ``caller`` may publish in one write; each item is decided on its own."""
        submit = partial(self.messages.submit_append, committed=self._counter(caller.ingress))
        return await self._submit(caller, "publish", envelopes, [e.type for e in envelopes], submit)

    async def _submit(
        self,
        caller: Caller,
        kind: Literal["publish", "dispatch"],
        items: Sequence[T],
        names: list[str],
        submit: Callable[[list[T]], Awaitable[Committing]],
    ) -> Pending:
        """Sift ``items`` (rights and rate, by topic or task type in ``names``), submit the rest in one write."""
        self._gate(caller)
        self.intake.require_open()
        allowed, rejected = _sift(items, names, lambda name: self._refusal(caller, kind, name))
        if not allowed:
            return Pending(len(items), rejected, None)
        try:
            write = await submit(allowed)
        except StoreClosed:
            raise OpError("overloaded", "aivad is draining") from None
        return Pending(len(items), rejected, write)

    async def publish(self, caller: Caller, env: Envelope) -> Appended:
        (result,) = await (await self.publish_many(caller, [env])).wait()
        if isinstance(result, OpError):
            raise result
        appended: Appended = result
        return appended

    def _counter(self, ingress: str) -> Callable[[Any], None]:
        def count(write: Write | LogWrite) -> None:
            self.ingest.count(ingress, len(write.messages))

        return count

    async def history(self, caller: Caller, pattern: str, after: int, limit: int) -> History:
        """A page of stored messages matching ``pattern`` after ``after`` — within the client read budget."""
        self._gate(caller)
        if not caller.rights.may_subscribe(pattern):
            raise self._forbidden("subscribe", pattern)
        found = await self.messages.history(pattern, after, limit, client=True)
        return found.within(self.limits.history_page_bytes)

    def subscribe(self, caller: Caller, pattern: str, since: int | None, epoch: str | None) -> Resume:
        """Where a subscription of ``pattern`` starting now begins (its reply's fields), if allowed."""
        self._gate(caller)
        if not caller.rights.may_subscribe(pattern):
            raise self._forbidden("subscribe", pattern)
        return self.router.resume_point(since, epoch)

    async def follow(self, sub: Subscription, resume: Resume) -> None:
        """Replay what ``sub`` missed since its reply, then make it live (end it with :meth:`unsubscribe`)."""
        await self.router.follow(sub, resume.replay_after)

    def unsubscribe(self, sub: Subscription) -> None:
        self.router.remove(sub)

    @staticmethod
    def may_keep(caller: Caller, pattern: str) -> bool:
        """Whether a subscription may go on after ``caller``'s rights changed (a token refresh)."""
        return caller.rights.may_subscribe(pattern)

    def rights_changed(self, caller: Caller, worker: Worker) -> None:
        """A worker's token was refreshed: without a ``work`` grant for every one of its types any more,
        it is drained (no new task; it finishes those it holds), as ``worker.hello`` would now be refused."""
        if not worker.draining and not all(caller.rights.may_work(t) for t in worker.types):
            log.info("worker %s (%s) drained: its refreshed token no longer grants work for all its types",
                     worker.name, caller.sub)
            self.dispatcher.drain_worker(worker)

    # ---- tasks ---------------------------------------------------------------------------------

    async def dispatch_many(self, caller: Caller, specs: Sequence[TaskSpec]) -> Pending:
        """Queue what ``caller`` may dispatch in one write; results are ``(task_id, duplicate)``."""
        return await self._submit(caller, "dispatch", specs, [s.type for s in specs], self.dispatcher.submit_many)

    async def dispatch(self, caller: Caller, spec: TaskSpec) -> tuple[str, bool]:
        (result,) = await (await self.dispatch_many(caller, [spec])).wait()
        if isinstance(result, OpError):
            raise result
        task_id, duplicate = result
        return str(task_id), bool(duplicate)

    async def request(self, caller: Caller, spec: TaskSpec, timeout_s: float) -> dict[str, Any]:
        """Dispatch and wait for the result (request/response)."""
        self._gate(caller)
        self.intake.require_open()
        refusal = self._refusal(caller, "dispatch", spec.type)
        if refusal is not None:
            raise refusal
        return await self.aggregator.request(spec, timeout_s)

    async def task(self, caller: Caller, task_id: str) -> TaskView:
        """A task's state, attempts and result: ``not_found`` if unknown, ``forbidden`` if not its type's."""
        self._gate(caller)
        view = await self.dispatcher.view(task_id)
        if view is None:
            raise OpError("not_found", "no such task")
        if not caller.rights.may_dispatch(view.type):
            raise self._forbidden("dispatch", view.type)
        return view

    async def collect(
        self,
        caller: Caller,
        task_ids: list[str] | None,
        group_id: str | None,
        timeout_s: float,
        min_results: int | None,
    ) -> CollectResult:
        """Wait for results of many tasks, each of a type ``caller`` may dispatch.

        A group is open to anyone's dispatches, so the tasks that joined it while
        this waited are judged too, before any result is handed out.
        """
        self._gate(caller)
        if not caller.rights.admin:
            if task_ids is not None:  # the running ones' types are in memory
                self._require_dispatch(caller, await self.dispatcher.types_of(task_ids))
            else:
                self._require_dispatch(caller, [v.type for v in await self.dispatcher.views(group_id=group_id)])
        result = await self.aggregator.collect(task_ids, group_id, timeout_s, min_results)
        if not caller.rights.admin and task_ids is None:
            self._require_dispatch(
                caller, await self.dispatcher.types_of([*result.completed, *result.failed, *result.pending])
            )
        return result

    def _require_dispatch(self, caller: Caller, types: list[str]) -> None:
        for task_type in types:
            if not caller.rights.may_dispatch(task_type):
                raise self._forbidden("dispatch", task_type)

    # ---- workers -------------------------------------------------------------------------------

    def worker_hello(self, caller: Caller, link: WorkerLink, name: str, types: list[str], concurrency: int) -> Worker:
        self._gate(caller)
        for task_type in types:
            if not caller.rights.may_work(task_type):
                raise self._forbidden("work", task_type)
        return self.dispatcher.add_worker(link, name, types, concurrency)

    def worker_drain(self, worker: Worker) -> None:
        self.dispatcher.drain_worker(worker)

    def worker_gone(self, worker: Worker) -> None:
        self.dispatcher.remove_worker(worker)

    async def task_progress(self, worker: Worker, task_id: Any, progress: float, note: Any) -> None:
        await self.dispatcher.progress(worker, task_id, progress, note)

    def task_result(self, worker: Worker, task_id: Any, result: Any) -> None:
        self.dispatcher.result(worker, task_id, result)

    def task_fail(self, worker: Worker, task_id: Any, error: Any, retryable: bool) -> None:
        self.dispatcher.fail(worker, task_id, error, retryable)

    # ---- administration (control socket, HTTP API with the admin right) --------------------------

    def require_admin(self, caller: Caller) -> None:
        self._gate(caller)
        if not caller.rights.admin:
            raise self._forbidden("admin", "this command (it needs the admin right)")

    def status(self, caller: Caller) -> dict[str, Any]:
        self.require_admin(caller)
        return self._status()

    async def tasks_list(self, caller: Caller, state: str | None, limit: int) -> list[TaskView]:
        self.require_admin(caller)
        return await self.dispatcher.views(state=state, limit=limit)

    def workers(self, caller: Caller) -> list[WorkerView]:
        self.require_admin(caller)
        return self.dispatcher.worker_views()

    async def dead_letters(self, caller: Caller, kind: str | None, limit: int, after_id: int) -> DeadLetterPage:
        self.require_admin(caller)
        return await self.letters.dead_letters(kind, limit, after_id)

    async def dead_letter(self, caller: Caller, letter_id: int) -> DeadLetter:
        self.require_admin(caller)
        letters = (await self.letters.dead_letters(None, 1, letter_id - 1)).letters
        if not letters or letters[0].id != letter_id:
            raise OpError("not_found", f"no dead letter {letter_id}")
        return letters[0]

    async def replay(self, caller: Caller, letter_ids: list[int] | None) -> list[str]:
        """Queue dead tasks again (None: every dead task); returns their task ids."""
        self.require_admin(caller)
        self.intake.require_open()
        if letter_ids is not None:
            return [await self.dispatcher.replay(letter_id) for letter_id in letter_ids]
        replayed: list[str] = []
        after: int | None = 0
        while after is not None:  # by next_after: a page of the cluster's queue may stop short (a poison flood)
            page = await self.letters.dead_letters("task", 500, after)
            for letter in page.letters:
                replayed.append(await self.dispatcher.replay(letter.id))
            after = page.next_after
        return replayed

    async def purge(self, caller: Caller) -> int:
        self.require_admin(caller)
        return await self.letters.purge_dead_letters()

    def drain(self, caller: Caller, why: str) -> None:
        self.require_admin(caller)
        self._drain(why)

    async def reload(self, caller: Caller) -> dict[str, Any]:
        self.require_admin(caller)
        return await self._reload()
