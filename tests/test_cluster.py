"""Several aivad nodes as one cluster on Redis (DESIGN §5), with real `aivad serve` processes.

Test policy: a real redis-server (the session's ``redis_server``; each test its own
key prefix, so tests share the server without sharing a cluster), two or three
real ``aivad serve`` subprocesses per test on free ports with their own temp dirs,
real WebSocket clients. Node deaths are real (``kill -9``), Redis restarts are real.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
import trio
from trio_websocket import ConnectionClosed

from tests.brokers import Redis
from tests.cluster_fixtures import Cluster
from tests.conftest import free_port, poll_until, short_tmp_dir
from tests.test_docs import fenced_blocks
from tests.wsclient import TestClient, connect, no_more_messages


async def messages_until(client: TestClient, n: int) -> list[dict[str, Any]]:
    with trio.fail_after(20):
        return [frame["msg"] for frame in await client.messages(n)]


async def test_a_message_published_on_one_node_reaches_subscribers_on_both_once_in_order(cluster: Cluster) -> None:
    a, b = cluster.node("a"), cluster.node("b")
    async with connect(a.ws_url) as on_a, connect(b.ws_url) as on_b, connect(a.ws_url) as pub_a, \
            connect(b.ws_url) as pub_b:
        await on_a.ok({"op": "subscribe", "pattern": "x.#"})
        await on_b.ok({"op": "subscribe", "pattern": "x.#"})
        seqs = []
        for i in range(20):
            publisher = pub_a if i % 2 else pub_b
            seqs.append((await publisher.publish("x.y", i))["seq"])
        assert seqs == sorted(seqs) and len(set(seqs)) == 20  # one seq, cluster-wide
        got_a, got_b = await messages_until(on_a, 20), await messages_until(on_b, 20)
        assert [m["seq"] for m in got_a] == [m["seq"] for m in got_b] == seqs
        assert [m["payload"] for m in got_a] == list(range(20))


async def test_de_duplication_and_history_are_cluster_wide(cluster: Cluster) -> None:
    a, b = cluster.node("a"), cluster.node("b")
    async with connect(a.ws_url) as on_a, connect(b.ws_url) as on_b:
        first = await on_a.publish("d.x", 1, message_id="same-id")
        again = await on_b.publish("d.x", 2, message_id="same-id")
        assert (again["seq"], again["duplicate"]) == (first["seq"], True)
        history = await on_b.ok({"op": "history", "pattern": "d.#"})
        assert [m["payload"] for m in history["messages"]] == [1]


async def test_resume_on_another_node_without_gap_or_duplicate(cluster: Cluster) -> None:
    a, b = cluster.node("a"), cluster.node("b")
    async with connect(a.ws_url) as sub, connect(a.ws_url) as pub:
        ok = await sub.ok({"op": "subscribe", "pattern": "r.#"})
        epoch = ok["epoch"]
        for i in range(5):
            await pub.publish("r.x", i)
        seen = await messages_until(sub, 5)
    async with connect(b.ws_url) as pub_b:
        for i in range(5, 10):
            await pub_b.publish("r.x", i)
    async with connect(b.ws_url) as sub_b:  # a node this client never talked to
        resumed = await sub_b.ok({"op": "subscribe", "pattern": "r.#", "since": seen[-1]["seq"], "epoch": epoch})
        assert resumed["recovered"] is True and resumed["epoch"] == epoch
        rest = await messages_until(sub_b, 5)
    assert [m["payload"] for m in seen + rest] == list(range(10))


async def test_status_shows_every_live_node(cluster: Cluster) -> None:
    a, b = cluster.node("a"), cluster.node("b")
    with trio.fail_after(10):
        while True:
            status = a.control({"cmd": "status"})["status"]
            if len(status["cluster"]["nodes"]) == 2:
                break
            await trio.sleep(0.1)
    assert status["cluster"]["node_name"] == "a" and status["ready"] is True
    assert [n["name"] for n in status["cluster"]["nodes"]] == ["a", "b"]
    b.signal(signal.SIGTERM)  # a clean stop forgets the node at once, and exits 0
    assert await trio.to_thread.run_sync(b.wait) == 0, b.log()
    with trio.fail_after(10):
        while len(a.control({"cmd": "status"})["status"]["cluster"]["nodes"]) != 1:
            await trio.sleep(0.1)




async def _publish_all(url: str, n: int, start: int, acked: list[int], topic: str = "load.x") -> None:
    """Publish ``n`` messages; keep the seq of each acknowledged one; retry what was refused (overloaded).
    Ends early, quietly, when the node goes away (its connection resets)."""
    with contextlib.suppress(ConnectionClosed):
        await _publish(url, n, start, acked, topic)


async def _publish(url: str, n: int, start: int, acked: list[int], topic: str) -> None:
    async with connect(url) as pub:
        for i in range(start, start + n):
            while True:
                reply = await pub.request({"op": "publish", "type": topic, "payload": i, "message_id": f"m{i}"})
                if reply["op"] == "ok":
                    acked.append(reply["seq"])
                    break
                assert reply["code"] == "overloaded", reply
                await trio.sleep(0.05)


async def test_redis_restarted_under_load_loses_nothing_acknowledged_and_readyz_says_why(own_redis: Redis) -> None:
    cluster = Cluster(own_redis, http={"enabled": True, "port": 0})
    try:
        a, b = cluster.node("a"), cluster.node("b")
        acked: list[int] = []
        async with connect(b.ws_url) as sub:
            await sub.ok({"op": "subscribe", "pattern": "load.#"})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_publish_all, a.ws_url, 300, 0, acked)
                with trio.fail_after(20):
                    while len(acked) < 100:
                        await trio.sleep(0.01)
                await trio.to_thread.run_sync(own_redis.stop_server)
                with trio.fail_after(20):  # not ready while Redis is gone
                    while a.control({"cmd": "status"})["status"]["ready"]:
                        await trio.sleep(0.05)
                assert any("redis" in r for r in a.control({"cmd": "status"})["status"]["not_ready_because"])
                await trio.to_thread.run_sync(own_redis.start)
            with trio.fail_after(30):
                while not a.control({"cmd": "status"})["status"]["ready"]:
                    await trio.sleep(0.05)
            got = await messages_until(sub, 300)
        assert [m["payload"] for m in got] == list(range(300))  # in order, once, nothing lost
        assert sorted(acked) == [m["seq"] for m in got]
    finally:
        cluster.stop()


async def test_a_node_killed_under_load_loses_nothing_acknowledged(cluster: Cluster) -> None:
    a, b = cluster.node("a"), cluster.node("b")
    acked: list[int] = []
    async with connect(b.ws_url) as sub:
        await sub.ok({"op": "subscribe", "pattern": "load.#"})
        with trio.move_on_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_publish_all, a.ws_url, 100_000, 0, acked)
                with trio.fail_after(20):
                    while len(acked) < 200:
                        await trio.sleep(0.01)
                a.kill()  # kill -9 mid-stream: the publisher's connection resets
        got = await messages_until(sub, len(acked))
    stored = {m["seq"] for m in got}
    assert set(acked) <= stored  # every acknowledged publish reached the subscriber on the other node
    assert [m["seq"] for m in got] == sorted(stored)


async def test_the_epoch_after_the_log_is_lost(own_redis: Redis) -> None:
    lost = Cluster(own_redis)
    try:
        a = lost.node("a")
        async with connect(a.ws_url) as c:
            ok = await c.ok({"op": "subscribe", "pattern": "e.#"})
            for i in range(3):
                await c.publish("e.x", i)
            await messages_until(c, 3)
            await trio.to_thread.run_sync(own_redis.flushall)
            # the live subscription ends (the history it followed is gone) ...
            with trio.fail_after(20), pytest.raises(ConnectionClosed) as closed:
                while True:
                    await c.receive()
            assert closed.value.reason.code == 4008
        async with connect(a.ws_url) as c:  # ... and its resume is told: another epoch
            again = await c.ok({"op": "subscribe", "pattern": "e.#", "since": 3, "epoch": ok["epoch"]})
            assert again["epoch"] != ok["epoch"] and again["epoch_changed"] is True and again["recovered"] is False
            await c.publish("e.x", "new")
            (msg,) = await messages_until(c, 1)
            assert msg["payload"] == "new" and msg["seq"] > 3  # seqs are not handed out twice
    finally:
        lost.stop()


async def test_task_events_of_one_node_reach_subscribers_on_every_node_once(cluster: Cluster) -> None:
    """The journal: what a node commits itself (task.* with its task) reaches the cluster log once."""
    a, b = cluster.node("a"), cluster.node("b")
    async with connect(b.ws_url) as watch_b, connect(a.ws_url) as worker_a, connect(a.ws_url) as caller:
        await watch_b.ok({"op": "subscribe", "pattern": "task.#"})
        await worker_a.ok({"op": "worker.hello", "types": ["j.run"], "concurrency": 1})
        task_id = (await caller.ok({"op": "dispatch", "type": "j.run", "payload": 7}))["task_id"]
        with trio.fail_after(20):
            while (frame := await worker_a.receive()).get("op") != "task":
                pass
        await worker_a.send({"op": "task.result", "task_id": frame["task"]["task_id"], "result": 49})
        events = []
        with trio.fail_after(20):
            while not events or events[-1]["type"] != "task.completed":
                events.append((await watch_b.messages(1))[0]["msg"])
        assert {e["payload"]["task_id"] for e in events} == {task_id}
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(set(seqs))
        history = await watch_b.ok({"op": "history", "pattern": "task.#"})
        assert [m["seq"] for m in history["messages"]] == seqs  # in the log once each
    with trio.fail_after(10):
        while a.control({"cmd": "status"})["status"]["cluster"]["journal"]["behind"] != 0:
            await trio.sleep(0.1)


# ---- docs/cluster.md's example, run as written -----------------------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "cluster.md"


def doc_example() -> tuple[dict[str, str], list[str]]:
    """The two-node example of docs/cluster.md: its node configs by file name, and its command lines."""
    blocks = fenced_blocks(DOC.read_text(encoding="utf-8"))
    configs = {}
    for lang, body, before in blocks:
        named = re.search(r"`(node-\w+\.toml)`", before)
        if lang == "toml" and named:
            configs[named.group(1)] = body
    commands = next(body for lang, body, _ in blocks if lang == "sh" and "aivad serve" in body)
    return configs, commands.splitlines()


def aivad(line: str) -> list[str]:
    """A documented ``.venv/bin/aivad …`` line as this interpreter runs it."""
    words = shlex.split(line.removesuffix("&").strip())
    assert words[0] == ".venv/bin/aivad", line
    return [sys.executable, "-m", "aivad", *words[1:]]


def spawn(line: str, cwd: Path, *, output: bool) -> subprocess.Popen[str]:
    """A documented line ending in ``&``: started in ``cwd``, its stdout a pipe when ``output``."""
    return subprocess.Popen(aivad(line), cwd=cwd, text=True, stdout=subprocess.PIPE if output else subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


async def test_the_two_node_example_of_the_docs_runs_as_written(redis_server: Redis) -> None:
    configs, commands = doc_example()
    assert set(configs) == {"node-a.toml", "node-b.toml"} and len(commands) == 6
    here = short_tmp_dir()
    # what must differ on a test machine: Redis's address, a prefix of this test's own, free ports
    for name, text in configs.items():
        text = text.replace("redis://127.0.0.1:6379/0", redis_server.url)
        text = text.replace("enabled = true\n", f'enabled = true\nprefix = "doc{uuid.uuid4().hex[:8]}:"\n', 1)
        text = re.sub(r"^port = \d+$", f"port = {free_port()}", text, flags=re.MULTILINE)
        (here / name).write_text(text)
    prefix = re.search(r'prefix = "(\w+:)"', (here / "node-a.toml").read_text())
    assert prefix is not None
    (here / "node-b.toml").write_text(re.sub(r'prefix = "\w+:"', f'prefix = "{prefix.group(1)}"',
                                             (here / "node-b.toml").read_text()))
    background: list[subprocess.Popen[str]] = []
    try:
        for line in commands[:2]:  # the two nodes
            background.append(spawn(line, here, output=False))

        def run(line: str) -> str:
            done = subprocess.run(aivad(line), cwd=here, capture_output=True, text=True, timeout=20)
            assert done.returncode == 0, (line, done.stdout, done.stderr)
            return done.stdout

        with trio.fail_after(30):
            while True:
                with contextlib.suppress(AssertionError):
                    status = json.loads(run(commands[5] + " --json"))
                    if len(status["cluster"]["nodes"]) == 2:
                        break
                await trio.sleep(0.2)
        tail = spawn(commands[2], here, output=True)
        background.append(tail)
        with trio.fail_after(20):  # the tail on b has subscribed
            while json.loads(run(".venv/bin/aivad status --config node-b.toml --json"))["router"]["subscriptions"] < 1:
                await trio.sleep(0.1)
        run(commands[3])  # publish on a
        history = run(commands[4])  # history on b
        assert "demo.hello" in history and '"a"' in history
        assert tail.stdout is not None
        first = await trio.to_thread.run_sync(tail.stdout.readline)
        assert "demo.hello" in first  # delivered live on b
        human = run(commands[5])  # status on a, as printed for people: the cluster and both nodes
        assert "cluster  node a" in human and "node  a:" in human and "node  b:" in human, human
    finally:
        for proc in reversed(background):
            proc.terminate()
            proc.wait(15)
            if proc.stdout is not None:
                proc.stdout.close()


async def test_two_nodes_given_one_name_are_told(cluster: Cluster) -> None:
    a = cluster.node("same")
    async with connect(a.ws_url) as watch:
        await watch.ok({"op": "subscribe", "pattern": "system.alert"})
        cluster.node("same")
        with trio.fail_after(20):
            while (alert := (await watch.messages(1))[0]["msg"])["payload"]["code"] != "node_name_taken":
                pass
    assert "node_name" in alert["payload"]["message"]


async def test_a_node_restarted_at_once_under_its_name_is_not_told_the_name_is_taken(cluster: Cluster) -> None:
    """Killed, and back at once (systemd's ``Restart=``): the record of its previous run still
    stands (three heartbeats' time to live); that is not another process, and nothing is alerted."""
    first = cluster.node("again")
    first.signal(signal.SIGKILL)
    assert await trio.to_thread.run_sync(first.wait) == -signal.SIGKILL
    second = cluster.node("again")
    await trio.sleep(2.5)  # five heartbeats (0.5 s): the old record is read, then expires
    assert "another process runs as cluster node" not in second.log(), second.log()[-2000:]
    assert second.control({"cmd": "status"})["status"]["ready"] is True


async def test_publishes_beyond_max_pending_are_overloaded_and_counted(cluster: Cluster) -> None:
    a = cluster.node("a", redis={"max_pending": 1})
    async with connect(a.ws_url) as c:
        for i in range(200):  # pipelined: many wait for Redis at once
            await c.send({"op": "publish", "type": "p.x", "payload": i, "ref": i})
        with trio.fail_after(20):
            replies = [await c.receive() for _ in range(200)]
    refused = [r for r in replies if r["op"] == "error"]
    assert refused and {r["code"] for r in refused} == {"overloaded"}
    assert a.control({"cmd": "status"})["status"]["cluster"]["overloaded"] == len(refused)


FOREIGN_ENTRIES: list[dict[str, Any]] = [
    {"x": "y"},  # not the script's fields at all
    {"t": "1", "type": "h.x", "d": "[1, 2]"},  # a body that is not an object
    {"t": "1", "type": "h.x", "d": '{"a":'},  # not JSON
    {"t": "1", "type": "h..x", "d": "{}"},  # not a topic
    {"t": "1", "type": b"h.\xff", "d": "{}"},  # not UTF-8
    {"t": "1", "type": "h.x", "d": "[" * 100_000},  # nested past the recursion limit (json's RecursionError)
]


async def test_foreign_entries_in_the_log_are_skipped_and_every_node_serves_on(cluster: Cluster) -> None:
    """Anyone with write access to Redis can add entries to the log's stream: a node reads past
    those its script did not write, delivers none of them, and goes on serving."""
    a, b = cluster.node("a"), cluster.node("b")
    producer = redis.Redis.from_url(cluster.redis.url)
    meta, stream = f"{cluster.prefix}{{log}}:meta", f"{cluster.prefix}{{log}}:stream"
    try:
        async with connect(a.ws_url) as on_a, connect(b.ws_url) as on_b:
            await on_a.ok({"op": "subscribe", "pattern": "#"})
            await on_b.ok({"op": "subscribe", "pattern": "h.#"})
            await on_a.publish("h.x", "before")
            for fields in FOREIGN_ENTRIES:  # as the next seqs, the way the script would add them
                seq = producer.hincrby(meta, "seq", 1)
                producer.xadd(stream, fields, id=f"{seq}-0")
            await on_b.publish("h.x", "after")
            got_a, got_b = await messages_until(on_a, 2), await messages_until(on_b, 2)
            assert [m["payload"] for m in got_a] == [m["payload"] for m in got_b] == ["before", "after"]
            history = await on_b.ok({"op": "history", "pattern": "#"})
            assert [m["payload"] for m in history["messages"]] == ["before", "after"]
            assert await no_more_messages(on_a)
        # heartbeats that are not: the nodes' list skips them, status goes on
        nodes, expiry = f"{cluster.prefix}{{log}}:nodes", f"{cluster.prefix}{{log}}:node-expiry"
        for name, info in (("evil1", "not json"), ("evil2", '{"info": 5}'), ("evil3", "[]"), ("evil4", "[" * 100_000)):
            producer.hset(nodes, name, info)
            producer.zadd(expiry, {name: 2**52})
        await trio.sleep(1.5)  # three heartbeats
        for node in (a, b):
            status = node.control({"cmd": "status"})["status"]
            assert [n["name"] for n in status["cluster"]["nodes"]] == ["a", "b"] and status["ready"] is True
    finally:
        producer.close()


async def test_a_nodes_journal_survives_kill_9_while_redis_is_away(own_redis: Redis) -> None:
    """What a node commits itself while Redis is gone (its ``redis_lost`` alert) waits in its
    journal; the node is killed with it unforwarded; started again, it forwards it into the
    cluster log, once."""
    cluster = Cluster(own_redis)
    try:
        a = cluster.node("a")
        await trio.to_thread.run_sync(own_redis.stop_server)
        poll_until(lambda: a.control({"cmd": "status"})["status"]["cluster"]["journal"]["behind"] > 0, 20,
                   "the redis_lost alert waiting in a's journal")
        a.kill()
        await trio.to_thread.run_sync(own_redis.start)
        a.start()
        async with connect(a.ws_url) as c:
            with trio.fail_after(30):
                while not (alerts := (await c.ok({"op": "history", "pattern": "system.alert"}))["messages"]):
                    await trio.sleep(0.1)
        assert [m["payload"]["code"] for m in alerts if m["payload"]["code"] == "redis_lost"] == ["redis_lost"]
    finally:
        cluster.stop()


async def test_a_foreign_write_to_the_logs_counter_makes_the_node_not_ready_until_it_is_mended(
        cluster: Cluster) -> None:
    a = cluster.node("a")
    producer = redis.Redis.from_url(cluster.redis.url)
    meta = f"{cluster.prefix}{{log}}:meta"
    try:
        async with connect(a.ws_url) as c:
            seq = (await c.publish("m.x", 1))["seq"]
            producer.hset(meta, "seq", "not a number")
            with trio.fail_after(20):
                while a.control({"cmd": "status"})["status"]["ready"]:
                    await trio.sleep(0.05)
            why = a.control({"cmd": "status"})["status"]["not_ready_because"]
            assert any("redis: the log is unreadable" in w for w in why), why
            refused = await c.request({"op": "publish", "type": "m.x", "payload": 2})
            assert refused["op"] == "error" and refused["code"] in ("internal", "overloaded")
            producer.hset(meta, "seq", str(seq))  # mended: the node goes on from where it was
            with trio.fail_after(20):
                while not a.control({"cmd": "status"})["status"]["ready"]:
                    await trio.sleep(0.05)
            assert (await c.publish("m.x", 3))["seq"] > seq  # (the alerts of the outage took seqs too)
    finally:
        producer.close()
