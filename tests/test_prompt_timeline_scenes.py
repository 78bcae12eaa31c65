"""Prompt timelines played by the two scenes, on tiny random models (HF_HUB_OFFLINE=1).

- The CLIP scene's targets: a tiny random CLIP's text embeddings, blended along the timeline,
  sampled densely across every boundary: small steps only, and each line's own embedding at
  its start. Through the real scene worker the running optimisation takes them.
- The realtime scene's prompt: the prompt bank of a tiny diffusers model, the same dense
  check; through the worker the image half way differs from both lines' images, and the
  image at a line's start is the image of that line's prompt; with the frame compiled
  (dynamo's eager backend) a timeline's blends compile nothing more.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="the diffusion extra is not installed")

import torch.nn.functional as F  # noqa: E402

from diffusion_fixtures import StillFeed, offline, one_torch_thread, set_params, tiny, wait_for  # noqa: E402,F401  (fixtures)
from engine.diffusion.configs import build_random_model  # noqa: E402
from engine.diffusion.prompts import PromptBank, slerp  # noqa: E402
from engine.params import ParamRegistry  # noqa: E402
from engine.prompt_syntax import parse_prompts  # noqa: E402
from engine.prompt_timeline import blend_targets, parse_timeline, weighted_mix  # noqa: E402
from engine.scenes import SceneCatalog, SceneWorker  # noqa: E402
from engine.scenes.passthrough import Passthrough  # noqa: E402
from engine.scenes.realtime import RealtimeScene  # noqa: E402
from engine.scenes.vqgan_clip import VqganClipScene  # noqa: E402
from engine.vqclip.clip import load_clip  # noqa: E402
from engine.vqclip.optimise import spherical_distance  # noqa: E402
from test_vqgan_clip import models  # noqa: E402,F401  (the tiny VQGAN checkpoint and CLIP folder)

CLIP_SCENE, REALTIME = "/scene/vqgan_clip", "/scene/realtime"
STEP = 0.002  # seconds between samples: 500 a second of timeline


def positions(length: float, loops: int = 2) -> np.ndarray:
    return np.arange(0.0, loops * length, STEP)


def largest_step(embeddings: list[torch.Tensor]) -> float:
    return max(float((b - a).norm()) for a, b in zip(embeddings, embeddings[1:]))


def newest(worker: SceneWorker, after: int = 0, scene: str = "realtime"):
    found = []

    def ready() -> bool:
        frame, _ = worker.output.latest()
        if frame is not None and frame.scene == scene and frame.index > after:
            found.append(frame)
            return True
        return False

    assert wait_for(ready), f"no new image; last error: {worker.last_error}"
    return found[-1]


# -- the CLIP scene's targets ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip(models):  # noqa: F811
    return load_clip(str(models[1]))


def clip_line(clip, line) -> list[tuple[torch.Tensor, float]]:
    return [(e, p.weight) for p, e in zip(line.prompts, clip.encode_text([p.text for p in line.prompts]))]


def test_clip_targets_blend_continuously_and_land_on_each_line(clip) -> None:
    timeline = parse_timeline("a red fox in the snow @3; the deep blue sea @1; a city of glass @2")
    lines = [clip_line(clip, line) for line in timeline.lines]
    own = [F.normalize(line[0][0], dim=-1) for line in lines]
    apart = min(float((a - b).norm()) for i, a in enumerate(own) for b in own[i + 1 :])
    assert apart > 1e-3  # the lines do differ
    path = []
    for t in positions(timeline.length):
        moment = timeline.moment(float(t))
        targets, weights = blend_targets(lines[moment.a], lines[moment.b], moment.blend)
        assert targets.shape == (1, own[0].shape[0]) and torch.allclose(weights, torch.ones(1))
        path.append(targets[0])
    # each step: 1/500 of a second of a line lasting 1..3 s, so 1/500 of the way at most
    assert largest_step(path) < 0.01 * apart, (largest_step(path), apart)
    for start, expected in zip(timeline.starts, own):
        targets, _ = blend_targets(*(lines[i] for i in timeline.at(start)[:2]), timeline.at(start)[2])
        assert torch.allclose(targets[0], expected, atol=1e-6)  # exactly the line's prompt at its time


def test_weighted_lines_and_a_negative_prompt_move_the_loss_continuously(clip) -> None:
    """Lines of several weighted prompts, and a push away: the loss of one image glides from line
    to line and is each line's own loss (its prompts as the optimiser weighs them) at its start."""
    timeline = parse_timeline("a red fox :1 | snow :0.5 @2; the deep blue sea @2; a city :1 | fog :-0.4 @1")
    lines = [clip_line(clip, line) for line in timeline.lines]
    image = torch.randn(4, clip.encode_text(["x"]).shape[1], generator=torch.Generator().manual_seed(0))

    def loss(targets, weights) -> float:
        return float((spherical_distance(image, targets).mean(0) * weights).sum())

    own = [
        loss(clip.encode_text([p.text for p in line.prompts]), torch.tensor([p.weight for p in line.prompts]))
        for line in timeline.lines
    ]
    spread = max(own) - min(own)
    assert spread > 1e-4
    losses = []
    for t in positions(timeline.length):
        moment = timeline.moment(float(t))
        losses.append(loss(*blend_targets(lines[moment.a], lines[moment.b], moment.blend)))
    assert max(abs(b - a) for a, b in zip(losses, losses[1:])) < 0.02 * spread
    for start, expected in zip(timeline.starts, own):
        index = int(round(start / STEP))
        assert losses[index] == pytest.approx(expected, abs=1e-5)


