"""Error boundaries (aivad/boundary.py): a unit that fails ends alone, Cancelled passes.

Plain trio tests: no sockets, no daemon — the helper's contract alone.
"""

from __future__ import annotations

import trio

from aivad.boundary import Faults, describe


async def test_a_failing_unit_ends_alone_and_is_counted_and_reported() -> None:
    faults = Faults()
    heard: list[tuple[str, str, str]] = []
    faults.on_fault(lambda kind, what, exc: heard.append((kind, what, describe(exc))))
    survivor_ran = trio.Event()

    async def broken() -> None:
        raise ValueError("boom " + "x" * 1000)

    async def survivor() -> None:
        await trio.sleep(0.01)
        survivor_ran.set()

    async with trio.open_nursery() as nursery:
        faults.start_soon(nursery, "test.unit", "the broken one", broken)
        faults.start_soon(nursery, "test.unit", "the survivor", survivor)
    assert survivor_ran.is_set()
    assert faults.statistics().by_kind == {"test.unit": 1}
    (kind, what, text), = heard
    assert (kind, what) == ("test.unit", "the broken one")
    assert text.startswith("ValueError: boom") and len(text) <= 200


async def test_cancellation_is_not_a_fault() -> None:
    faults = Faults()
    with trio.move_on_after(0.01):
        await faults.isolated("test.unit", "sleeper", trio.sleep_forever)
    assert faults.statistics().by_kind == {}


async def test_a_unit_whose_nursery_fails_while_cancelled_records_the_error_and_lets_cancel_through() -> None:
    faults = Faults()

    async def unit() -> None:
        async with trio.open_nursery() as inner:
            inner.start_soon(trio.sleep_forever)

            async def fail_when_cancelled() -> None:
                try:
                    await trio.sleep_forever()
                finally:
                    raise KeyError("while unwinding")

            inner.start_soon(fail_when_cancelled)

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            faults.start_soon(nursery, "test.unit", "unit", unit)
            await trio.sleep(0.01)
            scope.cancel()
    assert scope.cancelled_caught
    assert faults.statistics().by_kind == {"test.unit": 1}
