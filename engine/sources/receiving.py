"""What the sources that receive from another app share: NDI, Spout, Syphon, WebRTC.

Another app's sender comes and goes (it is restarted, its machine sleeps, its window is
closed), changes resolution when its user changes a setting, and may send a pixel format
or size we cannot use. So a receiving source, like a camera, expects to lose its input:
it says why in ``status``, waits with back-off and looks for the sender again, by itself;
a frame it cannot use is dropped with one log line (not one per frame) and the reason
shown in the status, while the fallback pattern plays.
"""

from __future__ import annotations

import logging
import time

import cv2
import numpy as np

from engine.sources.base import Source
from engine.sources.pacing import Backoff

log = logging.getLogger(__name__)

MIN_SIDE, MAX_SIDE = 2, 8192  # frames outside this are refused: nothing downstream expects them


class FrameRefused(ValueError):
    """A frame the engine cannot use; the message is the one line the status shows."""


class ReceivingSource(Source):
    """A source fed by a sender in another app or on another machine.

    Subclasses implement ``_run``; they call ``_accept`` with each converted frame,
    ``_refuse`` with a frame they cannot use, and ``_wait_to_retry`` when the sender is gone.
    ``watchdog``: with no frame for this many seconds the status says the input is lost.
    """

    kind = "receiver"

    def __init__(self, name: str, *, backoff: tuple[float, float] = (0.5, 5.0), watchdog: float = 2.0) -> None:
        super().__init__(name)
        self.backoff = Backoff(*backoff)
        self.watchdog = watchdog
        self.size: tuple[int, int] | None = None  # the sender's resolution, as last received
        self.refused: str | None = None  # why the latest frame was dropped (None: it was used)
        self._note = "starting"

    @property
    def status(self) -> str:
        """One line for the HUD and /health, computed when read so that a stalled thread still shows."""
        if self.problem is not None:
            retry = self.retry_in()
            tail = f" — retry in {retry:.1f} s" if retry is not None else ""
            return f"{self.name} lost ({self.problem}){tail}"
        if self.refused is not None:
            return f"{self.name} refused: {self.refused}"
        age = self.frame_age()
        if self.last_frame_time and age > self.watchdog:
            return f"{self.name} lost (no frame for {age:.1f} s)"
        if self.last_frame_time and self.size is not None:
            return f"{self.name} ok {self.size[0]}x{self.size[1]} {self.fps:.0f} fps"
        return f"{self.name} {self._note}"

    @status.setter
    def status(self, text: str) -> None:
        self._note = text

    def _accept(self, rgb: np.ndarray) -> None:
        height, width = rgb.shape[:2]
        if self.size is not None and self.size != (width, height):
            log.info("%s: the sender changed resolution %dx%d -> %dx%d", self.name, *self.size, width, height)
        self.size = (width, height)
        if self.refused is not None:
            log.info("%s: frames usable again", self.name)
            self.refused = None
        self._publish(rgb)
        if self.problem is not None:
            log.info("%s recovered", self.name)
            self.problem = None
            self.retry_at = 0.0
            self.backoff.reset()

    def _refuse(self, reason: str) -> None:
        if reason != self.refused:
            log.warning("%s: frame dropped: %s (the show plays on)", self.name, reason)
        self.refused = reason

    def _wait_to_retry(self, reason: str) -> None:
        delay = self.backoff.next_delay()
        if self.problem != reason:
            log.warning("%s lost (%s); looking for it again with back-off", self.name, reason)
        self.problem = reason
        self.retry_at = time.monotonic() + delay
        self._stop.wait(delay)


def check_size(width: int, height: int) -> None:
    """Refuse a resolution nothing downstream can use (FrameRefused)."""
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise FrameRefused(f"resolution {width}x{height} is outside {MIN_SIDE}..{MAX_SIDE} pixels a side")


def packed_to_rgb(data: np.ndarray, width: int, height: int, stride: int, fourcc: str) -> np.ndarray:
    """One received frame (bytes, ``stride`` bytes a row) as an RGB (height, width, 3) uint8 array.

    Knows the packed formats senders use (RGBA/RGBX, BGRA/BGRX, UYVY); anything else is
    refused with the format's name. The result is a new array: the receive buffer is reused.
    """
    check_size(width, height)
    fourcc = fourcc.upper()
    bytes_per_pixel = 2 if fourcc == "UYVY" else 4
    if fourcc not in ("RGBA", "RGBX", "BGRA", "BGRX", "UYVY"):
        raise FrameRefused(f"pixel format {fourcc} is not one we read (RGBA, BGRA or UYVY)")
    if stride < width * bytes_per_pixel or data.size < stride * height:
        raise FrameRefused(f"{fourcc} frame {width}x{height}: {data.size} bytes is too short")
    rows = data[: stride * height].reshape(height, stride)[:, : width * bytes_per_pixel]
    if fourcc == "UYVY":
        return cv2.cvtColor(rows.reshape(height, width, 2), cv2.COLOR_YUV2RGB_UYVY)
    pixels = rows.reshape(height, width, 4)
    if fourcc.startswith("BGR"):
        return cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGB)
    return np.ascontiguousarray(pixels[:, :, :3])
