"""The Redis log engine (aivad/redis/log.py) against a real redis-server.

Policy: every test gets its own key prefix on the session's server (tests that
stop or restart Redis start their own); producers and inspection use redis-py's
blocking client, which shares no code with aivad's coredis-based engine. Time
enters only through the server's clock for age retention, passed in as
``now_ms``; sleeps are the few milliseconds a clock needs to move. Waits on
real sockets run under ``trio.fail_after``. Nothing asserts on speed.
"""

from __future__ import annotations

import itertools
import json
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis as redispy
import trio
import trio.lowlevel

from aivad.cluster import serve_cluster_log
from aivad.config import ClusterConfig, RedisConfig, StoreConfig
from aivad.envelope import BadMessage, Envelope
from aivad.redis import (
    EpochChanged,
    Gap,
    LogRewound,
    LogTail,
    RedisIngress,
    RedisLog,
    RedisOverloaded,
    RedisSettings,
    RedisUnavailable,
    TailBatch,
    envelope_from_channel,
    envelope_from_entry,
    open_channel_ingress,
    open_redis_log,
    run_with_backoff,
)
from tests.brokers import Redis, free_port

WAIT_S = 20.0


def settings_for(server: Redis, **overrides: object) -> RedisSettings:
    values: dict[str, object] = {"url": server.url, "prefix": f"t{uuid.uuid4().hex[:10]}:", "tail_block_s": 0.2,
                                 "op_timeout_s": 5.0}
    values.update(overrides)
    return RedisSettings(**values)  # type: ignore[arg-type]


def envs(tag: str, n: int, topic: str = "test.msg", start: int = 0) -> list[Envelope]:
    return [Envelope.from_fields(topic, {"i": i}, message_id=f"{tag}-{i}") for i in range(start, start + n)]


@pytest.fixture
def producer(redis_server: Redis) -> Iterator[redispy.Redis]:
    client = redispy.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
async def redis_log(redis_server: Redis) -> AsyncIterator[RedisLog]:
    async with open_redis_log(settings_for(redis_server)) as opened:
        yield opened


@pytest.fixture
def own_redis() -> Iterator[Redis]:
    """A redis-server of this test's own, with an AOF fsynced on every write (survives restarts)."""
    server = Redis(appendonly=True, appendfsync="always").start()
    yield server
    server.stop()


async def read_until(tail: LogTail, last_seq: int) -> list[TailBatch]:
    batches = []
    with trio.fail_after(WAIT_S):
        while tail.position < last_seq:
            batches.append(await tail.read())
    return batches


# ---- opening ----------------------------------------------------------------------------------------------


async def test_open_against_no_redis_is_redis_unavailable() -> None:
    with trio.fail_after(WAIT_S), pytest.raises(RedisUnavailable):
        async with open_redis_log(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=2.0)):
            raise AssertionError("opened a log on a port where nothing listens")


async def test_an_error_inside_the_context_comes_out_as_itself(redis_server: Redis) -> None:
    # coredis's pool is a task group: without unwrapping this would be a one-element ExceptionGroup
    with pytest.raises(RedisUnavailable, match="from the body"):
        async with open_redis_log(settings_for(redis_server)):
            raise RedisUnavailable("from the body")


# ---- append: seq, de-duplication, order ------------------------------------------------------------


async def test_two_nodes_append_concurrently_one_seq_each_and_no_duplicate(redis_server: Redis) -> None:
    cfg = settings_for(redis_server)
    # 40 batches of 25 per node; node b repeats every other batch of node a (same message_ids)
    batches_a = [envs(f"a{k}", 25) for k in range(40)]
    batches_b = [batches_a[k] if k % 2 == 0 else envs(f"b{k}", 25) for k in range(40)]
    results: dict[str, list[tuple[str, int, bool]]] = {"a": [], "b": []}

    async def node(name: str, batches: list[list[Envelope]]) -> None:
        async with open_redis_log(cfg) as node_log:  # its own client, its own connections
            for batch in batches:
                appended = await node_log.append_many(batch)
                results[name] += [(e.message_id, r.seq, r.duplicate) for e, r in zip(batch, appended, strict=True)]
                await trio.lowlevel.checkpoint()

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node, "a", batches_a)
            nursery.start_soon(node, "b", batches_b)

    seq_of: dict[str, int] = {}
    stored = 0
    for message_id, seq, duplicate in results["a"] + results["b"]:
        assert seq_of.setdefault(message_id, seq) == seq, f"{message_id} got two seqs"
        stored += not duplicate
    unique = len(seq_of)
    assert unique == 40 * 25 + 20 * 25
    assert stored == unique  # each message stored once; the other node was told "duplicate"
    assert sorted(seq_of.values()) == list(range(1, unique + 1))  # one global counter, no hole
    async with open_redis_log(cfg) as reader:
        info = await reader.info()
        assert (info.last_seq, info.length, info.ids) == (unique, unique, unique)
        page = await reader.history("#", 0, limit=unique, scan_budget=unique)
        assert [m.seq for m in page.messages] == list(range(1, unique + 1))
        for m in page.messages:
            body = json.loads(m.json)
            assert seq_of[body["message_id"]] == m.seq == body["seq"]


