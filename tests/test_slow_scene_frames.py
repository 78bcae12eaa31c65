"""The show does not wait for a slow scene: while the scene's ``process()`` is stuck, the
render loop keeps producing frames with the scene's last image, and takes the next image
when the scene hands it over.

The scene here blocks on an Event the test holds, so "slow" is as slow as the test wants
and nothing depends on the machine's speed: the app runs on a ManualClock (see
tests/test_app.py) and nothing is timed. How long the frames take while a real scene
(the shipped DDPM) computes on the CPU is a figure, not a pass/fail: scripts/bench_slow_scene.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from engine.scenes import Scene, SceneCatalog
from engine.scenes.reaction_diffusion import ReactionDiffusion
from tests.test_app import default_doc, make_app, presets_dir, step_until  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
FIRST, SECOND = (250, 20, 20), (20, 20, 250)
HOLD = 60.0  # the longest the scene waits for the test; only reached if the render loop waited on it
BLOCKED_FRAMES = 120  # two seconds of show at 60 Hz while the scene is stuck


class Stuck(Scene):
    """A slow scene: its first image at once, then a second ``process()`` that does not
    return until the test opens ``gate`` (a model step that takes as long as it likes)."""

    name = "stuck"
    realtime = False
    uses_input = False
    entered = threading.Event()  # the second process() has started
    gate = threading.Event()  # the test lets it finish
    made: list[Stuck] = []

    def __init__(self, params, torch=None) -> None:
        super().__init__(params, torch=torch)
        self.calls = 0
        self.gave_up = False  # the gate never opened: the test was stuck too, i.e. the loop waited on us
        Stuck.made.append(self)

    def process(self, frame, t):
        self.calls += 1
        if self.calls == 1:
            return np.full((8, 8, 3), FIRST, np.uint8)
        if self.calls == 2:
            self.entered.set()
            self.gave_up = not self.gate.wait(HOLD)
        return np.full((8, 8, 3), SECOND, np.uint8)


def centre(app) -> np.ndarray:
    out = app.compositor.read_output()
    return out[out.shape[0] // 2, out.shape[1] // 2].astype(int)


def close_to(pixel: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return bool(np.abs(pixel - colour).max() <= 3)


def test_the_render_loop_keeps_producing_frames_while_the_scene_is_stuck_in_process(make_app) -> None:
    Stuck.entered.clear()
    Stuck.gate.clear()
    Stuck.made.clear()
    app = make_app(catalog=SceneCatalog((ReactionDiffusion, Stuck)))
    try:
        # only the scene's image on screen, so the pixel says which image is shown
        app.params.set_many(
            {
                "/scene/active": "stuck",
                "/layer/source/opacity": 0.0,
                "/fx/feedback/amount": 0.0,
                "/fx/kaleido/enabled": False,
                "/fx/vignette/enabled": False,
                "/fx/grade/enabled": False,
            },
            origin="test",
        )
        step_until(
            app,
            lambda: Stuck.entered.is_set() and close_to(centre(app), FIRST),
            "the first image on screen with the scene stuck in its second process()",
        )
        [scene] = Stuck.made

        frames, now = app.stats.frames, app.clock.now()
        for n in range(BLOCKED_FRAMES):
            app.step()
            assert close_to(centre(app), FIRST), f"frame {n} while the scene is stuck: not its last image"
        assert app.stats.frames - frames == BLOCKED_FRAMES
        assert app.clock.now() - now == pytest.approx(BLOCKED_FRAMES * app.clock.period), "show time: frame by frame"
        assert not Stuck.gate.is_set() and scene.calls == 2 and not scene.gave_up, (
            "the scene was stuck in process() the whole time, and the loop never waited on it"
        )
        assert app.worker.active_name == "stuck" and not app.errors_now()

        Stuck.gate.set()  # the slow step finishes: its image is taken on a later frame
        step_until(app, lambda: close_to(centre(app), SECOND), "the scene's next image on screen")
        assert not scene.gave_up
    finally:
        Stuck.gate.set()  # never leave the worker thread waiting, even when an assertion failed


def test_the_slow_scene_benchmark_prints_its_figures(tmp_path) -> None:
    """scripts/bench_slow_scene.py runs (a few frames) and reports every figure; its numbers
    are the machine's, so only their consistency is checked."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    out = tmp_path / "slow.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_slow_scene.py"),
            "--frames",
            "20",
            "--size",
            "320x180",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    computing = result["computing"]
    assert computing["frames"] == 20 and result["load"]["frames"] >= 1
    assert 0 < computing["mean_ms"] <= computing["longest_ms"] and computing["p99_ms"] <= computing["longest_ms"]
    assert result["size"] == [320, 180] and result["scene_images"] >= 0
    assert "computing: 20 frames, longest" in done.stdout and "scene images while computing" in done.stdout
