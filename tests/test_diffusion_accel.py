"""Acceleration backends: the background build, the switch, and the same images after it.

- torch.compile: built on a background thread while frames run eager, then switched in.
  Inductor on this 2-core CPU takes 70-170 s cold for even the tiny model, so the default
  test compiles with dynamo's ``eager`` backend (the frame is always compiled with
  ``fullgraph=True``): the same dynamo tracing (and proof that the frame has no graph break,
  which would split its CUDA graph) and the same build-then-switch machinery, without code
  generation (test_diffusion_graph.py proves the rest of what a compiled frame promises). (``aot_eager`` trips over the
  VAE's group norm in torch 2.13 on the CPU.) DREAMDECK_SLOW_TESTS=1 also runs real
  inductor, cold then warm from its disk cache.
- TensorRT: the ONNX export it builds from is run with onnxruntime against torch. The
  engine build and run need the ``tensorrt`` package and a CUDA GPU: skipped without them.
"""

from __future__ import annotations

import os
import re
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="the diffusion extra is not installed")

from diffusion_fixtures import one_torch_thread, tiny  # noqa: E402,F401  (fixtures)
from engine.diffusion.accel import CompileAccelerator, EagerAccelerator, choose_accelerator  # noqa: E402
from engine.diffusion.configs import build_random_model  # noqa: E402
from engine.diffusion.device import choose_device  # noqa: E402
from engine.diffusion.hotpath import DiffusersUNet  # noqa: E402
from engine.diffusion.options import TorchDefaults  # noqa: E402
from engine.diffusion.stream import LiveSettings, StreamConfig, StreamImg2Img  # noqa: E402
from engine.diffusion.tensorrt import engine_key, module_fingerprint  # noqa: E402

CPU = choose_device("cpu")
SLOW = os.environ.get("DREAMDECK_SLOW_TESTS") == "1"


def frames(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(count)]


def stream_on(model, accelerator, steps: int = 1) -> StreamImg2Img:
    stream = StreamImg2Img(
        model,
        CPU,
        StreamConfig(size=(32, 32), steps=steps),
        LiveSettings(similarity_threshold=0.0),
        prompts=[("a cat", 1.0)],
        accelerator=accelerator,
    )
    assert stream.prompts.wait(30)
    return stream


def run_until_switched(stream: StreamImg2Img, images: list[np.ndarray], timeout: float = 600.0) -> int:
    """Feed frames while the backend builds; returns how many frames ran before the switch."""
    deadline = time.monotonic() + timeout
    produced = 0
    while stream.accel == "eager" and stream.accel_error is None and time.monotonic() < deadline:
        dropped = stream.frames_dropped
        image = stream(images[produced % len(images)])
        # the show never waits for the compiler: an image, or a frame dropped while torch.fx traces
        assert image is not None or stream.frames_dropped > dropped
        produced += 1
    return produced


