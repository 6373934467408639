"""Tasks through RabbitMQ: the ``aivad.tasks`` queue, AMQP RPC, dead tasks, own events out.

Test policy: the broker is real (the session's ``rabbitmq`` fixture) and so is
the daemon (``run_daemon`` in the test's trio loop, ``[amqp] enabled``, every
exchange and queue named uniquely per test through the config). Producers and
RPC clients are pika — a client that shares no code with aivad — run in
threads; the worker is a raw WebSocket connection speaking the protocol frames
(no aivad client code). The RPC client is the pika tutorial's
``FibonacciRpcClient`` with only its deployment details changed (where it
publishes, how long it waits, how it reads the JSON reply). Waits are real time
with explicit bounds; counting is by task_id / message_id.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pika  # type: ignore[import-untyped]
import pytest
import trio

from aivad.amqp import ORIGIN_HEADER, REASON_HEADER, serve_amqp, task_spec_from_amqp
from aivad.config import AmqpConfig, StoreConfig, TasksConfig, parse_config
from aivad.daemon import run_daemon
from aivad.dispatcher import serve_dispatcher
from aivad.envelope import BadMessage
from aivad.store import serve_store
from aivad.tasks import TaskSpec
from tests.brokers import RabbitMQ
from tests.conftest import control_request, test_config
from tests.test_amqp import get_all, make_cfg, pika_channel, publish
from tests.wsclient import TestClient, connect

# ---- mapping, no broker ------------------------------------------------------------------


def test_task_spec_from_amqp_mapping() -> None:
    defaults = TasksConfig()
    spec = task_spec_from_amqp(b'{"payload": {"target": "10.0.0.1"}}', "scan.run", defaults,
                               message_id="m-1", priority=8, reply_to="amq.gen-x", correlation_id="c-1")
    assert (spec.task_id, spec.type, spec.payload, spec.priority) == ("m-1", "scan.run", {"target": "10.0.0.1"}, 8)
    assert (spec.reply_to, spec.correlation_id) == ("amq.gen-x", "c-1")
    assert spec.max_attempts == defaults.default_max_attempts
    # the body's type and priority win over the routing key and the AMQP property
    spec = task_spec_from_amqp(b'{"type": "a.b", "priority": "low", "timeout": 5, '
                               b'"retry_policy": {"max_attempts": 2}}', "ignored", defaults, priority=9)
    assert (spec.type, spec.priority, spec.timeout_s, spec.max_attempts) == ("a.b", 1, 5.0, 2)
    assert spec.task_id and spec.reply_to is None
    # AMQP priorities above aivad's 0..9 scale (x-max-priority 10) are the top
    assert task_spec_from_amqp(b"{}", "t", defaults, priority=10).priority == 9
    # any JSON that is not an object is the payload (the tutorial's body=str(n))
    assert task_spec_from_amqp(b"30", "fib", defaults).payload == 30
    assert task_spec_from_amqp(b"[1, 2]", "fib", defaults).payload == [1, 2]


@pytest.mark.parametrize(
    ("body", "routing_key", "message_id", "problem"),
    [
        (b"not json", "t", None, "not JSON"),
        (b'{"payload": 1, "priorty": 5}', "t", None, "unknown task fields priorty"),
        (b'{"payload": 1}', "", None, "routing key"),
        (b'{"type": "bad topic!"}', "t", None, "every dot-separated word"),
        (b'{"priority": "urgent"}', "t", None, "priority must be"),
        (b'{"retry_policy": {"max_attempts": 0}}', "t", None, "max_attempts"),
        (b'{"timeout": -1}', "t", None, "timeout"),
        (b"{}", "t", "x" * 201, "message_id must be 1..200"),
    ],
)
def test_invalid_task_spec_is_refused_with_a_reason(body: bytes, routing_key: str, message_id: str | None,
                                                    problem: str) -> None:
    with pytest.raises(BadMessage, match=problem):
        task_spec_from_amqp(body, routing_key, TasksConfig(), message_id=message_id)


# ---- helpers ---------------------------------------------------------------------------------


class RawWorker:
    """A worker on a raw WebSocket connection: takes ``task`` frames, answers as told."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    async def hello(self, types: list[str], concurrency: int = 1) -> None:
        await self.client.ok({"op": "worker.hello", "types": types, "concurrency": concurrency})

    async def next_task(self) -> dict[str, Any]:
        while True:
            frame = await self.client.receive()
            assert frame.get("op") != "error", frame
            if frame.get("op") == "task":
                return dict(frame["task"])

    async def result(self, task_id: str, result: Any) -> None:
        await self.client.send({"op": "task.result", "task_id": task_id, "result": result})

    async def fail(self, task_id: str, error: Any, retryable: bool = True) -> None:
        await self.client.send({"op": "task.fail", "task_id": task_id, "error": error, "retryable": retryable})


