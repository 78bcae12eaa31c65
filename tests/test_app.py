"""The app's frame loop with real parts: headless EGL, real threads, real files.

The app runs frame by frame on a ManualClock; sources and the scene worker run on their
own threads in real time, so every wait steps the app until a condition holds, bounded
by a frame count and a wall-clock timeout. No test asserts on wall-clock speed.
"""

from __future__ import annotations

import os
import shutil
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import tomli_w

from engine.app import App, AppConfig
from engine.presets import is_presettable
from engine.render.hud import hud_lines
from engine.scenes import Scene, SceneCatalog
from engine.scenes.passthrough import Passthrough
from engine.scenes.reaction_diffusion import ReactionDiffusion
from engine.show import Show, ShowConfig, build_show

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = (480, 270)  # small output: llvmpipe renders it quickly; the code path is the same
TIMEOUT = 10.0
MAX_FRAMES = 3000


# -- helpers ----------------------------------------------------------------------------------


def step_until(
    app: App, condition: Callable[[], bool], what: str, frames: int = MAX_FRAMES, timeout: float = TIMEOUT
) -> int:
    """Step the app until ``condition`` holds; return the number of frames it took."""
    deadline = time.monotonic() + timeout
    for n in range(1, frames + 1):
        app.step()
        if condition():
            return n
        if time.monotonic() > deadline:
            break
        time.sleep(0.001)  # let the source and scene threads run on a small machine
    raise AssertionError(f"{what}: not after {n} frames; hud: {app.hud_lines()}")


def step(app: App, frames: int) -> None:
    for _ in range(frames):
        app.step()
        time.sleep(0.001)


def scene_showing(app: App, name: str) -> Callable[[], bool]:
    def check() -> bool:
        frame = app.worker.output.latest()[0]
        return frame is not None and frame.scene == name

    return check


def keeps_changing(app: App, changes: int = 4, min_change: float = 1.0) -> None:
    """Step until the output has visibly changed ``changes`` times in a row (bounded).

    The sources and the scene run in real time while the app steps on a manual clock, so
    a change takes however many frames the threads need; a frozen output never changes.
    """
    last = app.compositor.read_output()
    for n in range(changes):

        def moved(last: np.ndarray = last) -> bool:
            return np.abs(app.compositor.read_output().astype(int) - last).mean() > min_change

        step_until(app, moved, f"output change {n + 1} of {changes}", frames=600, timeout=5.0)
        last = app.compositor.read_output()


def presettable_values(app: App) -> dict:
    return {p.path: app.params.target(p.path) for p in app.params.params() if is_presettable(p)}


def other(choices: list, current: object) -> object:
    return next(c for c in choices if c != current)


@pytest.fixture
def default_doc() -> dict:
    return tomllib.loads((ROOT / "presets" / "default.toml").read_text(encoding="utf-8"))


@pytest.fixture
def presets_dir(tmp_path: Path, default_doc: dict) -> Path:
    """A private presets folder: the shipped default and a valid variant of it."""
    folder = tmp_path / "presets"
    folder.mkdir()
    shutil.copy(ROOT / "presets" / "default.toml", folder / "default.toml")
    variant = tomllib.loads(tomli_w.dumps(default_doc))  # a deep copy
    kaleido = variant.setdefault("fx", {}).setdefault("kaleido", {})
    kaleido["enabled"] = True
    kaleido["segments"] = other([9, 11], kaleido.get("segments"))
    layer = variant.setdefault("layer", {}).setdefault("scene", {})
    layer["blend"] = other(["difference", "add"], layer.get("blend"))
    (folder / "variant.toml").write_text(tomli_w.dumps(variant), encoding="utf-8")
    return folder


@pytest.fixture
def make_app(presets_dir: Path) -> Iterator[Callable[..., App]]:
    """Build (``build_show``, the app alone, headless) and start an App; closed at the end even when a test fails."""
    made: list[Show] = []

    def make(source: str = "pattern", catalog: SceneCatalog | None = None, **config: object) -> App:
        settings = {"source": source, "presets_dir": presets_dir, "output_size": OUTPUT, "hot_reload": False, **config}
        show = build_show(ShowConfig.bare(AppConfig(**settings)), catalog=catalog)
        made.append(show)
        return show.start().app

    yield make
    for show in made:
        show.close()


# -- frames -----------------------------------------------------------------------------------


def test_frames_render_are_not_blank_and_change(make_app) -> None:
    app = make_app()
    step_until(app, scene_showing(app, "reaction_diffusion"), "the scene's first image")
    step(app, 2)
    out = app.compositor.read_output()
    assert out.shape == (OUTPUT[1], OUTPUT[0], 3) and out.dtype == np.uint8
    assert out.std() > 10, "the output looks blank"
    assert len(np.unique(out.reshape(-1, 3)[::7], axis=0)) > 50, "the output has too few colours"
    keeps_changing(app)
    assert app.stats.frames > 5 and not app.errors_now()


