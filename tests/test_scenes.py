"""Scenes and the scene worker with real threads: loading off-thread, switching, failures.

Every wait is a polling loop bounded by a timeout; no test asserts on wall-clock speed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from engine.catalog import build_registry
from engine.params import ParamRegistry
from engine.scenes import Scene, SceneCatalog, SceneFrame, SceneWorker, installed_catalog
from engine.scenes.passthrough import Passthrough
from engine.scenes.reaction_diffusion import ReactionDiffusion
from engine.sources import render_pattern

TIMEOUT = 10.0


def wait_for(condition: Callable[[], bool], timeout: float = TIMEOUT, interval: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


class PatternFeed:
    """A never-waiting input like the app's: a new pattern frame (and key) on every call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.key = 0

    def __call__(self) -> tuple[np.ndarray, int]:
        with self._lock:
            self.key += 1
            return render_pattern(self.key * 0.05, 64, 36), self.key


# -- test scenes: real plugins that misbehave in chosen ways ---------------------------------


class GatedLoad(Scene):
    """Loads only when the test opens the gate; records which thread loaded it."""

    name = "gated"
    uses_input = False
    gate = threading.Event()
    load_thread: str | None = None

    def load(self) -> None:
        type(self).load_thread = threading.current_thread().name
        if not type(self).gate.wait(TIMEOUT):
            raise TimeoutError("the test never opened the gate")

    def process(self, frame: np.ndarray | None, t: float) -> np.ndarray:
        return np.full((8, 8, 3), 200, np.uint8)


class BrokenLoad(Scene):
    name = "broken_load"

    def load(self) -> None:
        raise RuntimeError("model file missing: /models/nothing.safetensors")

    def process(self, frame: np.ndarray | None, t: float) -> np.ndarray:  # pragma: no cover - never loads
        raise AssertionError("a scene that failed to load must never run")


class BreaksAfterThree(Scene):
    """Gives three good images (values 1, 2, 3), then raises on every call."""

    name = "breaks_after_three"
    uses_input = False

    def load(self) -> None:
        self.calls = 0

    def process(self, frame: np.ndarray | None, t: float) -> np.ndarray:
        self.calls += 1
        if self.calls > 3:
            raise ValueError(f"tensor shape mismatch on call {self.calls}")
        return np.full((8, 8, 3), self.calls, np.uint8)


@pytest.fixture
def make_worker():
    """Build a started SceneWorker over a catalog; stopped at the end even when a test fails."""
    workers: list[SceneWorker] = []

    def make(*extra: type[Scene]) -> SceneWorker:
        catalog = installed_catalog()
        for scene in extra:
            catalog.add(scene)
        worker = SceneWorker(catalog, build_registry(catalog), PatternFeed(), error_backoff=0.02)
        workers.append(worker.start())
        return worker

    GatedLoad.gate = threading.Event()
    GatedLoad.load_thread = None
    yield make
    GatedLoad.gate.set()
    for worker in workers:
        worker.stop()


def output_of(worker: SceneWorker) -> SceneFrame | None:
    return worker.output.latest()[0]


def showing(worker: SceneWorker, name: str, index: int = 1) -> Callable[[], bool]:
    def check() -> bool:
        frame = output_of(worker)
        return frame is not None and frame.scene == name and frame.index >= index

    return check


# -- the worker ----------------------------------------------------------------------------------


def test_request_loads_off_thread_and_frames_arrive(make_worker) -> None:
    worker = make_worker(GatedLoad)
    worker.request("gated")
    assert wait_for(lambda: worker.loading == "gated"), "the load did not start"
    # request() returned while load() is still blocked: loading is not on the caller's thread
    assert GatedLoad.load_thread not in (None, threading.current_thread().name)
    assert worker.active is None and output_of(worker) is None

    GatedLoad.gate.set()
    assert wait_for(showing(worker, "gated", index=3)), "no frames after the load finished"
    assert worker.active_name == "gated" and worker.loading is None
    assert output_of(worker).image.shape == (8, 8, 3)

    worker.request("reaction_diffusion")
    assert wait_for(showing(worker, "reaction_diffusion", index=3))
    frame = output_of(worker)
    assert frame.image.dtype == np.uint8 and frame.image.shape == (*ReactionDiffusion.size, 3)
    assert worker.last_error is None and worker.failed is None


def test_switching_keeps_old_output_until_new_scene_has_a_frame(make_worker) -> None:
    worker = make_worker(GatedLoad)
    worker.request("passthrough")  # uses the input: its output is the feed's pattern
    assert wait_for(showing(worker, "passthrough", index=2))

    worker.request("gated")
    assert wait_for(lambda: worker.loading == "gated")
    seen: list[tuple[str, int]] = []

    def record() -> None:
        frame, seq = worker.output.latest()
        assert frame is not None, "the output went empty during a scene switch"
        if not seen or seen[-1][1] != seq:
            seen.append((frame.scene, seq))

    # while the new scene loads, the old one keeps producing new images
    start = len(seen)
    assert wait_for(lambda: (record(), len(seen) - start >= 5)[1]), "the old scene stopped while the new one loaded"
    assert {name for name, _ in seen} == {"passthrough"}
    assert worker.active_name == "passthrough"

    GatedLoad.gate.set()
    assert wait_for(lambda: (record(), seen[-1][0] == "gated")[1])
    names = [name for name, _ in seen]
    first_new = names.index("gated")
    assert set(names[:first_new]) == {"passthrough"} and set(names[first_new:]) == {"gated"}
    assert output_of(worker).index >= 1