class FibonacciRpcClient:
    """The pika RPC tutorial's client (rabbitmq.com/tutorials/tutorial-six-python).

    Changed only where a deployment differs: the connection parameters and the
    exchange / routing key it publishes to are arguments, the wait has a
    deadline (a test must not hang), and the reply — aivad's JSON object
    ``{"task_id", "state", "result"|"error"}`` — is decoded instead of ``int()``.
    """

    def __init__(self, url: str, exchange: str, routing_key: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.exchange, self.routing_key = exchange, routing_key

        self.channel = self.connection.channel()

        result = self.channel.queue_declare(queue="", exclusive=True)
        self.callback_queue = result.method.queue

        self.channel.basic_consume(
            queue=self.callback_queue,
            on_message_callback=self.on_response,
            auto_ack=True)

        self.response: bytes | None = None
        self.corr_id: str | None = None
        self.reply_properties: Any = None

    def on_response(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        if self.corr_id == props.correlation_id:
            self.response = body
            self.reply_properties = props

    def call(self, n: Any, timeout_s: float = 20.0, **properties: Any) -> dict[str, Any]:
        self.response = None
        self.corr_id = str(uuid.uuid4())
        self.channel.basic_publish(
            exchange=self.exchange,
            routing_key=self.routing_key,
            properties=pika.BasicProperties(
                reply_to=self.callback_queue,
                correlation_id=self.corr_id,
                **properties,
            ),
            body=str(n))
        deadline = time.monotonic() + timeout_s
        while self.response is None:
            if time.monotonic() >= deadline:
                pytest.fail("no RPC reply")
            self.connection.process_data_events(time_limit=0.1)
        return dict(json.loads(self.response))

    def close(self) -> None:
        self.connection.close()


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


async def serve_fib(worker: RawWorker) -> None:
    """Answer every task with the Fibonacci number of its payload, until cancelled."""
    while True:
        task = await worker.next_task()
        await worker.result(task["task_id"], fib(int(task["payload"])))


def amqp_section(cfg: AmqpConfig, **extra: Any) -> dict[str, Any]:
    keys = ("enabled", "url", "events_exchange", "events_queue", "tasks_exchange", "tasks_queue",
            "dead_letter_exchange", "dead_letter_queue", "reconnect_initial_s", "reconnect_max_s", "grace_s",
            "node_id")
    return {k: getattr(cfg, k) for k in keys} | extra


class Daemon:
    """An in-process daemon with AMQP on; ``control()`` and ``amqp()`` ask it from a thread."""

    def __init__(self, ws_url: str, control_path: str, http_port: int | None, cfg: AmqpConfig) -> None:
        self.ws_url, self.control_path, self.http_port, self.cfg = ws_url, control_path, http_port, cfg

    async def control(self, request: dict[str, Any]) -> dict[str, Any]:
        return await trio.to_thread.run_sync(control_request, self.control_path, request)

    async def amqp(self) -> dict[str, Any]:
        return dict((await self.control({"cmd": "status"}))["status"]["amqp"])

    async def wait_amqp(self, predicate: Callable[[dict[str, Any]], bool], what: str, seconds: float = 15) -> None:
        with trio.fail_after(seconds):
            while not predicate(await self.amqp()):
                await trio.sleep(0.05)

    async def task(self, task_id: str) -> dict[str, Any] | None:
        reply = await self.control({"cmd": "task", "task_id": task_id})
        return dict(reply["task"]) if reply["ok"] else None


@asynccontextmanager
async def amqp_daemon(directory: Path, cfg: AmqpConfig, wait_consuming: bool = True,
                      **sections: dict[str, Any]) -> AsyncIterator[Daemon]:
    """Run a daemon until the block ends (then cancel it: like a kill, tasks stay in the store)."""
    doc = test_config(directory, amqp=amqp_section(cfg), **sections)
    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(partial(run_daemon, parse_config(doc), handle_signals=False))
        daemon = Daemon(endpoints.ws_url, endpoints.control_path, endpoints.http_port, cfg)
        if wait_consuming:
            await daemon.wait_amqp(lambda a: a["consuming"] == {cfg.events_queue: True, cfg.tasks_queue: True},
                                   "consuming both queues")
        yield daemon
        nursery.cancel_scope.cancel()


def bind_side_queue(url: str, exchange: str, *keys: str) -> str:
    name = f"side-{uuid.uuid4().hex[:8]}"
    conn, ch = pika_channel(url)
    try:
        ch.exchange_declare(exchange, "topic", durable=True)  # as the bridge declares it
        ch.queue_declare(name, durable=True)
        for key in keys:
            ch.queue_bind(name, exchange, key)
    finally:
        conn.close()
    return name


async def wait_settled(rabbitmq: RabbitMQ, queue: str, seconds: float = 15) -> None:
    """Until the queue holds nothing, ready or unacked (rabbitmqctl, from a thread)."""
    with trio.fail_after(seconds):
        while (await trio.to_thread.run_sync(rabbitmq.queue_counts)).get(queue) != (0, 0):
            await trio.sleep(0.1)


def task_props(**kw: Any) -> pika.BasicProperties:
    return pika.BasicProperties(delivery_mode=2, content_type="application/json", **kw)


# ---- against the real broker and daemon ------------------------------------------------------


async def test_task_published_with_pika_runs_once_on_a_worker(rabbitmq: RabbitMQ, tmp_dir: Path) -> None:
    cfg = make_cfg(rabbitmq.url)
    async with amqp_daemon(tmp_dir, cfg) as daemon, connect(daemon.ws_url) as w:
        worker = RawWorker(w)
        await worker.hello(["scan.run"])
        await trio.to_thread.run_sync(publish, rabbitmq.url, cfg.tasks_exchange, [
            ("scan.run", b'{"payload": {"target": "10.0.0.1"}, "timeout": 30}', task_props(message_id="amqp-t-1")),
        ])
        with trio.fail_after(10):
            task = await worker.next_task()
        assert (task["task_id"], task["type"], task["payload"], task["attempt"]) == (
            "amqp-t-1", "scan.run", {"target": "10.0.0.1"}, 1)
        await worker.result("amqp-t-1", {"open_ports": [22]})
        with trio.fail_after(10):
            while (view := await daemon.task("amqp-t-1")) is None or view["state"] != "completed":
                await trio.sleep(0.05)
        assert view["result"] == {"open_ports": [22]} and view["spec"]["timeout_s"] == 30

        # a redelivery / producer retry with the same message_id: acked, not a second task
        await trio.to_thread.run_sync(publish, rabbitmq.url, cfg.tasks_exchange, [
            ("scan.run", b'{"payload": {"target": "10.0.0.1"}}', task_props(message_id="amqp-t-1")),
        ])
        await daemon.wait_amqp(lambda a: a["tasks_duplicates"] == 1, "duplicate seen")
        with trio.move_on_after(0.5):
            extra = await worker.next_task()
            raise AssertionError(f"the duplicate was dispatched: {extra}")
        tasks = (await daemon.control({"cmd": "tasks"}))["tasks"]
        assert [t["task_id"] for t in tasks] == ["amqp-t-1"]
        amqp = await daemon.amqp()
        assert (amqp["tasks_submitted"], amqp["tasks_duplicates"], amqp["tasks_rejected"]) == (1, 1, 0)
        await wait_settled(rabbitmq, cfg.tasks_queue)


async def test_amqp_priority_is_honoured(rabbitmq: RabbitMQ, tmp_dir: Path) -> None:
    """One busy worker; tasks queued behind it come out by AMQP priority (the body's wins)."""
    cfg = make_cfg(rabbitmq.url)
    async with amqp_daemon(tmp_dir, cfg) as daemon, connect(daemon.ws_url) as w:
        worker = RawWorker(w)
        await worker.hello(["job"], concurrency=1)
        await trio.to_thread.run_sync(publish, rabbitmq.url, cfg.tasks_exchange,
                                      [("job", b'"busy"', task_props(message_id="busy"))])
        with trio.fail_after(10):
            assert (await worker.next_task())["task_id"] == "busy"
        queued = [("p1", 1, None), ("p5", 5, None), ("p9", 9, None), ("p3", 3, None),
                  ("body-high", 0, "high"), ("none", None, None)]
        messages = []
        for name, prio, body_prio in queued:
            body = {"payload": name} | ({"priority": body_prio} if body_prio else {})
            messages.append(("job", json.dumps(body).encode(), task_props(message_id=name, priority=prio)))
        await trio.to_thread.run_sync(publish, rabbitmq.url, cfg.tasks_exchange, messages)
        await daemon.wait_amqp(lambda a: a["tasks_submitted"] == 1 + len(queued), "all submitted")
        await worker.result("busy", None)
        order = []
        with trio.fail_after(15):
            for _ in queued:
                task = await worker.next_task()
                order.append(task["task_id"])
                await worker.result(task["task_id"], None)
        # 9; then "high" (7) from the body over its AMQP 0; 5; no priority = normal (4); 3; 1
        assert order == ["p9", "body-high", "p5", "none", "p3", "p1"]


async def test_rpc_round_trip_with_the_pika_tutorial_client(rabbitmq: RabbitMQ, tmp_dir: Path) -> None:
    cfg = make_cfg(rabbitmq.url)
    async with amqp_daemon(tmp_dir, cfg) as daemon, connect(daemon.ws_url) as w, trio.open_nursery() as nursery:
        worker = RawWorker(w)
        await worker.hello(["fib"], concurrency=2)
        nursery.start_soon(serve_fib, worker)

        def rpc() -> list[tuple[dict[str, Any], Any, str | None]]:
            client = FibonacciRpcClient(rabbitmq.url, cfg.tasks_exchange, "fib")
            try:
                out = []
                for n in (10, 30, 1):
                    reply = client.call(n)
                    out.append((reply, client.reply_properties.correlation_id, client.corr_id))
                return out
            finally:
                client.close()

        with trio.fail_after(30):
            replies = await trio.to_thread.run_sync(rpc)
        for (reply, got_corr, sent_corr), n in zip(replies, (10, 30, 1), strict=True):
            assert got_corr == sent_corr
            assert reply["state"] == "completed" and reply["result"] == fib(n)
            view = await daemon.task(reply["task_id"])
            assert view is not None and view["spec"]["correlation_id"] == sent_corr
        assert (await daemon.amqp())["replies"] == 3
        nursery.cancel_scope.cancel()


async def test_dead_task_goes_to_the_dead_queue_and_the_rpc_caller_gets_the_error(
        rabbitmq: RabbitMQ, tmp_dir: Path) -> None:
    cfg = make_cfg(rabbitmq.url)
    async with amqp_daemon(tmp_dir, cfg) as daemon, connect(daemon.ws_url) as w, trio.open_nursery() as nursery:
        worker = RawWorker(w)
        await worker.hello(["fib"])

        async def refuse() -> None:
            task = await worker.next_task()
            await worker.fail(task["task_id"], {"message": f"will not compute {task['payload']}"}, retryable=False)

        nursery.start_soon(refuse)

        def rpc() -> dict[str, Any]:
            client = FibonacciRpcClient(rabbitmq.url, cfg.tasks_exchange, "fib")
            try:
                return client.call(-1, message_id="doomed-1")
            finally:
                client.close()

        with trio.fail_after(20):
            reply = await trio.to_thread.run_sync(rpc)
        assert reply == {"task_id": "doomed-1", "state": "dead", "error": {"message": "will not compute -1"}}
        with trio.fail_after(10):
            while not (dead := await trio.to_thread.run_sync(get_all, rabbitmq.url, cfg.dead_letter_queue)):
                await trio.sleep(0.05)
        [(props, body)] = dead
        assert props.headers[REASON_HEADER] == "failed: not retryable"
        assert props.headers[ORIGIN_HEADER] == cfg.node_id
        assert props.message_id == "aivad:doomed-1:dead"
        copy = json.loads(body)
        assert (copy["task_id"], copy["state"], copy["reason"]) == ("doomed-1", "dead", "failed: not retryable")
        assert copy["error"] == {"message": "will not compute -1"}
        assert [h["outcome"] for h in copy["history"]] == ["failed"]
        letters = (await daemon.control({"cmd": "dlq.list", "kind": "task"}))["dead_letters"]
        assert [(d["kind"], d["reason"]) for d in letters] == [("task", "failed: not retryable")]


async def test_invalid_task_specs_are_dead_lettered_and_the_consumer_goes_on(
        rabbitmq: RabbitMQ, tmp_dir: Path) -> None:
    cfg = make_cfg(rabbitmq.url)
    async with amqp_daemon(tmp_dir, cfg) as daemon, connect(daemon.ws_url) as w:
        worker = RawWorker(w)
        await worker.hello(["job"])
        await trio.to_thread.run_sync(publish, rabbitmq.url, cfg.tasks_exchange, [
            ("job", b"{not json", task_props(message_id="bad-1")),
            ("job", b'{"payload": 1, "priorty": 9}', task_props(message_id="bad-2")),
            ("job", b'{"priority": "urgent"}', task_props(message_id="bad-3")),
            ("job", b'{"payload": "fine"}', task_props(message_id="good-1")),
        ])
        with trio.fail_after(10):
            task = await worker.next_task()
        assert (task["task_id"], task["payload"]) == ("good-1", "fine")
        await daemon.wait_amqp(lambda a: a["tasks_rejected"] == 3, "all settled")
        dead = await trio.to_thread.run_sync(get_all, rabbitmq.url, cfg.dead_letter_queue)
        reasons = {p.message_id: p.headers[REASON_HEADER] for p, _ in dead}
        assert sorted(reasons) == ["bad-1", "bad-2", "bad-3"]
        assert "not JSON" in reasons["bad-1"]
        assert "unknown task fields priorty" in reasons["bad-2"]
        assert "priority must be" in reasons["bad-3"]
        assert all(p.headers["x-aivad-original-exchange"] == cfg.tasks_exchange for p, _ in dead)
        letters = (await daemon.control({"cmd": "dlq.list", "kind": "amqp.poison"}))["dead_letters"]
        assert len(letters) == 3
        shown = await daemon.control({"cmd": "dlq.show", "id": letters[0]["id"]})
        assert shown["dead_letter"]["detail"]["queue"] == cfg.tasks_queue
        assert await daemon.task("bad-2") is None
        await wait_settled(rabbitmq, cfg.tasks_queue)


async def test_own_events_go_to_the_events_exchange_once_and_are_not_reingested(
        rabbitmq: RabbitMQ, tmp_dir: Path) -> None:
    cfg = make_cfg(rabbitmq.url)
    side = await trio.to_thread.run_sync(bind_side_queue, rabbitmq.url, cfg.events_exchange,
                                         "task.#", "group.#", "system.#")
    async with amqp_daemon(tmp_dir, cfg) as daemon, connect(daemon.ws_url) as w, \
            connect(daemon.ws_url) as caller:
        worker = RawWorker(w)
        await worker.hello(["job"])
        task_id = (await caller.ok({"op": "dispatch", "type": "job", "payload": 1, "group_id": "g-1"}))["task_id"]
        task = await worker.next_task()
        await w.send({"op": "task.progress", "task_id": task_id, "progress": 0.5})
        await worker.result(task_id, "done")
        await caller.publish("system.alert", {"level": "warning"}, message_id="alert-1")
        # an external producer's task.* event comes in through AMQP: stored, never sent back out
        await trio.to_thread.run_sync(publish, rabbitmq.url, cfg.events_exchange,
                                      [("task.external", b'{"n": 1}', task_props(message_id="ext-1"))])
        stored_types = ["task.created", "task.dispatched", "task.started", "task.progress", "task.completed"]

        def side_messages() -> list[tuple[Any, bytes]]:
            return get_all(rabbitmq.url, side)

        got: list[tuple[Any, bytes]] = []
        with trio.fail_after(15):
            while len(got) < len(stored_types) + 3:  # + group.completed, system.alert, ext-1
                got += await trio.to_thread.run_sync(side_messages)
                await trio.sleep(0.05)
        await trio.sleep(0.5)
        got += await trio.to_thread.run_sync(side_messages)
        ext = [m for m in got if m[0].message_id == "ext-1"]
        assert len(ext) == 1 and ORIGIN_HEADER not in (ext[0][0].headers or {})  # only the producer's copy
        own = [(p, json.loads(b)) for p, b in got if p.message_id != "ext-1"]
        assert [b["type"] for _, b in own if b["type"].startswith("task.")] == stored_types  # in commit order
        assert {b["type"] for _, b in own} == {*stored_types, "group.completed", "system.alert"}
        assert all(p.headers[ORIGIN_HEADER] == cfg.node_id and p.delivery_mode == 2 for p, _ in own)
        seqs = [b["seq"] for _, b in own]
        assert seqs == sorted(seqs)  # the stored envelope goes out, seq included
        assert own[0][1]["payload"]["task_id"] == task["task_id"]
        # the store has each once: own events were skipped when they came back, ext-1 stored once
        history = await caller.ok({"op": "history", "pattern": "#", "limit": 1000})
        ids = [m["message_id"] for m in history["messages"]]
        assert len(ids) == len(set(ids)) == len(own) + 1
        amqp = await daemon.amqp()
        assert amqp["skipped_own"] == len(own) and amqp["stored"] == 1 and amqp["outbox_depth"] == 0


async def test_rpc_reply_survives_a_daemon_restart(rabbitmq: RabbitMQ, tmp_dir: Path) -> None:
    """reply_to/correlation_id live in the stored spec: a task queued before a restart still answers."""
    cfg = make_cfg(rabbitmq.url)
    replies: list[tuple[dict[str, Any], str | None]] = []

    def rpc() -> None:
        client = FibonacciRpcClient(rabbitmq.url, cfg.tasks_exchange, "fib")
        try:
            replies.append((client.call(12, timeout_s=40, message_id="across-restart"), client.corr_id))
        finally:
            client.close()

    async with trio.open_nursery() as nursery:
        async with amqp_daemon(tmp_dir, cfg) as daemon:  # no worker yet: the task waits, queued
            nursery.start_soon(partial(trio.to_thread.run_sync, rpc))
            with trio.fail_after(10):
                while (view := await daemon.task("across-restart")) is None:
                    await trio.sleep(0.05)
            assert view["state"] == "queued"
        async with amqp_daemon(tmp_dir, cfg) as daemon, connect(daemon.ws_url) as w:
            worker = RawWorker(w)
            await worker.hello(["fib"])
            with trio.fail_after(10):
                task = await worker.next_task()
            assert task["task_id"] == "across-restart"
            await worker.result(task["task_id"], fib(task["payload"]))
            with trio.fail_after(20):
                while not replies:
                    await trio.sleep(0.05)
    [(reply, corr_id)] = replies
    assert reply == {"task_id": "across-restart", "state": "completed", "result": fib(12)}
    assert corr_id is not None


async def test_outbox_in_the_store_survives_broker_outage_and_daemon_restart(
        rabbitmq: RabbitMQ, tmp_dir: Path) -> None:
    """Broker down → task events and an RPC reply wait in the store → daemon restarted → broker back:
    every event and the reply arrive, in order, once."""
    cfg = make_cfg(rabbitmq.url)
    side = await trio.to_thread.run_sync(bind_side_queue, rabbitmq.url, cfg.events_exchange, "task.#")
    replies = f"replies-{uuid.uuid4().hex[:8]}"

    def declare_replies() -> None:
        conn, ch = pika_channel(rabbitmq.url)
        ch.queue_declare(replies, durable=True)
        conn.close()

    await trio.to_thread.run_sync(declare_replies)
    try:
        async with amqp_daemon(tmp_dir, cfg) as daemon:
            await trio.to_thread.run_sync(publish, rabbitmq.url, cfg.tasks_exchange, [
                ("fib", b"12", task_props(message_id="outage-1", reply_to=replies, correlation_id="corr-1"))])
            with trio.fail_after(10):
                while (view := await daemon.task("outage-1")) is None or view["state"] != "queued":
                    await trio.sleep(0.05)
            await daemon.wait_amqp(lambda a: a["outbox_depth"] == 0, "task.created published")
            await trio.to_thread.run_sync(rabbitmq.stop_server)
            await daemon.wait_amqp(lambda a: not a["connected"], "connection lost")
            async with connect(daemon.ws_url) as w:
                worker = RawWorker(w)
                await worker.hello(["fib"])
                with trio.fail_after(10):
                    task = await worker.next_task()
                assert task["task_id"] == "outage-1"
                await w.send({"op": "task.progress", "task_id": "outage-1", "progress": 0.5})
                await worker.result("outage-1", fib(12))
                with trio.fail_after(10):
                    while (view := await daemon.task("outage-1")) is None or view["state"] != "completed":
                        await trio.sleep(0.05)
            # dispatched, started, progress, completed + the reply (+ the system.alert of the lost broker)
            await daemon.wait_amqp(lambda a: a["outbox_depth"] >= 5, "waiting in the outbox")
        async with amqp_daemon(tmp_dir, cfg, wait_consuming=False) as daemon:  # the same store, broker still down
            await daemon.wait_amqp(lambda a: a["outbox_depth"] >= 5, "still waiting after the restart")
            await trio.to_thread.run_sync(rabbitmq.start)
            await daemon.wait_amqp(lambda a: a["connected"] and a["outbox_depth"] == 0, "outbox flushed", 60)
            async with connect(daemon.ws_url) as caller:
                history = await caller.ok({"op": "history", "pattern": "task.#", "limit": 1000})
    finally:
        if rabbitmq._server is None:
            await trio.to_thread.run_sync(rabbitmq.start)
    stored = [m["message_id"] for m in history["messages"]]
    assert [m["type"] for m in history["messages"]] == ["task.created", "task.dispatched", "task.started",
                                                          "task.progress", "task.completed"]
    got = await trio.to_thread.run_sync(get_all, rabbitmq.url, side)
    assert [p.message_id for p, _ in got] == stored  # every event, in order, once
    assert [json.loads(b)["seq"] for _, b in got] == [m["seq"] for m in history["messages"]]
    [(props, body)] = await trio.to_thread.run_sync(get_all, rabbitmq.url, replies)
    assert props.correlation_id == "corr-1"
    assert json.loads(body) == {"task_id": "outage-1", "state": "completed", "result": fib(12)}


async def test_metrics_readyz_and_status_show_both_queues(rabbitmq: RabbitMQ, tmp_dir: Path) -> None:
    from tests.test_metrics import http_get, sample

    cfg = make_cfg(rabbitmq.url)
    async with amqp_daemon(tmp_dir, cfg, http={"enabled": True, "port": 0}) as daemon:
        assert daemon.http_port
        with trio.fail_after(10):
            assert (await http_get(daemon.http_port, "/readyz"))[0] == 200
            _, text = await http_get(daemon.http_port, "/metrics")
        assert sample(text, "aivad_amqp_consuming", f'{{queue="{cfg.events_queue}"}}') == 1
        assert sample(text, "aivad_amqp_consuming", f'{{queue="{cfg.tasks_queue}"}}') == 1
        assert sample(text, "aivad_amqp_connected") == 1
        assert sample(text, "aivad_amqp_reconnects_total") == 0
        assert sample(text, "aivad_amqp_outbox") == 0
        amqp = await daemon.amqp()
        assert amqp["connected"] and amqp["consuming"] == {cfg.events_queue: True, cfg.tasks_queue: True}
        # the broker cancels the tasks consumer: not ready (the reason names the queue), then back
        conn, ch = await trio.to_thread.run_sync(pika_channel, rabbitmq.url)
        await trio.to_thread.run_sync(ch.queue_delete, cfg.tasks_queue)
        await trio.to_thread.run_sync(conn.close)
        await daemon.wait_amqp(lambda a: a["reconnects"] >= 1, "reconnect")
        await daemon.wait_amqp(lambda a: all(a["consuming"].values()), "consuming again")
        _, text = await http_get(daemon.http_port, "/metrics")
        assert sample(text, "aivad_amqp_reconnects_total") >= 1
        assert sample(text, "aivad_amqp_consuming", f'{{queue="{cfg.tasks_queue}"}}') == 1


async def test_broker_down_at_start_shows_in_readyz_and_status(tmp_dir: Path) -> None:
    from tests.brokers import free_port
    from tests.test_metrics import http_get, sample

    cfg = make_cfg(f"amqp://guest:guest@127.0.0.1:{free_port()}/", connect_timeout_s=1.0)
    doc = test_config(tmp_dir, amqp=amqp_section(cfg), http={"enabled": True, "port": 0})
    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(partial(run_daemon, parse_config(doc), handle_signals=False))
        daemon = Daemon(endpoints.ws_url, endpoints.control_path, endpoints.http_port, cfg)
        await daemon.wait_amqp(lambda a: a["reconnects"] >= 1, "retrying")
        with trio.fail_after(10):
            status, body = await http_get(endpoints.http_port, "/readyz")
            _, text = await http_get(endpoints.http_port, "/metrics")
        assert status == 503
        assert f"not consuming {cfg.tasks_queue}" in body and f"not consuming {cfg.events_queue}" in body
        assert sample(text, "aivad_amqp_connected") == 0
        assert sample(text, "aivad_amqp_consuming", f'{{queue="{cfg.tasks_queue}"}}') == 0
        reply = await daemon.control({"cmd": "status"})
        assert reply["status"]["ready"] is False
        assert reply["status"]["amqp"]["last_error"]
        async with connect(endpoints.ws_url) as client:  # the embedded path works meanwhile
            assert (await client.publish("a.b", 1))["seq"] >= 1
        nursery.cancel_scope.cancel()


async def test_rpc_reply_and_dead_copy_commit_with_the_task_end(tmp_dir: Path) -> None:
    """The outbox rows of an ending task are in the same write as its end: when ``on_end``
    runs (right after that commit) they are already in the store, so no crash between the
    two can end an RPC task without its reply. The broker is down: nothing leaves the outbox."""
    from tests.brokers import free_port

    db = tmp_dir / "aivad.db"
    cfg = make_cfg(f"amqp://guest:guest@127.0.0.1:{free_port()}/", connect_timeout_s=1.0)
    seen_at_end: list[list[tuple[str, str]]] = []

    def outbox_rows(_: Any) -> None:
        with sqlite3.connect(db) as reader:  # another connection: sees only what is committed
            seen_at_end.append(reader.execute("SELECT exchange, routing_key FROM amqp_outbox ORDER BY id").fetchall())

    async with trio.open_nursery() as nursery:
        store = await nursery.start(serve_store, StoreConfig(path=str(db)))
        dispatcher = await nursery.start(serve_dispatcher, TasksConfig(), store)
        await nursery.start(partial(serve_amqp, cfg, store, dispatcher=dispatcher))
        dispatcher.on_end.append(outbox_rows)  # after the bridge's own hook
        spec = TaskSpec("rpc-1", "job", None, 4, 3, 1.0, 10.0, 30.0, None, None, None, "reply-q", "corr-1")
        await dispatcher.submit(spec)
        await dispatcher.abandon("rpc-1", "nobody waits")  # ends it dead: a reply (the error) and a dead copy
        nursery.cancel_scope.cancel()
    assert seen_at_end == [[("", "reply-q"), (cfg.dead_letter_exchange, "job")]]


def fill_tasks(url: str, cfg: AmqpConfig, ids: list[str]) -> None:
    """Declare the tasks queue as the bridge does and fill it with ``job`` tasks (persistent)."""
    conn, ch = pika_channel(url)
    try:
        ch.exchange_declare(cfg.tasks_exchange, "topic", durable=True)
        ch.queue_declare(cfg.tasks_queue, durable=True, arguments={"x-max-priority": cfg.tasks_max_priority})
        ch.queue_bind(cfg.tasks_queue, cfg.tasks_exchange, cfg.tasks_binding_key)
        for task_id in ids:
            ch.basic_publish(cfg.tasks_exchange, "job", b'{"payload": null}', task_props(message_id=task_id))
        deadline = time.monotonic() + 60
        while ch.queue_declare(cfg.tasks_queue, passive=True).method.message_count < len(ids):
            if time.monotonic() >= deadline:
                pytest.fail("queue did not fill")
            time.sleep(0.05)
    finally:
        conn.close()


async def test_broker_restart_while_tasks_arrive_no_loss_no_duplicates(rabbitmq: RabbitMQ, tmp_dir: Path) -> None:
    import threading

    cfg = make_cfg(rabbitmq.url)
    ids = [f"r-{i}" for i in range(4000)]
    await trio.to_thread.run_sync(fill_tasks, rabbitmq.url, cfg, ids)
    async with amqp_daemon(tmp_dir, cfg) as daemon:
        await daemon.wait_amqp(lambda a: a["tasks_submitted"] >= 200, "mid-stream")
        restart = threading.Thread(target=rabbitmq.restart)
        restart.start()
        await daemon.wait_amqp(lambda a: not a["connected"], "connection lost", 20)
        assert (await daemon.amqp())["tasks_submitted"] < len(ids)  # the restart hit mid-stream
        await trio.to_thread.run_sync(restart.join)
        await daemon.wait_amqp(lambda a: all(a["consuming"].values()), "consuming again", 30)
        # a batch committed just as the connection went comes again: answered as duplicates
        await daemon.wait_amqp(lambda a: a["tasks_submitted"] + a["tasks_duplicates"] >= len(ids),
                               "every task taken", 60)
        await wait_settled(rabbitmq, cfg.tasks_queue, 30)
        amqp = await daemon.amqp()
        assert amqp["reconnects"] >= 1 and amqp["tasks_rejected"] == 0
        assert amqp["tasks_submitted"] == len(ids)
        # queued in the dispatcher's memory too (a submit cut off by the loss must not strand a task)
        status = (await daemon.control({"cmd": "status"}))["status"]
        assert status["tasks"]["tasks_by_state"]["queued"] == len(ids)
        tasks = (await daemon.control({"cmd": "tasks", "state": "queued", "limit": 10_000}))["tasks"]
        assert sorted(t["task_id"] for t in tasks) == sorted(ids)  # each once: nothing lost, nothing twice
        async with connect(daemon.ws_url) as client:
            history = await client.ok({"op": "history", "pattern": "task.created", "limit": 1000})
            created = history["messages"]
            while len(history["messages"]) == 1000:
                history = await client.ok({"op": "history", "pattern": "task.created", "limit": 1000,
                                           "after": history["last_seq"]})
                created += history["messages"]
        assert len(created) == len(ids)


def test_sigterm_while_tasks_arrive(rabbitmq: RabbitMQ, tmp_dir: Path) -> None:
    """SIGTERM mid-intake: exit 0; every task is in the store or back in the queue, none unacked."""
    import sqlite3

    from tests.conftest import DaemonProcess

    cfg = make_cfg(rabbitmq.url, prefetch=500)
    ids = [f"term-{i}" for i in range(6000)]
    fill_tasks(rabbitmq.url, cfg, ids)
    proc = DaemonProcess(tmp_dir, amqp=amqp_section(cfg, prefetch=500))
    proc.sigterm_mid_intake(lambda: int(proc.control({"cmd": "status"})["status"]["amqp"]["tasks_submitted"]), 300)
    with sqlite3.connect(proc.db_path) as db:
        stored = {row[0] for row in db.execute("SELECT task_id FROM tasks")}
        created = db.execute("SELECT count(*) FROM messages WHERE type = 'task.created'").fetchone()[0]
    assert created == len(stored)  # each task stored once, with its one task.created
    ready, unacked = rabbitmq.queue_counts()[cfg.tasks_queue]
    assert unacked == 0
    assert 0 < len(stored) < len(ids), "SIGTERM did not land mid-intake"
    left = {p.message_id for p, _ in get_all(rabbitmq.url, cfg.tasks_queue)}
    assert len(left) == ready
    assert stored | left == set(ids)  # nothing lost; overlap = committed but not yet acked, a duplicate later


# ---- docs/amqp.md: its examples run ------------------------------------------------------------

DOCS_AMQP = Path(__file__).resolve().parent.parent / "docs" / "amqp.md"


def doc_examples() -> dict[str, str]:
    """The ```python blocks of docs/amqp.md marked ``<!-- example: NAME -->``."""
    import re

    found = re.findall(r"<!-- example: ([\w-]+) -->\n```python\n(.*?)\n```", DOCS_AMQP.read_text(), re.S)
    return dict(found)


def delete_default_topology(url: str) -> None:
    conn, ch = pika_channel(url)
    try:
        for queue in ("aivad.events", "aivad.tasks", "aivad.dead"):
            ch.queue_delete(queue)
        for exchange in ("aiva.events", "aiva.tasks", "aiva.dlx"):
            ch.exchange_delete(exchange)
    finally:
        conn.close()


def run_example(code: str, url: str) -> str:
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "AMQP_URL": url}, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_docs_amqp_examples_run(rabbitmq: RabbitMQ, tmp_dir: Path) -> None:
    """Each example of docs/amqp.md, as written (default names), against a real daemon and worker."""
    examples = doc_examples()
    assert set(examples) == {"pika-publish", "aio-pika-publish", "pika-task", "pika-rpc", "aio-pika-rpc"}
    await trio.to_thread.run_sync(delete_default_topology, rabbitmq.url)
    cfg = AmqpConfig(enabled=True, url=rabbitmq.url, reconnect_initial_s=0.1, node_id="docs")
    try:
        async with amqp_daemon(tmp_dir, cfg) as daemon, connect(daemon.ws_url) as w, \
                connect(daemon.ws_url) as sub, trio.open_nursery() as nursery:
            await sub.ok({"op": "subscribe", "pattern": "notifications.frontend.evt-42.#"})
            await sub.ok({"op": "subscribe", "pattern": "scan.#"})
            worker = RawWorker(w)
            await worker.hello(["fib"], concurrency=2)
            nursery.start_soon(serve_fib, worker)
            with trio.fail_after(120):
                out = await trio.to_thread.run_sync(run_example, examples["pika-publish"], rabbitmq.url)
                assert out == "published\n"
                frame = await sub.next_message()
                assert frame["msg"]["type"] == "notifications.frontend.evt-42.chat"
                assert frame["msg"]["payload"] == {"text": "found 3 open ports"}
                assert frame["msg"]["metadata"] == {"source": "scanner"} and frame["msg"]["seq"] >= 1

                out = await trio.to_thread.run_sync(run_example, examples["aio-pika-publish"], rabbitmq.url)
                assert out == "published\n"
                frame = await sub.next_message()
                assert (frame["msg"]["type"], frame["msg"]["payload"]) == ("scan.completed", {"scan_id": "123"})

                out = await trio.to_thread.run_sync(run_example, examples["pika-task"], rabbitmq.url)
                assert out == "submitted scan-10.0.0.1-2026-11-23\n"
                while (view := await daemon.task("scan-10.0.0.1-2026-11-23")) is None:
                    await trio.sleep(0.05)
                assert (view["type"], view["state"], view["spec"]["priority"]) == ("scan.run", "queued", 7)
                assert view["spec"]["max_attempts"] == 5 and view["spec"]["timeout_s"] == 60

                out = await trio.to_thread.run_sync(run_example, examples["pika-rpc"], rabbitmq.url)
                assert out == f"completed {fib(30)}\n"
                out = await trio.to_thread.run_sync(run_example, examples["aio-pika-rpc"], rabbitmq.url)
                assert out == f"completed {fib(20)}\n"
            nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(delete_default_topology, rabbitmq.url)


async def test_reload_applies_a_new_prefetch_to_the_consumers(rabbitmq: RabbitMQ, tmp_dir: Path) -> None:
    """[amqp] prefetch is live: SIGHUP / `aivad reload` re-issues basic.qos on the consumer channels."""
    from tests.conftest import to_toml

    cfg = make_cfg(rabbitmq.url)
    path = tmp_dir / "config.toml"

    def write(prefetch: int) -> None:
        path.write_text(to_toml(test_config(tmp_dir, amqp={**amqp_section(cfg), "prefetch": prefetch})))

    def prefetch_counts() -> set[int]:
        out = rabbitmq.ctl("list_channels", "prefetch_count", "--no-table-headers", "--quiet")
        return {int(line) for line in out.split() if line.strip().isdigit()}

    write(37)
    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(partial(run_daemon, parse_config(test_config(
            tmp_dir, amqp={**amqp_section(cfg), "prefetch": 37})), config_path=str(path), handle_signals=False))
        daemon = Daemon(endpoints.ws_url, endpoints.control_path, endpoints.http_port, cfg)
        await daemon.wait_amqp(lambda a: all(a["consuming"].values()) and a["consuming"], "consuming")
        assert 37 in await trio.to_thread.run_sync(prefetch_counts)
        write(123)
        reply = await daemon.control({"cmd": "reload"})
        assert reply["ok"] and "amqp.prefetch" in reply["applied"], reply
        with trio.fail_after(15):
            while 123 not in await trio.to_thread.run_sync(prefetch_counts):
                await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
