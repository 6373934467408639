"""The store against a real SQLite file: seq, duplicates, group commit, history, retention, drain.

``serve_store`` runs in the test's nursery on a database in a temp dir; every
test has a real ``trio.fail_after`` (the writer and readers use real threads).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from aivad.config import StoreConfig
from aivad.envelope import Envelope, pattern_matches
from aivad.router import Router, Subscription
from aivad.store import Appended, Store, StoreClosed, Write, insert_envelopes, serve_store
from tests.conftest import control_async, start_daemon
from tests.wsclient import connect, no_more_messages


def env(type: str, payload: Any = None, message_id: str | None = None) -> Envelope:
    return Envelope.from_fields(type, payload, message_id=message_id)


#: the store options of a test whose :class:`Blocker` holds the writer's own thread
HELD: dict[str, Any] = {"synchronous": "FULL"}


def store_config(directory: Path, **overrides: Any) -> StoreConfig:
    values: dict[str, Any] = {"path": str(directory / "store.db"), "synchronous": "NORMAL",
                              "retention_max_messages": 0, "retention_max_age_s": 0.0}
    values.update(overrides)
    return StoreConfig(**values)


@asynccontextmanager
async def open_store(cfg: StoreConfig) -> AsyncIterator[Store]:
    """A running store; closed (cancelled, like a stopping daemon) on exit."""
    async with trio.open_nursery() as nursery:
        store = await nursery.start(serve_store, cfg)
        yield store
        nursery.cancel_scope.cancel()


async def all_seqs(store: Store, pattern: str = "#") -> list[int]:
    history = await store.history(pattern, 0, 1000)
    return [m.seq for m in history.messages]


class Blocker:
    """A write that holds the writer thread until released, so the next writes queue up as one batch.

    Only ``synchronous = FULL`` has a writer thread to hold (:data:`HELD`); with
    NORMAL the writer runs in the trio thread, which a held write would stop.
    """

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, conn: sqlite3.Connection, write: Write) -> str:
        self.entered.set()
        assert self.release.wait(10)
        return "blocked"

    async def wait_entered(self) -> None:
        while not self.entered.is_set():
            await trio.sleep(0.005)


# ---- the WAL ------------------------------------------------------------------------------


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
async def test_the_wal_starts_over_under_a_steady_stream_of_writes(
    tmp_dir: Path, monkeypatch: pytest.MonkeyPatch, synchronous: str
) -> None:
    """A checkpoint beside a writer that never stops never catches up: the WAL grew without
    bound (2.6 GB in 45 s under bench/dispatch.py, the database 112 MB) until the disk was full.
    Past ``wal_max_bytes`` the writer now lets a checkpoint catch up between two commits."""
    import aivad.store

    monkeypatch.setattr(aivad.store, "_CHECKPOINT_INTERVAL_S", 0.05)
    cfg = store_config(tmp_dir, synchronous=synchronous, wal_max_bytes=1_048_576)
    wal = Path(cfg.path + "-wal")
    payload = "x" * 2000
    written = biggest = 0
    async with open_store(cfg) as store:
        with trio.fail_after(60):
            while written * len(payload) < 128 * 2**20:  # 100 KB per commit, back to back: never idle
                await store.append_many([env("wal.t", {"i": written + i, "pad": payload}) for i in range(50)])
                written += 50
                biggest = max(biggest, os.path.getsize(wal))  # noqa: ASYNC240 - one stat per commit, measured
        # unbounded, the WAL held all 128 MiB; bounded, it holds what comes between two checkpoints
        assert biggest < 32 * 2**20, (biggest, written)
        assert store.statistics().wal_catch_ups > 0
        assert await all_seqs(store, "nothing") == []  # and the store still reads


# ---- seq ------------------------------------------------------------------------------


async def test_a_new_database_takes_the_configured_page_size_and_an_existing_one_keeps_its_own(
    tmp_dir: Path,
) -> None:
    """1 KiB pages by default (each commit rewrites the pages it changed: smaller pages, fewer bytes per
    commit); a file made before with SQLite's 4 KiB pages is opened as it is and serves on."""

    def page_size(path: Path) -> int:
        with sqlite3.connect(path) as conn:
            return int(conn.execute("PRAGMA page_size").fetchone()[0])

    with trio.fail_after(20):
        async with open_store(store_config(tmp_dir)) as store:
            await store.append(env("small.pages"))
        assert page_size(tmp_dir / "store.db") == 1024
        older = tmp_dir / "older"
        older.mkdir()
        async with open_store(store_config(older, page_size=4096)) as store:
            await store.append(env("made.before", 1))
        async with open_store(store_config(older)) as store:
            await store.append(env("made.before", 2))
            assert await all_seqs(store) == [1, 2]
        assert page_size(older / "store.db") == 4096


