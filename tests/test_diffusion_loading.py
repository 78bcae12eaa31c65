"""Models saved and loaded back through the real loading code, offline, as users keep them.

A local diffusers folder, a hub id in a Hugging Face cache (the ``models--org--name``
layout huggingface_hub writes), a single-file checkpoint, a LoRA and a TAESD folder. Every
round trip compares weights exactly. A model that is not there gives ``ModelNotFound``
with one message that names it and how to get it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="the diffusion extra is not installed")

from diffusion_fixtures import offline, one_torch_thread, tiny  # noqa: E402,F401  (fixtures)
from engine.diffusion.configs import TINY_TAESD, build_random_model  # noqa: E402
from engine.diffusion.device import choose_device  # noqa: E402
from engine.diffusion.errors import ModelNotFound  # noqa: E402
from engine.diffusion.loading import ModelSpec, load_model  # noqa: E402
from engine.diffusion.single_file import save_single_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CPU = choose_device("cpu")
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny-turbo"
    tiny.save_pretrained(folder)
    return folder


def hub_cache(root: Path, repo_id: str, folder: Path) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return root


def assert_same_weights(a, b) -> None:
    for part in ("unet", "vae", "text_encoder"):
        left, right = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert left.keys() == right.keys(), part
        for key in left:
            assert torch.equal(left[key], right[key]), f"{part}.{key}"


def test_local_folder(tiny, saved):
    loaded = load_model(ModelSpec(model=str(saved)), CPU)
    assert_same_weights(tiny, loaded)
    assert type(loaded.scheduler).__name__ == "EulerDiscreteScheduler"
    assert loaded.scheduler.config.timestep_spacing == "trailing"


def test_hub_id_from_a_local_cache_offline(tiny, saved, tmp_path):
    cache = hub_cache(tmp_path / "hub", "dreamdeck-test/tiny-turbo", saved)
    loaded = load_model(ModelSpec(model="dreamdeck-test/tiny-turbo", cache_dir=str(cache)), CPU)
    assert_same_weights(tiny, loaded)


def test_hub_id_from_the_standard_cache_and_a_missing_one(saved, tmp_path):
    """A fresh process with only HF_HOME set: the default cache, as a user's machine has it."""
    hub_cache(tmp_path / "home" / "hub", "dreamdeck-test/tiny-turbo", saved)
    script = (
        "from engine.diffusion.device import choose_device\n"
        "from engine.diffusion.loading import ModelSpec, load_model\n"
        "from engine.diffusion.errors import ModelNotFound\n"
        "model = load_model(ModelSpec(model='dreamdeck-test/tiny-turbo'), choose_device('cpu'))\n"
        "print('loaded', type(model.unet).__name__)\n"
        "try:\n"
        "    load_model(ModelSpec(model='dreamdeck-test/not-downloaded'), choose_device('cpu'))\n"
        "except ModelNotFound as exc:\n"
        "    print('missing', exc)\n"
    )
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded UNet2DConditionModel" in done.stdout
    missing = next(line for line in done.stdout.splitlines() if line.startswith("missing"))
    assert "dreamdeck-test/not-downloaded" in missing and "hf download dreamdeck-test/not-downloaded" in missing
    assert str(tmp_path / "home" / "hub") in missing


def test_missing_hub_model_offline_is_one_clear_message(tmp_path):
    with pytest.raises(ModelNotFound) as caught:
        load_model(ModelSpec(model="dreamdeck-test/missing", cache_dir=str(tmp_path)), CPU)
    message = str(caught.value)
    assert "\n" not in message
    assert "'dreamdeck-test/missing'" in message and "hf download dreamdeck-test/missing" in message
    assert "HF_HUB_OFFLINE=1" in message and str(tmp_path) in message


def test_missing_local_path_is_model_not_found(tmp_path):
    for name in (str(tmp_path / "nothing-here"), str(tmp_path / "model.safetensors"), "not a hub id"):
        with pytest.raises(ModelNotFound, match="no such folder or file"):
            load_model(ModelSpec(model=name), CPU)


def test_single_file_with_its_config_folder(tiny, saved, tmp_path):
    checkpoint = save_single_file(tiny, tmp_path / "tiny-turbo.safetensors")
    loaded = load_model(ModelSpec(model=str(checkpoint), config=str(saved)), CPU)
    assert_same_weights(tiny, loaded)
    assert loaded.scheduler.config.timestep_spacing == "trailing"


def test_single_file_offline_without_config_says_what_it_needs(tiny, tmp_path):
    checkpoint = save_single_file(tiny, tmp_path / "tiny-turbo.safetensors")
    with pytest.raises(ModelNotFound, match="needs the diffusers configs"):
        load_model(ModelSpec(model=str(checkpoint)), CPU)


def test_lcm_lora_is_fused_and_selects_lcm(tiny, saved, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    adapted = build_random_model("tiny")  # the same weights as ``tiny`` (seeded), plus a LoRA
    adapted.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    lora_folder = tmp_path / "tiny-lcm-lora"
    StableDiffusionPipeline.save_lora_weights(lora_folder, unet_lora_layers=get_peft_model_state_dict(adapted.unet))

    fused = load_model(ModelSpec(model=str(saved), lora=str(lora_folder)), CPU)
    assert type(fused.scheduler).__name__ == "LCMScheduler"
    assert not any("lora" in name for name in fused.unet.state_dict())  # a plain UNet again
    torch.manual_seed(0)
    inputs = (torch.randn(1, 4, 16, 16), torch.tensor([499.0]), torch.randn(1, 77, 32))
    with torch.no_grad():
        expected = adapted.unet(*inputs).sample
        assert torch.allclose(fused.unet(*inputs).sample, expected, atol=1e-5)
        assert not torch.allclose(tiny.unet(*inputs).sample, expected, atol=1e-3)


def test_tiny_vae_from_a_folder(saved, tmp_path):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(**TINY_TAESD).save_pretrained(tmp_path / "taesd")
    loaded = load_model(ModelSpec(model=str(saved), tiny_vae=str(tmp_path / "taesd")), CPU)
    assert type(loaded.vae).__name__ == "AutoencoderTiny"
    from engine.diffusion.stream import LiveSettings, StreamConfig, StreamImg2Img

    stream = StreamImg2Img(loaded, CPU, StreamConfig(size=(32, 32)), LiveSettings(similarity_threshold=0.0))
    assert stream.prompts.wait(30)
    image = stream(torch.randint(0, 256, (48, 64, 3), dtype=torch.uint8).numpy())
    assert image.shape == (32, 32, 3)


def test_other_schedulers_become_trailing_euler(tiny, tmp_path):
    from diffusers import PNDMScheduler

    replace(tiny, scheduler=PNDMScheduler(skip_prk_steps=True)).save_pretrained(tmp_path / "pndm")
    loaded = load_model(ModelSpec(model=str(tmp_path / "pndm")), CPU)
    assert type(loaded.scheduler).__name__ == "EulerDiscreteScheduler"
    assert loaded.scheduler.config.timestep_spacing == "trailing"
