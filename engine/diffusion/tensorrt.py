"""A TensorRT engine for the UNet: built once per (model, shapes, precision), cached on disk.

NOT RUN on any machine this project has (no TensorRT on the GPU machine): this module is
written against the TensorRT 10 Python API and its tests skip when ``tensorrt`` is absent.
What is verified: the ONNX export it builds from (``onnx_export.py``), on CPU with
onnxruntime, and the cache key. ``tensorrt`` is imported only inside these functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from engine.diffusion.onnx_export import OUTPUT_NAME, export_unet_onnx, unet_input_names

log = logging.getLogger(__name__)


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


def engine_key(fingerprint: str, shapes: dict[str, tuple[int, ...]], fp16: bool, trt_version: str) -> str:
    """The cache key: model, input shapes, precision and TensorRT version, hashed."""
    text = json.dumps({"model": fingerprint, "shapes": shapes, "fp16": fp16, "trt": trt_version}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def build_cached_engine(unet: torch.nn.Module, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
                        cache_dir: Path, fp16: bool = True) -> Path:
    """The engine file for these inputs' shapes, exported and built only if not cached."""
    import tensorrt as trt

    names = unet_input_names(inputs[3] is not None)
    shapes = {name: tuple(t.shape) for name, t in zip(names, inputs) if t is not None}
    key = engine_key(module_fingerprint(unet), shapes, fp16, trt.__version__)
    engine_path = cache_dir / f"unet-{key}.plan"
    if engine_path.exists():
        log.info("TensorRT engine from cache: %s", engine_path)
        return engine_path
    onnx_path = cache_dir / f"unet-{key}" / "unet.onnx"
    if not onnx_path.exists():
        log.info("exporting the UNet to ONNX: %s", onnx_path)
        export_unet_onnx(unet, inputs, onnx_path)
    build_engine(onnx_path, engine_path, shapes, fp16=fp16)
    return engine_path


def build_engine(onnx_path: Path, engine_path: Path, shapes: dict[str, tuple[int, ...]], fp16: bool) -> None:
    """Parse the ONNX, build for exactly ``shapes`` (one profile), write atomically."""
    import tensorrt as trt

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
    for name, shape in shapes.items():
        profile.set_shape(name, shape, shape, shape)
    config.add_optimization_profile(profile)
    config.progress_monitor = _progress_monitor(trt)
    log.info("building the TensorRT engine (minutes, once per model and size): %s", engine_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT could not build the engine (its log above says why)")
    partial = engine_path.with_suffix(".partial")
    partial.write_bytes(bytes(serialized))
    os.replace(partial, engine_path)  # a crash mid-write never leaves a broken engine in the cache


def _progress_monitor(trt: Any) -> Any:
    """A tqdm bar per build phase, through TensorRT's IProgressMonitor."""
    from tqdm.auto import tqdm

    class TqdmProgress(trt.IProgressMonitor):
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

    def __init__(self, engine_path: Path, device: torch.device) -> None:
        import tensorrt as trt

        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {engine_path} (built by another TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.device = device

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        inputs = [sample, timestep, encoder_hidden_states] + ([timestep_cond] if timestep_cond is not None else [])
        names = unet_input_names(timestep_cond is not None)
        keep = [t.contiguous() for t in inputs]  # alive until the launch below has been queued
        for name, tensor in zip(names, keep):
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        output = torch.empty(sample.shape, dtype=sample.dtype, device=self.device)
        self.context.set_tensor_address(OUTPUT_NAME, output.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT failed to run the UNet engine")
        return output
