"""What a scene is: a declared plugin that turns the newest source frame into an image.

A scene declares its name, its place in the catalog (``order``), its parameters by names
relative to itself (``strength`` is ``/scene/<name>/strength`` in the registry), whether
it keeps up with the display (``realtime``) and what it needs. ``load`` and ``process``
run on the scene worker thread, never on the render thread; a scene never imports
another scene. Scenes are found through the ``dreamdeck.scenes`` entry points
(``engine.scenes.plugins``), dreamdeck's own ones included.

Two helpers carry what most scenes repeat: ``BackgroundLoad`` (a new model loads on its own
thread while the old one plays) and ``LastGood`` (a live value that can be refused is tried
once, said once, and the last good one stays).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from engine.diffusion.options import TorchDefaults
from engine.params import Param, ParamRegistry

log = logging.getLogger(__name__)
T = TypeVar("T")
In = TypeVar("In")
SCENE_GROUP = "/scene"  # every scene's parameters live under /scene/<name>/
_UNTRIED = object()


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
    """Subclass it, name it, and list it under the ``dreamdeck.scenes`` entry points.

    ``PARAMS`` is written with names relative to the scene (``float_param("strength", ...)``);
    once the class is made, ``PARAMS`` holds them placed under ``/scene/<name>/``, the paths
    presets, OSC, OSCQuery, MIDI maps and the web page use.
    """

    name: ClassVar[str] = ""
    # Place in the catalog, so F-keys and the index of scene/select never move when a plugin is
    # installed: dreamdeck's own scenes first (10, 20, ...), then plugins by (order, name).
    order: ClassVar[int] = 100
    description: ClassVar[str] = ""
    realtime: ClassVar[bool] = True  # False: slower than the display (the compositor holds its last image)
    uses_input: ClassVar[bool] = True  # False: generative; it runs without a source frame
    max_fps: ClassVar[float] = 60.0  # the worker never runs it faster than this
    needs: ClassVar[SceneNeeds] = SceneNeeds()
    fallback: ClassVar[str | None] = None  # played instead when this scene cannot load and nothing played before
    PARAMS: ClassVar[tuple[Param, ...]] = ()
    _declared_params: ClassVar[tuple[Param, ...]] = ()  # PARAMS as written: relative names

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "PARAMS" in cls.__dict__:
            absolute = [p.path for p in cls.PARAMS if not p.relative]
            if absolute:  # one way to say it, so that a renamed scene takes its parameters along
                raise ValueError(
                    f"scene {cls.__name__}: declare parameters by their own name ('strength'), not "
                    f"a path: {', '.join(absolute)}"
                )
            cls._declared_params = tuple(cls.PARAMS)
        # a subclass that renames a scene takes the parameters it inherits to its own name
        cls.PARAMS = tuple(p.under(cls.group()) for p in cls._declared_params) if cls.name else cls._declared_params

    @classmethod
    def group(cls) -> str:
        """Where this scene's parameters live: ``/scene/<name>``."""
        return f"{SCENE_GROUP}/{cls.name}"

    @classmethod
    def path(cls, name: str) -> str:
        """The registry path of this scene's own parameter ``name``: ``/scene/<scene>/<name>``."""
        return f"{cls.group()}/{name}"

    def __init__(self, params: ParamRegistry, torch: TorchDefaults | None = None) -> None:
        self.params = params
        self.torch = torch or TorchDefaults()  # what "auto" device / dtype / accel means in this show
        # Read by the render thread for the HUD: the worker assigns new strings, never mutates.
        self.status = ""  # a short state next to the scene's name, e.g. "cuda (float16) compile"
        self.warning: str | None = None  # a problem the scene plays on through, e.g. a failed compile
        self.backend = ""  # how it computes now, e.g. "eager" or "compile" ("" for a scene with no choice)

    def param(self, name: str) -> Any:
        """This scene's own parameter ``/scene/<name>/<param>`` as of the last frame boundary."""
        return self.params.get(self.path(name))

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


class LastGood(Generic[In, T]):
    """A live value that can be refused: applied when it changes, refused once, the last good one kept.

    ``update(given)`` calls ``apply(given)`` only when ``given`` differs from the input tried
    last, so an input that stays refused is neither retried nor logged again every frame. A
    ``ValueError`` from ``apply`` is the refusal: one log line ``"<what>: <reason>"``, kept in
    ``refusal`` (for the HUD) until an input is accepted, while ``value`` stays the result of
    the last accepted one. Any other exception propagates and the input is tried again next time
    (an out-of-memory error is the worker's to handle). ``update`` holds a lock while it applies,
    so a loader thread and the worker may both ask.
    """

    def __init__(self, what: str, apply: Callable[[In], T], initial: T | None = None) -> None:
        self.what = what  # says the policy, e.g. "realtime: prompt refused, the last one plays on"
        self._apply = apply
        self.value: T | None = initial
        self.refusal: str | None = None
        self._tried: Any = _UNTRIED
        self._lock = threading.Lock()

    @property
    def refused(self) -> bool:
        return self.refusal is not None

    def update(self, given: In) -> T | None:
        """Apply ``given`` if it is new; the last good result either way."""
        with self._lock:
            if self._tried is _UNTRIED or given != self._tried:
                try:
                    result = self._apply(given)
                except ValueError as exc:
                    self._tried = given
                    self.refusal = f"{self.what}: {exc}"
                    log.warning("%s", self.refusal)
                else:
                    self._tried, self.value, self.refusal = given, result, None
            return self.value

    def forget(self) -> None:
        """Let the next ``update`` apply its input even if it is the one tried last."""
        with self._lock:
            self._tried = _UNTRIED


def require_diffusion_extra(scene: str) -> None:
    """Raise one clear line when torch / diffusers / transformers are not installed (the
    ``diffusion`` extra); the worker shows it and the app plays the fallback scene."""
    import importlib.util

    missing = [name for name in ("torch", "diffusers", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(
            f"the {scene} scene needs {', '.join(missing)}: install a torch build for "
            "your GPU, then pip install -e '.[diffusion]'"
        )


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
    """Scene classes by name, in the order they were added (index = position).

    ``engine.scenes.installed_catalog()`` adds the installed scenes in their catalog order;
    a catalog built by hand (a test's, the soak's) keeps the order it is given.
    """

    def __init__(self, scenes: tuple[type[Scene], ...] = ()) -> None:
        self._scenes: dict[str, type[Scene]] = {}
        for scene in scenes:
            self.add(scene)

    def add(self, scene: type[Scene]) -> None:
        if not (isinstance(scene, type) and issubclass(scene, Scene)):
            raise TypeError(f"{scene!r} is not a Scene subclass")
        if not scene.name or "/" in scene.name or scene.name in ("active", "cue", "memory_budget"):
            raise ValueError(
                f"scene {scene.__name__} needs a name without '/' (and not active, cue or "
                "memory_budget: those are /scene/ parameters of the engine)"
            )
        for p in scene.PARAMS:
            if not p.path.startswith(f"{scene.group()}/"):
                raise ValueError(f"scene {scene.name}: parameter {p.path} must live under {scene.group()}/")
        if scene.name in self._scenes and self._scenes[scene.name] is not scene:
            other = self._scenes[scene.name]
            raise ValueError(f"scene name {scene.name!r} is taken by {other.__module__}.{other.__qualname__}")
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
