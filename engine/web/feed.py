"""What the status page shows, taken from the render thread without slowing it down.

``StatusFeed`` is an Output. About twice a second (by the show's clock) it queues an
asynchronous readback of the output frame and keeps that frame's ``ShowStatus`` (a
frozen snapshot the App made anyway); on the next frame it fetches the pixels, whose
copy has finished by then, and hands both over, newest only; that is all the render
thread does. An encoder thread downscales and JPEG-encodes the frame with OpenCV, turns
the status into JSON and reads the accelerator's memory, and the web server's threads
only ever read the finished bytes and a finished dict.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from engine.outputs.readback import Pixels, Readback
from engine.status import RenderedFrame, ShowStatus

log = logging.getLogger(__name__)

INTERVAL_S = 0.5
THUMB_WIDTH = 320
JPEG_QUALITY = 70
STALE_AFTER_S = 5.0  # a snapshot older than this means the frame loop is not running
RECENT_ERRORS = 5
THUMB_BUFFERS = 3  # host frames: one being encoded, one waiting for the encoder, one to read into
MB = 1024 * 1024


def accelerator_memory() -> dict[str, Any] | None:
    """CUDA memory this process holds, per device and summed; None where it holds none.

    Policy: ask only when torch is already imported and CUDA already initialised by this
    process, and only about devices where its allocator has reserved memory. Importing
    torch here would cost seconds and hundreds of MB, and asking a device this process
    never used would create a CUDA context on it (hundreds of MB of GPU memory) just to
    report that nothing was in use.
    """
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    if cuda is None:
        return None
    try:
        if not cuda.is_available() or not cuda.is_initialized():
            return None
        devices = []
        for index in range(cuda.device_count()):
            reserved = cuda.memory_reserved(index)
            if not reserved:
                continue
            free, total = cuda.mem_get_info(index)
            devices.append(
                {
                    "index": index,
                    "name": str(cuda.get_device_name(index)),
                    "allocated_mb": round(cuda.memory_allocated(index) / MB, 1),
                    "reserved_mb": round(reserved / MB, 1),
                    "free_mb": round(free / MB, 1),
                    "total_mb": round(total / MB, 1),
                }
            )
    except RuntimeError as exc:  # a device in a bad state says so; the page shows it
        return {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
    if not devices:
        return None
    return {
        "allocated_mb": round(sum(d["allocated_mb"] for d in devices), 1),
        "reserved_mb": round(sum(d["reserved_mb"] for d in devices), 1),
        "total_mb": round(sum(d["total_mb"] for d in devices), 1),
        "devices": devices,
    }


def collect_health(status: ShowStatus, started: float) -> dict[str, Any]:
    """A frame's ShowStatus as plain JSON values: the body of /health, less what the
    encoder thread adds (``accelerator``) and what ``health()`` adds (``ok``, ``state``, age)."""
    last = status.last_change
    return {
        "frames": status.frame,
        "fps": round(status.fps, 2),
        "frame_ms": round(status.frame_ms, 2),
        "longest_frame_ms": round(status.longest_frame_ms, 2),
        "scene": status.scene,
        "scene_status": status.scene_status,  # e.g. "NVIDIA H200 (float16) compile"
        "scene_backend": status.scene_backend,
        "scene_warning": status.scene_warning,
        "scene_selected": status.scene_selected,
        "scene_loading": status.loading,
        "scene_preloading": status.preloading,
        "scene_fps": round(status.scene_fps, 2),
        "scenes_loaded": list(status.loaded),
        "scene_memory_mb": {"loaded": status.loaded_mb, "budget": status.memory_budget_mb},
        "preset": status.preset,
        "uptime_s": round(time.monotonic() - started, 1),
        "dropped_frames": {"source": status.dropped_source, "scene": status.dropped_scene},
        "source": status.source,
        "source_fallback": status.source_fallback,
        "last_control": None
        if last is None
        else {"path": last.path, "value": _plain(last.value), "origin": last.origin},
        "errors": list(status.errors),
        "recent_errors": [{"time": t, "message": m} for t, m in status.recent_errors[-RECENT_ERRORS:]],
        "controls": {part.name: part.status for part in status.controls},
        "outputs": {part.name: part.status for part in status.outputs},
        "rss_mb": status.rss_mb,
    }


def _plain(value: Any) -> Any:
    """A parameter value as JSON has it (colours are tuples; anything odd becomes its text)."""
    if isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    if isinstance(value, tuple) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value):
        return list(value)
    return str(value)


def encode_thumbnail(image: np.ndarray, width: int = THUMB_WIDTH, quality: int = JPEG_QUALITY) -> bytes:
    """Downscale (area filter: no aliasing) and JPEG-encode an RGB or RGBA frame, top row first."""
    h, w = image.shape[:2]
    if w > width:
        image = cv2.resize(image, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGBA2BGR if image.shape[2] == 4 else cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("OpenCV could not encode the thumbnail as JPEG")
    return data.tobytes()


@dataclass
class _Handover:
    """One due frame for the encoder: its pixels (None: no host buffer was free) and status."""

    readback: Readback  # the pixels' buffer goes back to this one's pool
    pixels: Pixels | None
    status: ShowStatus
    taken: float  # time.monotonic() when the frame was due

    def free(self) -> None:
        if self.pixels is not None:
            self.readback.give_back(self.pixels)
            self.pixels = None


class StatusFeed:
    """Output: hands a frame and its status to an encoder thread ~2x a second.

    The frame comes through the outputs' asynchronous readback (engine/outputs/readback.py):
    the render thread queues a GPU copy on a due frame and fetches it on the next one,
    when the copy has long finished, so it never waits for the GPU. The thumbnail is thus
    one frame late, and a due frame that finds every host buffer still in use goes
    without a new picture (its status still goes).
    """

    name = "status feed"

    def __init__(
        self,
        interval_s: float = INTERVAL_S,
        width: int = THUMB_WIDTH,
        quality: int = JPEG_QUALITY,
        stale_after_s: float = STALE_AFTER_S,
    ) -> None:
        if interval_s <= 0 or width < 16 or not 1 <= quality <= 100:
            raise ValueError("interval_s > 0, width >= 16 and quality 1..100 please")
        self.interval_s = interval_s
        self.width = width
        self.quality = quality
        self.stale_after_s = stale_after_s
        self.started = time.monotonic()
        self._readback: Readback | None = None
        self._asked: tuple[ShowStatus, float] | None = None  # the frame whose pixels are on their way
        self._cond = threading.Condition()
        self._handover: _Handover | None = None  # newest only
        self._stopping = False
        self._lock = threading.Lock()
        self._jpeg: bytes | None = None
        self._jpeg_frame = 0  # the frame number the thumbnail shows
        self._health: dict[str, Any] | None = None
        self._taken = 0.0  # time.monotonic() of the newest snapshot
        self._next = float("-inf")
        self._thread: threading.Thread | None = None
        self._failing: str | None = None
        self.encoded = 0

    # -- render thread -------------------------------------------------------------------
    def after_render(self, frame: RenderedFrame) -> None:
        try:
            if self._readback is None or self._readback.size != frame.size:
                self._release_readback()
                self._readback = Readback(frame.ctx, frame.size, buffers=THUMB_BUFFERS)
            if self._asked is not None:  # the due frame before this one: its copy has finished
                asked, self._asked = self._asked, None
                self._hand(self._readback.collect(), *asked)
            if frame.time >= self._next:
                self._next = frame.time + self.interval_s
                self._readback.request(frame.texture, frame.number)  # only a queued GPU copy
                self._asked = (frame.status, time.monotonic())
        except Exception as exc:  # a view must not stop the show: logged once per kind of failure
            self._note_failure(f"status snapshot failed: {type(exc).__name__}: {exc}")

    def _hand(self, pixels: Pixels | None, status: ShowStatus, taken: float) -> None:
        """To the encoder; a handover it has not taken yet is replaced and its buffer freed."""
        assert self._readback is not None
        with self._cond:
            replaced, self._handover = self._handover, _Handover(self._readback, pixels, status, taken)
            self._cond.notify()
        if replaced is not None:
            replaced.free()

    def _release_readback(self) -> None:
        if self._readback is not None:
            self._readback.release()
            self._readback = None
            self._asked = None

    # -- encoder thread ------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="status encoder", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the encoder (and free the readback: call it on the render thread, like the App does)."""
        with self._cond:
            self._stopping = True
            left, self._handover = self._handover, None
            self._cond.notify()
        if left is not None:
            left.free()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        self._release_readback()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._handover is not None or self._stopping)
                if self._stopping:
                    return
                item, self._handover = self._handover, None
            assert item is not None
            jpeg = None
            if item.pixels is not None:
                try:
                    w, h = item.pixels.size
                    rgba = np.frombuffer(item.pixels.data, np.uint8).reshape(h, w, 4)
                    jpeg = encode_thumbnail(rgba, self.width, self.quality)
                except (cv2.error, ValueError) as exc:
                    self._note_failure(f"thumbnail not encoded: {exc}")
                finally:
                    item.free()
            health = {**collect_health(item.status, self.started), "accelerator": accelerator_memory()}
            with self._lock:
                if jpeg is not None:
                    self._jpeg = jpeg
                    self._jpeg_frame = item.status.frame
                    self.encoded += 1
                self._health = health
                self._taken = item.taken

    def _note_failure(self, message: str) -> None:
        if message != self._failing:
            log.error("%s", message)
            self._failing = message

    # -- web threads ---------------------------------------------------------------------
    @property
    def status(self) -> str:
        return self._failing or ""  # the HUD lists only parts with something to say

    def latest_jpeg(self) -> bytes | None:
        with self._lock:
            return self._jpeg

    def health(self) -> dict[str, Any]:
        """The newest snapshot, with its age and ``ok`` (False when the frame loop has stalled)."""
        with self._lock:
            health, taken, thumbnail_frame = self._health, self._taken, self._jpeg_frame
        if health is None:
            return {
                "ok": False,
                "state": "starting: no frame rendered yet",
                "frames": 0,
                "uptime_s": round(time.monotonic() - self.started, 1),
                "accelerator": accelerator_memory(),
            }
        age = time.monotonic() - taken
        stalled = age > self.stale_after_s
        return {
            "ok": not stalled,
            "state": f"stalled: no frame for {age:.0f} s" if stalled else "running",
            "snapshot_age_s": round(age, 2),
            "thumbnail_frame": thumbnail_frame,
            **health,
        }
