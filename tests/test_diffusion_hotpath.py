"""The hot path is diffusers' diffusion, provably: same model, scheduler and noise -> same image.

Tiny random-weight models (diffusers' own test architecture), CPU, float32. The reference
is diffusers' own pipeline; the only thing the reference is told is to take the VAE
posterior's mean, as the hot path does (``retrieve_latents`` would otherwise draw a sample).
Every equivalence test also checks that a *different* input gives a clearly different
image, so a tolerance that hides everything would fail.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="the diffusion extra is not installed")

from diffusers import (  # noqa: E402
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LatentConsistencyModelImg2ImgPipeline,
    LCMScheduler,
)
from PIL import Image  # noqa: E402  (diffusers brings Pillow)

from diffusion_fixtures import one_torch_thread  # noqa: E402,F401  (fixtures)
from engine.diffusion.configs import build_random_model  # noqa: E402
from engine.diffusion.device import choose_device  # noqa: E402
from engine.diffusion.options import TorchDefaults  # noqa: E402
from engine.diffusion.prompts import blend, slerp  # noqa: E402
from engine.diffusion.schedule import build_schedule  # noqa: E402
from engine.diffusion.stream import LiveSettings, StreamConfig, StreamImg2Img, fit_into  # noqa: E402

SIZE = 32  # pixels; the tiny VAE halves it: 16x16 latents
ROUNDING = 0.5 / 255 + 1e-4  # the hot path returns uint8; the pipeline float32 in [0, 1]
CPU = choose_device("cpu")


@pytest.fixture(scope="module")
def turbo():
    return build_random_model("tiny")


@pytest.fixture(scope="module")
def lcm():
    return build_random_model("tiny", scheduler="lcm", time_cond_proj_dim=32)


@pytest.fixture
def posterior_mean(monkeypatch):
    """Tell diffusers' img2img pipelines to encode with the posterior mean, as the hot path does."""
    import diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_img2img as lcm_module
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as sd_module

    def mean(encoder_output, generator=None, sample_mode="sample"):
        return encoder_output.latent_dist.mode()

    monkeypatch.setattr(sd_module, "retrieve_latents", mean)
    monkeypatch.setattr(lcm_module, "retrieve_latents", mean)


