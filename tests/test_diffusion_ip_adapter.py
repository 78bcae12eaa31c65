"""IP-Adapter on the hot path is diffusers' IP-Adapter img2img, provably; the style swaps live.

A tiny UNet (diffusers' test architecture), a tiny CLIP vision encoder and an IP-Adapter of
random weights in diffusers' layout (its test helper's), CPU, float32, against
``StableDiffusionImg2ImgPipeline(image_encoder=..., feature_extractor=...)`` given the same
style image and ``set_ip_adapter_scale``. Different style images must give clearly different
images, and a scale or a style change must not recompile.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="the diffusion extra is not installed")
cv2 = pytest.importorskip("cv2")

from PIL import Image  # noqa: E402

from diffusion_fixtures import blob_frames, offline, one_torch_thread, wait_for  # noqa: E402,F401  (fixtures)
from engine.diffusion.accel import CompileAccelerator, compile_counts  # noqa: E402
from engine.diffusion.configs import build_random_model  # noqa: E402
from engine.diffusion.device import choose_device  # noqa: E402
from engine.diffusion.ip_adapter import StyleBank, load_ip_adapter_weights, random_ip_adapter  # noqa: E402
from engine.diffusion.stream import LiveSettings, StreamConfig, StreamImg2Img  # noqa: E402

SIZE = 32
ROUNDING = 0.5 / 255 + 1e-4
CPU = choose_device("cpu")


@pytest.fixture(scope="module")
def styled():
    """(model with an IP-Adapter, image encoder, feature extractor, the adapter's scale)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    model = build_random_model("tiny")
    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            image_size=32,
            projection_dim=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            patch_size=8,
        )
    ).eval()
    extractor = CLIPImageProcessor(crop_size=32, size=32, do_center_crop=True, resample=3)
    scale = load_ip_adapter_weights(model.unet, random_ip_adapter(model.unet, image_embed_dim=32, seed=1))
    return model, encoder, extractor, scale


@pytest.fixture
def posterior_mean(monkeypatch):
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as sd_module

    def mean(encoder_output, generator=None, sample_mode="sample"):
        return encoder_output.latent_dist.mode()

    monkeypatch.setattr(sd_module, "retrieve_latents", mean)


def pictures(count: int, seed: int = 0) -> list[np.ndarray]:
    return blob_frames(count, SIZE, seed)


def make_stream(styled, accelerator=None) -> tuple[StreamImg2Img, StyleBank]:
    model, encoder, extractor, _ = styled
    bank = StyleBank(encoder, extractor, CPU.device, CPU.dtype)
    stream = StreamImg2Img(
        model,
        CPU,
        StreamConfig(size=(SIZE, SIZE)),
        LiveSettings(strength=0.5, seed=3, similarity_threshold=0.0),
        prompts=[("a cat", 1.0)],
        accelerator=accelerator,
        style=bank,
    )
    assert stream.prompts.wait(30)
    return stream, bank


def as_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255.0


def test_the_style_image_matches_the_img2img_pipelines_ip_adapter(styled, posterior_mean):
    from diffusers import StableDiffusionImg2ImgPipeline

    model, encoder, extractor, scale = styled
    frame = pictures(1)[0]
    styles = [pictures(1, seed=9)[0], np.random.default_rng(2).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)]
    stream, bank = make_stream(styled)
    results = {}
    for s in (0.6, 4.0):  # (a random tiny adapter's effect is small: 4 makes it plain)
        scale.set(s)
        for i, style in enumerate(styles):
            bank.request(style, key=i)
            bank.wait(30)
            results[s, i] = stream(frame)
    scale.set(1.0)  # the trained weights back: the pipeline scales by its own processors' scale
    pipe = StableDiffusionImg2ImgPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=model.scheduler,
        safety_checker=None,
        feature_extractor=extractor,
        image_encoder=encoder,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def reference(style: np.ndarray, s: float) -> np.ndarray:
        pipe.set_ip_adapter_scale(s)
        try:
            return pipe(
                "a cat",
                image=Image.fromarray(frame),
                ip_adapter_image=Image.fromarray(style),
                num_inference_steps=2,
                strength=0.5,
                guidance_scale=0.0,
                generator=torch.Generator().manual_seed(3),
                output_type="np",
            ).images[0]
        finally:
            pipe.set_ip_adapter_scale(1.0)

    for (s, i), got in results.items():
        assert np.abs(as_float(got) - reference(styles[i], s)).max() <= ROUNDING, (s, i)
    assert np.abs(as_float(results[4.0, 0]) - reference(styles[1], 4.0)).max() > 10 * ROUNDING
    assert np.abs(as_float(results[0.6, 0]) - as_float(results[4.0, 0])).max() > 10 * ROUNDING
    stream.close(), bank.close()


