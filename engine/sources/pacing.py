"""Timing for source threads: real-time pacing and reconnect back-off.

Both wait on the source's stop Event rather than sleeping, so ``stop()`` returns at once
even in the middle of a 5 s back-off.
"""

from __future__ import annotations

import threading
import time


class Pacer:
    """Deadline-based frame pacing: frame k is due at start + k * period, so waits never drift.

    A thread that falls more than a frame behind starts afresh from now instead of rushing
    through the frames it missed (the same policy as ``engine.clock.RealClock``).
    """

    def __init__(self, fps: float, stop: threading.Event) -> None:
        self._stop = stop
        self.period = 1.0 / fps
        self._next = time.monotonic()

    def set_fps(self, fps: float) -> None:
        if fps <= 0:
            raise ValueError("fps must be positive")
        self.period = 1.0 / fps

    def wait(self) -> bool:
        """Wait until the next frame is due; False if the stop Event was set meanwhile."""
        delay = self._next - time.monotonic()
        if delay > 0 and self._stop.wait(delay):
            return False
        self._next = max(self._next + self.period, time.monotonic())
        return not self._stop.is_set()


class Backoff:
    """Reconnect delays: ``first``, doubling each failure, capped at ``cap`` seconds."""

    def __init__(self, first: float = 0.5, cap: float = 5.0) -> None:
        if not 0 < first <= cap:
            raise ValueError(f"back-off needs 0 < first <= cap, got first={first} cap={cap}")
        self.first = first
        self.cap = cap
        self._delay = first

    def next_delay(self) -> float:
        """The delay to wait now; the one after it is twice as long (up to the cap)."""
        delay = self._delay
        self._delay = min(self._delay * 2.0, self.cap)
        return delay

    def reset(self) -> None:
        self._delay = self.first
