"""What the status page shows, taken from the render thread without slowing it down.

``StatusFeed`` is an Output. About twice a second (by the app's clock) the render thread
reads the output frame back and collects the status numbers, both of which belong to
it, and hands them over in a newest-value slot; that is all it does. An encoder thread
downscales and JPEG-encodes the frame with OpenCV and reads the accelerator's memory,
and the web server's threads only ever read the finished bytes and a finished dict.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

import cv2
import numpy as np

from engine.slots import NewestSlot

log = logging.getLogger(__name__)

INTERVAL_S = 0.5
THUMB_WIDTH = 320
JPEG_QUALITY = 70
STALE_AFTER_S = 5.0  # a snapshot older than this means the frame loop is not running
RECENT_ERRORS = 5
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
            devices.append({"index": index, "name": str(cuda.get_device_name(index)),
                            "allocated_mb": round(cuda.memory_allocated(index) / MB, 1),
                            "reserved_mb": round(reserved / MB, 1), "free_mb": round(free / MB, 1),
                            "total_mb": round(total / MB, 1)})
    except RuntimeError as exc:  # a device in a bad state says so; the page shows it
        return {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
    if not devices:
        return None
    return {"allocated_mb": round(sum(d["allocated_mb"] for d in devices), 1),
            "reserved_mb": round(sum(d["reserved_mb"] for d in devices), 1),
            "total_mb": round(sum(d["total_mb"] for d in devices), 1), "devices": devices}


def collect_health(app: Any, started: float) -> dict[str, Any]:
    """The app's state as plain JSON values (render thread: the state is its own)."""
    stats = app.stats
    worker = app.worker
    return {
        "frames": stats.frames,
        "fps": round(stats.render_fps, 2),
        "frame_ms": round(stats.frame_ms, 2),
        "scene": worker.active_name,
        "scene_status": worker.active.status if worker.active is not None else "",  # e.g. "cuda (float16) compile"
        "scene_selected": app.params.get("/scene/active"),
        "scene_loading": worker.loading,
        "scene_fps": round(worker.fps, 2),
        "preset": app.preset_name,
        "uptime_s": round(time.monotonic() - started, 1),
        "dropped_frames": {"source": app.input.primary.slot.drops, "scene": worker.output.drops},
        "source": app.input.status,
        "source_fallback": bool(app.input.fallback_active),
        "errors": list(app.errors_now()),
        "recent_errors": [{"time": t, "message": m} for t, m in list(stats.errors)[-RECENT_ERRORS:]],
        "controls": {c.name: str(c.status) for c in app.controls},
        "outputs": {o.name: str(o.status) for o in app.outputs},
    }


def encode_thumbnail(rgb: np.ndarray, width: int = THUMB_WIDTH, quality: int = JPEG_QUALITY) -> bytes:
    """Downscale (area filter: no aliasing) and JPEG-encode an RGB frame."""
    h, w = rgb.shape[:2]
    if w > width:
        rgb = cv2.resize(rgb, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("OpenCV could not encode the thumbnail as JPEG")
    return data.tobytes()


class StatusFeed:
    """Output: hands a frame and the status to an encoder thread ~2x a second."""

    name = "status feed"

    def __init__(self, interval_s: float = INTERVAL_S, width: int = THUMB_WIDTH,
                 quality: int = JPEG_QUALITY, stale_after_s: float = STALE_AFTER_S) -> None:
        if interval_s <= 0 or width < 16 or not 1 <= quality <= 100:
            raise ValueError("interval_s > 0, width >= 16 and quality 1..100 please")
        self.interval_s = interval_s
        self.width = width
        self.quality = quality
        self.stale_after_s = stale_after_s
        self.started = time.monotonic()
        self._handover: NewestSlot[tuple[np.ndarray | None, dict[str, Any], float]] = NewestSlot()
        self._lock = threading.Lock()
        self._jpeg: bytes | None = None
        self._health: dict[str, Any] | None = None
        self._taken = 0.0  # time.monotonic() of the newest snapshot
        self._next = float("-inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing: str | None = None
        self.encoded = 0

    # -- render thread -------------------------------------------------------------------
    def after_render(self, app: Any, now: float) -> None:
        if now < self._next:
            return
        self._next = now + self.interval_s
        try:
            pixels = app.compositor.read_output()
            health = collect_health(app, self.started)
        except Exception as exc:  # a view must not stop the show: logged once per kind of failure
            self._note_failure(f"status snapshot failed: {type(exc).__name__}: {exc}")
            return
        self._handover.put((pixels, health, time.monotonic()))

    # -- encoder thread ------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="status encoder", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._handover.put((None, {}, 0.0))  # wakes the encoder
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None

    def _run(self) -> None:
        seq = 0
        while not self._stop.is_set():
            item, seq = self._handover.wait_newer(seq, timeout=1.0)
            if item is None or self._stop.is_set():
                continue
            pixels, health, taken = item
            try:
                jpeg = encode_thumbnail(pixels, self.width, self.quality)
            except (cv2.error, ValueError) as exc:
                self._note_failure(f"thumbnail not encoded: {exc}")
                jpeg = None
            health = {**health, "accelerator": accelerator_memory()}
            with self._lock:
                if jpeg is not None:
                    self._jpeg = jpeg
                    self.encoded += 1
                self._health = health
                self._taken = taken

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
            health, taken = self._health, self._taken
        if health is None:
            return {"ok": False, "state": "starting: no frame rendered yet", "frames": 0,
                    "uptime_s": round(time.monotonic() - self.started, 1), "accelerator": accelerator_memory()}
        age = time.monotonic() - taken
        stalled = age > self.stale_after_s
        return {"ok": not stalled, "state": f"stalled: no frame for {age:.0f} s" if stalled else "running",
                "snapshot_age_s": round(age, 2), **health}
