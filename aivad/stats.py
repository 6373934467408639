"""Counters shared by the ingresses: messages in per ingress, and their recent rate.

Only counting happens here; ``status`` and ``/metrics`` read frozen snapshots.
"""

from __future__ import annotations

from collections import Counter, deque

import attrs
import trio

__all__ = ["Ingest", "IngestStatistics"]

_WINDOW_S = 60


@attrs.frozen
class IngestStatistics:
    by_ingress: dict[str, int]
    rate_10s: float
    rate_60s: float


class Ingest:
    """Counts stored messages per ingress, with per-second buckets for the recent rate."""

    def __init__(self) -> None:
        self._totals: Counter[str] = Counter()
        self._buckets: deque[list[int]] = deque(maxlen=_WINDOW_S + 1)  # [second, count]

    def count(self, ingress: str, n: int = 1) -> None:
        self._totals[ingress] += n
        second = int(trio.current_time())
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += n
        else:
            self._buckets.append([second, n])

    def _rate(self, window: int) -> float:
        now = int(trio.current_time())
        total = sum(n for second, n in self._buckets if now - window <= second < now)
        return total / window

    def statistics(self) -> IngestStatistics:
        return IngestStatistics(dict(self._totals), self._rate(10), self._rate(_WINDOW_S))
