"""Which Redis client for the cluster log: coredis natively under trio, or redis-py behind a thread bridge.

Usage::

    python bench/redis_clients.py [--messages 10000] [--rounds 7] [--json]

Uses the server at ``AIVAD_BENCH_REDIS_URL`` if set, else starts a private
redis-server with tests/brokers.py (installs it when missing) and stops it after.

The two candidates of issue 12, doing what aivad/redis/ does:

* **coredis** (anyio) called from trio tasks directly: no thread, no bridge.
* **redis-py** (``redis.asyncio``, the design card's package) on its own asyncio
  loop in a dedicated thread, behind a bridge like aivad/amqp.py's: a call is
  one ``run_coroutine_threadsafe`` there and one ``run_sync_soon`` back; the
  *coalesced* mode batches (see b). redis-py uses hiredis, its C reply parser,
  when installed — the setup a user who cares for speed picks; the header says
  which parser ran.
* For reference, redis-py alone on plain asyncio (no trio, no bridge), in a
  thread of its own while trio waits: the ceiling a bridge can approach.

Measured:

a. one round trip, sequential: ``PING``, and one ``EVALSHA`` of the append
   script with one message;
b. appends through the append script (aivad.redis.APPEND_LUA) in batches of 1,
   10 and 100 messages of 200 bytes from ``--window`` concurrent callers, two
   ways: *direct* (each call on its own: coredis's own multiplexing; for
   redis-py one bridge crossing per call) and *coalesced* (group commit: one
   flusher sends every call waiting as one pipeline — for redis-py that is the
   batched bridge, one crossing per flush; for coredis the same flusher in
   trio);
c. tail latency: append on one connection, wake-up of an ``XREAD BLOCK`` reader
   on another, paced at ``--rate`` messages/s (p50/p99); redis-py's reader
   loops on the asyncio side and hands each reply to trio in one crossing;
d. CPU per message in this process (all threads, getrusage) during b, c and e;
e. reading the log back as a tail catching up or a history does: ``XREAD
   COUNT 500`` from the start over a batch-100 log, each entry turned into
   (seq, type, JSON with seq). coredis both with the raw reply (what
   aivad/redis/log.py does: ``create_request`` with a pass-through callback) and
   with its typed ``StreamEntry`` replies.

The machine is shared and its load comes in bursts longer than a whole suite,
so measurements are **interleaved**: in every round each measurement runs for
both clients back to back (which one first alternates by round), and each
figure is the median over ``--rounds``. Prints each figure per client, the
ratio coredis / redis-py (bridge) as the median of the per-round ratios, and in
how many rounds coredis came out better.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import coredis
import coredis.retry
import redis
import redis.asyncio as aioredis
import trio

from aivad.redis import APPEND_LUA, OPEN_LUA
from bench._common import machine, percentile, self_cpu_seconds
from tests.brokers import start_redis

T = TypeVar("T")
BODY_BYTES = 200
BATCHES = (1, 10, 100)
MODES = ("direct", "coalesced")
READ_COUNT = 500


def rows(n: int, tag: str) -> list[tuple[str, str, str]]:
    """n (message_id, type, envelope JSON) of about BODY_BYTES each."""
    out = []
    for i in range(n):
        head = {"message_id": f"{tag}-{i}", "timestamp": "2026-12-02T10:00:00.000Z", "type": "bench.redis",
                "payload": {"n": i, "text": ""}, "metadata": {}}
        pad = BODY_BYTES - len(json.dumps(head, separators=(",", ":")))
        head["payload"] = {"n": i, "text": "x" * max(0, pad)}
        out.append((f"{tag}-{i}", "bench.redis", json.dumps(head, separators=(",", ":"))))
    return out


def keys(prefix: str) -> list[str]:
    return [f"{prefix}{{log}}:meta", f"{prefix}{{log}}:stream", f"{prefix}{{log}}:ids"]


def script_args(epoch: str, batch: list[tuple[str, str, str]]) -> list[str]:
    args = [epoch, "0"]  # the epoch, the newest seq the caller saw, then the rows
    for r in batch:
        args += r
    return args


def to_message(identifier: bytes, topic: bytes, body: bytes) -> tuple[int, str, str]:
    seq = int(identifier.split(b"-")[0])
    return seq, topic.decode(), f'{body[:-1].decode()},"seq":{seq}}}'


def raw_reply(response: Any, **_: Any) -> Any:
    """A coredis callback that keeps the parsed RESP3 reply as it is."""
    return response


class Coalescer:
    """Coalesce concurrent trio calls: one flusher hands everything waiting to ``handler`` at once.

    Group commit, as the store does: nothing waits for a batch to fill; while one
    flush is in flight the next one gathers.
    """

    def __init__(self, handler: Callable[[list[Any]], Coroutine[Any, Any, list[Any]]], bound: int = 10_000) -> None:
        self._handler = handler
        self._send, self._receive = trio.open_memory_channel[tuple[Any, list[Any], trio.Event]](bound)

    async def call(self, item: Any) -> Any:
        slot: list[Any] = []
        done = trio.Event()
        await self._send.send((item, slot, done))
        await done.wait()
        return slot[0]

    async def serve(self) -> None:
        async for first in self._receive:
            batch = [first]
            while True:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            results = await self._handler([item for item, _, _ in batch])
            for (_, slot, done), result in zip(batch, results, strict=True):
                slot.append(result)
                done.set()


# ---- the two clients, one interface ----------------------------------------------------------------


class CoredisClient:
    name = "coredis"

    def __init__(self, url: str) -> None:
        self.url = url
        self.client: coredis.Redis[bytes] = coredis.Redis.from_url(url, retry_policy=coredis.retry.NoRetryPolicy())
        self.append_sha = ""
        self.open_sha = ""

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with self.client:
            self.append_sha = (await self.client.script_load(APPEND_LUA)).decode()
            self.open_sha = (await self.client.script_load(OPEN_LUA)).decode()
            yield

    async def open_log(self, prefix: str) -> str:
        epoch, _ = await self.client.evalsha(self.open_sha, keys(prefix), [uuid.uuid4().hex, 0])
        return str(epoch.decode())

    async def ping(self) -> None:
        await self.client.ping()

    async def append(self, prefix: str, args: list[str]) -> Any:
        return await self.client.evalsha(self.append_sha, keys(prefix), args)

    async def append_many(self, items: list[tuple[str, list[str]]]) -> list[Any]:
        async with self.client.pipeline(transaction=False) as p:
            replies = [p.evalsha(self.append_sha, keys(prefix), args) for prefix, args in items]
        return [await r for r in replies]

    async def xlen(self, key: str) -> int:
        return await self.client.xlen(key)

    async def read(self, stream: str, last: str) -> tuple[str, int]:
        found = await self.client.create_request(b"XREAD", b"COUNT", READ_COUNT, b"STREAMS", stream, last,
                                                 callback=raw_reply)
        raw = found[stream.encode()]
        out = [to_message(ident, fields[3], fields[5]) for ident, fields in raw]
        return raw[-1][0].decode(), len(out)

    async def read_typed(self, stream: str, last: str) -> tuple[str, int]:
        typed = await self.client.xread({stream: last}, count=READ_COUNT)
        assert typed
        entries = typed[stream.encode()]
        out = [to_message(e.identifier, e.field_values[b"type"], e.field_values[b"d"]) for e in entries]
        return entries[-1].identifier.decode(), len(out)

    @contextlib.asynccontextmanager
    async def tailing(self, stream: str, on_seqs: Callable[[list[int]], None]) -> AsyncIterator[None]:
        """An XREAD BLOCK reader on its own connection, delivering seqs to ``on_seqs`` in trio."""
        reader: coredis.Redis[bytes] = coredis.Redis.from_url(self.url, retry_policy=coredis.retry.NoRetryPolicy())

        async def loop() -> None:
            last = "0-0"
            while True:
                found = await reader.create_request(b"XREAD", b"COUNT", READ_COUNT, b"BLOCK", 1000, b"STREAMS",
                                                    stream, last, callback=raw_reply)
                if not found:
                    continue
                raw = found[stream.encode()]
                on_seqs([int(ident.split(b"-")[0]) for ident, _ in raw])
                last = raw[-1][0].decode()

        async with reader, trio.open_nursery() as nursery:
            nursery.start_soon(loop)
            yield
            nursery.cancel_scope.cancel()


class LoopThread:
    """An asyncio loop in a thread of its own (as aivad/amqp.py's _LoopThread)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="bench-redis-asyncio", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    async def call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """One crossing there, one back (run_sync_soon), awaited from trio."""
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake(_: concurrent.futures.Future[T]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future = asyncio.run_coroutine_threadsafe(fn(*args), self.loop)
        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            raise
        return future.result()


class RedisPyBridgeClient:
    name = "redis-py"

    def __init__(self, url: str) -> None:
        self.url = url
        self.thread = LoopThread()
        self.r: aioredis.Redis | None = None
        self.append_sha = ""
        self.open_sha = ""

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async def setup() -> None:
            self.r = aioredis.Redis.from_url(self.url)
            self.append_sha = await self.r.script_load(APPEND_LUA)
            self.open_sha = await self.r.script_load(OPEN_LUA)

        async def close() -> None:
            assert self.r is not None
            await self.r.aclose()

        await self.thread.call(setup)
        try:
            yield
        finally:
            await self.thread.call(close)
            self.thread.stop()

    async def open_log(self, prefix: str) -> str:
        async def aio() -> str:
            assert self.r is not None
            epoch, _ = await self.r.evalsha(self.open_sha, 3, *keys(prefix), uuid.uuid4().hex, 0)
            return str(epoch.decode())

        return await self.thread.call(aio)

    async def ping(self) -> None:
        async def aio() -> Any:
            assert self.r is not None
            return await self.r.ping()

        await self.thread.call(aio)

    async def append(self, prefix: str, args: list[str]) -> Any:
        async def aio() -> Any:
            assert self.r is not None
            return await self.r.evalsha(self.append_sha, 3, *keys(prefix), *args)

        return await self.thread.call(aio)

    async def append_many(self, items: list[tuple[str, list[str]]]) -> list[Any]:
        async def aio() -> list[Any]:  # the batched bridge: one crossing, one pipeline
            assert self.r is not None
            async with self.r.pipeline(transaction=False) as p:
                for prefix, args in items:
                    p.evalsha(self.append_sha, 3, *keys(prefix), *args)
                return list(await p.execute())

        return await self.thread.call(aio)

    async def xlen(self, key: str) -> int:
        async def aio() -> int:
            assert self.r is not None
            return int(await self.r.xlen(key))

        return await self.thread.call(aio)

    async def read(self, stream: str, last: str) -> tuple[str, int]:
        async def aio() -> tuple[str, list[tuple[int, str, str]]]:
            assert self.r is not None
            found = await self.r.xread({stream: last}, count=READ_COUNT)
            entries = found[0][1]
            return entries[-1][0].decode(), [to_message(i, f[b"type"], f[b"d"]) for i, f in entries]

        last, out = await self.thread.call(aio)
        return last, len(out)

    read_typed = None

    @contextlib.asynccontextmanager
    async def tailing(self, stream: str, on_seqs: Callable[[list[int]], None]) -> AsyncIterator[None]:
        """The reader loops on the asyncio side; each reply crosses to trio in one ``run_sync_soon``.

        It stops cooperatively (a flag checked between blocks of 200 ms): awaiting
        the reader task after cancelling it in the middle of a blocking XREAD hung
        now and then here (not investigated further: it is teardown of a bench).
        """
        token = trio.lowlevel.current_trio_token()
        stopping: list[bool] = []
        tasks: list[asyncio.Task[None]] = []

        async def loop() -> None:
            reader = aioredis.Redis.from_url(self.url)
            try:
                last = "0-0"
                while not stopping:
                    found = await reader.xread({stream: last}, count=READ_COUNT, block=200)
                    if not found:
                        continue
                    entries = found[0][1]
                    token.run_sync_soon(on_seqs, [int(ident.split(b"-")[0]) for ident, _ in entries])
                    last = entries[-1][0].decode()
            finally:
                await reader.aclose()

        async def start() -> None:
            tasks.append(asyncio.get_running_loop().create_task(loop()))

        async def stop() -> None:
            stopping.append(True)
            await tasks[0]

        await self.thread.call(start)
        try:
            yield
        finally:
            await self.thread.call(stop)


Client = CoredisClient | RedisPyBridgeClient


# ---- measurements (the same code for both clients) ----------------------------------------------------


async def measure_round_trips(c: Client, n: int, res: dict[str, float]) -> None:
    t0 = time.perf_counter()
    for _ in range(n):
        await c.ping()
    res["rt_ping_us"] = (time.perf_counter() - t0) / n * 1e6
    prefix = f"b-{c.name}-rt-{uuid.uuid4().hex[:6]}:"
    epoch = await c.open_log(prefix)
    data = rows(n, "rt")
    t0 = time.perf_counter()
    for r in data:
        await c.append(prefix, script_args(epoch, [r]))
    res["rt_eval_us"] = (time.perf_counter() - t0) / n * 1e6


async def measure_appends(c: Client, mode: str, batch: int, n: int, window: int, res: dict[str, float]) -> str:
    prefix = f"b-{c.name}-{mode}-{batch}-{uuid.uuid4().hex[:6]}:"
    epoch = await c.open_log(prefix)
    data = rows(n, f"b{batch}")
    chunks = iter([data[i:i + batch] for i in range(0, len(data), batch)])
    coalescer = Coalescer(c.append_many)

    async def worker() -> None:
        for chunk in chunks:
            if mode == "direct":
                await c.append(prefix, script_args(epoch, chunk))
            else:
                await coalescer.call((prefix, script_args(epoch, chunk)))

    c0, t0 = self_cpu_seconds(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(coalescer.serve)
        async with trio.open_nursery() as workers:
            for _ in range(window):
                workers.start_soon(worker)
        nursery.cancel_scope.cancel()
    wall, cpu = time.perf_counter() - t0, self_cpu_seconds() - c0
    assert await c.xlen(keys(prefix)[1]) == n
    res[f"append_{mode}_b{batch}_msgs"] = n / wall
    res[f"append_{mode}_b{batch}_cpu_us"] = cpu / n * 1e6
    return keys(prefix)[1]


async def measure_read(c: Client, stream: str, n: int, res: dict[str, float], typed: bool = False) -> None:
    read = c.read_typed if typed else c.read
    assert read is not None
    last, got = "0-0", 0
    c0, t0 = self_cpu_seconds(), time.perf_counter()
    while got < n:
        last, k = await read(stream, last)
        got += k
    wall, cpu = time.perf_counter() - t0, self_cpu_seconds() - c0
    suffix = "_typed" if typed else ""
    res[f"read{suffix}_msgs"] = n / wall
    res[f"read{suffix}_cpu_us"] = cpu / n * 1e6


async def measure_tail(c: Client, n: int, rate: float, res: dict[str, float]) -> None:
    prefix = f"b-{c.name}-lat-{uuid.uuid4().hex[:6]}:"
    epoch = await c.open_log(prefix)
    sent = [0.0] * n
    lat: list[float] = []
    done = trio.Event()

    def on_seqs(seqs: list[int]) -> None:  # in trio
        now = time.perf_counter()
        lat.extend(now - sent[s - 1] for s in seqs)
        if len(lat) >= n:
            done.set()

    data = rows(n, "lat")
    c0 = self_cpu_seconds()
    async with c.tailing(keys(prefix)[1], on_seqs):
        await trio.sleep(0.2)
        start = time.perf_counter()
        for i, r in enumerate(data):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await trio.sleep(delay)
            sent[i] = time.perf_counter()
            await c.append(prefix, script_args(epoch, [r]))
        with trio.fail_after(30):
            await done.wait()
    res["tail_cpu_us"] = (self_cpu_seconds() - c0) / n * 1e6
    lat.sort()
    res["tail_p50_ms"] = percentile(lat, 50) * 1000
    res["tail_p99_ms"] = percentile(lat, 99) * 1000


# ---- redis-py alone on plain asyncio (reference: no trio, no bridge) --------------------------------------


async def plain_asyncio(url: str, n_rt: int, n_msgs: int, window: int) -> dict[str, float]:
    res: dict[str, float] = {}
    r = aioredis.Redis.from_url(url)
    try:
        append_sha = await r.script_load(APPEND_LUA)
        open_sha = await r.script_load(OPEN_LUA)

        async def open_log(prefix: str) -> str:
            epoch, _ = await r.evalsha(open_sha, 3, *keys(prefix), uuid.uuid4().hex, 0)
            return str(epoch.decode())

        t0 = time.perf_counter()
        for _ in range(n_rt):
            await r.ping()
        res["rt_ping_us"] = (time.perf_counter() - t0) / n_rt * 1e6
        prefix = f"ba-rt-{uuid.uuid4().hex[:6]}:"
        epoch = await open_log(prefix)
        t0 = time.perf_counter()
        for row in rows(n_rt, "rt"):
            await r.evalsha(append_sha, 3, *keys(prefix), *script_args(epoch, [row]))
        res["rt_eval_us"] = (time.perf_counter() - t0) / n_rt * 1e6
        for batch in BATCHES:
            prefix = f"ba-b{batch}-{uuid.uuid4().hex[:6]}:"
            epoch = await open_log(prefix)
            data = rows(n_msgs, f"b{batch}")
            it = iter([data[i:i + batch] for i in range(0, len(data), batch)])

            async def worker(prefix: str = prefix, epoch: str = epoch, it: Any = it) -> None:
                for chunk in it:
                    await r.evalsha(append_sha, 3, *keys(prefix), *script_args(epoch, chunk))

            c0, t0 = self_cpu_seconds(), time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(window)))
            wall, cpu = time.perf_counter() - t0, self_cpu_seconds() - c0
            res[f"append_direct_b{batch}_msgs"] = n_msgs / wall
            res[f"append_direct_b{batch}_cpu_us"] = cpu / n_msgs * 1e6
    finally:
        await r.aclose()
    return res


# ---- the run ----------------------------------------------------------------------------------------------


async def run_rounds(url: str, args: argparse.Namespace) -> tuple[list[dict[str, float]], ...]:
    core, bridge = CoredisClient(url), RedisPyBridgeClient(url)
    core_runs: list[dict[str, float]] = []
    py_runs: list[dict[str, float]] = []
    plain_runs: list[dict[str, float]] = []
    async with core.running(), bridge.running():
        for rnd in range(args.rounds):
            cr: dict[str, float] = {}
            pr: dict[str, float] = {}
            pair = [(core, cr), (bridge, pr)] if rnd % 2 == 0 else [(bridge, pr), (core, cr)]
            for c, res in pair:
                await measure_round_trips(c, args.round_trips, res)
            streams: dict[str, str] = {}
            for mode in MODES:
                for batch in BATCHES:
                    for c, res in pair:
                        streams[c.name] = await measure_appends(c, mode, batch, args.messages, args.window, res)
            for c, res in pair:  # over the coalesced batch-100 log just written
                await measure_read(c, streams[c.name], args.messages, res)
            await measure_read(core, streams[core.name], args.messages, cr, typed=True)
            for c, res in pair:
                await measure_tail(c, args.latency_messages, args.rate, res)
            core_runs.append(cr)
            py_runs.append(pr)
            plain_runs.append(await trio.to_thread.run_sync(
                lambda: asyncio.run(plain_asyncio(url, args.round_trips, args.messages, args.window))))
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    return core_runs, py_runs, plain_runs


ROWS: list[tuple[str, str]] = [
    ("rt_ping_us", "(a) PING round trip, µs"),
    ("rt_eval_us", "(a) EVALSHA append ×1 round trip, µs"),
    *[(f"append_{m}_b{b}_msgs", f"(b) appends ×{b}, {m}, msgs/s") for m in MODES for b in BATCHES],
    *[(f"append_{m}_b{b}_cpu_us", f"(d) CPU/msg, appends ×{b}, {m}, µs") for m in MODES for b in BATCHES],
    ("read_msgs", "(e) read back, XREAD ×500, msgs/s"),
    ("read_cpu_us", "(d) CPU/msg, reading back, µs"),
    ("read_typed_msgs", "(e) … coredis typed replies, msgs/s"),
    ("read_typed_cpu_us", "(d) … coredis typed replies, µs"),
    ("tail_p50_ms", "(c) tail latency p50, ms"),
    ("tail_p99_ms", "(c) tail latency p99, ms"),
    ("tail_cpu_us", "(d) CPU/msg, tail run, µs"),
]


def median(runs: list[dict[str, float]], key: str) -> float:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else float("nan")


def fmt(v: float, key: str) -> str:
    if v != v:
        return "—"
    if key.endswith("_msgs"):
        return f"{v:,.0f}"
    return f"{v:,.2f}" if v < 100 else f"{v:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--messages", type=int, default=10_000, help="messages per append measurement (b) and read (e)")
    ap.add_argument("--round-trips", type=int, default=1_000, help="sequential round trips (a)")
    ap.add_argument("--window", type=int, default=8, help="concurrent append callers (b)")
    ap.add_argument("--latency-messages", type=int, default=1_000, help="paced appends for (c)")
    ap.add_argument("--rate", type=float, default=500.0, help="pace of (c), messages/s")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", action="store_true", help="print every round's figures as JSON too")
    args = ap.parse_args()

    url = os.environ.get("AIVAD_BENCH_REDIS_URL")
    server = None
    if not url:
        server = start_redis()
        url = server.url
    try:
        core_runs, py_runs, plain_runs = trio.run(run_rounds, url, args)
    finally:
        if server is not None:
            server.stop()

    from redis.utils import HIREDIS_AVAILABLE

    info = machine()
    parser = "its hiredis parser" if HIREDIS_AVAILABLE else "its pure-Python parser (pip install hiredis: C parser)"
    print(f"# Redis clients for the cluster log — {info['cpus']} CPUs, {info['cpu_model']}, Python {info['python']}")
    print(f"# coredis {coredis.__version__}; redis-py {redis.__version__} with {parser}; {args.messages} msgs × "
          f"{BODY_BYTES} B per append measurement, {args.window} callers; tail {args.latency_messages} msgs at "
          f"{args.rate:.0f}/s; medians of {args.rounds} interleaved rounds")
    print()
    print(f"| {'measure':<40} | {'coredis (trio)':>15} | {'redis-py (bridge)':>17} | {'ratio':>6} | "
          f"{'coredis better':>14} | {'redis-py asyncio alone':>22} |")
    print("|" + "-" * 42 + "|" + "-" * 16 + ":|" + "-" * 18 + ":|" + "-" * 7 + ":|" + "-" * 15 + ":|" + "-" * 23 + ":|")
    for key, label in ROWS:
        c, p, a = median(core_runs, key), median(py_runs, key), median(plain_runs, key)
        # the ratio of the two measured back to back in each round, and how often coredis came out better
        pairs = [(rc[key], rp[key]) for rc, rp in zip(core_runs, py_runs, strict=True) if key in rc and key in rp]
        ratio = f"{statistics.median(x / y for x, y in pairs):.2f}×" if pairs else "—"
        higher_is_better = key.endswith("_msgs")
        won = f"{sum(1 for x, y in pairs if (x > y) == higher_is_better)}/{len(pairs)}" if pairs else "—"
        print(f"| {label:<40} | {fmt(c, key):>15} | {fmt(p, key):>17} | {ratio:>6} | {won:>14} | {fmt(a, key):>22} |")
    print()
    print("ratio = coredis / redis-py (bridge), median of the per-round ratios (both measured back to back):")
    print("> 1 is better for coredis on rates, < 1 on times and CPU. 'coredis better' counts the rounds.")
    if args.json:
        print(json.dumps({"coredis": core_runs, "redis-py": py_runs, "asyncio": plain_runs}))


if __name__ == "__main__":
    main()
