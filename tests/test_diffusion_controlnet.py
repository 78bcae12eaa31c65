"""ControlNets on the hot path are diffusers' ControlNet img2img, provably; live changes never recompile.

Tiny random-weight models (diffusers' own test architectures: the tiny UNet and the tiny
ControlNet of ``test_controlnet_img2img.py``, every weight drawn, the zero convolutions too,
so a ControlNet that did nothing would fail), CPU, float32. The reference is diffusers'
``StableDiffusionControlNetImg2ImgPipeline`` with one ControlNet and with a
``MultiControlNetModel`` of two, told only to take the VAE posterior's mean as the hot path
does. Each equality also checks that a different input gives a clearly different image.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="the diffusion extra is not installed")
cv2 = pytest.importorskip("cv2")

from diffusers import StableDiffusionControlNetImg2ImgPipeline  # noqa: E402
from PIL import Image  # noqa: E402

from diffusion_fixtures import blob_frames, offline, one_torch_thread  # noqa: E402,F401  (fixtures)
from engine.diffusion.accel import CompileAccelerator, compile_counts  # noqa: E402
from engine.diffusion.configs import build_random_model  # noqa: E402
from engine.diffusion.controlnet import (  # noqa: E402
    CannyPreprocessor,
    ControlNetError,
    ControlUnit,
    StillImage,
    canny,
    check_fits,
    random_controlnet,
    source_image,
    stage_scales,
)
from engine.diffusion.device import choose_device  # noqa: E402
from engine.diffusion.stream import LiveSettings, StreamConfig, StreamImg2Img  # noqa: E402

SIZE = 32
ROUNDING = 0.5 / 255 + 1e-4  # the hot path returns uint8; the pipeline float32 in [0, 1]
CPU = choose_device("cpu")


@pytest.fixture(scope="module")
def turbo():
    return build_random_model("tiny")


@pytest.fixture(scope="module")
def controlnets():
    return random_controlnet(seed=1), random_controlnet(seed=2)


@pytest.fixture
def posterior_mean(monkeypatch):
    import diffusers.pipelines.controlnet.pipeline_controlnet_img2img as module

    def mean(encoder_output, generator=None, sample_mode="sample"):
        return encoder_output.latent_dist.mode()

    monkeypatch.setattr(module, "retrieve_latents", mean)


def frames(count: int, seed: int = 0) -> list[np.ndarray]:
    return blob_frames(count, SIZE, seed)


def make_stream(model, controls, steps=1, accelerator=None) -> StreamImg2Img:
    stream = StreamImg2Img(
        model,
        CPU,
        StreamConfig(size=(SIZE, SIZE), steps=steps),
        LiveSettings(strength=0.5, seed=3, similarity_threshold=0.0),
        prompts=[("a cat", 1.0)],
        accelerator=accelerator,
        controls=controls,
    )
    assert stream.prompts.wait(30)
    return stream


def pipeline(model, controlnet):
    pipe = StableDiffusionControlNetImg2ImgPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        controlnet=controlnet,
        scheduler=model.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def as_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255.0


# -- equality with diffusers ------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 2])
def test_one_controlnet_matches_the_controlnet_img2img_pipeline(turbo, controlnets, posterior_mean, steps):
    """The ``source`` type: the frame is its own control image (tile / recolour ControlNets).
    Two steps run as a stream batch, each stage conditioned on its own frame; end=0.5 drops
    the ControlNet from the second step, as diffusers' ``control_guidance_end`` does."""
    end = 1.0 if steps == 1 else 0.5
    unit = ControlUnit(1, controlnets[0], source_image, scale=0.8, end=end)
    stream = make_stream(turbo, [unit], steps=steps)
    images = frames(steps + 1)
    outputs = [stream(f) for f in images]
    pipe = pipeline(turbo, controlnets[0])

    def reference(image: np.ndarray, control: np.ndarray) -> np.ndarray:
        return pipe(
            "a cat",
            image=Image.fromarray(image),
            control_image=Image.fromarray(control),
            num_inference_steps=2 * steps,
            strength=0.5,
            guidance_scale=0.0,
            controlnet_conditioning_scale=0.8,
            control_guidance_end=end,
            generator=torch.Generator().manual_seed(3),
            output_type="np",
        ).images[0]

    first, second = outputs[steps - 1], outputs[steps]
    assert np.abs(as_float(first) - reference(images[0], images[0])).max() <= ROUNDING
    assert np.abs(as_float(second) - reference(images[1], images[1])).max() <= ROUNDING
    assert np.abs(as_float(first) - reference(images[1], images[1])).max() > 10 * ROUNDING
    # the ControlNet matters: the same frame with another control image is another image
    assert np.abs(as_float(first) - reference(images[0], images[1])).max() > 10 * ROUNDING


