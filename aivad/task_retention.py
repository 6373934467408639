"""Ended tasks on one node: the store keeps the newest ``[tasks] ended_kept`` completed tasks.

Why: every task ever run stayed in the store's ``tasks`` table, so a daemon's
file (and what ``tasks`` lists through) grew with every task without bound — a
peer allowed to dispatch could fill the disk. A cluster's task book in Redis
already drops its oldest ended records beyond the same limit
(:mod:`aivad.redis.tasks`); this is the single node's counterpart.

How, without a cost per task: the dispatcher tells this service of each task it
completes (``on_end``, after the commit), and the service counts them. Once the
count passes the limit by a slack (a hundredth of it, at most 1,000), one task
deletes the oldest completed rows — by rowid, which is creation order — down to
the limit, in chunks of at most :data:`CHUNK` rows, each its own bulk write
(committed in a worker thread, so the writer and the other writes go on between
chunks). A restart counts the completed rows once.

Dead tasks are not counted nor dropped here: one stays while its dead letter does
(``dlq.replay`` queues it again from its row) and goes with a purge
(:meth:`aivad.store.Store.purge_dead_letters`), so the dead-letter queue bounds
them. Unfinished tasks are never dropped.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from typing import Final

import trio

from .dispatcher import TaskView
from .protocol import OpError
from .store import Store, StoreClosed, Write

__all__ = ["CHUNK", "serve_task_retention"]

log = logging.getLogger(__name__)

#: the most rows one write deletes (a bigger trim, after an upgrade or a lowered limit, takes several)
CHUNK: Final = 5000
_COUNT_SQL: Final = "SELECT count(*) FROM tasks WHERE state = 'completed'"
#: the oldest completed tasks: a walk of the table in rowid order that stops after ``?`` of them
_DROP_OLDEST_SQL: Final = (
    "DELETE FROM tasks WHERE rowid IN (SELECT rowid FROM tasks WHERE state = 'completed' ORDER BY rowid LIMIT ?)"
)


def slack(kept: int) -> int:
    """How far past ``kept`` the count may go before a trim: trims are rare and each deletes many rows."""
    return max(1, min(kept // 100, 1000))


class _Completed:
    """The count of completed rows in the store, and the wake-up of the trim when it is too high."""

    def __init__(self, count: int, kept: int) -> None:
        self.count = count
        self.kept = kept
        self.over = trio.Event()

    def ended(self, view: TaskView) -> None:
        if view.state == "completed":
            self.count += 1
            if self.count > self.kept + slack(self.kept):
                self.over.set()

    async def trim(self, store: Store) -> None:
        while (excess := self.count - self.kept) > 0:
            n = min(excess, CHUNK)

            def drop(conn: sqlite3.Connection, _: Write, n: int = n) -> int:
                return conn.execute(_DROP_OLDEST_SQL, (n,)).rowcount

            deleted: int = await (await store.submit(drop, bulk=True)).wait()
            self.count -= deleted
            if deleted < n:  # fewer completed rows than counted (another writer dropped some): count again
                self.count = await store.read(lambda conn: conn.execute(_COUNT_SQL).fetchone()[0])
                break


async def serve_task_retention(
    store: Store,
    on_end: list[Callable[[TaskView], None]],
    kept: int,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Count the completed tasks (once, then from ``on_end``) and trim them to ``kept`` when past the slack.

    Returns when the store closes (the daemon is stopping). Error handling: a failed trim (the
    store failed: its ``failure`` says why) is logged, and the next completed task tries again.
    """
    completed = _Completed(await store.read(lambda conn: conn.execute(_COUNT_SQL).fetchone()[0]), kept)
    on_end.append(completed.ended)
    task_status.started()
    while True:
        if completed.count <= kept + slack(kept):
            await completed.over.wait()
        completed.over = trio.Event()
        try:
            await completed.trim(store)
        except StoreClosed:
            return
        except OpError as exc:
            log.warning("dropping the oldest completed tasks failed: %s", exc.message)
            await completed.over.wait()
