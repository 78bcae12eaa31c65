"""Cameras and video files through OpenCV, on their own capture thread.

Cables get pulled and files get moved during shows, so this source expects to lose its
input: when opening or reading fails it says so in ``status``, releases the device and
tries again with exponential back-off, and recovers by itself when the input is back.
Video files loop; each loop re-opens the file, so a file that vanished is noticed within
one loop rather than never (an open handle survives a rename or delete).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import cv2
import numpy as np

from engine.sources.base import Source
from engine.sources.pacing import Backoff, Pacer

log = logging.getLogger(__name__)

FALLBACK_FILE_FPS = 30.0  # when a file does not say its frame rate (or says nonsense)
MAX_FILE_FPS = 240.0
CAMERA_READ_FAILURES = 5  # consecutive failed reads before a camera is released and reopened


class CaptureSource(Source):
    """A camera (index or device path) or a looping video file.

    Use ``CaptureSource.camera(...)`` or ``CaptureSource.video_file(...)``. ``backoff`` is
    (first delay, cap) in seconds; the delay doubles after each failed attempt.
    ``watchdog``: with no frame for this many seconds, ``status`` reports the input lost
    even if the thread is stuck inside a driver call and cannot say so itself.
    """

    kind = "capture"

    def __init__(
        self,
        target: int | str | Path,
        *,
        is_file: bool,
        size: tuple[int, int] = (1280, 720),
        fps: float = 30,
        backoff: tuple[float, float] = (0.5, 5.0),
        watchdog: float = 2.0,
    ) -> None:
        if is_file:
            target = Path(target)
            name = f"file:{target.name}"
        elif isinstance(target, int):
            if target < 0:
                raise ValueError(f"camera index must be 0 or more, got {target}")
            name = f"camera:{target}"
        else:
            target = str(target)
            name = f"camera:{target}"
        super().__init__(name)
        self.target = target
        self.is_file = is_file
        self.size = size
        self.target_fps = float(fps)
        self.backoff = Backoff(*backoff)
        self.watchdog = watchdog
        self._note = "starting"

    @classmethod
    def camera(
        cls,
        device: int | str,
        size: tuple[int, int] = (1280, 720),
        fps: float = 30,
        *,
        backoff: tuple[float, float] = (0.5, 5.0),
        watchdog: float = 2.0,
    ) -> CaptureSource:
        """A camera by index (0) or device path (/dev/video2); asks it for ``size`` and ``fps``."""
        return cls(device, is_file=False, size=size, fps=fps, backoff=backoff, watchdog=watchdog)

    @classmethod
    def video_file(
        cls, path: str | Path, *, backoff: tuple[float, float] = (0.5, 5.0), watchdog: float = 2.0
    ) -> CaptureSource:
        """A video file, looped and paced in real time at the file's own frame rate."""
        return cls(path, is_file=True, backoff=backoff, watchdog=watchdog)

    # -- status ----------------------------------------------------------------------
    @property
    def status(self) -> str:
        """One line for the HUD, computed when read so that a stalled thread still shows."""
        if self.problem is not None:
            retry = self.retry_in()
            tail = f" — retry in {retry:.1f} s" if retry is not None else ""
            return f"{self.name} lost ({self.problem}){tail}"
        age = self.frame_age()
        if self.last_frame_time and age > self.watchdog:
            return f"{self.name} lost (no frame for {age:.1f} s)"
        if self.last_frame_time:
            return f"{self.name} ok {self.fps:.0f} fps"
        return f"{self.name} {self._note}"

    @status.setter
    def status(self, text: str) -> None:
        self._note = text

    # -- the capture thread ----------------------------------------------------------
    def _run(self) -> None:
        pacer = Pacer(FALLBACK_FILE_FPS, self._stop)
        while not self._stop.is_set():
            self.status = "opening"
            cap = self._open()
            if cap is None:
                self._wait_to_retry("cannot open")
                continue
            try:
                failure = self._pump(cap, pacer)
            finally:
                cap.release()
            if failure is None:
                continue  # stopped, or a file reached its end and loops by re-opening it
            self._wait_to_retry(failure)

    def _open(self) -> cv2.VideoCapture | None:
        if self.is_file and not Path(self.target).is_file():
            return None  # VideoCapture would also fail, but slower and with a noisy log
        cap = cv2.VideoCapture(str(self.target) if self.is_file else self.target)
        if not cap.isOpened():
            cap.release()
            return None
        if not self.is_file:
            width, height = self.size
            # MJPG lets most USB cameras deliver 720p at 30 fps (raw YUYV often cannot);
            # a camera that lacks it ignores the request
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*"MJPG"))
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
            cap.set(cv2.CAP_PROP_FPS, self.target_fps)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # keep latency at one frame where supported
        return cap

    def _pump(self, cap: cv2.VideoCapture, pacer: Pacer) -> str | None:
        """Read and publish until stopped, end of file or failure.

        Returns the failure reason, or None. A file that ends after giving frames is
        not a failure: the caller re-opens it, which is how it loops.
        """
        if self.is_file:
            pacer.set_fps(_file_fps(cap))
        frames = 0
        failures = 0
        while not self._stop.is_set():
            ok, bgr = cap.read()
            if not ok or bgr is None:
                if self.is_file:
                    return None if frames else "no frames"
                failures += 1
                if failures >= CAMERA_READ_FAILURES:
                    return "read failed"
                if self._stop.wait(0.01):
                    break
                continue
            failures = 0
            frames += 1
            # decode first, then wait: the decode hides inside the frame period, and the
            # re-open at a loop point costs no extra period
            if self.is_file and not pacer.wait():
                break
            self._publish(_to_rgb(bgr))
            if self.problem is not None:
                log.info("%s recovered", self.name)
                self.problem = None
                self.retry_at = 0.0
                self.backoff.reset()
        return None

    def _wait_to_retry(self, reason: str) -> None:
        delay = self.backoff.next_delay()
        if self.problem is None:
            log.warning("%s lost (%s); retrying with back-off", self.name, reason)
        else:
            log.debug("%s still lost (%s); next try in %.1f s", self.name, reason, delay)
        self.problem = reason
        self.retry_at = time.monotonic() + delay
        self._stop.wait(delay)


def _file_fps(cap: cv2.VideoCapture) -> float:
    fps = cap.get(cv2.CAP_PROP_FPS)
    if not math.isfinite(fps) or not 0 < fps <= MAX_FILE_FPS:
        return FALLBACK_FILE_FPS
    return fps


def _to_rgb(bgr: np.ndarray) -> np.ndarray:
    """OpenCV frames are BGR (or grey for some cameras); the engine is RGB everywhere."""
    if bgr.ndim == 2:
        return cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
    if bgr.shape[2] == 4:
        return cv2.cvtColor(bgr, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
