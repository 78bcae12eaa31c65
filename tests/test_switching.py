"""Switching scenes in a show: slow scenes morph, loaded scenes stay within a memory budget,
cues preload, a scene that cannot load at the start falls back, keys select by index.

Real app, real threads, headless EGL, manual clock (see tests/test_app.py).
"""

from __future__ import annotations

import threading

import numpy as np

from engine.scenes import Scene, SceneCatalog, SceneNeeds
from engine.scenes.passthrough import Passthrough
from engine.scenes.reaction_diffusion import ReactionDiffusion
from tests.test_app import default_doc, make_app, presets_dir, step, step_until  # noqa: F401

COLOURS = [(250, 20, 20), (20, 250, 20), (20, 20, 250)]


class SlowColours(Scene):
    """A slow generative scene: a new flat colour a few times a second."""

    name = "slow"
    realtime = False
    uses_input = False
    max_fps = 8.0

    def __init__(self, params, torch=None) -> None:
        super().__init__(params, torch)
        self.n = 0

    def process(self, frame, t):
        self.n += 1
        return np.full((8, 8, 3), COLOURS[self.n % 3], np.uint8)


def counting(name: str, mb: int) -> type[Scene]:
    """A scene class that counts its loads and unloads and declares ``mb`` of accelerator memory."""
    counts = {"load": 0, "unload": 0}

    def load(self) -> None:
        counts["load"] += 1

    def unload(self) -> None:
        counts["unload"] += 1

    def process(self, frame, t):
        return np.full((8, 8, 3), 100, np.uint8)

    return type(
        name,
        (Scene,),
        {
            "name": name,
            "uses_input": False,
            "max_fps": 30.0,
            "counts": counts,
            "needs": SceneNeeds(accelerator_mb=mb),
            "load": load,
            "unload": unload,
            "process": process,
        },
    )


def test_a_slow_scene_morphs_between_its_images(make_app) -> None:
    app = make_app(catalog=SceneCatalog((ReactionDiffusion, SlowColours)))
    app.params.set_many(
        {
            "/scene/active": "slow",
            "/mix/morph": 1.0,
            "/mix/morph_follow": False,
            "/layer/source/opacity": 0.0,
            "/fx/feedback/amount": 0.0,
            "/fx/kaleido/enabled": False,
            "/fx/vignette/enabled": False,
            "/fx/grade/enabled": False,
        },
        origin="test",
    )
    step_until(app, lambda: app.worker.active_name == "slow", "the slow scene")
    step_until(app, lambda: app.compositor.morph_progress is not None, "a morph between two images")
    # mid-morph the picture is a mix of two of the flat colours: no pure one
    step_until(app, lambda: 0.2 < (app.compositor.morph_progress or 0) < 0.8, "the middle of a morph", timeout=20)
    centre = app.compositor.read_output()[135, 240].astype(int)
    assert not any(np.abs(centre - c).max() <= 3 for c in COLOURS), centre
    assert app.status.scene == "slow" and not app.status.scene_realtime, "a slow scene's rate is in images/s"


def test_a_realtime_scene_never_morphs(make_app) -> None:
    app = make_app(catalog=SceneCatalog((Passthrough, ReactionDiffusion)))
    step_until(app, lambda: app.worker.output.latest()[0] is not None, "a first image")
    for _ in range(60):
        app.step()
        assert app.compositor.morph_progress is None


def test_scenes_stay_loaded_within_the_budget_and_the_least_recent_goes_first(make_app) -> None:
    a, b, c = counting("a", 100), counting("b", 100), counting("c", 100)
    app = make_app(catalog=SceneCatalog((a, b, c)))
    app.params.set("/scene/memory_budget", 250, origin="test")  # room for two of the three
    step_until(app, lambda: app.worker.active_name == "a", "scene a")
    app.select_scene("b")
    step_until(app, lambda: app.worker.active_name == "b", "scene b")
    app.select_scene("a")  # kept loaded: plays again without a second load
    step_until(app, lambda: app.worker.active_name == "a", "back to a")
    assert a.counts == {"load": 1, "unload": 0} and b.counts["unload"] == 0
    app.select_scene("c")  # a third does not fit: b, the least recently played, is unloaded
    step_until(app, lambda: app.worker.active_name == "c", "scene c")
    assert app.worker.evicted == ["b"] and b.counts["unload"] == 1 and a.counts["unload"] == 0
    assert app.worker.loaded_names == ["a", "c"]
    app.step()
    status = app.status  # what a cut reaches at once, most recently played first, and what it declares
    assert (status.loaded, status.loaded_mb, status.memory_budget_mb) == (("c", "a"), 200, 250)


