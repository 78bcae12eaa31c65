"""The scene worker: one thread that runs the active scene on the newest source frame.

The render thread asks for a scene by name (``request``) and reads ``output``; it never
waits. Loading happens on a loader thread, so the old scene keeps playing until the new
one is ready; if loading fails, the old scene stays and the error is reported. A scene
that raises in ``process`` keeps its last good image on screen.

Scenes stay loaded after they stop playing, so cutting back to one is instant, and
``preload`` loads one in the background before the performer asks for it. What stays is
bounded by an accelerator memory budget (``/scene/memory_budget``, in MB, against each
scene's declared ``needs.accelerator_mb``): when a load needs room, the least recently
played scenes are unloaded first. The playing scene is never unloaded for room.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine.diffusion.options import TorchDefaults
from engine.params import ParamRegistry
from engine.scenes.base import Scene, SceneCatalog
from engine.slots import NewestSlot

log = logging.getLogger(__name__)

# load failures whose message says it all (ModelNotFound is a LookupError; require_diffusion_extra
# raises ModuleNotFoundError; a device or dtype the machine lacks is a ValueError)
_SAID_IN_ONE_LINE = (LookupError, ValueError, ModuleNotFoundError)

FrameGetter = Callable[[], tuple[np.ndarray | None, object]]
BUDGET_PARAM = "/scene/memory_budget"


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA/MPS) and MemoryError, told apart by name: no torch import here."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"


@dataclass(frozen=True)
class SceneFrame:
    scene: str
    image: np.ndarray
    index: int  # counts this scene's images since it became active


class SceneWorker:
    def __init__(
        self,
        catalog: SceneCatalog,
        params: ParamRegistry,
        latest_input: FrameGetter,
        error_backoff: float = 0.5,
        torch: TorchDefaults | None = None,
    ) -> None:
        self.catalog = catalog
        self.params = params
        self.torch = torch or TorchDefaults()  # handed to each scene it makes
        self.latest_input = latest_input  # () -> (frame, key); never blocks
        self.output: NewestSlot[SceneFrame] = NewestSlot()
        self.active: Scene | None = None
        self.loading: str | None = None
        self.last_error: str | None = None
        self.failed: str | None = None  # a scene that could not load or ran out of memory; the app reverts
        self.previous_name: str | None = None  # the scene that played before the active one
        self.fps = 0.0
        # loaded scenes, least recently played first (the active one included); worker thread only
        self.loaded: OrderedDict[str, Scene] = OrderedDict()
        self.evicted: list[str] = []  # scenes unloaded for room, oldest first (for the HUD and tests)
        self._error_backoff = error_backoff
        self._requested: str | None = None
        self._preload: list[str] = []  # scenes to load in the background without playing them
        self._loading_activates = True  # the load in progress: play it when ready, or just keep it
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

    def preload(self, name: str) -> None:
        """Load a scene in the background so that selecting it later is instant (KeyError if unknown)."""
        self.catalog.get(name)
        with self._lock:
            if name not in self._preload:
                self._preload.append(name)
        self._wake.set()

    @property
    def loaded_names(self) -> list[str]:
        """Loaded scenes, least recently played first."""
        with self._lock:
            return list(self.loaded)

    @property
    def pending_name(self) -> str | None:
        """The scene that will play next: requested, loading or ready (None when nothing is on its way)."""
        with self._lock:
            ready = self._ready
            if self._requested:
                return self._requested
            if self.loading and self._loading_activates:
                return self.loading
            return None if ready is None or ready.name == self.loading else ready.name

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

    def start(self) -> SceneWorker:
        self._thread = threading.Thread(target=self._run, name="scene worker", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for scene in reversed(list(self.loaded.values())):
            self._unload(scene)
        self.loaded.clear()
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
                message = f"scene {scene.name} ran out of accelerator memory: back to {self.previous_name}"
                with self._lock:  # together: whoever sees the error also sees the way back
                    self._requested = self.previous_name
                    self.failed, self.last_error = scene.name, message
                log.error("%s", message)
                self._wake.set()
                return False
            self._report(f"scene {scene.name} failed: {type(exc).__name__}: {exc}")
            if isinstance(exc, _SAID_IN_ONE_LINE):  # e.g. a model reload that found no model
                log.debug("scene %s raised in process()", scene.name, exc_info=True)
            else:  # anything else may be a bug: the traceback goes to the log
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
            if name is not None and name == self.active_name:
                self._requested = None
                return
            if name is not None and name in self.loaded:  # kept loaded: play it at once
                self._requested = None
                self._ready = self.loaded[name]
                return
            if self.loading is not None:
                return
            activate = name is not None
            if not activate:  # nothing asked for: load the next scene to preload, if any
                while self._preload and (self._preload[0] in self.loaded or self._preload[0] == self.active_name):
                    self._preload.pop(0)
                if not self._preload:
                    return
                name = self._preload.pop(0)
            else:
                self._requested = None
            self.loading, self._loading_activates = name, activate
        self._make_room(name)
        threading.Thread(target=self._load, args=(name, activate), name=f"load {name}", daemon=True).start()

    def _load(self, name: str, activate: bool = True) -> None:
        started = time.monotonic()
        try:
            scene = self.catalog.get(name)(self.params, torch=self.torch)
            scene.load()
        except Exception as exc:  # a missing model or a bad plugin: the current scene plays on
            what = "could not load" if activate else "could not preload"
            message = f"scene {name} {what}: {type(exc).__name__}: {exc}"
            if isinstance(exc, _SAID_IN_ONE_LINE):  # a missing model, a bad setting, a missing extra
                log.debug("loading scene %s failed", name, exc_info=True)
                if not activate:  # (a failed activation is logged by the app, which falls back)
                    log.error("%s", message)
            else:  # anything else may be a bug: the traceback goes to the log
                log.exception("loading scene %s failed", name)
            with self._lock:  # together: whoever sees the failure also sees why
                self.loading, self.last_error = None, message
                if activate:
                    self.failed = name
            self._wake.set()
            return
        log.info("scene %s %s in %.2f s", name, "loaded" if activate else "preloaded", time.monotonic() - started)
        with self._lock:
            self._ready = scene
        self._wake.set()

    def _switch_if_ready(self) -> None:
        with self._lock:
            scene, self._ready = self._ready, None
            if scene is None:
                return
            if self.loading == scene.name:
                self.loading = None
                if not self._loading_activates:  # preloaded: keep it loaded, do not play it
                    self.loaded[scene.name] = scene
                    self.loaded.move_to_end(scene.name, last=False)  # not played yet: first to go
                    scene = None
            if scene is not None:
                old, self.active = self.active, scene
                if old is not None and old is not scene:
                    self.previous_name = old.name
                self.loaded[scene.name] = scene
                self.loaded.move_to_end(scene.name)
                self._index = 0
                self._last_key = None
        self._make_room(None)

    # -- the memory budget (worker thread) ----------------------------------------------------
    def budget_mb(self) -> int:
        if BUDGET_PARAM not in self.params:
            return 0  # a registry without the parameter (a test's own): keep only the playing scene
        return int(self.params.get(BUDGET_PARAM))

    def _make_room(self, incoming: str | None) -> None:
        """Unload the least recently played scenes until the loaded ones (and ``incoming``) fit."""

        def need(name: str) -> int:
            return self.catalog.get(name).needs.accelerator_mb

        budget = self.budget_mb()
        while True:
            with self._lock:
                used = sum(need(n) for n in self.loaded) + (need(incoming) if incoming else 0)
                spare = [n for n in self.loaded if n != self.active_name]
                if budget > 0:  # only unloading a scene that holds accelerator memory makes room
                    spare = [n for n in spare if need(n) > 0]
                    if used <= budget:
                        return
                if not spare:  # budget 0: keep nothing but the playing scene
                    return
                victim = spare[0]  # the least recently played
                scene = self.loaded.pop(victim)
            self.evicted.append(victim)
            log.info("scene %s unloaded to stay within the memory budget (%d MB)", victim, budget)
            self._unload(scene)

    def _unload(self, scene: Scene) -> None:
        try:
            scene.unload()
        except Exception:  # unloading must not stop the show
            log.exception("unloading scene %s failed", scene.name)

    def _report(self, message: str) -> None:
        self.last_error = message
        log.error("%s", message)
