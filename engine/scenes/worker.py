"""The scene worker: one thread that runs the active scene on the newest source frame.

The render thread asks for a scene by name (``request``) and reads ``output``; it never
waits. Loading happens on a loader thread, so the old scene keeps playing until the new
one is ready; if loading fails, the old scene stays and the error is reported. A scene
that raises in ``process`` keeps its last good image on screen.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from engine.params import ParamRegistry
from engine.scenes.base import Scene, SceneCatalog
from engine.slots import NewestSlot

log = logging.getLogger(__name__)

FrameGetter = Callable[[], tuple[np.ndarray | None, object]]


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA/MPS) and MemoryError, told apart by name: no torch import here."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"


@dataclass(frozen=True)
class SceneFrame:
    scene: str
    image: np.ndarray
    index: int  # counts this scene's images since it became active


class SceneWorker:
    def __init__(self, catalog: SceneCatalog, params: ParamRegistry, latest_input: FrameGetter,
                 error_backoff: float = 0.5) -> None:
        self.catalog = catalog
        self.params = params
        self.latest_input = latest_input  # () -> (frame, key); never blocks
        self.output: NewestSlot[SceneFrame] = NewestSlot()
        self.active: Scene | None = None
        self.loading: str | None = None
        self.last_error: str | None = None
        self.failed: str | None = None  # a scene that could not load or ran out of memory; the app reverts
        self.previous_name: str | None = None  # the scene that played before the active one
        self.fps = 0.0
        self._error_backoff = error_backoff
        self._requested: str | None = None
        self._ready: Scene | None = None  # loaded by the loader thread, not yet active
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._paused = threading.Event()  # opening hours closed: the scene stays loaded, the GPU rests
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._index = 0
        self._last_key: object = None

    # -- render thread ---------------------------------------------------------------
    def request(self, name: str) -> None:
        """Ask for a scene; returns at once. Unknown names are refused with KeyError."""
        self.catalog.get(name)
        with self._lock:
            self._requested = name
        self._wake.set()

    @property
    def pending_name(self) -> str | None:
        """The scene that will play next: requested or loading (None when nothing is on its way)."""
        return self._requested or self.loading

    @property
    def active_name(self) -> str | None:
        scene = self.active
        return None if scene is None else scene.name

    def pause(self) -> None:
        """Stop running the scene (the last image stays); loading and requests still work."""
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()
        self._wake.set()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def start(self) -> "SceneWorker":
        self._thread = threading.Thread(target=self._run, name="scene worker", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.active is not None:
            self.active.unload()
            self.active = None

    # -- worker thread -------------------------------------------------------------------
    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            self._switch_if_ready()
            self._start_loading_if_requested()
            scene = self.active
            if scene is None or self._paused.is_set():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            started = time.monotonic()
            produced = self.step(scene)
            if produced:
                now = time.monotonic()
                self.fps += (1.0 / max(now - last, 1e-6) - self.fps) * 0.1
                last = now
            # pacing: never faster than the scene's max_fps, and idle briefly when there is no news
            period = 1.0 / scene.max_fps
            wait = period - (time.monotonic() - started)
            if not produced:
                wait = max(wait, 0.002)
            if wait > 0:
                self._wake.wait(wait)
                self._wake.clear()

    def step(self, scene: Scene) -> bool:
        """Run the scene once on the newest input; True if it produced an image."""
        frame, key = self.latest_input()
        if scene.uses_input and (frame is None or key == self._last_key):
            return False  # nothing new to work on: do not redo the same frame
        self._last_key = key
        try:
            image = scene.process(frame, time.monotonic())
        except Exception as exc:  # a scene's bug must not end the show: keep the last image
            if is_out_of_memory(exc) and self.previous_name is not None:
                # named policy: out of accelerator memory -> back to the scene that played before
                self._report(f"scene {scene.name} ran out of accelerator memory: back to {self.previous_name}")
                with self._lock:
                    self._requested = self.previous_name
                    self.failed = scene.name
                self._wake.set()
                return False
            self._report(f"scene {scene.name} failed: {type(exc).__name__}: {exc}")
            log.exception("scene %s raised in process()", scene.name)
            self._stop.wait(self._error_backoff)
            return False
        if image is None:
            return False
        self._index += 1
        self.output.put(SceneFrame(scene.name, image, self._index))
        return True

    def _start_loading_if_requested(self) -> None:
        with self._lock:
            name = self._requested
            if name is None or name == self.active_name or self.loading is not None:
                return
            self._requested = None
            self.loading = name
        threading.Thread(target=self._load, args=(name,), name=f"load {name}", daemon=True).start()

    def _load(self, name: str) -> None:
        started = time.monotonic()
        try:
            scene = self.catalog.get(name)(self.params)
            scene.load()
        except Exception as exc:  # a missing model or a bad plugin: the current scene plays on
            self._report(f"scene {name} could not load: {type(exc).__name__}: {exc}")
            log.exception("loading scene %s failed", name)
            with self._lock:
                self.loading = None
                self.failed = name
            self._wake.set()
            return
        log.info("scene %s loaded in %.2f s", name, time.monotonic() - started)
        with self._lock:
            self._ready = scene
        self._wake.set()

    def _switch_if_ready(self) -> None:
        with self._lock:
            scene, self._ready = self._ready, None
            if scene is None:
                return
            old, self.active, self.loading = self.active, scene, None
            if old is not None:
                self.previous_name = old.name
            self._index = 0
            self._last_key = None
        if old is not None:
            try:
                old.unload()
            except Exception:  # unloading must not stop the new scene from playing
                log.exception("unloading scene %s failed", old.name)

    def _report(self, message: str) -> None:
        self.last_error = message
        log.error("%s", message)
