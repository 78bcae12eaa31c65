"""A TensorRT engine for the UNet: built once per (model, shapes, precision), cached on disk.

EXPERIMENTAL: this backend has never run on a GPU yet (the project's GPU machine has no
TensorRT). It is written against the TensorRT 10 Python API; until a run proves it, every
place that offers it says "experimental" (``options.accel_label``).

What is verified, on the CPU (tests/test_tensorrt.py), is everything around the engine:

- ``engine_key``: the cache key (model fingerprint, input shapes, precision, TensorRT version);
- ``stream_unet_shapes`` / ``shape_profile``: the shapes one stream's UNet call sees, and the
  one optimisation profile built for exactly them (min = opt = max: frames are fitted to the
  model size before the graph, so a stream never sees another shape);
- ``unavailable_reason`` and ``TensorRTOrCompile``: the named fallback policy, TensorRT
  missing or its build failing -> torch.compile, said in the log and in ``fell_back``;
- the ONNX export the engine is built from (``onnx_export.py``, run with onnxruntime).

Nothing stands in for the engine itself: ``build_engine`` and ``TrtUNet`` need ``tensorrt``
and a CUDA GPU, and their test skips without them. Importing this module needs no torch and
no TensorRT: both are imported inside the functions that use them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from engine.diffusion.accel import Accelerator, Backend
    from engine.diffusion.hotpath import FrameInputs, HotPath

log = logging.getLogger(__name__)

Shape = tuple[int, ...]


# -- pure parts: no torch, no TensorRT -----------------------------------------------------------


def engine_key(fingerprint: str, shapes: dict[str, Shape], fp16: bool, trt_version: str) -> str:
    """The cache key: model, input shapes, precision and TensorRT version, hashed."""
    text = json.dumps({"model": fingerprint, "shapes": shapes, "fp16": fp16, "trt": trt_version}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def engine_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"unet-{key}.plan"


def stream_unet_shapes(
    steps: int, latent_shape: Shape, text_shape: Shape, timestep_cond_dim: int | None
) -> dict[str, Shape]:
    """The inputs of a stream's one UNet call: every stage of the stream batch at once.

    ``latent_shape``: (channels, h, w); ``text_shape``: (tokens, width) of one prompt embedding;
    ``timestep_cond_dim``: the guidance embedding's width (LCM_Dreamshaper), or None.
    """
    if steps < 1:
        raise ValueError(f"a stream batch has at least one step, not {steps}")
    shapes = {"sample": (steps, *latent_shape), "timestep": (steps,), "encoder_hidden_states": (steps, *text_shape)}
    if timestep_cond_dim is not None:
        shapes["timestep_cond"] = (steps, timestep_cond_dim)
    return shapes


def shape_profile(shapes: dict[str, Shape]) -> dict[str, tuple[Shape, Shape, Shape]]:
    """One optimisation profile, (min, opt, max) per input, all three the given shape.

    A stream's shapes are fixed for its life (a new size or step count builds a new stream),
    and an engine built for exactly one shape is the fastest TensorRT makes; a range would
    trade speed for shapes the stream never sends. A dimension that is not a positive
    integer (a dynamic ``-1``, a zero batch) is refused here, before minutes of building.
    """
    if not shapes:
        raise ValueError("a TensorRT profile needs at least one input")
    profile = {}
    for name, shape in shapes.items():
        shape = tuple(shape)
        if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ValueError(f"TensorRT input {name!r} needs a fixed positive shape, not {shape}")
        profile[name] = (shape, shape, shape)
    return profile


def unavailable_reason(device_type: str, find_spec: Callable[[str], Any] = importlib.util.find_spec) -> str | None:
    """Why TensorRT cannot run here, or None when it may (it is installed and the device is CUDA)."""
    if device_type != "cuda":
        return f"TensorRT needs a CUDA device, not {device_type}"
    if find_spec("tensorrt") is None:
        return "the tensorrt package is not installed (pip install tensorrt)"
    return None


class TensorRTOrCompile:
    """The ``tensorrt`` backend with its named fallback: torch.compile when TensorRT cannot run.

    ``unavailable``: why TensorRT cannot run here (``unavailable_reason``), checked before any
    export; a build that raises (an ONNX export, a parse, an out-of-memory build) falls back too.
    ``fell_back`` says why, or stays None; the stages returned then are named after the
    fallback ("compile"), so ``stream.accel`` tells what actually runs. When the fallback
    fails as well, its error is raised and the stream stays on eager (its own policy).
    """

    name = "tensorrt"

    def __init__(self, tensorrt: Accelerator, fallback: Accelerator, unavailable: str | None = None) -> None:
        self.tensorrt = tensorrt
        self.fallback = fallback
        self.unavailable = unavailable
        self.fell_back: str | None = None

    def build(self, hot: HotPath, example: FrameInputs) -> Backend:
        if self.unavailable is not None:
            return self._fall_back(hot, example, self.unavailable)
        try:
            return self.tensorrt.build(hot, example)
        except Exception as exc:  # named fallback policy: any failed build -> compile, said once
            log.debug("the TensorRT build failed", exc_info=True)
            return self._fall_back(hot, example, f"the TensorRT build failed: {type(exc).__name__}: {exc}")

    def _fall_back(self, hot: HotPath, example: FrameInputs, why: str) -> Backend:
        self.fell_back = why
        log.warning("tensorrt (experimental): %s; falling back to %s", why, self.fallback.name)
        return self.fallback.build(hot, example)


def tensorrt_or_compile(
    device_type: str, fallback: Accelerator | None = None, cache_dir: Path | None = None
) -> TensorRTOrCompile:
    """The ``tensorrt`` choice as a show should make it: TensorRT where it can run, else ``fallback``
    (default: ``CompileAccelerator()``)."""
    from engine.diffusion.accel import CompileAccelerator, TensorRTAccelerator

    return TensorRTOrCompile(
        TensorRTAccelerator(cache_dir=cache_dir), fallback or CompileAccelerator(), unavailable_reason(device_type)
    )


# -- torch parts ---------------------------------------------------------------------------------


def module_fingerprint(module: torch.nn.Module) -> str:
    """A cheap identity for weights: config, parameter names, shapes, dtypes and a few values each."""
    digest = hashlib.sha256()
    config = getattr(getattr(module, "unet", module), "config", None)
    if config is not None:
        digest.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    for name, param in module.named_parameters():
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        digest.update(param.detach().flatten()[:8].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def tensor_shapes(inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]) -> dict[str, Shape]:
    """The engine's input names and shapes for these UNet inputs (timestep_cond may be None)."""
    from engine.diffusion.onnx_export import unet_input_names

    names = unet_input_names(inputs[3] is not None)
    return {name: tuple(t.shape) for name, t in zip(names, inputs) if t is not None}


