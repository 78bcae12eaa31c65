"""The flow frame is one graph, and nothing live recompiles it (CPU, dynamo's eager backend).

As in test_diffusion_graph.py: dynamo decides graphs, breaks and recompiles from its guards
and its trace, whatever the backend, so dynamo's ``eager`` backend (no code generation) proves
them in seconds. After the background build switches the stream to the compiled frame, a new
prompt, a strength within the step count, a seed and a guidance change compile nothing, and
every frame comes out of the compiled frame (no fallback to eager).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="the diffusion extra is not installed")

from diffusion_fixtures import offline, one_torch_thread  # noqa: E402,F401  (fixtures)
from engine.diffusion.accel import CompileAccelerator  # noqa: E402
from engine.diffusion.device import choose_device  # noqa: E402
from engine.diffusion.flow_configs import build_tiny_flow_pipeline  # noqa: E402
from engine.diffusion.flow_stream import FlowSettings, FlowStream, FlowStreamConfig  # noqa: E402

CPU = choose_device("cpu")
FRAME_THREAD = threading.current_thread().name


class CountingBackend:
    """A dynamo backend that notes the thread each graph is compiled on (and runs it as traced)."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    def __call__(self, graph, example_inputs):
        self.threads.append(threading.current_thread().name)
        return graph.forward


def picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("kind", ["flux", "sd3", "sana_sprint"])
def test_the_flow_frame_is_one_graph(kind):
    stream = FlowStream(
        build_tiny_flow_pipeline(kind),
        CPU,
        FlowStreamConfig(size=(32, 32), steps=2),
        FlowSettings(similarity_threshold=0.0),
        prompts=[("a cat", 1.0)],
    )
    assert stream.prompts.wait(60)
    stream(picture(0))
    with torch.inference_mode():
        explained = torch._dynamo.explain(stream.hot.frame)(*stream.inputs)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("kind", ["flux", "sana_sprint"])
def test_after_the_switch_prompt_strength_seed_and_guidance_compile_nothing(kind):
    counting = CountingBackend()
    stream = FlowStream(
        build_tiny_flow_pipeline(kind),
        CPU,
        FlowStreamConfig(size=(32, 32), steps=2),
        FlowSettings(strength=0.5, similarity_threshold=0.0),
        prompts=[("a cat", 1.0)],
        accelerator=CompileAccelerator(backend=counting),
    )
    assert stream.prompts.wait(60)
    deadline = time.monotonic() + 300
    while stream.accel != "compile":
        assert stream.accel_error is None, stream.accel_error
        assert time.monotonic() < deadline, "the build never finished"
        stream(picture(0))
        time.sleep(0.01)
    assert counting.threads == ["compile build"]

    def settled(seed: int = 1) -> np.ndarray:
        stream(picture(seed))  # the stream batch: the second frame is all new settings
        return stream(picture(seed))

    images = [settled()]
    stream.set_prompts([("a red cube", 0.7), ("a squirrel", 0.3)])
    assert stream.prompts.wait(60)
    images.append(settled())
    stream.set_strength(0.6 if kind == "sana_sprint" else 0.35)  # 2 of 6 steps, not of 4: a new first sigma
    images.append(settled())
    stream.set_seed(7)
    images.append(settled())
    stream.set_guidance_scale(2.0)  # FLUX-schnell has no guidance embedding: a new picture instead
    images.append(settled(1 if kind == "sana_sprint" else 2))
    assert all(image is not None for image in images)
    assert counting.threads == ["compile build"]  # nothing compiled since, on any thread
    assert stream.accel_state == "compile" and stream.accel_fallback is None
    assert len({image.tobytes() for image in images}) == len(images)  # every change changed the image
