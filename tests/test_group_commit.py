"""aivad.redis.group_commit: how calls are cut and shared, with a send that records its batches.

The Redis users of it (the log's appends, the task book's changes) are tested against a real
Redis in tests/test_redis_log.py and tests/test_cluster_tasks.py; this pins the bounds.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from aivad.redis.client import RedisLogError, RedisOverloaded
from aivad.redis.group_commit import GroupCommit


class Recorder:
    """A send that answers each item with its own doubled length, after a pause; records its calls."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.fail: Exception | None = None

    async def send(self, items: list[str]) -> list[int]:
        self.calls.append(items)
        await trio.sleep(1)
        if self.fail is not None:
            raise self.fail
        return [2 * len(item) for item in items]


def commit(recorder: Recorder, **bounds: int) -> GroupCommit[str, int]:
    return GroupCommit("test", recorder.send, size_of=len, **bounds)


async def test_a_call_is_cut_by_items_and_bytes_and_a_bigger_item_goes_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    group = commit(recorder, max_items=3, max_bytes=10)
    items = ["aa", "bb", "cc", "dd", "x" * 25, "ee", "ffff", "gggggg"]
    assert await group.submit(items) == [2 * len(i) for i in items]
    # the chunks wait together, and a flush takes from the front only what fits the bounds
    assert recorder.calls == [["aa", "bb", "cc"], ["dd"], ["x" * 25], ["ee", "ffff"], ["gggggg"]]
    assert group.pending == 0


async def test_whole_sends_one_call_past_the_bounds(autojump_clock: trio.testing.MockClock) -> None:
    recorder = Recorder()
    group = commit(recorder, max_items=2, max_bytes=3)
    assert await group.submit(["aa", "bb", "cc"], whole=True) == [4, 4, 4]
    assert recorder.calls == [["aa", "bb", "cc"]]


async def test_callers_waiting_together_share_a_call_within_the_bounds(autojump_clock: trio.testing.MockClock) -> None:
    recorder = Recorder()
    group = commit(recorder, max_items=4)
    got: dict[int, list[int]] = {}

    async def caller(k: int) -> None:
        got[k] = await group.submit(["x" * k, "y" * k])

    async with trio.open_nursery() as nursery:
        for k in range(1, 6):
            nursery.start_soon(caller, k)
    assert got == {k: [2 * k, 2 * k] for k in range(1, 6)}  # each caller its own results, in order
    assert [len(call) for call in recorder.calls] == [4, 4, 2]  # 5 calls' items in 3, none over max_items


async def test_over_max_pending_is_overloaded_and_a_failed_call_fails_each_of_its_callers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    group = commit(recorder, max_items=100, max_pending=3)
    with pytest.raises(RedisOverloaded):
        await group.submit(["a", "b", "c", "d"])
    recorder.fail = RedisLogError("gone")
    failures: list[str] = []

    async def caller(item: str) -> None:
        with pytest.raises(RedisLogError) as caught:
            await group.submit([item])
        failures.append(str(caught.value))

    async with trio.open_nursery() as nursery:
        for item in "xyz":
            nursery.start_soon(caller, item)
    assert failures == ["gone"] * 3 and group.pending == 0
