"""Frame pacing lives here and nowhere else.

``RealClock`` sleeps until the next frame is due (vsync may already have waited);
``ManualClock`` advances a fixed step per frame and never sleeps, so tests run the
engine frame by frame with reproducible time.
"""

from __future__ import annotations

import time


class RealClock:
    def __init__(self, fps: float = 60.0) -> None:
        if fps <= 0:
            raise ValueError("fps must be positive")
        self.period = 1.0 / fps
        self._last = time.perf_counter()
        self._next = self._last + self.period

    def now(self) -> float:
        return time.perf_counter()

    def tick(self) -> float:
        """Wait until the next frame is due; return the seconds since the previous tick."""
        now = time.perf_counter()
        if now < self._next:
            time.sleep(self._next - now)
            now = time.perf_counter()
        # late by more than a frame: start afresh instead of rushing to catch up
        self._next = max(self._next + self.period, now)
        dt, self._last = now - self._last, now
        return dt


class ManualClock:
    def __init__(self, fps: float = 60.0, start: float = 0.0) -> None:
        self.period = 1.0 / fps
        self._now = start

    def now(self) -> float:
        return self._now

    def tick(self) -> float:
        self._now += self.period
        return self.period
