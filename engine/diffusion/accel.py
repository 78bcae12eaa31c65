"""Acceleration backends: the same frame function, eager, compiled, or around a TensorRT UNet.

A backend's ``build`` is slow (torch.compile: 86 s cold on an H200; a TensorRT engine:
minutes), so the stream calls it on a background thread while frames run eager, and
switches with one assignment when it returns. ``choose_accelerator("auto")`` is the named
policy: ``compile`` on CUDA (measured there), ``eager`` elsewhere (on a CPU the compiler
would take the cores the show is using; MPS support in inductor is experimental).
``tensorrt`` is opt-in: it is written but has never run on any machine this project has.

A compiled frame is one dynamo graph (``fullgraph=True``: a graph break fails the build,
and says where) that never compiles again on the frame path: ``recompile_limit=1``, so a
frame whose inputs would need another graph raises ``RecompileRefused`` instead of
compiling for tens of seconds, or of dynamo silently running eager once its limit is hit.
The stream then falls back to eager and says so. Each build is its own region
(``isolate_recompiles``): a rebuilt stream's graph does not count against an older one's.
A torch without those two options (before 2.13) gets the same policy a step later: the
frame's inputs are checked against the graph's before it runs, and a frame that compiled
anyway (a guard on global state) raises ``RecompileRefused`` after its compile.
"""

from __future__ import annotations

import inspect
import logging
import os
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, cast

import torch

from engine.diffusion.hotpath import FrameInputs, HotPath
from engine.diffusion.options import ACCEL_CHOICES

log = logging.getLogger(__name__)

FrameFunction = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # FrameInputs -> (uint8 image, next buffer)


class Backend(NamedTuple):
    name: str
    frame: FrameFunction
    cudagraphs: bool = False  # the stream marks each frame as a new CUDA-graph step


class Accelerator(Protocol):
    name: str

    def build(self, hot: HotPath, example: FrameInputs) -> Backend: ...


class RecompileRefused(RuntimeError):
    """A frame's inputs did not match the compiled graph's: it would have compiled again on the frame path."""


@dataclass(frozen=True)
class CompileCounts:
    """dynamo's process-wide counters; the difference of two tells what happened in between."""

    graphs: int  # graphs dynamo captured (each compile, recompile, or piece after a graph break)
    graph_breaks: int
    cudagraph_skips: int  # graphs inductor compiled without CUDA graphs (its log says why)

    def __sub__(self, other: CompileCounts) -> CompileCounts:
        return CompileCounts(
            self.graphs - other.graphs,
            self.graph_breaks - other.graph_breaks,
            self.cudagraph_skips - other.cudagraph_skips,
        )


def compile_counts() -> CompileCounts:
    from torch._dynamo.utils import counters

    return CompileCounts(
        graphs=counters["stats"]["unique_graphs"],
        graph_breaks=sum(counters["graph_break"].values()),
        cudagraph_skips=counters["inductor"]["cudagraph_skips"],
    )


def eager_backend(hot: HotPath) -> Backend:
    return Backend("eager", hot.frame)


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

    def build(self, hot: HotPath, example: FrameInputs) -> Backend:
        return eager_backend(hot)


def describe_inputs(inputs: Any) -> list[tuple[str, Any]]:
    """(name, what a compiled graph guards on) for each input tensor: shape, dtype, device, inference.

    ``inputs``: a frame's inputs, a NamedTuple of tensors, None and NamedTuples of tensors
    (``FrameInputs``, or the flow frame's ``FlowInputs``)."""
    named: list[tuple[str, torch.Tensor | None]] = []
    nested: list[tuple[str, torch.Tensor | None]] = []
    for name, value in zip(inputs._fields, inputs):
        if isinstance(value, tuple):  # the coefficients: their tensors, after the others
            fields: tuple[str, ...] = getattr(value, "_fields")  # noqa: B009  (a NamedTuple's, untyped here)
            nested += [(f"{name}.{field}", tensor) for field, tensor in zip(fields, value)]
        else:
            named.append((name, cast("torch.Tensor | None", value)))
    return [
        (name, None if t is None else (tuple(t.shape), t.dtype, t.device.type, t.is_inference()))
        for name, t in named + nested
    ]


