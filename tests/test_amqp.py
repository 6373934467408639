"""The AMQP bridge (aivad/amqp.py) against a real RabbitMQ.

Test policy: the broker is real (tests/brokers.py starts a private node, the
``rabbitmq`` fixture shares it per session); pika, a client that shares no
code with aivad, is the independent producer and consumer. Each test names its
own exchanges and queues, so tests share the node without seeing each other.
The store is aivad's real SQLite store in ``tmp_path``. Waits use real time
with explicit timeouts (never autojump with real sockets); the async tests
need pytest-trio's ``trio_mode = true``. Counting is by ``message_id``: zero
loss = every id stored, zero duplicates = no id twice and nothing left in the
queue.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pika  # type: ignore[import-untyped]
import pytest
import trio

from aivad.amqp import (
    ORIGIN_HEADER,
    REASON_HEADER,
    AmqpBridge,
    envelope_from_amqp,
    serve_amqp,
    task_spec_from_amqp,
)
from aivad.config import AmqpConfig, StoreConfig, TasksConfig
from aivad.envelope import BadMessage, Envelope
from aivad.store import Store, serve_store
from tests.brokers import RabbitMQ, declare_events_topology
from tests.conftest import control_request

# ---- mapping, no broker ------------------------------------------------------------


def test_plain_json_becomes_payload_with_routing_key_as_type() -> None:
    stamp = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.UTC)
    env = envelope_from_amqp(
        b'{"text": "hi"}',
        "notifications.frontend.evt-7.chat",
        message_id="m-1",
        timestamp=stamp,
        correlation_id="req-456",
        reply_to="amq.rabbitmq.reply-to",
        headers={"source": "captain", "raw": b"bytes", "when": stamp, "x-death": [{"count": 1}]},
    )
    assert env.type == "notifications.frontend.evt-7.chat"
    assert env.payload == {"text": "hi"}
    assert env.message_id == "m-1"
    assert env.timestamp == "2026-11-23T10:00:00.000Z"
    assert env.metadata == {
        "correlation_id": "req-456",
        "reply_to": "amq.rabbitmq.reply-to",
        "source": "captain",
        "raw": "bytes",
        "when": "2026-11-23T10:00:00.000Z",
    }
    assert env.seq is None


def test_envelope_body_is_taken_as_is_and_wins_over_properties() -> None:
    body = json.dumps({
        "message_id": "body-id", "timestamp": "2026-01-01T00:00:00Z", "type": "scan.completed",
        "payload": [1, 2], "metadata": {"source": "scanner", "correlation_id": "body-corr"}, "seq": 99,
    }).encode()
    env = envelope_from_amqp(body, "ignored.key", message_id="prop-id", correlation_id="prop-corr",
                             headers={"source": "header"})
    assert (env.message_id, env.type, env.payload, env.timestamp) == (
        "body-id", "scan.completed", [1, 2], "2026-01-01T00:00:00Z")
    assert env.metadata == {"source": "scanner", "correlation_id": "body-corr"}
    assert env.seq is None  # a producer's seq is never read


def test_non_object_json_and_objects_with_other_keys_are_payloads() -> None:
    assert envelope_from_amqp(b"[1,2]", "a.b").payload == [1, 2]
    assert envelope_from_amqp(b'"s"', "a.b").payload == "s"
    env = envelope_from_amqp(b'{"type": "chat", "text": "hi"}', "a.b")
    assert (env.type, env.payload) == ("a.b", {"type": "chat", "text": "hi"})
    assert envelope_from_amqp(b'{"n": 1}', "a.b").message_id  # generated when absent


@pytest.mark.parametrize(
    ("body", "routing_key", "problem"),
    [
        (b"not json", "a.b", "not JSON"),
        (b"\xff\xfe", "a.b", "not JSON"),
        (b'{"type": "bad topic!", "payload": 1}', "a.b", "every dot-separated word"),
        (b'{"type": 7}', "a.b", "type must be a string"),
        (b'{"type": "a", "metadata": []}', "a.b", "metadata must be an object"),
        (b'{"n": 1}', "", "routing key"),
        (b'{"n": 1}', "bad key!", "every dot-separated word"),
        (b"[" * 100_000, "a.b", "nested too deeply"),  # json's RecursionError, once uncaught
        (b'{"x": NaN}', "a.b", "NaN is not JSON"),  # would be stored and sent on as NaN: no browser reads it
        (b'{"type": "a", "payload": [Infinity]}', "a.b", "Infinity is not JSON"),
        (b"[1e999]", "a.b", "1e999 is beyond a double's range"),
    ],
)
def test_poison_is_refused_with_a_reason(body: bytes, routing_key: str, problem: str) -> None:
    with pytest.raises(BadMessage, match=problem):
        envelope_from_amqp(body, routing_key)


def test_a_body_over_max_body_bytes_is_refused_unparsed() -> None:
    body = json.dumps({"pad": "x" * 2000}).encode()
    assert envelope_from_amqp(body, "a.b", max_body_bytes=len(body)).payload == {"pad": "x" * 2000}  # at the limit
    with pytest.raises(BadMessage, match=rf"body is {len(body)} bytes, over max_body_bytes \({len(body) - 1}\)"):
        envelope_from_amqp(body, "a.b", max_body_bytes=len(body) - 1)  # one over
    with pytest.raises(BadMessage, match="over max_body_bytes"):
        task_spec_from_amqp(body, "a.b", TasksConfig(), max_body_bytes=1024)


def test_config_accepts_amqp_enabled() -> None:
    from aivad.config import ConfigError, parse_config

    cfg = parse_config({"amqp": {"enabled": True, "url": "amqp://u:p@h:1/", "prefetch": 100}})
    assert cfg.amqp.enabled
    assert cfg.amqp.prefetch == 100
    with pytest.raises(ConfigError, match=r"amqp\.prefetch"):
        parse_config({"amqp": {"prefetch": 0}})


def test_aiormq_private_delivery_path_is_as_pinned() -> None:
    """``_deliver_in_reader`` replaces and reuses these aiormq privates: a release that changes them fails here."""
    import inspect

    from aiormq.channel import Channel

    assert "await self._on_deliver_frame(frame)" in inspect.getsource(Channel._reader)
    for name in ("_on_deliver_frame", "_Channel__get_content_header", "_read_content"):
        assert inspect.iscoroutinefunction(getattr(Channel, name)), name
    assert list(inspect.signature(Channel._read_content).parameters) == ["self", "frame", "header"]
    assert "self.consumers.get(frame.consumer_tag)" in inspect.getsource(Channel._on_deliver_frame)


def test_the_channel_reader_hands_deliveries_over_in_order_without_a_task(rabbitmq: RabbitMQ) -> None:
    import asyncio

    import aiormq

    from aivad.amqp import _deliver_in_reader

    queue = f"t-reader-{uuid.uuid4().hex[:8]}"
    handed: list[bytes] = []
    via_aiormq: list[bytes] = []

    async def main() -> int:
        conn = await aiormq.connect(rabbitmq.url)
        try:
            channel = await conn.channel()
            await channel.queue_declare(queue, auto_delete=True)
            for i in range(50):
                await channel.basic_publish(b"%d" % i, routing_key=queue)
            _deliver_in_reader(channel, lambda m: handed.append(m.body))

            async def aiormq_path(m: aiormq.abc.DeliveredMessage) -> None:
                via_aiormq.append(m.body)

            tasks_before = len(asyncio.all_tasks())
            most_tasks = tasks_before
            await channel.basic_consume(queue, aiormq_path, no_ack=True)
            async with asyncio.timeout(20):
                while len(handed) < 50:
                    most_tasks = max(most_tasks, len(asyncio.all_tasks()))
                    await asyncio.sleep(0)
            return most_tasks - tasks_before
        finally:
            await conn.close()

    extra_tasks = asyncio.run(main())
    assert handed == [b"%d" % i for i in range(50)]
    assert via_aiormq == []
    assert extra_tasks == 0


# ---- helpers for the real broker --------------------------------------------------


def make_cfg(url: str, **overrides: Any) -> AmqpConfig:
    sfx = uuid.uuid4().hex[:8]
    values: dict[str, Any] = {
        "enabled": True,
        "url": url,
        "events_exchange": f"t-ev-{sfx}",
        "events_queue": f"t-evq-{sfx}",
        "tasks_exchange": f"t-tasks-{sfx}",
        "tasks_queue": f"t-tq-{sfx}",
        "dead_letter_exchange": f"t-dlx-{sfx}",
        "dead_letter_queue": f"t-dead-{sfx}",
        "reconnect_initial_s": 0.1,
        "reconnect_max_s": 1.0,
        "connect_timeout_s": 5.0,
        "grace_s": 3.0,
        "node_id": f"test-{sfx}",
    }
    values.update(overrides)
    return AmqpConfig(**values)


def pika_channel(url: str) -> tuple[pika.BlockingConnection, Any]:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    return conn, conn.channel()


def publish(url: str, exchange: str, messages: list[tuple[str, bytes, pika.BasicProperties]]) -> None:
    """Publish with confirms (pika, blocking): returns once the broker has them all."""
    conn, ch = pika_channel(url)
    try:
        ch.confirm_delivery()
        for routing_key, body, props in messages:
            ch.basic_publish(exchange, routing_key, body, props)
    finally:
        conn.close()


def fill_fast(url: str, exchange: str, routing_key: str, queue: str, ids: list[str]) -> None:
    """Publish many persistent messages without confirms, then wait until the queue holds them."""
    conn, ch = pika_channel(url)
    try:
        for mid in ids:
            ch.basic_publish(exchange, routing_key, json.dumps({"id": mid}).encode(),
                             pika.BasicProperties(delivery_mode=2, message_id=mid))
        deadline = time.monotonic() + 60
        while ch.queue_declare(queue, passive=True).method.message_count < len(ids):
            if time.monotonic() >= deadline:
                pytest.fail("queue did not fill")
            time.sleep(0.05)
    finally:
        conn.close()


def queue_depth(url: str, queue: str) -> int:
    conn, ch = pika_channel(url)
    try:
        return int(ch.queue_declare(queue, passive=True).method.message_count)
    finally:
        conn.close()


def get_all(url: str, queue: str) -> list[tuple[Any, bytes]]:
    conn, ch = pika_channel(url)
    out: list[tuple[Any, bytes]] = []
    try:
        while True:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((props, body))
    finally:
        conn.close()


async def wait_until(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll a condition on the broker or a statistics snapshot (real time, bounded)."""
    with trio.move_on_after(seconds):
        while not predicate():  # the condition lives outside trio: poll it
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {seconds}s waiting for {what}")


