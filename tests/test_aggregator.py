"""The aggregator hands a task's end to whoever waits for it, from memory.

Real parts: the store on SQLite in a temp dir, the dispatcher and the aggregator
as the daemon runs them; the worker is the dispatcher's own ``WorkerLink``
interface answered by the test (what aivad.websocket does for a socket). To show
that a ``request`` or a ``collect`` of running tasks needs no store read, the
store's only reader connection is held by a read that blocks until the test lets
it go: an answer that arrives meanwhile came from the end itself. Tests where a
timeout decides run on ``MockClock(autojump_threshold=0)``; the others use a real
``fail_after`` so a lost wakeup fails instead of stalling.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from aivad.aggregator import Aggregator, CollectResult, serve_aggregator
from aivad.config import StoreConfig, TasksConfig
from aivad.dispatcher import Dispatcher, Worker, serve_dispatcher
from aivad.protocol import OpError
from aivad.store import Store, serve_store
from aivad.tasks import TaskSpec


class Link:
    """A worker connection as the dispatcher sees it: its ``task`` frames land in a channel."""

    def __init__(self) -> None:
        self._send, self.frames = trio.open_memory_channel[dict[str, Any]](1000)

    async def send_task(self, frame: dict[str, Any]) -> None:
        await self._send.send(frame)

    async def next_id(self) -> str:
        return str((await self.frames.receive())["task"]["task_id"])


@attrs.define
class Parts:
    store: Store
    dispatcher: Dispatcher
    aggregator: Aggregator
    worker: Worker
    link: Link
    nursery: trio.Nursery

    async def ended(self, task_id: str) -> None:
        """Wait until the dispatcher has ended ``task_id`` (committed, forgotten, ``on_end`` told)."""
        while task_id in self.dispatcher.tasks:
            await trio.sleep(0.001)

    async def complete(self, task_id: str, result: Any) -> None:
        assert await self.link.next_id() == task_id
        self.dispatcher.result(self.worker, task_id, result)
        await self.ended(task_id)

    async def kill(self, task_id: str, error: Any) -> None:
        assert await self.link.next_id() == task_id
        self.dispatcher.fail(self.worker, task_id, error, False)
        await self.ended(task_id)

    @asynccontextmanager
    async def reads_blocked(self) -> AsyncIterator[None]:
        """Hold the store's only reader connection: every ``store.read`` waits meanwhile."""
        release = threading.Event()
        holding = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def hold(_: Any) -> None:
            token.run_sync_soon(holding.set)
            release.wait(30)

        self.nursery.start_soon(self.store.read, hold)
        await holding.wait()
        try:
            yield
        finally:
            release.set()


def spec(task_id: str, task_type: str = "echo", *, max_attempts: int = 3, group_id: str | None = None) -> TaskSpec:
    return TaskSpec(task_id, task_type, None, 4, max_attempts, 0.5, 10.0, 86400.0, None, None, group_id)


@asynccontextmanager
async def parts(tmp_dir: Path, **store_options: Any) -> AsyncIterator[Parts]:
    async with trio.open_nursery() as nursery:
        cfg = StoreConfig(path=str(tmp_dir / "aivad.db"), read_connections=1, **store_options)
        store = await nursery.start(serve_store, cfg)
        dispatcher = await nursery.start(serve_dispatcher, TasksConfig(), store)
        aggregator = await nursery.start(serve_aggregator, TasksConfig(), dispatcher, store)
        link = Link()
        worker = dispatcher.add_worker(link, "w", ["echo"], 100)
        yield Parts(store, dispatcher, aggregator, worker, link, nursery)
        nursery.cancel_scope.cancel()


@contextmanager
def answered(into: dict[str, Any], key: str) -> Iterator[None]:
    try:
        yield
    except OpError as exc:
        into[key] = exc


async def test_request_is_answered_by_the_task_end_with_the_store_unreadable(tmp_dir: Path) -> None:
    """The result and the final error come with the end: no store read is on the way."""
    with trio.fail_after(20):
        async with parts(tmp_dir) as p, p.reads_blocked():
            answers: dict[str, Any] = {}

            async def request(task_id: str) -> None:
                with answered(answers, task_id):
                    answers[task_id] = await p.aggregator.request(spec(task_id, max_attempts=2), 30)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(request, "ok")
                assert await p.link.next_id() == "ok"
                p.dispatcher.result(p.worker, "ok", {"echo": "hi"})
                nursery.start_soon(request, "dies")
                p.dispatcher.fail(p.worker, await p.link.next_id(), "first try", True)  # retried after backoff
                p.dispatcher.fail(p.worker, await p.link.next_id(), "boom", True)  # attempts used: dead
            assert answers["ok"] == {"task_id": "ok", "result": {"echo": "hi"}}
            dead = answers["dies"]
            assert isinstance(dead, OpError) and dead.code == "internal"
            assert dead.message == "task dies failed: boom"  # the final error, not the first


async def test_a_task_that_ends_soon_has_its_dispatch_record_written_with_its_end(tmp_dir: Path) -> None:
    """Nobody waits for ``task.dispatched``: it shares the commit of the task's end (two commits
    per task, not three), its events in their order."""
    with trio.fail_after(20):
        async with parts(tmp_dir, lazy_write_delay_s=5.0) as p:
            commits = p.store.statistics().commits
            await p.dispatcher.submit(spec("soon"))
            assert p.store.statistics().commits == commits + 1
            await p.complete("soon", "done")
            assert p.store.statistics().commits == commits + 2, "the dispatch record rode with the end"
            history = await p.store.history("task.#", 0, 10)
            types = [(m.type, json.loads(m.json)["payload"]["task_id"]) for m in history.messages]
            assert types == [("task.created", "soon"), ("task.dispatched", "soon"), ("task.completed", "soon")]


