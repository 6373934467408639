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

    async def submit(self, items: Sequence[T], *, whole: bool = False) -> list[R]:
        """Send ``items``, cut into chunks that fit the bounds (``whole``: in one call, whatever the
        bounds); their results, in order."""
        if not items:
            return []
        queued = [_Chunk[T, R](items, self._size(items))] if whole else self._cut(items)
        count = len(items)
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

    def _size(self, items: Sequence[T]) -> int:
        return sum(map(self._size_of, items)) if self._size_of is not None else 0

    def _cut(self, items: Sequence[T]) -> list[_Chunk[T, R]]:
        """``items`` in chunks of at most ``max_items`` and ``max_bytes`` (a bigger item alone)."""
        size_of, max_bytes = self._size_of, self._max_bytes
        chunks: list[_Chunk[T, R]] = []
        start = 0
        while start < len(items):
            end, size = start, 0
            while end < len(items) and end - start < self._max_items:
                item_size = size_of(items[end]) if size_of is not None else 0
                if end > start and max_bytes is not None and size + item_size > max_bytes:
                    break
                size += item_size
                end += 1
            chunks.append(_Chunk[T, R](items[start:end], size))
            start = end
        return chunks

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
