"""What every source is: a thread that puts RGB frames into a newest-value slot.

Frames are ``numpy.uint8`` arrays of shape (height, width, 3), RGB, row 0 at the top.
The render thread and the scene worker read ``source.slot`` and never wait on it.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from engine.slots import NewestSlot

log = logging.getLogger(__name__)


class Source:
    """Base class. Subclasses implement ``_run`` (the capture loop) and set ``status``."""

    kind = "source"

    def __init__(self, name: str) -> None:
        self.name = name  # what the HUD shows, e.g. "camera:0" or "file:clip.mp4"
        self.slot: NewestSlot[np.ndarray] = NewestSlot()
        self.status = "starting"  # one short line for the HUD
        self.last_frame_time = 0.0  # time.monotonic() of the newest frame, 0 if none yet
        self.fps = 0.0  # measured frame rate, smoothed, for the HUD
        self.problem: str | None = None  # why frames are not coming ("cannot open"); None while fine
        self.retry_at = 0.0  # time.monotonic() of the next reconnect try; 0 when none is pending
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Source:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"source {self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                # stuck inside a driver call (a camera open can block); being a daemon thread,
                # it ends once the call returns, and ``running`` tells the truth until then
                log.warning("%s: capture thread did not stop within %.1f s", self.name, timeout)
            else:
                self._thread = None

    @property
    def running(self) -> bool:
        """True while the capture thread is alive (also after a stop() it could not finish)."""
        return self._thread is not None and self._thread.is_alive()

    def retry_in(self) -> float | None:
        """Seconds until the next reconnect try, or None when no retry is pending."""
        if self.problem is None or not self.retry_at:
            return None
        return max(0.0, self.retry_at - time.monotonic())

    def frame_age(self) -> float:
        """Seconds since the newest frame arrived (infinity before the first)."""
        return time.monotonic() - self.last_frame_time if self.last_frame_time else float("inf")

    def healthy(self, max_age: float) -> bool:
        return self.frame_age() <= max_age

    def _publish(self, frame: np.ndarray) -> None:
        now = time.monotonic()
        if self.last_frame_time:
            interval = now - self.last_frame_time
            if interval > 0:
                # smoothed over ~10 frames so the HUD figure is readable, yet follows changes
                rate = 1.0 / interval
                self.fps = rate if self.fps == 0.0 else 0.9 * self.fps + 0.1 * rate
        self.slot.put(frame)
        self.last_frame_time = now

    def _run(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
