"""The router: committed messages → the bounded queues of matching subscriptions.

``publish`` is synchronous and never awaits a subscriber. It is called by the
store right after each commit, in seq order. Each push frame is serialised once
per (message, pattern, wire format) and the same bytes go to every matching
subscriber; a subscriber whose queue is full is told it overflowed and is
dropped (the WebSocket closes with 4008 and the client resumes from its last
seq — the store is the buffer, not RAM).

``follow`` joins a subscription to the live stream after replaying what it
missed, without a gap or a duplicate: it replays from the store until it has
caught up with ``Store.last_seq`` and then, without awaiting in between,
registers the subscription, so every later commit reaches it live.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, Protocol

import attrs

from .patterns import PatternIndex
from .store import History, StoredMessage

__all__ = ["MessageLog", "Router", "Sink", "Subscription"]

log = logging.getLogger(__name__)

#: builds a connection's wire bytes from (pattern as JSON, envelope as JSON)
Encoder = Callable[[str, str], bytes]


class MessageLog(Protocol):
    """Where the router reads history and hears of commits: the embedded store, or the cluster log.

    ``last_seq`` is the newest seq the router has been handed; it changes only in
    the same synchronous step that calls the ``on_commit`` callbacks, which is
    what lets a replay join the live stream without a gap (``Router.follow``).
    """

    last_seq: int
    retention_floor: int
    epoch: str

    def on_commit(self, callback: Callable[[list[StoredMessage]], None]) -> None: ...

    async def history(self, pattern: str, after: int, limit: int, *, client: bool = False) -> History: ...


class Sink(Protocol):
    """The outbound side of one connection, as the router sees it."""

    @property
    def encode(self) -> Encoder: ...

    def offer(self, frame: bytes) -> bool:
        """Queue ``frame`` without waiting; False when the bounded queue is full."""

    async def put(self, frame: bytes) -> None:
        """Queue ``frame``, waiting for room (replay and replies: backpressure, not overflow)."""

    def overflowed(self) -> None:
        """The queue was full for a live message: close as a slow consumer."""

    def overtaken(self) -> None:
        """Retention deleted messages a replay had not reached yet: close as a slow consumer,
        so the client resumes from its last seq and is told the exact gap."""


class Subscription:
    """One pattern of one connection. ``after``: the newest seq it has been given."""

    __slots__ = ("after", "live", "pattern", "pattern_json", "sink")

    def __init__(self, sink: Sink, pattern: str) -> None:
        self.sink = sink
        self.pattern = pattern
        self.pattern_json = json.dumps(pattern)
        self.after = 0
        self.live = False


@attrs.frozen
class Resume:
    """How a subscription with ``since`` (and ``epoch``) relates to what the store still has."""

    last_seq: int
    recovered: bool
    gap: tuple[int, int] | None
    #: where the replay starts (its first message has a greater seq): after the gap the
    #: client was told of, so a later deletion shows up as one, never as a silent skip
    replay_after: int
    epoch: str = ""
    #: the client's ``epoch`` is not this history's: its ``since`` means nothing here
    epoch_changed: bool = False

    def reply_fields(self, pattern: str) -> dict[str, Any]:
        """The fields of a subscribe (or tail) reply, DESIGN §4.3."""
        fields: dict[str, Any] = {
            "pattern": pattern,
            "last_seq": self.last_seq,
            "epoch": self.epoch,
            "recovered": self.recovered,
        }
        if self.gap is not None:
            fields["gap"] = list(self.gap)
        if self.epoch_changed:
            fields["epoch_changed"] = True
        return fields


@attrs.frozen
class RouterStatistics:
    subscriptions: int
    deliveries: int
    overflows: int


class Router:
    def __init__(self, store: MessageLog, replay_batch: int) -> None:
        self._store = store
        self._index: PatternIndex[Subscription] = PatternIndex()
        self.replay_batch = replay_batch
        self._deliveries = 0
        self._overflows = 0
        store.on_commit(self.publish)

    def publish(self, messages: list[StoredMessage]) -> None:
        """Hand committed messages to every live matching subscription. Never awaits."""
        delivered = 0
        overflowed: list[Subscription] = []
        for message in messages:
            seq = message.seq
            frames: dict[tuple[Encoder, str], bytes] = {}
            for pattern, subs in self._index.match(message.type):
                encode: Encoder | None = None  # the wire format of ``frame``: looked up when it changes
                frame = b""
                for sub in subs:
                    if seq <= sub.after or not sub.live:
                        continue  # given by the replay that preceded going live, or overflowed just now
                    sink = sub.sink
                    if sink.encode is not encode:
                        encode = sink.encode
                        built = frames.get((encode, pattern))
                        if built is None:
                            built = frames[encode, pattern] = encode(sub.pattern_json, message.json)
                        frame = built
                    if sink.offer(frame):
                        sub.after = seq
                        delivered += 1
                    else:
                        sub.live = False
                        overflowed.append(sub)
        self._deliveries += delivered
        for sub in overflowed:  # the index is not changed while it is being walked
            self._overflows += 1
            self._index.discard(sub.pattern, sub)
            sub.sink.overflowed()

    def remove(self, sub: Subscription) -> None:
        if sub.live:
            sub.live = False
            self._index.discard(sub.pattern, sub)

    def overtake_all(self, why: str) -> None:
        """What was routed can no longer be trusted (the cluster tail skipped a gap, or the history is
        new): every live subscription ends as overtaken, so its client resumes and is told."""
        for sub in self._index.subscribers():  # (a list: removing them does not disturb the walk)
            self.remove(sub)
            sub.sink.overtaken()
        log.warning("ended every live subscription: %s", why)

    def resume_point(self, since: int | None, epoch: str | None = None) -> Resume:
        """Where a subscription starting now begins, and what retention lost of its range.

        DESIGN §4.3: an ``epoch`` other than this history's, or a ``since`` above
        the newest seq (the history the client knew is gone), cannot be trusted:
        ``recovered`` is false and the replay starts at the oldest message kept.
        """
        last_seq, floor, current = self._store.last_seq, self._store.retention_floor, self._store.epoch
        if epoch is not None and epoch != current:
            return Resume(last_seq, False, None, floor, current, epoch_changed=True)
        if since is None:
            return Resume(last_seq, True, None, last_seq, current)
        if since > last_seq:
            return Resume(last_seq, False, None, floor, current)
        if since < floor:
            return Resume(last_seq, False, (since + 1, floor), floor, current)
        return Resume(last_seq, True, None, since, current)

    async def follow(self, sub: Subscription, after: int) -> None:
        """Replay what ``sub`` missed after seq ``after``, then make it live.

        ``after`` is :attr:`Resume.replay_after` of the reply the client got: its
        ``since``, the end of the gap it was told of, or the ``last_seq`` it was
        told when it subscribed without one (anything committed since then is
        replayed too, so the first live message follows ``last_seq`` without a gap).
        Replay frames go through ``sink.put`` (the client's reading pace decides);
        there is no cap on the depth of the replay. If retention deletes
        messages the replay has not reached, the sink is told (``overtaken``)
        and the subscription ends: going on would skip them without a word.
        """
        sub.after = after
        while sub.after < self._store.last_seq:
            history = await self._store.history(sub.pattern, sub.after, self.replay_batch)
            if history.retention_floor > sub.after:
                log.warning("retention overtook the replay of %r at seq %d", sub.pattern, sub.after)
                sub.sink.overtaken()
                return
            for message in history.messages:
                await sub.sink.put(sub.sink.encode(sub.pattern_json, message.json))
                sub.after = message.seq
            if len(history.messages) < self.replay_batch:
                sub.after = max(sub.after, history.scanned_through)
        # caught up with everything the router has been handed: from here on, live
        sub.live = True
        self._index.add(sub.pattern, sub)

    def statistics(self) -> RouterStatistics:
        return RouterStatistics(len(self._index), self._deliveries, self._overflows)
