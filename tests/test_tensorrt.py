"""The TensorRT backend's pure parts, on the CPU: cache key, shapes, profile, fallback policy.

TensorRT itself has never run on a machine of this project; nothing here stands in for the
engine (its build-and-run test, in test_diffusion_accel.py, needs ``tensorrt`` and a CUDA GPU).
What is checked is everything a first GPU run relies on: the key that names a cached engine,
the shapes a stream's UNet call really sees (read off a real tiny stream) and the one fixed
profile built for them, and the named fallback to torch.compile when TensorRT is missing
or its build fails. The first tests need no torch.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from engine.diffusion.options import accel_label
from engine.diffusion.tensorrt import engine_key, engine_path, shape_profile, stream_unet_shapes, unavailable_reason

SHAPES = {"sample": (1, 4, 64, 64), "timestep": (1,), "encoder_hidden_states": (1, 77, 1024)}


# -- no torch ------------------------------------------------------------------------------------


def test_engine_key_names_model_shapes_precision_and_version(tmp_path):
    key = engine_key("abc", SHAPES, True, "10.0")
    assert key == engine_key("abc", dict(reversed(list(SHAPES.items()))), True, "10.0")  # order is no identity
    others = {
        engine_key("abd", SHAPES, True, "10.0"),
        engine_key("abc", SHAPES, False, "10.0"),
        engine_key("abc", SHAPES, True, "10.1"),
        engine_key("abc", {**SHAPES, "sample": (2, 4, 64, 64)}, True, "10.0"),
    }
    assert key not in others and len(others) == 4
    assert engine_path(tmp_path, key) == tmp_path / f"unet-{key}.plan"


def test_stream_shapes_are_one_call_over_every_stage():
    assert stream_unet_shapes(1, (4, 64, 64), (77, 1024), None) == SHAPES
    lcm = stream_unet_shapes(4, (4, 64, 64), (77, 768), 256)
    assert lcm == {
        "sample": (4, 4, 64, 64),
        "timestep": (4,),
        "encoder_hidden_states": (4, 77, 768),
        "timestep_cond": (4, 256),
    }
    with pytest.raises(ValueError, match="at least one step"):
        stream_unet_shapes(0, (4, 64, 64), (77, 1024), None)


def test_the_profile_is_exactly_the_stream_shapes():
    profile = shape_profile(SHAPES)
    assert set(profile) == set(SHAPES)
    assert all(low == best == high == SHAPES[name] for name, (low, best, high) in profile.items())
    for bad in ({"sample": (-1, 4, 64, 64)}, {"sample": (0, 4, 64, 64)}, {"sample": ()}, {"sample": (1.5, 4)}, {}):
        with pytest.raises(ValueError):
            shape_profile(bad)


def test_why_tensorrt_cannot_run():
    assert "CUDA" in unavailable_reason("cpu") and "mps" in unavailable_reason("mps")
    assert "not installed" in unavailable_reason("cuda", find_spec=lambda name: None)
    assert unavailable_reason("cuda", find_spec=lambda name: object()) is None
    if importlib.util.find_spec("tensorrt") is None:  # this machine, as it is
        assert "pip install tensorrt" in unavailable_reason("cuda")


def test_every_view_of_the_backend_calls_tensorrt_experimental():
    assert accel_label("tensorrt") == "tensorrt (experimental)"
    assert accel_label("eager, tensorrt building 12 s") == "eager, tensorrt (experimental) building 12 s"
    assert accel_label("compile") == "compile" and accel_label("eager, compile failed") == "eager, compile failed"
    from engine.cli import build_parser

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    assert "tensorrt (experimental, never run on a GPU yet)" in " ".join(run.format_help().split())
    from engine.catalog import build_registry
    from engine.scenes import installed_catalog

    described = build_registry(installed_catalog()).param("/scene/realtime/accel").description
    assert "tensorrt (experimental" in described


# -- torch: a real tiny stream -------------------------------------------------------------------

torch_needed = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("diffusers") is None,
    reason="the diffusion extra is not installed",
)


def _stream(model, steps: int, accelerator=None):
    from engine.diffusion.device import choose_device
    from engine.diffusion.stream import LiveSettings, StreamConfig, StreamImg2Img

    stream = StreamImg2Img(
        model,
        choose_device("cpu"),
        StreamConfig(size=(32, 32), steps=steps),
        LiveSettings(similarity_threshold=0.0),
        prompts=[("a cat", 1.0)],
        accelerator=accelerator,
    )
    assert stream.prompts.wait(60)
    return stream


def _frames(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(count)]


@torch_needed
@pytest.mark.parametrize("steps, lcm", [(1, False), (3, True)])
def test_stream_shapes_are_what_the_unet_really_sees(steps, lcm):
    """The profile is built from ``stream_unet_shapes``: they must be the shapes of the real call."""
    import torch

    from engine.diffusion.configs import build_random_model

    torch.set_num_threads(1)
    model = build_random_model("tiny", scheduler="lcm" if lcm else "euler", time_cond_proj_dim=32 if lcm else None)
    seen = []

    def record(module, args, kwargs):
        cond = kwargs.get("timestep_cond")
        seen.append(
            {
                "sample": tuple(args[0].shape),
                "timestep": tuple(args[1].shape),
                "encoder_hidden_states": tuple(kwargs["encoder_hidden_states"].shape),
                **({"timestep_cond": tuple(cond.shape)} if cond is not None else {}),
            }
        )

    model.unet.register_forward_pre_hook(record, with_kwargs=True)
    stream = _stream(model, steps)
    for frame in _frames(steps + 1):
        stream(frame)
    stream.close()
    want = stream_unet_shapes(
        steps, stream.latent_shape, tuple(stream.prompts.current.shape[1:]), model.unet.config.time_cond_proj_dim
    )
    assert seen and all(call == want for call in seen)
    shape_profile(want)  # and TensorRT would accept them


def _switch(stream, images) -> None:
    for image in images:
        stream(image)
    stream.wait_for_accel(300)
    stream(images[0])


@torch_needed
def test_tensorrt_missing_falls_back_to_compile(caplog):
    """On this CPU TensorRT cannot run: the ``tensorrt`` choice builds the compile fallback instead,
    says why once, and the stream reports the backend that actually runs."""
    from engine.diffusion.accel import CompileAccelerator
    from engine.diffusion.configs import build_random_model
    from engine.diffusion.tensorrt import tensorrt_or_compile

    choice = tensorrt_or_compile("cpu", fallback=CompileAccelerator(backend="eager"))
    assert choice.name == "tensorrt" and choice.unavailable is not None
    stream = _stream(build_random_model("tiny"), 1, choice)
    with caplog.at_level("WARNING", logger="engine.diffusion.tensorrt"):
        _switch(stream, _frames(2))
    stream.close()
    assert stream.accel_requested == "tensorrt" and stream.accel == "compile"  # what runs, not what was asked
    assert stream.accel_error is None and "CUDA" in choice.fell_back
    assert [r.getMessage() for r in caplog.records] == [
        f"tensorrt (experimental): {choice.fell_back}; falling back to compile"
    ]


@torch_needed
def test_a_failed_tensorrt_build_falls_back_to_compile(tmp_path):
    """The real TensorRT build, let past the availability check, fails here (no tensorrt to
    import): the fallback policy catches it and compile runs."""
    from engine.diffusion.accel import CompileAccelerator, TensorRTAccelerator
    from engine.diffusion.configs import build_random_model
    from engine.diffusion.tensorrt import TensorRTOrCompile

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed: its build would not fail for want of it")
    choice = TensorRTOrCompile(TensorRTAccelerator(cache_dir=tmp_path), CompileAccelerator(backend="eager"))
    stream = _stream(build_random_model("tiny"), 1, choice)
    _switch(stream, _frames(2))
    stream.close()
    assert stream.accel == "compile" and choice.fell_back.startswith("the TensorRT build failed: ")
    assert "tensorrt" in choice.fell_back  # ModuleNotFoundError: No module named 'tensorrt'


@torch_needed
def test_when_the_fallback_fails_too_the_stream_stays_on_eager(tmp_path):
    from engine.diffusion.accel import CompileAccelerator, TensorRTAccelerator
    from engine.diffusion.configs import build_random_model
    from engine.diffusion.tensorrt import TensorRTOrCompile

    broken = CompileAccelerator(backend="no-such-backend")  # torch.compile refuses it: a real failure
    choice = TensorRTOrCompile(TensorRTAccelerator(cache_dir=tmp_path), broken, unavailable="no TensorRT here")
    stream = _stream(build_random_model("tiny"), 1, choice)
    images = _frames(2)
    _switch(stream, images)
    assert stream.accel == "eager" and "tensorrt failed" in stream.accel_error
    assert stream(images[1]) is not None  # the show goes on, eager
    stream.close()