def test_a_style_or_scale_change_never_recompiles(styled, tmp_path):
    _, _, _, scale = styled
    stream, bank = make_stream(styled, accelerator=CompileAccelerator(backend="eager"))
    frame, *styles = pictures(3, seed=4)
    path = tmp_path / "style.png"
    cv2.imwrite(str(path), styles[0][..., ::-1])
    bank.request(str(path))  # a file
    bank.wait(30)
    while stream.accel != "compile":
        assert stream.accel_error is None, stream.accel_error
        stream(frame)
        stream.wait_for_accel(60)
    looks = [stream(frame)]
    before = compile_counts()
    with torch._dynamo.config.patch(error_on_recompile=True):
        bank.request(styles[1], key="live")  # a live image
        bank.wait(30)
        looks.append(stream(frame))
        scale.set(0.3)
        looks.append(stream(frame))
        scale.set(1.0)
    assert (compile_counts() - before).graphs == 0 and stream.accel_state == "compile"
    for a, b in zip(looks, looks[1:]):
        assert not np.array_equal(a, b)
    stream.close(), bank.close()


def test_a_missing_style_image_is_one_line_and_the_last_style_plays_on(styled, tmp_path):
    stream, bank = make_stream(styled)
    frame, style = pictures(2, seed=5)
    bank.request(style, key="good")
    bank.wait(30)
    good = stream(frame)
    bank.request(str(tmp_path / "missing.png"))
    bank.wait(30)
    assert bank.error is not None and "missing.png" in bank.error and "missing or unreadable" in bank.error
    assert np.array_equal(stream(frame), good)
    stream.close(), bank.close()


def test_the_scenes_style_parameters_load_the_adapter_and_swap_the_style(styled, tmp_path):
    """Through the real scene worker: ``style/adapter`` loads an IP-Adapter file (and the image
    encoder next to it) with the model, in the background; ``style/image`` changes the image;
    a missing style image is one HUD line and the last style plays on."""
    from diffusion_fixtures import StillFeed, set_params
    from engine.diffusion.ip_adapter import save_ip_adapter
    from engine.params import ParamRegistry
    from engine.scenes import SceneCatalog, SceneWorker
    from engine.scenes.passthrough import Passthrough
    from engine.scenes.realtime import RealtimeScene

    _, encoder, _, _ = styled
    P = "/scene/realtime"
    model = build_random_model("tiny")
    model.save_pretrained(tmp_path / "model")
    adapter = save_ip_adapter(random_ip_adapter(model.unet, 32, seed=1), tmp_path / "ip" / "ip-adapter.safetensors")
    encoder.save_pretrained(tmp_path / "ip" / "image_encoder")
    styles = []
    for i in range(2):
        styles.append(tmp_path / f"style{i}.png")
        cv2.imwrite(str(styles[i]), np.random.default_rng(i).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    params = ParamRegistry()
    params.declare_all(RealtimeScene.PARAMS)
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
            return worker.output.latest()[0].image

        def levels_apart(a, b) -> int:
            return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())

        def steady():
            """The image once two frames in a row agree (the frame a swap lands in may differ)."""
            seen = []

            def agree() -> bool:
                frame = worker.output.latest()[0]
                if not seen or frame.index != seen[-1].index:
                    seen.append(frame)
                return len(seen) > 1 and levels_apart(seen[-1].image, seen[-2].image) <= 1

            assert wait_for(agree)
            return seen[-1].image

        plain = image()
        set_params(params, {f"{P}/style/adapter": str(adapter), f"{P}/style/scale": 2.0})
        assert wait_for(lambda: scene._stream.style is not None), (worker.last_error, scene.warning)
        assert np.array_equal(image(), plain) or wait_for(lambda: np.array_equal(image(), plain))  # no image: off
        set_params(params, {f"{P}/style/image": str(styles[0])})
        assert wait_for(lambda: not np.array_equal(image(), plain))
        first = steady()
        set_params(params, {f"{P}/style/image": str(styles[1])})
        assert wait_for(lambda: not np.array_equal(image(), first) and not np.array_equal(image(), plain))
        second = steady()
        set_params(params, {f"{P}/style/image": str(tmp_path / "missing.png")})
        assert wait_for(lambda: scene.warning is not None and "missing or unreadable" in scene.warning)
        # the last style plays on: the image stays the second style's, not the first's or none.
        # (Not byte-equal: the frames after a refused style can differ from `second` by a few
        # levels, an open question noted in the issue; a dropped style differs by far more.)
        after = steady()
        assert levels_apart(after, second) < min(levels_apart(after, first), levels_apart(after, plain))
        assert worker.last_error is None
    finally:
        worker.stop()
