"""SDXL-turbo on the hot path is diffusers' SDXL img2img, provably: two text encoders, the pooled
embedding and the added time ids through the UNet call (and through an SDXL ControlNet's).

diffusers' own tiny SDXL test components (random weights, CPU, float32) against
``StableDiffusionXLImg2ImgPipeline`` and ``StableDiffusionXLControlNetImg2ImgPipeline`` with
SDXL-turbo's settings (no aesthetic score, guidance 0, trailing Euler), told only to take the
VAE posterior's mean as the hot path does. A different input must give a clearly different image.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="the diffusion extra is not installed")

from PIL import Image  # noqa: E402

from diffusion_fixtures import blob_frames, offline, one_torch_thread  # noqa: E402,F401  (fixtures)
from engine.diffusion.configs import build_random_model  # noqa: E402
from engine.diffusion.controlnet import TINY_CONTROLNET, ControlUnit, random_controlnet, source_image  # noqa: E402
from engine.diffusion.device import choose_device  # noqa: E402
from engine.diffusion.stream import LiveSettings, StreamConfig, StreamImg2Img  # noqa: E402

SIZE = 32
ROUNDING = 0.5 / 255 + 1e-4
CPU = choose_device("cpu")
TINY_XL_CONTROLNET = {  # diffusers' tests/pipelines/controlnet/test_controlnet_sdxl_img2img.py (6 time ids)
    **TINY_CONTROLNET,
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": [1, 2],
    "projection_class_embeddings_input_dim": 80,
    "cross_attention_dim": 64,
}


@pytest.fixture(scope="module")
def xl():
    return build_random_model("tiny-xl")


@pytest.fixture
def posterior_mean(monkeypatch):
    import diffusers.pipelines.controlnet.pipeline_controlnet_sd_xl_img2img as cn_module
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as xl_module

    def mean(encoder_output, generator=None, sample_mode="sample"):
        return encoder_output.latent_dist.mode()

    monkeypatch.setattr(xl_module, "retrieve_latents", mean)
    monkeypatch.setattr(cn_module, "retrieve_latents", mean)


def frames(count: int, seed: int = 0) -> list[np.ndarray]:
    return blob_frames(count, SIZE, seed)


def make_stream(model, steps=1, controls=()) -> StreamImg2Img:
    stream = StreamImg2Img(
        model,
        CPU,
        StreamConfig(size=(SIZE, SIZE), steps=steps),
        LiveSettings(strength=0.5, seed=3, similarity_threshold=0.0),
        prompts=[("a cat", 1.0)],
        controls=controls,
    )
    assert stream.prompts.wait(30)
    return stream


def as_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255.0


@pytest.mark.parametrize("steps", [1, 2])
def test_sdxl_turbo_matches_the_sdxl_img2img_pipeline(xl, posterior_mean, steps):
    assert xl.xl and xl.unet.config.addition_embed_type == "text_time"
    stream = make_stream(xl, steps)
    images = frames(steps + 1)
    outputs = [stream(f) for f in images]
    pipe = xl.img2img_pipeline()
    assert type(pipe).__name__ == "StableDiffusionXLImg2ImgPipeline"

    def reference(image: np.ndarray, prompt: str = "a cat") -> np.ndarray:
        return pipe(
            prompt,
            image=Image.fromarray(image),
            num_inference_steps=2 * steps,
            strength=0.5,
            guidance_scale=0.0,
            generator=torch.Generator().manual_seed(3),
            output_type="np",
        ).images[0]

    first = as_float(outputs[steps - 1])
    assert np.abs(first - reference(images[0])).max() <= ROUNDING
    assert np.abs(as_float(outputs[steps]) - reference(images[1])).max() <= ROUNDING
    assert np.abs(first - reference(images[1])).max() > 10 * ROUNDING
    stream.close()


def test_sdxl_prompts_blend_and_reach_the_image(xl, posterior_mean):
    """The pooled embedding travels with the hidden states: another prompt is another image,
    and a prompt blend of one text is that text."""
    image = frames(1)[0]
    stream = make_stream(xl)
    cat = stream(image)
    stream.set_prompts([("a dog on the moon", 1.0)])
    assert stream.prompts.wait(30)
    dog = stream(image)
    assert np.abs(as_float(cat) - as_float(dog)).max() > 10 * ROUNDING
    pooled = stream.prompts.current[0, -1]
    assert pooled[32:].abs().max() == 0 and pooled[:32].abs().max() > 0  # (projection 32, padded to 64)
    stream.set_prompts([("a dog on the moon", 0.5), ("a dog on the moon", 0.5)])
    assert np.array_equal(stream(image), dog)
    stream.close()


def test_an_sdxl_controlnet_matches_the_sdxl_controlnet_img2img_pipeline(xl, posterior_mean):
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline

    controlnet = random_controlnet(TINY_XL_CONTROLNET, seed=5)
    stream = make_stream(xl, controls=[ControlUnit(1, controlnet, source_image, scale=0.8)])
    images = frames(2)
    outputs = [stream(f) for f in images]
    pipe = StableDiffusionXLControlNetImg2ImgPipeline(
        vae=xl.vae,
        text_encoder=xl.text_encoder,
        text_encoder_2=xl.text_encoder_2,
        tokenizer=xl.tokenizer,
        tokenizer_2=xl.tokenizer_2,
        unet=xl.unet,
        controlnet=controlnet,
        scheduler=xl.scheduler,
        requires_aesthetics_score=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def reference(image: np.ndarray, control: np.ndarray) -> np.ndarray:
        return pipe(
            "a cat",
            image=Image.fromarray(image),
            control_image=Image.fromarray(control),
            num_inference_steps=2,
            strength=0.5,
            guidance_scale=0.0,
            controlnet_conditioning_scale=0.8,
            generator=torch.Generator().manual_seed(3),
            output_type="np",
        ).images[0]

    assert np.abs(as_float(outputs[0]) - reference(images[0], images[0])).max() <= ROUNDING
    assert np.abs(as_float(outputs[1]) - reference(images[1], images[1])).max() <= ROUNDING
    assert np.abs(as_float(outputs[0]) - reference(images[0], images[1])).max() > 10 * ROUNDING
    stream.close()


def test_an_sd15_controlnet_on_sdxl_is_refused(xl):
    from engine.diffusion.controlnet import ControlNetError, check_fits

    with pytest.raises(ControlNetError, match="made for another base model"):
        check_fits(random_controlnet(), xl.unet, "ControlNet 1")
    check_fits(random_controlnet(TINY_XL_CONTROLNET), xl.unet, "ControlNet 1")


def test_an_sdxl_folder_loads_with_both_text_encoders_and_plays_the_same_image(xl, tmp_path):
    from engine.diffusion.loading import ModelSpec, load_model

    xl.save_pretrained(tmp_path / "tiny-xl")
    loaded = load_model(ModelSpec(model=str(tmp_path / "tiny-xl")), CPU)
    assert loaded.xl and type(loaded.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    image = frames(1)[0]
    assert np.array_equal(make_stream(loaded)(image), make_stream(xl)(image))


def test_an_lcm_lora_fuses_into_sdxl_as_diffusers_fuses_it(xl, tmp_path):
    """LCM-LoRA for SDXL: fused at load (its name picks the LCM scheduler), each UNet weight as
    diffusers' own StableDiffusionXLPipeline.load_lora_weights + fuse_lora makes it; the
    stream plays it (its LCM schedule is the one the SD LCM tests hold to diffusers)."""
    from diffusers import StableDiffusionXLPipeline

    from engine.diffusion.loading import ModelSpec, load_model
    from engine.diffusion.lora import random_lora, save_lora

    xl.save_pretrained(tmp_path / "tiny-xl")
    lora = save_lora(random_lora(xl.unet, rank=4, seed=1), tmp_path / "lcm-lora-tiny-xl" / "lora.safetensors")
    fused = load_model(ModelSpec(model=str(tmp_path / "tiny-xl"), lora=str(lora)), CPU)
    assert type(fused.scheduler).__name__ == "LCMScheduler" and fused.extras["lora"] == str(lora)
    reference = StableDiffusionXLPipeline.from_pretrained(tmp_path / "tiny-xl")
    reference.load_lora_weights(str(lora.parent), weight_name=lora.name)
    reference.fuse_lora()
    reference.unload_lora_weights()
    want = reference.unet.state_dict()
    got = fused.unet.state_dict()
    assert set(got) == set(want)
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    assert any(not torch.equal(got[k], v) for k, v in xl.unet.state_dict().items())  # the LoRA did change it
    stream = StreamImg2Img(
        fused,
        CPU,
        StreamConfig(size=(SIZE, SIZE), steps=2),
        LiveSettings(strength=0.6, seed=5, similarity_threshold=0.0),
        prompts=[("a cat", 1.0)],
    )
    assert stream.prompts.wait(30)
    outputs = [stream(f) for f in frames(3)]
    assert outputs[0] is None and all(o.shape == (SIZE, SIZE, 3) for o in outputs[1:])


def test_the_realtime_scene_plays_an_sdxl_model(xl, tmp_path):
    """The scene as a show runs it: an SDXL folder as its model (what the sdxl-turbo preset asks for)."""
    from diffusion_fixtures import StillFeed, set_params, wait_for
    from engine.params import ParamRegistry
    from engine.scenes import SceneCatalog, SceneWorker
    from engine.scenes.passthrough import Passthrough
    from engine.scenes.realtime import RealtimeScene

    P = "/scene/realtime"
    xl.save_pretrained(tmp_path / "tiny-xl")
    params = ParamRegistry()
    params.declare_all(RealtimeScene.PARAMS)
    set_params(
        params,
        {
            f"{P}/model": str(tmp_path / "tiny-xl"),
            f"{P}/vae": "",
            f"{P}/resolution": 32,
            f"{P}/device": "cpu",
            f"{P}/accel": "eager",
            f"{P}/similarity_threshold": 0.0,
        },
    )
    worker = SceneWorker(SceneCatalog((Passthrough, RealtimeScene)), params, StillFeed(), error_backoff=0.05)
    worker.start()
    try:
        worker.request("realtime")
        assert wait_for(lambda: worker.active_name == "realtime" and worker.output.latest()[0] is not None)
        first = worker.output.latest()[0].image
        assert first.shape == (32, 32, 3) and worker.active._model.xl
        set_params(params, {f"{P}/prompt": "a dog on the moon"})
        assert wait_for(lambda: not np.array_equal(worker.output.latest()[0].image, first))
        assert worker.last_error is None and worker.active.warning is None
    finally:
        worker.stop()
