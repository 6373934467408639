"""The Redis client of the edge: settings, connections, errors, scripts, supervision.

Everything here is shared by the log (:mod:`aivad.redis.log`), the ingress
(:mod:`aivad.redis.ingress`) and the task book (:mod:`aivad.redis.tasks`): the
coredis client made from :class:`RedisSettings`, the translation of its
exceptions into :class:`RedisUnavailable` / :class:`EpochChanged` /
:class:`RedisLogError`, and :class:`_Script` (a Lua script run by ``EVALSHA``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, ClassVar, NoReturn

import anyio
import attrs
import coredis
import coredis.connection
import coredis.exceptions
import coredis.retry
import trio

log = logging.getLogger(__name__)

#: the error reply prefix of the scripts when the epoch is not the expected one
_EPOCH_ERROR = "AIVADEPOCH"
#: … when the counter is below a seq the caller saw (the log went back in time)
_REWOUND_ERROR = "AIVADREWOUND"
#: first words of error replies that pass (try again later), not bugs; coredis turns some of these
#: into classes of their own (and drops the word), see _TRANSIENT_ERRORS
_TRANSIENT_REPLIES = frozenset({"LOADING", "OOM", "READONLY", "MISCONF", "BUSY", "TRYAGAIN", "CLUSTERDOWN",
                                "MASTERDOWN", "NOREPLICAS", "MOVED", "ASK"})


class RedisLogError(Exception):
    """Redis answered something aivad cannot work with (a bug or a misconfiguration)."""


class RedisUnavailable(RedisLogError):
    """Redis cannot be reached or refuses for now; the caller retries (see :func:`run_with_backoff`)."""


class RedisOverloaded(RedisLogError):
    """Too many messages already wait to be appended (``max_pending``): answer ``overloaded``."""


class EpochChanged(RedisLogError):
    """The log is not the one this handle or tail knew: Redis lost it, or it was re-created.

    ``current`` is the epoch in Redis now, ``None`` when no log exists (call
    :meth:`RedisLog.reopen` to create one).
    """

    def __init__(self, expected: str, current: str | None) -> None:
        super().__init__(f"the Redis log changed epoch: expected {expected!r}, found {current!r}")
        self.expected = expected
        self.current = current


class LogRewound(EpochChanged):
    """The log has the same epoch but went back in time: its counter is below a seq this node saw.

    Redis lost acknowledged writes without losing the log (an OS crash with
    ``appendfsync everysec``, a failover to a replica that lagged, a restore of
    an older snapshot). Handled as an epoch change: :meth:`RedisLog.reopen`
    gives the log a new epoch, keeps its entries and moves the counter above
    every seq this node saw, so no seq is handed out twice.
    """

    def __init__(self, expected: str, counter: int, seen: int) -> None:
        super().__init__(expected, expected)
        self.args = (f"the Redis log went back from seq {seen} to {counter} (epoch {expected!r}): "
                     "acknowledged entries were lost",)
        self.counter = counter
        self.seen = seen


# ---- settings ------------------------------------------------------------------------


def _positive(_: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0")


@attrs.frozen
class RedisSettings:
    """What the log needs; the daemon builds it from ``[redis]``. Units are in the names."""

    url: str = "redis://127.0.0.1:6379/0"
    #: every key is ``<prefix>{log}:<name>``
    prefix: str = "aivad:"
    #: messages per append script call at most (a script blocks Redis while it runs)
    max_batch: int = attrs.field(default=500, validator=_positive)
    #: bytes of envelopes per append script call, about, at most
    max_batch_bytes: int = attrs.field(default=4 << 20, validator=_positive)
    #: messages waiting for the group commit at most; beyond, appends raise RedisOverloaded
    max_pending: int = attrs.field(default=50_000, validator=_positive)
    #: a command without an answer for this long fails with RedisUnavailable
    op_timeout_s: float = attrs.field(default=5.0, validator=_positive)
    connect_timeout_s: float = attrs.field(default=5.0, validator=_positive)
    #: XREAD BLOCK of a tail; an idle tail notices a lost log within this time
    tail_block_s: float = attrs.field(default=1.0, validator=_positive)
    #: entries one tail read returns at most
    tail_count: int = attrs.field(default=500, validator=_positive)
    #: entries one history snapshot reads at most (a history call reads up to its scan_budget)
    history_chunk: int = attrs.field(default=1000, validator=_positive)
    #: entries one retention call deletes at most
    trim_max_delete: int = attrs.field(default=10_000, validator=_positive)
    #: connections to Redis at most (each blocking tail or ingress read holds one while it waits)
    max_connections: int = attrs.field(default=16, validator=_positive)
    client_name: str | None = None

    def key(self, name: str) -> str:
        return f"{self.prefix}{{log}}:{name}"



# ---- scripts -------------------------------------------------------------------------------


class _Script:
    """A Lua script run by EVALSHA; loaded again when Redis answers NOSCRIPT (after a restart)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, client: coredis.Redis[bytes], keys: Sequence[str], args: Sequence[str | bytes | int]
                       ) -> Any:
        try:
            return await client.evalsha(self.sha, keys, args)
        except coredis.exceptions.NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, keys, args)