async def test_seq_strictly_increases_and_is_never_reused(tmp_dir: Path) -> None:
    cfg = store_config(tmp_dir)
    with trio.fail_after(20):
        async with open_store(cfg) as store:
            assert store.last_seq == 0
            first = [await store.append(env("a.b", i)) for i in range(5)]
            assert [a.seq for a in first] == [1, 2, 3, 4, 5]
            assert all(not a.duplicate for a in first)
            batch = await store.append_many([env("a.b", i) for i in range(3)])
            assert [a.seq for a in batch] == [6, 7, 8]
            # retention by age takes everything, including the newest row
            assert await store.apply_retention(0, 1e-9) == 8
            assert await all_seqs(store) == []
            assert store.statistics().stored_messages == 0
            assert (await store.append(env("a.b"))).seq == 9
            assert store.last_seq == 9
            await store.apply_retention(0, 1e-9)
        async with open_store(cfg) as store:  # and across a restart
            assert store.last_seq == 9
            assert store.retention_floor == 9
            assert (await store.append(env("a.b"))).seq == 10
            history = await store.history("#", 0, 10)
            assert [m.seq for m in history.messages] == [10]
            assert history.scanned_through == 10


@pytest.mark.parametrize(("synchronous", "in_trio_thread"), [("NORMAL", True), ("FULL", False)])
async def test_the_writer_runs_in_the_trio_thread_unless_each_commit_syncs(
    tmp_dir: Path, synchronous: str, in_trio_thread: bool
) -> None:
    """NORMAL commits inline (a thread of its own cost a GIL hand-off per statement); FULL keeps
    its fsyncs off the event loop, in the writer's own thread; bulk writes never run inline."""
    trio_thread = threading.current_thread()
    with trio.fail_after(20):
        async with open_store(store_config(tmp_dir, synchronous=synchronous)) as store:
            write = await store.submit(lambda conn, _: threading.current_thread())
            assert (await write.wait() is trio_thread) == in_trio_thread
            # one statement over many rows (retention, a purge) runs without the GIL, off the loop
            bulk = await store.submit(lambda conn, _: threading.current_thread(), bulk=True)
            assert await bulk.wait() is not trio_thread
            assert (await store.append(env("t", 1))).seq == 1


async def test_a_write_lock_held_by_another_process_is_waited_for_off_the_event_loop(tmp_dir: Path) -> None:
    """The inline writer meets a lock it cannot take at once: its batch waits in a worker thread
    while the loop goes on (here: to the line that lets the lock go, which a blocked loop never reaches)."""
    cfg = store_config(tmp_dir)
    with trio.fail_after(20):
        async with open_store(cfg) as store:
            await store.append(env("warm", 0))
            other = sqlite3.connect(cfg.path, isolation_level=None)
            other.execute("BEGIN EXCLUSIVE")
            try:
                appended: list[Appended] = []
                async with trio.open_nursery() as nursery:

                    async def append() -> None:
                        appended.append(await store.append(env("waits", 1)))

                    nursery.start_soon(append)
                    with trio.fail_after(2.5):  # a loop held in SQLite's busy wait comes back after 5 s
                        await trio.sleep(0.3)
                    assert not appended, "committed through another connection's write lock"
                    other.execute("ROLLBACK")
            finally:
                other.close()
            assert appended == [Appended(2, False)]
            assert store.failure is None


