"""AMQP in a cluster (DESIGN §5): every node a competing consumer of ``aivad.events``; each message stored once.

Test policy: a real RabbitMQ and a real Redis (the session's; each test its own
exchanges, queues and key prefix), real ``aivad serve`` nodes; the producer is
pika. A node's death is a real ``kill -9``: its unacknowledged deliveries go back
to the queue and to the other node, and the log's ``message_id`` de-duplication
stores them once.
"""

from __future__ import annotations

import json
from typing import Any

import pika
import trio

from tests.brokers import RabbitMQ, Redis
from tests.cluster_fixtures import Cluster
from tests.test_amqp import _amqp_section, get_all, make_cfg, pika_channel, publish
from tests.test_amqp_tasks import FibonacciRpcClient, RawWorker, fib, serve_fib
from tests.wsclient import TestClient, connect


async def all_payloads(client: TestClient, pattern: str) -> list[Any]:
    """Every message of ``pattern`` in the history, paged, in seq order."""
    seen: list[dict[str, Any]] = []
    while True:
        after = seen[-1]["seq"] if seen else 0
        page = await client.ok({"op": "history", "pattern": pattern, "after": after, "limit": 1000})
        if not page["messages"]:
            return [m["payload"] for m in seen]
        seen += page["messages"]


def amqp_ingested(node: Any) -> int:
    return int(node.control({"cmd": "status"})["status"]["ingest"]["by_ingress"].get("amqp", 0))


async def test_competing_nodes_store_each_message_once_even_when_one_is_killed(
        rabbitmq: RabbitMQ, redis_server: Redis) -> None:
    cfg = make_cfg(rabbitmq.url)
    cluster = Cluster(redis_server, amqp={**_amqp_section(cfg), "prefetch": 200})
    n = 3000
    try:
        a = cluster.node("a")
        b = cluster.node("b")
        with trio.fail_after(30):
            while any(not node.control({"cmd": "status"})["status"]["amqp"].get("consuming")
                      for node in (a, b)):
                await trio.sleep(0.1)
        ids = [f"c-{i}" for i in range(n)]
        messages = [("amqp.x", json.dumps({"id": mid}).encode(), pika.BasicProperties(delivery_mode=2, message_id=mid))
                    for mid in ids]
        await trio.to_thread.run_sync(publish, rabbitmq.url, cfg.events_exchange, messages)
        with trio.fail_after(30):
            while amqp_ingested(a) < 200:
                await trio.sleep(0.02)
        a.kill()  # kill -9 mid-stream: what it held unacknowledged goes to b
        async with connect(b.ws_url) as c:
            with trio.fail_after(60):
                while len(payloads := await all_payloads(c, "amqp.#")) < n:
                    await trio.sleep(0.2)
        assert sorted(p["id"] for p in payloads) == sorted(ids)  # every message, each once
        assert amqp_ingested(b) > 0
    finally:
        cluster.stop()


async def test_a_nodes_own_task_events_go_to_the_broker_once(rabbitmq: RabbitMQ, redis_server: Redis) -> None:
    cfg = make_cfg(rabbitmq.url)
    cluster = Cluster(redis_server, amqp=_amqp_section(cfg))
    try:
        a, b = cluster.node("a"), cluster.node("b")
        conn, ch = pika_channel(rabbitmq.url)
        try:  # a queue of our own on the events exchange: what the cluster sent out
            ch.exchange_declare(cfg.events_exchange, "topic", durable=True)
            watch = ch.queue_declare("", exclusive=False, auto_delete=False).method.queue
            ch.queue_bind(watch, cfg.events_exchange, "task.#")
        finally:
            conn.close()
        async with connect(a.ws_url) as worker, connect(b.ws_url) as caller:
            await worker.ok({"op": "worker.hello", "types": ["o.run"], "concurrency": 1})
            # a's worker only: the task is dispatched on a (tasks stay on the node that took them)
            async with connect(a.ws_url) as caller_a:
                task_id = (await caller_a.ok({"op": "dispatch", "type": "o.run", "payload": 1}))["task_id"]
            with trio.fail_after(20):
                while (frame := await worker.receive()).get("op") != "task":
                    pass
            await worker.send({"op": "task.result", "task_id": frame["task"]["task_id"], "result": 2})
            await caller.ok({"op": "subscribe", "pattern": "task.completed"})
            with trio.fail_after(20):
                while not (await caller.ok({"op": "history", "pattern": "task.completed"}))["messages"]:
                    await trio.sleep(0.1)
            await trio.sleep(1.0)  # time for a second copy, if a node were to send one
        sent = [json.loads(body) for _, body in get_all(rabbitmq.url, watch)]
        completed = [e for e in sent if e.get("type") == "task.completed"]
        assert len(completed) == 1 and completed[0]["payload"]["task_id"] == task_id
    finally:
        cluster.stop()
        conn, ch = pika_channel(rabbitmq.url)
        try:
            ch.queue_delete(watch)
        finally:
            conn.close()


