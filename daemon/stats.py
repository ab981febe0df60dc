"""Where the time goes: wall time per pipeline stage, summed over alerts."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

#: in pipeline order
STAGES = ("parse", "journal_alert", "prepare", "model", "journal_verdict", "publish")


class StageStats:
    def __init__(self) -> None:
        self._seconds: dict[str, float] = defaultdict(float)
        self._count: dict[str, int] = defaultdict(int)

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def add(self, stage: str, seconds: float, count: int = 1) -> None:
        self._seconds[stage] += seconds
        self._count[stage] += count

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