# ---- errors --------------------------------------------------------------------------------

_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    coredis.exceptions.ConnectionError,  # includes BusyLoadingError
    TimeoutError,
    OSError,
    trio.TooSlowError,  # our own op_timeout_s
    anyio.ClosedResourceError,  # a connection coredis closed under us (the pool shutting down)
    anyio.BrokenResourceError,
)
_CLIENT_ERRORS: tuple[type[BaseException], ...] = (coredis.exceptions.RedisError, *_CONNECTION_ERRORS)
_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    coredis.exceptions.ReadOnlyError,  # READONLY: a replica after a failover
    coredis.exceptions.TryAgainError,
    coredis.exceptions.ClusterDownError,
    coredis.exceptions.AskError,  # and MovedError
)


def _translate(exc: BaseException, what: str) -> RedisLogError | None:
    """The aivad error for a client error, or None when ``exc`` is not one."""
    if isinstance(exc, _CONNECTION_ERRORS + _TRANSIENT_ERRORS):
        return RedisUnavailable(f"{what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, coredis.exceptions.ResponseError):
        text = str(exc)
        word, _, rest = text.partition(" ")
        if word == _EPOCH_ERROR:  # raised by the scripts; the caller fills in what it expected
            return EpochChanged("", rest or None)
        if word == _REWOUND_ERROR:
            return LogRewound("", int(rest), 0)
        if word in _TRANSIENT_REPLIES:
            return RedisUnavailable(f"{what}: {text}")
        return RedisLogError(f"{what}: {text}")
    if isinstance(exc, coredis.exceptions.RedisError):
        return RedisLogError(f"{what}: {exc}")
    return None


@contextlib.contextmanager
def _errors(what: str, epoch: str = "", seen: int = 0) -> Iterator[None]:
    """Turn the client's exceptions into :class:`RedisUnavailable` / :class:`EpochChanged` / :class:`RedisLogError`."""
    try:
        yield
    except _CLIENT_ERRORS as exc:
        translated = _translate(exc, what)
        assert translated is not None
        if isinstance(translated, LogRewound):
            translated = LogRewound(epoch, translated.counter, seen)
        elif isinstance(translated, EpochChanged):
            translated = EpochChanged(epoch, translated.current)
        raise translated from exc


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def _int(value: bytes | str | int | None) -> int:
    """A number the log keeps (its counter, its floor); not a number there is not our log's data."""
    if value is None:
        return 0
    try:
        return int(value)
    except ValueError:
        raise RedisLogError(f"not a number where the log keeps one: {value!r:.40}") from None


def _raw_reply(response: Any, **_: Any) -> Any:
    """A coredis response callback that keeps the parsed reply as it is.

    The log's hot reads (XREAD of a tail, XRANGE of a history) take the reply
    as coredis's C parser left it — ``[id, [b"t", t, b"type", type, b"d", body]]``
    per entry, fields in the order the append script writes them — instead of
    building a ``StreamEntry`` with an ordered dict per entry: measured here at
    less than half the CPU per message (bench/redis_clients.py, (e)).
    """
    return response


class _ClosingConnection(coredis.connection.BaseConnection):
    """Close the connection's memory streams when it ends, however it ends.

    coredis 6.9 creates them in ``__init__`` and closes them only once connected:
    every failed attempt (Redis down) left six unclosed streams behind, a
    ResourceWarning each when collected (an error under pytest's
    ``filterwarnings = error``, wherever the collection happens).
    """

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await super().run(task_status=task_status)
        finally:
            for stream in (self._write_buffer_in, self._write_buffer_out, self._push_message_buffer_in,
                           self._push_message_buffer_out, self._streamed_message_buffer_in,
                           self._streamed_message_buffer_out):
                stream.close()


class _TCPConnection(_ClosingConnection, coredis.connection.TCPConnection):
    pass


class _UnixConnection(_ClosingConnection, coredis.connection.UnixDomainSocketConnection):
    pass


class _ConnectionPool(coredis.ConnectionPool[Any]):
    _OURS: ClassVar[dict[type[Any], type[Any]]] = {
        coredis.connection.TCPConnection: _TCPConnection,
        coredis.connection.UnixDomainSocketConnection: _UnixConnection,
    }

    def __init__(self, *, connection_class: type[Any] | None = None, **kwargs: Any) -> None:
        super().__init__(connection_class=self._OURS.get(connection_class, connection_class),  # type: ignore[arg-type]
                         **kwargs)


def _client(settings: RedisSettings) -> coredis.Redis[bytes]:
    pool = _ConnectionPool.from_url(
        settings.url,
        decode_responses=False,
        stream_timeout=settings.op_timeout_s,
        connect_timeout=settings.connect_timeout_s,
        max_connections=settings.max_connections,
        client_name=settings.client_name,
    )
    # no retries: the caller decides (a silently retried append would hide a lost reply)
    return coredis.Redis(connection_pool=pool, retry_policy=coredis.retry.NoRetryPolicy())


def _raise_single(group: BaseExceptionGroup[BaseException], what: str) -> None:
    """coredis's connection pool is a task group: what leaves its body comes wrapped in a group.

    A group of one exception is raised as that exception (a client error as
    aivad's), so callers can ``except RedisUnavailable`` around the context.
    Returns when the group holds more than one.
    """
    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        else:
            leaves.append(exc)

    collect(group)
    if len(leaves) != 1:
        return
    leaf = leaves[0]
    translated = _translate(leaf, what)
    if translated is not None:
        raise translated from leaf
    raise leaf


# ---- supervision -----------------------------------------------------------------------------------


async def run_with_backoff(what: str, session: Callable[[], Awaitable[object]], *, initial_s: float = 0.5,
                           max_s: float = 30.0, healthy_s: float = 10.0,
                           on_error: Callable[[RedisUnavailable], None] | None = None,
                           jitter: Callable[[], float] = lambda: random.uniform(0.8, 1.2)) -> NoReturn:
    """Run ``session()`` again and again; after :class:`RedisUnavailable`, wait and retry.

    The wait doubles from ``initial_s`` up to ``max_s`` (times ``jitter()``), and
    starts over after a session that lasted ``healthy_s``. ``on_error`` sees
    each failure (statistics, ``/readyz``, a ``system.alert``). Anything else —
    :class:`EpochChanged` included, which needs a decision — propagates.
    Cancellation ends it.
    """
    delay = initial_s
    while True:
        started = trio.current_time()
        try:
            await session()
            continue
        except RedisUnavailable as exc:
            if on_error is not None:
                on_error(exc)
            if trio.current_time() - started >= healthy_s:
                delay = initial_s
            log.warning("%s: %s; again in %.1fs", what, exc, delay)
        await trio.sleep(delay * jitter())
        delay = min(max_s, delay * 2)
