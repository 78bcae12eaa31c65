"""The compiled frame keeps its promises, proven on the CPU.

- One graph per frame: the whole 1-step frame function (uint8 in, encode, UNet, decode,
  uint8 out) is ONE dynamo graph with no graph break, and compiled it gives eager's image.
- Nothing live recompiles: after the switch to the compiled frame, 50+ frames change the
  prompt, the prompt mix, weighted prompts, strength, seed, noise drift, guidance, a LoRA's
  weight and file (hot-swap), the camera's size (the 640x360 fallback pattern too) and the
  similarity filter, with ``error_on_recompile`` set: every frame comes out, and the only
  graph is the one the background build compiled, on its own thread.
- What must rebuild (a new LoRA slot, the step count, the model size) rebuilds in the
  background: never a compile on the frame's thread.
- A frame that would need a recompile anyway (something outside the stream changed what the
  graph guards on) falls back to eager, comes out, and the HUD's status says so.

Dynamo decides every recompile and graph break from its guards and its trace, the same for
every backend, so most tests compile with dynamo's ``eager`` backend (no code generation:
seconds, where inductor takes minutes cold on this 2-core machine); the live-changes test
also runs once with inductor. DREAMDECK_SLOW_TESTS=1 runs the one-graph test with inductor too.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft", reason="the diffusion extra is not installed")

from torch._dynamo.utils import counters  # noqa: E402

from diffusion_fixtures import offline, one_torch_thread  # noqa: E402,F401  (fixtures)
from engine.diffusion.accel import CompileAccelerator  # noqa: E402
from engine.diffusion.configs import build_random_model  # noqa: E402
from engine.diffusion.device import choose_device  # noqa: E402
from engine.diffusion.lora import AdapterBank, random_lora, save_lora  # noqa: E402
from engine.diffusion.stream import LiveSettings, StreamConfig, StreamImg2Img  # noqa: E402

CPU = choose_device("cpu")
SLOW = os.environ.get("DREAMDECK_SLOW_TESTS") == "1"
BACKENDS = [
    "eager",
    pytest.param(
        "inductor",
        marks=pytest.mark.skipif(
            not SLOW, reason="inductor on this CPU takes minutes cold; set DREAMDECK_SLOW_TESTS=1"
        ),
    ),
]
FRAME_THREAD = threading.current_thread().name  # the tests' own thread plays the scene worker
CAMERAS = [(32, 32), (48, 64), (360, 640)]  # the model's size, a 4:3 camera, the fallback pattern


class CountingBackend:
    """A dynamo backend that notes the thread each graph is compiled on, then compiles it
    with dynamo's eager backend or inductor."""

    def __init__(self, inner: str) -> None:
        self.inner = inner
        self.threads: list[str] = []

    def __call__(self, graph, example_inputs):
        self.threads.append(threading.current_thread().name)
        if self.inner == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(graph, example_inputs)
        return graph.forward

    def on_frame_thread(self) -> int:
        return self.threads.count(FRAME_THREAD)


def pictures(shape: tuple[int, int], count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(count)]


def run_until_switched(stream: StreamImg2Img, frame: np.ndarray, timeout: float = 1800.0) -> None:
    """Frames while the background build runs: each one an image, or dropped while torch.fx traces."""
    deadline = time.monotonic() + timeout
    while stream.accel != stream.accel_requested:
        assert stream.accel_error is None, stream.accel_error
        assert time.monotonic() < deadline, "the build never finished"
        dropped = stream.frames_dropped
        image = stream(frame)
        if stream.frames_dropped > dropped:
            time.sleep(0.05)  # a camera's next frame comes later; a busy loop would starve the build
        else:
            assert image is not None or stream.frames_in < stream.config.steps


@pytest.fixture(scope="module")
def lcm():
    """LCM_Dreamshaper's shape in miniature: an LCM scheduler and a guidance embedding."""
    return build_random_model("tiny", scheduler="lcm", time_cond_proj_dim=32)


