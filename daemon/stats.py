"""Where the time goes and what happened: wall time per pipeline stage (totals and a
histogram), and counts of events (alerts received, verdicts, publish failures ...)."""

from __future__ import annotations

import bisect
import itertools
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

#: in pipeline order
STAGES = ("parse", "journal_alert", "prepare", "model", "journal_verdict", "publish")
#: upper bounds (seconds) of the per-stage time histogram
BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: an event's name and its labels, sorted
EventKey = tuple[str, tuple[tuple[str, str], ...]]


class StageStats:
    def __init__(self) -> None:
        self._seconds: dict[str, float] = defaultdict(float)
        self._count: dict[str, int] = defaultdict(int)
        #: per stage: how many timings fell at or below each of BUCKETS_S (not cumulative)
        self._buckets: dict[str, list[int]] = defaultdict(lambda: [0] * len(BUCKETS_S))
        self._events: dict[EventKey, int] = defaultdict(int)

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def add(self, stage: str, seconds: float, count: int = 1) -> None:
        """`count` items each waited `seconds` (together: a batch is done when its last is)."""
        self._seconds[stage] += seconds * count
        self._count[stage] += count
        slot = bisect.bisect_left(BUCKETS_S, seconds)
        if slot < len(BUCKETS_S):
            self._buckets[stage][slot] += count

    def histogram(self, stage: str) -> tuple[list[int], float, int]:
        """Cumulative counts per bucket of BUCKETS_S, the sum of seconds and the count."""
        buckets = self._buckets.get(stage) or [0] * len(BUCKETS_S)
        cumulative = list(itertools.accumulate(buckets))
        return cumulative, self._seconds.get(stage, 0.0), self._count.get(stage, 0)

    def count(self, event: str, n: int = 1, **labels: str) -> None:
        """Something happened `n` times (e.g. "alerts_received", source="mqtt")."""
        self._events[(event, tuple(sorted(labels.items())))] += n

    def events(self) -> dict[EventKey, int]:
        return dict(self._events)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Per stage: how often, total seconds and mean milliseconds (wall time, awaits
        included, so stages that overlap add up to more than the elapsed time)."""
        order = [s for s in STAGES if s in self._count] + sorted(set(self._count) - set(STAGES))
        return {
            stage: {
                "count": self._count[stage],
                "total_s": round(self._seconds[stage], 4),
                "mean_ms": round(1000 * self._seconds[stage] / self._count[stage], 3),
            }
            for stage in order
        }
