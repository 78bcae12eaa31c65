"""Where frames come from: cameras, video files, still images and the built-in pattern.

``open_source("camera:0")`` turns a command-line spec into a (not yet started) source;
``LiveInput`` wraps it with the explicit fallback policy: whenever the source is lost
(a cable pulled, a file moved) the built-in pattern shows instead, and the source comes
back by itself when it can. The render thread reads ``LiveInput.latest()``, which never
waits.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.params import ParamRegistry
from engine.sources.base import Source
from engine.sources.capture import CaptureSource
from engine.sources.gpu_share import SpoutSource, SyphonSource, platform_refusal
from engine.sources.image import ImageSource
from engine.sources.ndi import NdiSource
from engine.sources.pattern import PatternSource, render_pattern

log = logging.getLogger(__name__)

__all__ = [
    "CaptureSource",
    "ImageSource",
    "LiveInput",
    "NdiSource",
    "PatternSource",
    "Source",
    "SpoutSource",
    "SyphonSource",
    "SourceSpec",
    "SourceSpecError",
    "open_source",
    "parse_source_spec",
    "render_pattern",
]

SPEC_FORMS = "camera:N, camera:/dev/videoN, file:PATH, image:PATH, ndi:NAME, spout:NAME, syphon:NAME, webrtc or pattern"
DEFAULT_CAMERA_DEVICE = Path("/dev/video0")


class SourceSpecError(ValueError):
    """A source spec that cannot work; the message says which part and why."""


@dataclass(frozen=True)
class SourceSpec:
    """A parsed spec: ``kind`` is camera, file, image, ndi, spout, syphon or pattern."""

    kind: str
    target: int | str | None = None  # camera index or device path, a file path, or a sender's name


def parse_source_spec(spec: str) -> SourceSpec:
    """Parse ``camera:0 | camera:/dev/video0 | file:PATH | image:PATH | ndi:NAME | spout:NAME | syphon:NAME | pattern``.

    Files and images must exist now: a typo at start-up is an error to report, not an
    outage to ride out. A camera device path need not exist yet (it may be plugged in
    later, and the fallback covers the wait).
    """
    text = spec.strip()
    if not text:
        raise SourceSpecError(f"empty source spec; expected {SPEC_FORMS}")
    kind, sep, rest = text.partition(":")
    kind = kind.lower()
    if kind == "pattern":
        if rest:
            raise SourceSpecError(f"source spec {spec!r}: 'pattern' takes no argument")
        return SourceSpec("pattern")
    if kind == "camera":
        return SourceSpec("camera", _camera_target(spec, rest))
    if kind in ("file", "image"):
        if not rest.strip():
            raise SourceSpecError(f"source spec {spec!r}: missing path after '{kind}:'")
        path = Path(rest.strip()).expanduser()
        if not path.exists():
            raise SourceSpecError(f"source spec {spec!r}: {path} does not exist")
        if not path.is_file():
            raise SourceSpecError(f"source spec {spec!r}: {path} is not a file")
        return SourceSpec(kind, str(path))
    if kind == "webrtc":
        if rest:
            raise SourceSpecError(f"source spec {spec!r}: 'webrtc' takes no argument (browsers open /camera)")
        if importlib.util.find_spec("aiortc") is None:
            raise SourceSpecError(f"source spec {spec!r}: WebRTC needs aiortc (pip install 'dreamdeck[webrtc]')")
        return SourceSpec("webrtc")
    if kind in ("ndi", "spout", "syphon"):
        return SourceSpec(kind, _sender_target(spec, kind, rest))
    if not sep:
        raise SourceSpecError(f"unknown source {spec!r}; expected {SPEC_FORMS}")
    raise SourceSpecError(f"unknown source kind {kind!r} in {spec!r}; expected {SPEC_FORMS}")


def _camera_target(spec: str, rest: str) -> int | str:
    rest = rest.strip()
    if not rest:
        raise SourceSpecError(f"source spec {spec!r}: missing camera index or device after 'camera:'")
    if rest.startswith("/"):
        return rest
    try:
        index = int(rest)
    except ValueError:
        raise SourceSpecError(
            f"source spec {spec!r}: camera must be an index (0, 1, ...) or a device path (/dev/video0), got {rest!r}"
        ) from None
    if index < 0:
        raise SourceSpecError(f"source spec {spec!r}: camera index must be 0 or more, got {index}")
    return index


def _sender_target(spec: str, kind: str, rest: str) -> str:
    """Another app's sender: refused now, in one line, where it can never work (platform, package)."""
    name = rest.strip()
    if kind == "ndi":
        if not name:
            raise SourceSpecError(f"source spec {spec!r}: missing the NDI sender's name (or part of it) after 'ndi:'")
        if importlib.util.find_spec("cyndilib") is None:
            raise SourceSpecError(f"source spec {spec!r}: NDI needs cyndilib (pip install 'dreamdeck[ndi]')")
        return name
    refusal = platform_refusal(kind)
    if refusal is not None:
        raise SourceSpecError(f"source spec {spec!r}: {refusal}")
    return name