async def test_concurrent_appends_get_distinct_increasing_seqs_in_few_commits(tmp_dir: Path) -> None:
    n = 600
    results: dict[int, Appended] = {}
    with trio.fail_after(20):
        async with open_store(store_config(tmp_dir)) as store:

            async def one(i: int) -> None:
                results[i] = await store.append(env(f"t.{i % 7}", i))

            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i)
            stats = store.statistics()
            assert sorted(a.seq for a in results.values()) == list(range(1, n + 1))
            assert stats.committed_messages == n and stats.stored_messages == n and stats.last_seq == n
            assert stats.commits < n, "group commit: many appends per transaction"
            assert stats.commit_seconds_buckets[-1][1] == stats.commits
            # seq order is commit order: each message's payload is found under the seq it was told
            history = await store.history("#", 0, 1000)
            assert {json.loads(m.json)["payload"]: m.seq for m in history.messages} == {
                i: a.seq for i, a in results.items()
            }
            assert all(json.loads(m.json)["seq"] == m.seq for m in history.messages)


# ---- duplicates ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 31, 32, 33, 128, 129, 500])
async def test_a_batch_of_any_size_is_stored_whole_in_order(tmp_dir: Path, size: int) -> None:
    """Batches from 32 rows go in as multi-row INSERTs of 128, 64, … 1 rows (store._insert_messages):
    every row lands once, with its own seq, type and body, whatever the split."""
    with trio.fail_after(20):
        async with open_store(store_config(tmp_dir)) as store:
            await store.append(env("before"))
            sent = [env(f"batch.{i % 3}", {"i": i}) for i in range(size)]
            appended = await store.append_many(sent)
            assert [a.seq for a in appended] == list(range(2, size + 2))
            got = (await store.history("batch.*", 0, 1000)).messages
            assert [(m.seq, m.type, json.loads(m.json)["payload"]) for m in got] == [
                (i + 2, f"batch.{i % 3}", {"i": i}) for i in range(size)
            ]
            assert [json.loads(m.json)["message_id"] for m in got] == [e.message_id for e in sent]


async def test_duplicates_answer_the_original_seq_and_are_stored_once(tmp_dir: Path) -> None:
    with trio.fail_after(20):
        async with open_store(store_config(tmp_dir, **HELD)) as store:
            committed: list[int] = []
            store.on_commit(lambda msgs: committed.extend(m.seq for m in msgs))
            assert await store.append(env("d", 1, "m-1")) == Appended(1, False)
            assert await store.append(env("d", 2, "m-1")) == Appended(1, True)
            # two identical message_ids in one batch, around a new one
            # (seqs may have gaps - a refused insert can use one up - but they only ever grow)
            same_batch = await store.append_many([env("d", 3, "m-2"), env("d", 4, "m-3"), env("d", 5, "m-2")])
            m2, m3 = same_batch[0].seq, same_batch[1].seq
            assert 1 < m2 < m3
            assert same_batch == [Appended(m2, False), Appended(m3, False), Appended(m2, True)]
            # and in separate writes of one group commit
            blocker = Blocker()
            held = await store.submit(blocker)
            await blocker.wait_entered()
            writes = [await store.submit_append([env("d", 6, "m-4")]) for _ in range(3)]
            blocker.release.set()
            await held.wait()
            results = [(await w.wait())[0] for w in writes]
            m4 = results[0].seq
            assert m4 > m3
            assert results == [Appended(m4, False), Appended(m4, True), Appended(m4, True)]
            history = await store.history("d", 0, 100)
            assert [json.loads(m.json)["payload"] for m in history.messages] == [1, 3, 4, 6]
            assert [m.seq for m in history.messages] == [1, m2, m3, m4]
            assert committed == [1, m2, m3, m4], "a duplicate is not handed to the router again"
            stats = store.statistics()
            assert stats.duplicates == 4 and stats.stored_messages == 4 and stats.last_seq == m4
            assert (await store.append(env("d", 7, "m-1"))) == Appended(1, True)
            assert (await store.append(env("d", 7))).seq > m4


# ---- a failing write, drain -----------------------------------------------------------------