def test_scene_that_fails_to_load_leaves_the_old_scene_playing(make_worker) -> None:
    worker = make_worker(BrokenLoad)
    worker.request("reaction_diffusion")
    assert wait_for(showing(worker, "reaction_diffusion", index=2))

    worker.request("broken_load")
    assert wait_for(lambda: worker.failed == "broken_load"), "the failure was not reported"
    assert "broken_load could not load" in worker.last_error
    assert "model file missing" in worker.last_error
    assert worker.loading is None and worker.active_name == "reaction_diffusion"

    index = output_of(worker).index
    assert wait_for(showing(worker, "reaction_diffusion", index=index + 3)), "the old scene stopped"


def test_scene_that_raises_keeps_its_last_good_image(make_worker) -> None:
    worker = make_worker(BreaksAfterThree)
    worker.request("breaks_after_three")
    assert wait_for(lambda: worker.last_error is not None), "the process() error was not reported"
    assert "breaks_after_three failed" in worker.last_error and "tensor shape mismatch" in worker.last_error

    frame, seq = worker.output.latest()
    assert frame.scene == "breaks_after_three" and frame.index == 3
    assert int(frame.image.max()) == 3, "the last good image is not the one showing"
    # more failing calls (back-off 0.02 s): the worker keeps trying, nothing replaces the good image
    assert wait_for(lambda: worker.active.calls >= 6), "the worker gave up on the scene instead of retrying"
    assert worker.output.latest()[1] == seq

    worker.request("passthrough")  # a broken scene does not trap the performer
    assert wait_for(showing(worker, "passthrough", index=2))
    assert output_of(worker).image.shape == (36, 64, 3)


def test_unknown_scene_is_refused(make_worker) -> None:
    worker = make_worker()
    worker.request("reaction_diffusion")
    assert wait_for(showing(worker, "reaction_diffusion"))
    with pytest.raises(KeyError, match="no scene named 'nope'.*reaction_diffusion, passthrough"):
        worker.request("nope")
    index = output_of(worker).index
    assert wait_for(showing(worker, "reaction_diffusion", index=index + 2))
    assert worker.failed is None and worker.last_error is None


def test_catalog_refuses_bad_scenes() -> None:
    catalog = SceneCatalog((ReactionDiffusion, Passthrough))
    assert catalog.names() == ["reaction_diffusion", "passthrough"]
    assert catalog.get("passthrough") is Passthrough

    class Nameless(Scene):
        pass

    with pytest.raises(ValueError, match="needs a name"):
        catalog.add(Nameless)


# -- reaction-diffusion ---------------------------------------------------------------------------


def make_rd(**values: object) -> ReactionDiffusion:
    registry = ParamRegistry()
    registry.declare_all(ReactionDiffusion.PARAMS)
    for name, value in values.items():
        registry.set(f"/scene/reaction_diffusion/{name}", value)
    registry.apply_pending(10.0)  # well past the smoothing time: the values have landed
    scene = ReactionDiffusion(registry)
    scene.load()
    return scene


def test_reaction_diffusion_is_rgb_and_alive() -> None:
    scene = make_rd()
    first = scene.process(None, 0.0)
    assert first.shape == (*ReactionDiffusion.size, 3) and first.dtype == np.uint8
    assert first.std() > 5, "the pattern looks blank"
    for step in range(30):
        later = scene.process(None, step * 0.016)
    assert np.abs(later.astype(int) - first).mean() > 1, "the pattern does not change over time"
    # a bright source frame feeds it
    fed = make_rd(source_seed=1.0)
    bright = np.full((90, 160, 3), 255, np.uint8)
    plain = make_rd(source_seed=0.0)
    assert not np.array_equal(fed.process(bright, 0.0), plain.process(bright, 0.0))


class CountingSeeds(ReactionDiffusion):
    """The real scene, counting its re-seeds so the test can see it died and came back."""

    def load(self) -> None:
        self.reseeds = -1  # load() seeds once
        super().load()

    def _seed(self, rng: np.random.Generator, spots: int) -> None:
        self.reseeds += 1
        super()._seed(rng, spots)


def test_reaction_diffusion_never_dies_out() -> None:
    registry = ParamRegistry()
    registry.declare_all(ReactionDiffusion.PARAMS)
    # a high kill rate and a low feed rate wipe V out within a few hundred steps
    registry.set_many(
        {
            "/scene/reaction_diffusion/kill": 0.075,
            "/scene/reaction_diffusion/feed": 0.01,
            "/scene/reaction_diffusion/speed": 40,
        }
    )
    registry.apply_pending(10.0)
    scene = CountingSeeds(registry)
    scene.load()
    for frame in range(60):
        image = scene.process(None, frame / 60)
        assert image.std() > 1.0, f"blank after {frame + 1} frames of 40 steps"
        assert float(scene.v.max()) >= 0.05
    assert scene.reseeds >= 1, "the pattern never died, so this test proved nothing"