async def test_batch_order_split_batches_and_duplicates_inside_one_call(redis_server: Redis) -> None:
    async with open_redis_log(settings_for(redis_server, max_batch=7)) as lg:
        batch = envs("o", 50)
        batch.insert(10, batch[3])  # a repeat inside the call: answered with the first one's seq
        appended = await lg.append_many(batch)
        assert appended[10].duplicate and appended[10].seq == appended[3].seq == 4
        fresh = [a.seq for a in appended if not a.duplicate]
        assert fresh == list(range(1, 51))
        page = await lg.history("test.msg", 0, limit=100)
        assert [json.loads(m.json)["payload"]["i"] for m in page.messages] == list(range(50))
        assert lg.statistics().append_calls >= 8  # 51 rows in chunks of at most 7


async def test_concurrent_appends_on_one_handle_share_script_calls_and_keep_each_callers_order(
        redis_log: RedisLog) -> None:
    got: dict[int, list[int]] = {}

    async def caller(k: int) -> None:
        got[k] = [a.seq for a in await redis_log.append_many(envs(f"c{k}", 3))]

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            for k in range(50):
                nursery.start_soon(caller, k)
    assert sorted(s for seqs in got.values() for s in seqs) == list(range(1, 151))
    assert all(seqs == sorted(seqs) for seqs in got.values())
    assert redis_log.statistics().append_calls < 50  # group commit: callers waiting together went together


async def test_append_over_max_pending_is_overloaded(redis_server: Redis) -> None:
    async with open_redis_log(settings_for(redis_server, max_pending=10)) as lg:
        with pytest.raises(RedisOverloaded):
            await lg.append_many(envs("x", 11))
        assert [a.seq for a in await lg.append_many(envs("y", 10))] == list(range(1, 11))


async def test_cancelling_the_caller_whose_flush_is_in_flight_fails_no_one(redis_log: RedisLog) -> None:
    results: dict[str, list[int]] = {}
    leader_scope = trio.CancelScope()

    async def leader() -> None:
        with leader_scope:
            results["leader"] = [a.seq for a in await redis_log.append_many(envs("lead", 5))]

    async def follower(k: int) -> None:
        results[f"f{k}"] = [a.seq for a in await redis_log.append_many(envs(f"f{k}", 5))]

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(leader)
            while not redis_log._appends._lock.locked():  # the leader's script call is on its way
                await trio.lowlevel.checkpoint()
            for k in range(19):
                nursery.start_soon(follower, k)
            await trio.lowlevel.checkpoint()
            leader_scope.cancel()  # its flush is shielded: it finishes, and so do the followers
    followers = [results[f"f{k}"] for k in range(19)]
    assert all(len(seqs) == 5 for seqs in followers)
    info = await redis_log.info()
    assert info.length == info.last_seq == 100  # the leader's rows were on their way: stored
    assert redis_log._appends.pending == 0 and not redis_log._appends._waiting


async def test_a_cancelled_append_is_stored_entirely_or_not_at_all(redis_log: RedisLog) -> None:
    async def appender(k: int) -> None:
        await redis_log.append_many(envs(f"w{k}", 5))

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            for k in range(20):
                nursery.start_soon(appender, k)
            with trio.CancelScope() as scope:
                scope.cancel()
                await redis_log.append_many(envs("cancelled", 5))
    page = await redis_log.history("#", 0, limit=200)
    cancelled = [m for m in page.messages if json.loads(m.json)["message_id"].startswith("cancelled-")]
    assert len(cancelled) in (0, 5)  # taken by another caller's flush before the cancel landed, or not
    assert len(page.messages) == 100 + len(cancelled)
    assert redis_log._appends.pending == 0 and not redis_log._appends._waiting


# ---- history -------------------------------------------------------------------------------------------


async def test_history_with_nothing_matching_moves_on_by_the_scan_budget(redis_log: RedisLog) -> None:
    for start in range(0, 1000, 250):
        await redis_log.append_many(envs("h", 250, topic="scan.done", start=start))
    after, pages = 0, 0
    while True:
        page = await redis_log.history("alert.#", after, limit=10, scan_budget=300)
        pages += 1
        assert page.messages == []
        assert page.scanned <= 300
        assert page.scanned_through > after or page.scanned_through == page.last_seq
        if page.scanned_through == page.last_seq:
            break
        assert page.scanned_through == after + 300
        after = page.scanned_through
    assert pages == 4 and page.last_seq == 1000


async def test_history_pages_find_sparse_matches_and_stop_at_the_limit(redis_log: RedisLog) -> None:
    for k in range(10):
        await redis_log.append_many(envs(f"s{k}", 99, topic="noise.x"))
        await redis_log.append_many(envs(f"m{k}", 1, topic="alert.fire"))
    found, after = [], 0
    while True:
        page = await redis_log.history("alert.*", after, limit=3, scan_budget=250)
        found += [m.seq for m in page.messages]
        if len(page.messages) == 3:
            assert page.scanned_through == page.messages[-1].seq  # the next page starts right after it
        if page.scanned_through == page.last_seq:
            break
        after = page.scanned_through
    assert found == [100 * k for k in range(1, 11)]
    assert page.page(0)["last_seq"] == (page.messages[-1].seq if page.messages else 0)