async def test_a_failing_write_fails_alone_and_its_batch_neighbours_commit(tmp_dir: Path) -> None:
    def insert_then_fail(conn: sqlite3.Connection, write: Write) -> None:
        insert_envelopes(conn, write, [env("bad", "rolled back")])
        raise ValueError("boom")

    with trio.fail_after(20):
        async with open_store(store_config(tmp_dir, **HELD)) as store:
            blocker = Blocker()
            held = await store.submit(blocker)
            await blocker.wait_entered()
            before = await store.submit_append([env("good", "before")])
            failing = await store.submit(insert_then_fail)
            after = await store.submit_append([env("good", "after")])
            commits = store.statistics().commits
            blocker.release.set()
            assert await held.wait() == "blocked"
            assert (await before.wait())[0].seq == 1
            with pytest.raises(ValueError, match="boom"):
                await failing.wait()
            assert (await after.wait())[0].seq >= 2
            assert store.statistics().commits == commits + 2, "the three writes were one batch"
            history = await store.history("#", 0, 100)
            assert [json.loads(m.json)["payload"] for m in history.messages] == ["before", "after"]
            assert store.last_seq == history.messages[-1].seq
            assert (await store.append(env("good", "later"))).seq > history.messages[-1].seq


def insert_lazily(type: str) -> Any:
    """A write that stores one message (a lazy write's apply)."""
    return lambda conn, write: insert_envelopes(conn, write, [env(type)])


async def test_a_lazy_write_waits_for_company_and_shares_its_commit(
    tmp_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_store(store_config(tmp_dir, lazy_write_delay_s=0.5)) as store:
        commits = store.statistics().commits
        start = trio.current_time()
        lazy = await store.submit(insert_lazily("lazy"), isolated=False, lazy=True)
        await trio.sleep(0.1)
        assert not lazy.done.is_set(), "held: nobody waits for it"
        eager = await store.submit_append([env("eager")])
        await eager.wait()
        await lazy.wait()
        assert trio.current_time() - start == pytest.approx(0.1), "committed when the eager write came"
        assert store.statistics().commits == commits + 1, "one commit for both"
        start = trio.current_time()
        alone = await store.submit(insert_lazily("alone"), isolated=False, lazy=True)
        await alone.wait()
        assert trio.current_time() - start == pytest.approx(0.5), "alone: committed after lazy_write_delay_s"
        assert store.statistics().commits == commits + 2
    rows = sqlite3.connect(tmp_dir / "store.db").execute("SELECT type FROM messages ORDER BY seq").fetchall()
    assert rows == [("lazy",), ("eager",), ("alone",)]


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
async def test_a_lazy_write_held_when_the_store_is_cancelled_is_committed(tmp_dir: Path, synchronous: str) -> None:
    """A stopping daemon cancels the writer: a write it was holding is committed, not dropped (a task's
    dispatch record: the next start must know its attempt began)."""
    with trio.fail_after(20):
        async with open_store(store_config(tmp_dir, synchronous=synchronous, lazy_write_delay_s=1.0)) as store:
            await store.submit(insert_lazily("kept"), isolated=False, lazy=True)
            await trio.sleep(0.05)  # the writer holds it, waiting for company
    rows = sqlite3.connect(tmp_dir / "store.db").execute("SELECT type FROM messages").fetchall()
    assert rows == [("kept",)]


async def test_drain_commits_what_is_queued_then_refuses_writes(tmp_dir: Path) -> None:
    with trio.fail_after(20):
        async with open_store(store_config(tmp_dir, **HELD)) as store:
            blocker = Blocker()
            held = await store.submit(blocker)
            await blocker.wait_entered()
            queued = [await store.submit_append([env("q", i)]) for i in range(50)]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.drain)
                await trio.sleep(0.05)
                with pytest.raises(StoreClosed):
                    await store.append(env("q", "too late"))
                blocker.release.set()
            await held.wait()
            assert [(await w.wait())[0].seq for w in queued] == list(range(1, 51))
            assert await all_seqs(store) == list(range(1, 51))
            with pytest.raises(StoreClosed):
                await store.submit_append([env("q")])


# ---- history --------------------------------------------------------------------------------

TOPICS = ["a", "a.b", "a.c", "a.b.c", "ab", "a-b", "a0", "b.a", "b.a.c", "c.b", "x.y.z.a"]
QUERIES = ["a", "a.b", "a.#", "a.*", "a.*.c", "a.b.#", "*.b", "#.c", "*.a.#", "#", "*", "#.a", "nope", "nope.#"]