def test_start_does_not_crossfade_from_black(make_app) -> None:
    app = make_app()
    app.step()
    assert app.compositor.transition_progress is None, "the first preset must not fade in like a change"
    assert app.preset_name == "default"


def test_each_frame_has_one_status_of_the_scene_preset_and_source(make_app) -> None:
    app = make_app()
    step_until(
        app,
        lambda: app.status.scene is not None and app.status.source.startswith("pattern ok"),
        "scene loaded and the pattern running",
    )
    app.step()  # the snapshot is made before the frame is counted: the first one has no rate yet
    status = app.status
    assert status.frame == app.stats.frames and status.time == app.clock.now()
    assert status.fps > 0 and status.frame_ms > 0
    assert status.scene == status.scene_selected == "reaction_diffusion" and status.scene_realtime
    assert status.scene_status == "" and status.scene_warning is None and status.scene_backend == ""
    assert status.preset == "default" and status.loading is None and status.loaded == ("reaction_diffusion",)
    assert status.errors == () and not status.source_fallback and status.fullscreen is None
    assert status.rss_mb is None or status.rss_mb > 10
    app.step()
    assert app.status.frame == status.frame + 1 and app.status.time > status.time, "a new snapshot per frame"
    assert hud_lines(app.status) == app.hud_lines()


# -- presets ----------------------------------------------------------------------------------


def test_preset_recall_lands_with_a_crossfade(make_app, presets_dir: Path) -> None:
    app = make_app()
    step_until(app, scene_showing(app, "reaction_diffusion"), "the scene's first image")
    assert app.compositor.transition_progress is None
    variant = tomllib.loads((presets_dir / "variant.toml").read_text(encoding="utf-8"))
    segments, blend = variant["fx"]["kaleido"]["segments"], variant["layer"]["scene"]["blend"]
    assert app.params.get("/fx/kaleido/segments") != segments

    assert app.recall_preset_now("variant") is True
    app.step()
    assert app.compositor.transition_progress is not None, "a preset recall must crossfade"
    assert app.params.get("/fx/kaleido/segments") == segments
    assert app.params.get("/layer/scene/blend") == blend
    assert app.preset_name == app.status.preset == "variant"
    step_until(app, lambda: app.compositor.transition_progress is None, "the crossfade to end", frames=200)
    assert app.status.errors == ()

    assert app.recall_preset_now(1) is True  # by number: sorted names, default first
    app.step()
    assert app.preset_name == "default" and app.params.get("/fx/kaleido/segments") != segments
    assert app.compositor.transition_progress is not None

    step_until(app, lambda: app.compositor.transition_progress is None, "the crossfade to end", frames=200)
    app.handle_action("preset:2")  # the key path: loaded on a thread, lands at a frame boundary
    step_until(app, lambda: app.params.get("/fx/kaleido/segments") == segments, "the keyed preset to land")
    assert app.preset_name == "variant" and app.compositor.transition_progress is not None


BROKEN_PRESETS = {
    "unknown_key": ("[fx.kaleido]\nenabled = true\nsegments = 3\nsegmnets = 5\n", "segmnets: unknown parameter"),
    "out_of_range": ("[fx.kaleido]\nenabled = true\nsegments = 999\n", "fx.kaleido.segments"),
    "bad_toml": ("[fx.kaleido\nsegments = 3\n", "TOML syntax error"),
}


@pytest.mark.parametrize("name", sorted(BROKEN_PRESETS))
def test_invalid_preset_is_refused_and_the_show_goes_on(make_app, presets_dir: Path, name: str) -> None:
    text, message = BROKEN_PRESETS[name]
    (presets_dir / f"{name}.toml").write_text(text, encoding="utf-8")
    app = make_app()
    step_until(app, scene_showing(app, "reaction_diffusion"), "the scene's first image")
    before = presettable_values(app)

    assert app.recall_preset_now(name) is False
    step(app, 3)
    assert presettable_values(app) == before, "a refused preset changed values"
    assert app.preset_name == "default"
    assert app.compositor.transition_progress is None, "a refused preset must not crossfade"
    errors = app.status.errors
    assert len(errors) == 1 and "preset refused" in errors[0] and message in errors[0], errors
    assert app.status.recent_errors[-1][1] == errors[0]
    keeps_changing(app)


