"""Group commit for one kind of Redis script call: concurrent callers share a call, one is in flight.

Why: a script call costs a round trip whatever it carries, so callers that come while one is in
flight wait for the commit lock, and whoever takes it next sends everything waiting, in arrival
order (up to the bounds), as one call and hands each caller its results — as the embedded store's
writer does. The log's appends and the task book's changes commit this way.

A flush, once begun, finishes: it is shielded (the send bounds itself with the operation timeout),
so the caller that happens to run it being cancelled does not fail the others'. Every caller of a
failed call hears of it as a :class:`RedisLogError`; anything else (a bug) still propagates.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import trio

from .client import RedisLogError, RedisOverloaded

__all__ = ["GroupCommit"]

T = TypeVar("T")
R = TypeVar("R")


class _Chunk(Generic[T, R]):
    """Items of one caller waiting for the lock's holder to send them (a call may queue several)."""

    __slots__ = ("done", "error", "items", "results", "size", "taken")

    def __init__(self, items: Sequence[T], size: int) -> None:
        self.items = items
        self.size = size
        self.taken = False  # in a flush: it will be done
        self.done = False
        self.results: list[R] = []
        self.error: RedisLogError | None = None


class GroupCommit(Generic[T, R]):
    """``send(items) -> results`` (one result per item, in order), shared by concurrent callers.

    A flush takes whole chunks from the front while they stay within ``max_items`` and
    ``max_bytes`` (by ``size_of``), the first one whatever its size. ``max_pending`` bounds the items
    waiting: beyond it :meth:`submit` raises :class:`RedisOverloaded`."""

    def __init__(
        self,
        what: str,
        send: Callable[[list[T]], Awaitable[list[R]]],
        *,
        max_items: int,
        max_bytes: int | None = None,
        size_of: Callable[[T], int] | None = None,
        max_pending: int | None = None,
    ) -> None:
        self._what = what
        self._send = send
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._size_of = size_of
        self._max_pending = max_pending
        self._waiting: collections.deque[_Chunk[T, R]] = collections.deque()
        self._lock = trio.Lock()
        #: items queued and not yet taken by a flush
        self.pending = 0

    async def submit(self, chunks: Sequence[Sequence[T]]) -> list[R]:
        """Send the items of ``chunks`` (each cut by the caller to fit the bounds, or sent whole);
        their results, in order."""
        size_of = self._size_of
        queued = [_Chunk[T, R](c, sum(map(size_of, c)) if size_of else 0) for c in chunks if c]
        if not queued:
            return []
        count = sum(len(c.items) for c in queued)
        if self._max_pending is not None and self.pending + count > self._max_pending:
            raise RedisOverloaded(f"{self.pending} items already wait for Redis ({self._what})")
        self._waiting.extend(queued)
        self.pending += count
        try:
            for chunk in queued:
                if not chunk.done:
                    async with self._lock:
                        if not chunk.done:
                            await self._flush()
        except BaseException:
            for chunk in queued:
                if not chunk.taken:  # not sent: forget it
                    self._waiting.remove(chunk)
                    self.pending -= len(chunk.items)
            raise
        results: list[R] = []
        for chunk in queued:
            if chunk.error is not None:
                raise chunk.error
            results += chunk.results
        return results

    async def _flush(self) -> None:
        """Send what waits, from the front, within the bounds, as one call. Holds the lock."""
        batch: list[_Chunk[T, R]] = []
        count = size = 0
        while self._waiting:
            chunk = self._waiting[0]
            if batch and (count + len(chunk.items) > self._max_items
                          or (self._max_bytes is not None and size + chunk.size > self._max_bytes)):
                break
            self._waiting.popleft()
            chunk.taken = True
            batch.append(chunk)
            count += len(chunk.items)
            size += chunk.size
        self.pending -= count
        try:
            with trio.CancelScope(shield=True):
                results = await self._send([item for chunk in batch for item in chunk.items])
        except BaseException as exc:  # every caller of the batch hears of it; a bug still propagates
            error = exc if isinstance(exc, RedisLogError) else RedisLogError(f"{self._what} failed: {exc!r}")
            for chunk in batch:
                chunk.error, chunk.done = error, True
            if error is exc:
                return
            raise
        start = 0
        for chunk in batch:
            chunk.results, chunk.done = results[start:start + len(chunk.items)], True
            start += len(chunk.items)