def test_two_controlnets_match_a_multi_controlnet_pipeline(turbo, controlnets, posterior_mean, tmp_path):
    """The frame (``source``) and a still image from a file (``none``), summed as MultiControlNetModel sums."""
    still = frames(1, seed=7)[0]
    path = tmp_path / "still.png"
    cv2.imwrite(str(path), still[..., ::-1])
    units = [
        ControlUnit(1, controlnets[0], source_image, scale=0.7),
        ControlUnit(2, controlnets[1], StillImage(str(path)), scale=0.5, start=0.0),
    ]
    stream = make_stream(turbo, units)
    images = frames(2)
    outputs = [stream(f) for f in images]
    pipe = pipeline(turbo, list(controlnets))

    def reference(image: np.ndarray, scales) -> np.ndarray:
        return pipe(
            "a cat",
            image=Image.fromarray(image),
            control_image=[Image.fromarray(image), Image.fromarray(still)],
            num_inference_steps=2,
            strength=0.5,
            guidance_scale=0.0,
            controlnet_conditioning_scale=scales,
            generator=torch.Generator().manual_seed(3),
            output_type="np",
        ).images[0]

    assert np.abs(as_float(outputs[0]) - reference(images[0], [0.7, 0.5])).max() <= ROUNDING
    assert np.abs(as_float(outputs[1]) - reference(images[1], [0.7, 0.5])).max() <= ROUNDING
    assert np.abs(as_float(outputs[0]) - reference(images[0], [0.7, 0.0])).max() > 10 * ROUNDING
    stream.set_control_scale(2, 0.0)  # a live scale: the second ControlNet off
    assert np.abs(as_float(stream(images[0])) - reference(images[0], [0.7, 0.0])).max() <= ROUNDING


def test_stage_scales_follow_diffusers_controlnet_keep():
    assert stage_scales(0.5, 0.0, 1.0, 1) == [0.5]
    assert stage_scales(1.0, 0.0, 0.5, 2) == [1.0, 0.0]
    assert stage_scales(1.0, 0.5, 1.0, 4) == [0.0, 0.0, 1.0, 1.0]


# -- live changes -----------------------------------------------------------------------------------
def test_scales_and_thresholds_change_live_without_a_recompile_and_slots_rebuild_in_the_background(turbo, controlnets):
    edges = CannyPreprocessor(50.0, 120.0)
    stream = make_stream(
        turbo, [ControlUnit(1, controlnets[0], edges, scale=1.0)], accelerator=CompileAccelerator(backend="eager")
    )
    frame = frames(1)[0]
    while stream.accel != "compile":
        assert stream.accel_error is None, stream.accel_error
        stream(frame)
        stream.wait_for_accel(60)
    looks = [stream(frame)]
    before = compile_counts()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for scale, start, end in ((0.3, 0.0, 1.0), (1.5, 0.0, 1.0), (1.5, 0.0, 0.0)):
            stream.set_control_scale(1, scale, start, end)
            looks.append(stream(frame))
        stream.set_control_scale(1, 1.0)
        edges.low, edges.high = 10.0, 30.0  # canny thresholds: the preprocessor's, not the graph's
        looks.append(stream(frame))
    assert (compile_counts() - before).graphs == 0 and stream.accel_state == "compile"
    for a, b in zip(looks, looks[1:]):
        assert not np.array_equal(a, b)  # every change reached the image
    # a second slot: eager at once, the compiled frame rebuilt in the background
    stream.set_controls([*stream.controls, ControlUnit(2, controlnets[1], source_image, scale=0.5)])
    assert stream.accel == "eager" and stream(frame) is not None
    assert stream.wait_for_accel(120) or stream(frame) is not None
    while stream.accel != "compile":
        assert stream.accel_error is None, stream.accel_error
        stream(frame)
        stream.wait_for_accel(60)
    assert stream.builds_started == 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert stream(frame) is not None
    stream.close()