async def test_an_amqp_rpc_task_taken_by_any_node_is_served_by_a_worker_on_another_and_answered_once(
        rabbitmq: RabbitMQ, redis_server: Redis) -> None:
    """aivad.tasks consumed by both nodes; the only worker is on b: every call is answered, once."""
    cfg = make_cfg(rabbitmq.url)
    cluster = Cluster(redis_server, amqp=_amqp_section(cfg))
    try:
        a, b = cluster.node("a"), cluster.node("b")
        with trio.fail_after(30):
            while any(len(node.control({"cmd": "status"})["status"]["amqp"].get("consuming", {})) < 2
                      or not all(node.control({"cmd": "status"})["status"]["amqp"]["consuming"].values())
                      for node in (a, b)):
                await trio.sleep(0.1)
        async with connect(b.ws_url) as w, trio.open_nursery() as nursery:
            worker = RawWorker(w)
            await worker.hello(["fib"], concurrency=2)
            nursery.start_soon(serve_fib, worker)

            def rpc() -> list[dict[str, Any]]:
                client = FibonacciRpcClient(rabbitmq.url, cfg.tasks_exchange, "fib")
                try:
                    return [client.call(n) for n in range(1, 11)]
                finally:
                    client.close()

            with trio.fail_after(60):
                replies = await trio.to_thread.run_sync(rpc)
            nursery.cancel_scope.cancel()
        assert [r["result"] for r in replies] == [fib(n) for n in range(1, 11)]
        took = [node.control({"cmd": "status"})["status"]["amqp"]["tasks_submitted"] for node in (a, b)]
        assert sum(took) == 10  # each call accepted once, by whichever node got it
        sent = [node.control({"cmd": "status"})["status"]["amqp"]["replies"] for node in (a, b)]
        assert sent == [0, 10]  # answered by the node that ended the task (b's worker), once
    finally:
        cluster.stop()


async def test_a_poison_delivery_in_a_cluster_is_one_dead_letter_seen_from_every_node(
        rabbitmq: RabbitMQ, redis_server: Redis) -> None:
    """Whichever node takes a delivery that is not an event, its dead letter is the cluster's (in
    Redis): listed and shown the same on both nodes, and both go on storing the good ones."""
    cfg = make_cfg(rabbitmq.url)
    cluster = Cluster(redis_server, amqp={**_amqp_section(cfg), "max_body_bytes": 1024})
    try:
        a, b = cluster.node("a"), cluster.node("b")
        with trio.fail_after(30):
            while any(not node.control({"cmd": "status"})["status"]["amqp"].get("consuming") for node in (a, b)):
                await trio.sleep(0.1)
        await trio.to_thread.run_sync(publish, rabbitmq.url, cfg.events_exchange, [
            ("p.x", b"not json", pika.BasicProperties(message_id="bad-1")),
            ("p.x", b"[" * 1020, pika.BasicProperties(message_id="bad-2")),  # < 1 KiB, too deep
            ("p.x", json.dumps({"pad": "x" * 5000}).encode(), pika.BasicProperties(message_id="bad-3")),
            ("p.ok", b'{"fine": true}', pika.BasicProperties(message_id="ok-1")),
        ])
        with trio.fail_after(30):
            while len(a.control({"cmd": "dlq.list", "kind": "amqp.poison"})["dead_letters"]) < 3:
                await trio.sleep(0.1)
        listed = [node.control({"cmd": "dlq.list", "kind": "amqp.poison"})["dead_letters"] for node in (a, b)]
        assert listed[0] == listed[1] and len(listed[0]) == 3
        shown = [b.control({"cmd": "dlq.show", "id": d["id"]})["dead_letter"] for d in listed[0]]
        by_message = {letter["detail"]["message_id"]: letter for letter in shown}
        assert "not JSON" in by_message["bad-1"]["reason"]
        assert "nested too deeply" in by_message["bad-2"]["reason"]
        assert "over max_body_bytes (1024)" in by_message["bad-3"]["reason"]
        async with connect(b.ws_url) as c:
            with trio.fail_after(20):
                while not (payloads := await all_payloads(c, "p.#")):
                    await trio.sleep(0.1)
        assert payloads == [{"fine": True}]
        for node in (a, b):
            assert node.control({"cmd": "status"})["status"]["ready"] is True
    finally:
        cluster.stop()