async def test_history_by_exact_prefix_and_leading_wildcard_patterns(tmp_dir: Path) -> None:
    with trio.fail_after(20):
        async with open_store(store_config(tmp_dir)) as store:
            stored = [(a.seq, TOPICS[i % len(TOPICS)]) for i, a in enumerate(
                await store.append_many([env(TOPICS[i % len(TOPICS)], i) for i in range(300)])
            )]
            for pattern in QUERIES:
                want = [seq for seq, topic in stored if pattern_matches(pattern, topic)]
                for after in (0, 1, 57, 299, 300):
                    for limit in (1, 7, 1000):
                        history = await store.history(pattern, after, limit)
                        assert [m.seq for m in history.messages] == [s for s in want if s > after][:limit], (
                            pattern, after, limit)
                        assert history.scanned_through == 300
                        for m in history.messages:
                            body = json.loads(m.json)
                            assert body["seq"] == m.seq and body["type"] == m.type
                # paging with last_seq reaches everything exactly once
                paged, after = [], 0
                while True:
                    page = await store.history(pattern, after, 13)
                    if not page.messages:
                        break
                    paged += [m.seq for m in page.messages]
                    after = page.messages[-1].seq
                assert paged == want


async def test_wildcard_history_scans_past_many_non_matching_rows(tmp_dir: Path) -> None:
    """Sparse matches further apart than one read chunk are all found, in order."""
    with trio.fail_after(30):
        async with open_store(store_config(tmp_dir)) as store:
            for _ in range(5):
                await store.append_many([env("noise.x", 0) for _ in range(1000)])
                await store.append(env("rare.hit", 1))
                await store.append(env("z.rare", 1))
            for pattern in ("rare.*", "*.hit", "#.rare", "#.hit"):
                history = await store.history(pattern, 0, 1000)
                assert len(history.messages) == 5, pattern
                seqs = [m.seq for m in history.messages]
                assert seqs == sorted(seqs)
                assert history.scanned_through == store.last_seq == 5010
            one = await store.history("#.rare", 0, 1)
            assert len(one.messages) == 1 and one.messages[0].type == "z.rare"


# ---- retention ----------------------------------------------------------------------------------


async def test_retention_by_count(tmp_dir: Path) -> None:
    cfg = store_config(tmp_dir)
    with trio.fail_after(20):
        async with open_store(cfg) as store:
            await store.append_many([env("r", i) for i in range(10)])
            assert await store.apply_retention(3, 0) == 7
            assert store.retention_floor == 7
            assert await all_seqs(store) == [8, 9, 10]
            assert store.statistics().stored_messages == 3
            assert await store.apply_retention(3, 0) == 0
            assert store.retention_floor == 7
            assert await store.apply_retention(5, 0) == 0, "a looser limit brings nothing back"
            assert store.retention_floor == 7
            await store.append(env("r"))
            assert await store.apply_retention(3, 0) == 1
            assert store.retention_floor == 8
        async with open_store(cfg) as store:
            assert store.retention_floor == 8 and store.last_seq == 11
            assert store.statistics().stored_messages == 3


class GatedSink:
    """The router's view of a client that reads its replay slowly: ``put`` stops at frame ``hold_at``."""

    encode = staticmethod(lambda pattern_json, msg_json: msg_json.encode())

    def __init__(self, hold_at: int) -> None:
        self.seqs: list[int] = []
        self.hold_at = hold_at
        self.holding = trio.Event()
        self.release = trio.Event()
        self.was_overtaken = False

    def offer(self, frame: bytes) -> bool:
        self.seqs.append(json.loads(frame)["seq"])
        return True

    async def put(self, frame: bytes) -> None:
        self.seqs.append(json.loads(frame)["seq"])
        if len(self.seqs) == self.hold_at:
            self.holding.set()
            await self.release.wait()

    def overflowed(self) -> None:
        raise AssertionError("a replay never overflows: it waits")

    def overtaken(self) -> None:
        self.was_overtaken = True