def test_a_failing_preprocessor_rests_its_controlnet_and_says_so(turbo, controlnets):
    def broken(pixels):
        raise RuntimeError("the depth model ran out of memory")

    stream = make_stream(turbo, [ControlUnit(1, controlnets[0], broken)])
    plain = make_stream(turbo, [])
    frame = frames(1)[0]
    image = stream(frame)
    assert image is not None and "ControlNet 1" in stream.control_error and "out of memory" in stream.control_error
    assert np.array_equal(image, plain(frame))  # it played on without that condition
    stream.close(), plain.close()


def test_a_controlnet_for_another_base_model_is_refused():

    unet = build_random_model("tiny").unet
    other = random_controlnet(_wide_controlnet())
    with pytest.raises(ControlNetError, match="made for another base model .*text width 64, the model's 32"):
        check_fits(other, unet, "ControlNet 1")
    check_fits(random_controlnet(), unet, "ControlNet 1")


def _wide_controlnet() -> dict:
    from engine.diffusion.controlnet import TINY_CONTROLNET

    return {**TINY_CONTROLNET, "cross_attention_dim": 64}


def test_a_missing_still_image_is_one_clear_error(tmp_path):
    with pytest.raises(ControlNetError, match="missing or unreadable"):
        StillImage(str(tmp_path / "nope.png"))


