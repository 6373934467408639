"""EDGE: Redis ingress (DESIGN §5) — producers that already speak Redis publish with ``XADD`` or ``PUBLISH``.

Two wires, two promises:

* ``[redis] ingest_stream`` — **at least once in, once in the history**: every
  node reads the stream through the consumer group ``aivad`` (each node its own
  consumer), so an entry goes to one node. Entries are stored through the
  operations layer in one batch and acknowledged (``XACK``) only after that
  commit answered; an entry a node read but did not acknowledge comes again
  (to that node after a failed commit, to another after ``ingest_claim_idle_s``
  when the node died). The envelope of an entry without ``message_id`` takes
  the entry's id as one, so an entry delivered twice is stored once. A bad entry
  (not JSON, unknown fields, no type, refused by validation) goes to the
  dead-letter table (``kind = "redis"``, with its reason and fields) and is
  acknowledged: one poison entry never blocks the stream.
* ``[redis] ingest_channels`` — **at most once**: patterns subscribed with
  ``PSUBSCRIBE``, the channel being the type. What arrives while the node cannot
  store it, or beyond ``ingest_channel_buffer``, is dropped and counted; Redis
  pub/sub keeps nothing anyway.

Whoever can write to Redis is trusted like the control socket (all rights):
Redis itself is the access control here. Counted as ``ingress="redis"``.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from typing import Any, NoReturn

import attrs
import trio

from .auth import EVERYTHING
from .boundary import Faults
from .config import RedisConfig
from .ops import Caller, Operations
from .protocol import OpError
from .redis import ChannelIngress, IngressEntry, RedisIngress, RedisLog, open_channel_ingress, run_with_backoff

__all__ = ["RedisIngest", "serve_redis_ingest"]

log = logging.getLogger(__name__)

#: the ingest counters' label and the caller of every Redis publish
INGRESS = "redis"
CALLER = Caller(EVERYTHING, INGRESS, peer="redis")
#: dead letters of this edge
KIND = "redis"
#: refusals that will not change by trying again: the entry goes to the dead-letter table
_POISON = frozenset({"bad_request", "forbidden", "too_large"})
#: how long a stream batch waits before it is read again after its commit failed (overloaded, Redis lost)
_RETRY_S = 1.0


class RedisIngest:
    """The Redis ingress's state (``status`` → ``redis_ingress``); its loops run in :func:`serve_redis_ingest`."""

    def __init__(self, cfg: RedisConfig, redis_log: RedisLog, ops: Operations, node_name: str) -> None:
        self._cfg = cfg
        self._log = redis_log
        self._ops = ops
        self.stream = RedisIngress(redis_log, cfg.ingest_stream, consumer=node_name, count=cfg.ingest_batch,
                                   claim_idle_s=cfg.ingest_claim_idle_s,
                                   max_entry_bytes=cfg.ingest_max_entry_bytes) if cfg.ingest_stream else None
        self.dead_lettered = 0
        #: the open channel subscription (None while Redis is away), and channel messages stored / refused
        self._channels: ChannelIngress | None = None
        self.channels_stored = 0
        self.channels_refused = 0

    def statistics(self) -> dict[str, Any]:
        channels = None
        if self._cfg.ingest_channels:
            open_ = self._channels
            channels = {"subscribed": open_ is not None, "stored": self.channels_stored,
                        "refused": self.channels_refused,
                        "received": open_.received if open_ else 0, "dropped": open_.dropped if open_ else 0,
                        "invalid": open_.invalid if open_ else 0}
        return {"stream": attrs.asdict(self.stream.statistics()) if self.stream is not None else None,
                "dead_lettered": self.dead_lettered, "channels": channels}

    # ---- the stream: at least once in, acknowledged after commit ---------------------------------

    async def run_stream(self, stream: RedisIngress) -> NoReturn:
        while True:
            entries = await stream.read()
            if not await self._take(stream, entries):
                stream.redeliver()
                await trio.sleep(_RETRY_S)

    async def _take(self, stream: RedisIngress, entries: list[IngressEntry]) -> bool:
        """Store a batch, dead-letter its bad entries, acknowledge what is settled; False: read the rest again."""
        good = [e for e in entries if e.envelope is not None]
        bad = [(e, e.error or "not an envelope") for e in entries if e.envelope is None]
        settled: list[IngressEntry] = []
        waits: OpError | None = None
        if good:
            try:
                results = await (await self._ops.publish_many(CALLER, [e.envelope for e in good if e.envelope])).wait()
            except OpError as exc:  # the whole batch was refused (draining, the log unreachable)
                results = [exc] * len(good)
            for entry, result in zip(good, results, strict=True):
                if not isinstance(result, OpError):
                    settled.append(entry)
                elif result.code in _POISON:
                    bad.append((entry, f"{result.code}: {result.message}"))
                else:
                    waits = result
        for entry, reason in bad:
            try:
                await self._ops.letters.add_dead_letter(KIND, reason, json.dumps(entry.fields),
                                                  {"stream": stream.stream, "entry_id": entry.entry_id})
            except OpError as exc:  # the store fails: the entry stays pending and comes again
                waits = exc
                continue
            settled.append(entry)
            self.dead_lettered += 1
            log.warning("redis ingress %s: dead-lettered entry %s: %s", stream.stream, entry.entry_id, reason[:200])
        await stream.ack(settled)
        if waits is not None:
            log.warning("redis ingress %s: %d entries wait: %s", stream.stream, len(entries) - len(settled),
                        waits.message)
            return False
        return True

    # ---- channels: at most once --------------------------------------------------------------------

    async def run_channels(self) -> None:
        async with open_channel_ingress(self._log, self._cfg.ingest_channels, buffer=self._cfg.ingest_channel_buffer,
                                        max_message_bytes=self._cfg.ingest_max_entry_bytes) as channels:
            log.info("redis ingress: subscribed to channels %s", ", ".join(self._cfg.ingest_channels))
            self._channels = channels
            try:
                while True:
                    batch = await channels.receive_batch(self._cfg.ingest_batch)
                    try:
                        results = await (await self._ops.publish_many(CALLER, batch)).wait()
                    except OpError as exc:
                        results = [exc] * len(batch)
                    stored = sum(1 for r in results if not isinstance(r, OpError))
                    self.channels_stored += stored
                    self.channels_refused += len(batch) - stored
            finally:
                self._channels = None


async def serve_redis_ingest(
    cfg: RedisConfig,
    redis_log: RedisLog,
    ops: Operations,
    node_name: str,
    faults: Faults,
    *,
    task_status: trio.TaskStatus[RedisIngest] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Read the ingest stream and the channels until cancelled; Redis lost is waited out with backoff.

    ``started()`` at once: the node is ready without its ingress (the log's own
    readiness already says whether Redis is reachable). Error handling: a
    failure that is not Redis being away (a script refused, the stream key of
    another type) is not retried — it ends that reader, counted and alerted by
    ``faults``, and the node goes on serving.
    """
    ingest = RedisIngest(cfg, redis_log, ops, node_name)
    async with trio.open_nursery() as nursery:
        if ingest.stream is not None:
            stream = ingest.stream
            nursery.start_soon(faults.isolated, "redis.ingress", stream.stream, run_with_backoff,
                               f"redis ingress {stream.stream}", partial(ingest.run_stream, stream))
        if cfg.ingest_channels:
            nursery.start_soon(faults.isolated, "redis.ingress", "channels", run_with_backoff,
                               "redis channel ingress", ingest.run_channels)
        task_status.started(ingest)