def test_a_zero_budget_keeps_only_the_playing_scene(make_app) -> None:
    a, b = counting("a", 0), counting("b", 0)
    app = make_app(catalog=SceneCatalog((a, b)))
    app.params.set("/scene/memory_budget", 0, origin="test")
    step_until(app, lambda: app.worker.active_name == "a", "scene a")
    app.select_scene("b")
    step_until(app, lambda: app.worker.active_name == "b" and a.counts["unload"] == 1, "a unloaded after the cut")
    assert app.worker.loaded_names == ["b"]


class SlowToLoad(Scene):
    name = "heavy"
    uses_input = False
    needs = SceneNeeds(accelerator_mb=100)
    gate = threading.Event()
    loads = 0

    def load(self) -> None:
        SlowToLoad.loads += 1
        assert self.gate.wait(10), "the test never opened the gate"

    def process(self, frame, t):
        return np.full((8, 8, 3), 200, np.uint8)


def test_a_cue_preloads_in_the_background_and_the_cut_is_then_instant(make_app) -> None:
    SlowToLoad.gate.clear()
    SlowToLoad.loads = 0
    app = make_app(catalog=SceneCatalog((ReactionDiffusion, SlowToLoad)))
    step_until(app, lambda: app.worker.active_name == "reaction_diffusion", "the first scene")
    app.params.set("/scene/cue", "heavy", origin="osc")
    step_until(app, lambda: app.status.loading == "heavy", "the preload to start")
    assert app.status.preloading and app.status.scene == "reaction_diffusion"
    step(app, 5)
    assert app.worker.active_name == "reaction_diffusion", "a preload does not play"
    SlowToLoad.gate.set()
    step_until(app, lambda: "heavy" in app.worker.loaded_names, "the preload to finish")
    assert app.worker.active_name == "reaction_diffusion"
    app.select_scene("heavy")
    # already loaded: it plays without another load (counted, not timed: the worker runs in real time)
    step_until(app, lambda: app.worker.active_name == "heavy", "the cut")
    assert SlowToLoad.loads == 1 and app.worker.loading is None, "the cut loaded the scene again"


def test_the_preload_action_refuses_an_unknown_scene(make_app) -> None:
    app = make_app(catalog=SceneCatalog((ReactionDiffusion, Passthrough)))
    app.actions.post("scene/preload", "nope", origin="osc")
    app.step()
    assert "nope" in (app.actions.last_error or "")


class MissingModel(Scene):
    name = "needs_hub"
    fallback = "passthrough"

    def load(self) -> None:
        raise FileNotFoundError("someone/model is not in the cache: huggingface-cli download someone/model")

    def process(self, frame, t):  # pragma: no cover - never loads
        raise AssertionError


def test_a_scene_that_cannot_load_at_the_start_falls_back(make_app, presets_dir) -> None:
    (presets_dir / "hub.toml").write_text('[scene]\nactive = "needs_hub"\n', encoding="utf-8")
    app = make_app(catalog=SceneCatalog((ReactionDiffusion, Passthrough, MissingModel)), preset="hub")
    step_until(app, lambda: app.worker.active_name == "passthrough", "the fallback scene")
    assert app.params.get("/scene/active") == "passthrough"
    assert any("needs_hub could not load" in e and "huggingface-cli download" in e for e in app.status.errors)


def test_f_keys_select_scenes_by_index(make_app) -> None:
    app = make_app(catalog=SceneCatalog((ReactionDiffusion, Passthrough)))
    app.handle_action("scene:1")
    step_until(app, lambda: app.worker.active_name == "passthrough", "F2: the second scene")
    app.handle_action("scene:7")  # out of range: one line, nothing changes
    step(app, 2)
    assert "out of range" in (app.actions.last_error or "")
    assert app.params.get("/scene/active") == "passthrough"
