"""AMQP ingest: RabbitMQ → aivad's bridge → store, beside a raw aiormq consume loop.

Usage::

    python bench/amqp_ingest.py [--messages 50000] [--prefetch 500] [--runs 1] [--page-size 1024]

Uses the broker at ``AIVAD_BENCH_AMQP_URL`` if set, else starts a private
RabbitMQ with tests/brokers.py (installs it when missing) and stops it after.

Each run fills a durable queue with N persistent 200-byte JSON messages
(``message_id`` set, as agents do), then measures, on the same queue size:

* raw: a plain-asyncio aiormq consumer, manual ack per message, prefetch P —
  the baseline of DESIGN §6;
* aivad -> store: ``serve_amqp`` + ``serve_store`` under trio (the real SQLite
  store, ``synchronous`` as given, by default NORMAL — the daemon's default): consume, validate,
  group commit, ``basic_ack(multiple=True)``. Time: ConsumeOk → last ack.
* aivad -> WebSocket: the real ``aivad serve`` with AMQP on, and a ``#``
  subscriber in a separate process (``websockets`` sync client, ``since: 0``).
  Rate over the frames that came live (the subscribe reply's ``last_seq`` says
  which were replayed): start-up and replay left out; a run with fewer than
  20 % live frames (the subscriber came late) is not counted.
  Skipped while the daemon does not run the AMQP service.

Prints the rates and the ratios to raw (goal >= 1.0x, issue 13). The machine is shared
and noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiormq
import attrs
import pika  # type: ignore[import-untyped]
import trio

from aivad.amqp import AmqpBridge, serve_amqp
from aivad.config import AmqpConfig, StoreConfig
from aivad.store import serve_store
from bench._common import control as control_request
from tests.brokers import declare_events_topology, free_port

BODY_BYTES = 200


def body(i: int) -> bytes:
    head = json.dumps({"n": i, "text": ""})
    pad = BODY_BYTES - len(head)
    return json.dumps({"n": i, "text": "x" * pad}).encode()


def fill(url: str, exchange: str, routing_key: str, queue: str, n: int) -> float:
    """Publish n persistent messages (no confirms: then wait for the queue to hold them all)."""
    started = time.perf_counter()
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        for i in range(n):
            ch.basic_publish(exchange, routing_key, body(i),
                             pika.BasicProperties(delivery_mode=2, message_id=f"bench-{i}",
                                                  content_type="application/json"))
        deadline = time.monotonic() + 120
        while True:
            count = ch.queue_declare(queue, passive=True).method.message_count
            if count >= n:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue {queue} holds {count} of {n}")
            time.sleep(0.05)
    finally:
        conn.close()
    return time.perf_counter() - started


def declare_raw(url: str, queue: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        conn.channel().queue_declare(queue, durable=True)
    finally:
        conn.close()


def delete_queues(url: str, *queues: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        for q in queues:
            ch.queue_delete(q)
    finally:
        conn.close()


async def raw_consume(url: str, queue: str, n: int, prefetch: int) -> float:
    conn = await aiormq.connect(url)
    ch = await conn.channel()
    await ch.basic_qos(prefetch_count=prefetch)
    done = asyncio.get_running_loop().create_future()
    count = 0

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        nonlocal count
        await message.channel.basic_ack(message.delivery.delivery_tag)  # type: ignore[union-attr,arg-type]
        count += 1
        if count == n and not done.done():
            done.set_result(None)

    started = time.perf_counter()
    await ch.basic_consume(queue, on_message, no_ack=False)
    await done
    elapsed = time.perf_counter() - started
    await conn.close()
    return elapsed


async def aivad_consume(cfg: AmqpConfig, store_cfg: StoreConfig, n: int) -> tuple[float, dict[str, object]]:
    async with trio.open_nursery() as nursery:
        store = await nursery.start(serve_store, store_cfg)
        bridge = await nursery.start(serve_amqp, cfg, store)
        started = await _consuming_since(bridge, cfg)
        while bridge.statistics().acked < n:
            await trio.sleep(0.002)
        elapsed = time.perf_counter() - started
        stats = bridge.statistics()
        await trio.sleep(0.2)  # let the last ack reach the broker before closing
        nursery.cancel_scope.cancel()
    return elapsed, {"batches": stats.batches, "stored": stats.stored, "duplicates": stats.duplicates,
                     "store_commits": store.statistics().commits}


async def _consuming_since(bridge: AmqpBridge, cfg: AmqpConfig) -> float:
    """Wait for ConsumeOk (connect and declare are not part of the rate, as for raw)."""
    while not bridge.statistics().consuming[cfg.events_queue]:
        await trio.sleep(0.0005)
    return time.perf_counter()


SUBSCRIBER = r"""
import json, sys, time
from websockets.sync.client import connect
url, n = sys.argv[1], int(sys.argv[2])
with connect(url, max_size=None) as ws:
    ws.send(json.dumps({"op": "subscribe", "pattern": "#", "since": 0, "ref": 1}))
    replayed_through, seen, last_seq, t_live, live = None, 0, 0, None, 0
    while seen < n:
        frame = json.loads(ws.recv())
        if frame.get("op") == "ok" and frame.get("ref") == 1:
            replayed_through = frame["last_seq"]  # what was stored when we subscribed comes as replay
        elif frame.get("op") == "message":
            seen += 1
            assert frame["msg"]["seq"] > last_seq
            last_seq = frame["msg"]["seq"]
            if replayed_through is not None and last_seq > replayed_through:
                live += 1
                if live == 1:
                    t_live = time.perf_counter()
    rate = (live - 1) / (time.perf_counter() - t_live) if live > 1 else 0.0
    print("done", rate, live, flush=True)
