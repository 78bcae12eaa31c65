"""The flow hot path is diffusers' flow matching, provably: same weights, noise, strength, steps -> same image.

diffusers' own tiny test components (``flow_configs.build_tiny_flow_pipeline``: the configs of
its FLUX / SD3 / SANA-Sprint img2img pipeline tests), random weights, CPU, float32. The
reference is the pipeline itself, given the same prompt embeddings and told only to take the
VAE posterior's mean as the hot path does (``retrieve_latents`` would otherwise draw a sample).
Every equality also checks that a different input gives a clearly different image.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="the diffusion extra is not installed")

from PIL import Image  # noqa: E402

from diffusion_fixtures import blob_frames, offline, one_torch_thread  # noqa: E402,F401  (fixtures)
from engine.diffusion.device import choose_device  # noqa: E402
from engine.diffusion.flow import (  # noqa: E402
    TRIGFLOW_MAX,
    FlowHotPath,
    UnsupportedScheduler,
    flow_schedule,
)
from engine.diffusion.flow_configs import build_tiny_flow_pipeline  # noqa: E402
from engine.diffusion.flow_stream import FlowSettings, FlowStream, FlowStreamConfig  # noqa: E402

SIZE = 32
ROUNDING = 0.5 / 255 + 1e-4  # the hot path returns uint8; the pipeline float32 in [0, 1]
CPU = choose_device("cpu")


@pytest.fixture(scope="module")
def pipes():
    return {kind: build_tiny_flow_pipeline(kind) for kind in ("flux", "sd3", "sana_sprint")}


@pytest.fixture
def posterior_mean(monkeypatch):
    import diffusers.pipelines.flux.pipeline_flux_img2img as flux_module
    import diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img as sd3_module

    def mean(encoder_output, generator=None, sample_mode="sample"):
        return encoder_output.latent_dist.mode()

    monkeypatch.setattr(flux_module, "retrieve_latents", mean)
    monkeypatch.setattr(sd3_module, "retrieve_latents", mean)


def frames(count: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth coloured blobs: content a model can tell apart."""
    return blob_frames(count, SIZE, seed)


def make_stream(pipe, steps=1, strength=0.5, seed=3, **settings) -> FlowStream:
    settings.setdefault("similarity_threshold", 0.0)
    stream = FlowStream(
        pipe,
        CPU,
        FlowStreamConfig(size=(SIZE, SIZE), steps=steps),
        FlowSettings(strength=strength, seed=seed, **settings),
        prompts=[("a squirrel eating a burger", 1.0)],
    )
    assert stream.prompts.wait(60), stream.prompts.error
    return stream


def as_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255.0


