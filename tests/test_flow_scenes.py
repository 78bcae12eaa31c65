"""The flow scenes through the real scene worker: SANA-Sprint every frame, FLUX / SD3 one image at a
time (and the flow itself), and the bad inputs that must leave the previous scene playing.

Tiny random-weight pipelines (diffusers' own test components) saved to folders stand in for
the real models (``model`` points at them); every wait polls with a timeout; no speed asserted.
The scene classes are put into the catalog here, so nothing depends on the entry points being
installed (``pip install -e .`` adds ``flow`` and ``sana_sprint`` to the installed catalog).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="the diffusion extra is not installed")

from diffusion_fixtures import StillFeed, offline, one_torch_thread, set_params, wait_for  # noqa: E402,F401
from engine.catalog import PRESETS_DIR, build_registry  # noqa: E402
from engine.diffusion.flow_configs import build_tiny_flow_pipeline  # noqa: E402
from engine.presets import load_preset  # noqa: E402
from engine.scenes import SceneCatalog, SceneWorker  # noqa: E402
from engine.scenes.flow import FlowScene, SanaSprintScene  # noqa: E402
from engine.scenes.passthrough import Passthrough  # noqa: E402
from engine.scenes.plugins import find_scenes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SANA, FLOW = "/scene/sana_sprint", "/scene/flow"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flow-models")
    made = {}
    for kind in ("flux", "sd3", "sana_sprint"):
        build_tiny_flow_pipeline(kind).save_pretrained(root / kind)
        made[kind] = root / kind
    no_t5 = build_tiny_flow_pipeline("flux")
    no_t5.text_encoder_2 = None  # a FLUX saved without its T5
    no_t5.register_modules(text_encoder_2=None, tokenizer_2=None)
    no_t5.save_pretrained(root / "flux-no-t5")
    made["flux-no-t5"] = root / "flux-no-t5"
    from diffusers import EulerDiscreteScheduler

    euler = build_tiny_flow_pipeline("sd3")
    euler.register_modules(scheduler=EulerDiscreteScheduler())
    euler.save_pretrained(root / "sd3-euler")
    made["sd3-euler"] = root / "sd3-euler"
    big = build_tiny_flow_pipeline("flux")  # named as the real one: its published footprint applies
    big.save_pretrained(root / "FLUX.1-schnell")
    made["big"] = root / "FLUX.1-schnell"
    return made


@pytest.fixture
def show(folders):
    params = build_registry(SceneCatalog((Passthrough, SanaSprintScene, FlowScene)))
    set_params(
        params,
        {
            f"{SANA}/model": str(folders["sana_sprint"]),
            f"{SANA}/resolution": 32,
            f"{SANA}/device": "cpu",
            f"{SANA}/accel": "eager",
            f"{SANA}/similarity_threshold": 0.0,
            f"{FLOW}/model": str(folders["flux"]),
            f"{FLOW}/resolution": 32,
            f"{FLOW}/device": "cpu",
            f"{FLOW}/steps": 3,
            f"{FLOW}/hold": 0.0,
            f"{FLOW}/step_rate": 60.0,
            "/scene/memory_budget": 0,
        },
    )
    catalog = SceneCatalog((Passthrough, SanaSprintScene, FlowScene))
    worker = SceneWorker(catalog, params, StillFeed(), error_backoff=0.05)
    worker.start()
    worker.request("passthrough")
    assert wait_for(lambda: worker.active_name == "passthrough")
    yield worker, params
    worker.stop()


def newest(worker: SceneWorker, after: int = 0, scene: str = "sana_sprint"):
    found = []

    def ready() -> bool:
        frame, _ = worker.output.latest()
        if frame is not None and frame.scene == scene and frame.index > after:
            found.append(frame)
            return True
        return False

    assert wait_for(ready), f"no new {scene} image; last error: {worker.last_error}"
    return found[-1]


def test_importing_the_flow_scenes_needs_no_torch():
    code = "import sys, engine.scenes.flow; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False False", done.stderr


def test_sana_sprint_plays_every_frame_and_takes_live_changes(show):
    worker, params = show
    worker.request("sana_sprint")
    first = newest(worker)
    assert first.image.shape == (32, 32, 3) and first.image.dtype == np.uint8
    assert np.array_equal(newest(worker, first.index).image, first.image)  # still camera, fixed noise
    set_params(params, {f"{SANA}/prompt": "a dog on the moon"})
    assert wait_for(lambda: not np.array_equal(newest(worker).image, first.image))
    set_params(params, {f"{SANA}/steps": 2, f"{SANA}/seed": 7})  # a new stream around the same model
    assert newest(worker, newest(worker).index + 2).image.shape == (32, 32, 3)
    assert worker.last_error is None and "sana_sprint" in worker.active.status


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_the_flow_scene_shows_the_trajectory_then_the_image(show, folders, kind):
    worker, params = show
    set_params(params, {f"{FLOW}/model": str(folders[kind]), f"{FLOW}/show": "trajectory", f"{FLOW}/source": "noise"})
    worker.request("flow")
    frames = [newest(worker, scene="flow")]
    for _ in range(5):
        frames.append(newest(worker, frames[-1].index, scene="flow"))
    images = [f.image for f in frames]
    assert all(i.shape == (32, 32, 3) for i in images)
    assert len({i.tobytes() for i in images}) >= 3  # points on the way, then new images (evolve: next seed)
    assert worker.active.images >= 1 and worker.last_error is None


def test_the_flow_scene_in_image_mode_gives_finished_images_from_the_camera(show):
    worker, params = show
    set_params(params, {f"{FLOW}/show": "image", f"{FLOW}/source": "camera", f"{FLOW}/evolve": False})
    worker.request("flow")
    first = newest(worker, scene="flow")
    second = newest(worker, first.index, scene="flow")
    assert np.array_equal(first.image, second.image)  # the same camera, seed and prompt: the same image
    set_params(params, {f"{FLOW}/seed": 5})
    assert wait_for(lambda: not np.array_equal(newest(worker, scene="flow").image, first.image))


def test_a_model_over_the_memory_budget_is_refused_with_the_figures(show, folders):
    worker, params = show
    set_params(params, {f"{FLOW}/model": str(folders["big"]), "/scene/memory_budget": 24000})
    worker.request("flow")
    assert wait_for(lambda: worker.failed == "flow")
    assert worker.active_name == "passthrough"
    error = worker.last_error
    assert "needs about 35800 MB" in error and "the budget is 24000 MB" in error, error
    assert "/scene/memory_budget 35800 or more" in error and "text_offload on (26000 MB)" in error, error
    before = newest(worker, scene="passthrough").index
    newest(worker, before, scene="passthrough")  # and the show plays on


@pytest.mark.parametrize(
    "model, said",
    [
        ("flux-no-t5", "has no text_encoder_2"),
        ("sd3-euler", "runs FlowMatchEulerDiscreteScheduler, this model has EulerDiscreteScheduler"),
    ],
)
def test_a_missing_text_encoder_or_an_unsupported_scheduler_is_one_line(show, folders, model, said):
    worker, params = show
    set_params(params, {f"{FLOW}/model": str(folders[model])})
    worker.request("flow")
    assert wait_for(lambda: worker.failed == "flow")
    assert worker.active_name == "passthrough" and said in worker.last_error, worker.last_error
    assert "\n" not in worker.last_error


def test_a_gated_model_without_a_token_says_how_to_get_one(show, monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # this machine has no token
    worker, params = show
    set_params(params, {f"{FLOW}/model": "stabilityai/stable-diffusion-3.5-large-turbo"})
    worker.request("flow")
    assert wait_for(lambda: worker.failed == "flow")
    assert "it is gated: accept its licence" in worker.last_error and "hf auth login" in worker.last_error


def test_the_shipped_flow_presets_set_real_parameters():
    """The presets against a registry with the flow scenes in it (and the installed ones)."""
    scenes = tuple(f.scene for f in find_scenes())
    catalog = SceneCatalog(
        tuple(s for s in scenes if s.name not in ("flow", "sana_sprint")) + (SanaSprintScene, FlowScene)
    )
    registry = build_registry(catalog)
    for name, scene in (("sana-sprint", "sana_sprint"), ("flux-schnell", "flow"), ("sd35", "flow")):
        preset = load_preset(PRESETS_DIR / f"{name}.toml", registry)
        values = dict(preset.values)
        assert values["/scene/active"] == scene
        assert any(path.startswith(f"/scene/{scene}/") for path in values)


def test_the_flow_parameters_reach_the_registry_with_their_ranges():
    registry = build_registry(SceneCatalog((Passthrough, SanaSprintScene, FlowScene)))
    for path in (f"{SANA}/strength", f"{SANA}/steps", f"{FLOW}/show", f"{FLOW}/step_rate", f"{FLOW}/text_offload"):
        assert path in registry
    assert registry.param(f"{FLOW}/show").choices == ("image", "trajectory", "x0")
    from engine.control.oscquery import build_tree, find_node
    from engine.params import ParamError

    tree = build_tree(registry, ())
    node = find_node(tree, "/dreamdeck/scene/flow/show")
    assert node is not None and node["RANGE"] == [{"VALS": ["image", "trajectory", "x0"]}]  # OSCQuery sees it
    assert find_node(tree, "/dreamdeck/scene/sana_sprint/strength") is not None

    with pytest.raises(ParamError, match="out of range"):  # what OSC and the web page are told
        registry.set_many({f"{SANA}/strength": 5.0})
    set_params(registry, {f"{SANA}/strength": 0.8, f"{FLOW}/show": "x0"})
    assert registry.get(f"{SANA}/strength") == 0.8 and registry.get(f"{FLOW}/show") == "x0"


def test_a_model_that_is_not_a_flow_model_is_one_line(show, tmp_path):
    from engine.diffusion.configs import build_random_model

    build_random_model("tiny").save_pretrained(tmp_path / "sd-tiny")
    worker, params = show
    set_params(params, {f"{FLOW}/model": str(tmp_path / "sd-tiny")})
    worker.request("flow")
    assert wait_for(lambda: worker.failed == "flow")
    assert "is a StableDiffusionImg2ImgPipeline, not a FLUX, SD3 or SANA-Sprint pipeline" in worker.last_error
    assert worker.active_name == "passthrough"


def test_declared_memory_is_the_published_footprint_or_the_files_on_disk(folders):
    from engine.diffusion.flow_loading import FlowSpec, declared_mb

    assert declared_mb(FlowSpec("Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers")) == 8650
    assert declared_mb(FlowSpec("/models/flux1-schnell.safetensors", offload_text=True)) == 26000
    assert declared_mb(FlowSpec("stabilityai/stable-diffusion-3.5-large-turbo")) == 29700
    on_disk = declared_mb(FlowSpec(str(folders["sd3"])))  # an unknown folder: its weights + 2000 MB working memory
    assert 2000 < on_disk < 2100
    assert declared_mb(FlowSpec("someone/unknown-model")) == 0  # nothing known before loading: not refused


def test_sd3_guidance_above_one_plays_with_classifier_free_guidance(show, folders):
    worker, params = show
    set_params(params, {f"{FLOW}/model": str(folders["sd3"]), f"{FLOW}/guidance": 4.5, f"{FLOW}/show": "image"})
    worker.request("flow")
    newest(worker, scene="flow")
    assert worker.active._stream.cfg is True
    set_params(params, {f"{FLOW}/guidance": 0.0})  # Large Turbo's setting: a stream without the negative pass
    assert wait_for(lambda: worker.active._stream.cfg is False)
    newest(worker, newest(worker, scene="flow").index, scene="flow")
    assert worker.last_error is None