def open_source(
    spec: str | None, params: ParamRegistry | None = None, size: tuple[int, int] = (1280, 720), fps: float = 30
) -> Source:
    """Build the source a spec names (not started). ``None``: the first camera, else the pattern.

    ``size`` and ``fps`` are what cameras are asked for and what the pattern renders;
    files and images keep their own. Raises SourceSpecError for a bad spec.
    """
    if spec is None:
        return _default_source(params, size, fps)
    parsed = parse_source_spec(spec)
    if parsed.kind == "camera":
        assert parsed.target is not None
        return CaptureSource.camera(parsed.target, size, fps)
    if parsed.kind == "file":
        assert parsed.target is not None
        return CaptureSource.video_file(parsed.target)
    if parsed.kind == "image":
        assert parsed.target is not None
        return ImageSource(parsed.target)
    if parsed.kind in ("ndi", "spout", "syphon"):
        return _RECEIVERS[parsed.kind](str(parsed.target))
    if parsed.kind == "webrtc":
        from engine.sources.webrtc import WebRtcSource

        return WebRtcSource()
    return PatternSource(size, fps, params)


_RECEIVERS: dict[str, type[Source]] = {"ndi": NdiSource, "spout": SpoutSource, "syphon": SyphonSource}


def _default_source(params: ParamRegistry | None, size: tuple[int, int], fps: float) -> Source:
    # probing a camera index that has no device can take a while on some backends, so
    # only probe when the device node is there
    if DEFAULT_CAMERA_DEVICE.exists():
        import cv2  # only needed for the probe

        probe = cv2.VideoCapture(0)
        opened = probe.isOpened()
        probe.release()
        if opened:
            log.info("no source given: using camera 0")
            return CaptureSource.camera(0, size, fps)
        log.info("no source given and camera 0 does not open: using the built-in pattern")
    else:
        log.info("no source given and no camera found: using the built-in pattern")
    return PatternSource(size, fps, params)


class LiveInput:
    """A primary source with the built-in pattern as an explicit fallback.

    Policy: while the primary is lost (it reports a problem, or has had no frame for
    ``max_age`` seconds, or has not delivered its first frame yet), ``latest()`` returns
    pattern frames; the pattern thread starts the first time it is needed and idles
    (paused) while the primary is fine. A primary that is itself the pattern has no fallback.
    """

    def __init__(
        self,
        primary: Source,
        *,
        fallback_size: tuple[int, int] = (1280, 720),
        fps: float = 30,
        params: ParamRegistry | None = None,
        max_age: float = 2.0,
    ) -> None:
        self.primary = primary
        self.max_age = max_age
        self._fallback_size = fallback_size
        self._fps = fps
        self._params = params
        self._has_fallback = not isinstance(primary, PatternSource)
        self.fallback: PatternSource | None = None  # created when first needed
        self._lock = threading.Lock()  # latest() may be called by the render thread and the scene worker
        self._running = False
        self._key = 0
        self._origin: tuple[bool, int] | None = None  # (from fallback?, slot sequence) of the frame last returned
        self._last_frame: np.ndarray | None = None

    def start(self) -> LiveInput:
        self.primary.start()
        self._running = True
        return self

    def stop(self, timeout: float = 2.0) -> None:
        with self._lock:
            self._running = False
        self.primary.stop(timeout)
        if self.fallback is not None:
            self.fallback.stop(timeout)

    def __enter__(self) -> LiveInput:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def fallback_active(self) -> bool:
        return self._has_fallback and not self._primary_fine()

    def _primary_fine(self) -> bool:
        return self.primary.problem is None and self.primary.healthy(self.max_age)

    def latest(self) -> tuple[np.ndarray | None, int, bool]:
        """(frame, key, fallback_active), never waiting.

        ``key`` changes whenever the frame returned changes, including a switch between
        primary and fallback, so a caller uploads a texture only when the key moved.
        While the pattern's first frame is on its way, the last frame is returned again.
        """
        with self._lock:
            use_fallback = self.fallback_active
            if not use_fallback:
                frame, seq = self.primary.slot.latest()
                if self.fallback is not None:
                    self.fallback.pause()
            else:
                fallback = self._wake_fallback()
                frame, seq = fallback.slot.latest() if fallback is not None else (None, 0)
                if frame is None:
                    return self._last_frame, self._key, True
            if frame is None:
                return None, self._key, use_fallback
            origin = (use_fallback, seq)
            if origin != self._origin:
                if self._origin is not None and self._origin[0] != use_fallback:
                    self._log_switch(use_fallback)
                self._origin = origin
                self._key += 1
                self._last_frame = frame
            return frame, self._key, use_fallback

    def _wake_fallback(self) -> PatternSource | None:
        if not self._running:
            return self.fallback
        if self.fallback is None:
            self.fallback = PatternSource(self._fallback_size, self._fps, self._params)
        if not self.fallback.running:
            self.fallback.start()
        self.fallback.resume()
        return self.fallback

    def _log_switch(self, to_fallback: bool) -> None:
        if to_fallback:
            log.warning("fallback: %s", self.status)
        else:
            log.info("%s delivers frames: leaving the built-in pattern", self.primary.name)

    @property
    def status(self) -> str:
        """One line for the HUD, e.g. ``file:x.mp4 lost (cannot open) — showing pattern, retry in 2.0 s``."""
        primary = self.primary
        if not self.fallback_active:
            return primary.status
        if primary.problem is not None:
            why = f"lost ({primary.problem})"
        elif not primary.last_frame_time:
            why = "starting"
        else:
            why = f"lost (no frame for {primary.frame_age():.1f} s)"
        retry = primary.retry_in()
        tail = f", retry in {retry:.1f} s" if retry is not None else ""
        return f"{primary.name} {why} — showing pattern{tail}"