def test_refused_preset_error_is_not_hidden_by_an_older_scene_error(make_app) -> None:
    catalog = SceneCatalog((ReactionDiffusion, Passthrough, BrokenLoad))
    app = make_app(catalog=catalog)
    step_until(app, scene_showing(app, "reaction_diffusion"), "the scene's first image")
    app.params.set("/scene/active", "broken_load", origin="osc")
    step_until(app, lambda: app.params.target("/scene/active") == "reaction_diffusion", "the revert")
    assert any("could not load" in e for e in app.status.errors)

    assert app.recall_preset_now("no_such_preset") is False
    app.step()
    assert any("could not load" in e for e in app.status.errors), "the older error is still shown"
    assert any("no preset named 'no_such_preset'" in e for e in app.status.errors), app.status.errors


# -- scenes -----------------------------------------------------------------------------------


def test_next_scene_crossfades_when_the_new_scene_has_a_frame(make_app) -> None:
    app = make_app(catalog=SceneCatalog((ReactionDiffusion, Passthrough)))
    step_until(app, scene_showing(app, "reaction_diffusion"), "the scene's first image")
    step_until(app, lambda: app.compositor.transition_progress is None, "no transition running")

    app.next_scene()
    for _ in range(MAX_FRAMES):
        app.step()
        if scene_showing(app, "passthrough")() and app.compositor.transition_progress is not None:
            break
        # until the new scene's first image, the old one shows and nothing fades
        assert app.compositor.transition_progress is None, "crossfade began before the new scene had a frame"
        time.sleep(0.001)
    else:
        raise AssertionError(f"no switch to passthrough; hud: {app.hud_lines()}")
    assert app.stats.scene_transitions == 1
    assert app.params.get("/scene/active") == "passthrough"
    assert app.status.scene == "passthrough" and app.status.scene_transitions == 1
    keeps_changing(app, changes=2)

    app.next_scene()  # wraps around to the first scene
    step_until(app, lambda: app.stats.scene_transitions == 2, "the switch back")
    assert app.params.get("/scene/active") == "reaction_diffusion"


class BrokenLoad(Scene):
    name = "broken_load"
    description = "A plugin whose model is missing"

    def load(self) -> None:
        raise FileNotFoundError("weights.safetensors")

    def process(self, frame: np.ndarray | None, t: float) -> np.ndarray:  # pragma: no cover - never loads
        raise AssertionError("never loaded")


class Noted(Scene):
    """A plugin that plays on through a problem of its own, and says so."""

    name = "noted"
    description = "Grey frames, with a state and a warning for the HUD"

    def process(self, frame: np.ndarray | None, t: float) -> np.ndarray:
        self.status = "warming up"
        self.warning = "noted: the lamp is cold"
        return np.full((36, 64, 3), 128, np.uint8)


def test_a_scene_shows_its_state_and_warning_in_the_status(make_app) -> None:
    app = make_app(catalog=SceneCatalog((ReactionDiffusion, Noted)))
    step_until(app, lambda: app.status.scene == "reaction_diffusion", "the first scene")
    assert app.status.scene_status == "" and app.status.errors == ()
    app.params.set("/scene/active", "noted", origin="osc")
    step_until(app, lambda: app.status.scene == "noted" and app.status.scene_status, "the noted scene's state")
    assert app.status.scene_status == "warming up" and app.status.scene_warning == "noted: the lamp is cold"
    assert "noted: the lamp is cold" in app.status.errors, "a warning is shown with the errors"
    assert app.status.last_change is not None and app.status.last_change.path == "/scene/active"


def test_scene_that_fails_to_load_reverts_and_reports(make_app) -> None:
    catalog = SceneCatalog((ReactionDiffusion, Passthrough, BrokenLoad))
    app = make_app(catalog=catalog)
    step_until(app, scene_showing(app, "reaction_diffusion"), "the scene's first image")

    app.params.set("/scene/active", "broken_load", origin="osc")
    app.step()
    assert app.params.get("/scene/active") == "broken_load"
    step_until(
        app,
        lambda: app.params.target("/scene/active") == "reaction_diffusion",
        "/scene/active to revert to the playing scene",
    )
    step(app, 2)
    assert app.params.get("/scene/active") == "reaction_diffusion"
    assert app.worker.active_name == "reaction_diffusion"
    errors = app.status.errors
    assert any("broken_load could not load" in e and "weights.safetensors" in e for e in errors), errors
    assert app.stats.scene_transitions == 0
    keeps_changing(app)

    app.next_scene()  # the catalog order goes on from the playing scene
    step_until(app, scene_showing(app, "passthrough"), "passthrough after the failure")


# -- a video file that vanishes ----------------------------------------------------------------


