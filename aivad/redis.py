"""EDGE: the cluster log on Redis (DESIGN §5) — the only module that imports the Redis client.

The client is **coredis**, which runs natively on anyio and therefore on trio:
no asyncio loop, no thread, no bridge. It was chosen by measurement over
redis-py on its own asyncio loop in a thread (``bench/redis_clients.py``,
docs/architecture.md "Redis client").

What lives in Redis
===================

Every key is ``<prefix>{log}:<name>``: the hash tag ``{log}`` puts them all in
one slot, so the scripts below (which touch several keys atomically) also run on
a Redis Cluster. (A prefix that carries its own hash tag, e.g. ``{app}:``, wins:
the first ``{...}`` of a key is its tag.) The log is one stream, so one shard
holds it either way: Redis Cluster gives no write scaling to one log.

* ``meta`` (hash): ``epoch``, ``seq`` (the last seq handed out), ``floor`` (the
  newest seq retention has deleted), ``t`` (the newest stored-at time, ms),
  ``created_ms``.
* ``stream`` (stream): one entry per message, entry ID ``<seq>-0``, fields
  ``t`` (stored-at, ms, server clock, never decreasing), ``type`` and ``d`` (the
  envelope JSON without ``seq``; ``"seq":N`` is spliced in when read, as the
  embedded store does). Since IDs are seqs, "after seq N" is ``XRANGE N+1 +`` /
  ``XREAD N-0``, with no mapping table.
* ``ids`` (sorted set): member ``message_id``, score its seq. ``ZSCORE`` is the
  de-duplication lookup (O(1)) and ``ZREMRANGEBYSCORE -inf floor`` trims it
  together with the log: its size follows retention, the de-duplication window
  is exactly what the log still holds (the embedded store's rule). Per-id keys
  with a TTL would need a second clock, could expire while the message is still
  kept (then a retry would be stored twice) and cost a key each.
* ``nodes`` (hash name → JSON) and ``node-expiry`` (sorted set name → expiry,
  ms): heartbeats.

Guarantees
==========

* **append** is one ``EVALSHA`` per batch (at most ``max_batch`` messages and
  about ``max_batch_bytes``; longer inputs are split and sent in order), and
  concurrent callers share batches (group commit, one script call in flight per
  handle, as the embedded store commits). The script checks the epoch, then
  per message: a known ``message_id`` answers its
  original seq (``duplicate``), else ``HINCRBY seq``, ``XADD <seq>-0``, ``ZADD
  ids``. A script runs atomically, so seq order is commit order on every node.
  The call returns only after Redis answered.
* A lost reply (connection dropped, timeout, cancellation) does not mean the
  script did not run: retry with the same ``message_id`` s; the retry is
  answered as a duplicate with the original seq.
* **epoch**: a random id written once into ``meta`` (HSETNX semantics, by
  :meth:`RedisLog.reopen`). Every append and read checks it; when Redis lost
  the log (FLUSHALL, a restart without persistence, eviction) the epoch is gone
  or different and the call raises :class:`EpochChanged` — nothing is ever
  appended into a log that lost its epoch. The caller adopts the new log with
  ``reopen()``.
* **a log that went back in time** (same epoch, counter below a seq a node
  has seen: Redis lost acknowledged writes but not the log — an OS crash under
  ``appendfsync everysec``, a failover to a lagging replica, an older snapshot
  restored) would hand out seqs a second time. Every append carries the newest
  seq its node saw and the script refuses below it; a tail checks the counter
  against its position: both raise :class:`LogRewound` (an
  :class:`EpochChanged`), and ``reopen()`` gives that log a new epoch, keeps
  its entries and moves the counter up.
* **seq after a loss**: a new epoch starts an empty log whose counter and floor
  begin at the highest seq the reopening node had seen (``seq_floor``; any later
  node bumps the counter further up to what it saw). So a seq is not handed out
  twice as long as one surviving node saw the newest one, and a client without
  the epoch asking ``since`` below that point is told of a gap instead of being
  fed new messages under old numbers.
* **tail** reads ``XREAD BLOCK`` and, in the same pipeline after it, the epoch,
  the floor and the counter: a reader learns a gap (entries retention deleted
  before it read them) exactly, and notices a lost or rewound log within
  ``tail_block_s`` even when idle.
* **retention** (:meth:`RedisLog.trim`, :meth:`RedisLog.apply_retention`)
  deletes by age (binary search over the ``t`` fields, which never decrease,
  then ``XTRIM MINID``) and by count (``XTRIM MAXLEN``), at most
  ``trim_max_delete`` entries per call (one script call must not stall Redis),
  moves ``floor`` and trims ``ids`` to it.

Redis must run with ``maxmemory-policy noeviction`` (evicting the stream or
``meta`` would lose the log); appends then fail with ``OOM`` as
:class:`RedisUnavailable`. Durability of an acknowledged append is Redis's
(:meth:`RedisLog.durability` reads it): ``appendonly yes`` with ``appendfsync
always`` for "acknowledged means on disk"; ``everysec`` survives a crash of
Redis but loses up to about a second (more if the disk stalls) when the
machine goes down; replicas are asynchronous, so a failover can lose what the
old primary acknowledged — both show up here as :class:`LogRewound`.

Errors
======

:class:`RedisUnavailable`: the connection failed, a reply did not come within
``op_timeout_s``, or Redis refused for a passing reason (``LOADING``, ``OOM``,
``READONLY``, ``MISCONF``, ``BUSY``…) — try again later; :func:`run_with_backoff`
is the caller's supervise loop. :class:`RedisOverloaded`: ``max_pending``
messages already wait for the group commit — answer ``overloaded``.
:class:`EpochChanged` (and :class:`LogRewound`): the log is not the one this
handle knew — tell subscribers (``epoch_changed``), ``reopen()``, start the
tail again. Anything else (:class:`RedisLogError`) is a bug or a
misconfiguration (a key of the wrong type).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, NoReturn, TypeVar

import anyio
import attrs
import coredis
import coredis.connection
import coredis.exceptions
import coredis.retry
import trio
import trio.lowlevel

from .envelope import BadMessage, Envelope, compile_pattern
from .store import Appended, StoredMessage

__all__ = [
    "ChannelIngress",
    "Durability",
    "EpochChanged",
    "Gap",
    "IngressEntry",
    "IngressStatistics",
    "LogHistory",
    "LogInfo",
    "LogRewound",
    "LogTail",
    "NodeInfo",
    "RedisIngress",
    "RedisLog",
    "RedisLogError",
    "RedisLogStatistics",
    "RedisOverloaded",
    "RedisSettings",
    "RedisUnavailable",
    "TailBatch",
    "Trimmed",
    "envelope_from_channel",
    "envelope_from_entry",
    "open_channel_ingress",
    "open_redis_log",
    "run_with_backoff",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

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


# ---- settings and results ---------------------------------------------------------------


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


@attrs.frozen
class LogHistory:
    """Messages matching a pattern with seq > ``after``, and how far the read looked.

    Every matching message with ``after < seq <= scanned_through`` is in
    ``messages`` (ascending): the next page asks ``after = scanned_through``,
    also when ``messages`` is empty because the scan budget ran out first.
    ``retention_floor`` is the newest seq retention had deleted, read in the
    same snapshot as the entries: a reader whose ``after`` is below it missed
    ``after + 1 .. retention_floor``. ``last_seq`` is the newest seq in the log.
    """

    messages: list[StoredMessage]
    scanned_through: int
    retention_floor: int
    last_seq: int
    epoch: str
    #: entries looked at (bounded by the scan budget)
    scanned: int

    def page(self, after: int) -> dict[str, Any]:
        """The fields of a history reply (DESIGN §4.3): envelopes and ``last_seq`` to ask after next."""
        last_seq = self.messages[-1].seq if self.messages else after
        return {"messages": [json.loads(m.json) for m in self.messages], "last_seq": last_seq}


@attrs.frozen
class Gap:
    """Seqs ``first .. last`` (inclusive) that retention deleted before a reader got them."""

    first: int
    last: int


@attrs.frozen
class TailBatch:
    """What one tail read returns: committed messages in seq order, after an optional gap."""

    messages: list[StoredMessage]
    gap: Gap | None
    #: the tail's position after this batch (the newest seq it has passed)
    position: int


@attrs.frozen
class Trimmed:
    """One retention call: entries deleted, the floor now, and whether more is due (budget hit)."""

    deleted: int
    floor: int
    more: bool


@attrs.frozen
class LogInfo:
    epoch: str | None
    last_seq: int
    retention_floor: int
    length: int
    ids: int
    created_ms: int


@attrs.frozen
class Durability:
    """What Redis promises about an acknowledged append (see docs: "Redis client" / cluster notes).

    ``appendonly`` with ``appendfsync == "always"``: on disk before the answer.
    ``"everysec"``: up to about a second lost on a crash of the machine (not of
    Redis alone). No AOF: a restart loses the log (a new epoch).
    ``maxmemory_policy`` must be ``noeviction``: evicting keys would cut the log.
    """

    appendonly: bool
    appendfsync: str
    maxmemory_policy: str

    @property
    def warnings(self) -> list[str]:
        found = []
        if self.maxmemory_policy != "noeviction":
            found.append(f"maxmemory-policy is {self.maxmemory_policy}: Redis may evict parts of the log "
                         "(set noeviction)")
        if not self.appendonly:
            found.append("appendonly is off: a Redis restart loses the log (clients see a new epoch)")
        return found


@attrs.frozen
class NodeInfo:
    """A live node: its name, what it reported, when it was last seen (server clock, Unix seconds)."""

    name: str
    info: dict[str, Any]
    last_seen: float
    expires: float


@attrs.frozen
class RedisLogStatistics:
    epoch: str
    #: the newest seq this handle has seen (appended, tailed or read)
    last_seq: int
    appended: int
    duplicates: int
    append_calls: int
    #: messages waiting for the group commit now (bounded by ``max_pending``)
    pending: int
    tail_reads: int
    errors: int
    last_error: str | None


# ---- Lua ---------------------------------------------------------------------------------
#
# ``#!lua`` (Redis 7): the script is refused as a whole when Redis is out of memory,
# never half run. Every key is passed in KEYS (cluster-safe). Numbers are formatted with
# %d: Lua's default number format would write large integers as 1e+14.

_SEQ_OF = """
local function seq_of(id)
  return tonumber(string.sub(id, 1, string.find(id, '-', 1, true) - 1))