@pytest.fixture(scope="module")
def loras(lcm, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("loras")
    return {
        name: str(save_lora(random_lora(lcm.unet, rank=rank, seed=seed), root / f"{name}.safetensors"))
        for name, rank, seed in (("a", 4, 1), ("b", 8, 2), ("c", 4, 3))
    }


def fresh_model(model):
    import copy

    return copy.deepcopy(model)  # LoRA slots add adapters to the UNet: each test its own


def play(bank: AdapterBank, slot: int, source: str) -> None:
    bank.request(slot, source)
    bank.wait(60)


# -- one graph per frame ------------------------------------------------------------------------
@pytest.mark.timeout(1800)  # inductor compiles cold: minutes here, more when the machine is shared
@pytest.mark.parametrize("tiny_vae", [True, False], ids=["taesd", "full-vae"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_one_step_frame_is_one_graph_and_gives_the_eager_image(tiny_vae, backend):
    model = build_random_model("tiny", tiny_vae=tiny_vae)
    stream = StreamImg2Img(
        model, CPU, StreamConfig(size=(32, 32)), LiveSettings(similarity_threshold=0.0), prompts=[("a cat", 1.0)]
    )
    assert stream.prompts.wait(60)
    frame = pictures((32, 32), 1)[0]
    want = stream(frame)  # eager; it also fills the frame's inputs
    inputs = stream.inputs
    with torch.inference_mode():
        explained = torch._dynamo.explain(stream.hot.frame)(*inputs)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    counting = CountingBackend(backend)
    compiled = torch.compile(stream.hot.frame, backend=counting, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        image, handed_on = compiled(*inputs)
    assert counting.threads == [FRAME_THREAD] and handed_on.shape[0] == 0
    assert image.dtype == torch.uint8 and image.shape == (32, 32, 3)
    assert np.abs(image.numpy().astype(int) - want.astype(int)).max() <= 1  # uint8 rounding at most


@pytest.fixture(params=[True, False], ids=["dynamo-refuses", "older-torch"])
def limits(request, monkeypatch):
    """torch.compile's recompile_limit / isolate_recompiles (torch 2.13), or the check a torch
    without them gets (the stream's own, around each frame)."""
    if not request.param:
        monkeypatch.setattr("engine.diffusion.accel.compile_limits_supported", lambda: False)
    return request.param


# -- nothing live recompiles --------------------------------------------------------------------
@pytest.mark.timeout(1800)  # (as above)
@pytest.mark.parametrize(
    "backend, limits",
    [("eager", True), ("eager", False), ("inductor", True)],
    indirect=["limits"],
    ids=["eager", "eager-older-torch", "inductor"],
)
def test_after_the_switch_nothing_live_recompiles_and_every_frame_comes_out(
    lcm, loras, backend, limits, tmp_path, monkeypatch
):
    """Inductor too (its one cold compile: about 3.5 minutes on this 2-core machine)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = fresh_model(lcm)
    bank = AdapterBank(model.unet, target_rank=8)
    play(bank, 1, loras["a"])  # the slot's first file: its layers are there before the first build
    counting = CountingBackend(backend)
    stream = StreamImg2Img(
        model,
        CPU,
        StreamConfig(size=(32, 32), steps=1),
        LiveSettings(strength=0.5, guidance_scale=8.0, similarity_threshold=0.0),
        prompts=[("a cat", 1.0)],
        accelerator=CompileAccelerator(backend=counting),
        adapters=bank,
    )
    assert stream.prompts.wait(60)
    run_until_switched(stream, pictures((32, 32), 1)[0])
    assert stream.accel_state == "compile" and counting.threads == ["compile build"]
    breaks_before = sum(counters["graph_break"].values())

    still = pictures((32, 32), 1, seed=99)[0]
    images: list[np.ndarray | None] = []
    looks: dict[str, np.ndarray] = {}

    last: list[np.ndarray] = []

    def frame(shape=(32, 32)):
        last[:] = pictures(shape, 1, seed=len(images) + 1)
        images.append(stream(last[0]))

    def look(name: str) -> None:
        """The still picture once more: what the change did to it."""
        stream.set_similarity_threshold(0.0)
        images.append(stream(still))
        looks[name] = images[-1]

    with torch._dynamo.config.patch(error_on_recompile=True):
        look("start")
        with torch.inference_mode():  # the same inputs, eager: the compiled image within rounding
            eager, _ = stream.hot.frame(*stream.inputs)
        assert np.abs(eager.numpy().astype(int) - looks["start"].astype(int)).max() <= 1
        for text in (
            (("a forest", 1.0),),
            (("a forest", 0.7), ("fog", 0.3)),
            (("a forest", 1), ("fog", 0.5), ("a cat", 0.25)),
        ):
            stream.set_prompts(text)  # a prompt; a prompt mix; weighted prompts
            assert stream.prompts.wait(60)
            frame(), frame()
        look("prompts")
        for mix in np.linspace(0.0, 1.0, 5):  # prompt_mix moving: blends of cached prompts, on the spot
            stream.set_prompts([("a forest", 1.0 - mix), ("fog", mix)])
            frame()
        for strength in (0.3, 0.7, 0.9):
            stream.set_strength(strength)
            frame()
        look("strength")
        for seed in (1, 2):
            stream.set_seed(seed)
            frame()
        look("seed")
        stream.set_noise_drift(0.4)
        frame(), frame(), frame()
        stream.set_noise_drift(0.0)
        for guidance in (2.0, 12.0):
            stream.set_guidance_scale(guidance)
            frame()
        look("guidance")
        for weight in (0.5, 0.0, 1.0, 1.5):
            bank.set_weight(1, weight)
            frame()
        look("lora weight")
        play(bank, 1, loras["b"])  # another file into slot 1: hot-swapped into the same tensors
        frame()
        assert bank.last_swap.hotswapped and bank.sources == {1: loras["b"]}
        look("lora file")
        for shape in CAMERAS * 4:  # a camera of another size, the 640x360 fallback pattern
            frame(shape)
        stream.set_similarity_threshold(0.98)  # the filter on: new pictures still come out
        for shape in CAMERAS:
            frame(shape)
        assert stream(last[0]) is None  # the same picture again: nothing new, skipped
        stream.set_similarity_threshold(0.0)
        frame(), frame(), frame()

    assert len(images) >= 50 and all(image is not None for image in images)
    assert all(image.shape == (32, 32, 3) for image in images)
    assert counting.threads == ["compile build"], counting.threads  # one graph, never one on the frame path
    assert sum(counters["graph_break"].values()) == breaks_before
    assert stream.accel_state == "compile"
    names = list(looks)
    for before, after in zip(names, names[1:]):  # each change reached the image
        assert not np.array_equal(looks[before], looks[after]), (before, after)
    report = stream.check_frame(pictures((360, 640), 1, seed=7)[0])  # what the GPU benchmark prints
    assert report.image is not None and report.graphs == 0 and report.graph_breaks == 0
    assert not report.syncs_checked and report.sync_error is None  # (host syncs: a CUDA check only)
    stream.close()
    bank.close()


# -- what must rebuild, rebuilds in the background ----------------------------------------------
@pytest.mark.timeout(900)  # four builds
def test_a_new_lora_slot_the_step_count_and_the_size_rebuild_in_the_background(lcm, loras):
    model = fresh_model(lcm)
    bank = AdapterBank(model.unet, target_rank=8)
    counting = CountingBackend("eager")

    def stream_of(steps: int, size: int, old: StreamImg2Img | None = None) -> StreamImg2Img:
        """What the realtime scene does for a new step count or resolution: a new stream on the loaded model."""
        stream = StreamImg2Img(
            model,
            CPU,
            StreamConfig(size=(size, size), steps=steps),
            LiveSettings(strength=0.6, similarity_threshold=0.0),
            prompts=[("a cat", 1.0)],
            accelerator=CompileAccelerator(backend=counting),
            bank=old.prompts if old else None,
            adapters=bank,
        )
        assert stream.prompts.wait(60)
        return stream

    def frames_on(stream: StreamImg2Img, count: int) -> None:
        for i, shape in zip(range(count), CAMERAS * count):
            out = stream(pictures(shape, 1, seed=i)[0])
            assert out is not None or stream.frames_in < stream.config.steps
            assert out is None or out.shape == (*stream.size, 3)

    stream = stream_of(1, 32)
    run_until_switched(stream, pictures((32, 32), 1)[0])
    with torch._dynamo.config.patch(error_on_recompile=True):
        frames_on(stream, 6)
        play(bank, 2, loras["c"])  # a second slot: new adapter layers, the compiled frame no longer fits
        frames_on(stream, 1)  # swaps it in: back to eager at once, a new build starts in the background
        assert stream.builds_started == 2
        run_until_switched(stream, pictures((48, 64), 1)[0])
        frames_on(stream, 6)
        for steps, size in ((2, 32), (2, 64)):  # the step count, then the model size
            stream = stream_of(steps, size, stream)  # (the old one's prompt bank plays on in the new one)
            frames_on(stream, 3)  # eager at once, while the build runs
            run_until_switched(stream, pictures((360, 640), 1)[0])
            frames_on(stream, 6)
            assert stream.accel_state == "compile"
    assert counting.on_frame_thread() == 0, counting.threads  # every compile was a background build's
    assert counting.threads == ["compile build"] * 4
    assert stream.frames_dropped == 0  # dynamo alone never patches modules (no frame met fx tracing)
    stream.close()
    bank.close()


# -- and if something recompiles anyway, the HUD says so ----------------------------------------
def test_a_frame_that_would_recompile_falls_back_to_eager_and_says_so(lcm, limits):
    """torch guards every graph on process-wide state, the CPU thread count among it: another
    scene's load (``reserve_render_core``) may change it. The frame must then neither compile
    for seconds (an older torch compiles once, then falls back) nor let dynamo run eager
    silently while the HUD says ``compile``."""
    counting = CountingBackend("eager")
    stream = StreamImg2Img(
        lcm,
        CPU,
        StreamConfig(size=(32, 32)),
        LiveSettings(similarity_threshold=0.0),
        prompts=[("a cat", 1.0)],
        accelerator=CompileAccelerator(backend=counting),
    )
    assert stream.prompts.wait(60)
    frame = pictures((32, 32), 1)[0]
    run_until_switched(stream, frame)
    want = stream(frame)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        got = stream(frame)
    finally:
        torch.set_num_threads(threads)
    assert got is not None and np.abs(got.astype(int) - want.astype(int)).max() <= 1  # the frame came out
    assert counting.threads == ["compile build"] + ([] if limits else [FRAME_THREAD])  # (see above)
    assert stream.accel == "eager"
    assert stream.accel_state == "compile (fell back to eager: a frame needed a recompile)"
    assert stream.accel_error.startswith("compile fell back to eager: the frame needed a recompile")
    assert stream(frame) is not None and stream.accel_state.startswith("compile (fell back")  # it stays said


def test_a_show_can_rebuild_more_often_than_dynamo_compiles_one_function():
    """dynamo compiles one code object at most ``accumulated_recompile_limit`` times per process
    (256), then refuses; a show rebuilds for every new step count, size or LoRA slot, for weeks.
    Each build compiles its own copy of the frame's code (the limit is lowered here to see it)."""
    from engine.diffusion.hotpath import FrameInputs
    from engine.diffusion.schedule import StageCoefficients

    class Frame(torch.nn.Module):
        def frame(self, pixels, buffer, text, noise, c, timestep_cond, control=None, style=None):
            return pixels + 1, buffer

    example = FrameInputs(
        torch.zeros((4, 4, 3), dtype=torch.uint8),
        torch.zeros((0, 4, 2, 2)),
        torch.zeros((1, 77, 8)),
        torch.zeros((1, 4, 2, 2)),
        StageCoefficients(*(torch.zeros(1) for _ in range(8))),
        None,
    )
    with torch._dynamo.config.patch(accumulated_recompile_limit=3):
        for _ in range(5):
            backend = CompileAccelerator(backend="eager").build(Frame(), example)
            with torch.inference_mode():
                image, _ = backend.frame(*example)
            assert image.sum() == 4 * 4 * 3
