"""Why the store commits on the trio thread, and why ids are time-ordered: the two effects alone.

Usage::

    python bench/sqlite_writer.py [--tasks 30000] [--per-commit 5]

Both parts replay the dispatcher's writes on the daemon's own schema
(``aivad.store._SCHEMA``, WAL, ``synchronous = NORMAL``): per task a row and its
``task.created`` event, then ``task.dispatched`` and ``task.completed`` (an
update and an event each), interleaved the way a busy daemon commits them,
``--per-commit`` writes per transaction. Figures are CPU time per task.

1. **Where the writer runs.** The same writes run (a) in the calling thread and
   (b) in a thread of their own while the calling thread runs Python code, as
   the trio thread does at the dispatch peak. ``sqlite3`` releases the GIL
   around every statement, so in (b) each statement hands the GIL to the busy
   thread and waits to get it back: the figure is the writer's CPU (both
   threads' CPU for (b) is larger still). Baseline: (a).
2. **Which ids.** Task ids from ``uuid4`` (random) against ``aivad.envelope.new_id``
   (UUIDv7 layout, ordered by time). Task events' ids begin with the task id, so
   both ``tasks.task_id`` and ``messages.message_id`` follow. Baseline: ``uuid4``.
3. **Pages per task.** What the same writes add to the WAL (each commit appends every page
   it changed; the checkpoint copies them all again), with the daemon's indexes against
   the baseline of an added index of every task's state (``tasks_state``, which the
   schema had until stop 22 and no query read), at ``--per-commit`` writes per commit
   and at one (a daemon whose tasks come one at a time).
4. **Many rows in one statement.** Batches of 500 messages (the AMQP bridge's ingest batches)
   inserted with one ``executemany`` (the baseline: a step, and so a GIL hand-off, per row)
   against the store's own ``_insert_messages`` (multi-row ``INSERT``s of up to 128 rows),
   alone and beside a thread that wants the GIL all the time, as the bridge's asyncio thread
   does while it parses deliveries. Figures are wall time per message (µs/row): the ingest
   rate follows it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aivad.envelope import new_id
from aivad.store import _INSERT_MESSAGE_SQL, _SCHEMA, _insert_messages

BODY = json.dumps({"payload": {"state": "queued", "attempt": 1}, "metadata": {"source": "aivad"}, "pad": "x" * 200})


#: the baseline of part 3: the index of every task's state the schema had before stop 22
STATE_INDEX = "CREATE INDEX IF NOT EXISTS tasks_state ON tasks (state)"


def open_db(path: Path, extra_schema: str = "") -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.executescript(_SCHEMA + ";" + extra_schema)
    return conn


def operations(task_ids: list[str]) -> list[tuple[str, str]]:
    """(kind, task id) in the order a busy daemon writes them: created, then two later dispatched, then ended."""
    ops = []
    for i in range(len(task_ids) + 4):
        for kind, lag in (("created", 0), ("dispatched", 2), ("completed", 4)):
            if 0 <= i - lag < len(task_ids):
                ops.append((kind, task_ids[i - lag]))
    return ops


def write_all(conn: sqlite3.Connection, ops: list[tuple[str, str]], per_commit: int) -> int:
    """Run ``ops``; the pages (WAL frames) their commits wrote. Nothing else reads the database, so
    each checkpoint copies the whole WAL, which then starts over: the frames are the sum of what
    the checkpoints found."""
    checkpoint = sqlite3.connect(conn.execute("PRAGMA database_list").fetchone()[2], isolation_level=None)
    frames = 0
    for start in range(0, len(ops), per_commit):
        conn.execute("BEGIN IMMEDIATE")
        for kind, task_id in ops[start:start + per_commit]:
            now = time.time()
            if kind == "created":
                conn.execute("INSERT INTO tasks (task_id, type, spec, state, created_at, updated_at) "
                             "VALUES (?, 'noop', ?, 'queued', ?, ?)", (task_id, BODY, now, now))
            else:
                conn.execute("UPDATE tasks SET state = ?, attempts = 1, updated_at = ? WHERE task_id = ?",
                             (kind, now, task_id))
            conn.execute("INSERT INTO messages (message_id, type, stored_at, body) VALUES (?, ?, ?, ?)",
                         (f"aivad:{task_id}:task.{kind}:1", f"task.{kind}", now, BODY))
        conn.execute("COMMIT")
        if start // per_commit % 200 == 0:  # the daemon checkpoints beside the writer, once a second
            frames += checkpoint.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
    frames += checkpoint.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
    checkpoint.close()
    return frames


def wal_kb_per_task(task_ids: list[str], per_commit: int, extra_schema: str = "") -> float:
    """KB the WAL grows by per task (pages of 4 KiB and their frame headers). Both sides of a
    comparison take the same ``task_ids``: the B-trees then grow alike, and only the schema differs."""
    ops = operations(task_ids)
    tasks = len(task_ids)
    with tempfile.TemporaryDirectory(prefix="aivad-bench-") as tmp:
        conn = open_db(Path(tmp) / "w.db", extra_schema)
        page_bytes = conn.execute("PRAGMA page_size").fetchone()[0]
        frames = write_all(conn, ops, per_commit)
        conn.close()
    return frames * (page_bytes + 24) / tasks / 1024


def cpu_per_task(make_id: Callable[[], str], tasks: int, per_commit: int, *, busy_neighbour: bool) -> float:
    """µs of the writing thread's CPU per task."""
    ops = operations([make_id() for _ in range(tasks)])
    with tempfile.TemporaryDirectory(prefix="aivad-bench-") as tmp:
        conn = open_db(Path(tmp) / "w.db")
        spent: list[float] = []

        def run() -> None:
            started = time.thread_time()
            write_all(conn, ops, per_commit)
            spent.append(time.thread_time() - started)

        if not busy_neighbour:
            run()
        else:
            stop = threading.Event()
            writer = threading.Thread(target=lambda: (run(), stop.set()))
            writer.start()
            while not stop.is_set():  # the trio thread at the dispatch peak: Python code between system calls
                sum(range(1000))
                time.sleep(0)  # a system call (a socket send, epoll): the GIL is let go
            writer.join()
        conn.close()
    return spent[0] / tasks * 1e6