"""


def aivad_to_websocket(cfg: AmqpConfig, store_cfg: StoreConfig, n: int) -> float | None:
    """The real ``aivad serve`` (AMQP on) → a ``#`` subscriber in another process.

    The queue is filled before the daemon starts; the subscriber subscribes with
    ``since: 0`` (replay, then live: no gap), and the rate is taken over the
    frames that came live — after the reply's ``last_seq`` — so the daemon's
    start-up and the replay are left out and what remains is the steady
    AMQP → store → WebSocket rate. Returns None when under 20 % came live.
    """
    with tempfile.TemporaryDirectory(prefix="aivad-bench-") as tmp:
        ws_port = free_port()
        control = str(Path(tmp) / "control.sock")
        amqp = {k: getattr(cfg, k) for k in ("enabled", "url", "events_exchange", "events_queue",
                                             "tasks_exchange", "tasks_queue", "dead_letter_exchange",
                                             "dead_letter_queue", "prefetch", "batch_max")}
        doc: dict[str, dict[str, object]] = {
            "websocket": {"host": "127.0.0.1", "port": ws_port},
            "control": {"socket": control},
            "store": {"path": str(Path(tmp) / "aivad.db"), "synchronous": store_cfg.synchronous,
                      "page_size": store_cfg.page_size},
            "amqp": amqp,
        }
        config = Path(tmp) / "config.toml"
        config.write_text("".join(
            f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
            for section, values in doc.items()))
        log = open(Path(tmp) / "daemon.log", "wb")  # noqa: SIM115 - handed to the child
        daemon = subprocess.Popen([sys.executable, "-m", "aivad", "serve", "--config", str(config)],
                                  stdout=log, stderr=log, cwd=tmp)
        log.close()
        try:
            deadline = time.monotonic() + 30
            while True:
                if daemon.poll() is not None:
                    raise RuntimeError((Path(tmp) / "daemon.log").read_text())
                try:
                    status = control_request(control, {"cmd": "status"})
                    break
                except (OSError, ValueError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
            assert "amqp" in status.get("status", {}), status  # type: ignore[operator]
            out = subprocess.run([sys.executable, "-c", SUBSCRIBER, f"ws://127.0.0.1:{ws_port}/", str(n)],
                                 capture_output=True, text=True, timeout=600, check=True)
            _, rate, live = out.stdout.split()
            if int(live) < n // 5:  # the subscriber came late: too few live frames to time the ingest by
                print(f"# only {live} of {n} frames came live (the rest were replayed): this run is not counted",
                      flush=True)
                return None
            return float(rate)
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def one_run(url: str, n: int, prefetch: int, store: StoreConfig,
            websocket: bool) -> tuple[float, float, float | None, dict[str, object]]:
    sfx = uuid.uuid4().hex[:8]
    raw_queue = f"bench-raw-{sfx}"
    declare_raw(url, raw_queue)
    fill(url, "", raw_queue, raw_queue, n)
    raw_s = asyncio.run(raw_consume(url, raw_queue, n, prefetch))

    cfg = AmqpConfig(
        enabled=True, url=url, prefetch=prefetch, batch_max=max(prefetch, 1),
        events_exchange=f"bench-ev-{sfx}", events_queue=f"bench-evq-{sfx}",
        tasks_exchange=f"bench-t-{sfx}", tasks_queue=f"bench-tq-{sfx}",
        dead_letter_exchange=f"bench-dlx-{sfx}", dead_letter_queue=f"bench-dead-{sfx}",
    )
    declare_events_topology(url, cfg)
    fill(url, cfg.events_exchange, "bench.ingest.msg", cfg.events_queue, n)
    with tempfile.TemporaryDirectory(prefix="aivad-bench-") as tmp:
        aivad_s, detail = trio.run(aivad_consume, cfg, attrs.evolve(store, path=str(Path(tmp) / "aivad.db")), n)
    ws_rate = None
    if websocket:
        fill(url, cfg.events_exchange, "bench.ingest.msg", cfg.events_queue, n)
        ws_rate = aivad_to_websocket(cfg, store, n)
    delete_queues(url, raw_queue, cfg.events_queue, cfg.tasks_queue, cfg.dead_letter_queue)
    return n / raw_s, n / aivad_s, ws_rate, detail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--prefetch", type=int, default=500)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--synchronous", choices=["NORMAL", "FULL"], default="NORMAL",
                        help="the store's synchronous mode (default NORMAL, the daemon's own default)")
    parser.add_argument("--page-size", type=int, default=StoreConfig().page_size,
                        help="the store's page size for its new database (default: the daemon's)")
    parser.add_argument("--no-websocket", action="store_true", help="skip the run through to a WebSocket subscriber")
    args = parser.parse_args()

    url = os.environ.get("AIVAD_BENCH_AMQP_URL")
    node = None
    if not url:
        from tests.brokers import start_rabbitmq

        node = start_rabbitmq()
        url = node.url
    try:
        store = StoreConfig(synchronous=args.synchronous, page_size=args.page_size)
        raws, aivads, wss = [], [], []
        for run in range(args.runs):
            raw, aivad, ws, detail = one_run(url, args.messages, args.prefetch, store, not args.no_websocket)
            raws.append(raw)
            aivads.append(aivad)
            ws_text = ""
            if ws is not None:
                wss.append(ws)
                ws_text = f", aivad -> websocket {ws:,.0f} msg/s ({ws / raw:.2f}x)"
            elif not args.no_websocket:
                ws_text = ", aivad -> websocket not counted (its subscriber came late)"
            print(f"run {run + 1}: raw aiormq {raw:,.0f} msg/s, aivad -> store {aivad:,.0f} msg/s "
                  f"({aivad / raw:.2f}x){ws_text}  {detail}", flush=True)
        raw, aivad = statistics.median(raws), statistics.median(aivads)
        line = (f"amqp_ingest: {args.messages} msgs x {BODY_BYTES} B, prefetch {args.prefetch}, "
                f"store synchronous={args.synchronous}, page_size={args.page_size}, median of {args.runs}: "
                f"raw aiormq (plain asyncio, ack each) {raw:,.0f} msg/s; "
                f"aivad bridge -> store {aivad:,.0f} msg/s, ratio {aivad / raw:.2f}x")
        if wss:
            ws = statistics.median(wss)
            line += f"; aivad -> WebSocket subscriber {ws:,.0f} msg/s, ratio {ws / raw:.2f}x"
        print(line + " (goal >= 1.0x)")
    finally:
        if node is not None:
            node.stop()


if __name__ == "__main__":
    main()