# -- canny against OpenCV ---------------------------------------------------------------------------
def photo_like(seed: int = 0, size: int = 96) -> np.ndarray:
    """Shapes with hard and soft edges, and a little noise: what a camera shows."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 60, np.uint8)
    for _ in range(6):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        centre = tuple(int(c) for c in rng.integers(10, size - 10, 2))
        if rng.random() < 0.5:
            cv2.circle(image, centre, int(rng.integers(5, 25)), colour, -1)
        else:
            cv2.rectangle(image, centre, (centre[0] + 20, centre[1] + 15), colour, -1)
    image = cv2.GaussianBlur(image, (3, 3), 0.8)
    return np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("low, high", [(100, 200), (50, 100), (20, 60)])
def test_canny_agrees_with_opencv(low, high):
    """Agreement = intersection over union of the two edge maps (edge pixels only: the empty
    background, most of the image, would make any map look right). Exact pixel equality is not
    expected: OpenCV rounds the gray conversion in fixed point and follows weak chains to any
    length, the torch version for 64 steps."""
    ious = []
    for seed in range(3):
        image = photo_like(seed)
        ours = canny(torch.from_numpy(image), low, high).numpy() > 0.5
        theirs = cv2.Canny(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), low, high) > 0
        assert theirs.sum() > 100  # there are edges to agree on
        ious.append((ours & theirs).sum() / (ours | theirs).sum())
    assert min(ious) >= 0.95, ious
    # and a different image's edges do not agree
    other = cv2.Canny(cv2.cvtColor(photo_like(9), cv2.COLOR_RGB2GRAY), low, high) > 0
    assert (ours & other).sum() / (ours | other).sum() < 0.5


# -- depth against the transformers pipeline ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_depth():
    """A Depth Anything of random weights, tiny (a 4-layer DINOv2 of width 32), at 28x28."""
    from engine.diffusion.controlnet import random_depth_model

    return random_depth_model(tiny=True)


def test_depth_is_the_transformers_depth_pipelines_at_the_models_size(tiny_depth):
    from transformers import pipeline

    from engine.diffusion.controlnet import DepthPreprocessor

    model, processor = tiny_depth
    pipe = pipeline("depth-estimation", model=model, image_processor=processor)
    depth = DepthPreprocessor(model, processor, torch.float32)
    images = [photo_like(seed, size=28) for seed in (0, 1)]
    with torch.inference_mode():
        ours = [depth.depth(torch.from_numpy(image))[0] for image in images]
    theirs = [pipe(Image.fromarray(image))["predicted_depth"] for image in images]
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape == (28, 28)
        assert torch.allclose(a, b, atol=1e-4 * float(b.abs().max())), float((a - b).abs().max())
    assert (ours[0] - theirs[1]).abs().max() > 0.05 * theirs[1].abs().max()  # another image, another depth
    with torch.inference_mode():  # the control image: three channels in [0, 1], at the frame's size
        control = depth(torch.from_numpy(photo_like(0, size=64)))
    assert control.shape == (3, 64, 64) and float(control.min()) == 0.0 and float(control.max()) == 1.0


def test_a_depth_model_that_cannot_load_is_one_clear_error():
    from engine.diffusion.controlnet import DepthPreprocessor

    with pytest.raises(ControlNetError, match="depth model 'nobody/no-such-depth-model'"):
        DepthPreprocessor.load("nobody/no-such-depth-model", torch.device("cpu"), torch.float32)


def test_controlnets_load_from_a_folder_and_a_wrong_or_missing_one_is_one_clear_error(tmp_path):
    from engine.diffusion.controlnet import load_controlnet

    unet = build_random_model("tiny").unet
    random_controlnet(seed=4).save_pretrained(tmp_path / "fits")
    random_controlnet(_wide_controlnet()).save_pretrained(tmp_path / "wide")
    loaded = load_controlnet(str(tmp_path / "fits"), unet, torch.float32, "ControlNet 1")
    assert torch.equal(next(loaded.parameters()), next(random_controlnet(seed=4).parameters()))
    with pytest.raises(ControlNetError, match="ControlNet 2: made for another base model"):
        load_controlnet(str(tmp_path / "wide"), unet, torch.float32, "ControlNet 2")
    with pytest.raises(ControlNetError, match="ControlNet 3: cannot load 'nobody/no-such-controlnet'"):
        load_controlnet("nobody/no-such-controlnet", unet, torch.float32, "ControlNet 3")


# -- the realtime scene's slots -------------------------------------------------------------------
def test_the_scenes_controlnet_slots_load_live_and_a_bad_one_is_one_hud_line(tmp_path):
    """Through the real scene worker: a ControlNet joins while the scene plays; one made for
    another base model, or one past the memory budget, is one HUD line and the scene plays on."""
    from diffusion_fixtures import StillFeed, set_params, wait_for
    from engine.params import ParamRegistry
    from engine.scenes import SceneCatalog, SceneWorker
    from engine.scenes.passthrough import Passthrough
    from engine.scenes.realtime import RealtimeScene

    P = "/scene/realtime"
    build_random_model("tiny").save_pretrained(tmp_path / "model")
    random_controlnet(seed=1).save_pretrained(tmp_path / "fits")
    random_controlnet(_wide_controlnet()).save_pretrained(tmp_path / "wide")
    params = ParamRegistry()
    params.declare_all(RealtimeScene.PARAMS)
    for name in ("model", "type", "scale", "start", "end", "image"):  # every slot parameter is a registry one
        assert params.get(f"{P}/controlnets/3/{name}") is not None
    set_params(
        params,
        {
            f"{P}/model": str(tmp_path / "model"),
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
        scene = worker.active

        def image():
            frame, _ = worker.output.latest()
            return frame.image

        plain = image()
        set_params(params, {f"{P}/controlnets/1/model": str(tmp_path / "fits"), f"{P}/controlnets/1/type": "source"})
        assert wait_for(lambda: len(scene._stream.controls) == 1), scene.warning
        assert wait_for(lambda: not np.array_equal(image(), plain))
        with_control = image()
        set_params(params, {f"{P}/controlnets/1/scale": 0.0})  # a tensor write: the plain image again
        assert wait_for(lambda: np.array_equal(image(), plain))
        set_params(params, {f"{P}/controlnets/1/scale": 1.0, f"{P}/controlnets/2/model": str(tmp_path / "wide")})
        assert wait_for(lambda: scene.warning is not None and "ControlNet 2: made for another" in scene.warning)
        assert wait_for(lambda: np.array_equal(image(), with_control))  # slot 1 plays on
        set_params(params, {f"{P}/controlnets/2/model": "", f"{P}/controlnets/memory_mb": 1})
        set_params(params, {f"{P}/controlnets/1/model": str(tmp_path / "fits") + "/"})  # asks again, over budget
        assert wait_for(lambda: scene.warning is not None and "MB ControlNet budget" in scene.warning), scene.warning
        assert "ControlNet 1: " in scene.warning and "needs " in scene.warning
        assert worker.last_error is None and worker.active_name == "realtime"
    finally:
        worker.stop()
