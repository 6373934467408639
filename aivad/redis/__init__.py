"""EDGE: Redis (DESIGN §5) — the only package that imports the Redis client.

The client is **coredis**, which runs natively on anyio and therefore on trio:
no asyncio loop, no thread, no bridge. It was chosen by measurement over
redis-py on its own asyncio loop in a thread (``bench/redis_clients.py``,
docs/architecture.md "Redis client").

* :mod:`.client` — settings, connections, the errors callers see, scripts, supervision;
* :mod:`.lua` — every Lua script (each one atomic step in Redis);
* :mod:`.log` — the cluster log: append (one seq, de-duplication), history, tail, retention, node heartbeats;
* :mod:`.tasks` — the task book (one CAS script per change, with its events in the log) and dead letters;
* :mod:`.ingress` — Redis ingress: a stream through a consumer group, pub/sub channels.

Every key is ``<prefix>{log}:<name>`` (one hash slot), so a script may touch
any of the log's keys in one atomic step.
"""

from .client import (
    EpochChanged,
    LogRewound,
    RedisLogError,
    RedisOverloaded,
    RedisSettings,
    RedisUnavailable,
    run_with_backoff,
)
from .ingress import (
    ChannelIngress,
    IngressEntry,
    IngressStatistics,
    RedisIngress,
    envelope_from_channel,
    envelope_from_entry,
    open_channel_ingress,
)
from .log import (
    Durability,
    Gap,
    LogHistory,
    LogInfo,
    LogTail,
    NodeInfo,
    RedisLog,
    RedisLogStatistics,
    TailBatch,
    Trimmed,
    open_redis_log,
)
from .lua import APPEND_LUA, HEARTBEAT_LUA, LIVE_NODES_LUA, OPEN_LUA, TRIM_LUA
from .tasks import RedisDeadLetters, RedisTaskBook, TaskChange, TaskRecord

__all__ = [
    "APPEND_LUA",
    "HEARTBEAT_LUA",
    "LIVE_NODES_LUA",
    "OPEN_LUA",
    "TRIM_LUA",
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
    "RedisDeadLetters",
    "RedisIngress",
    "RedisLog",
    "RedisLogError",
    "RedisLogStatistics",
    "RedisOverloaded",
    "RedisSettings",
    "RedisTaskBook",
    "RedisUnavailable",
    "TailBatch",
    "TaskChange",
    "TaskRecord",
    "Trimmed",
    "envelope_from_channel",
    "envelope_from_entry",
    "open_channel_ingress",
    "open_redis_log",
    "run_with_backoff",
]