def own_code(method: Callable[..., Any]) -> Callable[..., Any]:
    """The bound method with a private copy of its code object.

    dynamo keeps its compiled graphs, and counts compiles, per code object: 256 compiles of
    one function per process and it compiles no more. A show builds again for each new step
    count, size or LoRA slot, so each build compiles its own copy, freed with its stream.
    """
    bound = cast(types.MethodType, method)  # a bound method, by contract
    function = bound.__func__
    copy = types.FunctionType(
        function.__code__.replace(),
        function.__globals__,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    return types.MethodType(copy, bound.__self__)


def compile_limits_supported() -> bool:
    """torch.compile takes ``recompile_limit`` and ``isolate_recompiles`` (torch 2.13 does)."""
    return {"recompile_limit", "isolate_recompiles"} <= set(inspect.signature(torch.compile).parameters)


class CompiledFrame:
    """A compiled frame function that refuses to compile again (see the module docstring)."""

    def __init__(self, compiled: FrameFunction, example: FrameInputs, dynamo_refuses: bool) -> None:
        self.compiled = compiled
        self.kind: Any = type(example)  # FrameInputs, or a flow frame's FlowInputs
        self.built_for = describe_inputs(example)
        self.dynamo_refuses = dynamo_refuses  # False: checked here, before and after the call

    def __call__(self, *inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        from torch._dynamo.exc import FailOnRecompileLimitHit

        if self.dynamo_refuses:
            try:
                return self.compiled(*inputs)
            except FailOnRecompileLimitHit as exc:
                raise RecompileRefused(self._why(self.kind(*inputs))) from exc
        if describe_inputs(self.kind(*inputs)) != self.built_for:
            raise RecompileRefused(self._why(self.kind(*inputs)))
        graphs = compile_counts().graphs
        result = self.compiled(*inputs)
        if compile_counts().graphs != graphs:
            raise RecompileRefused(self._why(self.kind(*inputs)))
        return result

    def _why(self, inputs: Any) -> str:
        differ = [
            f"{name} is {now}, built for {then}"
            for (name, now), (_, then) in zip(describe_inputs(inputs), self.built_for)
            if now != then
        ]
        return (
            "the frame needed a recompile ("
            + (
                "; ".join(differ)
                if differ
                else "its inputs look the same: TORCH_LOGS=recompiles says which guard failed"
            )
            + ")"
        )


class CompileAccelerator:
    """torch.compile of the whole frame; ``mode`` defaults to "reduce-overhead" (CUDA graphs) on CUDA.

    Inductor's FX-graph and AOTAutograd caches are kept under ``cache_dir`` (default
    ~/.cache/dreamdeck/inductor), so a second start reuses them (86 s cold, 21 s warm on the
    H200). A cold build traces graphs with torch.fx, which replaces ``nn.Module.__call__``
    for the whole process while it traces: the stream drops the eager frames that meet such
    a moment (``frames_dropped``) instead of failing them. A warm build loads from the
    caches and traces nothing (measured: no fx trace at all on the tiny model), so frames
    flow through it. CUDA graphs are per thread in torch: the kernels are built here, the
    worker records its graph on its first frames after the switch.

    ``example`` must be made as the frames' inputs are (the same shapes, dtypes, and
    inference-mode or not: a graph guards on each), or every frame would need a recompile.
    """

    name = "compile"

    def __init__(
        self,
        mode: str | None = None,
        backend: str | Callable[..., Any] = "inductor",
        cache_dir: Path | str | None = None,
    ) -> None:
        self.mode = mode
        self.backend = backend  # a name, or a dynamo backend function (tests count the graphs with one)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    def build(self, hot: HotPath, example: FrameInputs) -> Backend:
        cuda = example.pixels.is_cuda
        mode = self.mode
        if self.backend == "inductor":
            log.info("torch.compile: inductor cache in %s", configure_inductor_cache(self.cache_dir))
            if mode is None:
                mode = "reduce-overhead" if cuda else "default"
        limits = compile_limits_supported()
        compiled = torch.compile(  # type: ignore[call-overload]  # torch's overloads miss the limits' kwargs
            own_code(hot.frame),
            backend=self.backend,
            mode=mode,
            dynamic=False,
            fullgraph=True,
            **({"recompile_limit": 1, "isolate_recompiles": True} if limits else {}),
        )
        backend = Backend(
            "compile", CompiledFrame(compiled, example, dynamo_refuses=limits), cudagraphs=mode == "reduce-overhead"
        )
        with torch.inference_mode():
            # one call compiles; the CUDA graph is recorded later by the thread that replays it
            if backend.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            compiled(*example)
            if cuda:
                torch.cuda.synchronize()
        return backend


class TensorRTAccelerator:
    """ONNX export of the UNet -> TensorRT engine (cached on disk) -> the same frame around it."""

    name = "tensorrt"

    def __init__(self, cache_dir: Path | None = None, fp16: bool = True) -> None:
        self.cache_dir = cache_dir or dreamdeck_cache_dir() / "tensorrt"
        self.fp16 = fp16

    def build(self, hot: HotPath, example: FrameInputs) -> Backend:
        from engine.diffusion.tensorrt import TrtUNet, build_cached_engine

        if len(hot.controlnets):  # the exported UNet takes no residuals (tensorrt_or_compile compiles instead)
            raise ValueError("ControlNets are not exported to TensorRT")
        steps = example.noise.shape[0]
        first = torch.zeros_like(example.noise[:1])
        sample = torch.cat([first, example.buffer]) if example.buffer.shape[0] else first
        unet_inputs = (
            sample,
            example.coefficients.timesteps,
            example.text.expand(steps, -1, -1).contiguous(),
            example.timestep_cond,
        )
        unet = cast(torch.nn.Module, hot.unet)  # the stream's hot path calls a DiffusersUNet module
        engine_path = build_cached_engine(unet, unet_inputs, self.cache_dir, fp16=self.fp16)
        return Backend("tensorrt", hot.with_unet(TrtUNet(engine_path, sample.device)).frame)


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
    if name == "tensorrt":  # experimental: with its named fallback to compile where it cannot run
        from engine.diffusion.tensorrt import tensorrt_or_compile

        return tensorrt_or_compile(device.type)
    raise ValueError(f"accel {name!r} is not one of {', '.join(ACCEL_CHOICES)}")
