"""Chaos: 5,000 tasks, random failures, timeouts and worker churn — every task ends exactly once.

Test policy for this module:

- One real daemon (a real ``aivad serve`` subprocess, so it has a core of its
  own), real sockets, real workers of two kinds: ``aivad.client.Worker``s (some
  stable, some churning: started, then cancelled mid-task or stopped
  gracefully, then started again) and raw protocol workers (trio-websocket)
  that also drop their connection mid-task or stay silent past the deadline.
- Each task's payload picks its fate: succeed, fail once, fail always
  (retryable → dead after ``max_attempts``), fail permanently (dead at once),
  hang past the timeout once, report progress under a heartbeat; sync or async
  handler. Timeouts and backoffs are short so the run stays around a minute.
- The oracle is the daemon's own event stream: a ``task.#`` subscription from
  seq 0 counts terminal events (``task.completed`` + ``task.dead_lettered``)
  by ``task_id``; every task must have exactly one. Then the same count from
  ``history``, then ``task.status`` and ``collect`` must agree with it.
- ``AIVAD_CHAOS_TASKS`` / ``AIVAD_CHAOS_SEED`` change the size and the seed
  (the seed is printed, so a failure can be replayed).
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio

import aivad.client
from aivad.client import ClientOptions, PermanentError, RetryPolicy, TaskContext, Worker
from tests.conftest import DaemonProcess
from tests.wsclient import connect

pytestmark = pytest.mark.slow

N_TASKS = int(os.environ.get("AIVAD_CHAOS_TASKS", "5000"))
SEED = int(os.environ.get("AIVAD_CHAOS_SEED", str(random.randrange(1 << 30))))
TYPES = ("chaos.async", "chaos.sync")
#: fate → weight
FATES = {"ok": 62, "fail_once": 10, "fail_always": 4, "permanent": 6, "hang_once": 6, "heartbeat": 12}
TIMEOUT_S = 0.6
HEARTBEAT_S = 0.4
POLICY = RetryPolicy(max_attempts=3, backoff_factor=0.02, max_backoff=0.1)
OPTIONS = ClientOptions(reconnect_initial_s=0.02, reconnect_max_s=0.2, request_timeout_s=30.0, keepalive_s=None)
TERMINAL = ("task.completed", "task.dead_lettered")


# ---- what a task does, by its fate ----------------------------------------------------------


async def run_fate(payload: dict[str, Any], attempt: int, progress: Callable[[float], Awaitable[None]]) -> Any:
    fate = payload["fate"]
    if fate == "fail_once" and attempt == 1:
        raise RuntimeError("transient")
    if fate == "fail_always":
        raise RuntimeError("always")
    if fate == "permanent":
        raise PermanentError("permanent")
    if fate == "hang_once" and attempt == 1:
        await anyio.sleep(TIMEOUT_S * 2)
    if fate == "heartbeat":
        for i in range(3):
            await progress(i / 3)
            await anyio.sleep(0.02)
    return {"i": payload["i"], "attempt": attempt}


def client_worker(url: str, name: str, concurrency: int) -> Worker:
    worker = Worker(url, concurrency=concurrency, name=name, shutdown_grace_s=0.3, options=OPTIONS)

    @worker.handler("chaos.async")
    async def handle(task: TaskContext) -> Any:
        await anyio.sleep(random.random() * 0.003)
        return await run_fate(task.payload, task.attempt, task.progress)

    @worker.handler("chaos.sync")
    def handle_sync(task: TaskContext) -> Any:
        async def progress(fraction: float) -> None:
            await task.progress(fraction)

        fate = task.payload["fate"]
        if fate in ("hang_once", "heartbeat") or (fate == "fail_once" and task.attempt == 1):
            return anyio.from_thread.run(run_fate, task.payload, task.attempt, progress)
        if fate == "fail_always":
            raise RuntimeError("always")
        if fate == "permanent":
            raise PermanentError("permanent")
        return {"i": task.payload["i"], "attempt": task.attempt}

    return worker


async def churning_worker(url: str, name: str, rng: random.Random) -> None:
    """Start a Worker, let it run a while, then cancel it (connection dropped mid-task); again."""
    generation = 0
    while True:
        generation += 1
        worker = client_worker(url, f"{name}-{generation}", concurrency=rng.choice((2, 4, 8)))
        with trio.move_on_after(rng.uniform(0.3, 1.2)):
            async with worker.running():
                await trio.sleep_forever()
        await trio.sleep(rng.uniform(0.0, 0.1))


async def churning_worker_graceful(url: str, name: str, rng: random.Random) -> None:
    """Start a Worker, let it run a while, then stop it gracefully (drain); again."""
    generation = 0
    while True:
        generation += 1
        worker = client_worker(url, f"{name}-{generation}", concurrency=rng.choice((2, 4)))
        async with worker.running():
            await trio.sleep(rng.uniform(0.3, 1.2))
        await trio.sleep(rng.uniform(0.0, 0.1))


async def raw_worker(url: str, name: str, rng: random.Random) -> None:
    """The protocol by hand; drops its connection mid-task now and then, or never answers."""
    generation = 0
    while True:
        generation += 1
        async with connect(url) as ws:
            await ws.ok({"op": "worker.hello", "types": list(TYPES), "concurrency": 8, "name": f"{name}-{generation}"})
            async with trio.open_nursery() as nursery:

                async def answer(task: dict[str, Any]) -> None:
                    async def progress(fraction: float) -> None:
                        await ws.send({"op": "task.progress", "task_id": task["task_id"], "progress": fraction})

                    try:
                        result = await run_fate(task["payload"], task["attempt"], progress)
                    except PermanentError as exc:
                        frame = {"op": "task.fail", "task_id": task["task_id"], "error": str(exc), "retryable": False}
                    except RuntimeError as exc:
                        frame = {"op": "task.fail", "task_id": task["task_id"], "error": str(exc)}
                    else:
                        frame = {"op": "task.result", "task_id": task["task_id"], "result": result}
                    await ws.send(frame)

                while True:
                    frame = await ws.receive()
                    if frame.get("op") != "task":
                        continue  # errors for late results are expected
                    roll = rng.random()
                    if roll < 0.01:
                        nursery.cancel_scope.cancel()  # drop the connection with tasks in flight
                        break
                    if roll < 0.02:
                        continue  # silence: the attempt times out
                    nursery.start_soon(answer, frame["task"])
        await trio.sleep(rng.uniform(0.0, 0.1))


# ---- the test --------------------------------------------------------------------------------


async def test_every_task_ends_exactly_once(tmp_dir: Path) -> None:
    print(f"chaos: {N_TASKS} tasks, seed {SEED} (AIVAD_CHAOS_SEED={SEED} replays it)")
    rng = random.Random(SEED)
    random.seed(SEED)
    proc = DaemonProcess(tmp_dir, tasks={"default_timeout_s": TIMEOUT_S})
    await trio.to_thread.run_sync(proc.start)
    url = proc.ws_url
    fates = {}
    terminal: Counter[str] = Counter()
    terminal_kind: dict[str, str] = {}
    failures: Counter[str] = Counter()  # attempt failures by reason: failed, timeout, heartbeat, worker_lost
    try:
        with trio.fail_after(150):
            async with aivad.client.connect(url, options=OPTIONS) as client, trio.open_nursery() as nursery:
                all_seen = trio.Event()

                async def watch(*, task_status: trio.TaskStatus[None]) -> None:
                    async with client.subscribe("task.#", since=0) as sub:
                        task_status.started()
                        async for env in sub:
                            if env.type == "task.failed":
                                failures[env.payload.get("reason", "?")] += 1
                            if env.type in TERMINAL:
                                task_id = env.payload["task_id"]
                                terminal[task_id] += 1
                                terminal_kind[task_id] = env.type
                                if len(terminal) == N_TASKS:
                                    all_seen.set()

                await nursery.start(watch)
                for i in range(2):
                    stable = client_worker(url, f"stable-{i}", concurrency=16)
                    await nursery.start(stable.run)
                for i in range(2):
                    nursery.start_soon(churning_worker, url, f"churn-{i}", random.Random(rng.random()))
                nursery.start_soon(churning_worker_graceful, url, "graceful", random.Random(rng.random()))
                for i in range(2):
                    nursery.start_soon(raw_worker, url, f"raw-{i}", random.Random(rng.random()))

                population, weights = zip(*FATES.items(), strict=True)
                plan = [(i, rng.choice(TYPES), rng.choices(population, weights)[0]) for i in range(N_TASKS)]
                send, receive = trio.open_memory_channel[tuple[int, str, str]](N_TASKS)
                for item in plan:
                    send.send_nowait(item)
                send.close()

                async def submit() -> None:
                    async for i, task_type, fate in receive:
                        heartbeat = HEARTBEAT_S if fate == "heartbeat" else None
                        task_id = await client.dispatch(task_type, {"i": i, "fate": fate}, timeout=TIMEOUT_S,
                                                        heartbeat=heartbeat, retry_policy=POLICY,
                                                        priority=rng.choice(("low", "normal", "high")))
                        fates[task_id] = fate

                async with trio.open_nursery() as submitters:
                    for _ in range(16):
                        submitters.start_soon(submit)
                await all_seen.wait()
                await trio.sleep(1.0)  # anything ending twice would show up now
                nursery.cancel_scope.cancel()

            # ---- the oracle: events, history, task.status, collect agree ----
            assert len(fates) == N_TASKS
            assert set(terminal) == set(fates), "a task never ended, or an unknown task ended"
            twice = {t: n for t, n in terminal.items() if n != 1}
            assert not twice, f"tasks with more than one terminal event: {list(twice.items())[:10]}"

            async with aivad.client.connect(url, options=OPTIONS) as client:
                from_history: Counter[str] = Counter()
                for topic in TERMINAL:
                    after = 0
                    while True:
                        page, after = await client.history(topic, after=after, limit=1000)
                        if not page:
                            break
                        from_history.update(env.payload["task_id"] for env in page)
                assert from_history == terminal

                statuses: dict[str, aivad.client.TaskStatus] = {}

                async def status_of(ids: list[str]) -> None:
                    for task_id in ids:
                        statuses[task_id] = await client.get_task_status(task_id)

                ids = list(fates)
                async with trio.open_nursery() as n:
                    for k in range(16):
                        n.start_soon(status_of, ids[k::16])
                for task_id, status in statuses.items():
                    expected = "completed" if terminal_kind[task_id] == "task.completed" else "dead"
                    assert status.state == expected, (task_id, status, fates[task_id])
                    assert 1 <= status.attempts <= POLICY.max_attempts  # type: ignore[operator]
                collected = await client.collect_all(ids, timeout=5)
                assert collected.reason == "all_done" and not collected.pending
                assert set(collected.completed) == {t for t, k in terminal_kind.items() if k == "task.completed"}

            by_fate = Counter((fates[t], statuses[t].state) for t in fates)
            print("chaos outcomes:", dict(sorted(by_fate.items())))
            print("chaos attempt failures:", dict(failures))
            assert failures["worker_lost"] > 0 and failures["timeout"] > 0 and failures["failed"] > 0
            for task_id, fate in fates.items():  # fates that can only end one way
                if fate in ("permanent", "fail_always"):
                    assert statuses[task_id].state == "dead", (task_id, fate, statuses[task_id])
            assert by_fate[("ok", "completed")] > 0.9 * sum(n for (f, _), n in by_fate.items() if f == "ok")
    finally:
        await trio.to_thread.run_sync(proc.stop)
        log = proc.log()
        tracebacks = log.count("Traceback")
        assert tracebacks == 0, log[-5000:]
