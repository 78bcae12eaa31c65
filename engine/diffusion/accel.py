"""Acceleration backends: the same three stages, eager, compiled, or with a TensorRT UNet.

A backend's ``build`` is slow (torch.compile: 86 s cold on an H200; a TensorRT engine:
minutes), so the stream calls it on a background thread while frames run eager, and
switches with one assignment when it returns. ``choose_accelerator("auto")`` is the named
policy: ``compile`` on CUDA (measured there), ``eager`` elsewhere (on a CPU the compiler
would take the cores the show is using; MPS support in inductor is experimental).
``tensorrt`` is opt-in: it is written but has never run on any machine this project has.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol

import torch

from engine.diffusion.hotpath import HotPath
from engine.diffusion.options import ACCEL_CHOICES

log = logging.getLogger(__name__)


class Stages(NamedTuple):
    name: str
    encode: Callable[..., torch.Tensor]
    denoise: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    decode: Callable[..., torch.Tensor]
    cudagraphs: bool = False  # the stream marks each frame as a new CUDA-graph step


@dataclass(frozen=True)
class StageExample:
    """Arguments of the right shapes for each stage (tracing and warm-up)."""

    encode: tuple[Any, ...]
    denoise: tuple[Any, ...]
    decode: tuple[Any, ...]


class Accelerator(Protocol):
    name: str

    def build(self, hot: HotPath, example: StageExample) -> Stages: ...


def eager_stages(hot: HotPath) -> Stages:
    return Stages("eager", hot.encode, hot.denoise, hot.decode)


def dreamdeck_cache_dir() -> Path:
    """Where compiled artefacts live between runs (``$XDG_CACHE_HOME/dreamdeck``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dreamdeck"


def configure_inductor_cache(cache_dir: Path | None) -> str:
    """Keep inductor's caches where they survive a reboot, unless the user chose a place.

    torch writes its default (a folder under /tmp) into TORCHINDUCTOR_CACHE_DIR itself once
    used, so "the user chose" means: set, and not that default. ``cache_dir`` always wins.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if cache_dir is not None or current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir or dreamdeck_cache_dir() / "inductor")
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


class EagerAccelerator:
    name = "eager"

    def build(self, hot: HotPath, example: StageExample) -> Stages:
        return eager_stages(hot)


class CompileAccelerator:
    """torch.compile of each stage; ``mode`` defaults to "reduce-overhead" (CUDA graphs) on CUDA.

    Inductor's FX-graph and AOTAutograd caches are kept under ``cache_dir`` (default
    ~/.cache/dreamdeck/inductor), so a second start reuses them (86 s cold, 21 s warm on the
    H200). A cold build traces graphs with torch.fx, which replaces ``nn.Module.__call__``
    for the whole process while it traces: the stream drops the eager frames that meet such
    a moment (``frames_dropped``) instead of failing them. A warm build loads from the
    caches and traces nothing (measured: no fx trace at all on the tiny model), so frames
    flow through it. CUDA graphs are per thread in torch: the kernels are built here, the
    worker records its graphs on its first frames after the switch.
    """

    name = "compile"

    def __init__(self, mode: str | None = None, backend: str = "inductor", cache_dir: Path | str | None = None,
                 fullgraph: bool = False) -> None:
        self.mode = mode
        self.backend = backend
        self.fullgraph = fullgraph  # True: a graph break is an error (tests prove the stages have none)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    def build(self, hot: HotPath, example: StageExample) -> Stages:
        cuda = example.decode[0].is_cuda
        mode = self.mode
        if self.backend == "inductor":
            log.info("torch.compile: inductor cache in %s", configure_inductor_cache(self.cache_dir))
            if mode is None:
                mode = "reduce-overhead" if cuda else "default"
        options: dict[str, Any] = {"backend": self.backend, "mode": mode, "dynamic": False,
                                   "fullgraph": self.fullgraph}
        stages = Stages("compile", torch.compile(hot.encode, **options), torch.compile(hot.denoise, **options),
                        torch.compile(hot.decode, **options), cudagraphs=mode == "reduce-overhead")
        with torch.inference_mode():
            # one call compiles; CUDA graphs are recorded later by the thread that replays them
            if stages.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            first = stages.encode(*example.encode)
            stages.denoise(first, *example.denoise[1:])
            stages.decode(*example.decode)
            if cuda:
                torch.cuda.synchronize()
        return stages


class TensorRTAccelerator:
    """ONNX export of the UNet -> TensorRT engine (cached on disk) -> the same stages around it."""

    name = "tensorrt"

    def __init__(self, cache_dir: Path | None = None, fp16: bool = True) -> None:
        self.cache_dir = cache_dir or dreamdeck_cache_dir() / "tensorrt"
        self.fp16 = fp16

    def build(self, hot: HotPath, example: StageExample) -> Stages:
        from engine.diffusion.tensorrt import TrtUNet, build_cached_engine

        first, buffer, text, noise, coefficients, timestep_cond = example.denoise
        steps = noise.shape[0]
        sample = torch.cat([first, buffer]) if buffer.shape[0] else first
        unet_inputs = (sample, coefficients.timesteps, text.expand(steps, -1, -1).contiguous(), timestep_cond)
        engine_path = build_cached_engine(hot.unet, unet_inputs, self.cache_dir, fp16=self.fp16)
        trt_hot = hot.with_unet(TrtUNet(engine_path, sample.device))
        return Stages("tensorrt", trt_hot.encode, trt_hot.denoise, trt_hot.decode)


def choose_accelerator(name: str, device: torch.device) -> Accelerator:
    """``auto`` | ``eager`` | ``compile`` | ``tensorrt`` -> a backend (see the module docstring).

    "auto" is the policy; what ``dreamdeck run --accel`` chose is put in place of "auto" before
    (``TorchDefaults.pick``).
    """
    if name == "auto":
        name = "compile" if device.type == "cuda" else "eager"
    if name == "eager":
        return EagerAccelerator()
    if name == "compile":
        return CompileAccelerator()
    if name == "tensorrt":
        if device.type != "cuda":
            raise ValueError("the tensorrt backend needs a CUDA device")
        return TensorRTAccelerator()
    raise ValueError(f"accel {name!r} is not one of {', '.join(ACCEL_CHOICES)}")
