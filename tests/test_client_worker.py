"""``aivad.client.Worker`` and the task calls of the client, against the real daemon.

Test policy for this module:

- The daemon is the real one, in process (``daemon`` / ``start_daemon``), or a
  real ``aivad serve`` (``daemon_proc``) where the test runs under asyncio or
  in a separate process; workers and callers are the real client.
- Timeouts, heartbeats and backoffs are short real times; assertions are on
  outcomes (states, attempts, counts), never on how long something took.
- Every test runs under a real ``trio.fail_after`` (no autojump with sockets).
- Under trio by default; ``test_asyncio_*`` run the same client under asyncio.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio
import trio.lowlevel

import aivad.client
from aivad.client import (
    AivadError,
    ClientOptions,
    PermanentError,
    RetryPolicy,
    TaskContext,
    TaskStatus,
    Worker,
)
from tests.conftest import DaemonProcess, InProcessDaemon, start_daemon

FAST = ClientOptions(reconnect_initial_s=0.02, reconnect_max_s=0.2, request_timeout_s=10.0)
QUICK_RETRY = RetryPolicy(max_attempts=3, backoff_factor=0.01, max_backoff=0.05)


def worker_for(url: str, **kwargs: Any) -> Worker:
    return Worker(url, options=FAST, **kwargs)


async def test_async_and_sync_handlers(daemon: InProcessDaemon) -> None:
    loop_thread = threading.get_ident()
    worker = worker_for(daemon.ws_url, concurrency=2, name="both")

    @worker.handler("calc.add")
    async def add(task: TaskContext) -> int:
        await task.progress(0.5, note="adding")
        return int(task.payload["a"] + task.payload["b"])

    def mul(task: TaskContext) -> dict[str, Any]:
        assert threading.get_ident() != loop_thread  # plain functions run in a thread
        task.progress_blocking(0.5)
        return {"product": task.payload["a"] * task.payload["b"], "attempt": task.attempt}

    worker.register("calc.mul", mul)
    with trio.fail_after(20):
        async with aivad.client.connect(daemon.ws_url, options=FAST) as client, worker.running():
            a = await client.dispatch("calc.add", {"a": 2, "b": 3}, priority="high")
            m = await client.dispatch("calc.mul", {"a": 4, "b": 5}, retry_policy=QUICK_RETRY)
            result = await client.collect_all([a, m], timeout=10)
            assert result.reason == "all_done" and not result.failed and not result.pending
            assert result.completed == {a: 5, m: {"product": 20, "attempt": 1}}
            status = await client.get_task_status(m)
            assert status == TaskStatus(m, "completed", 1, {"product": 20, "attempt": 1}, None)
            stats = worker.statistics()
            assert (stats.connected, stats.completed, stats.failed, stats.running) == (True, 2, 0, 0)


async def test_concurrency_limit_is_never_exceeded(daemon: InProcessDaemon) -> None:
    """Async and sync handlers share the ``concurrency`` slots; the limit is reached and never passed."""
    in_flight = 0
    peak = 0
    lock = threading.Lock()

    def enter() -> None:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)

    def leave() -> None:
        nonlocal in_flight
        with lock:
            in_flight -= 1

    worker = worker_for(daemon.ws_url, concurrency=3)

    @worker.handler("c.async")
    async def slow_async(task: TaskContext) -> None:
        enter()
        try:
            await anyio.sleep(0.03)
        finally:
            leave()

    @worker.handler("c.sync")
    def slow_sync(task: TaskContext) -> None:
        enter()
        try:
            time.sleep(0.03)
        finally:
            leave()

    with trio.fail_after(30):
        async with aivad.client.connect(daemon.ws_url, options=FAST) as client:
            ids = [await client.dispatch("c.async" if i % 2 else "c.sync", i) for i in range(30)]
            async with worker.running():
                result = await client.collect_all(ids, timeout=20)
            assert result.reason == "all_done" and len(result.completed) == 30
    assert peak == 3


async def test_progress_keeps_a_heartbeat_task_alive_and_silence_ends_it(daemon: InProcessDaemon) -> None:
    worker = worker_for(daemon.ws_url, concurrency=2)
    cancelled_locally = trio.Event()

    @worker.handler("hb.talks")
    async def talks(task: TaskContext) -> str:
        for i in range(8):  # 0.8 s in all, heartbeat 0.3 s
            await task.progress(i / 8)
            await anyio.sleep(0.1)
        return "alive"

    @worker.handler("hb.silent")
    async def silent(task: TaskContext) -> str:
        await anyio.sleep(0.6)  # past the heartbeat: the daemon ends the attempt
        try:
            await task.progress(0.9)  # refused: the handler is cancelled, nothing is sent
        except BaseException:
            cancelled_locally.set()
            raise
        return "too late"

    with trio.fail_after(20):
        async with aivad.client.connect(daemon.ws_url, options=FAST) as client, worker.running():
            alive = await client.dispatch("hb.talks", timeout=5, heartbeat=0.3)
            dead = await client.dispatch("hb.silent", timeout=5, heartbeat=0.3, retry_policy={"max_attempts": 1})
            result = await client.collect_all([alive, dead], timeout=10)
            assert result.completed == {alive: "alive"}
            assert "heartbeat" in str(result.failed[dead])
            assert (await client.get_task_status(alive)).attempts == 1
            with trio.fail_after(5):
                await cancelled_locally.wait()
            await trio.sleep(0.1)
            assert worker.statistics().abandoned == 1


async def test_handler_exception_is_retried_then_dead(daemon: InProcessDaemon) -> None:
    calls: list[int] = []
    worker = worker_for(daemon.ws_url)

    @worker.handler("flaky")
    async def flaky(task: TaskContext) -> None:
        calls.append(task.attempt)
        raise ValueError(f"boom {task.attempt}")

    with trio.fail_after(20):
        async with aivad.client.connect(daemon.ws_url, options=FAST) as client, worker.running():
            task_id = await client.dispatch("flaky", retry_policy=QUICK_RETRY)
            result = await client.collect_all([task_id], timeout=10)
            assert result.failed == {task_id: "ValueError: boom 3"}
            status = await client.get_task_status(task_id)
            assert (status.state, status.attempts) == ("dead", 3)
    assert calls == [1, 2, 3]


async def test_permanent_errors_are_dead_at_once(daemon: InProcessDaemon) -> None:
    worker = worker_for(daemon.ws_url, permanent_errors=(KeyError,))

    @worker.handler("strict")
    async def strict(task: TaskContext) -> None:
        if task.payload == "perm":
            raise PermanentError("bad input")
        raise KeyError("missing")

    with trio.fail_after(20):
        async with aivad.client.connect(daemon.ws_url, options=FAST) as client, worker.running():
            perm = await client.dispatch("strict", "perm", retry_policy=QUICK_RETRY)
            key = await client.dispatch("strict", "key", retry_policy=QUICK_RETRY)
            result = await client.collect_all([perm, key], timeout=10)
            assert result.failed == {perm: "bad input", key: "KeyError: 'missing'"}
            for task_id in (perm, key):
                status = await client.get_task_status(task_id)
                assert (status.state, status.attempts) == ("dead", 1)


async def test_a_result_that_is_not_json_fails_the_task_at_once(daemon: InProcessDaemon) -> None:
    """``NaN`` is not JSON: the daemon would refuse the ``task.result`` and the task would wait for its timeout."""
    worker = worker_for(daemon.ws_url)

    @worker.handler("score")
    async def score(task: TaskContext) -> dict[str, float]:
        return {"score": float("nan")}

    with trio.fail_after(20):
        async with aivad.client.connect(daemon.ws_url, options=FAST) as client, worker.running():
            task_id = await client.dispatch("score", None, retry_policy=QUICK_RETRY)
            result = await client.collect_all([task_id], timeout=10)
            assert "result cannot be sent" in result.failed[task_id]
            assert "not JSON compliant" in result.failed[task_id]
            status = await client.get_task_status(task_id)
            assert (status.state, status.attempts) == ("dead", 1)


async def test_request_response_round_trip(daemon: InProcessDaemon) -> None:
    worker = worker_for(daemon.ws_url, concurrency=4)

    @worker.handler("expert.ask")
    async def ask(task: TaskContext) -> dict[str, Any]:
        return {"answer": task.payload["q"].upper()}

    @worker.handler("expert.refuse")
    def refuse(task: TaskContext) -> None:
        raise PermanentError("no comment")

    with trio.fail_after(20):
        async with aivad.client.connect(daemon.ws_url, options=FAST) as client, worker.running():
            assert await client.request_response("expert.ask", {"q": "why"}, timeout=5) == {"answer": "WHY"}
            with pytest.raises(AivadError, match="no comment"):
                await client.request_response("expert.refuse", None, timeout=5)
            with pytest.raises(AivadError) as info:
                await client.request_response("nobody.knows", None, timeout=0.3)
            assert info.value.code == "timeout"


async def test_collect_all_returns_partial_results_on_timeout(daemon: InProcessDaemon) -> None:
    release = trio.Event()
    worker = worker_for(daemon.ws_url, concurrency=4)

    @worker.handler("part")
    async def part(task: TaskContext) -> int:
        if task.payload == "stuck":
            await release.wait()
        return int(task.payload == "stuck")

    with trio.fail_after(20):
        async with aivad.client.connect(daemon.ws_url, options=FAST) as client, worker.running():
            quick = [await client.dispatch("part", i) for i in range(3)]
            stuck = await client.dispatch("part", "stuck")
            result = await client.collect_all([*quick, stuck], timeout=0.5)
            assert result.reason == "timeout" and result.pending == [stuck]
            assert result.completed == dict.fromkeys(quick, 0) and result.failed == {}
            first = await client.collect_all([*quick, stuck], timeout=5, min_results=2)
            assert first.reason == "min_results"
            release.set()
            again = await client.collect_all([*quick, stuck], timeout=5)
            assert again.reason == "all_done" and again.completed[stuck] == 1
            with pytest.raises(AivadError) as info:
                await client.collect_all(["no-such-task"], timeout=1)
            assert info.value.code == "not_found"


async def test_on_result_fires_once_per_task(daemon: InProcessDaemon) -> None:
    release = trio.Event()
    worker = worker_for(daemon.ws_url, concurrency=4)

    @worker.handler("res")
    async def res(task: TaskContext) -> Any:
        await release.wait()
        if task.payload == "fail":
            raise PermanentError("nope")
        return task.payload

    seen: list[TaskStatus] = []
    async_seen: list[TaskStatus] = []

    async def async_callback(status: TaskStatus) -> None:
        await trio.lowlevel.checkpoint()
        async_seen.append(status)

    with trio.fail_after(20):
        async with aivad.client.connect(daemon.ws_url, options=FAST) as client, worker.running():
            ok = await client.dispatch("res", "ok")
            bad = await client.dispatch("res", "fail")
            await client.on_result(ok, seen.append)
            await client.on_result(bad, seen.append)
            await client.on_result(ok, async_callback)
            assert seen == []
            release.set()
            while len(seen) < 2 or not async_seen:
                await trio.sleep(0.01)
            by_id = {s.task_id: s for s in seen}
            assert by_id[ok] == TaskStatus(ok, "completed", 1, "ok", None)
            assert by_id[bad] == TaskStatus(bad, "dead", 1, None, "nope")
            assert async_seen == [by_id[ok]]
            late: list[TaskStatus] = []  # already ended: fired at once, from task.status
            await client.on_result(ok, late.append)
            assert late == [TaskStatus(ok, "completed", 1, "ok", None)]
            with pytest.raises(AivadError) as info:
                await client.on_result("no-such-task", late.append)
            assert info.value.code == "not_found"
            await trio.sleep(0.2)
            assert len(seen) == 2 and len(late) == 1 and len(async_seen) == 1  # once each


async def test_clean_shutdown_finishes_running_tasks(daemon: InProcessDaemon) -> None:
    """stop(): running tasks finish (attempt 1, results delivered), nothing new runs, run() returns."""
    release = trio.Event()
    started: list[str] = []
    worker = worker_for(daemon.ws_url, concurrency=2, shutdown_grace_s=10)

    @worker.handler("job")
    async def job(task: TaskContext) -> str:
        started.append(task.task_id)
        await release.wait()
        return f"done {task.payload}"

    with trio.fail_after(20):
        async with aivad.client.connect(daemon.ws_url, options=FAST) as client:
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)
                ids = [await client.dispatch("job", i) for i in range(2)]
                while len(started) < 2:
                    await trio.sleep(0.01)
                nursery.start_soon(worker.stop)
                await trio.sleep(0.1)
                later = await client.dispatch("job", 2)  # queued while draining: must not run here
                await trio.sleep(0.1)
                release.set()
            # run() has returned
            result = await client.collect_all(ids, timeout=5)
            assert result.completed == {ids[0]: "done 0", ids[1]: "done 1"}
            for task_id in ids:
                assert (await client.get_task_status(task_id)).attempts == 1
            assert later not in started
            assert (await client.get_task_status(later)).state in ("queued", "retrying")
            assert worker.statistics().connected is False


async def test_shutdown_grace_cancels_and_the_daemon_retries_elsewhere(daemon: InProcessDaemon) -> None:
    hung = worker_for(daemon.ws_url, shutdown_grace_s=0.2, name="hung")
    cancelled = trio.Event()

    @hung.handler("g")
    async def forever(task: TaskContext) -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    healthy = worker_for(daemon.ws_url, name="healthy")

    @healthy.handler("g")
    async def quick(task: TaskContext) -> str:
        return f"attempt {task.attempt}"

    with trio.fail_after(20):
        async with aivad.client.connect(daemon.ws_url, options=FAST) as client:
            async with hung.running():
                task_id = await client.dispatch("g", retry_policy=QUICK_RETRY)
                while hung.statistics().running < 1:
                    await trio.sleep(0.01)
            assert cancelled.is_set()
            async with healthy.running():
                result = await client.collect_all([task_id], timeout=5)
            # the hung worker drained (worker.drain) before it cancelled: like a daemon drain,
            # what it held is handed back and that attempt does not count
            assert result.completed == {task_id: "attempt 1"}


async def test_worker_reconnects_after_the_daemon_restarts(nursery: trio.Nursery, tmp_dir: Path) -> None:
    async def run_daemon_in_scope(port: int = 0) -> tuple[InProcessDaemon, trio.CancelScope]:
        async def run(*, task_status: trio.TaskStatus[tuple[InProcessDaemon, trio.CancelScope]]) -> None:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as inner:
                    task_status.started((await start_daemon(inner, tmp_dir, websocket={"port": port}), scope))

        result: tuple[InProcessDaemon, trio.CancelScope] = await nursery.start(run)
        return result

    d, scope = await run_daemon_in_scope()
    worker = worker_for(d.ws_url, concurrency=2)
    attempts: list[int] = []
    first_started = trio.Event()

    @worker.handler("rc")
    async def rc(task: TaskContext) -> int:
        attempts.append(task.attempt)
        if task.attempt == 1:
            first_started.set()
            await trio.sleep_forever()  # cancelled when the connection goes
        return task.attempt

    with trio.fail_after(30):
        async with worker.running():
            async with aivad.client.connect(d.ws_url, options=FAST) as client:
                task_id = await client.dispatch("rc", retry_policy=QUICK_RETRY)
                await first_started.wait()
            scope.cancel()  # the daemon goes away with the task in flight
            while worker.statistics().connected or worker.statistics().running:
                await trio.sleep(0.01)  # the handler of the lost connection is cancelled
            assert worker.statistics().abandoned == 1
            d, scope = await run_daemon_in_scope(d.endpoints.ws_port)
            async with aivad.client.connect(d.ws_url, options=FAST) as client:
                result = await client.collect_all([task_id], timeout=10)
                assert result.completed == {task_id: 2}  # retried after the restart, on the re-helloed worker
            assert worker.statistics().connects == 2
    assert attempts == [1, 2]


async def test_hello_refused_raises(daemon: InProcessDaemon) -> None:
    worker = worker_for(daemon.ws_url, concurrency=1)
    worker.register("ok", lambda task: None)
    worker.concurrency = 0  # the daemon refuses it: bad_request, not retried
    with trio.fail_after(10), pytest.raises(AivadError) as info:
        async with worker.running():
            pass
    assert info.value.code == "bad_request"


def test_asyncio_worker_and_client(daemon_proc: DaemonProcess) -> None:
    """The Worker and the task calls under asyncio, against a real ``aivad serve``."""

    async def main() -> None:
        worker = worker_for(daemon_proc.ws_url, concurrency=4, name="aio")

        @worker.handler("aio.echo")
        async def echo(task: TaskContext) -> Any:
            await task.progress(1.0)
            return task.payload

        @worker.handler("aio.sync")
        def sync(task: TaskContext) -> Any:
            if task.payload == "perm":
                raise PermanentError("perm")
            return [task.payload]

        results: list[TaskStatus] = []
        with anyio.fail_after(20):
            async with aivad.client.connect(daemon_proc.ws_url, options=FAST) as client, worker.running():
                assert await client.request_response("aio.echo", {"x": 1}, timeout=5) == {"x": 1}
                ids = [await client.dispatch("aio.sync", i) for i in range(5)]
                perm = await client.dispatch("aio.sync", "perm")
                await client.on_result(perm, results.append)
                got = await client.collect_all([*ids, perm], timeout=10)
                assert got.completed == {t: [i] for i, t in enumerate(ids)} and got.failed == {perm: "perm"}
                while not results:
                    await anyio.sleep(0.01)
                assert results == [TaskStatus(perm, "dead", 1, None, "perm")]

    anyio.run(main, backend="asyncio")


RUN_FOREVER = r"""
import sys, time
from aivad.client import ClientOptions, Worker
worker = Worker(sys.argv[1], name="forever", options=ClientOptions(reconnect_initial_s=0.02))

@worker.handler("slow.job")
def job(task):
    print("started", flush=True)
    time.sleep(1.0)
    return "finished in spite of SIGTERM"

worker.run_forever()
print("stopped", flush=True)
"""


def test_run_forever_drains_on_sigterm(daemon_proc: DaemonProcess) -> None:
    import signal

    from websockets.sync.client import connect as ws_connect

    proc = subprocess.Popen([sys.executable, "-c", RUN_FOREVER, daemon_proc.ws_url], stdout=subprocess.PIPE, text=True)
    try:
        with ws_connect(daemon_proc.ws_url) as caller:
            caller.send(json.dumps({"op": "dispatch", "type": "slow.job", "ref": 1}))
            task_id = json.loads(caller.recv(5))["task_id"]
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "started"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
            assert proc.stdout.read().strip() == "stopped"
            caller.send(json.dumps({"op": "collect", "task_ids": [task_id], "timeout": 5, "ref": 2}))
            reply = json.loads(caller.recv(10))
            assert reply["completed"] == {task_id: "finished in spite of SIGTERM"}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