async def test_history_reports_the_retention_floor_in_the_same_read(redis_log: RedisLog) -> None:
    await redis_log.append_many(envs("f", 30))
    await redis_log.trim(max_messages=10)
    page = await redis_log.history("#", 5, limit=100)
    assert page.retention_floor == 20
    assert [m.seq for m in page.messages] == list(range(21, 31))


# ---- tail ---------------------------------------------------------------------------------------------------


async def test_tail_from_a_position_with_concurrent_appends_has_no_gap_and_no_duplicate(redis_server: Redis) -> None:
    cfg = settings_for(redis_server, tail_count=37)
    async with open_redis_log(cfg) as lg:
        await lg.append_many(envs("pre", 50))
        tail = lg.tail(20)
        seen: list[int] = []
        total = 50 + 2 * 300

        async def producer_node(name: str) -> None:
            rng = random.Random(name)
            async with open_redis_log(cfg) as other:
                done = 0
                while done < 300:
                    n = min(rng.randint(1, 40), 300 - done)
                    await other.append_many(envs(name, n, start=done))
                    done += n
                    await trio.sleep(rng.random() * 0.003)

        with trio.fail_after(WAIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(producer_node, "p1")
                nursery.start_soon(producer_node, "p2")
                while tail.position < total:
                    batch = await tail.read()
                    assert batch.gap is None
                    seen += [m.seq for m in batch.messages]
        assert seen == list(range(21, total + 1))


async def test_tail_after_trimming_reports_the_exact_gap(redis_log: RedisLog) -> None:
    await redis_log.append_many(envs("g", 100))
    await redis_log.trim(max_messages=30)  # floor 70
    tail = redis_log.tail(10)
    with trio.fail_after(WAIT_S):
        batch = await tail.read()
    assert batch.gap == Gap(11, 70)
    assert [m.seq for m in batch.messages][:1] == [71]
    await read_until(tail, 100)

    # an idle tail whose position retention passes: the gap, then what is left
    await redis_log.append_many(envs("g", 50, start=100))  # 101..150
    await redis_log.trim(max_messages=10)  # floor 140
    with trio.fail_after(WAIT_S):
        batch = await tail.read()
    assert batch.gap == Gap(101, 140)
    assert [m.seq for m in batch.messages] == list(range(141, 151))


async def test_tail_whose_whole_backlog_was_trimmed_learns_the_gap_without_messages(redis_log: RedisLog) -> None:
    await redis_log.append_many(envs("e", 20))
    await redis_log.trim(max_age_s=0.001, now_ms=2**52)  # far future: everything is old
    tail = redis_log.tail(5)
    with trio.fail_after(WAIT_S):
        batch = await tail.read()
    assert (batch.gap, batch.messages, batch.position) == (Gap(6, 20), [], 20)


# ---- epoch -------------------------------------------------------------------------------------------------


async def test_epoch_is_stable_across_reopen_and_changes_after_flushall(redis_server: Redis) -> None:
    own = Redis().start()  # FLUSHALL must not touch the other tests' keys
    try:
        cfg = settings_for(own)
        async with open_redis_log(cfg) as first:
            epoch = first.epoch
            await first.append_many(envs("e", 40))
        async with open_redis_log(cfg) as again:
            assert again.epoch == epoch
            assert (await again.info()).last_seq == 40
            tail = again.tail(40)

            redispy.Redis.from_url(own.url).flushall()

            with pytest.raises(EpochChanged) as caught:
                await again.append_many(envs("lost", 1))
            assert (caught.value.expected, caught.value.current) == (epoch, None)
            with pytest.raises(EpochChanged), trio.fail_after(WAIT_S):
                await tail.read()  # an idle tail notices within tail_block_s
            with pytest.raises(EpochChanged):
                await again.history("#", 0)
            with pytest.raises(EpochChanged):
                await again.trim(max_messages=1)
            assert (await again.info()).epoch is None

            assert await again.reopen() is True
            new_epoch = again.epoch
            assert new_epoch != epoch
            # the counter goes on above what this node saw: a seq is not handed out twice
            info = await again.info()
            assert (info.last_seq, info.retention_floor, info.length) == (40, 40, 0)
            assert (await again.append(Envelope.from_fields("after.loss", 1))).seq == 41
            with pytest.raises(EpochChanged):
                await tail.read()  # made under the old epoch

            # another node that had seen further bumps the counter when it adopts the log
            async with open_redis_log(cfg, seq_floor=75) as late:
                assert late.epoch == new_epoch
                assert (await late.append(Envelope.from_fields("late", 1))).seq == 76
            page = await again.history("#", 0)
            assert page.retention_floor == 40 and [m.seq for m in page.messages] == [41, 76]
    finally:
        own.stop()


async def test_a_log_that_went_back_in_time_gets_a_new_epoch_and_hands_out_no_seq_twice(
        redis_server: Redis, producer: redispy.Redis) -> None:
    cfg = settings_for(redis_server)
    async with open_redis_log(cfg) as lg, open_redis_log(cfg) as other:
        await lg.append_many(envs("k", 10))
        other_tail = other.tail(0)
        await read_until(other_tail, 10)  # the other node has seen seq 10 through its tail
        tail = lg.tail(10)
        old = lg.epoch

        # what an older snapshot restored (or a lagging replica promoted) looks like:
        # the same epoch, entries 8..10 gone, the counter back at 7
        meta, stream, ids = (cfg.key(name) for name in ("meta", "stream", "ids"))
        producer.hset(meta, "seq", 7)
        producer.xdel(stream, "8-0", "9-0", "10-0")
        producer.zrem(ids, "k-7", "k-8", "k-9")

        for node in (lg, other):
            with pytest.raises(LogRewound) as caught:
                await node.append_many(envs("new", 1))  # it would have been seq 8 a second time
            assert (caught.value.counter, caught.value.seen) == (7, 10)
        with pytest.raises(LogRewound), trio.fail_after(WAIT_S):
            await tail.read()
        with pytest.raises(LogRewound):
            await lg.history("#", 0)

        assert await lg.reopen() is True
        assert lg.epoch != old
        assert (await lg.append(Envelope.from_fields("after.rewind", 1))).seq == 11
        page = await lg.history("#", 0)
        assert [m.seq for m in page.messages] == [1, 2, 3, 4, 5, 6, 7, 11]  # the entries kept, no seq again
        with pytest.raises(EpochChanged):
            await other_tail.read()
        assert await other.reopen() is False  # adopts the new epoch
        assert other.epoch == lg.epoch


async def test_a_history_read_is_not_a_log_gone_back_when_the_node_learns_newer_seqs_meanwhile(
    redis_log: RedisLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tail (or an append) raises ``last_seq`` while a history read is out: the read's snapshot
    is older than that, not a rewound log (this once failed a cluster test with ``overloaded``)."""
    await redis_log.append_many(envs("h", 3))
    known = redis_log.last_seq
    pipeline = redis_log._client.pipeline

    @asynccontextmanager
    async def learning_meanwhile(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async with pipeline(*args, **kwargs) as p:
            yield p
            redis_log.last_seq = known + 5  # heard through the tail as the read goes out

    monkeypatch.setattr(redis_log._client, "pipeline", learning_meanwhile)
    found = await redis_log.history("#", 0, 10)
    monkeypatch.undo()
    redis_log.last_seq = known
    assert [m.seq for m in found.messages] == [known - 2, known - 1, known]


async def test_restart_without_persistence_is_an_epoch_change() -> None:
    own = Redis().start()
    try:
        async with open_redis_log(settings_for(own)) as lg:
            await lg.append_many(envs("r", 5))
            old = lg.epoch
            own.restart()
            lost: EpochChanged | None = None
            with trio.fail_after(WAIT_S):
                while lost is None:  # the first call may still meet the closed connection
                    try:
                        await lg.append_many(envs("r", 1, start=5))
                    except RedisUnavailable:
                        await trio.sleep(0.05)
                        continue
                    except EpochChanged as exc:
                        lost = exc
                        break
                    raise AssertionError("appended into a log that lost its epoch")
            assert (lost.expected, lost.current) == (old, None)
            assert await lg.reopen()
            assert (await lg.append_many(envs("r", 1, start=5)))[0].seq == 6
    finally:
        own.stop()


# ---- retention ---------------------------------------------------------------------------------------------


async def test_retention_by_count(redis_log: RedisLog) -> None:
    await redis_log.append_many(envs("c", 100))
    trimmed = await redis_log.trim(max_messages=40)
    assert (trimmed.deleted, trimmed.floor, trimmed.more) == (60, 60, False)
    info = await redis_log.info()
    assert (info.length, info.retention_floor, info.last_seq) == (40, 60, 100)
    assert (await redis_log.trim(max_messages=40)).deleted == 0


async def test_retention_by_age_with_the_server_clock(redis_log: RedisLog, producer: redispy.Redis) -> None:
    def server_ms() -> int:
        seconds, micros = producer.time()
        return int(seconds) * 1000 + int(micros) // 1000

    for k in range(3):
        await redis_log.append_many(envs(f"old{k}", 100))
    await trio.sleep(0.005)
    boundary = server_ms()  # every old entry was stored before this millisecond …
    await trio.sleep(0.005)  # … and every new one after it
    for k in range(2):
        await redis_log.append_many(envs(f"new{k}", 100))

    # ten minutes of age, "now" ten minutes after the boundary: older than the boundary goes
    trimmed = await redis_log.trim(max_age_s=600, now_ms=boundary + 600_000)
    assert (trimmed.deleted, trimmed.floor, trimmed.more) == (300, 300, False)
    page = await redis_log.history("#", 0, limit=1000)
    assert page.retention_floor == 300 and [m.seq for m in page.messages] == list(range(301, 501))
    # with the server's own clock nothing here is ten minutes old
    assert (await redis_log.trim(max_age_s=600)).deleted == 0


async def test_retention_deletes_at_most_trim_max_delete_per_call(redis_server: Redis) -> None:
    async with open_redis_log(settings_for(redis_server, trim_max_delete=25)) as lg:
        await lg.append_many(envs("b", 100))
        calls = []
        while True:
            trimmed = await lg.trim(max_messages=10)
            calls.append(trimmed.deleted)
            if not trimmed.more:
                break
        assert calls == [25, 25, 25, 15]
        calls = []
        await lg.append_many(envs("b", 100, start=100))
        while (trimmed := await lg.trim(max_age_s=0.001, now_ms=2**52)).more:
            calls.append(trimmed.deleted)
        assert [*calls, trimmed.deleted] == [25, 25, 25, 25, 10]
        assert (await lg.info()).length == 0 and trimmed.floor == 200


async def test_apply_retention_trims_until_nothing_is_due(redis_server: Redis) -> None:
    async with open_redis_log(settings_for(redis_server, trim_max_delete=30)) as lg:
        await lg.append_many(envs("a", 100))
        assert await lg.apply_retention(max_messages=5) == 95
        assert (await lg.info()).retention_floor == 95


async def test_durability_reports_persistence_and_eviction(redis_log: RedisLog, own_redis: Redis) -> None:
    plain = await redis_log.durability()  # the session's server: no AOF
    assert plain is not None and not plain.appendonly and plain.maxmemory_policy == "noeviction"
    assert [w.split(" ")[0] for w in plain.warnings] == ["appendonly"]
    async with open_redis_log(settings_for(own_redis)) as lg:
        durable = await lg.durability()
        assert durable is not None and (durable.appendonly, durable.appendfsync, durable.warnings) == (
            True, "always", [])


async def test_deduplication_index_is_trimmed_with_the_log(redis_log: RedisLog) -> None:
    await redis_log.append_many(envs("d", 100))
    await redis_log.trim(max_messages=40)
    assert (await redis_log.info()).ids == 40
    again = await redis_log.append_many([envs("d", 1, start=0)[0], envs("d", 1, start=99)[0]])
    # d-0 left with retention: stored again (as the embedded store does); d-99 is still known
    assert again[0].duplicate is False and again[0].seq == 101
    assert again[1].duplicate is True and again[1].seq == 100


# ---- Redis restarted mid-tail ----------------------------------------------------------------------------------


async def test_redis_restart_mid_tail_raises_then_resumes_without_gap(own_redis: Redis) -> None:
    async with open_redis_log(settings_for(own_redis, op_timeout_s=2.0)) as lg:
        epoch = lg.epoch
        await lg.append_many(envs("before", 10))
        tail = lg.tail(0)
        seen = [m.seq for b in await read_until(tail, 10) for m in b.messages]

        async def restart_soon() -> None:
            await trio.sleep(0.3)  # the tail is in XREAD BLOCK by then
            await trio.to_thread.run_sync(own_redis.stop_server)

        with trio.fail_after(WAIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(restart_soon)
                with pytest.raises(RedisUnavailable):
                    await tail.read()
        with pytest.raises(RedisUnavailable):
            await lg.append_many(envs("down", 1))
        await trio.to_thread.run_sync(own_redis.start)

        with trio.fail_after(WAIT_S):
            while True:  # pooled connections to the old process fail once each
                try:
                    appended = await lg.append_many(envs("after", 10))
                    break
                except RedisUnavailable:
                    await trio.sleep(0.05)
        assert lg.epoch == epoch and [a.seq for a in appended] == list(range(11, 21))  # the AOF kept the log
        with trio.fail_after(WAIT_S):
            while tail.position < 20:
                try:
                    batch = await tail.read()
                except RedisUnavailable:
                    await trio.sleep(0.05)
                    continue
                assert batch.gap is None
                seen += [m.seq for m in batch.messages]
        assert seen == list(range(1, 21))


async def test_run_with_backoff_waits_capped_and_starts_over_after_a_healthy_session(
        autojump_clock: trio.abc.Clock) -> None:
    events: list[tuple[float, str]] = []
    outcomes = iter(["fail", "fail", "fail", "fail", "fail", "healthy-then-fail", "fail", "ok-stop"])

    async def session() -> None:
        what = next(outcomes)
        events.append((trio.current_time(), what))
        if what == "ok-stop":
            raise KeyError("stop")  # not RedisUnavailable: propagates
        if what == "healthy-then-fail":
            await trio.sleep(20)
        raise RedisUnavailable("down")

    errors: list[RedisUnavailable] = []
    with pytest.raises(KeyError):
        await run_with_backoff("test", session, initial_s=1.0, max_s=4.0, healthy_s=10.0, on_error=errors.append,
                               jitter=lambda: 1.0)
    starts = [t for t, _ in events]
    # waits 1, 2, 4, 4 (capped), 4; then 20 s of health, a fail, and the wait is 1 again
    assert [b - a for a, b in itertools.pairwise(starts)] == [1, 2, 4, 4, 4, 21, 2]
    assert len(errors) == 7


# ---- ingress: the stream, through a consumer group ------------------------------------------------------------


async def test_ingress_acknowledges_only_after_the_caller_committed(redis_log: RedisLog,
                                                                   producer: redispy.Redis) -> None:
    stream = f"{redis_log.settings.prefix}ingest"
    ids = [
        producer.xadd(stream, {"type": "scan.done", "payload": json.dumps({"n": 1}), "message_id": "ext-1"}),
        producer.xadd(stream, {"envelope": json.dumps({"type": "scan.done", "payload": 2})}),
        producer.xadd(stream, {"type": "scan.done", "payload": "3", "metadata": json.dumps({"source": "x"})}),
    ]
    ingress = RedisIngress(redis_log, stream, consumer="node-a", block_s=0.1)
    with trio.fail_after(WAIT_S):
        entries = await ingress.read()
    assert [e.entry_id for e in entries] == ids and all(e.error is None for e in entries)
    assert [e.envelope.payload for e in entries if e.envelope] == [{"n": 1}, 2, 3]
    assert entries[0].envelope and entries[0].envelope.message_id == "ext-1"
    assert entries[1].envelope and entries[1].envelope.message_id == f"{stream}/{ids[1]}"
    assert producer.xpending(stream, "aivad")["pending"] == 3  # read is not acknowledged

    # the node dies before committing: another ingress with the same consumer name gets them again
    again = RedisIngress(redis_log, stream, consumer="node-a", block_s=0.1)
    with trio.fail_after(WAIT_S):
        redelivered = await again.read()
    assert [e.entry_id for e in redelivered] == ids
    first = await redis_log.append_many([e.envelope for e in entries if e.envelope])
    second = await redis_log.append_many([e.envelope for e in redelivered if e.envelope])
    assert [a.seq for a in second] == [a.seq for a in first] and all(a.duplicate for a in second)
    assert producer.xpending(stream, "aivad")["pending"] == 3
    assert await again.ack(redelivered) == 3
    assert producer.xpending(stream, "aivad")["pending"] == 0


async def test_ingress_reports_bad_entries_and_dead_letters_them(redis_log: RedisLog,
                                                                 producer: redispy.Redis) -> None:
    stream = f"{redis_log.settings.prefix}ingest"
    bad = {
        producer.xadd(stream, {"type": "ok.one", "payload": "{not json"}): "payload is not JSON",
        producer.xadd(stream, {"type": "ok.one", "paylaod": "1"}): "unknown entry fields paylaod",
        producer.xadd(stream, {"payload": "1"}): "needs envelope, or type",
        producer.xadd(stream, {"type": "no spaces allowed", "payload": "1"}): "every dot-separated word",
        producer.xadd(stream, {"envelope": "[1, 2]"}): "envelope must be a JSON object",
    }
    good = producer.xadd(stream, {"type": "ok.two", "payload": "null"})
    ingress = RedisIngress(redis_log, stream, consumer="node-a", block_s=0.1, dead_stream=f"{stream}:dead")
    with trio.fail_after(WAIT_S):
        entries = await ingress.read()
    for entry in entries:
        if entry.entry_id == good:
            assert entry.error is None and entry.envelope and entry.envelope.payload is None
        else:
            assert entry.envelope is None and entry.error and bad[entry.entry_id] in entry.error
    await ingress.reject([(e, e.error) for e in entries if e.error])
    await redis_log.append_many([e.envelope for e in entries if e.envelope])
    await ingress.ack([e for e in entries if e.envelope])
    assert producer.xpending(stream, "aivad")["pending"] == 0
    dead = producer.xrange(f"{stream}:dead")
    assert [d["entry_id"] for _, d in dead] == list(bad)
    assert all(d["stream"] == stream and bad[d["entry_id"]] in d["reason"] for _, d in dead)
    assert json.loads(dead[1][1]["fields"]) == {"type": "ok.one", "paylaod": "1"}
    stats = ingress.statistics()
    assert (stats.read, stats.rejected, stats.acked, stats.claimed) == (6, 5, 1, 0)


async def test_an_entry_over_max_entry_bytes_is_refused_unparsed_and_its_dead_letter_keeps_heads(
    redis_log: RedisLog, producer: redispy.Redis
) -> None:
    stream = f"{redis_log.settings.prefix}ingest"
    fields = {"type": "big.one", "payload": json.dumps("x" * 5000)}
    size = sum(len(k) + len(v) for k, v in fields.items())
    big = producer.xadd(stream, fields)
    fits = producer.xadd(stream, {"type": "small.one", "payload": json.dumps("y" * 4997)})  # size - 1 bytes
    ingress = RedisIngress(redis_log, stream, consumer="node-a", block_s=0.1, max_entry_bytes=size - 1)
    with trio.fail_after(WAIT_S):
        first, second = await ingress.read()
    assert (first.entry_id, first.envelope) == (big, None)  # one byte over
    assert first.error == f"entry is {size} bytes, over ingest_max_entry_bytes ({size - 1})"
    assert first.fields == {"type": "big.one", "payload": '"' + "x" * 255}  # each value's first 256 bytes
    assert second.entry_id == fits and second.envelope and second.envelope.payload == "y" * 4997  # at the limit


async def test_ingress_claims_the_pending_entries_of_a_dead_consumer(redis_log: RedisLog,
                                                                     producer: redispy.Redis) -> None:
    stream = f"{redis_log.settings.prefix}ingest"
    ids = [producer.xadd(stream, {"type": "t.x", "payload": str(i)}) for i in range(3)]
    dead = RedisIngress(redis_log, stream, consumer="node-dead", block_s=0.1)
    with trio.fail_after(WAIT_S):
        assert [e.entry_id for e in await dead.read()] == ids  # and then it dies without acking
    alive = RedisIngress(redis_log, stream, consumer="node-alive", block_s=0.1, claim_idle_s=0.05,
                         claim_interval_s=0.05)
    later = producer.xadd(stream, {"type": "t.x", "payload": "9"})
    claimed: list[str] = []
    with trio.fail_after(WAIT_S):
        while len(claimed) < 4:
            entries = await alive.read()
            claimed += [e.entry_id for e in entries]
            await alive.ack(entries)  # committed at once (else they too would be claimed after claim_idle_s)
    assert sorted(claimed) == sorted([*ids, later]) and alive.claimed == 3
    assert producer.xpending(stream, "aivad")["pending"] == 0


async def test_ingress_survives_pending_entries_deleted_from_the_stream(redis_log: RedisLog,
                                                                        producer: redispy.Redis) -> None:
    stream = f"{redis_log.settings.prefix}ingest"
    ids = [producer.xadd(stream, {"type": "t.x", "payload": str(i)}) for i in range(3)]
    first = RedisIngress(redis_log, stream, consumer="node-a", block_s=0.1)
    with trio.fail_after(WAIT_S):
        await first.read()
    producer.xdel(stream, ids[1])  # e.g. trimmed by the producer while pending
    again = RedisIngress(redis_log, stream, consumer="node-a", block_s=0.1)
    with trio.fail_after(WAIT_S):
        entries = await again.read()
    assert [e.entry_id for e in entries] == [ids[0], ids[2]]
    assert producer.xpending(stream, "aivad")["pending"] == 2  # the deleted one was acknowledged


async def test_ingress_recreates_a_lost_group(redis_log: RedisLog, producer: redispy.Redis) -> None:
    stream = f"{redis_log.settings.prefix}ingest"
    ingress = RedisIngress(redis_log, stream, consumer="node-a", block_s=0.1)
    await ingress.ensure_group()
    producer.xgroup_destroy(stream, "aivad")
    entry = producer.xadd(stream, {"type": "t.x", "payload": "1"})
    with trio.fail_after(WAIT_S):
        assert [e.entry_id for e in await ingress.read()] == [entry]


# ---- ingress: pub/sub channels -------------------------------------------------------------------------------


async def test_channel_ingress_takes_publishes_and_drops_what_it_cannot_hold(redis_log: RedisLog,
                                                                           producer: redispy.Redis) -> None:
    prefix = redis_log.settings.prefix.rstrip(":")
    async with open_channel_ingress(redis_log, [f"{prefix}.*"], buffer=2) as ingress:
        assert producer.publish(f"{prefix}.one", json.dumps({"x": 1})) == 1
        producer.publish(f"{prefix}.bad channel", "1")  # not a topic: dropped, counted
        with trio.fail_after(WAIT_S):
            env = await ingress.__anext__()
            while ingress.received < 2:
                await trio.sleep(0.01)
        assert (env.type, env.payload) == (f"{prefix}.one", {"x": 1}) and ingress.invalid == 1
        for i in range(5):
            producer.publish(f"{prefix}.two", str(i))
        with trio.fail_after(WAIT_S):
            while ingress.received < 7:
                await trio.sleep(0.01)
            batch = await ingress.receive_batch(10)
        assert [e.payload for e in batch] == [0, 1] and ingress.dropped == 3


async def test_channel_ingress_drops_a_message_over_max_message_bytes(redis_log: RedisLog,
                                                                    producer: redispy.Redis) -> None:
    prefix = redis_log.settings.prefix.rstrip(":")
    async with open_channel_ingress(redis_log, [f"{prefix}.*"], max_message_bytes=1024) as ingress:
        producer.publish(f"{prefix}.big", json.dumps("x" * 2000))
        producer.publish(f"{prefix}.small", "2")
        with trio.fail_after(WAIT_S):
            env = await ingress.__anext__()
        assert (env.type, env.payload) == (f"{prefix}.small", 2) and ingress.invalid == 1


async def test_channel_ingress_connection_loss_is_redis_unavailable() -> None:
    own = Redis().start()
    try:
        async with open_redis_log(settings_for(own)) as lg:
            with pytest.raises(RedisUnavailable), trio.fail_after(WAIT_S):
                async with open_channel_ingress(lg, ["x.*"]) as ingress:
                    await trio.to_thread.run_sync(own.stop_server)
                    await ingress.__anext__()
    finally:
        own.stop()


# ---- nodes ----------------------------------------------------------------------------------------------------


async def test_heartbeats_and_live_nodes(redis_log: RedisLog) -> None:
    await redis_log.heartbeat("node-a", {"connections": 3, "subscriptions": 7}, ttl_s=30)
    await redis_log.heartbeat("node-b", {"connections": 1, "subscriptions": 0}, ttl_s=0.05)
    nodes = await redis_log.live_nodes()
    assert [n.name for n in nodes] == ["node-a", "node-b"]
    assert nodes[0].info == {"connections": 3, "subscriptions": 7}
    assert nodes[0].expires - nodes[0].last_seen == pytest.approx(30)
    await trio.sleep(0.1)
    assert [n.name for n in await redis_log.live_nodes()] == ["node-a"]
    await redis_log.forget_node("node-a")
    assert await redis_log.live_nodes() == []


async def test_a_node_is_seen_alive_as_soon_as_its_log_is_open(redis_server: Redis, tmp_dir: Path) -> None:
    """``serve_cluster_log`` is started only after the node's first heartbeat: a claim the node
    makes right after (its dispatcher starts next) is never taken for an orphan's by the others."""
    redis_cfg = RedisConfig(enabled=True, url=redis_server.url, prefix=f"t{uuid.uuid4().hex[:10]}:")
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            cluster = await nursery.start(serve_cluster_log, redis_cfg, ClusterConfig("fresh", 30.0),
                                          StoreConfig(path=str(tmp_dir / "unused.db")), dict)
            assert [n.name for n in cluster.nodes] == ["fresh"], "read back before started()"
            assert [n.name for n in await cluster.redis.live_nodes()] == ["fresh"]
            nursery.cancel_scope.cancel()


async def test_a_lost_log_is_adopted_with_its_epoch_newest_seq_and_floor_in_one_step(
    redis_server: Redis, producer: redispy.Redis, tmp_dir: Path
) -> None:
    """Redis lost the log: the node takes the new log's epoch, newest seq and floor together. A
    resume answered while it had the new epoch but the old floor started below the new log's
    floor and was closed as overtaken (found by CI, stop 20); a task looking at every scheduling
    point sees the old triple, then the new one, never a mix."""
    prefix = f"t{uuid.uuid4().hex[:10]}:"
    redis_cfg = RedisConfig(enabled=True, url=redis_server.url, prefix=prefix)
    seen: set[tuple[str, int, int]] = set()
    resets: list[str] = []
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            cluster = await nursery.start(serve_cluster_log, redis_cfg, ClusterConfig("lost", 30.0),
                                          StoreConfig(path=str(tmp_dir / "unused.db")), dict)
            cluster.on_reset(resets.append)
            await cluster.append_many(envs("old", 10))
            while cluster.last_seq < 10:
                await trio.sleep(0.01)
            old = (cluster.epoch, cluster.last_seq, cluster.retention_floor)

            async def watch() -> None:
                while True:
                    seen.add((cluster.epoch, cluster.last_seq, cluster.retention_floor))
                    await trio.lowlevel.checkpoint()

            nursery.start_soon(watch)
            for key in producer.scan_iter(f"{prefix}*"):
                producer.delete(key)
            while not resets:
                await trio.sleep(0.01)
            info = await cluster.redis.info()
            new = (info.epoch, info.last_seq, info.retention_floor)
            nursery.cancel_scope.cancel()
    assert old[1:] == (10, 0) and new[1:] == (10, 10) and new[0] != old[0]
    assert seen == {old, new}


# ---- mapping (pure) ---------------------------------------------------------------------------------------


def test_envelope_from_entry_forms() -> None:
    env = envelope_from_entry({"type": "a.b", "payload": "[1]", "message_id": "m", "timestamp": "2026-01-01T00:00:00Z",
                               "metadata": '{"k": 1}'}, "dflt")
    assert (env.type, env.payload, env.message_id, env.metadata, env.timestamp) == (
        "a.b", [1], "m", {"k": 1}, "2026-01-01T00:00:00Z")
    assert envelope_from_entry({"type": "a.b"}, "dflt").payload is None
    assert envelope_from_entry({"envelope": '{"type": "a", "payload": 1}', "message_id": "beside"}, "d").message_id \
        == "beside"
    assert envelope_from_entry({"envelope": '{"type": "a", "message_id": "inner"}'}, "d").message_id == "inner"
    for fields in ({"envelope": "{}"}, {"envelope": '{"type": "a"}', "type": "b"}, {"type": "a", "metadata": "[]"},
                   {"type": "a", "payload": "nope"}, {}):
        with pytest.raises(BadMessage):
            envelope_from_entry(fields, "d")


def test_envelope_from_channel_forms() -> None:
    assert envelope_from_channel("a.b", '{"x": 1}').payload == {"x": 1}
    assert envelope_from_channel("a.b", "not json").payload == "not json"
    env = envelope_from_channel("a.b", '{"type": "c.d", "payload": 2, "message_id": "m"}')
    assert (env.type, env.payload, env.message_id) == ("c.d", 2, "m")
    with pytest.raises(BadMessage):
        envelope_from_channel("bad topic", "1")