def reference(kind: str, pipe, stream: FlowStream, image: np.ndarray, steps: int, seed: int = 3) -> np.ndarray:
    """diffusers' img2img pipeline on the stream's own prompt embeddings."""
    text = stream.prompts.current
    common = dict(
        image=Image.fromarray(image),
        height=SIZE,
        width=SIZE,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    if kind == "flux":
        return pipe(
            prompt_embeds=text.embeds,
            pooled_prompt_embeds=text.pooled,
            num_inference_steps=2 * steps,
            strength=0.5,
            **common,
        ).images[0]
    if kind == "sd3":
        return pipe(
            prompt_embeds=text.embeds,
            pooled_prompt_embeds=text.pooled,
            num_inference_steps=2 * steps,
            strength=0.5,
            guidance_scale=0.0,
            **common,
        ).images[0]
    return pipe(
        prompt_embeds=text.embeds,
        prompt_attention_mask=text.mask,
        num_inference_steps=steps,
        strength=1.0,
        max_timesteps=0.5 * TRIGFLOW_MAX,
        intermediate_timesteps=0.5 * 1.3 if steps == 2 else None,  # the pipeline's default, at strength 0.5
        guidance_scale=4.5,
        use_resolution_binning=False,
        **common,
    ).images[0]


# -- equality with diffusers' pipelines ----------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("kind", ["flux", "sd3", "sana_sprint"])
def test_flow_hot_path_matches_the_diffusers_img2img_pipeline(pipes, posterior_mean, kind, steps):
    """FluxImg2ImgPipeline / StableDiffusion3Img2ImgPipeline at strength 0.5 and 2k steps (their last k);
    SanaSprintImg2ImgPipeline at its max_timesteps and (2 steps) intermediate_timesteps times 0.5, and
    k steps. Frame i of a stream batch comes out of call i + k - 1."""
    pipe = pipes[kind]
    images = frames(steps + 1)
    stream = make_stream(pipe, steps=steps)
    outputs = [stream(f) for f in images]
    assert all(o is None for o in outputs[: steps - 1])
    first = reference(kind, pipe, stream, images[0], steps)
    second = reference(kind, pipe, stream, images[1], steps)
    assert outputs[steps - 1].shape == (SIZE, SIZE, 3) and outputs[steps - 1].dtype == np.uint8
    assert np.abs(as_float(outputs[steps - 1]) - first).max() <= ROUNDING
    assert np.abs(as_float(outputs[steps]) - second).max() <= ROUNDING
    assert np.abs(as_float(outputs[steps - 1]) - second).max() > 10 * ROUNDING  # a different input: different


def test_sana_sprint_at_two_steps_and_full_strength_is_its_pipeline_called_with_its_defaults(pipes):
    """SanaSprintImg2ImgPipeline's defaults: 2 steps, max_timesteps 1.5708, intermediate_timesteps 1.3
    (not the evenly spaced 0.785), guidance 4.5; its default strength 0.6 drops no step of 2."""
    pipe = pipes["sana_sprint"]
    assert flow_schedule("sana_sprint", pipe.scheduler, 2, 1.0, 1).sigmas == pytest.approx((TRIGFLOW_MAX, 1.3, 0.0))
    images = frames(3)
    stream = make_stream(pipe, steps=2, strength=1.0)
    outputs = [stream(f) for f in images]
    text = stream.prompts.current

    def defaults(image: np.ndarray, **schedule) -> np.ndarray:
        return pipe(
            **schedule,
            prompt_embeds=text.embeds,
            prompt_attention_mask=text.mask,
            image=Image.fromarray(image),
            height=SIZE,
            width=SIZE,
            generator=torch.Generator().manual_seed(3),
            output_type="np",
            use_resolution_binning=False,  # 32 px: no aspect-ratio bin is that small
        ).images[0]

    assert np.abs(as_float(outputs[1]) - defaults(images[0])).max() <= ROUNDING
    assert np.abs(as_float(outputs[2]) - defaults(images[1])).max() <= ROUNDING
    evenly = defaults(images[0], intermediate_timesteps=None)  # the schedule this path used to run
    assert np.abs(as_float(outputs[1]) - evenly).max() > 10 * ROUNDING
    assert flow_schedule("sana_sprint", pipe.scheduler, 3, 1.0, 1).sigmas == pytest.approx(
        (TRIGFLOW_MAX, 2 * TRIGFLOW_MAX / 3, TRIGFLOW_MAX / 3, 0.0)
    )  # other step counts: evenly spaced (SCM takes an intermediate angle at 2 steps only)


@pytest.mark.parametrize("kind", ["flux", "sd3", "sana_sprint"])
def test_the_trajectory_ends_where_the_frame_does(pipes, kind):
    """The flow scene's stage-by-stage view is the same flow: its last point is the frame's image."""
    stream = make_stream(pipes[kind], steps=3, strength=1.0)  # from pure noise: the first point is far away
    image = frames(1)[0]
    stream(image), stream(image)
    want = stream(image)
    points = list(stream.trajectory(image))
    assert [p[0].step for p in points] == [1, 2, 3]
    step, x_t, x0 = points[-1]
    end = x0 if kind == "sana_sprint" else x_t
    assert np.abs(end.astype(int) - want.astype(int)).max() <= 1
    assert np.abs(points[0][1].astype(int) - want.astype(int)).max() > 5  # the first point is on the way


# -- the schedule is the scheduler's -------------------------------------------------------------------
def test_flux_schedule_is_the_pipelines_shifted_schedule(pipes):
    """FLUX's calculate_shift mu with the scheduler's own time shift (a dynamic-shifting config)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux_img2img import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    reference = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=calculate_shift(1024))
    schedule = flow_schedule("flux", scheduler, 4, 0.5, 1024)
    assert schedule.timesteps == tuple(float(t) for t in reference.timesteps[4:])
    assert schedule.sigmas == tuple(float(s) for s in reference.sigmas[4:])
    assert schedule.sigmas[0] != 0.5  # shifted towards noise: not the unshifted line
    assert schedule.strength == 0.5


def test_schedule_refuses_what_it_cannot_do(pipes):
    with pytest.raises(ValueError, match="strength"):
        flow_schedule("sd3", pipes["sd3"].scheduler, 1, 0.0, 256)
    from diffusers import EulerDiscreteScheduler

    with pytest.raises(UnsupportedScheduler, match="EulerDiscreteScheduler.*FlowMatchEulerDiscreteScheduler"):
        flow_schedule("flux", EulerDiscreteScheduler(), 1, 0.5, 256)


# -- the rectified-flow identity ----------------------------------------------------------------------
def test_an_euler_step_with_the_exact_velocity_stays_on_the_line(pipes):
    """x_t = (1 - t) x0 + t noise, v = noise - x0: the scheduler's step from sigma to sigma' lands on
    x_t' exactly, and scale_noise puts the start on the line; the hot path's step is the same."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    velocity = noise - x0
    x = scheduler.scale_noise(x0, scheduler.timesteps[:1], noise)
    assert torch.allclose(x, (1 - scheduler.sigmas[0]) * x0 + scheduler.sigmas[0] * noise, atol=1e-6)
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(velocity, t, x, return_dict=False)[0]
        s = scheduler.sigmas[i + 1]
        assert torch.allclose(x, (1 - s) * x0 + s * noise, atol=1e-5)
    assert torch.allclose(x, x0, atol=1e-5)  # the line's end is the data
    hot = FlowHotPath("sd3", pipes["sd3"], size=(16, 16), dtype=torch.float32)
    schedule = flow_schedule("sd3", pipes["sd3"].scheduler, 2, 1.0, 256).tensors(CPU.device)
    start = (1 - schedule.sigmas.view(-1, 1, 1, 1)) * x0 + schedule.sigmas.view(-1, 1, 1, 1) * noise
    predicted, stepped = hot.step(start, velocity.expand(2, -1, -1, -1), noise, schedule)
    after = schedule.next_sigmas.view(-1, 1, 1, 1)
    assert torch.allclose(stepped, (1 - after) * x0 + after * noise, atol=1e-5)
    assert torch.allclose(predicted, x0.expand(2, -1, -1, -1), atol=1e-5)


# -- live controls ---------------------------------------------------------------------------------------
def test_prompt_seed_strength_and_guidance_change_the_image_and_a_cached_prompt_is_not_encoded_again(pipes):
    stream = make_stream(pipes["sana_sprint"])
    image = frames(1)[0]
    base = stream(image)
    stream.set_seed(4)
    seeded = stream(image)
    stream.set_seed(3)
    assert np.array_equal(stream(image), base)  # fixed noise per seed
    stream.set_strength(0.8)
    stronger = stream(image)
    stream.set_strength(0.5)
    stream.set_guidance_scale(1.0)
    guided = stream(image)
    stream.set_guidance_scale(4.5)
    encodes = stream.prompts.encodes
    stream.set_prompts([("a red cube", 1.0)])
    assert stream.prompts.wait(60)
    prompted = stream(image)
    stream.set_prompts([("a squirrel eating a burger", 1.0)])
    assert stream.prompts.wait(60) and stream.prompts.encodes == encodes + 1  # the first text was cached
    assert np.array_equal(stream(image), base)
    for other in (seeded, stronger, guided, prompted):
        assert np.abs(other.astype(int) - base.astype(int)).max() > 3


def test_text_encoders_wait_on_the_cpu_between_prompt_changes(pipes):
    """offload: the encoders are on the CPU before and after encoding (here the device is the CPU too,
    so what is checked is that the move happens around the encode, and that it still encodes)."""
    from engine.diffusion.flow_prompts import FlowPromptBank

    moves = []
    pipe = pipes["flux"]
    bank = FlowPromptBank("flux", pipe, CPU, offload=True)
    original = bank._move_encoders
    bank._move_encoders = lambda device: (moves.append(device.type), original(device))
    bank.request([("a cat", 1.0)])
    assert bank.wait(60)
    assert moves == ["cpu", "cpu"] and bank.current.embeds.shape[1] == 256
    bank.close()


@pytest.mark.parametrize("steps", [1, 2])
def test_sd3_with_classifier_free_guidance_matches_its_pipeline(pipes, posterior_mean, steps):
    """SD3.5 Medium plays with guidance: the empty negative prompt and the prompt in one batch,
    as StableDiffusion3Img2ImgPipeline runs them at guidance_scale > 1; the scale stays live."""
    pipe = pipes["sd3"]
    stream = FlowStream(
        pipe,
        CPU,
        FlowStreamConfig(size=(SIZE, SIZE), steps=steps, cfg=True),
        FlowSettings(strength=0.5, seed=3, guidance_scale=3.0, similarity_threshold=0.0),
        prompts=[("a squirrel eating a burger", 1.0)],
    )
    assert stream.prompts.wait(60)
    images = frames(steps + 1)
    outputs = [stream(f) for f in images]
    text, negative = stream.prompts.current, stream.prompts.encode("")

    def reference(image: np.ndarray, scale: float) -> np.ndarray:
        return pipe(
            prompt_embeds=text.embeds,
            pooled_prompt_embeds=text.pooled,
            negative_prompt_embeds=negative.embeds,
            negative_pooled_prompt_embeds=negative.pooled,
            image=Image.fromarray(image),
            height=SIZE,
            width=SIZE,
            num_inference_steps=2 * steps,
            strength=0.5,
            guidance_scale=scale,
            generator=torch.Generator().manual_seed(3),
            output_type="np",
        ).images[0]

    assert np.abs(as_float(outputs[steps - 1]) - reference(images[0], 3.0)).max() <= ROUNDING
    assert np.abs(as_float(outputs[steps]) - reference(images[1], 3.0)).max() <= ROUNDING
    assert np.abs(as_float(outputs[steps]) - reference(images[0], 3.0)).max() > 10 * ROUNDING  # another input
    stream.set_guidance_scale(5.0)
    again = [stream(images[0]) for _ in range(steps)][-1]
    assert np.abs(as_float(again) - reference(images[0], 5.0)).max() <= ROUNDING
