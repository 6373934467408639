"""Tasks across a cluster's nodes (DESIGN §5): real Redis, real ``aivad serve`` nodes, real workers.

A task accepted on one node reaches a worker on another; status, collect,
request and the dead-letter queue answer the same on every node; a node killed
with ``kill -9`` while its workers hold tasks: they run again on a live node
and each ends exactly once (counted in the cluster's history).
"""

from __future__ import annotations

import collections
import json
import signal
from typing import Any

import redis
import trio

from tests.brokers import Redis
from tests.cluster_fixtures import Cluster
from tests.conftest import DaemonProcess, poll_until
from tests.wsclient import TestClient, connect


async def _hello(worker: TestClient, types: list[str], concurrency: int = 1) -> None:
    await worker.ok({"op": "worker.hello", "types": types, "concurrency": concurrency})


async def _next_task(worker: TestClient, timeout_s: float = 20) -> dict[str, Any]:
    with trio.fail_after(timeout_s):
        while (frame := await worker.receive()).get("op") != "task":
            pass
    return dict(frame["task"])


async def _serve(worker: TestClient, n: int, answer: Any = None) -> list[dict[str, Any]]:
    """Take ``n`` tasks and answer each with its payload squared (or ``answer``)."""
    taken = []
    for _ in range(n):
        task = await _next_task(worker)
        taken.append(task)
        result = task["payload"] ** 2 if answer is None else answer
        await worker.send({"op": "task.result", "task_id": task["task_id"], "result": result})
    return taken


async def _task_history(client: TestClient, task_ids: set[str]) -> list[dict[str, Any]]:
    """Every task.* event of these tasks in the cluster's history, in seq order."""
    events, since = [], 0
    while True:
        page = await client.ok({"op": "history", "pattern": "task.#", "after": since, "limit": 1000})
        events += [m for m in page["messages"] if m["payload"]["task_id"] in task_ids]
        if page["last_seq"] == since:
            return events
        since = page["last_seq"]


async def _all_completed(client: TestClient, task_ids: set[str], timeout_s: float = 30) -> list[dict[str, Any]]:
    """Poll ``task.status`` until every task is completed; their statuses."""
    with trio.fail_after(timeout_s):
        while True:
            statuses = [await client.ok({"op": "task.status", "task_id": t}) for t in task_ids]
            if all(s["state"] == "completed" for s in statuses):
                return statuses
            await trio.sleep(0.1)


def _ends(events: list[dict[str, Any]]) -> collections.Counter[str]:
    """How many times each task completed, by the cluster's history."""
    return collections.Counter(e["payload"]["task_id"] for e in events if e["type"] == "task.completed")


async def _dead_task(caller: TestClient, worker: TestClient, node: DaemonProcess) -> tuple[str, list[dict[str, Any]]]:
    """Dispatch a task the worker fails for good; its id, and the dead letters ``node`` lists once it is there."""
    await _hello(worker, ["bad"])
    task_id = (await caller.ok({"op": "dispatch", "type": "bad", "payload": 1, "max_attempts": 1}))["task_id"]
    task = await _next_task(worker)
    await worker.send({"op": "task.fail", "task_id": task["task_id"], "error": "nope", "retryable": False})
    with trio.fail_after(20):
        while not (letters := node.control({"cmd": "dlq.list", "kind": "task"})["dead_letters"]):
            await trio.sleep(0.1)
    return str(task_id), letters


async def test_a_request_sent_to_one_node_is_served_by_a_worker_on_another(cluster: Cluster) -> None:
    a, b = cluster.node("a"), cluster.node("b")
    async with connect(b.ws_url) as worker, connect(a.ws_url) as caller, connect(b.ws_url) as other:
        await _hello(worker, ["sq"])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve, worker, 3)
            for i in (2, 3, 4):
                reply = await caller.ok({"op": "request", "type": "sq", "payload": i, "timeout_s": 20})
                assert reply["result"] == i * i
        task_id = reply["task_id"]
        # status and collect answer the same on the node that took it and on the worker's node
        for client in (caller, other):
            status = await client.ok({"op": "task.status", "task_id": task_id})
            assert (status["state"], status["result"]) == ("completed", 16)
            collected = await client.ok({"op": "collect", "task_ids": [task_id], "timeout_s": 1})
            assert collected["completed"] == {task_id: 16}
    # each node counts the ends it made (metrics summed over the nodes count each task once)
    assert [n.control({"cmd": "status"})["status"]["tasks"]["completed"] for n in (a, b)] == [0, 3]