def clip_worker(models, values: dict):  # noqa: F811
    vqgan_dir, clip_dir, _ = models
    params = ParamRegistry()
    params.declare_all(VqganClipScene.PARAMS)
    set_params(
        params,
        {
            f"{CLIP_SCENE}/vqgan": str(vqgan_dir),
            f"{CLIP_SCENE}/clip": str(clip_dir),
            f"{CLIP_SCENE}/size": 32,
            f"{CLIP_SCENE}/cutouts": 4,
            f"{CLIP_SCENE}/prompt": "a lighthouse:1|storm:0.5",
            f"{CLIP_SCENE}/init": "camera",
            **values,
        },
    )
    worker = SceneWorker(SceneCatalog((VqganClipScene,)), params, StillFeed(), error_backoff=0.05)
    worker.start()
    worker.request("vqgan_clip")
    assert wait_for(lambda: worker.active is not None and worker.active._run is not None), worker.last_error
    return worker, params


def test_the_clip_scene_steps_through_the_timeline(models, clip) -> None:  # noqa: F811
    worker, params = clip_worker(
        models,
        {
            f"{CLIP_SCENE}/timeline/enabled": True,
            f"{CLIP_SCENE}/timeline/prompts": "a red fox @4; the deep blue sea @4",
            f"{CLIP_SCENE}/timeline/speed": 0.0,  # held still: the seek fader says where
            f"{CLIP_SCENE}/negative_prompt": "text",
        },
    )
    try:
        scene = worker.active
        fox, sea, text = F.normalize(clip.encode_text(["a red fox", "the deep blue sea", "text"]), dim=-1)

        def targets_are(*expected: torch.Tensor) -> bool:
            targets = scene._run._targets
            return targets.shape[0] == len(expected) and all(
                torch.allclose(a, b, atol=1e-5) for a, b in zip(targets, expected)
            )

        assert wait_for(lambda: targets_are(fox, text)), scene._run._targets  # the first line, and the push away
        assert [p.weight for p in scene._run.prompts][-1] == -1.0 and scene.status == "timeline 1/2"
        first = newest(worker, scene="vqgan_clip")
        set_params(params, {f"{CLIP_SCENE}/timeline/seek": 0.25})  # half way through the first line
        assert wait_for(lambda: targets_are(slerp(fox, sea, 0.5), text, text))
        set_params(params, {f"{CLIP_SCENE}/timeline/seek": 0.5})
        assert wait_for(lambda: targets_are(sea, text) and scene.status == "timeline 2/2")
        assert wait_for(lambda: not np.array_equal(newest(worker, scene="vqgan_clip").image, first.image))
        steps = scene._run.steps

        set_params(params, {f"{CLIP_SCENE}/timeline/prompts": "a red fox @4; the sea @soon"})
        assert wait_for(lambda: scene.warning is not None and "timeline refused" in scene.warning)
        assert targets_are(sea, text) and worker.last_error is None  # the last good timeline plays on

        set_params(params, {f"{CLIP_SCENE}/timeline/enabled": False})  # the prompt again
        assert wait_for(lambda: [p.text for p in scene._run.prompts] == ["a lighthouse", "storm", "text"])
        assert scene._run.steps >= steps  # the same run, no restart
    finally:
        worker.stop()


# -- the realtime scene's prompt ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("models") / "tiny"
    build_random_model("tiny", seed=0).save_pretrained(root)
    return root


def test_prompt_bank_blends_continuously_and_lands_on_each_line(tiny) -> None:
    from engine.diffusion.device import choose_device

    bank = PromptBank(tiny.tokenizer, tiny.text_encoder, choose_device("cpu"))
    timeline = parse_timeline("a cat @1; a dog on the moon:1 | stars:0.5 @2; a red car @1")
    bank.prefetch(timeline.texts())
    bank.request([("a cat", 1.0)])
    assert bank.wait(60) and wait_for(lambda: all(text in bank._cache for text in timeline.texts()))
    own = []
    for line in timeline.lines:
        bank.request([(p.text, p.weight) for p in line.prompts])
        assert bank.wait(60)
        own.append(bank.current.clone())
    apart = min(float((a - b).norm()) for i, a in enumerate(own) for b in own[i + 1 :])
    path = []
    for t in positions(timeline.length):
        moment = timeline.moment(float(t))
        mix = weighted_mix(timeline.lines[moment.a].prompts, timeline.lines[moment.b].prompts, moment.blend)
        bank.request(mix)
        assert bank.wait(0)  # every text cached: each blend published on the spot, on this thread
        path.append(bank.current.clone())
    assert largest_step(path) < 0.02 * apart, (largest_step(path), apart)
    for start, expected in zip(timeline.starts, own):
        assert torch.equal(path[int(round(start / STEP))], expected)  # exactly the line's embeddings
    bank.close()


