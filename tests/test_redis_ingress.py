"""Redis ingress (DESIGN §5): ``[redis] ingest_stream`` through a consumer group, ``ingest_channels`` by PSUBSCRIBE.

Test policy: a real redis-server (the session's; each test its own key prefix and
stream name), real ``aivad serve`` nodes, producers with redis-py (an independent
client). Poison entries are real entries; a node's death is a real ``kill -9``.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import trio

from tests.brokers import Redis
from tests.cluster_fixtures import Cluster
from tests.conftest import free_port
from tests.test_cluster import messages_until
from tests.wsclient import connect


@pytest.fixture
def stream() -> str:
    return f"ingest-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def producer(redis_server: Redis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        client.close()


def ingress_cluster(redis_server: Redis, stream: str, **redis_cfg: Any) -> Cluster:
    return Cluster(redis_server, redis={"ingest_stream": stream, **redis_cfg})


async def until(predicate: Any, timeout_s: float = 20) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.05)


def pending(producer: redis.Redis, stream: str) -> int:
    return int(producer.xpending(stream, "aivad")["pending"])


POISON: list[tuple[dict[str, Any], str]] = [
    ({"type": "in.x", "payload": "{not json"}, "payload is not JSON"),
    ({"type": "in.x", "paylaod": "1"}, "paylaod"),
    ({"payload": "1"}, "type"),
    ({"type": "in..x", "payload": "1"}, "type"),
    ({"envelope": "[1, 2]"}, "envelope"),
    ({"type": b"in.\xff", "payload": "1"}, "UTF-8"),
    ({"type": "in.x", "payload": json.dumps("x" * 2_000_000)}, "over ingest_max_entry_bytes (1048576)"),
    ({"type": "in.x", "payload": "[" * 100_000}, "nested too deeply"),
    ({"type": "in.x", "payload": '{"x": NaN}'}, "NaN is not JSON"),  # no browser reads it back
]


async def test_stream_entries_are_stored_once_in_order_poison_is_dead_lettered_and_all_acknowledged(
        redis_server: Redis, stream: str, producer: redis.Redis) -> None:
    cluster = ingress_cluster(redis_server, stream)
    try:
        http_port = free_port()
        a = cluster.node("a", http={"enabled": True, "port": http_port})
        async with connect(a.ws_url) as sub:
            await sub.ok({"op": "subscribe", "pattern": "in.#"})
            producer.xadd(stream, {"type": "in.x", "payload": json.dumps({"n": 1})})
            for fields, _ in POISON[:3]:
                producer.xadd(stream, fields)
            producer.xadd(stream, {"envelope": json.dumps({"type": "in.y", "payload": 2, "metadata": {"k": "v"}}),
                                   "message_id": "same"})
            producer.xadd(stream, {"type": "in.y", "payload": "3", "message_id": "same"})  # stored once
            for fields, _ in POISON[3:]:
                producer.xadd(stream, fields)
            producer.xadd(stream, {"type": "in.z", "payload": "null"})
            got = await messages_until(sub, 3)
        assert [(m["type"], m["payload"]) for m in got] == [("in.x", {"n": 1}), ("in.y", 2), ("in.z", None)]
        assert got[1]["metadata"]["k"] == "v" and got[1]["message_id"] == "same"
        await until(lambda: pending(producer, stream) == 0)
        letters = a.control({"cmd": "dlq.list", "kind": "redis"})["dead_letters"]
        assert len(letters) == len(POISON)
        for letter, (_, why) in zip(letters, POISON, strict=True):
            assert why in letter["reason"], letter
        status = a.control({"cmd": "status"})["status"]["redis_ingress"]
        assert status["dead_lettered"] == len(POISON) and status["stream"]["acked"] == 4 + len(POISON)  # every entry
        assert a.control({"cmd": "status"})["status"]["ingest"]["by_ingress"]["redis"] == 3
        metrics = await trio.to_thread.run_sync(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10).read().decode())
        for line in ('aivad_messages_ingested_total{ingress="redis"} 3.0', "aivad_cluster_nodes 1.0",
                     "aivad_cluster_redis_up 1.0", f"aivad_redis_ingress_dead_letters_total {len(POISON)}.0"):
            assert line in metrics, line
    finally:
        cluster.stop()


async def test_a_flood_of_poison_keeps_the_clusters_dead_letter_queue_at_dead_letters_kept(
        redis_server: Redis, stream: str, producer: redis.Redis) -> None:
    """A producer sending nothing but garbage (oversized, one over the entry limit, broken JSON) fills
    the dead-letter stream in Redis no further than ``[store] dead_letters_kept``: each new letter trims
    the oldest. A good entry behind the flood still reaches a subscriber."""
    cluster = ingress_cluster(redis_server, stream)
    try:
        a = cluster.node("a", store={"dead_letters_kept": 5})
        async with connect(a.ws_url) as sub:
            await sub.ok({"op": "subscribe", "pattern": "in.#"})
            with producer.pipeline(transaction=False) as p:
                for i in range(120):
                    p.xadd(stream, POISON[i % len(POISON)][0])
                p.xadd(stream, {"type": "in.x", "payload": "1" * 1_048_577})  # one over: poison
                p.xadd(stream, {"type": "in.ok", "payload": "7"})
                p.execute()
            got = await messages_until(sub, 1)
        assert [(m["type"], m["payload"]) for m in got] == [("in.ok", 7)]
        await until(lambda: pending(producer, stream) == 0)
        letters = a.control({"cmd": "dlq.list", "kind": "redis"})["dead_letters"]
        assert [letter["id"] for letter in letters] == list(range(117, 122))  # the newest 5 of 121
        assert "over ingest_max_entry_bytes" in letters[-1]["reason"]
        assert producer.xlen(f"{cluster.prefix}{{log}}:dlq") == 5
    finally:
        cluster.stop()


async def test_entries_a_killed_node_held_are_taken_over_and_stored_once(
        redis_server: Redis, stream: str, producer: redis.Redis) -> None:
    cluster = ingress_cluster(redis_server, stream, ingest_claim_idle_s=1.0, ingest_batch=50)
    n = 3000
    try:
        with producer.pipeline(transaction=False) as p:
            for i in range(n):
                p.xadd(stream, {"type": "kill.x", "payload": str(i)})
            p.execute()
        a = cluster.node("a")
        await until(lambda: a.control({"cmd": "status"})["status"]["ingest"]["by_ingress"].get("redis", 0) > 100)
        a.kill()  # kill -9 with entries read and not yet acknowledged
        held = pending(producer, stream)
        b = cluster.node("b")
        await until(lambda: pending(producer, stream) == 0 and producer.xinfo_groups(stream)[0]["lag"] == 0, 60)
        assert b.control({"cmd": "status"})["status"]["redis_ingress"]["stream"]["claimed"] >= held
        async with connect(b.ws_url) as c:
            seen: list[int] = []
            after = 0
            while True:
                page = await c.ok({"op": "history", "pattern": "kill.#", "after": after, "limit": 1000})
                seen += [m["payload"] for m in page["messages"]]
                if not page["messages"]:
                    break
                after = page["messages"][-1]["seq"]
        assert sorted(seen) == list(range(n))  # every entry, each once
    finally:
        cluster.stop()


async def test_channel_messages_are_stored_with_the_channel_as_type(
        redis_server: Redis, stream: str, producer: redis.Redis) -> None:
    cluster = ingress_cluster(redis_server, "", ingest_channels=["chan.*"])
    try:
        a = cluster.node("a")
        await until(lambda: a.control({"cmd": "status"})["status"]["redis_ingress"]["channels"]["subscribed"])
        async with connect(a.ws_url) as sub:
            await sub.ok({"op": "subscribe", "pattern": "chan.#"})
            producer.publish("chan.one", json.dumps({"a": 1}))
            producer.publish("chan.two", "plain text")
            producer.publish("other", "not subscribed")
            got = await messages_until(sub, 2)
        assert [(m["type"], m["payload"]) for m in got] == [("chan.one", {"a": 1}), ("chan.two", "plain text")]
        channels = a.control({"cmd": "status"})["status"]["redis_ingress"]["channels"]
        assert channels["stored"] == 2 and channels["received"] == 2
    finally:
        cluster.stop()


async def test_an_ingest_key_of_another_type_ends_the_reader_alone_and_the_node_serves_on(
        redis_server: Redis, stream: str, producer: redis.Redis) -> None:
    producer.set(stream, "not a stream")  # a misconfiguration, not Redis being away: not retried forever
    cluster = ingress_cluster(redis_server, stream)
    try:
        a = cluster.node("a")
        async with connect(a.ws_url) as c:
            await c.ok({"op": "subscribe", "pattern": "system.alert", "since": 0})  # it failed at the start
            with trio.fail_after(20):
                while (alert := (await c.messages(1))[0]["msg"])["payload"]["code"] != "unit_failed":
                    pass
            assert "redis.ingress" in alert["payload"]["message"]
            assert (await c.publish("still.serving", 1))["seq"] > 0
        assert a.control({"cmd": "status"})["status"]["ready"] is True
    finally:
        cluster.stop()