async def test_collect_on_one_node_waits_for_ends_on_another(cluster: Cluster) -> None:
    a, b = cluster.node("a"), cluster.node("b")
    async with connect(a.ws_url) as worker, connect(b.ws_url) as caller:
        await _hello(worker, ["sq"], concurrency=4)
        ids = [(await caller.ok({"op": "dispatch", "type": "sq", "payload": i, "group_id": "g1"}))["task_id"]
               for i in range(4)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve, worker, 4)
            collected = await caller.ok({"op": "collect", "group_id": "g1", "timeout_s": 20})
        assert collected["reason"] == "all_done"
        assert collected["completed"] == {task_id: i * i for i, task_id in enumerate(ids)}


async def test_dead_letters_are_the_clusters_and_replay_from_any_node(cluster: Cluster) -> None:
    a, b = cluster.node("a"), cluster.node("b")
    async with connect(a.ws_url) as worker, connect(b.ws_url) as caller:
        task_id, letters = await _dead_task(caller, worker, b)
        shown = a.control({"cmd": "dlq.show", "id": letters[0]["id"]})["dead_letter"]
        assert shown["detail"]["task_id"] == task_id and shown["reason"] == "failed: not retryable"
        assert a.control({"cmd": "dlq.list"})["dead_letters"] == letters  # one queue, every node
        assert b.control({"cmd": "dlq.replay", "id": letters[0]["id"]})["replayed"] == [task_id]
        again = await _next_task(worker)  # the worker's node learns of the replay from the log
        assert again["task_id"] == task_id
        await worker.send({"op": "task.result", "task_id": task_id, "result": "fine"})
        with trio.fail_after(20):
            while (await caller.ok({"op": "task.status", "task_id": task_id}))["state"] != "completed":
                await trio.sleep(0.1)
        assert a.control({"cmd": "dlq.list"})["dead_letters"] == []


async def test_dead_tasks_behind_a_flood_of_poison_letters_are_listed_and_replayed(cluster: Cluster) -> None:
    """A read of the cluster's queue filtered by kind stops after 20 pages (10,000 letters) of other
    kinds and says where to go on (``next_after``): a list pages on to the task behind them, and
    ``dlq.replay all`` replays it."""
    client = redis.Redis.from_url(cluster.redis.url)
    key = f"{cluster.prefix}{{log}}:"
    poison = json.dumps({"kind": "amqp.poison", "reason": "bad", "created_at": 0.0, "body": "x", "detail": {}})
    flood = 10_001
    with client.pipeline(transaction=False) as p:
        for i in range(1, flood + 1):
            p.xadd(key + "dlq", {"d": poison}, id=f"{i}-0")
        p.hset(key + "meta", "dlq", flood)
        p.execute()
    a, b = cluster.node("a"), cluster.node("b")
    async with connect(a.ws_url) as worker, connect(b.ws_url) as caller:
        await _hello(worker, ["bad"])
        task_id = (await caller.ok({"op": "dispatch", "type": "bad", "payload": 1, "max_attempts": 1}))["task_id"]
        await worker.send({"op": "task.fail", "task_id": (await _next_task(worker))["task_id"], "error": "nope",
                           "retryable": False})
        with trio.fail_after(20):
            while not b.control({"cmd": "dlq.list", "after": flood})["dead_letters"]:
                await trio.sleep(0.1)
        first = a.control({"cmd": "dlq.list", "kind": "task"})
        assert first["dead_letters"] == [] and first["next_after"] == 10_000  # 20 pages of poison read
        rest = a.control({"cmd": "dlq.list", "kind": "task", "after": first["next_after"]})
        assert [d["id"] for d in rest["dead_letters"]] == [flood + 1] and rest["next_after"] is None
        assert b.control({"cmd": "dlq.replay", "all": True})["replayed"] == [task_id]
        assert (await _next_task(worker))["task_id"] == task_id