def test_the_realtime_scene_plays_the_blend_between_two_looks(tiny_folder) -> None:
    params = ParamRegistry()
    params.declare_all(RealtimeScene.PARAMS)
    P = REALTIME
    set_params(
        params,
        {
            f"{P}/model": str(tiny_folder),
            f"{P}/vae": "",
            f"{P}/resolution": 32,
            f"{P}/device": "cpu",
            f"{P}/accel": "eager",
            f"{P}/similarity_threshold": 0.0,
            f"{P}/timeline/enabled": True,
            f"{P}/timeline/prompts": "a cat @4; a dog on the moon @4",
            f"{P}/timeline/speed": 0.0,
        },
    )
    worker = SceneWorker(SceneCatalog((Passthrough, RealtimeScene)), params, StillFeed(), error_backoff=0.05)
    worker.start()
    try:
        worker.request("realtime")
        newest(worker)
        scene = worker.active
        bank = scene._stream.prompts
        cat, dog = bank.encode("a cat"), bank.encode("a dog on the moon")

        def image_once(expected: torch.Tensor) -> np.ndarray:
            """The first image made after the bank publishes ``expected``."""
            assert wait_for(lambda: torch.allclose(bank.current, expected, atol=1e-5)), "never published"
            return newest(worker, newest(worker).index + 1).image

        at_cat = image_once(cat)
        assert scene.status.endswith("timeline 1/2")
        set_params(params, {f"{P}/timeline/seek": 0.25})
        half_way = image_once(slerp(cat, dog, 0.5))
        set_params(params, {f"{P}/timeline/seek": 0.5})
        at_dog = image_once(dog)
        assert not np.array_equal(at_cat, at_dog)
        assert not np.array_equal(half_way, at_cat) and not np.array_equal(half_way, at_dog)

        set_params(params, {f"{P}/timeline/prompts": "a cat @4; a dog:-1 @4"})  # a push away: CLIP's only
        assert wait_for(lambda: scene.warning is not None and "negative weight" in scene.warning)
        set_params(params, {f"{P}/timeline/enabled": False, f"{P}/prompt": "a dog on the moon"})
        plain = image_once(dog)
        assert np.array_equal(plain, at_dog)  # the line's start is exactly that line's prompt
        assert worker.last_error is None
    finally:
        worker.stop()


@pytest.mark.timeout(900)  # dynamo traces the tiny UNet once, in the background
def test_a_compiled_frame_plays_a_timeline_without_a_recompile(tiny) -> None:
    import copy

    from engine.diffusion.accel import CompileAccelerator, compile_counts
    from engine.diffusion.device import choose_device
    from engine.diffusion.stream import LiveSettings, StreamConfig, StreamImg2Img

    frame_thread = threading.current_thread().name
    compiled_on: list[str] = []

    def backend(graph, example_inputs):  # dynamo's eager backend, noting where each graph compiles
        compiled_on.append(threading.current_thread().name)
        return graph.forward

    stream = StreamImg2Img(
        copy.deepcopy(tiny),
        choose_device("cpu"),
        StreamConfig(size=(32, 32), steps=1),
        LiveSettings(strength=0.5, similarity_threshold=0.0),
        prompts=[("a cat", 1.0)],
        accelerator=CompileAccelerator(backend=backend),
    )
    assert stream.prompts.wait(60)
    still = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    deadline = time.monotonic() + 800
    while stream.accel != "compile":
        assert stream.accel_error is None and time.monotonic() < deadline, stream.accel_error
        stream(still)
        time.sleep(0.02)
    timeline = parse_timeline("a cat @1; a dog on the moon:1 | stars:0.5 @1")
    stream.prompts.prefetch(timeline.texts())
    assert wait_for(lambda: all(text in stream.prompts._cache for text in timeline.texts()))
    before = compile_counts()
    images = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in np.linspace(0.0, 2.0, 21):
            moment = timeline.moment(float(t))
            stream.set_prompts(
                weighted_mix(timeline.lines[moment.a].prompts, timeline.lines[moment.b].prompts, moment.blend)
            )
            images.append(stream(still))
    assert all(image is not None for image in images)
    assert (compile_counts() - before).graphs == 0 and frame_thread not in compiled_on
    assert stream.accel == "compile" and stream.accel_error is None
    assert len({image.tobytes() for image in images}) > 10  # the blend reached the image, frame by frame
    stream.close()


def test_parse_prompts_is_what_a_line_uses() -> None:
    """One syntax: a timeline line's prompt part is exactly what ``prompt`` takes."""
    text = "a red fox :1 | snow :0.5"
    assert parse_timeline(f"{text} @3").lines[0].prompts == tuple(parse_prompts(text))
