"""Busy seconds per stage of a run, for its summary."""

from __future__ import annotations

import threading
import time
from collections import Counter


class StageTimes:
    """Busy seconds per stage, summed over the threads that run them (so they can exceed wall time)."""

    def __init__(self):
        self.seconds: Counter = Counter()
        self.counts: Counter = Counter()
        self._lock = threading.Lock()

    def add(self, stage: str, started: float) -> None:
        with self._lock:
            self.seconds[stage] += time.perf_counter() - started

    def add_count(self, name: str, n: int) -> None:
        with self._lock:
            self.counts[name] += n
