"""What the show is doing, once per frame: one read-only snapshot for every view of it.

The render thread makes one ``ShowStatus`` per frame from values it already has (the
frame counters, the scene worker's names, the latest errors); the HUD, ``/health`` and
the status page, systemd's status line, the state file and the tests all read that
snapshot and nothing else. Outputs get it inside a ``RenderedFrame``, with the frame's
texture, instead of the whole App: an output sees the frame and the show's state, and
changes the show only through the parameter registry, like any control.

Nothing here imports GL, torch or the App, so any part of the engine may import it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.params import Change

if TYPE_CHECKING:
    import moderngl

    from engine.params import ParamRegistry

MB = 1024 * 1024
STATUS_REFRESH = 0.25  # seconds of the show's clock between samples of the parts' lines and memory


@dataclass(frozen=True, slots=True)
class PartStatus:
    """A control's or an output's one-line status ("" when it has nothing to say)."""

    name: str
    status: str


@dataclass(frozen=True, slots=True)
class ShowStatus:
    """The show as of one frame (render thread; read-only everywhere else).

    The numbers of the frame itself are this frame's; ``frame_ms`` and ``fps`` are those of
    the frames before it (this frame's time is known only once it has been presented).
    ``controls``, ``outputs`` and ``rss_mb`` are sampled every ``STATUS_REFRESH`` seconds
    of the show's clock (asking every part for its line costs more than a frame should
    spend on it); everything else is current.
    """

    # the frame
    frame: int = 0  # this frame's number, 1 for the first
    time: float = 0.0  # the show's clock at this frame, s
    fps: float = 0.0  # render rate, smoothed
    frame_ms: float = 0.0  # time the previous frame took on the render thread
    longest_frame_ms: float = 0.0  # the longest frame so far (after the first 10, which compile shaders)
    dropped_source: int = 0  # source frames replaced before the scene or the compositor took them
    dropped_scene: int = 0  # scene images replaced before the compositor took them
    scene_transitions: int = 0
    # the scene
    scene: str | None = None  # the scene playing (None until the first has loaded)
    scene_selected: str = ""  # /scene/active: the scene asked for (it may still be loading)
    scene_realtime: bool = True  # the scene on screen keeps up with the display (False: a slow one, img/s)
    scene_fps: float = 0.0  # images per second from the scene worker
    scene_backend: str = ""  # how the playing scene computes, e.g. "compile" ("" when it does not say)
    scene_status: str = ""  # its own short state, e.g. "NVIDIA H200 (float16) compile"
    scene_warning: str | None = None  # a problem it plays on through
    loading: str | None = None  # the scene loading now
    preloading: bool = False  # ``loading`` is a preload (kept ready, not played)
    loaded: tuple[str, ...] = ()  # scenes a cut reaches at once, most recently played first
    loaded_mb: int = 0  # accelerator memory they declare
    memory_budget_mb: int = 0  # /scene/memory_budget
    # the input and the performer
    source: str = ""  # e.g. "pattern ok 30.0 fps"
    source_fallback: bool = False  # the built-in pattern stands in for a lost source
    preset: str | None = None  # the preset recalled last
    last_change: Change | None = None  # the latest value a control sent
    controls: tuple[PartStatus, ...] = ()
    outputs: tuple[PartStatus, ...] = ()
    # problems
    errors: tuple[str, ...] = ()  # to show now: shader errors until fixed, the scene's, the latest other
    recent_errors: tuple[tuple[float, str], ...] = ()  # (wall-clock time, message), newest last
    # the process and the window
    rss_mb: float | None = None  # resident memory of the process (None where it cannot be read)
    fullscreen: bool | None = None  # None: no window (headless)


@dataclass(frozen=True, slots=True)
class RenderedFrame:
    """What an output gets after each frame is composited (render thread).

    ``texture`` (RGBA, top row first: the output framebuffer's colour attachment) holds
    the frame only until a later one is rendered into it: copy it or queue a read of it now
    (``engine.outputs.readback``), never keep the handle. ``params`` is the
    registry, for the values an output follows (``/output/record``) and the ones it
    changes (``set`` from any thread; the change lands at the next frame boundary).
    """

    ctx: moderngl.Context
    texture: moderngl.Texture
    size: tuple[int, int]
    number: int  # the frame's number, as ``status.frame``
    time: float  # the show's clock, as ``status.time``
    status: ShowStatus
    params: ParamRegistry


class MemoryProbe:
    """The process's resident memory, read without waiting on anything.

    Linux: ``/proc/self/statm``, which the kernel answers from memory (no disk), re-read
    through one descriptor kept open (a fresh open costs ten times the read). Elsewhere
    psutil when it is installed (imported on the first read, before the show gets going),
    else nothing: ``read()`` returns None and the views leave the figure out.
    """

    STATM = "/proc/self/statm"

    def __init__(self) -> None:
        self._linux = sys.platform.startswith("linux")
        self._fd: int | None = None
        self._process: Any = None
        self._unavailable = False

    def read(self) -> float | None:
        if self._unavailable:
            return None
        try:
            if self._linux:
                if self._fd is None:
                    self._fd = os.open(self.STATM, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                resident_pages = int(os.pread(self._fd, 128, 0).split()[1])
                return round(resident_pages * os.sysconf("SC_PAGE_SIZE") / MB, 1)
            if self._process is None:
                import psutil

                self._process = psutil.Process()
            return round(self._process.memory_info().rss / MB, 1)
        except (ImportError, OSError, ValueError, IndexError):  # no /proc (a sandbox), no psutil: no figure
            self._unavailable = True
            self.close()
            return None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
