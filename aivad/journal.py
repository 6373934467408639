"""A cluster node's journal: what the node itself commits to its embedded store, forwarded into the cluster's log.

With ``[redis] enabled`` the history is the cluster's Redis log, but some
writers keep their own transactions in the node's SQLite store: the AMQP
bridge commits a delivery together with its bookkeeping before it acks, the
alerts write ``system.*`` events. Each of those commits is the node's
promise; the journal keeps it cluster-wide — an outbox:

* after every local commit the forwarder reads what follows its cursor and
  appends it to the cluster log, ``message_id`` kept, so the log's
  de-duplication makes a repeated forward (after a crash or a lost answer)
  harmless;
* the cursor (the local seq forwarded through) is written to the store only
  after Redis answered, so a node that dies or loses Redis forwards the rest
  when it runs again — at least once into the log, once in it;
* the local store keeps its own retention: a journal that fell further behind
  than that reports the gap (log line and alert) instead of hiding it.

Subscribers on every node then see those events in the log's order, like any
other message; the local copies are never routed. ``task.*`` events are not
forwarded: in a cluster they are born in the log (aivad.cluster_tasks appends
them in the step that changes the task) and copied into the store only for the
AMQP bridge's outbox.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable
from typing import NoReturn

import trio

from .cluster import ClusterLog
from .envelope import Envelope
from .protocol import OpError
from .store import Store, StoreClosed, StoredMessage

__all__ = ["Journal", "serve_journal"]

log = logging.getLogger(__name__)

#: the key of the forwarder's cursor in the store's ``info`` table
CURSOR_KEY = "cluster_journal_seq"
#: messages per forward; the log group-commits them in one script call
BATCH = 500
#: the wait before trying again after the log refused a forward (doubles up to the maximum)
_RETRY_S = (0.2, 10.0)


def _read_cursor(conn: sqlite3.Connection) -> int | None:
    row = conn.execute("SELECT value FROM info WHERE key = ?", (CURSOR_KEY,)).fetchone()
    return None if row is None else int(row[0])


def _write_cursor(conn: sqlite3.Connection, seq: int) -> None:
    conn.execute("INSERT INTO info (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                 (CURSOR_KEY, str(seq)))


class Journal:
    """Forwards the local store's commits into the cluster log; made and run by :func:`serve_journal`."""

    def __init__(self, store: Store, cluster: ClusterLog, cursor: int, on_gap: Callable[[str], None]) -> None:
        self._store = store
        self._cluster = cluster
        #: the local seq forwarded through (committed in the store once Redis answered)
        self.cursor = cursor
        self._on_gap = on_gap
        self._wake = trio.Event()
        self._moved = trio.Event()
        self.forwarded = 0

    def committed(self, messages: list[StoredMessage]) -> None:
        """The store's after-commit hook: there is something to forward."""
        if messages:
            self._wake.set()

    async def forwarded_through(self, seq: int) -> None:
        """Return once the local commits through ``seq`` are in the cluster log.

        What an edge that commits to the local store (the AMQP bridge) awaits before it
        acknowledges: its producer's message is then in the history every node serves,
        and a node that dies after the ack loses nothing of it.
        """
        while self.cursor < seq:
            await self._moved.wait()

    def statistics(self) -> dict[str, int]:
        """``status`` → ``cluster.journal``: the cursor, what waits (local messages not yet in the log), what went."""
        return {"cursor": self.cursor, "behind": max(0, self._store.last_seq - self.cursor),
                "forwarded": self.forwarded}

    async def run(self) -> NoReturn:
        delay = _RETRY_S[0]
        while True:
            if self._store.last_seq <= self.cursor:
                self._wake = trio.Event()
                if self._store.last_seq <= self.cursor:
                    await self._wake.wait()
                continue
            try:
                await self._forward_next()
            except StoreClosed:  # draining: the log takes no more; the rest waits in the store for the next start
                log.info("journal: draining, %d local messages wait for the next start", self.statistics()["behind"])
                await trio.sleep_forever()
            except OpError as exc:  # the log is unreachable or overloaded: the rest waits in the store
                log.warning("journal: forwarding after local seq %d waits: %s", self.cursor, exc.message)
                await trio.sleep(delay)
                delay = min(delay * 2, _RETRY_S[1])
                continue
            delay = _RETRY_S[0]

    async def _forward_next(self) -> None:
        found = await self._store.history("#", self.cursor, BATCH)
        if found.retention_floor > self.cursor:
            why = (f"local retention deleted seq {self.cursor + 1}..{found.retention_floor} before they reached "
                   "the cluster log")
            log.error("journal: %s", why)
            self._on_gap(why)
        through = max(found.scanned_through, found.retention_floor)
        envelopes = [Envelope.from_wire(_without_seq(m.json)) for m in found.messages
                     if not m.type.startswith("task.")]
        if envelopes:
            await (await self._cluster.submit_append(envelopes)).wait()
            self.forwarded += len(envelopes)
        if found.messages:
            through = found.messages[-1].seq if len(found.messages) == BATCH else through
        await (await self._store.submit(lambda conn, _: _write_cursor(conn, through))).wait()
        self.cursor = through
        self._moved.set()
        self._moved = trio.Event()


def _without_seq(text: str) -> object:
    """A stored envelope as the log takes it: the log gives it its own seq."""
    obj = json.loads(text)
    obj.pop("seq", None)
    return obj


async def serve_journal(
    store: Store,
    cluster: ClusterLog,
    on_gap: Callable[[str], None],
    *,
    task_status: trio.TaskStatus[Journal] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Forward the store's commits into the cluster log until cancelled.

    A store that never had a journal starts at its newest seq: what a node
    committed while it was not a cluster member stays local (its history before
    joining), the rest is forwarded from there on.
    """
    cursor = await store.read(_read_cursor)
    if cursor is None:
        cursor = store.last_seq
        await (await store.submit(lambda conn, _: _write_cursor(conn, store.last_seq))).wait()
    journal = Journal(store, cluster, cursor, on_gap)
    store.on_commit(journal.committed)
    task_status.started(journal)
    await journal.run()