async def test_the_clusters_dead_letter_queue_keeps_the_newest_dead_letters_kept(cluster: Cluster) -> None:
    """Past ``[store] dead_letters_kept`` (3 here) a new dead letter trims the stream: the oldest go."""
    client = redis.Redis.from_url(cluster.redis.url)
    key = f"{cluster.prefix}{{log}}:"
    poison = json.dumps({"kind": "amqp.poison", "reason": "bad", "created_at": 0.0, "body": "x", "detail": {}})
    for i in range(1, 6):
        client.xadd(key + "dlq", {"d": poison}, id=f"{i}-0")
    client.hset(key + "meta", "dlq", 5)
    a = cluster.node("a", store={"dead_letters_kept": 3})
    async with connect(a.ws_url) as worker, connect(a.ws_url) as caller:
        task_id, _ = await _dead_task(caller, worker, a)
        assert [d["id"] for d in a.control({"cmd": "dlq.list"})["dead_letters"]] == [4, 5, 6]
        assert a.control({"cmd": "dlq.replay", "id": 6})["replayed"] == [task_id]


async def test_tasks_of_a_node_killed_mid_attempt_run_again_elsewhere_and_end_once(cluster: Cluster) -> None:
    a, b = cluster.node("a"), cluster.node("b")
    n = 6
    async with connect(a.ws_url) as caller:
        async with connect(b.ws_url) as doomed:
            await _hello(doomed, ["job"], concurrency=n)
            ids = {(await caller.ok({"op": "dispatch", "type": "job", "payload": i, "max_attempts": 3}))["task_id"]
                   for i in range(n)}
            held = [await _next_task(doomed) for _ in range(n)]  # every task in flight on b, none answered
            assert {t["task_id"] for t in held} == ids
            b.kill()  # kill -9: no drain, nothing handed back
        async with connect(a.ws_url) as survivor:
            await _hello(survivor, ["job"], concurrency=n)
            taken = await _serve(survivor, n)
        assert {t["task_id"] for t in taken} == ids and all(t["attempt"] == 2 for t in taken)
        await _all_completed(caller, ids)
        events = await _task_history(caller, ids)
    assert _ends(events) == dict.fromkeys(ids, 1)  # each ended exactly once
    lost = [e for e in events if e["type"] == "task.failed"]
    assert len(lost) == n and {e["payload"]["reason"] for e in lost} == {"worker_lost"}


async def test_two_nodes_race_for_tasks_and_each_runs_once(cluster: Cluster) -> None:
    a, b = cluster.node("a"), cluster.node("b")
    n = 40
    async with connect(a.ws_url) as on_a, connect(b.ws_url) as on_b, connect(a.ws_url) as caller:
        await _hello(on_a, ["race"], concurrency=4)
        await _hello(on_b, ["race"], concurrency=4)
        got: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}

        async def work(name: str, worker: TestClient) -> None:
            while True:
                task = await _next_task(worker, timeout_s=60)
                got[name].append(task)
                await worker.send({"op": "task.result", "task_id": task["task_id"], "result": 0})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(work, "a", on_a)
            nursery.start_soon(work, "b", on_b)
            ids = [(await caller.ok({"op": "dispatch", "type": "race", "payload": i}))["task_id"] for i in range(n)]
            collected = await caller.ok({"op": "collect", "task_ids": ids, "timeout_s": 30})
            nursery.cancel_scope.cancel()
    assert collected["reason"] == "all_done", collected["pending"]
    runs = collections.Counter(t["task_id"] for t in got["a"] + got["b"])
    assert runs == dict.fromkeys(ids, 1)  # no task ran twice