async def test_poison_dead_letters_past_dead_letters_kept_push_out_the_oldest_and_a_reload_moves_the_limit(
    tmp_dir: Path,
) -> None:
    """A flood of garbage (the AMQP bridge's and the Redis ingest's poison) keeps the table at its size."""
    with trio.fail_after(20):
        async with open_store(store_config(tmp_dir, dead_letters_kept=3)) as store:
            ids = [await store.add_dead_letter("amqp.poison", "bad", "x" * 1000, {"n": i}) for i in range(5)]
            page = await store.dead_letters()
            assert ids == [1, 2, 3, 4, 5] and [letter.id for letter in page.letters] == [3, 4, 5]
            assert store.statistics().dead_letters_dropped == 2
            store.reconfigure(store_config(tmp_dir, dead_letters_kept=1))
            await store.add_dead_letter("amqp.poison", "bad", "x", {})
            assert [letter.id for letter in (await store.dead_letters()).letters] == [6]
            assert store.statistics().dead_letters_dropped == 5


async def test_retention_overtaking_a_replay_ends_it_instead_of_skipping(tmp_dir: Path) -> None:
    """A replay paused (a slow reader) while retention deletes past its position must not
    resume after the hole as if nothing happened: the sink is told, the subscription ends."""
    with trio.fail_after(20):
        async with open_store(store_config(tmp_dir)) as store, trio.open_nursery() as nursery:
            await store.append_many([env("r.x", i) for i in range(50)])
            router = Router(store, replay_batch=10)
            sink = GatedSink(hold_at=5)
            sub = Subscription(sink, "r.#")
            followed = trio.Event()

            async def follow() -> None:
                await router.follow(sub, 0)
                followed.set()

            nursery.start_soon(follow)
            await sink.holding.wait()  # 5 of the first page of 10 given
            assert await store.apply_retention(20, 0) == 30  # seqs 1..30 go, 6..10 still in the page
            sink.release.set()
            await followed.wait()
            assert sink.was_overtaken
            assert sink.seqs == list(range(1, 11)), "nothing after the hole"
            assert not sub.live
            nursery.cancel_scope.cancel()


async def test_retention_between_the_subscribe_reply_and_the_replay_is_not_skipped(tmp_dir: Path) -> None:
    """The reply said "no gap"; retention then runs before the replay starts: the replay
    starts where the reply said, so it sees the deletion and ends, rather than starting
    at the new floor as if the client had been told."""
    with trio.fail_after(20):
        async with open_store(store_config(tmp_dir)) as store:
            await store.append_many([env("r.x", i) for i in range(50)])
            router = Router(store, replay_batch=10)
            resume = router.resume_point(0)
            assert (resume.recovered, resume.replay_after) == (True, 0)
            assert await store.apply_retention(20, 0) == 30
            sink = GatedSink(hold_at=1000)
            sub = Subscription(sink, "r.#")
            await router.follow(sub, resume.replay_after)
            assert sink.was_overtaken and sink.seqs == []
            # a resume now is told the gap, and its replay starts after it
            again = router.resume_point(0)
            assert (again.recovered, again.gap, again.replay_after) == (False, (1, 30), 30)


async def test_retention_by_age(tmp_dir: Path) -> None:
    with trio.fail_after(20):
        async with open_store(store_config(tmp_dir)) as store:
            await store.append_many([env("old", i) for i in range(4)])
            await trio.sleep(0.4)
            await store.append_many([env("new", i) for i in range(2)])
            assert await store.apply_retention(0, 0.3) == 4
            assert store.retention_floor == 4
            assert await all_seqs(store) == [5, 6]
            # both limits: the stricter wins
            assert await store.apply_retention(1, 3600) == 1
            assert store.retention_floor == 5


async def test_retention_runs_by_itself_every_interval(tmp_dir: Path) -> None:
    cfg = store_config(tmp_dir, retention_max_messages=2, retention_interval_s=0.05)
    with trio.fail_after(20):
        async with open_store(cfg) as store:
            await store.append_many([env("r", i) for i in range(6)])
            while store.statistics().stored_messages > 2:
                await trio.sleep(0.02)
            assert store.retention_floor == 4
            assert await all_seqs(store) == [5, 6]
            store.reconfigure(store_config(tmp_dir, retention_max_messages=1, retention_interval_s=0.05))
            while store.retention_floor < 5:
                await trio.sleep(0.02)
            assert await all_seqs(store) == [6]


