"""A built-in animated pattern: the source that needs no camera and no file.

It is what the engine shows when nothing else is plugged in, and what ``LiveInput`` falls
back to when a camera or file is lost, so the show never goes black. It is interfering
sine plasma plus rings from a wandering centre, mapped through a drifting colour table.

The cost is kept low (a few ms for 640x360) by computing every wave that depends on one
axis only on a single row or column and broadcasting, and by colouring through a 256-entry
lookup table instead of three full-frame sines.
"""

from __future__ import annotations

import math
import time
from functools import lru_cache

import numpy as np

from engine.params import Param, ParamRegistry, float_param
from engine.sources.base import Source
from engine.sources.pacing import Pacer

_RAMP = np.linspace(0.0, 2.0 * np.pi, 256, dtype=np.float32)
_PHASES = (0.0, 2.0 * np.pi / 3.0, 4.0 * np.pi / 3.0)  # red, green, blue a third of a turn apart
MAX_STEP = 0.25  # seconds of animation per frame at most, so a stalled thread does not jump


@lru_cache(maxsize=8)
def _axes(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of columns and rows: y in [-1, 1], x scaled by the aspect ratio (round rings)."""
    aspect = width / height
    x = np.linspace(-aspect, aspect, width, dtype=np.float32)
    y = np.linspace(-1.0, 1.0, height, dtype=np.float32)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def render_pattern(t: float, width: int, height: int, speed: float = 1.0, scale: float = 1.0) -> np.ndarray:
    """One frame of the pattern at time ``t`` seconds: RGB uint8, shape (height, width, 3).

    Pure and deterministic. The animation phase is ``t * speed``; a thread whose speed
    changes while it runs should integrate the phase itself and pass ``speed=1``, so that
    turning the speed knob does not make the picture jump. ``scale`` > 1 zooms in.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"pattern size must be positive, got {width}x{height}")
    if scale <= 0:
        raise ValueError(f"pattern scale must be positive, got {scale}")
    x, y = _axes(width, height)
    p = float(t) * float(speed)
    k = 1.0 / float(scale)

    # 1. plasma: one wave along x and one along y, each computed on one row or column
    wave_x = np.sin(x * np.float32(3.0 * k) + np.float32(p))
    wave_y = np.sin(y * np.float32(4.0 * k) - np.float32(1.3 * p))
    v = wave_x[None, :] + wave_y[:, None]

    # 2. a diagonal wave whose direction turns slowly
    angle = 0.25 * p
    diag = (x * np.float32(5.0 * k * math.cos(angle)))[None, :] + (y * np.float32(5.0 * k * math.sin(angle)))[:, None]
    diag += np.float32(0.7 * p)
    v += np.sin(diag, out=diag)

    # 3. rings spreading from a centre that wanders on a Lissajous path
    cx = 0.8 * (width / height) * math.sin(0.37 * p)
    cy = 0.6 * math.cos(0.51 * p)
    rings = ((x - np.float32(cx)) ** 2)[None, :] + ((y - np.float32(cy)) ** 2)[:, None]
    np.sqrt(rings, out=rings)
    rings *= np.float32(9.0 * k)
    rings -= np.float32(2.0 * p)
    v += np.sin(rings, out=rings)

    # 4. colour: v lies in [-4, 4]; map it onto a 256-entry palette that drifts with time
    v *= np.float32(255.0 / 8.0)
    v += np.float32(127.5)
    index = v.astype(np.uint8)
    palette = np.empty((256, 3), np.uint8)
    for channel, phase in enumerate(_PHASES):
        palette[:, channel] = (127.5 + 127.5 * np.sin(_RAMP * 1.5 + phase + 0.3 * p)).astype(np.uint8)
    return palette[index]


class PatternSource(Source):
    """The pattern as a live source, paced in real time on its own thread.

    Speed and scale are live parameters when a registry is given. ``pause()`` lets a
    fallback pattern idle (no CPU) while the real input is fine, without the cost of a
    thread stop and start.
    """

    kind = "pattern"
    PARAMS: list[Param] = [
        float_param(
            "/source/pattern/speed", 1.0, 0.0, 4.0, description="how fast the built-in pattern moves (0 freezes it)"
        ),
        float_param(
            "/source/pattern/scale", 1.0, 0.25, 4.0, description="zoom of the built-in pattern (larger = bigger shapes)"
        ),
    ]

    def __init__(
        self, size: tuple[int, int] = (640, 360), fps: float = 30, params: ParamRegistry | None = None
    ) -> None:
        super().__init__("pattern")
        width, height = size
        if width <= 0 or height <= 0:
            raise ValueError(f"pattern size must be positive, got {width}x{height}")
        if fps <= 0:
            raise ValueError(f"pattern fps must be positive, got {fps}")
        self.size = (int(width), int(height))
        self.target_fps = float(fps)
        self._params = params
        if params is not None:
            params.declare_all(self.PARAMS)
        self._paused = False
        self.phase = 0.0  # integrated animation time (seconds at speed 1)

    def pause(self) -> None:
        """Stop producing frames (the thread idles); never blocks."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def _knobs(self) -> tuple[float, float]:
        if self._params is None:
            return 1.0, 1.0
        return self._params.get("/source/pattern/speed"), self._params.get("/source/pattern/scale")

    def _run(self) -> None:
        pacer = Pacer(self.target_fps, self._stop)
        last = time.monotonic()
        while pacer.wait():
            now = time.monotonic()
            step, last = min(now - last, MAX_STEP), now
            if self._paused:
                self.status = "pattern paused"
                continue
            speed, scale = self._knobs()
            self.phase += step * speed
            width, height = self.size
            self._publish(render_pattern(self.phase, width, height, 1.0, scale))
            self.status = f"pattern ok {self.fps:.0f} fps"