async def test_foreign_task_records_in_redis_are_skipped_and_the_nodes_serve_on(cluster: Cluster) -> None:
    """What another writer leaves in the task book (garbage JSON, a wrong spec, a forged event) is
    skipped by every node: they start, count it and serve the real tasks."""
    client = redis.Redis.from_url(cluster.redis.url)
    key = f"{cluster.prefix}{{log}}:"
    bad = {"junk-1": b"{not json", "junk-2": json.dumps({"spec": {"task_id": "junk-2"}, "state": "queued"}),
           "junk-3": json.dumps({"spec": {"task_id": 3, "type": []}, "state": "nope", "attempts": "x"}),
           "junk-4": b"[" * 100_000}  # nested past the recursion limit: json raised RecursionError
    client.hset(key + "task", mapping=bad)
    client.hset(key + "task-v", mapping=dict.fromkeys(bad, 1))
    client.zadd(key + "task-open", dict.fromkeys(bad, 1))
    a, b = cluster.node("a"), cluster.node("b")
    async with connect(b.ws_url) as worker, connect(a.ws_url) as caller:
        # a forged task event for a garbage record: the nodes read the record and skip it
        await caller.publish("task.created", {"task_id": "junk-1", "type": "sq"})
        await _hello(worker, ["sq"])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve, worker, 1)
            reply = await caller.ok({"op": "request", "type": "sq", "payload": 5, "timeout_s": 20})
        assert reply["result"] == 25
        refused = await caller.request({"op": "task.status", "task_id": "junk-2"})
        assert refused["code"] == "not_found"
    for node in (a, b):
        assert node.control({"cmd": "status"})["ok"] and "skipped the record" in node.log()



async def test_affinity_holds_across_nodes(cluster: Cluster) -> None:
    """With the affinity strategy, one key's tasks go to one worker of the cluster, whichever node it is on."""
    strategy = {"tasks": {"default_strategy": "affinity"}}
    a, b = cluster.node("a", **strategy), cluster.node("b", **strategy)
    async with connect(a.ws_url) as on_a, connect(b.ws_url) as on_b, connect(a.ws_url) as caller:
        await _hello(on_a, ["aff"], concurrency=8)
        await _hello(on_b, ["aff"], concurrency=8)
        poll_until(lambda: all(sum(n.get("workers", 0) for n in node.control({"cmd": "status"})["status"]
                                   ["cluster"]["nodes"]) == 2 for node in (a, b)), 20, "both workers seen by both")
        await trio.sleep(1.5)  # a heartbeat round more: each node's ring has the other's worker
        keys = [f"k{i}" for i in range(12)]
        ids = {}
        for round_ in range(3):
            for key in keys:
                reply = await caller.ok({"op": "dispatch", "type": "aff", "payload": round_, "affinity_key": key})
                ids[reply["task_id"]] = key
        got: dict[str, set[str]] = collections.defaultdict(set)

        async def work(name: str, worker: TestClient) -> None:
            while True:
                task = await _next_task(worker, timeout_s=60)
                got[ids[task["task_id"]]].add(name)
                await worker.send({"op": "task.result", "task_id": task["task_id"], "result": 0})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(work, "a", on_a)
            nursery.start_soon(work, "b", on_b)
            collected = await caller.ok({"op": "collect", "task_ids": list(ids), "timeout_s": 30})
            nursery.cancel_scope.cancel()
    assert collected["reason"] == "all_done", collected["pending"]
    assert all(len(names) == 1 for names in got.values()), dict(got)  # one worker per key
    assert {name for names in got.values() for name in names} == {"a", "b"}  # and both nodes' workers serve


