"""Tasks over the WebSocket: workers, strategies, deadlines, retries, dead letters, collect, request.

Real daemon in process, real sockets; attempt timeouts are short real times and
the tests assert on outcomes and order, never on how long things took.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

import aivad.task_retention
from aivad.config import StoreConfig, TasksConfig
from aivad.dispatcher import UNFINISHED_TASKS_SQL
from aivad.store import serve_store
from aivad.tasks import TaskSpec, backoff_s, parse_priority, parse_task_spec
from tests.conftest import InProcessDaemon, control_async, start_daemon
from tests.wsclient import TestClient, connect


class TestWorker:
    """A worker on a raw connection: takes task frames, answers as told."""

    __test__ = False

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.tasks: list[dict[str, Any]] = []

    async def hello(self, types: list[str], concurrency: int = 1, name: str = "") -> str:
        reply = await self.client.ok({"op": "worker.hello", "types": types, "concurrency": concurrency, "name": name})
        return str(reply["worker_id"])

    async def next_task(self) -> dict[str, Any]:
        while True:
            frame = await self.client.receive()
            if frame.get("op") == "task":
                self.tasks.append(frame["task"])
                return dict(frame["task"])
            assert frame.get("op") != "error", frame

    async def send(self, op: str, **fields: Any) -> None:
        await self.client.send({"op": op, **fields})


async def dispatch(client: TestClient, type: str, payload: Any = None, **fields: Any) -> str:
    return str((await client.ok({"op": "dispatch", "type": type, "payload": payload, **fields}))["task_id"])


async def test_dispatch_work_complete_with_events(daemon: InProcessDaemon) -> None:
    with trio.fail_after(15):
        async with connect(daemon.ws_url) as w, connect(daemon.ws_url) as caller, connect(daemon.ws_url) as watch:
            await watch.ok({"op": "subscribe", "pattern": "task.#"})
            worker = TestWorker(w)
            assert await worker.hello(["scan.run"], name="scanner-1")
            task_id = await dispatch(caller, "scan.run", {"target": "10.0.0.1"})
            task = await worker.next_task()
            assert task["task_id"] == task_id and task["attempt"] == 1 and task["payload"] == {"target": "10.0.0.1"}
            assert task["deadline"].endswith("Z")
            await worker.send("task.progress", task_id=task_id, progress=0.5, note="half")
            await worker.send("task.result", task_id=task_id, result={"open_ports": [22]})
            collected = await caller.ok({"op": "collect", "task_ids": [task_id], "timeout": 5})
            assert collected["completed"] == {task_id: {"open_ports": [22]}} and collected["reason"] == "all_done"
            status = await caller.ok({"op": "task.status", "task_id": task_id})
            assert (status["state"], status["attempts"], status["result"]) == ("completed", 1, {"open_ports": [22]})
            types = [f["msg"]["type"] for f in await watch.messages(5)]
            assert types == ["task.created", "task.dispatched", "task.started", "task.progress", "task.completed"]


async def test_failure_retries_then_dead_letters(daemon: InProcessDaemon) -> None:
    with trio.fail_after(20):
        async with connect(daemon.ws_url) as w, connect(daemon.ws_url) as caller, connect(daemon.ws_url) as watch:
            await watch.ok({"op": "subscribe", "pattern": "task.#"})
            worker = TestWorker(w)
            await worker.hello(["flaky"])
            task_id = await dispatch(caller, "flaky", retry_policy={"max_attempts": 3, "backoff_factor": 0.01,
                                                                     "max_backoff": 0.05})
            for attempt in (1, 2, 3):
                task = await worker.next_task()
                assert task["attempt"] == attempt
                await worker.send("task.fail", task_id=task_id, error=f"boom {attempt}")
            collected = await caller.ok({"op": "collect", "task_ids": [task_id], "timeout": 5})
            assert collected["failed"] == {task_id: "boom 3"}
            kinds = []
            while "task.dead_lettered" not in kinds:
                kinds.append((await watch.next_message())["msg"]["type"])
            assert kinds.count("task.failed") == 3 and kinds.count("task.retrying") == 2


async def test_not_retryable_failure_is_dead_at_once(daemon: InProcessDaemon) -> None:
    with trio.fail_after(15):
        async with connect(daemon.ws_url) as w, connect(daemon.ws_url) as caller:
            worker = TestWorker(w)
            await worker.hello(["t"])
            task_id = await dispatch(caller, "t")
            await worker.next_task()
            await worker.send("task.fail", task_id=task_id, error="bad input", retryable=False)
            collected = await caller.ok({"op": "collect", "task_ids": [task_id], "timeout": 5})
            assert collected["failed"] == {task_id: "bad input"}
            status = await caller.ok({"op": "task.status", "task_id": task_id})
            assert (status["state"], status["attempts"]) == ("dead", 1)


async def test_deadline_then_heartbeat_then_success(daemon: InProcessDaemon) -> None:
    """Attempt 1 times out, attempt 2 misses its heartbeat, attempt 3 reports progress and succeeds."""
    with trio.fail_after(20):
        async with connect(daemon.ws_url) as w, connect(daemon.ws_url) as caller:
            worker = TestWorker(w)
            await worker.hello(["slow"])
            task_id = await dispatch(caller, "slow", timeout=0.5, heartbeat=0.3,
                                     retry_policy={"max_attempts": 3, "backoff_factor": 0.01})
            assert (await worker.next_task())["attempt"] == 1  # says nothing: heartbeat ends it
            assert (await worker.next_task())["attempt"] == 2
            third = await worker.next_task()
            assert third["attempt"] == 3
            for _ in range(3):  # progress keeps it alive past the first heartbeat
                await worker.send("task.progress", task_id=task_id, progress=0.3)
                await trio.sleep(0.1)
            await worker.send("task.result", task_id=task_id, result="finally")
            result = await caller.ok({"op": "collect", "task_ids": [task_id], "timeout": 5})
            assert result["completed"] == {task_id: "finally"}
            status = await caller.ok({"op": "task.status", "task_id": task_id})
            assert status["attempts"] == 3


async def test_late_result_is_ignored(daemon: InProcessDaemon) -> None:
    with trio.fail_after(15):
        async with connect(daemon.ws_url) as w, connect(daemon.ws_url) as caller:
            worker = TestWorker(w)
            await worker.hello(["t"])
            task_id = await dispatch(caller, "t", timeout=0.2, retry_policy={"max_attempts": 1})
            await worker.next_task()
            result = await caller.ok({"op": "collect", "task_ids": [task_id], "timeout": 5})
            assert task_id in result["failed"]
            reply = await w.request({"op": "task.result", "task_id": task_id, "result": "too late"})
            assert reply["op"] == "error" and reply["code"] == "not_found"
            status = await caller.ok({"op": "task.status", "task_id": task_id})
            assert status["state"] == "dead"


async def test_worker_lost_mid_task_is_retried_elsewhere(daemon: InProcessDaemon) -> None:
    with trio.fail_after(15):
        async with connect(daemon.ws_url) as caller, connect(daemon.ws_url) as w2:
            async with connect(daemon.ws_url) as w1:
                first = TestWorker(w1)
                await first.hello(["job"])
                task_id = await dispatch(caller, "job", retry_policy={"backoff_factor": 0.01})
                assert (await first.next_task())["task_id"] == task_id
                second = TestWorker(w2)
                await second.hello(["job"])
            task = await second.next_task()  # the first worker's connection closed mid-task
            assert (task["task_id"], task["attempt"]) == (task_id, 2)
            await second.send("task.result", task_id=task_id, result=2)
            assert (await caller.ok({"op": "collect", "task_ids": [task_id], "timeout": 5}))["reason"] == "all_done"


async def test_priority_order_with_one_busy_worker(daemon: InProcessDaemon) -> None:
    with trio.fail_after(15):
        async with connect(daemon.ws_url) as w, connect(daemon.ws_url) as caller:
            worker = TestWorker(w)
            await worker.hello(["p"])
            blocker = await dispatch(caller, "p", "blocker")
            assert (await worker.next_task())["task_id"] == blocker
            order = ["low", 3, "critical", "normal", "high", "low", 9]
            for i, priority in enumerate(order):
                await dispatch(caller, "p", i, priority=priority)
            await worker.send("task.result", task_id=blocker, result=None)
            got = []
            for _ in order:
                task = await worker.next_task()
                got.append(task["payload"])
                await worker.send("task.result", task_id=task["task_id"], result=None)
            assert got == [2, 6, 4, 3, 1, 0, 5]  # critical(9), 9, high(7), normal(4), 3, low(1) FIFO


async def test_least_connections_prefers_the_free_worker(daemon: InProcessDaemon) -> None:
    with trio.fail_after(15):
        async with connect(daemon.ws_url) as ws, connect(daemon.ws_url) as wf, connect(daemon.ws_url) as caller:
            slow, fast = TestWorker(ws), TestWorker(wf)
            await slow.hello(["lc"], concurrency=4, name="slow")
            await fast.hello(["lc"], concurrency=4, name="fast")
            stuck = []
            for i in range(20):
                await dispatch(caller, "lc", i)
            # the slow worker never answers; the fast one answers at once and so keeps taking work
            async with trio.open_nursery() as nursery:
                async def drain_fast() -> None:
                    while True:
                        task = await fast.next_task()
                        await fast.send("task.result", task_id=task["task_id"], result=None)

                async def hold_slow() -> None:
                    while True:
                        stuck.append(await slow.next_task())

                nursery.start_soon(drain_fast)
                nursery.start_soon(hold_slow)
                while len(fast.tasks) + len(slow.tasks) < 20:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
            assert len(slow.tasks) == 4 and len(fast.tasks) == 16


async def test_round_robin_alternates(nursery: trio.Nursery, tmp_dir: Path) -> None:
    d = await start_daemon(nursery, tmp_dir, tasks={"strategies": {"rr": "round_robin"}})
    with trio.fail_after(15):
        async with connect(d.ws_url) as a, connect(d.ws_url) as b, connect(d.ws_url) as caller:
            workers = [TestWorker(a), TestWorker(b)]
            for i, worker in enumerate(workers):
                await worker.hello(["rr"], concurrency=10, name=f"w{i}")
            for i in range(10):
                await dispatch(caller, "rr", i)
            with trio.move_on_after(1):
                while len(workers[0].tasks) + len(workers[1].tasks) < 10:
                    for worker in workers:
                        with trio.move_on_after(0.05):
                            await worker.next_task()
            assert sorted(t["payload"] for t in workers[0].tasks) == [0, 2, 4, 6, 8]
            assert sorted(t["payload"] for t in workers[1].tasks) == [1, 3, 5, 7, 9]


async def test_affinity_is_stable_and_a_joining_worker_moves_few_keys(nursery: trio.Nursery, tmp_dir: Path) -> None:
    d = await start_daemon(nursery, tmp_dir, tasks={"strategies": {"aff": "affinity"}})
    keys = [f"tenant-{i}" for i in range(60)]

    async def owners(workers: dict[str, TestWorker], caller: TestClient) -> dict[str, str]:
        for key in keys:
            await dispatch(caller, "aff", key, affinity_key=key)
        owner = {}
        while len(owner) < len(keys):
            for name, worker in workers.items():
                with trio.move_on_after(0.02):
                    task = await worker.next_task()
                    owner.setdefault(task["payload"], name)
                    assert owner[task["payload"]] == name
                    await worker.send("task.result", task_id=task["task_id"], result=None)
        return owner

    with trio.fail_after(30):
        async with connect(d.ws_url) as a, connect(d.ws_url) as b, connect(d.ws_url) as c, \
                connect(d.ws_url) as caller:
            workers = {"a": TestWorker(a), "b": TestWorker(b)}
            for name, worker in workers.items():
                await worker.hello(["aff"], concurrency=100, name=name)
            before = await owners(workers, caller)
            assert before == await owners(workers, caller)  # stable across tasks
            workers["c"] = TestWorker(c)
            await workers["c"].hello(["aff"], concurrency=100, name="c")
            after = await owners(workers, caller)
            moved = [k for k in keys if before[k] != after[k]]
            assert all(after[k] == "c" for k in moved)  # keys only move to the newcomer
            assert 0 < len(moved) < len(keys) * 0.6


async def test_no_eligible_worker_waits_queued_and_request_times_out(daemon: InProcessDaemon) -> None:
    with trio.fail_after(15):
        async with connect(daemon.ws_url) as caller:
            task_id = await dispatch(caller, "nobody.runs.this")
            status = await caller.ok({"op": "task.status", "task_id": task_id})
            assert status["state"] == "queued"
            reply = await caller.request({"op": "request", "type": "nobody.runs.this", "timeout": 0.3})
            assert reply["op"] == "error" and reply["code"] == "timeout"
            partial = await caller.ok({"op": "collect", "task_ids": [task_id], "timeout": 0.2})
            assert partial == {**partial, "completed": {}, "failed": {}, "pending": [task_id], "reason": "timeout"}


async def test_request_answers_the_final_error_of_a_task_that_dies(daemon: InProcessDaemon) -> None:
    """A request is answered by the end of its task: the error of the last attempt, not the first."""
    with trio.fail_after(15):
        async with connect(daemon.ws_url) as w, connect(daemon.ws_url) as caller:
            worker = TestWorker(w)
            await worker.hello(["flaky"])
            await caller.send({"op": "request", "type": "flaky", "timeout": 10, "ref": 7,
                               "retry_policy": {"max_attempts": 2, "backoff_factor": 0.01}})
            for error in ("first try", "final try"):
                task = await worker.next_task()
                await worker.send("task.fail", task_id=task["task_id"], error=error)
            reply = await caller.receive()
            assert (reply["op"], reply["ref"], reply["code"]) == ("error", 7, "internal")
            assert reply["message"] == f"task {task['task_id']} failed: final try"


async def test_request_response_and_collect_min_results_and_groups(daemon: InProcessDaemon) -> None:
    with trio.fail_after(15):
        async with connect(daemon.ws_url) as w, connect(daemon.ws_url) as caller, connect(daemon.ws_url) as watch:
            await watch.ok({"op": "subscribe", "pattern": "group.*"})
            worker = TestWorker(w)
            await worker.hello(["echo"], concurrency=8)

            async def serve() -> None:
                while True:
                    task = await worker.next_task()
                    await worker.send("task.result", task_id=task["task_id"], result={"echo": task["payload"]})

            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                reply = await caller.ok({"op": "request", "type": "echo", "payload": "hi", "timeout": 5})
                assert reply["result"] == {"echo": "hi"}
                ids = [await dispatch(caller, "echo", i, group_id="g1") for i in range(5)]
                by_group = await caller.ok({"op": "collect", "group_id": "g1", "timeout": 5})
                assert by_group["reason"] == "all_done" and sorted(by_group["completed"]) == sorted(ids)
                # a group is open: each time every task known so far has ended, group.completed says so
                while (payload := (await watch.next_message())["msg"]["payload"])["tasks"] < 5:
                    assert payload["completed"] == payload["tasks"]
                assert payload == {"group_id": "g1", "tasks": 5, "completed": 5, "dead": 0}
                nursery.cancel_scope.cancel()
            some = [await dispatch(caller, "echo", i) for i in range(3)]
            pending = await dispatch(caller, "nobody", 0)
            # the worker is gone now: the three echo tasks wait too; min_results=0 is refused
            bad = await caller.request({"op": "collect", "task_ids": some, "min_results": 0})
            assert bad["code"] == "bad_request"
            partial = await caller.ok({"op": "collect", "task_ids": [*some, pending], "timeout": 0.2})
            assert partial["reason"] == "timeout" and len(partial["pending"]) == 4


async def test_bad_task_frames(daemon: InProcessDaemon) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"op": "dispatch"}, "bad_request"),
        ({"op": "dispatch", "type": "a..b"}, "bad_request"),
        ({"op": "dispatch", "type": "t", "priority": "urgent"}, "bad_request"),
        ({"op": "dispatch", "type": "t", "priority": 10}, "bad_request"),
        ({"op": "dispatch", "type": "t", "retry_policy": {"max_attempts": 0}}, "bad_request"),
        ({"op": "dispatch", "type": "t", "retry_policy": {"tries": 2}}, "bad_request"),
        ({"op": "dispatch", "type": "t", "timeout": -1}, "bad_request"),
        ({"op": "dispatch", "type": "t", "heartbeat": "soon"}, "bad_request"),
        ({"op": "task.status", "task_id": "nope"}, "not_found"),
        ({"op": "task.status"}, "bad_request"),
        ({"op": "collect", "timeout": 1}, "bad_request"),
        ({"op": "collect", "task_ids": ["nope"], "timeout": 1}, "not_found"),
        ({"op": "collect", "task_ids": "x"}, "bad_request"),
        ({"op": "task.result", "task_id": "x"}, "bad_request"),  # not a worker
        ({"op": "worker.hello", "types": []}, "bad_request"),
        ({"op": "worker.hello", "types": ["ok", 5]}, "bad_request"),
        ({"op": "worker.hello", "types": ["ok"], "concurrency": 0}, "bad_request"),
        ({"op": "request", "type": "t", "timeout": "x"}, "bad_request"),
    ]
    with trio.fail_after(15):
        async with connect(daemon.ws_url) as c:
            for frame, code in cases:
                reply = await c.request(dict(frame))
                assert reply["op"] == "error" and reply["code"] == code, (frame, reply)
            await c.ok({"op": "worker.hello", "types": ["ok"]})
            assert (await c.request({"op": "worker.hello", "types": ["ok"]}))["code"] == "bad_request"
            unknown = await c.request({"op": "task.progress", "task_id": "nope", "progress": 0.5})
            assert unknown["code"] == "not_found"
            assert (await c.request({"op": "task.progress", "task_id": "x", "progress": 2}))["code"] == "bad_request"


def test_a_task_spec_as_json_holds_its_payload_itself_not_a_deep_copy() -> None:
    """``to_json_dict`` runs twice per task on the event loop (stored, then ended): a deep copy cost
    3.4 ms for a payload of 2,000 small objects."""
    payload = {"items": [{"k": i, "v": "x" * 20} for i in range(2000)]}
    spec = parse_task_spec({"type": "big.one", "payload": payload}, TasksConfig())
    as_json = spec.to_json_dict()
    assert as_json["payload"] is payload
    assert json.loads(json.dumps(as_json))["payload"] == payload
    assert set(as_json) == {f.name for f in attrs.fields(TaskSpec)}


def test_backoff_formula_and_priorities() -> None:
    spec = TaskSpec("t", "x", None, 4, 5, 1.0, 10.0, 30.0, None, None, None)
    rng = random.Random(7)
    for attempt, base in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (9, 10.0)):
        for _ in range(50):
            assert base * 0.8 <= backoff_s(spec, attempt, rng) <= base * 1.2
    assert [parse_priority(p) for p in ("low", "normal", "high", "critical", 0, 9, None)] == [1, 4, 7, 9, 0, 9, 4]
    assert TasksConfig().default_strategy == "least_connections"


@pytest.mark.parametrize("kill", [True, False])
def test_daemon_restart_mid_task_retries_it(tmp_dir: Path, kill: bool) -> None:
    """kill -9 (or SIGTERM) with a task in flight: after restart it is retried, and ends once."""
    import signal

    from websockets.sync.client import connect as ws_connect

    from tests.conftest import DaemonProcess

    proc = DaemonProcess(tmp_dir)
    proc.start()
    try:
        with ws_connect(proc.ws_url) as worker, ws_connect(proc.ws_url) as caller:
            worker.send(json.dumps({"op": "worker.hello", "types": ["long"], "ref": 1}))
            assert json.loads(worker.recv(5))["op"] == "ok"
            caller.send(json.dumps({"op": "dispatch", "type": "long", "payload": 1, "ref": 2,
                                    "retry_policy": {"backoff_factor": 0.01}}))
            task_id = json.loads(caller.recv(5))["task_id"]
            assert json.loads(worker.recv(5))["task"]["task_id"] == task_id
            queued_id = None
            caller.send(json.dumps({"op": "dispatch", "type": "other", "ref": 3}))
            queued_id = json.loads(caller.recv(5))["task_id"]
            if kill:
                proc.kill()
            else:
                proc.signal(signal.SIGTERM)
                assert proc.wait() == 0
        proc.start()
        with ws_connect(proc.ws_url) as worker, ws_connect(proc.ws_url) as caller:
            caller.send(json.dumps({"op": "task.status", "task_id": queued_id, "ref": 1}))
            assert json.loads(caller.recv(5))["state"] == "queued"
            worker.send(json.dumps({"op": "worker.hello", "types": ["long"], "ref": 1}))
            assert json.loads(worker.recv(5))["op"] == "ok"
            task = json.loads(worker.recv(5))["task"]
            assert task["task_id"] == task_id and task["attempt"] == (2 if kill else 1)
            worker.send(json.dumps({"op": "task.result", "task_id": task_id, "result": "done"}))
            caller.send(json.dumps({"op": "collect", "task_ids": [task_id], "timeout": 5, "ref": 2}))
            assert json.loads(caller.recv(10))["completed"] == {task_id: "done"}
    finally:
        proc.stop()


async def test_a_restart_reads_only_the_unfinished_tasks_and_an_older_file_loses_its_index_of_every_state(
    tmp_dir: Path,
) -> None:
    """Recovery reads the index of unfinished tasks, which a task leaves when it ends. A database made
    before it had an index of every task's state that no query read, each change of state moving an
    entry in it: opening such a file drops it."""
    path = tmp_dir / "aivad.db"

    async def open_and_close() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_store, StoreConfig(path=str(path)))
            nursery.cancel_scope.cancel()

    await open_and_close()
    with sqlite3.connect(path) as conn:  # as an older version left it
        conn.execute("DROP INDEX tasks_unfinished")
        conn.execute("CREATE INDEX tasks_state ON tasks (state)")
    await open_and_close()
    with sqlite3.connect(path) as conn:
        indexes = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        plan = " ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + UNFINISHED_TASKS_SQL))
    assert "tasks_state" not in indexes and "tasks_unfinished" in indexes
    assert "USING INDEX tasks_unfinished" in plan, plan


control = control_async


async def test_dlq_list_show_replay_purge_over_control(daemon: InProcessDaemon) -> None:
    with trio.fail_after(15):
        async with connect(daemon.ws_url) as w:
            worker = TestWorker(w)
            await worker.hello(["dlq.t"])
            reply = await control(daemon.control_path, {"cmd": "dispatch", "type": "dlq.t", "payload": 1,
                                                        "retry_policy": {"max_attempts": 1}})
            task_id = reply["task_id"]
            await worker.next_task()
            await worker.send("task.fail", task_id=task_id, error="nope")
            while not (listed := await control(daemon.control_path, {"cmd": "dlq.list"}))["dead_letters"]:
                await trio.sleep(0.02)
            (letter,) = listed["dead_letters"]
            assert letter["kind"] == "task" and "attempts used" in letter["reason"]
            shown = (await control(daemon.control_path, {"cmd": "dlq.show", "id": letter["id"]}))
            attempts = shown["dead_letter"]["detail"]["attempts"]
            assert [a["outcome"] for a in attempts] == ["failed"] and attempts[0]["error"] == "nope"
            assert attempts[0]["worker"] and attempts[0]["started"] and attempts[0]["ended"]
            refused = await control(daemon.control_path, {"cmd": "dlq.purge"})
            assert refused["ok"] is False and refused["error"]["code"] == "bad_request"
            replayed = await control(daemon.control_path, {"cmd": "dlq.replay", "id": letter["id"]})
            assert replayed["replayed"] == [task_id]
            again = await worker.next_task()
            assert (again["task_id"], again["attempt"]) == (task_id, 1)  # a fresh attempt budget
            await worker.send("task.result", task_id=task_id, result="ok now")
            status = {"cmd": "task", "task_id": task_id}
            while (await control(daemon.control_path, status))["task"]["state"] != "completed":
                await trio.sleep(0.02)
            assert (await control(daemon.control_path, {"cmd": "dlq.list"}))["dead_letters"] == []
            gone = await control(daemon.control_path, {"cmd": "dlq.replay", "id": letter["id"]})
            assert gone["error"]["code"] == "not_found"
            workers = (await control(daemon.control_path, {"cmd": "workers"}))["workers"]
            assert workers[0]["done"] == 1 and workers[0]["failed"] == 1 and workers[0]["types"] == ["dlq.t"]
            tasks = (await control(daemon.control_path, {"cmd": "tasks", "state": "completed"}))["tasks"]
            assert [t["task_id"] for t in tasks] == [task_id]
            purged = await control(daemon.control_path, {"cmd": "dlq.purge", "yes": True})
            assert purged["purged"] == 0


async def _complete(worker: TestWorker, caller: TestClient, n: int, **fields: Any) -> list[str]:
    """``n`` tasks of type ``keep``, each dispatched, worked and completed in turn: their ids, oldest first."""
    ids = []
    for i in range(n):
        task_id = await dispatch(caller, "keep", i, **fields)
        assert (await worker.next_task())["task_id"] == task_id
        await worker.send("task.result", task_id=task_id, result=i)
        ids.append(task_id)
    return ids


async def _settled_completed(d: InProcessDaemon, most: int) -> list[str]:
    """The ids of the completed tasks in the store, newest first, once there are at most ``most`` of them."""
    while len(tasks := (await control(d.control_path, {"cmd": "tasks", "state": "completed"}))["tasks"]) > most:
        await trio.sleep(0.02)
    return [t["task_id"] for t in tasks]


async def _known(d: InProcessDaemon, task_id: str) -> bool:
    reply = await control(d.control_path, {"cmd": "task", "task_id": task_id})
    assert reply["ok"] or reply["error"]["code"] == "not_found", reply
    return bool(reply["ok"])


async def test_the_store_keeps_the_newest_ended_kept_completed_tasks_and_a_dead_one_until_its_purge(
    nursery: trio.Nursery, tmp_dir: Path
) -> None:
    """A store that kept every task ever run grew without bound: past ``[tasks] ended_kept`` (3 here, and
    a slack of 1) the oldest completed tasks go. A dead task stays while its dead letter may replay it."""
    d = await start_daemon(nursery, tmp_dir, tasks={"ended_kept": 3})
    with trio.fail_after(20):
        async with connect(d.ws_url) as w, connect(d.ws_url) as caller:
            worker = TestWorker(w)
            await worker.hello(["keep"])
            dead_id = await dispatch(caller, "keep", "fails", retry_policy={"max_attempts": 1})
            await worker.next_task()
            await worker.send("task.fail", task_id=dead_id, error="nope")
            ids = await _complete(worker, caller, 8)
            # a trim starts at 5 (past 3 + 1) and ends at 3; then 6, 7 (trimmed again), 8: 3 or 4 stay
            kept = await _settled_completed(d, 4)
            assert len(kept) >= 3 and kept == ids[: -len(kept) - 1 : -1], (kept, ids)
            assert not await _known(d, ids[0]) and await _known(d, ids[-3])
            assert (await control(d.control_path, {"cmd": "task", "task_id": dead_id}))["task"]["state"] == "dead"
            assert (await control(d.control_path, {"cmd": "dlq.purge", "yes": True}))["purged"] == 1
            assert not await _known(d, dead_id)
            assert await _known(d, ids[-1])


async def test_past_dead_letters_kept_the_oldest_letters_go_with_their_dead_tasks(
    nursery: trio.Nursery, tmp_dir: Path
) -> None:
    """A peer that makes dead letters without end (garbage to the AMQP bridge, tasks that always fail)
    fills the table no more than ``[store] dead_letters_kept``: each new letter past it deletes the
    oldest, and the dead task it could have replayed; counted in status."""
    d = await start_daemon(nursery, tmp_dir, store={"dead_letters_kept": 2})
    with trio.fail_after(20):
        async with connect(d.ws_url) as w, connect(d.ws_url) as caller:
            worker = TestWorker(w)
            await worker.hello(["keep"])
            dead = []
            for i in range(4):
                dead.append(await dispatch(caller, "keep", i, retry_policy={"max_attempts": 1}))
                await worker.next_task()
                await worker.send("task.fail", task_id=dead[-1], error="nope")
            while len((await control(d.control_path, {"cmd": "dlq.list"}))["dead_letters"]) != 2 or (
                (await control(d.control_path, {"cmd": "status"}))["status"]["store"]["dead_letters_dropped"] != 2
            ):
                await trio.sleep(0.02)
            letters = (await control(d.control_path, {"cmd": "dlq.list"}))["dead_letters"]
            assert [letter["id"] for letter in letters] == [3, 4]
            assert [await _known(d, t) for t in dead] == [False, False, True, True]
            replayed = await control(d.control_path, {"cmd": "dlq.replay", "id": 4})
            assert replayed["replayed"] == [dead[3]]


async def test_a_letter_whose_task_is_not_dead_any_more_is_not_replayed_and_stays(
    nursery: trio.Nursery, tmp_dir: Path
) -> None:
    """Replay queues a task again only from its dead row; without one (changed behind the daemon's back)
    it answers not_found and leaves the letter, which used to be deleted all the same."""
    d = await start_daemon(nursery, tmp_dir)
    with trio.fail_after(20):
        async with connect(d.ws_url) as w, connect(d.ws_url) as caller:
            worker = TestWorker(w)
            await worker.hello(["keep"])
            task_id = await dispatch(caller, "keep", 1, retry_policy={"max_attempts": 1})
            await worker.next_task()
            await worker.send("task.fail", task_id=task_id, error="nope")
            while not (letters := (await control(d.control_path, {"cmd": "dlq.list"}))["dead_letters"]):
                await trio.sleep(0.02)
            with sqlite3.connect(d.cfg.store.path, timeout=10) as conn:
                conn.execute("UPDATE tasks SET state = 'completed' WHERE task_id = ?", (task_id,))
            refused = await control(d.control_path, {"cmd": "dlq.replay", "id": letters[0]["id"]})
            assert refused["error"]["code"] == "not_found"
            assert (await control(d.control_path, {"cmd": "dlq.list"}))["dead_letters"] == letters


async def test_a_restart_counts_the_completed_tasks_and_trims_them_to_a_lowered_limit_in_chunks(
    tmp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The count survives a restart (read once from the store); a limit lowered past many rows is reached
    in several writes (two rows each here), the unfinished tasks untouched."""
    monkeypatch.setattr(aivad.task_retention, "CHUNK", 2)
    with trio.fail_after(30):
        async with trio.open_nursery() as first:
            d = await start_daemon(first, tmp_dir)
            async with connect(d.ws_url) as w, connect(d.ws_url) as caller:
                worker = TestWorker(w)
                await worker.hello(["keep"])
                ids = await _complete(worker, caller, 7)
                waiting = await dispatch(caller, "nobody.works.this")
            first.cancel_scope.cancel()
        async with trio.open_nursery() as second:
            d = await start_daemon(second, tmp_dir, tasks={"ended_kept": 2})
            assert await _settled_completed(d, 2) == ids[:-3:-1]
            assert (await control(d.control_path, {"cmd": "task", "task_id": waiting}))["task"]["state"] == "queued"
            second.cancel_scope.cancel()


async def test_worker_drain_gets_no_new_tasks_and_hands_back_what_it_holds(daemon: InProcessDaemon) -> None:
    with trio.fail_after(15):
        async with connect(daemon.ws_url) as caller, connect(daemon.ws_url) as w2:
            async with connect(daemon.ws_url) as w1:
                leaving = TestWorker(w1)
                await leaving.hello(["d"], concurrency=2, name="leaving")
                held = await dispatch(caller, "d", "held", retry_policy={"max_attempts": 1})
                assert (await leaving.next_task())["task_id"] == held
                await w1.ok({"op": "worker.drain", "ref": "bye"})
                later = await dispatch(caller, "d", "later")
                assert (await caller.ok({"op": "task.status", "task_id": later}))["state"] == "queued"
                workers = (await control(daemon.control_path, {"cmd": "workers"}))["workers"]
                assert [w["draining"] for w in workers] == [True]
            # gone while holding a task: handed back, its single allowed attempt not used up
            staying = TestWorker(w2)
            await staying.hello(["d"], concurrency=2)
            got = {(t := await staying.next_task())["payload"]: t for _ in range(2)}
            assert set(got) == {"held", "later"} and got["held"]["attempt"] == 1
            for task in got.values():
                await staying.send("task.result", task_id=task["task_id"], result="ok")
            done = await caller.ok({"op": "collect", "task_ids": [held, later], "timeout": 5})
            assert done["reason"] == "all_done" and done["failed"] == {}


async def test_made_ids_grow_with_time_in_the_uuid7_layout() -> None:
    """Task and message ids the daemon makes sort by creation time (the store's id indexes then
    take appends on their last pages): 48 bits of Unix milliseconds first, version 7, variant 10."""
    from aivad.envelope import Envelope, new_id
    from aivad.tasks import parse_task_spec

    first = [new_id() for _ in range(50)]
    await trio.sleep(0.002)  # a later millisecond
    later = parse_task_spec({"type": "t"}, TasksConfig()).task_id, Envelope.from_fields("t.x", None).message_id
    assert all(a < b for a in first for b in later)
    for made in (*first, *later):
        value = uuid.UUID(made)
        assert (len(made), value.version, value.variant) == (32, 7, uuid.RFC_4122)
        assert abs((value.int >> 80) - time.time() * 1000) < 60_000
    assert len(set(first)) == len(first)