def frames(count: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth coloured blobs: content a model can tell apart (unlike white noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    out = []
    for _ in range(count):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.15, 0.4)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        colour, background = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        out.append((blob * colour + (1 - blob) * background).astype(np.uint8))
    return out


def make_stream(
    model, steps: int = 1, strength: float = 0.5, seed: int = 3, prompts=(("a cat", 1.0),), **settings
) -> StreamImg2Img:
    settings.setdefault("similarity_threshold", 0.0)
    stream = StreamImg2Img(
        model,
        CPU,
        StreamConfig(size=(SIZE, SIZE), steps=steps),
        LiveSettings(strength=strength, seed=seed, **settings),
        prompts=prompts,
    )
    assert stream.prompts.wait(30)
    return stream


def as_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255.0


# -- schedules ------------------------------------------------------------------------------------


def test_turbo_schedule_is_the_trailing_schedule_diffusers_runs(turbo):
    reference = EulerDiscreteScheduler.from_config(turbo.scheduler.config)
    reference.set_timesteps(4)  # 4 trailing steps at strength 0.5 -> the last 2
    assert build_schedule(turbo.scheduler, 1, 0.5).timesteps == (499.0,)
    assert build_schedule(turbo.scheduler, 2, 0.5).timesteps == tuple(float(t) for t in reference.timesteps[2:])


def test_lcm_schedule_is_the_schedulers_own(lcm):
    reference = LCMScheduler.from_config(lcm.scheduler.config)
    reference.set_timesteps(4, strength=0.6)
    assert build_schedule(lcm.scheduler, 4, 0.6).timesteps == tuple(float(t) for t in reference.timesteps)


def test_schedule_refuses_what_it_cannot_do(turbo, lcm):
    with pytest.raises(ValueError, match="strength"):
        build_schedule(turbo.scheduler, 1, 0.0)
    with pytest.raises(ValueError):
        build_schedule(lcm.scheduler, 4, 0.05)  # 50 * 0.05 = 2 LCM timesteps < 4 steps
    from diffusers import PNDMScheduler

    with pytest.raises(ValueError, match="PNDMScheduler is not supported"):
        build_schedule(PNDMScheduler(), 1, 0.5)


# -- equivalence with diffusers ---------------------------------------------------------------------


@pytest.mark.parametrize("scheduler_cls", [EulerDiscreteScheduler, EulerAncestralDiscreteScheduler])
@pytest.mark.parametrize("steps", [1, 2])
def test_euler_matches_stable_diffusion_img2img_pipeline(turbo, posterior_mean, scheduler_cls, steps):
    """SD-turbo settings: ``steps`` UNet calls at strength 0.5 = ``num_inference_steps=2*steps``, guidance 0."""
    from dataclasses import replace

    model = replace(turbo, scheduler=scheduler_cls.from_config(turbo.scheduler.config))
    pipe = model.img2img_pipeline()
    images = frames(steps + 1)
    stream = make_stream(model, steps=steps)
    outputs = [stream(f) for f in images]
    assert all(o is None for o in outputs[: steps - 1])  # the stream batch fills first

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

    first = reference(images[0])
    assert outputs[steps - 1].shape == (SIZE, SIZE, 3) and outputs[steps - 1].dtype == np.uint8
    assert np.abs(as_float(outputs[steps - 1]) - first).max() <= ROUNDING
    assert np.abs(as_float(outputs[steps]) - reference(images[1])).max() <= ROUNDING
    assert np.abs(as_float(outputs[steps - 1]) - reference(images[1])).max() > 10 * ROUNDING


def test_lcm_stream_batch_matches_lcm_img2img_pipeline(lcm, posterior_mean):
    """4 LCM steps as one batch: frame i comes out of call i + 3, equal to the pipeline's image of frame i."""
    pipe = LatentConsistencyModelImg2ImgPipeline(
        vae=lcm.vae,
        text_encoder=lcm.text_encoder,
        tokenizer=lcm.tokenizer,
        unet=lcm.unet,
        scheduler=lcm.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    images = frames(6)
    stream = make_stream(lcm, steps=4, strength=0.6, seed=5, guidance_scale=6.0)
    outputs = [stream(f) for f in images]
    assert [o is None for o in outputs] == [True, True, True, False, False, False]

    def reference(image: np.ndarray) -> np.ndarray:
        return pipe(
            "a cat",
            image=Image.fromarray(image),
            num_inference_steps=4,
            strength=0.6,
            guidance_scale=6.0,
            generator=torch.Generator().manual_seed(5),
            output_type="np",
        ).images[0]

    expected = [reference(images[i]) for i in range(3)]
    for i in range(3):
        assert np.abs(as_float(outputs[3 + i]) - expected[i]).max() <= ROUNDING
    assert np.abs(as_float(outputs[3]) - expected[1]).max() > 3 * ROUNDING


# -- live controls ------------------------------------------------------------------------------------


def test_prompt_change_and_blend_change_the_output(turbo):
    image = frames(1)[0]
    stream = make_stream(turbo, prompts=[("a cat", 1.0)])
    cat = stream(image)
    stream.set_prompts([("a dog on the moon", 1.0)])
    assert stream.prompts.wait(30)
    dog = stream(image)
    assert np.abs(cat.astype(int) - dog.astype(int)).max() > 3
    stream.set_prompts([("a cat", 1.0), ("a dog on the moon", 0.0)])  # a zero weight is no prompt
    assert stream.prompts.wait(30)
    assert np.array_equal(stream(image), cat)
    stream.set_prompts([("a cat", 0.5), ("a dog on the moon", 0.5)])
    assert stream.prompts.wait(30)
    half = stream(image)
    assert not np.array_equal(half, cat) and not np.array_equal(half, dog)


def test_slerp_keeps_the_ends_and_the_norm():
    a, b = torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    a, b = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    assert torch.allclose(slerp(a, b, 0.3).norm(dim=-1), torch.ones(1, 77), atol=1e-5)
    assert torch.allclose(slerp(a, a, 0.5), a, atol=1e-6)  # parallel: no division by zero
    assert torch.allclose(blend([(a, 1.0), (b, 1.0)]), slerp(a, b, 0.5), atol=1e-6)


class GatedEncoder(torch.nn.Module):
    """A text encoder that waits for the test before encoding: a slow prompt, made deterministic."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.gate = threading.Event()
        self.gate.set()

    def forward(self, *args, **kwargs):
        assert self.gate.wait(30), "the test never opened the gate"
        return self.inner(*args, **kwargs)


def test_a_new_prompt_never_stalls_frames(turbo):
    from dataclasses import replace

    encoder = GatedEncoder(turbo.text_encoder)
    stream = make_stream(replace(turbo, text_encoder=encoder))
    image = frames(1)[0]
    before = stream(image)
    encoder.gate.clear()
    stream.set_prompts([("a storm over the sea", 1.0)])  # returns at once: the encoder is blocked
    assert np.array_equal(stream(image), before)  # frames go on with the old prompt meanwhile
    encoder.gate.set()
    assert stream.prompts.wait(30)
    assert not np.array_equal(stream(image), before)


def test_seed_strength_and_drift_change_the_output(turbo):
    image = frames(1)[0]
    stream = make_stream(turbo)
    base = stream(image)
    assert np.array_equal(stream(image), base)  # fixed noise: a still input gives a still image
    stream.set_seed(4)
    seeded = stream(image)
    assert not np.array_equal(seeded, base)
    stream.set_strength(0.8)
    assert not np.array_equal(stream(image), seeded)
    stream.set_noise_drift(0.5)
    assert not np.array_equal(stream(image), stream(image))


def test_similarity_filter_skips_a_still_input_and_resumes_on_change(turbo):
    still, other = frames(2)
    stream = make_stream(turbo, similarity_threshold=0.98)
    assert stream(still) is not None
    assert stream(still) is None
    noisy = np.clip(still.astype(int) + np.random.default_rng(1).integers(-2, 3, still.shape), 0, 255).astype(np.uint8)
    assert stream(noisy) is None  # sensor noise is not news
    assert stream.filter.skipped == 2
    assert stream(other) is not None
    stream.set_seed(9)  # a new look on a still input is news
    assert stream(other) is not None
    assert stream(other) is None
    stream.set_similarity_threshold(0.0)
    assert stream(other) is not None


def test_similarity_filter_lets_the_stream_batch_empty_before_skipping(lcm):
    still = frames(1)[0]
    stream = make_stream(lcm, steps=3, strength=0.6, similarity_threshold=0.98)
    results = [stream(still) for _ in range(5)]
    # calls 1-2 fill the batch, call 3 gives the first image, then the still input is skipped
    assert [r is None for r in results] == [True, True, False, True, True]


@pytest.mark.parametrize("shape", [(40, 80), (80, 40), (10, 30)])  # wide, tall, and smaller than the model
def test_camera_frames_are_cropped_not_stretched(shape):
    h, w = shape
    frame = np.zeros((h, w, 3), np.uint8)
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    frame[top : top + side, left : left + side] = 255  # a centred square: what a square crop keeps
    fitted = np.zeros((20, 20, 3), np.uint8)
    fit_into(frame, fitted)
    assert (fitted == 255).all()
    frame[top : top + side, left : left + side // 2] = 0  # its left half black: so is the fitted left half
    fit_into(frame, fitted)
    assert (fitted[:, :9] == 0).all() and (fitted[:, 11:] == 255).all()


def test_device_choice():
    assert CPU.device.type == "cpu" and CPU.dtype is torch.float32
    assert choose_device("cpu", "bfloat16").dtype is torch.bfloat16
    with pytest.raises(ValueError, match="float16"):
        choose_device("cpu", "float16")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            choose_device("cuda")
    with pytest.raises(ValueError, match="not one of"):
        choose_device("tpu")


def test_device_auto_is_what_dreamdeck_run_chose():
    show = TorchDefaults(device="cpu", dtype="bfloat16")  # dreamdeck run --device cpu --dtype bfloat16
    chosen = show.pick()
    assert choose_device(chosen.device, chosen.dtype) == choose_device("cpu", "bfloat16")
    own = show.pick("cpu", "float32")  # a scene's own choice wins
    assert choose_device(own.device, own.dtype).dtype is torch.float32
    assert TorchDefaults().pick() == TorchDefaults()  # nothing chosen anywhere: auto, the machine's best
    if not torch.backends.mps.is_available():
        mps = TorchDefaults(device="mps").pick()
        with pytest.raises(ValueError, match="no MPS"):
            choose_device(mps.device, mps.dtype)
    with pytest.raises(ValueError, match="not one of"):
        TorchDefaults(device="tpu")


def test_bfloat16_on_the_cpu_is_the_same_diffusion_in_less_precision(turbo):
    """The CPU's other precision: the same weights in bfloat16 give nearly the float32 image
    (and a different input still gives a clearly different one). The frames are twice the
    model's size, as a camera's are larger: the resize runs too."""
    image, other = (np.kron(f, np.ones((2, 2, 1), dtype=np.uint8)) for f in frames(2))
    reference = as_float(make_stream(turbo, strength=0.3)(image))
    bf16 = choose_device("cpu", "bfloat16")
    model = build_random_model("tiny").to(bf16)  # the same seed: the same weights as ``turbo``
    stream = StreamImg2Img(
        model,
        bf16,
        StreamConfig(size=(SIZE, SIZE)),
        LiveSettings(strength=0.3, seed=3, similarity_threshold=0.0),
        prompts=(("a cat", 1.0),),
    )
    assert stream.prompts.wait(30)
    assert stream.prompts.current.dtype is torch.bfloat16
    close = np.abs(as_float(stream(image)) - reference).max()
    apart = np.abs(as_float(stream(other)) - reference).max()
    assert close < 0.03 and apart > 3 * close, (close, apart)  # measured: 0.012 (3 levels) and 0.078
