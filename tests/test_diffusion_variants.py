"""The hot path's other branches are diffusers' too: v-prediction UNets and the TAESD VAE.

SDXS-512 and SD 2.x (768-v) predict v; SDXS and the engine's default decode with TAESD
(``AutoencoderTiny``). Tiny random models, CPU, float32, against diffusers'
``StableDiffusionImg2ImgPipeline`` with the same parts (told only to take the VAE posterior's
mean, as the hot path does; TAESD has no posterior: both take its latents). A different
input must give a clearly different image, so a loose tolerance could not pass.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="the diffusion extra is not installed")

from diffusers import EulerDiscreteScheduler  # noqa: E402
from PIL import Image  # noqa: E402

from diffusion_fixtures import blob_frames, offline, one_torch_thread  # noqa: E402,F401  (fixtures)
from engine.diffusion.configs import build_random_model  # noqa: E402
from engine.diffusion.device import choose_device  # noqa: E402
from engine.diffusion.stream import LiveSettings, StreamConfig, StreamImg2Img  # noqa: E402

SIZE = 64  # TAESD divides by 8: 8x8 latents, 4x4 at the tiny UNet's deepest level
ROUNDING = 0.5 / 255 + 1e-4
CPU = choose_device("cpu")


@pytest.fixture
def posterior_mean(monkeypatch):
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as sd_module

    def mean(encoder_output, generator=None, sample_mode="sample"):
        if hasattr(encoder_output, "latent_dist"):
            return encoder_output.latent_dist.mode()
        return encoder_output.latents  # TAESD: deterministic

    monkeypatch.setattr(sd_module, "retrieve_latents", mean)


def frames(count: int, seed: int = 0) -> list[np.ndarray]:
    return blob_frames(count, SIZE, seed)


@pytest.mark.parametrize(
    "prediction, tiny_vae",
    [("v_prediction", False), ("epsilon", True), ("v_prediction", True)],
    ids=["v-prediction", "taesd", "sdxs-like"],
)
@pytest.mark.parametrize("steps", [1, 2])
def test_v_prediction_and_taesd_match_the_img2img_pipeline(posterior_mean, prediction, tiny_vae, steps):
    model = build_random_model("tiny")
    if tiny_vae:  # TAESD's own architecture (random weights)
        from diffusers import AutoencoderTiny

        from engine.diffusion.configs import TAESD

        torch.manual_seed(0)
        model = replace(model, vae=AutoencoderTiny(**TAESD).eval().requires_grad_(False))
    scheduler = EulerDiscreteScheduler.from_config(model.scheduler.config, prediction_type=prediction)
    model = replace(model, scheduler=scheduler)
    assert model.scheduler.config.prediction_type == prediction
    assert (type(model.vae).__name__ == "AutoencoderTiny") == tiny_vae
    stream = StreamImg2Img(
        model,
        CPU,
        StreamConfig(size=(SIZE, SIZE), steps=steps),
        LiveSettings(strength=0.5, seed=3, similarity_threshold=0.0),
        prompts=[("a cat", 1.0)],
    )
    assert stream.prompts.wait(30)
    images = frames(steps + 1)
    outputs = [stream(f) for f in images]
    pipe = model.img2img_pipeline()

    def reference(image: np.ndarray) -> np.ndarray:
        return pipe(
            "a cat",
            image=Image.fromarray(image),
            num_inference_steps=2 * steps,
            strength=0.5,
            guidance_scale=0.0,
            generator=torch.Generator().manual_seed(3),
            output_type="np",
        ).images[0]

    got = outputs[steps - 1].astype(np.float32) / 255
    assert np.abs(got - reference(images[0])).max() <= ROUNDING
    assert np.abs(outputs[steps].astype(np.float32) / 255 - reference(images[1])).max() <= ROUNDING
    other = np.abs(got - reference(images[1])).max()
    if tiny_vae:
        # a random TAESD decodes almost any latents to almost one image (its ReLU stack collapses
        # them: 0.002 apart at most here, whatever its width), so with it the other frame is only
        # required to give another uint8 image; the v-prediction case above holds the strict check
        assert other > 0 and not np.array_equal(outputs[steps - 1], outputs[steps])
    else:
        assert other > 10 * ROUNDING, other
    stream.close()


def test_an_sdxs_shaped_folder_loads_with_its_own_tiny_vae_and_v_prediction(tmp_path):
    """SDXS-512 ships as a diffusers folder whose VAE is a TAESD (AutoencoderTiny): loaded as
    it is, with its scheduler's prediction type, it plays the image the built model plays."""
    from diffusers import AutoencoderTiny

    from engine.diffusion.configs import TAESD
    from engine.diffusion.loading import ModelSpec, load_model

    model = build_random_model("tiny")
    torch.manual_seed(0)
    model = replace(
        model,
        vae=AutoencoderTiny(**TAESD).eval().requires_grad_(False),
        scheduler=EulerDiscreteScheduler.from_config(model.scheduler.config, prediction_type="v_prediction"),
    )
    model.save_pretrained(tmp_path / "sdxs-like")
    loaded = load_model(ModelSpec(model=str(tmp_path / "sdxs-like")), CPU)
    assert type(loaded.vae).__name__ == "AutoencoderTiny"
    assert loaded.scheduler.config.prediction_type == "v_prediction"

    def play(m) -> np.ndarray:
        stream = StreamImg2Img(
            m, CPU, StreamConfig(size=(SIZE, SIZE)), LiveSettings(seed=3, similarity_threshold=0.0), [("a cat", 1.0)]
        )
        assert stream.prompts.wait(30)
        return stream(frames(1)[0])

    assert np.array_equal(play(loaded), play(model))