def write_clip(path: Path, fourcc: str = "MJPG", frames: int = 12) -> Path:
    """A short 160x90 clip of a bar sweeping across: it loops (re-opens) three times a second."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 30, (160, 90))
    assert writer.isOpened(), f"cannot write {fourcc} video here"
    for i in range(frames):
        frame = np.full((90, 160, 3), 40, np.uint8)
        frame[:, i * 12 : i * 12 + 24] = (40, 200, 250)  # BGR
        writer.write(frame)
    writer.release()
    return path


def test_vanishing_video_file_falls_back_to_the_pattern_and_recovers(make_app, tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.avi")
    app = make_app(source=f"file:{clip}")
    step_until(app, lambda: app.status.source.startswith("file:clip.avi ok"), "the file playing")
    frame, _, fallback = app.input.latest()
    assert not fallback and frame.shape == (90, 160, 3)
    keeps_changing(app, changes=2)

    hidden = clip.rename(tmp_path / "moved-away.avi")
    step_until(app, lambda: " lost " in app.status.source, "the loss to show in the status")
    line = app.status.source
    assert "file:clip.avi lost" in line and "showing pattern" in line, line
    step_until(
        app,
        lambda: app.input.latest()[2] and app.input.latest()[0].shape[:2] != (90, 160),
        "pattern frames on the source layer",
    )
    keeps_changing(app)  # the show goes on: the pattern moves, the scene lives
    key = app.input.latest()[1]
    step_until(app, lambda: app.input.latest()[1] >= key + 3 and app.input.latest()[2], "new pattern frames")
    assert " lost " in app.status.source

    hidden.rename(clip)
    step_until(
        app,
        lambda: not app.input.latest()[2] and app.status.source.startswith("file:clip.avi ok"),
        "the file back on the source layer",
    )
    assert app.input.latest()[0].shape == (90, 160, 3)
    keeps_changing(app, changes=2)


# -- screenshots ------------------------------------------------------------------------------


def test_screenshot_writes_a_png_atomically(make_app, tmp_path: Path) -> None:
    app = make_app()
    step_until(app, scene_showing(app, "reaction_diffusion"), "the scene's first image")
    shots = tmp_path / "shots"
    path = app.screenshot(shots / "shot.png")  # the folder is made when missing
    assert path == shots / "shot.png"
    assert path.stat().st_mode & 0o777 == 0o644, "a new screenshot must be readable by others"
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image.shape == (OUTPUT[1], OUTPUT[0], 3)
    np.testing.assert_array_equal(image[:, :, ::-1], app.compositor.read_output())  # lossless, RGB order

    step(app, 5)
    path.chmod(0o640)
    app.screenshot(path)  # replaced whole, keeping its permissions
    assert path.stat().st_mode & 0o777 == 0o640
    np.testing.assert_array_equal(cv2.imread(str(path))[:, :, ::-1], app.compositor.read_output())
    assert sorted(p.name for p in shots.iterdir()) == ["shot.png"], "a temporary file was left behind"

    old = path.read_bytes()
    with pytest.raises(ValueError, match="cannot encode"):
        app.screenshot(shots / "shot.xyz")
    assert path.read_bytes() == old and sorted(p.name for p in shots.iterdir()) == ["shot.png"]

    os.chmod(shots, 0o500)  # a folder it cannot write into: an error, and the old file intact
    try:
        if os.access(shots, os.W_OK):
            return  # running as root: permissions are not enforced
        with pytest.raises(OSError):
            app.screenshot(path)
        assert path.read_bytes() == old
    finally:
        os.chmod(shots, 0o700)


class OutOfMemoryError(RuntimeError):
    """Named like torch.OutOfMemoryError: the worker recognises it by name, without torch."""


class Greedy(Scene):
    name = "greedy"
    description = "Runs out of accelerator memory on its third image"

    def load(self) -> None:
        self.images = 0

    def process(self, frame: np.ndarray | None, t: float) -> np.ndarray | None:
        self.images += 1
        if self.images > 2:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return frame


def test_out_of_memory_goes_back_to_the_previous_scene(make_app) -> None:
    app = make_app(catalog=SceneCatalog((ReactionDiffusion, Passthrough, Greedy)))
    step_until(app, scene_showing(app, "reaction_diffusion"), "the first scene")
    app.select_scene("greedy")
    step_until(app, scene_showing(app, "greedy"), "the greedy scene's first image")
    step_until(
        app,
        lambda: (
            app.worker.active_name == "reaction_diffusion" and app.params.get("/scene/active") == "reaction_diffusion"
        ),
        "the way back",
    )
    assert any("ran out of accelerator memory: back to reaction_diffusion" in e for e in app.status.errors)
    step_until(app, scene_showing(app, "reaction_diffusion"), "the previous scene's images again")