async def all_messages(store: Store) -> list[dict[str, Any]]:
    history = await store.history("#", 0, 100_000)
    return [json.loads(m.json) for m in history.messages]


@asynccontextmanager
async def running_bridge(cfg: AmqpConfig, tmp_path: Path, sink: Any = None,
                         wait_consuming: bool = True) -> AsyncIterator[tuple[AmqpBridge, Store, trio.CancelScope]]:
    async with trio.open_nursery() as nursery:
        store = await nursery.start(serve_store, StoreConfig(path=str(tmp_path / f"{uuid.uuid4().hex}.db")))
        scope = trio.CancelScope()

        async def run_bridge(task_status: trio.TaskStatus[AmqpBridge] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await serve_amqp(cfg, sink(store) if sink else store, task_status=task_status)

        bridge = await nursery.start(run_bridge)
        if wait_consuming:
            await wait_until(lambda: bridge.statistics().consuming[cfg.events_queue], 15, "consuming")
        yield bridge, store, scope
        nursery.cancel_scope.cancel()


class SlowSink:
    """The real store behind a delay per batch, so a test can act mid-stream."""

    def __init__(self, store: Store, delay_s: float) -> None:
        self.store, self.delay_s = store, delay_s

    async def submit(self, apply: Any, **kw: Any) -> Any:
        await trio.sleep(self.delay_s)
        return await self.store.submit(apply, **kw)

    async def read(self, fn: Any) -> Any:
        return await self.store.read(fn)

    async def add_dead_letter(self, kind: str, reason: str, body: str, detail: dict[str, Any]) -> int:
        return await self.store.add_dead_letter(kind, reason, body, detail)


class StuckSink(SlowSink):
    """Never commits: every delivery stays unacked."""

    def __init__(self, store: Store) -> None:
        super().__init__(store, 0)
        self.entered = 0

    async def submit(self, apply: Any, **kw: Any) -> Any:
        self.entered += 1
        await trio.sleep_forever()
        raise AssertionError("unreachable")


# ---- against the real broker ------------------------------------------------------


async def test_deepsoc_flow_mapping_and_duplicate(rabbitmq: RabbitMQ, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from aiormq.channel import Channel

    def task_per_delivery(*_: object) -> None:
        raise AssertionError("aiormq's own delivery path ran: the bridge's channel reader hook is not installed")

    monkeypatch.setattr(Channel, "_on_deliver_frame", task_per_delivery)
    cfg = make_cfg(rabbitmq.url)
    async with running_bridge(cfg, tmp_path) as (bridge, store, _):
        props = pika.BasicProperties(
            message_id="chat-1", correlation_id="req-456", reply_to="replies",
            timestamp=1795000000, headers={"source": "captain"}, delivery_mode=2,
        )
        key = "notifications.frontend.evt-7.chat"
        await trio.to_thread.run_sync(publish, rabbitmq.url, cfg.events_exchange,
                                      [(key, b'{"text": "hello"}', props)])
        await wait_until(lambda: bridge.statistics().stored == 1, 10, "stored")
        [msg] = await all_messages(store)
        assert msg["type"] == key
        assert msg["payload"] == {"text": "hello"}
        assert msg["message_id"] == "chat-1"
        assert msg["timestamp"] == "2026-11-18T11:06:40.000Z"  # 1795000000 s
        assert msg["metadata"] == {"correlation_id": "req-456", "reply_to": "replies", "source": "captain"}
        first_seq = msg["seq"]
        assert (await store.history("notifications.frontend.evt-7.#", first_seq, 100)).messages == []

        # the same message_id again (a producer retry): acknowledged, not stored twice
        await trio.to_thread.run_sync(publish, rabbitmq.url, cfg.events_exchange,
                                      [(key, b'{"text": "hello"}', props)])
        await wait_until(lambda: bridge.statistics().duplicates == 1, 10, "duplicate seen")
        assert [m["seq"] for m in await all_messages(store)] == [first_seq]
        await wait_until(lambda: queue_depth(rabbitmq.url, cfg.events_queue) == 0, 5, "queue empty")
        stats = bridge.statistics()
        assert (stats.delivered, stats.acked, stats.stored, stats.rejected) == (2, 2, 1, 0)


async def test_poison_goes_to_dead_letters_with_reason(rabbitmq: RabbitMQ, tmp_path: Path) -> None:
    cfg = make_cfg(rabbitmq.url)
    async with running_bridge(cfg, tmp_path) as (bridge, store, _):
        messages = [
            ("scan.x", b"not json at all", pika.BasicProperties(message_id="p-1", headers={"k": "v"})),
            ("scan.x", b'{"type": "bad topic!", "payload": 1}', pika.BasicProperties(message_id="p-2")),
            ("scan.ok", b'{"fine": true}', pika.BasicProperties(message_id="ok-1")),
        ]
        await trio.to_thread.run_sync(publish, rabbitmq.url, cfg.events_exchange, messages)
        await wait_until(lambda: bridge.statistics().acked == 3, 10, "all settled")
        # the consumer kept going
        assert [m["message_id"] for m in await all_messages(store)] == ["ok-1"]
        dead = await trio.to_thread.run_sync(get_all, rabbitmq.url, cfg.dead_letter_queue)
        assert sorted(p.message_id for p, _ in dead) == ["p-1", "p-2"]
        by_id = {p.message_id: (p, body) for p, body in dead}
        p1, body1 = by_id["p-1"]
        assert body1 == b"not json at all"
        assert "not JSON" in p1.headers[REASON_HEADER]
        assert p1.headers["k"] == "v"
        assert p1.headers["x-aivad-original-routing-key"] == "scan.x"
        assert "every dot-separated word" in by_id["p-2"][0].headers[REASON_HEADER]
        rows = (await store.dead_letters()).letters
        assert sorted(r.detail["message_id"] for r in rows) == ["p-1", "p-2"]
        assert {r.kind for r in rows} == {"amqp.poison"}
        assert queue_depth(rabbitmq.url, cfg.events_queue) == 0
        assert bridge.statistics().rejected == 2


async def test_a_body_over_max_body_bytes_is_dead_lettered_and_the_consumer_goes_on(
    rabbitmq: RabbitMQ, tmp_path: Path
) -> None:
    cfg = make_cfg(rabbitmq.url, max_body_bytes=1024)
    big = json.dumps({"pad": "x" * 100_000}).encode()
    async with running_bridge(cfg, tmp_path) as (bridge, store, _):
        await trio.to_thread.run_sync(publish, rabbitmq.url, cfg.events_exchange, [
            ("big.x", big, pika.BasicProperties(message_id="big-1")),
            ("big.ok", b'{"fine": true}', pika.BasicProperties(message_id="ok-1")),
        ])
        await wait_until(lambda: bridge.statistics().acked == 2, 10, "both settled")
        assert [m["message_id"] for m in await all_messages(store)] == ["ok-1"]
        [(props, body)] = await trio.to_thread.run_sync(get_all, rabbitmq.url, cfg.dead_letter_queue)
        assert body == big, "the dead-letter exchange gets the delivery whole"
        assert f"body is {len(big)} bytes, over max_body_bytes (1024)" in props.headers[REASON_HEADER]
        [row] = (await store.dead_letters()).letters
        assert row.detail["body_bytes"] == len(big) and len(row.body) == 1024, "the table keeps its head"
        assert bridge.statistics().rejected == 1


async def test_own_events_published_with_confirms_and_not_reingested(rabbitmq: RabbitMQ, tmp_path: Path) -> None:
    cfg = make_cfg(rabbitmq.url)
    side = f"side-{uuid.uuid4().hex[:8]}"
    async with running_bridge(cfg, tmp_path) as (bridge, store, _):
        conn, ch = pika_channel(rabbitmq.url)
        ch.queue_declare(side, auto_delete=False)
        ch.queue_bind(side, cfg.events_exchange, "task.#")
        conn.close()
        events = [Envelope.from_fields("task.created", {"task_id": f"t{i}", "n": i}) for i in range(20)]
        for env in events:
            await bridge.publish_event(env)
        await wait_until(lambda: bridge.statistics().skipped_own == 20, 10, "own events looped back")
        await wait_until(lambda: bridge.statistics().published == 20, 10, "every confirm processed")
        got = await trio.to_thread.run_sync(get_all, rabbitmq.url, side)
        assert [p.message_id for p, _ in got] == [e.message_id for e in events]  # in order
        assert all(p.headers[ORIGIN_HEADER] == cfg.node_id for p, _ in got)
        assert json.loads(got[0][1])["payload"] == {"task_id": "t0", "n": 0}
        assert await all_messages(store) == []
        stats = bridge.statistics()
        assert (stats.published, stats.outbox_depth, stats.stored) == (20, 0, 0)


async def test_cancel_returns_unacked_deliveries_to_the_queue(rabbitmq: RabbitMQ, tmp_path: Path) -> None:
    cfg = make_cfg(rabbitmq.url, prefetch=50)
    await trio.to_thread.run_sync(declare_events_topology, rabbitmq.url, cfg)
    ids = [f"u-{i}" for i in range(200)]
    await trio.to_thread.run_sync(fill_fast, rabbitmq.url, cfg.events_exchange, "a.b", cfg.events_queue, ids)
    stuck: list[StuckSink] = []

    def sink(store: Store) -> StuckSink:
        stuck.append(StuckSink(store))
        return stuck[0]

    async with running_bridge(cfg, tmp_path, sink=sink) as (bridge, _store, scope):
        await wait_until(lambda: stuck[0].entered > 0, 10, "a batch in the store call")
        await wait_until(lambda: bridge.statistics().delivered == 50, 10, "a full prefetch delivered")
        await trio.sleep(0.2)
        assert bridge.statistics().delivered == 50  # bounded by prefetch: nothing more while unacked
        started = trio.current_time()
        scope.cancel()
        await wait_until(lambda: scope.cancelled_caught, cfg.grace_s + 2, "bridge stopped")
        assert trio.current_time() - started < cfg.grace_s
        await wait_until(lambda: queue_depth(rabbitmq.url, cfg.events_queue) == 200, 5, "all 200 ready again")
        counts = await trio.to_thread.run_sync(rabbitmq.queue_counts)
        assert counts[cfg.events_queue] == (200, 0)


async def test_broker_down_at_start_then_up(tmp_path: Path) -> None:
    """started() comes at once; the bridge keeps retrying and says why."""
    from tests.brokers import free_port

    cfg = make_cfg(f"amqp://guest:guest@127.0.0.1:{free_port()}/", connect_timeout_s=1.0)
    with trio.fail_after(2):
        async with running_bridge(cfg, tmp_path, wait_consuming=False) as (bridge, _, _):
            await wait_until(lambda: bridge.statistics().reconnects >= 2, 5, "retries")
            stats = bridge.statistics()
            assert not stats.connected
            assert stats.consuming == {cfg.events_queue: False}
            assert stats.last_error is not None
            assert "Connect" in stats.last_error
            await bridge.publish_event(Envelope.from_fields("system.alert", {}))
            assert bridge.statistics().outbox_depth == 1


async def test_consumer_cancelled_by_broker_is_noticed_and_resumed(rabbitmq: RabbitMQ, tmp_path: Path) -> None:
    cfg = make_cfg(rabbitmq.url)
    async with running_bridge(cfg, tmp_path) as (bridge, _store, _):
        conn, ch = pika_channel(rabbitmq.url)
        ch.queue_delete(cfg.events_queue)  # the broker cancels our consumer
        conn.close()
        await wait_until(lambda: bridge.statistics().reconnects >= 1, 10, "reconnect")
        await wait_until(lambda: bridge.statistics().consuming[cfg.events_queue], 10, "consuming again")
        await trio.to_thread.run_sync(publish, rabbitmq.url, cfg.events_exchange,
                                      [("a.b", b"{}", pika.BasicProperties(message_id="after"))])
        await wait_until(lambda: bridge.statistics().stored == 1, 10, "stored after re-declare")


async def test_broker_restart_mid_stream_no_loss_no_duplicates(rabbitmq: RabbitMQ, tmp_path: Path) -> None:
    cfg = make_cfg(rabbitmq.url, prefetch=100, batch_max=100)
    side = f"side-{uuid.uuid4().hex[:8]}"
    await trio.to_thread.run_sync(declare_events_topology, rabbitmq.url, cfg)
    conn, ch = pika_channel(rabbitmq.url)
    ch.queue_declare(side, durable=True)
    ch.queue_bind(side, cfg.events_exchange, "task.#")
    conn.close()
    before = [f"r-{i}" for i in range(4000)]
    after = [f"s-{i}" for i in range(1000)]
    await trio.to_thread.run_sync(fill_fast, rabbitmq.url, cfg.events_exchange, "load.test", cfg.events_queue, before)

    async with running_bridge(cfg, tmp_path, sink=lambda s: SlowSink(s, 0.02)) as (bridge, store, _):
        await wait_until(lambda: bridge.statistics().stored >= 500, 20, "mid-stream")
        restart = threading.Thread(target=rabbitmq.restart)
        restart.start()
        await wait_until(lambda: not bridge.statistics().connected, 20, "connection lost")
        stored_at_loss = bridge.statistics().stored
        assert stored_at_loss < len(before)  # the restart really hit mid-stream
        outage_events = [Envelope.from_fields("task.progress", {"i": i}) for i in range(10)]
        for env in outage_events:
            await bridge.publish_event(env)
        await trio.to_thread.run_sync(restart.join)
        await wait_until(lambda: bridge.statistics().consuming[cfg.events_queue], 20, "consuming again")
        await trio.to_thread.run_sync(
            publish, rabbitmq.url, cfg.events_exchange,
            [("load.test", json.dumps({"id": m}).encode(), pika.BasicProperties(delivery_mode=2, message_id=m))
             for m in after],
        )
        total = len(before) + len(after)
        await wait_until(lambda: store.statistics().committed_messages >= total, 60, "all stored")
        await wait_until(lambda: queue_depth(rabbitmq.url, cfg.events_queue) == 0, 10, "queue drained")
        await wait_until(lambda: bridge.statistics().outbox_depth == 0, 10, "outbox flushed")
        ids = [m["message_id"] for m in await all_messages(store)]
        assert len(ids) == len(set(ids)) == total  # nothing twice
        assert set(ids) == set(before) | set(after)  # nothing lost
        assert store.statistics().committed_messages == total
        stats = bridge.statistics()
        assert stats.reconnects >= 1
        # a batch committed just as the connection went comes again and is answered as duplicate
        assert stats.stored + stats.duplicates >= total
        assert stats.stored <= total
        got = await trio.to_thread.run_sync(get_all, rabbitmq.url, side)
        got_ids = [p.message_id for p, _ in got]
        # in order; a publish cut off by the restart may come twice (at least once), never out of order
        assert list(dict.fromkeys(got_ids)) == [e.message_id for e in outage_events]


# ---- through the daemon: serve_amqp started by run_daemon ------------------------------


def _daemon_amqp_status(control_path: str) -> dict[str, Any]:
    amqp = control_request(control_path, {"cmd": "status"})["status"]["amqp"]
    assert "consuming" in amqp, f"status shows no running AMQP bridge: {amqp}"
    return dict(amqp)


def _amqp_section(cfg: AmqpConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in (
        "enabled", "url", "events_exchange", "events_queue", "tasks_exchange", "tasks_queue",
        "dead_letter_exchange", "dead_letter_queue", "reconnect_initial_s", "reconnect_max_s", "grace_s")}


async def test_deepsoc_flow_through_the_daemon(rabbitmq: RabbitMQ, nursery: trio.Nursery, tmp_dir: Path) -> None:
    """pika publishes → a WebSocket subscriber of the event's pattern gets it with a seq, once."""
    from tests.conftest import start_daemon
    from tests.wsclient import connect, no_more_messages

    cfg = make_cfg(rabbitmq.url)
    daemon = await start_daemon(nursery, tmp_dir, amqp=_amqp_section(cfg))
    amqp = await trio.to_thread.run_sync(_daemon_amqp_status, daemon.control_path)
    with trio.fail_after(15):  # the daemon runs in this trio loop: ask it from a thread
        while not amqp["consuming"].get(cfg.events_queue):
            await trio.sleep(0.05)
            amqp = await trio.to_thread.run_sync(_daemon_amqp_status, daemon.control_path)
    async with connect(daemon.ws_url) as client:
        sub = await client.ok({"op": "subscribe", "pattern": "notifications.frontend.evt-7.#"})
        props = pika.BasicProperties(message_id="deepsoc-1", delivery_mode=2, headers={"source": "expert"})
        key = "notifications.frontend.evt-7.chat"
        await trio.to_thread.run_sync(publish, rabbitmq.url, cfg.events_exchange,
                                      [(key, b'{"text": "found it"}', props)])
        with trio.fail_after(10):
            frame = await client.next_message()
        msg = frame["msg"]
        assert frame["pattern"] == "notifications.frontend.evt-7.#"
        assert (msg["type"], msg["payload"], msg["message_id"]) == (key, {"text": "found it"}, "deepsoc-1")
        assert msg["metadata"]["source"] == "expert"
        assert msg["seq"] > sub["last_seq"]
        history = await client.ok({"op": "history", "pattern": "notifications.frontend.evt-7.#",
                                   "after": msg["seq"]})
        assert history["messages"] == []
        # the same message_id again changes nothing
        await trio.to_thread.run_sync(publish, rabbitmq.url, cfg.events_exchange,
                                      [(key, b'{"text": "found it"}', props)])
        await wait_until(lambda: queue_depth(rabbitmq.url, cfg.events_queue) == 0, 10, "acked")
        assert await no_more_messages(client, 0.5)


def test_sigterm_with_unacked_deliveries(rabbitmq: RabbitMQ, tmp_dir: Path) -> None:
    """SIGTERM mid-stream: exit 0 within the grace; every message is stored or back in the queue."""
    import sqlite3

    from tests.conftest import DaemonProcess

    cfg = make_cfg(rabbitmq.url, prefetch=500)
    declare_events_topology(rabbitmq.url, cfg)
    ids = [f"term-{i}" for i in range(30_000)]
    fill_fast(rabbitmq.url, cfg.events_exchange, "load.term", cfg.events_queue, ids)
    proc = DaemonProcess(tmp_dir, amqp={**_amqp_section(cfg), "prefetch": 500})
    proc.sigterm_mid_intake(lambda: int(_daemon_amqp_status(proc.control_path)["stored"]), 2000)
    with sqlite3.connect(proc.db_path) as db:
        stored = {row[0] for row in db.execute("SELECT message_id FROM messages")}
    ready, unacked = rabbitmq.queue_counts()[cfg.events_queue]
    assert unacked == 0
    assert 0 < len(stored) < len(ids), "SIGTERM did not land mid-stream"
    left = {json.loads(body)["id"] for _, body in get_all(rabbitmq.url, cfg.events_queue)}
    assert len(left) == ready
    assert stored | left == set(ids)  # nothing lost; overlap = committed but not yet acked, de-duplicated later