async def test_subscribe_since_after_retention_reports_the_exact_gap(nursery: trio.Nursery, tmp_dir: Path) -> None:
    d = await start_daemon(nursery, tmp_dir, store={"retention_max_messages": 3, "retention_interval_s": 0.05})
    with trio.fail_after(20):
        async with connect(d.ws_url) as c:
            for i in range(10):
                await c.publish("evt.x" if i % 2 else "evt.y", i)
            # wait for retention through the control socket's status
            while (await control_status(d.control_path))["store"]["retention_floor"] < 7:
                await trio.sleep(0.02)

            async with connect(d.ws_url) as s:
                ok = await s.ok({"op": "subscribe", "pattern": "evt.#", "since": 2})
                assert ok["recovered"] is False and ok["gap"] == [3, 7] and ok["last_seq"] == 10
                assert [f["msg"]["seq"] for f in await s.messages(3)] == [8, 9, 10]
                ok = await s.ok({"op": "subscribe", "pattern": "evt.x", "since": 0})
                assert ok["recovered"] is False and ok["gap"] == [1, 7]
                assert [f["msg"]["seq"] for f in await s.messages(2)] == [8, 10]
                ok = await s.ok({"op": "subscribe", "pattern": "#", "since": 7})
                assert ok["recovered"] is True and "gap" not in ok
                assert [f["msg"]["seq"] for f in await s.messages(3)] == [8, 9, 10]
                await c.publish("evt.y", "live")
                live = await s.messages(2)
                assert sorted(f["pattern"] for f in live) == ["#", "evt.#"]
                assert {f["msg"]["seq"] for f in live} == {11}
                assert await no_more_messages(s)
            history = await c.ok({"op": "history", "pattern": "#"})
            assert history["messages"][0]["seq"] >= 8


async def control_status(path: str) -> dict[str, Any]:
    reply = await control_async(path, {"cmd": "status"})
    assert reply["ok"], reply
    return dict(reply["status"])


# ---- a hostile pattern must not pin a reader --------------------------------------------------

_HOSTILE_HISTORY = r"""
import sqlite3, sys, time
import trio
from aivad.config import StoreConfig
from aivad.envelope import Envelope
from aivad.store import serve_store

async def main():
    cfg = StoreConfig(path=sys.argv[1], synchronous="NORMAL")
    async with trio.open_nursery() as nursery:
        store = await nursery.start(serve_store, cfg)
        await store.append(Envelope.from_fields(".".join(["a"] * 60)))
        history = await store.history(".".join(["#.*"] * 10 + ["z"]), 0, 10)
        assert history.messages == []
        nursery.cancel_scope.cancel()

trio.run(main)
"""


def test_history_with_many_wildcards_returns_promptly(tmp_dir: Path) -> None:
    # in a subprocess: the regex holds the GIL and cannot be cancelled
    try:
        subprocess.run([sys.executable, "-c", _HOSTILE_HISTORY, str(tmp_dir / "h.db")], check=True, timeout=3)
    except subprocess.TimeoutExpired:
        pytest.fail("history took more than 3 s")


# ---- dead letters ------------------------------------------------------------------------------


async def test_dead_letters_page_by_next_after_and_a_filtered_read_skips_other_kinds(tmp_dir: Path) -> None:
    with trio.fail_after(20):
        async with open_store(store_config(tmp_dir)) as store:
            ids = [await store.add_dead_letter(kind, "why", "body", {}) for kind in ("task", "amqp.poison", "task")]
            first = await store.dead_letters(None, 2)
            assert [d.id for d in first.letters] == ids[:2] and first.next_after == ids[1]
            rest = await store.dead_letters(None, 2, first.next_after)
            assert [d.id for d in rest.letters] == ids[2:] and rest.next_after is None
            tasks = await store.dead_letters("task", 10)
            assert [d.id for d in tasks.letters] == [ids[0], ids[2]] and tasks.next_after is None