end
local function now_ms()
  local tm = redis.call('TIME')
  return tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
end
"""

#: KEYS meta, stream, ids. ARGV expected epoch, the newest seq the caller has seen, then
#: (message_id, type, envelope JSON) per message.
#: Returns per message its seq, negated when it is a duplicate (the original's seq).
APPEND_LUA = """#!lua
local meta, stream, ids = KEYS[1], KEYS[2], KEYS[3]
local epoch = redis.call('HGET', meta, 'epoch')
if epoch ~= ARGV[1] then
  return redis.error_reply('AIVADEPOCH ' .. (epoch or ''))
end
local counter = tonumber(redis.call('HGET', meta, 'seq') or '0')
if counter < tonumber(ARGV[2]) then
  return redis.error_reply('AIVADREWOUND ' .. string.format('%d', counter))
end
if (#ARGV - 2) % 3 ~= 0 then
  return redis.error_reply('ERR aivad append: arguments must come in threes')
end
local tm = redis.call('TIME')
local t = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
local last_t = tonumber(redis.call('HGET', meta, 't') or '0')
if t < last_t then t = last_t end
local ts = string.format('%d', t)
local out = {}
local stored = 0
for i = 3, #ARGV, 3 do
  local mid = ARGV[i]
  local known = redis.call('ZSCORE', ids, mid)
  if known then
    out[#out + 1] = -tonumber(known)
  else
    local seq = redis.call('HINCRBY', meta, 'seq', 1)
    redis.call('XADD', stream, string.format('%d-0', seq), 't', ts, 'type', ARGV[i + 1], 'd', ARGV[i + 2])
    redis.call('ZADD', ids, seq, mid)
    out[#out + 1] = seq
    stored = stored + 1
  end
end
if stored > 0 and t ~= last_t then
  redis.call('HSET', meta, 't', ts)
end
return out
"""

#: KEYS meta, stream, ids. ARGV a new epoch, the seq floor, the epoch the caller knew ('' = none).
#: Returns {epoch, 0 adopted / 1 created / 2 re-based (same log, went back: new epoch, entries kept)}.
OPEN_LUA = "#!lua\n" + _SEQ_OF + """
local meta, stream, ids = KEYS[1], KEYS[2], KEYS[3]
local hint = tonumber(ARGV[2])
local epoch = redis.call('HGET', meta, 'epoch')
local seq = tonumber(redis.call('HGET', meta, 'seq') or '0')
if epoch then
  if hint > seq then
    redis.call('HSET', meta, 'seq', string.format('%d', hint))
    if epoch == ARGV[3] then
      -- the log this caller knew went back in time: same entries, but seqs it saw are free
      -- again; a new epoch tells every client, the counter moves above what it saw
      redis.call('HSET', meta, 'epoch', ARGV[1])
      return {ARGV[1], 2}
    end
  end
  return {epoch, 0}
end
-- a new log: whatever is left of an older one (a partial loss) is not part of it
local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
if #last > 0 and seq_of(last[1][1]) > seq then seq = seq_of(last[1][1]) end
if hint > seq then seq = hint end
redis.call('DEL', stream, ids)
local s = string.format('%d', seq)
redis.call('HSET', meta, 'epoch', ARGV[1], 'seq', s, 'floor', s, 't', '0', 'created_ms',
           string.format('%d', now_ms()))
return {ARGV[1], 1}
"""

#: KEYS meta, stream, ids. ARGV max_messages, max_age_ms, now_ms (0 = server time), max_delete,
#: expected epoch. Returns {deleted, floor, more}.
TRIM_LUA = "#!lua\n" + _SEQ_OF + """
local meta, stream, ids = KEYS[1], KEYS[2], KEYS[3]
local max_messages, max_age = tonumber(ARGV[1]), tonumber(ARGV[2])
local now, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local epoch = redis.call('HGET', meta, 'epoch')
if epoch ~= ARGV[5] then
  return redis.error_reply('AIVADEPOCH ' .. (epoch or ''))
end
local floor = tonumber(redis.call('HGET', meta, 'floor') or '0')
local deleted, more = 0, 0
if max_age > 0 then
  if now <= 0 then now = now_ms() end
  local cutoff = now - max_age
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  if #first > 0 and tonumber(first[1][2][2]) < cutoff then
    -- the newest entry stored before cutoff; t never decreases along the stream
    local lo = seq_of(first[1][1])
    local hi = tonumber(redis.call('HGET', meta, 'seq') or '0')
    while lo < hi do
      local mid = math.floor((lo + hi + 1) / 2)
      local e = redis.call('XRANGE', stream, string.format('%d', mid), '+', 'COUNT', 1)
      if #e > 0 and tonumber(e[1][2][2]) < cutoff then lo = seq_of(e[1][1]) else hi = mid - 1 end
    end
    local limit = seq_of(first[1][1]) + budget - 1
    if lo > limit then lo = limit; more = 1 end
    deleted = deleted + redis.call('XTRIM', stream, 'MINID', string.format('%d', lo + 1))
  end
end
if max_messages > 0 then
  local n = redis.call('XLEN', stream)
  if n > max_messages then
    local k = n - max_messages
    if k > budget - deleted then k = budget - deleted; more = 1 end
    if k > 0 then
      deleted = deleted + redis.call('XTRIM', stream, 'MAXLEN', n - k)
    end
  end
end
if deleted > 0 then
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  local new_floor
  if #first > 0 then
    new_floor = seq_of(first[1][1]) - 1
  else
    new_floor = tonumber(redis.call('HGET', meta, 'seq') or '0')
  end
  if new_floor > floor then
    floor = new_floor
    redis.call('HSET', meta, 'floor', string.format('%d', floor))
  end
  redis.call('ZREMRANGEBYSCORE', ids, '-inf', string.format('%d', floor))
end
return {deleted, floor, more}
"""

#: KEYS nodes, node-expiry. ARGV name, info JSON, ttl_ms. Returns the server time (ms).
HEARTBEAT_LUA = "#!lua\n" + _SEQ_OF + """
local now = now_ms()
local expires = now + tonumber(ARGV[3])
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. string.format('%d', now), 'LIMIT', 0, 100)
if #gone > 0 then
  redis.call('HDEL', KEYS[1], unpack(gone))
  redis.call('ZREM', KEYS[2], unpack(gone))
end
redis.call('HSET', KEYS[1], ARGV[1], '{"last_seen_ms":' .. string.format('%d', now) .. ',"expires_ms":' ..
           string.format('%d', expires) .. ',"info":' .. ARGV[2] .. '}')
redis.call('ZADD', KEYS[2], expires, ARGV[1])
return now
"""

#: KEYS nodes, node-expiry. ARGV the most to return. Returns {now_ms, name, json, name, json…}.
LIVE_NODES_LUA = "#!lua flags=no-writes\n" + _SEQ_OF + """
local now = now_ms()
local names = redis.call('ZRANGEBYSCORE', KEYS[2], string.format('%d', now), '+inf', 'LIMIT', 0, tonumber(ARGV[1]))
local out = {now}
if #names > 0 then
  local infos = redis.call('HMGET', KEYS[1], unpack(names))
  for i, name in ipairs(names) do
    if infos[i] then
      out[#out + 1] = name
      out[#out + 1] = infos[i]
    end
  end
end
return out
"""


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


_APPEND = _Script(APPEND_LUA)
_OPEN = _Script(OPEN_LUA)
_TRIM = _Script(TRIM_LUA)
_HEARTBEAT = _Script(HEARTBEAT_LUA)
_LIVE_NODES = _Script(LIVE_NODES_LUA)


# ---- errors --------------------------------------------------------------------------------

_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    coredis.exceptions.ConnectionError,  # includes BusyLoadingError
    TimeoutError,
    OSError,
    trio.TooSlowError,  # our own op_timeout_s
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
    if value is None:
        return 0
    return int(value)


def _with_seq(body: bytes, seq: int) -> str:
    """Splice ``"seq":N`` into stored JSON (stored without it: the seq is given inside the script)."""
    return f'{body[:-1].decode()},"seq":{seq}}}'


def _raw_reply(response: Any, **_: Any) -> Any:
    """A coredis response callback that keeps the parsed reply as it is.

    The log's hot reads (XREAD of a tail, XRANGE of a history) take the reply
    as coredis's C parser left it — ``[id, [b"t", t, b"type", type, b"d", body]]``
    per entry, fields in the order the append script writes them — instead of
    building a ``StreamEntry`` with an ordered dict per entry: measured here at
    less than half the CPU per message (bench/redis_clients.py, (e)).
    """
    return response


def _message(entry: Sequence[Any]) -> StoredMessage:
    """A raw stream entry of the log → StoredMessage (seq, type, envelope JSON with seq)."""
    ident, fields = entry
    seq = int(ident[:ident.index(b"-")])
    return StoredMessage(seq, fields[3].decode(), _with_seq(fields[5], seq))


# ---- the log ---------------------------------------------------------------------------------


class _PendingAppend:
    """Rows of one append call waiting for the commit lock's holder to send them."""

    __slots__ = ("done", "error", "results", "rows", "size", "taken")

    def __init__(self, rows: Sequence[tuple[str, str, str]], size: int) -> None:
        self.rows = rows
        self.size = size
        self.taken = False  # in a flush: it will be done
        self.done = False
        self.results: list[Appended] = []
        self.error: RedisLogError | None = None


class RedisLog:
    """The cluster log; made by :func:`open_redis_log`, used from trio tasks.

    Public: :meth:`append_many`, :meth:`append`, :meth:`append_rows`,
    :meth:`history`, :meth:`tail`, :meth:`info`, :meth:`trim`,
    :meth:`apply_retention`, :meth:`reopen`, :meth:`durability`,
    :meth:`heartbeat`, :meth:`live_nodes`, :meth:`forget_node`,
    :meth:`statistics`; ``epoch``, ``last_seq`` and ``settings``.
    """

    def __init__(self, client: coredis.Redis[bytes], settings: RedisSettings) -> None:
        self._client = client
        self.settings = settings
        k = settings.key
        self._log_keys = [k("meta"), k("stream"), k("ids")]
        self._meta, self._stream, self._ids = self._log_keys
        self._node_keys = [k("nodes"), k("node-expiry")]
        #: the epoch this handle trusts; set by reopen()
        self.epoch = ""
        #: the newest seq this handle has seen; the floor of a new log after a loss
        self.last_seq = 0
        self._appended = 0
        self._duplicates = 0
        self._append_calls = 0
        #: group commit: chunks waiting to be sent, in arrival order, and the lock whose holder sends them
        self._waiting: collections.deque[_PendingAppend] = collections.deque()
        self._pending_messages = 0
        self._commit_lock = trio.Lock()
        self._tail_reads = 0
        self._errors = 0
        self._last_error: str | None = None

    @property
    def client(self) -> coredis.Redis[bytes]:
        """The coredis client (for this module's other classes; nothing else should need it)."""
        return self._client

    @contextlib.contextmanager
    def _guard(self, what: str, epoch: str | None = None) -> Iterator[None]:
        try:
            with _errors(what, self.epoch if epoch is None else epoch, self.last_seq):
                yield
        except RedisLogError as exc:
            self._errors += 1
            self._last_error = str(exc)
            raise

    def _saw(self, seq: int) -> None:
        if seq > self.last_seq:
            self.last_seq = seq

    # ---- epoch ----------------------------------------------------------------------

    async def reopen(self, seq_floor: int = 0) -> bool:
        """Adopt the log in Redis, creating it (a new epoch) when there is none; True if the epoch is new.

        A new log's counter and floor start at ``max(seq_floor, last_seq)`` (the
        newest seq this handle saw), so seqs are not handed out twice after Redis
        lost the log. The log this handle knew but with its counter below that
        (:class:`LogRewound`) gets a new epoch, keeps its entries, and its counter
        moves up. Call at start and after :class:`EpochChanged`.
        """
        with self._guard("open the log"), trio.fail_after(self.settings.op_timeout_s):
            epoch, outcome = await _OPEN(self._client, self._log_keys,
                                         [uuid.uuid4().hex, max(seq_floor, self.last_seq), self.epoch])
        previous, self.epoch = self.epoch, _text(epoch)
        if outcome == 1:
            log.info("redis log %s created epoch %s (was %s)", self._stream, self.epoch, previous or "none")
        elif outcome == 2:
            log.warning("redis log %s went back in time (lost acknowledged entries): new epoch %s (was %s), "
                        "seqs go on after %d", self._stream, self.epoch, previous, self.last_seq)
        elif previous and previous != self.epoch:
            log.warning("redis log %s: adopted epoch %s (was %s)", self._stream, self.epoch, previous)
        return bool(outcome)

    # ---- append ---------------------------------------------------------------------

    async def append_many(self, envelopes: Sequence[Envelope]) -> list[Appended]:
        """Store envelopes in order; returns after Redis answered, one result per envelope.

        Raises :class:`RedisUnavailable` (the outcome is unknown: retry with the
        same envelopes, duplicates are answered with the original seq) or
        :class:`EpochChanged` (nothing of this call was stored in the new log).
        """
        return await self.append_rows([(e.message_id, e.type, e.to_json()) for e in envelopes])

    async def append(self, envelope: Envelope) -> Appended:
        return (await self.append_many([envelope]))[0]

    async def append_rows(self, rows: Sequence[tuple[str, str, str]]) -> list[Appended]:
        """``append_many`` for rows already encoded: (message_id, type, envelope JSON without seq).

        Group commit: the call queues its rows (cut into chunks of at most
        ``max_batch`` messages / ``max_batch_bytes``) and waits for the commit
        lock; whoever holds it sends everything waiting, in arrival order, as one
        script call and hands each caller its results. So concurrent callers
        share script calls and one call is in flight per handle, as in the
        embedded store. A flush, once begun, finishes (shielded, bounded by
        ``op_timeout_s``): the caller that happens to run it being cancelled does
        not fail the others'.

        Raises :class:`RedisOverloaded` when ``max_pending`` messages already wait.
        """
        settings = self.settings
        chunks: list[_PendingAppend] = []
        start = 0
        while start < len(rows):
            end, size = start, 0
            while end < len(rows) and end - start < settings.max_batch and (
                    end == start or size + len(rows[end][2]) <= settings.max_batch_bytes):
                size += len(rows[end][2])
                end += 1
            chunks.append(_PendingAppend(rows[start:end], size))
            start = end
        if not chunks:
            return []
        if self._pending_messages + len(rows) > settings.max_pending:
            raise RedisOverloaded(f"{self._pending_messages} messages already wait for Redis")
        self._waiting.extend(chunks)
        self._pending_messages += len(rows)
        try:
            for chunk in chunks:
                if not chunk.done:
                    async with self._commit_lock:
                        if not chunk.done:
                            await self._flush()
        except BaseException:
            for chunk in chunks:
                if not chunk.taken:  # not sent: forget it
                    self._waiting.remove(chunk)
                    self._pending_messages -= len(chunk.rows)
            raise
        results: list[Appended] = []
        for chunk in chunks:
            if chunk.error is not None:
                raise chunk.error
            results += chunk.results
        return results

    async def _flush(self) -> None:
        """Send what waits (from the front, up to the batch bounds) as one script call. Holds the lock."""
        settings = self.settings
        batch: list[_PendingAppend] = []
        count = size = 0
        while self._waiting:
            chunk = self._waiting[0]
            if batch and (count + len(chunk.rows) > settings.max_batch
                          or size + chunk.size > settings.max_batch_bytes):
                break
            self._waiting.popleft()
            chunk.taken = True
            batch.append(chunk)
            count += len(chunk.rows)
            size += chunk.size
        self._pending_messages -= count
        args: list[str | bytes | int] = [self.epoch, self.last_seq]
        for chunk in batch:
            for message_id, topic, body in chunk.rows:
                args += (message_id, topic, body)
        try:
            with trio.CancelScope(shield=True), self._guard("append"), trio.fail_after(settings.op_timeout_s):
                seqs = await _APPEND(self._client, self._log_keys, args)
        except BaseException as exc:
            error = exc if isinstance(exc, RedisLogError) else RedisLogError(f"append failed: {exc!r}")
            for chunk in batch:
                chunk.error = error
                chunk.done = True
            if error is exc:
                return
            raise
        self._append_calls += 1
        results = [Appended(s, False) if s > 0 else Appended(-s, True) for s in seqs]
        duplicates = sum(1 for r in results if r.duplicate)
        self._duplicates += duplicates
        self._appended += len(results) - duplicates
        if results:
            self._saw(max(r.seq for r in results))
        i = 0
        for chunk in batch:
            chunk.results = results[i:i + len(chunk.rows)]
            chunk.done = True
            i += len(chunk.rows)

    # ---- reads ----------------------------------------------------------------------

    async def info(self) -> LogInfo:
        """The log's epoch (None: no log), newest seq, floor, length and de-dup index size, in one snapshot."""
        with self._guard("info"), trio.fail_after(self.settings.op_timeout_s):
            async with self._client.pipeline(transaction=True) as p:
                meta = p.hmget(self._meta, ["epoch", "seq", "floor", "created_ms"])
                length = p.xlen(self._stream)
                ids = p.zcard(self._ids)
            epoch, seq, floor, created = await meta
            info = LogInfo(_text(epoch) or None, _int(seq), _int(floor), await length, await ids, _int(created))
        if info.epoch == self.epoch:
            self._saw(info.last_seq)
        return info

    async def history(self, pattern: str, after: int = 0, limit: int = 100, scan_budget: int = 10_000
                      ) -> LogHistory:
        """Up to ``limit`` messages matching ``pattern`` with seq > ``after``, ascending.

        Looks at ``scan_budget`` entries at most, in snapshots of up to
        ``history_chunk`` entries (each atomic with the floor and the epoch); see
        :class:`LogHistory` for what the result promises. Filtering happens here
        with :func:`aivad.envelope.compile_pattern`.

        Raises :class:`EpochChanged` when the log is not this handle's.
        """
        if limit < 1 or scan_budget < 1:
            raise ValueError("limit and scan_budget must be >= 1")
        matches = compile_pattern(pattern)
        messages: list[StoredMessage] = []
        cursor = after
        scanned = 0
        floor = newest = 0
        epoch = self.epoch
        chunk = min(max(limit, 64), self.settings.history_chunk)
        while True:
            count = min(chunk, scan_budget - scanned)
            with self._guard("history"), trio.fail_after(self.settings.op_timeout_s):
                async with self._client.pipeline(transaction=True) as p:
                    meta = p.hmget(self._meta, ["epoch", "seq", "floor"])
                    read = p.create_request(b"XRANGE", self._stream, cursor + 1, b"+", b"COUNT", count,
                                            callback=_raw_reply)
                raw_epoch, raw_seq, raw_floor = await meta
                entries = await read
            if _text(raw_epoch) != epoch:
                raise EpochChanged(epoch, _text(raw_epoch) or None)
            newest, chunk_floor = _int(raw_seq), _int(raw_floor)
            if newest < self.last_seq:
                raise LogRewound(epoch, newest, self.last_seq)
            if chunk_floor > floor:
                floor = chunk_floor
                if floor > cursor:
                    # retention ran between two snapshots: what was read below the floor goes too,
                    # so the result is "everything after the floor", not a silent hole
                    messages = [m for m in messages if m.seq > floor]
                    cursor = floor
            scanned += len(entries)
            for entry in entries:
                message = _message(entry)
                cursor = message.seq
                if matches(message.type):
                    messages.append(message)
                    if len(messages) == limit:
                        break
            if len(messages) == limit:
                break
            if len(entries) < count:
                cursor = max(cursor, newest)  # reached the end of the log
                break
            if scanned >= scan_budget:
                break
            chunk = min(chunk * 2, self.settings.history_chunk)
        self._saw(newest)
        return LogHistory(messages, cursor, floor, newest, epoch, scanned)

    def tail(self, after: int, *, count: int | None = None) -> LogTail:
        """A reader of every message with seq > ``after``, in seq order, as they are committed.

        ``after`` is a seq of this log (at most its newest: a position above the
        counter reads as :class:`LogRewound`). A client's ``since`` above the
        newest seq is the caller's to answer (``recovered: false``), not a tail's.
        """
        return LogTail(self, after, count or self.settings.tail_count)

    async def _tail_read(self, position: int, count: int) -> tuple[list[StoredMessage], str, int, int]:
        block_ms = max(1, round(self.settings.tail_block_s * 1000))
        timeout = self.settings.tail_block_s + self.settings.op_timeout_s
        with self._guard("tail"), trio.fail_after(timeout):
            async with self._client.pipeline(transaction=False, timeout=timeout) as p:
                read = p.create_request(b"XREAD", b"COUNT", count, b"BLOCK", block_ms, b"STREAMS", self._stream,
                                        f"{position}-0", callback=_raw_reply)
                meta = p.hmget(self._meta, ["epoch", "floor", "seq"])  # runs after XREAD returned
            found = await read
            raw_epoch, raw_floor, raw_seq = await meta
        self._tail_reads += 1
        entries = found.get(self._stream.encode(), ()) if found else ()
        return [_message(e) for e in entries], _text(raw_epoch), _int(raw_floor), _int(raw_seq)

    # ---- retention ------------------------------------------------------------------

    async def trim(self, max_messages: int = 0, max_age_s: float = 0.0, *, now_ms: int | None = None) -> Trimmed:
        """Delete the oldest entries beyond ``max_messages`` and older than ``max_age_s`` (0 = no limit).

        At most ``trim_max_delete`` entries per call; ``more`` says another call
        is due. ``now_ms`` replaces the server clock (Unix ms) for the age limit.
        The de-duplication index is trimmed to the new floor in the same script.
        """
        args: list[str | bytes | int] = [max_messages, round(max_age_s * 1000), now_ms or 0,
                                         self.settings.trim_max_delete, self.epoch]
        with self._guard("trim"), trio.fail_after(self.settings.op_timeout_s):
            deleted, floor, more = await _TRIM(self._client, self._log_keys, args)
        if deleted:
            log.info("redis log %s: retention deleted %d entries, floor now %d", self._stream, deleted, floor)
        return Trimmed(int(deleted), int(floor), bool(more))

    async def apply_retention(self, max_messages: int = 0, max_age_s: float = 0.0) -> int:
        """:meth:`trim` until nothing more is due; returns how many entries went.

        Any node may run it, at any time, beside the others: each call is one
        atomic script, and a call with nothing to delete costs a few reads.
        """
        deleted = 0
        while True:
            trimmed = await self.trim(max_messages, max_age_s)
            deleted += trimmed.deleted
            if not trimmed.more:
                return deleted
            await trio.lowlevel.checkpoint()

    async def durability(self) -> Durability | None:
        """Redis's persistence and eviction settings (``CONFIG GET``); None where CONFIG is not allowed."""
        try:
            with _errors("config get"), trio.fail_after(self.settings.op_timeout_s):
                async with self._client.pipeline(transaction=False) as p:
                    replies = [p.config_get([name]) for name in ("appendonly", "appendfsync", "maxmemory-policy")]
                values = [next(iter((await r).values()), b"") for r in replies]
        except RedisUnavailable:
            raise
        except RedisLogError as exc:  # e.g. CONFIG renamed or forbidden (managed Redis)
            log.debug("redis log: no CONFIG GET: %s", exc)
            return None
        appendonly, appendfsync, policy = (_text(v) for v in values)
        return Durability(appendonly == "yes", appendfsync, policy)

    # ---- nodes ------------------------------------------------------------------------

    async def heartbeat(self, node_name: str, info: Mapping[str, Any], ttl_s: float) -> None:
        """Say this node is alive for ``ttl_s`` more seconds, with ``info`` (JSON: connections, subscriptions…)."""
        body = json.dumps(dict(info), separators=(",", ":"))
        with self._guard("heartbeat"), trio.fail_after(self.settings.op_timeout_s):
            await _HEARTBEAT(self._client, self._node_keys, [node_name, body, max(1, round(ttl_s * 1000))])

    async def live_nodes(self, limit: int = 1000) -> list[NodeInfo]:
        """Every node whose last heartbeat has not expired (server clock), by name."""
        with self._guard("live nodes"), trio.fail_after(self.settings.op_timeout_s):
            reply = await _LIVE_NODES(self._client, self._node_keys, [limit])
        nodes = []
        for i in range(1, len(reply), 2):
            obj = json.loads(reply[i + 1])
            nodes.append(NodeInfo(_text(reply[i]), obj["info"], obj["last_seen_ms"] / 1000, obj["expires_ms"] / 1000))
        return sorted(nodes, key=lambda n: n.name)

    async def forget_node(self, node_name: str) -> None:
        """Remove a node at once (a clean shutdown), instead of waiting for its heartbeat to expire."""
        nodes, expiry = self._node_keys
        with self._guard("forget node"), trio.fail_after(self.settings.op_timeout_s):
            async with self._client.pipeline(transaction=True) as p:
                p.hdel(nodes, [node_name])
                p.zrem(expiry, [node_name])

    def statistics(self) -> RedisLogStatistics:
        return RedisLogStatistics(self.epoch, self.last_seq, self._appended, self._duplicates, self._append_calls,
                                  self._pending_messages, self._tail_reads, self._errors, self._last_error)


class LogTail:
    """Reads committed messages after a position, in seq order (``RedisLog.tail``).

    ``await read()`` (or ``async for batch in tail``) returns the next
    :class:`TailBatch` as soon as there is one, waiting in ``XREAD BLOCK``
    rounds of ``tail_block_s``. Every read also checks the epoch this tail was
    made under and the retention floor:

    * a gap (entries deleted by retention before this tail read them) comes as
      ``batch.gap``, with the messages after it;
    * a changed or lost log raises :class:`EpochChanged`, one that went back
      below this tail's position :class:`LogRewound` (a kind of it);
    * a lost connection raises :class:`RedisUnavailable`. The tail keeps its
      ``position``: calling ``read()`` again later resumes without a gap or a
      duplicate.
    """

    def __init__(self, redis_log: RedisLog, after: int, count: int) -> None:
        self._log = redis_log
        self.position = after
        self.epoch = redis_log.epoch
        self._count = count

    def __aiter__(self) -> LogTail:
        return self

    async def __anext__(self) -> TailBatch:
        return await self.read()

    async def read(self) -> TailBatch:
        while True:
            position = self.position
            messages, epoch, floor, counter = await self._log._tail_read(position, self._count)
            if epoch != self.epoch:
                raise EpochChanged(self.epoch, epoch or None)
            if counter < position:
                raise LogRewound(epoch, counter, position)
            gap = None
            if messages:
                first = messages[0].seq
                if first > position + 1 and floor > position:
                    gap = Gap(position + 1, min(floor, first - 1))
                self.position = messages[-1].seq
            elif floor > position:
                gap = Gap(position + 1, floor)
                self.position = floor
            if messages or gap:
                self._log._saw(self.position)
                return TailBatch(messages, gap, self.position)


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


@contextlib.asynccontextmanager
async def open_redis_log(settings: RedisSettings, *, seq_floor: int = 0) -> AsyncIterator[RedisLog]:
    """Connect, adopt (or create) the log, and close the connections on exit.

    Resource handling: the coredis client's connections live in a task group
    inside this context (structured: nothing outlives it). Error handling: an
    unreachable Redis raises :class:`RedisUnavailable` here; inside, each call
    raises on its own and the connection pool reconnects on the next call.
    """
    client = _client(settings)
    try:
        async with client:
            redis_log = RedisLog(client, settings)
            await redis_log.reopen(seq_floor)
            durability = await redis_log.durability()
            for warning in durability.warnings if durability else ():
                log.warning("redis log %s: %s", settings.url.rpartition("@")[2], warning)
            yield redis_log
    except BaseExceptionGroup as group:
        _raise_single(group, "redis log")
        raise


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


# ---- ingress: a stream read through a consumer group ------------------------------------------

_ENTRY_FIELDS = frozenset({"type", "payload", "message_id", "metadata", "timestamp"})
_MAX_MESSAGE_ID = 255


def _loads(value: str, what: str) -> Any:
    try:
        return json.loads(value)
    except ValueError as exc:
        raise BadMessage(f"{what} is not JSON: {exc}") from None


def envelope_from_entry(fields: Mapping[str, str], default_message_id: str) -> Envelope:
    """Turn one ingest stream entry into an envelope (DESIGN §5). Raises BadMessage.

    An entry carries ``envelope`` (an envelope as JSON; ``message_id`` may stand
    beside it), or ``type`` + ``payload`` (JSON) with optional ``message_id``,
    ``metadata`` (a JSON object) and ``timestamp``. Any other field is an error
    (a misspelt ``paylaod`` must not pass unnoticed). Without a ``message_id``
    the entry's own id is used (``default_message_id``), so an entry delivered
    twice is stored once.
    """
    if "envelope" in fields:
        extra = set(fields) - {"envelope", "message_id"}
        if extra:
            raise BadMessage(f"an entry with envelope takes only message_id beside it, not {', '.join(sorted(extra))}")
        obj = _loads(fields["envelope"], "envelope")
        if not isinstance(obj, dict):
            raise BadMessage("envelope must be a JSON object")
        if obj.get("message_id") is None:
            obj = {**obj, "message_id": fields.get("message_id") or default_message_id}
        return Envelope.from_wire(obj)
    unknown = set(fields) - _ENTRY_FIELDS
    if unknown:
        raise BadMessage(f"unknown entry fields {', '.join(sorted(unknown))} (an entry has envelope, "
                         f"or type and payload with optional message_id, metadata, timestamp)")
    if "type" not in fields:
        raise BadMessage("an entry needs envelope, or type and payload")
    payload = _loads(fields["payload"], "payload") if "payload" in fields else None
    metadata = _loads(fields["metadata"], "metadata") if "metadata" in fields else None
    return Envelope.from_fields(fields["type"], payload, metadata, fields.get("message_id") or default_message_id,
                                fields.get("timestamp"))


def _entry_message_id(stream: str, entry_id: str) -> str:
    name = f"{stream}/{entry_id}"
    if len(name) > _MAX_MESSAGE_ID:
        name = f"{hashlib.sha1(stream.encode()).hexdigest()}/{entry_id}"
    return name


@attrs.frozen
class IngressStatistics:
    stream: str
    group: str
    consumer: str
    read: int
    claimed: int
    acked: int
    rejected: int


@attrs.frozen
class IngressEntry:
    """One entry of the ingest stream: its id, its fields, and the envelope or why there is none."""

    entry_id: str
    fields: dict[str, str]
    envelope: Envelope | None
    error: str | None


class RedisIngress:
    """Reads ``ingest_stream`` through a consumer group; acknowledges only what the caller says.

    ``await read()`` returns the next non-empty list of :class:`IngressEntry`:
    first this consumer's own pending entries (delivered before a crash or a
    lost connection, not acknowledged), then, every ``claim_interval_s``,
    entries that another consumer has held for ``claim_idle_s`` without
    acknowledging (a dead node's, ``XAUTOCLAIM``), then new ones (``XREADGROUP
    >`` with ``BLOCK``). Nothing is acknowledged by reading:

    * :meth:`ack` after the entries are committed (``XACK``);
    * :meth:`reject` for entries that cannot be taken (``entry.error`` is set, or
      the caller refused them): a copy with the reason goes to the dead-letter
      stream (bounded, ``MAXLEN ~ dead_max``), then the entry is acknowledged.

    ``XAUTOCLAIM`` takes any entry pending longer than ``claim_idle_s``, this
    consumer's own included: an entry read but neither acknowledged nor
    rejected for that long comes again. Entries are delivered at least once;
    since the envelope of an entry without ``message_id`` gets the entry's id
    as one, the log stores each once. After :class:`RedisUnavailable` (in a
    read, an ack or a reject) the next ``read()`` starts again with the own
    pending entries: what was read but not acknowledged comes back.
    """

    def __init__(self, redis_log: RedisLog, stream: str, *, group: str = "aivad", consumer: str,
                 count: int = 100, block_s: float = 1.0, claim_idle_s: float = 60.0, claim_interval_s: float = 10.0,
                 dead_stream: str | None = None, dead_max: int = 10_000, start_id: str = "0") -> None:
        if count < 1 or dead_max < 1:
            raise ValueError("count and dead_max must be >= 1")
        self._log = redis_log
        self._client = redis_log.client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.dead_stream = dead_stream or redis_log.settings.key("ingest-dead")
        self._count = count
        self._block_ms = max(1, round(block_s * 1000))
        self._claim_idle_ms = max(1, round(claim_idle_s * 1000))
        self._claim_interval_s = claim_interval_s
        self._dead_max = dead_max
        self._start_id = start_id
        self._op_timeout_s = redis_log.settings.op_timeout_s
        #: reading this consumer's own pending entries after this id; None: done, read new ones
        self._pending_from: str | None = "0"
        self._claim_from = "0-0"
        self._claim_due = trio.current_time()
        self._group_ready = False
        self.read_entries = 0
        self.claimed = 0
        self.acked = 0
        self.rejected = 0

    def __aiter__(self) -> RedisIngress:
        return self

    async def __anext__(self) -> list[IngressEntry]:
        return await self.read()

    async def ensure_group(self) -> None:
        """Create the stream and the group (from ``start_id``) unless they exist."""
        with (_errors("create ingest group"), trio.fail_after(self._op_timeout_s),
              contextlib.suppress(coredis.exceptions.StreamDuplicateConsumerGroupError)):  # BUSYGROUP
            await self._client.xgroup_create(self.stream, self.group, self._start_id, mkstream=True)
        self._group_ready = True

    async def read(self) -> list[IngressEntry]:
        try:
            while True:
                if not self._group_ready:
                    await self.ensure_group()
                try:
                    entries = await self._read_once()
                except coredis.exceptions.StreamConsumerGroupError:  # NOGROUP
                    log.warning("redis ingress %s: group %s is gone (Redis lost it?); creating it again",
                                self.stream, self.group)
                    self._group_ready = False
                    self._pending_from = "0"
                    continue
                if entries:
                    self.read_entries += len(entries)
                    return entries
        except _CLIENT_ERRORS as exc:
            self._pending_from = "0"
            translated = _translate(exc, f"ingress {self.stream}")
            assert translated is not None
            raise translated from exc
        except RedisLogError:
            self._pending_from = "0"
            raise

    async def _read_once(self) -> list[IngressEntry]:
        # Raw replies: coredis's typed XREADGROUP reply fails on a pending entry whose fields are
        # nil (deleted from the stream while pending) — exactly what this must survive.
        stream = self.stream
        if self._pending_from is not None:
            with trio.fail_after(self._op_timeout_s):
                found = await self._client.create_request(
                    b"XREADGROUP", b"GROUP", self.group, self.consumer, b"COUNT", self._count,
                    b"STREAMS", stream, self._pending_from, callback=_raw_reply)
            raw = found.get(stream.encode(), ()) if found else ()
            if not raw:
                self._pending_from = None
                return []
            self._pending_from = _text(raw[-1][0])
            return await self._entries(raw)
        now = trio.current_time()
        if now >= self._claim_due:
            with trio.fail_after(self._op_timeout_s):
                next_from, claimed, *_ = await self._client.create_request(
                    b"XAUTOCLAIM", stream, self.group, self.consumer, self._claim_idle_ms, self._claim_from,
                    b"COUNT", self._count, callback=_raw_reply)
            self._claim_from = _text(next_from)
            if self._claim_from == "0-0":
                self._claim_due = now + self._claim_interval_s
            if claimed:
                self.claimed += len(claimed)
                log.info("redis ingress %s: claimed %d entries idle for %.1fs or more", stream, len(claimed),
                         self._claim_idle_ms / 1000)
                return await self._entries(claimed)
        timeout = self._block_ms / 1000 + self._op_timeout_s
        with trio.fail_after(timeout):
            found = await self._client.create_request(
                b"XREADGROUP", b"GROUP", self.group, self.consumer, b"COUNT", self._count, b"BLOCK", self._block_ms,
                b"STREAMS", stream, b">", callback=_raw_reply)
        return await self._entries(found.get(stream.encode(), ()) if found else ())

    async def _entries(self, raw: Sequence[Any]) -> list[IngressEntry]:
        entries = []
        deleted = []
        for ident, flat in raw:
            entry_id = _text(ident)
            if flat is None:  # deleted from the stream while pending: nothing to take
                deleted.append(entry_id)
                continue
            pairs = zip(flat[::2], flat[1::2], strict=True)
            try:
                fields = {k.decode(): v.decode() for k, v in pairs}
            except UnicodeDecodeError:
                fields = {k.decode(errors="replace"): v.decode(errors="replace")
                          for k, v in zip(flat[::2], flat[1::2], strict=True)}
                entries.append(IngressEntry(entry_id, fields, None, "entry is not UTF-8"))
                continue
            try:
                envelope = envelope_from_entry(fields, _entry_message_id(self.stream, entry_id))
            except BadMessage as exc:
                entries.append(IngressEntry(entry_id, fields, None, str(exc)))
            else:
                entries.append(IngressEntry(entry_id, fields, envelope, None))
        if deleted:
            with trio.fail_after(self._op_timeout_s):
                await self._client.xack(self.stream, self.group, deleted)
            log.info("redis ingress %s: acknowledged %d pending entries deleted from the stream", self.stream,
                     len(deleted))
        return entries

    async def ack(self, entries: Sequence[IngressEntry | str]) -> int:
        """Acknowledge entries (after their commit); returns how many were still pending."""
        ids = [e if isinstance(e, str) else e.entry_id for e in entries]
        if not ids:
            return 0
        try:
            with _errors(f"ack {self.stream}"), trio.fail_after(self._op_timeout_s):
                n = await self._client.xack(self.stream, self.group, ids)
        except RedisLogError:
            self._pending_from = "0"  # what stayed pending comes again with the next read
            raise
        self.acked += n
        return n

    async def reject(self, entries: Sequence[tuple[IngressEntry, str]]) -> None:
        """Dead-letter entries with their reasons, then acknowledge them.

        The copy goes to ``dead_stream`` first (fields ``stream``, ``entry_id``,
        ``reason``, ``fields`` as JSON), then the XACK, in one pipeline: a crash in
        between leaves the entry pending, so it is dead-lettered again (a second
        copy), never lost. (Not one MULTI: on a Redis Cluster the two streams live
        in different slots.)
        """
        if not entries:
            return
        try:
            await self._reject(entries)
        except RedisLogError:
            self._pending_from = "0"
            raise
        self.rejected += len(entries)
        for entry, reason in entries:
            log.warning("redis ingress %s: dead-lettered entry %s: %s", self.stream, entry.entry_id, reason)

    def statistics(self) -> IngressStatistics:
        return IngressStatistics(self.stream, self.group, self.consumer, self.read_entries, self.claimed, self.acked,
                                 self.rejected)

    async def _reject(self, entries: Sequence[tuple[IngressEntry, str]]) -> None:
        with _errors(f"dead-letter {self.stream}"), trio.fail_after(self._op_timeout_s):
            async with self._client.pipeline(transaction=False) as p:
                for entry, reason in entries:
                    p.xadd(self.dead_stream, {"stream": self.stream, "entry_id": entry.entry_id,
                                              "reason": reason[:1000], "fields": json.dumps(entry.fields)},
                           trim_strategy=coredis.PureToken.MAXLEN, threshold=self._dead_max,
                           trim_operator=coredis.PureToken.APPROXIMATELY)
                p.xack(self.stream, self.group, [e.entry_id for e, _ in entries])


# ---- ingress: pub/sub channels (at most once) ----------------------------------------------------


def envelope_from_channel(channel: str, data: str) -> Envelope:
    """A message published on a channel: the channel is the type, the data (JSON) the payload. Raises BadMessage.

    Data that is a JSON object of envelope fields with ``type`` is taken as an
    envelope (as the AMQP ingress does); data that is not JSON is a string payload.
    """
    try:
        obj = json.loads(data)
    except ValueError:
        obj = data
    if isinstance(obj, dict) and "type" in obj and obj.keys() <= {"message_id", "timestamp", "type", "payload",
                                                                   "metadata", "seq"}:
        return Envelope.from_wire(obj)
    return Envelope.from_fields(channel, obj)


class ChannelIngress:
    """Envelopes from ``PSUBSCRIBE`` patterns, at most once; made by :func:`open_channel_ingress`.

    Async iterator of envelopes. Messages that arrive while ``buffer`` are
    waiting, or that are not valid, are dropped and counted (``dropped``,
    ``invalid``): Redis pub/sub keeps nothing for a slow or absent reader anyway.
    """

    def __init__(self, buffer: int) -> None:
        self._send, self._receive = trio.open_memory_channel[Envelope](buffer)
        self.received = 0
        self.dropped = 0
        self.invalid = 0

    def _on_message(self, message: Mapping[str, Any]) -> None:
        # runs in coredis's reader task: never blocks, so its own buffer never grows
        self.received += 1
        try:
            env = envelope_from_channel(_text(message["channel"]), _text(message["data"]))
        except (BadMessage, UnicodeDecodeError) as exc:
            self.invalid += 1
            log.debug("redis channel %r: dropped an invalid message: %s", message.get("channel"), exc)
            return
        try:
            self._send.send_nowait(env)
        except trio.WouldBlock:
            self.dropped += 1

    def __aiter__(self) -> ChannelIngress:
        return self

    async def __anext__(self) -> Envelope:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def receive_batch(self, most: int) -> list[Envelope]:
        """Wait for one envelope, then take what else is waiting, up to ``most``."""
        batch = [await self._receive.receive()]
        while len(batch) < most:
            try:
                batch.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        return batch


@contextlib.asynccontextmanager
async def open_channel_ingress(redis_log: RedisLog, patterns: Sequence[str], *, buffer: int = 1000
                               ) -> AsyncIterator[ChannelIngress]:
    """Subscribe to channel patterns (``PSUBSCRIBE``) for as long as the context is open.

    Error handling: a lost connection ends the context with :class:`RedisUnavailable`
    (no silent resubscribe: the caller's supervise loop opens it again and
    counts the outage; what was published meanwhile is gone, as pub/sub goes).
    """
    ingress = ChannelIngress(buffer)
    handlers = {p: ingress._on_message for p in patterns}
    try:
        async with redis_log.client.pubsub(pattern_handlers=handlers, retry_policy=None,  # type: ignore[arg-type]
                                           ignore_subscribe_messages=True):
            yield ingress
    except BaseExceptionGroup as group:
        _raise_single(group, "channel ingress")
        raise
    except _CLIENT_ERRORS as exc:
        raise _translate(exc, "channel ingress") or RedisUnavailable(str(exc)) from exc


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