@pytest.mark.parametrize(
    "backend",
    [
        "eager",
        pytest.param(
            "inductor",
            marks=pytest.mark.skipif(
                not SLOW, reason="inductor on this CPU takes minutes cold; set DREAMDECK_SLOW_TESTS=1"
            ),
        ),
    ],
)
def test_compile_builds_in_the_background_then_switches(tiny, backend, tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # the backend chooses a persistent one
    images = frames(3)
    reference = stream_on(tiny, EagerAccelerator())
    expected = [reference(f) for f in images]
    compiled = stream_on(tiny, CompileAccelerator(backend=backend, cache_dir=tmp_path / "inductor"))
    assert compiled.accel == "eager"  # frames start at once, on eager
    assert compiled.accel_state == "eager, compile from the first frame"
    compiled(images[0])
    assert re.fullmatch(r"compile|eager, compile building \d+ s", compiled.accel_state), compiled.accel_state
    run_until_switched(compiled, images)
    assert compiled.wait_for_accel(600), compiled.accel_error
    assert compiled.accel == "compile" and compiled.accel_ready_s is not None
    assert compiled.accel_state == "compile"
    for frame, want in zip(images, expected):
        got = compiled(frame)
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    if backend == "eager":
        assert compiled.frames_dropped == 0  # dynamo alone never patches modules
    else:
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
        assert any((tmp_path / "inductor").rglob("*")), "the inductor cache stayed empty"


WARM_START = """
import sys, numpy as np, torch
import torch.fx._symbolic_trace as symbolic_trace
from engine.diffusion.accel import CompileAccelerator
from engine.diffusion.configs import build_random_model
from engine.diffusion.device import choose_device
from engine.diffusion.stream import LiveSettings, StreamConfig, StreamImg2Img
torch.set_num_threads(1)
traces = []
trace = symbolic_trace.Tracer.trace
symbolic_trace.Tracer.trace = lambda self, *a, **k: traces.append(1) or trace(self, *a, **k)
stream = StreamImg2Img(build_random_model("tiny"), choose_device("cpu"), StreamConfig(size=(32, 32)),
                       LiveSettings(similarity_threshold=0.0), prompts=[("a cat", 1.0)],
                       accelerator=CompileAccelerator(cache_dir=sys.argv[1]))
stream.prompts.wait()
frame = np.zeros((32, 32, 3), np.uint8)
while stream.accel == "eager" and stream.accel_error is None:
    stream(frame)
print(stream.accel, len(traces), stream.frames_dropped, stream.accel_ready_s)
"""


@pytest.mark.skipif(not SLOW, reason="inductor on this CPU takes minutes cold; set DREAMDECK_SLOW_TESTS=1")
@pytest.mark.timeout(2400)  # two processes, a cold and a warm inductor build
def test_a_warm_inductor_cache_builds_without_tracing(tmp_path):
    """A second start of the show (a new process, the same cache) loads from inductor's disk
    caches: no torch.fx tracing, so no frame is dropped while it builds, and it is faster."""
    import subprocess
    import sys

    def start() -> list[str]:
        done = subprocess.run(
            [sys.executable, "-c", WARM_START, str(tmp_path / "inductor")], capture_output=True, text=True, timeout=1200
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.split()

    cold, warm = start(), start()
    assert cold[0] == warm[0] == "compile"
    assert int(cold[1]) > 0  # a cold build traces (and may drop frames meanwhile)
    assert int(warm[1]) == 0 and int(warm[2]) == 0
    assert float(warm[3]) < float(cold[3])


def test_a_failed_build_stays_on_eager_and_says_why(tiny):
    stream = stream_on(tiny, CompileAccelerator(backend="no_such_backend"))
    assert stream(frames(1)[0]) is not None  # the first frame starts the build, and runs eager
    assert not stream.wait_for_accel(60)
    assert stream.accel == "eager"
    assert "compile failed, staying on eager" in stream.accel_error
    assert stream.accel_state == "eager, compile failed"
    assert stream(frames(1)[0]) is not None


class GatedAccelerator:
    """Eager stages that take as long as the test says: a build it can hold open."""

    name = "gated"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.builds = 0

    def build(self, hot, example):
        self.builds += 1
        assert self.gate.wait(60)
        return EagerAccelerator().build(hot, example)._replace(name=self.name)


def test_layers_changed_during_a_build_make_it_stale_and_it_builds_again(tiny):
    """A LoRA adapter added while a build is under way: that build is for layers that are
    gone, so it is thrown away and another one starts; the frames stay on eager meanwhile."""
    accelerator = GatedAccelerator()
    stream = stream_on(tiny, accelerator)
    image = frames(1)[0]
    assert stream(image) is not None  # starts the build, runs eager
    stream.rebuild_accelerated()  # what a new LoRA adapter does
    assert stream(image) is not None and stream.accel == "eager"
    accelerator.gate.set()
    assert not stream.wait_for_accel(60)  # the first build ended stale: not switched to
    assert stream.accel == "eager" and stream.accel_error is None
    assert stream(image) is not None  # the next frame starts the second build
    assert stream.wait_for_accel(60) and stream.accel == "gated" and accelerator.builds == 2
    stream.rebuild_accelerated()  # no build under way: back to eager, and the next frame builds
    assert stream.accel == "eager"
    stream(image)
    assert stream.wait_for_accel(60) and accelerator.builds == 3


def test_auto_policy():
    assert choose_accelerator("auto", torch.device("cpu")).name == "eager"
    assert choose_accelerator("auto", torch.device("cuda")).name == "compile"
    tensorrt = choose_accelerator("tensorrt", torch.device("cpu"))  # experimental: with its fallback
    assert tensorrt.name == "tensorrt" and "CUDA" in tensorrt.unavailable
    with pytest.raises(ValueError, match="not one of"):
        choose_accelerator("fast", torch.device("cpu"))


def test_auto_is_what_dreamdeck_run_chose():
    show = TorchDefaults(accel="compile")  # dreamdeck run --accel compile
    assert choose_accelerator(show.pick().accel, torch.device("cpu")).name == "compile"
    assert choose_accelerator(show.pick(accel="eager").accel, torch.device("cpu")).name == "eager"  # the scene's wins
    assert choose_accelerator(TorchDefaults(accel="tensorrt").pick().accel, torch.device("cpu")).name == "tensorrt"
    with pytest.raises(ValueError, match="not one of"):
        TorchDefaults(accel="fast")


def test_onnx_export_with_dynamic_batch_runs_like_torch(tmp_path):
    """The LCM variant (with the guidance input) exported once, run at batch 1 and 3 by onnxruntime."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from engine.diffusion.onnx_export import OUTPUT_NAME, export_unet_onnx, unet_input_names

    model = build_random_model("tiny", scheduler="lcm", time_cond_proj_dim=32)
    unet = DiffusersUNet(model.unet).eval()

    def inputs(batch: int):
        generator = torch.Generator().manual_seed(batch)
        return (
            torch.randn(batch, 4, 16, 16, generator=generator),
            torch.linspace(999.0, 259.0, batch),
            torch.randn(batch, 77, 32, generator=generator),
            torch.randn(batch, 32, generator=generator),
        )

    path = export_unet_onnx(unet, inputs(2), tmp_path / "unet.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == unet_input_names(True)
    assert session.get_outputs()[0].name == OUTPUT_NAME
    for batch in (1, 3):
        args = inputs(batch)
        got = session.run(None, {name: t.numpy() for name, t in zip(unet_input_names(True), args)})[0]
        with torch.no_grad():
            want = unet(*args).numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_engine_cache_key_follows_model_shapes_and_precision(tiny):
    fingerprint = module_fingerprint(DiffusersUNet(tiny.unet))
    shapes = {"sample": (1, 4, 64, 64), "timestep": (1,), "encoder_hidden_states": (1, 77, 1024)}
    key = engine_key(fingerprint, shapes, True, "10.0")
    assert key == engine_key(fingerprint, dict(shapes), True, "10.0")
    assert key != engine_key(fingerprint, {**shapes, "sample": (2, 4, 64, 64)}, True, "10.0")
    assert key != engine_key(fingerprint, shapes, False, "10.0")
    other = build_random_model("tiny", seed=1)
    assert module_fingerprint(DiffusersUNet(other.unet)) != fingerprint


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT needs a CUDA GPU")
def test_tensorrt_engine_matches_torch(tmp_path):
    pytest.importorskip("tensorrt")
    from engine.diffusion.tensorrt import TrtUNet, build_cached_engine

    gpu = choose_device("cuda")
    model = build_random_model("tiny").to(gpu)
    unet = DiffusersUNet(model.unet).eval()
    args = (
        torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float16),
        torch.tensor([499.0, 249.0], device="cuda"),
        torch.randn(2, 77, 32, device="cuda", dtype=torch.float16),
        None,
    )
    path = build_cached_engine(unet, args, tmp_path)
    assert build_cached_engine(unet, args, tmp_path) == path  # the second time from the cache
    with torch.no_grad():
        got, want = TrtUNet(path, torch.device("cuda"))(*args), unet(*args)
    torch.cuda.synchronize()
    assert torch.allclose(got.float(), want.float(), atol=2e-2)