# -- TensorRT parts (need tensorrt and a CUDA GPU) -----------------------------------------------


def build_cached_engine(
    unet: torch.nn.Module,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    cache_dir: Path,
    fp16: bool = True,
) -> Path:
    """The engine file for these inputs' shapes, exported and built only if not cached."""
    import tensorrt as trt

    from engine.diffusion.onnx_export import export_unet_onnx

    shapes = tensor_shapes(inputs)
    key = engine_key(module_fingerprint(unet), shapes, fp16, trt.__version__)
    path = engine_path(cache_dir, key)
    if path.exists():
        log.info("TensorRT engine from cache: %s", path)
        return path
    onnx_path = Path(cache_dir) / f"unet-{key}" / "unet.onnx"
    if not onnx_path.exists():
        log.info("exporting the UNet to ONNX: %s", onnx_path)
        export_unet_onnx(unet, inputs, onnx_path)
    build_engine(onnx_path, path, shapes, fp16=fp16)
    return path


def build_engine(onnx_path: Path, engine_file: Path, shapes: dict[str, Shape], fp16: bool) -> None:
    """Parse the ONNX, build for exactly ``shapes`` (one profile), write atomically."""
    import tensorrt as trt

    profile_shapes = shape_profile(shapes)  # refused before TensorRT starts, if a shape is not fixed
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (smallest, best, largest) in profile_shapes.items():
        profile.set_shape(name, smallest, best, largest)
    config.add_optimization_profile(profile)
    config.progress_monitor = _progress_monitor(trt)
    log.info("building the TensorRT engine (minutes, once per model and size): %s", engine_file)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT could not build the engine (its log above says why)")
    partial = engine_file.with_suffix(".partial")
    partial.write_bytes(bytes(serialized))
    os.replace(partial, engine_file)  # a crash mid-write never leaves a broken engine in the cache


def _progress_monitor(trt: Any) -> Any:
    """A tqdm bar per build phase, through TensorRT's IProgressMonitor."""
    from tqdm.auto import tqdm

    class TqdmProgress(trt.IProgressMonitor):  # type: ignore[misc]  # tensorrt is untyped (Any)
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._bars: dict[str, Any] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self._bars[phase_name] = tqdm(total=num_steps, desc=phase_name, leave=parent_phase is None)

        def step_complete(self, phase_name: str, step: int) -> bool:
            bar = self._bars.get(phase_name)
            if bar is not None:
                bar.update(step + 1 - bar.n)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            bar = self._bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return TqdmProgress()


class TrtUNet:
    """Runs the engine on torch tensors, on the current CUDA stream (same signature as DiffusersUNet)."""

    def __init__(self, engine_file: Path, device: torch.device) -> None:
        import tensorrt as trt
        import torch

        from engine.diffusion.onnx_export import OUTPUT_NAME, unet_input_names

        self._empty, self._current_stream = torch.empty, torch.cuda.current_stream  # (no imports per frame)
        self._names = {cond: unet_input_names(cond) for cond in (False, True)}
        self._output_name = OUTPUT_NAME
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self.engine = runtime.deserialize_cuda_engine(Path(engine_file).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {engine_file} (built by another TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.device = device

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        inputs = [sample, timestep, encoder_hidden_states] + ([timestep_cond] if timestep_cond is not None else [])
        names = self._names[timestep_cond is not None]
        keep = [t.contiguous() for t in inputs]  # alive until the launch below has been queued
        for name, tensor in zip(names, keep):
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        output = self._empty(sample.shape, dtype=sample.dtype, device=self.device)
        self.context.set_tensor_address(self._output_name, output.data_ptr())
        if not self.context.execute_async_v3(self._current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT failed to run the UNet engine")
        return output