def test_a_collect_reply_holds_the_results_themselves_not_deep_copies() -> None:
    results = {"t": {"rows": [{"i": i} for i in range(1000)]}}
    wire = CollectResult(results, {}, [], "all_done").to_wire()
    assert wire == {"completed": results, "failed": {}, "pending": [], "reason": "all_done"}
    assert wire["completed"] is results


async def test_collect_mixes_tasks_ended_before_with_ends_handed_over(tmp_dir: Path) -> None:
    """Running when looked at: handed over at their end, no store read. Ended before the call:
    read from the store — and a running one that ends while the collect waits for that read is
    handed over too (its waiter was registered before the read)."""
    with trio.fail_after(20):
        async with parts(tmp_dir) as p:
            for task_id in ("a", "d", "b", "c", "e"):
                await p.dispatcher.submit(spec(task_id, max_attempts=1))
            await p.complete("a", {"n": "a"})
            await p.kill("d", "d broke")
            result: dict[str, Any] = {}

            async def collect(key: str, ids: list[str]) -> None:
                result[key] = await p.aggregator.collect(ids, None, 30, None)

            async with p.reads_blocked(), trio.open_nursery() as nursery:  # all running: the store is not read
                nursery.start_soon(collect, "running", ["b", "c"])
                await trio.testing.wait_all_tasks_blocked()
                await p.complete("b", {"n": "b"})
                await p.kill("c", "c broke")
            r = result["running"]
            assert (r.completed, r.failed, r.pending, r.reason) == ({"b": {"n": "b"}}, {"c": "c broke"}, [], "all_done")

            async with trio.open_nursery() as nursery, p.reads_blocked():
                nursery.start_soon(collect, "mixed", ["a", "b", "e", "d", "c"])
                await trio.testing.wait_all_tasks_blocked()  # the collect waits to read a, b, d, c
                await p.complete("e", {"n": "e"})
                assert "mixed" not in result
            r = result["mixed"]
            assert r.completed == {"a": {"n": "a"}, "b": {"n": "b"}, "e": {"n": "e"}}
            assert r.failed == {"d": "d broke", "c": "c broke"}
            assert (r.pending, r.reason) == ([], "all_done")
            # a task that ended before the waiter could register is answered, from the store
            assert (await p.aggregator.request(spec("b", max_attempts=1), 5)) == {"task_id": "b", "result": {"n": "b"}}


async def test_group_collect_sees_members_that_join_and_end_while_it_waits(tmp_dir: Path) -> None:
    with trio.fail_after(20):
        async with parts(tmp_dir) as p:
            await p.dispatcher.submit(spec("m1", group_id="g"))
            await p.complete("m1", 1)
            await p.dispatcher.submit(spec("m2", group_id="g"))
            assert await p.link.next_id() == "m2"
            result: dict[str, Any] = {}

            async def collect() -> None:
                result["r"] = await p.aggregator.collect(None, "g", 30, None)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect)
                await trio.testing.wait_all_tasks_blocked()
                await p.dispatcher.submit(spec("m3", group_id="g"))  # joins while the collect waits
                p.dispatcher.result(p.worker, "m2", 2)
                await p.ended("m2")
                await p.complete("m3", 3)
            r = result["r"]
            assert (r.completed, r.failed, r.pending, r.reason) == ({"m1": 1, "m2": 2, "m3": 3}, {}, [], "all_done")
            while True:  # published once the group's last running task ended
                events = (await p.store.history("group.completed", 0, 10)).messages
                if events and json.loads(events[-1].json)["payload"]["tasks"] == 3:
                    break
                await trio.sleep(0.01)
            assert json.loads(events[-1].json)["payload"] == {"group_id": "g", "tasks": 3, "completed": 3, "dead": 0}


async def test_collect_timeout_gives_partial_results_of_both_kinds(
    tmp_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """(On the mock clock any deadline comes as soon as the store's thread is waited for, so only
    tasks whose end does not depend on when deadlines come are used: one that dies of its timeout.)"""
    async with parts(tmp_dir) as p:
        await p.dispatcher.submit(spec("a", max_attempts=1))
        await p.complete("a", "A")
        await p.dispatcher.submit(attrs.evolve(spec("d", max_attempts=1), timeout_s=1.0))
        await p.link.next_id()  # never answered: dead after its 1 s
        await p.ended("d")
        await p.dispatcher.submit(spec("slow", "no.worker"))  # queued: no worker takes its type
        start = trio.current_time()
        r = await p.aggregator.collect(["a", "slow", "d"], None, 5, None)
        assert trio.current_time() - start >= 5 - 1e-9  # not before its deadline
        expected_failed = {"d": "attempt 1 timed out after 1 s"}
        assert (r.completed, r.failed, r.pending, r.reason) == ({"a": "A"}, expected_failed, ["slow"], "timeout")
        r = await p.aggregator.collect(["a", "slow", "d"], None, 5, 1)
        assert (r.completed, r.pending, r.reason) == ({"a": "A"}, ["slow"], "min_results")


async def test_request_timeout_abandons_the_task(tmp_dir: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with parts(tmp_dir) as p:
        with pytest.raises(OpError) as raised:
            await p.aggregator.request(spec("nobody", "no.worker"), 3)
        assert (raised.value.code, raised.value.message) == ("timeout", "no result for task nobody within 3 s")
        r = await p.aggregator.collect(["nobody"], None, 1, None)
        assert (r.failed, r.reason) == ({"nobody": "request timed out after 3 s"}, "all_done")