def wall_per_row(insert: Callable[[sqlite3.Connection, list[Any]], None], rows: int, *, busy_neighbour: bool) -> float:
    """µs of wall time per message row, inserted 500 to a transaction (a fresh database each call)."""
    batch = 500
    with tempfile.TemporaryDirectory(prefix="aivad-bench-") as tmp:
        conn = open_db(Path(tmp) / "m.db")
        batches = [[(seq, new_id(), "bench.ingest.msg", 0.0, '{"text":"' + "x" * 250 + '"}')
                    for seq in range(start + 1, min(start + batch, rows) + 1)] for start in range(0, rows, batch)]
        stop = threading.Event()

        def neighbour() -> None:  # Python code between short system calls, as the bridge's loop runs
            a, b = socket.socketpair()
            with a, b:
                while not stop.is_set():
                    a.send(b"x" * 100)
                    b.recv(100)
                    sum(range(200))

        thread = threading.Thread(target=neighbour)
        if busy_neighbour:
            thread.start()
        started = time.perf_counter()
        for rows_of_batch in batches:
            conn.execute("BEGIN")
            insert(conn, rows_of_batch)
            conn.execute("COMMIT")
        elapsed = time.perf_counter() - started
        stop.set()
        if busy_neighbour:
            thread.join()
        conn.close()
    return elapsed / rows * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=30000)
    p.add_argument("--per-commit", type=int, default=5, help="writes per transaction")
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} cpus, SQLite {sqlite3.sqlite_version}; {args.tasks} tasks, "
          f"{args.per_commit} writes per commit; CPU µs per task (3 writes)")

    def random_id() -> str:
        return uuid.uuid4().hex

    inline = cpu_per_task(new_id, args.tasks, args.per_commit, busy_neighbour=False)
    threaded = cpu_per_task(new_id, args.tasks, args.per_commit, busy_neighbour=True)
    print(f"1. writer in the calling thread: {inline:7.1f} µs/task (baseline)")
    print(f"   writer in its own thread beside a busy one: {threaded:7.1f} µs/task of the writer's CPU "
          f"({threaded / inline:.1f}x the baseline)")
    random = cpu_per_task(random_id, args.tasks, args.per_commit, busy_neighbour=False)
    print(f"2. uuid4 ids:  {random:7.1f} µs/task (baseline)")
    print(f"   new_id ids: {inline:7.1f} µs/task ({inline / random:.2f}x the baseline)")
    for per_commit in (args.per_commit, 1):
        task_ids = [new_id() for _ in range(args.tasks)]
        before = wal_kb_per_task(task_ids, per_commit, STATE_INDEX)
        after = wal_kb_per_task(task_ids, per_commit)
        print(f"3. WAL per task, {per_commit} write(s) per commit: with an index of every task's state "
              f"{before:6.1f} KB (baseline); the daemon's indexes {after:6.1f} KB ({after / before:.2f}x)")

    def executemany(conn: sqlite3.Connection, rows: list[Any]) -> None:
        conn.executemany(_INSERT_MESSAGE_SQL, rows)  # the baseline: one row per step

    for busy in (False, True):
        where = "beside a busy thread" if busy else "alone"
        baseline = wall_per_row(executemany, args.tasks, busy_neighbour=busy)
        multi = wall_per_row(_insert_messages, args.tasks, busy_neighbour=busy)
        print(f"4. 500 messages per commit, {where}: executemany {baseline:5.1f} µs/row (baseline); "
              f"the store's multi-row INSERTs {multi:5.1f} µs/row ({multi / baseline:.2f}x)")


if __name__ == "__main__":
    main()