async def test_redis_restarted_while_tasks_run_loses_no_outcome(own_redis: Redis) -> None:
    """Results reported while Redis is away wait on their node and are stored when it is back:
    every task ends once, after one attempt; no new task is accepted meanwhile (``overloaded``)."""
    cluster = Cluster(own_redis)
    try:
        a, b = cluster.node("a"), cluster.node("b")
        n = 5
        async with connect(b.ws_url) as worker, connect(a.ws_url) as caller:
            await _hello(worker, ["job"], concurrency=n)
            ids = {(await caller.ok({"op": "dispatch", "type": "job", "payload": i}))["task_id"] for i in range(n)}
            held = [await _next_task(worker) for _ in range(n)]
            await trio.to_thread.run_sync(own_redis.stop_server)
            for task in held:
                await worker.send({"op": "task.result", "task_id": task["task_id"], "result": task["payload"]})
            refused = await caller.request({"op": "dispatch", "type": "job", "payload": 99})
            assert refused["code"] == "overloaded"
            await trio.sleep(1.0)  # the results wait on b, several retries long
            await trio.to_thread.run_sync(own_redis.start)
            statuses = await _all_completed(caller, ids)
            assert {s["attempts"] for s in statuses} == {1}
            events = await _task_history(caller, ids)
        assert _ends(events) == dict.fromkeys(ids, 1)
    finally:
        cluster.stop()


async def test_a_draining_node_hands_its_tasks_back_to_the_cluster(cluster: Cluster) -> None:
    """SIGTERM on b while its worker holds tasks: they go back to the queue (the attempt does not
    count) and a's worker runs them — although a had already read them as b's (it lost the claim
    race for each), so only the hand-back's announcement tells a they are free again."""
    a, b = cluster.node("a"), cluster.node("b")
    n = 3
    async with connect(a.ws_url) as caller, connect(a.ws_url) as on_a:
        await _hello(on_a, ["job"], concurrency=1)
        blocker = (await caller.ok({"op": "dispatch", "type": "job", "payload": -1}))["task_id"]
        assert (await _next_task(on_a))["task_id"] == blocker  # a's only slot is busy
        async with connect(b.ws_url) as held:
            await _hello(held, ["job"], concurrency=n)
            ids = {(await caller.ok({"op": "dispatch", "type": "job", "payload": i}))["task_id"] for i in range(n)}
            assert {(await _next_task(held))["task_id"] for _ in range(n)} == ids
            await on_a.send({"op": "task.result", "task_id": blocker, "result": 0})
            await trio.sleep(1.0)  # a's free slot tries each task, loses the CAS, reads it as b's
            b.signal(signal.SIGTERM)
            assert await trio.to_thread.run_sync(b.wait) == 0, b.log()
        taken = await _serve(on_a, n)
        assert {t["task_id"] for t in taken} == ids and {t["attempt"] for t in taken} == {1}
        assert {s["attempts"] for s in await _all_completed(caller, ids)} == {1}

async def test_foreign_entries_in_the_dead_letter_queue_and_the_running_set_are_skipped(cluster: Cluster) -> None:
    """Another writer's dead-letter entries are not letters (skipped); a running entry naming a node that
    never was, for a task that does not exist, is not a task to retry: the nodes list, reap and serve on."""
    client = redis.Redis.from_url(cluster.redis.url)
    key = f"{cluster.prefix}{{log}}:"
    client.xadd(key + "dlq", {"d": "{not json"}, id="1-0")
    client.xadd(key + "dlq", {"x": "y"}, id="2-0")
    client.xadd(key + "dlq", {"d": json.dumps({"kind": "task"})}, id="3-0")
    client.xadd(key + "dlq", {"d": "[" * 100_000}, id="3-1")
    client.hset(key + "meta", "dlq", 3)
    client.hset(key + "task-running", mapping={"ghost-task": "ghost-node", "x" * 300: "y" * 300})
    a, b = cluster.node("a"), cluster.node("b")
    assert a.control({"cmd": "dlq.list"})["dead_letters"] == []
    async with connect(b.ws_url) as worker, connect(a.ws_url) as caller:
        task_id, letters = await _dead_task(caller, worker, b)
        assert [(d["id"], d["kind"]) for d in letters] == [(4, "task")]  # ids go on after the foreign ones
        assert a.control({"cmd": "dlq.show", "id": 4})["dead_letter"]["detail"]["task_id"] == task_id
        await trio.sleep(2.5)  # reap rounds (heartbeat 0.5 s) pass over the ghost entries
        assert (await caller.ok({"op": "ping"}))["op"] == "pong"
    for node in (a, b):
        assert node.control({"cmd": "status"})["status"]["ready"] is True
        assert "Traceback" not in node.log(), node.log()[-3000:]
