"""What a scene is: a declared plugin that turns the newest source frame into an image.

A scene declares its name, its parameters (under ``/scene/<name>/``), whether it keeps
up with the display (``realtime``) and what it needs. ``load`` and ``process`` run on the
scene worker thread, never on the render thread; a scene never imports another scene.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Generic, TypeVar

import numpy as np

from engine.diffusion.options import TorchDefaults
from engine.params import Param, ParamRegistry

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class SceneNeeds:
    """What a scene asks of the machine, so the engine can refuse or plan before loading."""

    accelerator_mb: int = 0  # GPU memory it will take; 0 = runs on the CPU
    models: tuple[str, ...] = ()  # hub ids or paths it loads
    # Python modules it imports when it loads. Importing torch or diffusers holds the GIL
    # for seconds, which would freeze the render loop mid-show: the app imports the ones
    # that are installed once, before the first frame.
    imports: tuple[str, ...] = ()


class Scene:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    realtime: ClassVar[bool] = True  # False: slower than the display (the compositor holds its last image)
    uses_input: ClassVar[bool] = True  # False: generative; it runs without a source frame
    max_fps: ClassVar[float] = 60.0  # the worker never runs it faster than this
    needs: ClassVar[SceneNeeds] = SceneNeeds()
    fallback: ClassVar[str | None] = None  # played instead when this scene cannot load and nothing played before
    PARAMS: ClassVar[tuple[Param, ...]] = ()

    def __init__(self, params: ParamRegistry, torch: TorchDefaults | None = None) -> None:
        self.params = params
        self.torch = torch or TorchDefaults()  # what "auto" device / dtype / accel means in this show
        # Read by the render thread for the HUD: the worker assigns new strings, never mutates.
        self.status = ""  # a short state next to the scene's name, e.g. "cuda (float16) compile"
        self.warning: str | None = None  # a problem the scene plays on through, e.g. a failed compile
        self.backend = ""  # how it computes now, e.g. "eager" or "compile" ("" for a scene with no choice)

    def param(self, name: str) -> Any:
        """This scene's own parameter ``/scene/<name>/<param>`` as of the last frame boundary."""
        return self.params.get(f"/scene/{self.name}/{name}")

    def load(self) -> None:
        """Heavy set-up (models, buffers). Runs on a loader thread; may take seconds."""

    def unload(self) -> None:
        """Free what ``load`` took."""

    def process(self, frame: np.ndarray | None, t: float) -> np.ndarray | None:
        """Newest source frame (RGB uint8, may be None) -> an RGB uint8 image, or None for no new image."""
        raise NotImplementedError


class BackgroundLoad(Generic[T]):
    """Something heavy (a new model) loading on its own thread while the scene plays on
    with what it has. The worker polls ``done`` between frames, then ``take``s it once:
    the result, or the load's exception raised there, so the worker reports it in the HUD
    and the scene plays on with its old model."""

    def __init__(self, what: str, load: Callable[[], T]) -> None:
        self.what = what
        self._result: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(load,), name=f"load {what}", daemon=True)
        self._thread.start()

    def _run(self, load: Callable[[], T]) -> None:
        try:
            self._result = load()
        except Exception as exc:  # raised from take() on the worker, which reports it (once)
            log.debug("loading %s failed", self.what, exc_info=True)
            self._error = exc

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def take(self) -> T:
        """The loaded result (call once ``done``); raises what the load raised."""
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]


def require_diffusion_extra(scene: str) -> None:
    """Raise one clear line when torch / diffusers / transformers are not installed (the
    ``diffusion`` extra); the worker shows it and the app plays the fallback scene."""
    import importlib.util

    missing = [name for name in ("torch", "diffusers", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(f"the {scene} scene needs {', '.join(missing)}: install a torch build for "
                                  "your GPU, then pip install -e '.[diffusion]'")


def free_accelerator_memory() -> None:
    """Give cached GPU memory back (after an unload or an out-of-memory error); no-op on a CPU."""
    import sys

    torch = sys.modules.get("torch")  # a scene that never imported torch has nothing to free
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def reserve_render_core() -> None:
    """Leave one CPU core to the render thread when a torch scene computes on the CPU.

    torch uses every core by default; on a small machine the render loop would then wait
    for a core and drop frames. Call it from ``load`` when the scene runs on the CPU.
    """
    import os

    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))


class SceneCatalog:
    """Scene classes by name, in the order they were added (index = position)."""

    def __init__(self, scenes: tuple[type[Scene], ...] = ()) -> None:
        self._scenes: dict[str, type[Scene]] = {}
        for scene in scenes:
            self.add(scene)

    def add(self, scene: type[Scene]) -> None:
        if not scene.name or "/" in scene.name:
            raise ValueError(f"scene {scene.__name__} needs a name without '/'")
        for p in scene.PARAMS:
            if not p.path.startswith(f"/scene/{scene.name}/"):
                raise ValueError(f"scene {scene.name}: parameter {p.path} must live under /scene/{scene.name}/")
        self._scenes[scene.name] = scene

    def names(self) -> list[str]:
        return list(self._scenes)

    def get(self, name: str) -> type[Scene]:
        try:
            return self._scenes[name]
        except KeyError:
            raise KeyError(f"no scene named {name!r}; scenes: {', '.join(self._scenes)}") from None

    def params(self) -> list[Param]:
        return [p for scene in self._scenes.values() for p in scene.PARAMS]
