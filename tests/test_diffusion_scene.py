"""The ``realtime`` scene through the real scene worker: it plays, it takes live changes, and
when a model is missing or memory runs out the previous scene keeps playing.

A tiny random-weight model saved to a folder stands in for SD-turbo (``model`` points at
it); every wait is a polling loop with a timeout, and no test asserts on speed.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="the diffusion extra is not installed")

from diffusion_fixtures import StillFeed, offline, one_torch_thread, set_params, wait_for  # noqa: E402,F401  (fixtures)
from engine.diffusion.configs import build_random_model  # noqa: E402
from engine.params import ParamRegistry  # noqa: E402
from engine.scenes import SceneCatalog, SceneWorker  # noqa: E402
from engine.scenes.passthrough import Passthrough  # noqa: E402
from engine.scenes.realtime import RealtimeScene  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
P = "/scene/realtime"


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    build_random_model("tiny", seed=0).save_pretrained(root / "tiny-a")
    build_random_model("tiny", seed=1).save_pretrained(root / "tiny-b")
    return root / "tiny-a", root / "tiny-b"


@pytest.fixture
def show(model_folders):
    """A worker playing passthrough, with the realtime scene set up for the tiny model."""
    params = ParamRegistry()
    params.declare_all(RealtimeScene.PARAMS)
    set_params(
        params,
        {
            f"{P}/model": str(model_folders[0]),
            f"{P}/vae": "",
            f"{P}/resolution": 32,
            f"{P}/device": "cpu",
            f"{P}/accel": "eager",
            f"{P}/similarity_threshold": 0.0,
        },
    )
    worker = SceneWorker(SceneCatalog((Passthrough, RealtimeScene)), params, StillFeed(), error_backoff=0.05)
    worker.start()
    worker.request("passthrough")
    assert wait_for(lambda: worker.active_name == "passthrough")
    yield worker, params
    worker.stop()


def newest(worker: SceneWorker, after: int = 0, scene: str = "realtime"):
    """The newest output of ``scene`` with an index above ``after`` (waits for it)."""
    found = []

    def ready() -> bool:
        frame, _ = worker.output.latest()
        if frame is not None and frame.scene == scene and frame.index > after:
            found.append(frame)
            return True
        return False

    assert wait_for(ready), f"no new {scene} image; last error: {worker.last_error}"
    return found[-1]


def test_importing_the_scene_needs_no_torch():
    code = "import sys, engine.scenes.realtime; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False False", done.stderr


def test_the_scene_plays_and_takes_live_changes(show):
    worker, params = show
    worker.request("realtime")
    first = newest(worker)
    assert first.image.shape == (32, 32, 3) and first.image.dtype == np.uint8
    again = newest(worker, first.index)
    assert np.array_equal(again.image, first.image)  # a still camera and fixed noise: a still image
    set_params(params, {f"{P}/prompt": "a dog on the moon"})
    assert wait_for(lambda: not np.array_equal(newest(worker).image, first.image))
    set_params(params, {f"{P}/steps": 2, f"{P}/seed": 7})  # rebuilds the stream around the same model
    changed = newest(worker, newest(worker).index + 2)
    assert changed.image.shape == (32, 32, 3)
    assert worker.last_error is None


def test_the_first_diffused_frame_is_timed_from_the_loaded_weights(show, caplog):
    worker, params = show
    caplog.set_level(logging.INFO, logger="engine.scenes.realtime")
    asked = time.monotonic()
    worker.request("realtime")
    newest(worker)
    since_asked = time.monotonic() - asked
    scene = worker.active
    assert isinstance(scene, RealtimeScene) and scene.first_frame_s is not None
    assert 0 < scene.first_frame_s < since_asked  # the load itself is not counted, the first frame is
    lines = [r.getMessage() for r in caplog.records if "first diffused frame" in r.getMessage()]
    assert len(lines) == 1 and f"{scene.first_frame_s:.2f} s after the weights loaded" in lines[0]
    assert scene.status == "cpu (float32) eager" and scene.warning is None  # the HUD's view of it


def test_dreamdeck_run_device_dtype_and_accel_reach_the_scene(model_folders, tmp_path):
    """``dreamdeck run --device cpu --dtype bfloat16 --accel eager``: a real run, a real log."""
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "tiny.toml").write_text(
        f'[preset]\ndescription = "tiny realtime"\n\n[scene]\nactive = "realtime"\n\n'
        f'[scene.realtime]\nmodel = "{model_folders[0]}"\nvae = ""\nresolution = 32\n',
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "--no-log-file",
            "run",
            "--headless",
            "--fresh",
            "--no-status",
            "--no-osc",
            "--presets-dir",
            str(presets),
            "--preset",
            "tiny",
            "--frames",
            "600",
            "--device",
            "cpu",
            "--dtype",
            "bfloat16",
            "--accel",
            "eager",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"realtime: {model_folders[0]} on cpu (bfloat16), 32x32, 1 step(s), accel eager" in done.stderr
    assert "realtime: first diffused frame" in done.stderr, done.stderr[-3000:]


def test_weighted_prompts_blend_and_a_bad_one_is_refused_while_the_last_plays_on(show):
    worker, params = show
    worker.request("realtime")
    plain = newest(worker)
    set_params(params, {f"{P}/prompt": "a dog on the moon:1 | a cat:0.5"})  # two prompts, slerp-blended
    assert wait_for(lambda: not np.array_equal(newest(worker).image, plain.image))
    blended = newest(worker)
    scene = worker.active
    set_params(params, {f"{P}/prompt": "a dog on the moon:-1"})  # a push away: vqgan_clip's, not ours
    assert wait_for(lambda: scene.warning is not None and "negative weight" in scene.warning)
    later = newest(worker, blended.index)
    assert np.array_equal(later.image, blended.image)  # the last good prompt plays on
    assert worker.last_error is None
    set_params(params, {f"{P}/prompt": "a dog on the moon:1 | a cat:0.5"})
    assert wait_for(lambda: scene.warning is None)


def test_any_resolution_a_fader_sends_is_rounded_to_one_the_model_takes(show):
    worker, params = show
    worker.request("realtime")
    newest(worker)
    for asked, made in ((45, 44), (1, 8)):  # the tiny test model takes multiples of 4, from 8 (SD: of 64, from 128)
        set_params(params, {f"{P}/resolution": asked})
        assert wait_for(lambda made=made: newest(worker).image.shape == (made, made, 3)), newest(worker).image.shape
    assert worker.last_error is None and worker.active.warning is None


def test_steps_that_cannot_play_at_this_strength_are_refused_while_the_last_stream_plays_on(show, tmp_path):
    worker, params = show
    lcm = tmp_path / "tiny-lcm"
    build_random_model("tiny", scheduler="lcm", time_cond_proj_dim=32).save_pretrained(lcm)
    set_params(params, {f"{P}/model": str(lcm), f"{P}/strength": 0.05})
    worker.request("realtime")
    playing = newest(worker)
    scene = worker.active
    set_params(params, {f"{P}/steps": 4})  # LCM: 50 x 0.05 is fewer than 4 steps
    assert wait_for(lambda: scene.warning is not None and "steps 4" in scene.warning), scene.warning
    assert np.array_equal(newest(worker, playing.index).image, playing.image)  # the 1-step stream plays on
    assert worker.last_error is None
    set_params(params, {f"{P}/strength": 0.5})  # at a higher strength, 4 steps play
    assert wait_for(lambda: scene._stream.config.steps == 4 and scene.warning is None), scene.warning
    set_params(params, {f"{P}/steps": 1})
    assert wait_for(lambda: scene._stream.config.steps == 1 and scene.warning is None), scene.warning


def test_a_missing_model_keeps_the_previous_scene(show):
    worker, params = show
    set_params(params, {f"{P}/model": "dreamdeck-test/missing-model"})
    worker.request("realtime")
    assert wait_for(lambda: worker.failed == "realtime")
    assert worker.active_name == "passthrough"
    assert "ModelNotFound" in worker.last_error and "hf download dreamdeck-test/missing-model" in worker.last_error
    before = newest(worker, scene="passthrough").index
    newest(worker, before, scene="passthrough")  # and it keeps playing


def test_out_of_memory_while_loading_keeps_the_previous_scene(show, monkeypatch):
    import engine.diffusion.loading as loading

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loading, "load_model", no_memory)
    worker, _ = show
    worker.request("realtime")
    assert wait_for(lambda: worker.failed == "realtime")
    assert worker.active_name == "passthrough" and "OutOfMemoryError" in worker.last_error


def test_out_of_memory_while_playing_goes_back_to_the_previous_scene(show, monkeypatch):
    from engine.diffusion.stream import StreamImg2Img

    worker, _ = show
    worker.request("realtime")
    newest(worker)

    def no_memory(self, frame):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(StreamImg2Img, "__call__", no_memory)  # the next frames run out of memory
    assert wait_for(lambda: worker.last_error is not None and "ran out of accelerator memory" in worker.last_error)
    assert worker.failed == "realtime"  # the app reverts /scene/active with this
    assert wait_for(lambda: worker.active_name == "passthrough")  # the scene that played before
    newest(worker, scene="passthrough")  # and it plays


def test_a_model_change_loads_in_the_background(show, model_folders):
    worker, params = show
    worker.request("realtime")
    first = newest(worker)
    set_params(params, {f"{P}/model": str(model_folders[1])})
    assert wait_for(lambda: not np.array_equal(newest(worker).image, first.image))  # other weights, other image
    set_params(params, {f"{P}/model": "dreamdeck-test/missing-model"})
    assert wait_for(lambda: worker.last_error is not None and "missing-model" in worker.last_error)
    current = newest(worker)
    newest(worker, current.index)  # the loaded model plays on
    assert worker.active_name == "realtime"
