"""A still image as a source: read once, re-published, reloaded when the file changes.

The image is re-published a few times a second (not only once) so that its frame age
stays small: to the rest of the engine a still image is a healthy live source. Editing
or replacing the file swaps the picture within half a second, which lets an artist
update a gallery piece by copying a file. A missing or unreadable file publishes
nothing, so ``LiveInput`` falls back to the pattern, and is retried with back-off.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import cv2
import numpy as np

from engine.sources.base import Source
from engine.sources.pacing import Backoff, Pacer

log = logging.getLogger(__name__)

REPUBLISH_FPS = 2.0

_Stamp = tuple[int, int, int]  # (inode, size, mtime in ns): any change means reload


class ImageSource(Source):
    """A still image file (anything ``cv2.imread`` reads), published as RGB."""

    kind = "image"

    def __init__(self, path: str | Path, *, backoff: tuple[float, float] = (0.5, 5.0)) -> None:
        self.path = Path(path)
        super().__init__(f"image:{self.path.name}")
        self.backoff = Backoff(*backoff)
        self.loads = 0  # how many times the file was (re)read successfully

    def _run(self) -> None:
        pacer = Pacer(REPUBLISH_FPS, self._stop)
        frame: np.ndarray | None = None
        stamp: _Stamp | None = None
        while pacer.wait():
            current = _stamp(self.path)
            if current is None:
                frame, stamp = None, None
                self._wait_to_retry("cannot read")
                continue
            if current != stamp:
                frame = _read_rgb(self.path)
                if frame is None:
                    self._wait_to_retry("cannot read")
                    continue
                stamp = current
                self.loads += 1
                if self.problem is not None:
                    log.info("%s readable again", self.name)
                elif self.loads > 1:
                    log.info("%s changed on disk; reloaded", self.name)
                self.problem, self.retry_at = None, 0.0
                self.backoff.reset()
                height, width = frame.shape[:2]
                self.status = f"{self.name} ok {width}x{height}"
            self._publish(frame)

    def _wait_to_retry(self, reason: str) -> None:
        delay = self.backoff.next_delay()
        if self.problem is None:
            log.warning("%s %s (%s); retrying with back-off", self.name, reason, self.path)
        self.problem = reason
        self.retry_at = time.monotonic() + delay
        self.status = f"{self.name} {reason} — retry in {delay:.1f} s"
        self._stop.wait(delay)


def _stamp(path: Path) -> _Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _read_rgb(path: Path) -> np.ndarray | None:
    """The image as a read-only RGB array (it is published many times), or None."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        return None
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    rgb.setflags(write=False)
    return rgb
