"""``dreamdeck bench diffusion``: the hot path against diffusers' own pipeline, same weights, same run.

Frames come from host memory and go back to host memory, as a camera loop would. The
baseline is diffusers ``AutoPipelineForImage2Image`` with PIL in and out at SD-turbo
settings (``num_inference_steps=2, strength=0.5, guidance_scale=0``: one UNet call, full VAE),
in the same process, on the same UNet and text encoder. ``ratio`` = engine fps / baseline fps.

    --tiny                 diffusers' tiny test architecture (CI; seconds on a CPU)
    --random-weights       the full-size --arch with random weights: no download, real cost
    --model ID|PATH        real weights (hub id, diffusers folder, .safetensors)

Importing this module is free (no torch): ``add_arguments`` can build the CLI at start-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engine.diffusion.options import ACCEL_CHOICES, DTYPE_CHOICES

ARCHS = ("sd-turbo", "sd15")
DEFAULT_MODELS = {"sd-turbo": "stabilityai/sd-turbo", "sd15": "SimianLuo/LCM_Dreamshaper_v7"}
TAESD_ID = "madebyollin/taesd"
PROMPT = "a watercolour painting of a city at night, vivid colours"


@dataclass(frozen=True)
class BenchOptions:
    arch: str = "sd-turbo"
    weights: str = "random"  # random | tiny | model
    model: str = ""
    size: int = 512
    steps: int | None = None  # default: the architecture's (1 for sd-turbo, 4 for sd15 LCM)
    frames: int = 100
    warmup: int = 10
    baseline_frames: int = 30  # 0: no baseline
    accel: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    vae: str = "tiny"  # the engine's VAE: tiny (TAESD) or full; the baseline always uses the full VAE
    json_path: Path | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=ARCHS, default="sd-turbo", help="architecture (default sd-turbo)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--random-weights", action="store_true", help="full-size --arch, random weights (no download)")
    source.add_argument("--tiny", action="store_true", help="tiny random test model (CI)")
    source.add_argument("--model", help="hub id, diffusers folder or .safetensors (default: the arch's model)")
    parser.add_argument("--size", type=int, help="square frame size (default 512; 32 with --tiny)")
    parser.add_argument("--steps", type=int, help="stream batch steps (default: 1 sd-turbo, 4 sd15)")
    parser.add_argument("--frames", type=int, default=100, help="timed frames (default 100)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed frames first (default 10)")
    parser.add_argument("--baseline-frames", type=int, default=30, help="timed baseline frames; 0 skips it")
    parser.add_argument("--accel", choices=ACCEL_CHOICES, default="auto",
                        help="auto: compile on CUDA, eager elsewhere")
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N | mps | cpu")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    parser.add_argument("--vae", choices=("tiny", "full"), default="tiny", help="engine VAE (default tiny = TAESD)")
    parser.add_argument("--json", type=Path, help="also write the results here")


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    weights = "tiny" if args.tiny else "random" if args.random_weights else "model"
    for name in ("frames", "warmup", "baseline_frames"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative")
    if args.frames < 1:
        raise ValueError("--frames must be at least 1")
    if args.steps is not None and not 1 <= args.steps <= 8:
        raise ValueError("--steps must be between 1 and 8")
    size = args.size or (32 if args.tiny else 512)
    if not 16 <= size <= 2048:
        raise ValueError("--size must be between 16 and 2048")
    return BenchOptions(arch=args.arch, weights=weights, model=args.model or DEFAULT_MODELS[args.arch], size=size,
                        steps=args.steps, frames=args.frames, warmup=args.warmup,
                        baseline_frames=args.baseline_frames, accel=args.accel, device=args.device,
                        dtype=args.dtype, vae=args.vae, json_path=args.json)


def run(args: argparse.Namespace) -> int:
    """CLI entry: usage errors exit 2, a missing model 1, each with one line."""
    from engine.diffusion.errors import ModelNotFound

    try:
        options = options_from_args(args)
        result = bench_diffusion(options)
    except ValueError as exc:
        print(f"dreamdeck bench diffusion: {exc}", file=sys.stderr)
        return 2
    except ModelNotFound as exc:
        print(f"dreamdeck bench diffusion: {exc}", file=sys.stderr)
        return 1
    print(format_table(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dreamdeck bench diffusion", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _models(options: BenchOptions, choice: Any) -> tuple[Any, Any, str]:
    """(engine model, baseline model, weights description): same UNet and text encoder in both."""
    import torch
    from diffusers import AutoencoderTiny

    from engine.diffusion.configs import TAESD, TINY_TAESD, build_random_model
    from engine.diffusion.loading import ModelSpec, load_model, load_tiny_vae

    if options.weights == "model":
        base = load_model(ModelSpec(model=options.model), choice)
        described = options.model
        tiny = load_tiny_vae(ModelSpec(tiny_vae=TAESD_ID), choice.dtype) if options.vae == "tiny" else None
    else:
        arch = "tiny" if options.weights == "tiny" else options.arch
        scheduler = "lcm" if options.arch == "sd15" else "euler"
        base = build_random_model(arch, scheduler=scheduler, device=choice.device).to(choice)
        described = f"random {arch}"
        tiny = None
        if options.vae == "tiny":
            with torch.device(choice.device):
                tiny = AutoencoderTiny(**(TINY_TAESD if arch == "tiny" else TAESD))
    if tiny is None:
        return base, base, described
    tiny = tiny.eval().requires_grad_(False).to(device=choice.device)
    if tiny.dtype != choice.dtype:  # (diffusers warns about a cast to the dtype a model already has)
        tiny = tiny.to(dtype=choice.dtype)
    return replace(base, vae=tiny), base, described + " + TAESD"


def _frames(size: int, count: int = 8) -> list:
    from engine.sources.pattern import render_pattern

    return [render_pattern(i * 0.37, size, size) for i in range(count)]


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q))


def bench_diffusion(options: BenchOptions) -> dict[str, Any]:
    import diffusers
    import numpy as np
    import torch

    from engine.diffusion.accel import choose_accelerator
    from engine.diffusion.configs import ARCHITECTURES
    from engine.diffusion.device import choose_device
    from engine.diffusion.stream import LiveSettings, StreamConfig, StreamImg2Img

    choice = choose_device(options.device, options.dtype)
    steps = options.steps or ARCHITECTURES[options.arch].default_steps
    started = time.monotonic()
    engine_model, baseline_model, weights = _models(options, choice)
    load_s = time.monotonic() - started
    frames = _frames(options.size)

    # 1. the engine: hot path, host frames in and out
    stream = StreamImg2Img(engine_model, choice, StreamConfig(size=(options.size, options.size), steps=steps),
                           LiveSettings(strength=0.5, similarity_threshold=0.0), prompts=[(PROMPT, 1.0)],
                           accelerator=choose_accelerator(options.accel, choice.device), timing=True)
    stream.prompts.wait()
    # the first image, as a show gets it: eager frames while a compiled or TensorRT build starts
    # in the background (the first frame starts it), timed from the loaded weights
    deadline, i = time.monotonic() + 600.0, 0
    while stream.first_image_s is None:
        dropped = stream.frames_dropped
        stream(frames[i % len(frames)])
        i += 1
        if stream.frames_dropped != dropped:  # a cold compile is tracing: the next frame comes a frame later
            time.sleep(1 / 60)
        if time.monotonic() > deadline:
            raise RuntimeError("the stream produced no image in 600 s")
    stream.wait_for_accel()  # a benchmark waits for the build: it measures the switched-to backend
    for i in range(options.warmup):
        stream(frames[i % len(frames)])
    stream.timer.reset()
    times = []
    for i in range(options.frames):
        started = time.perf_counter()
        image = stream(frames[i % len(frames)])
        times.append((time.perf_counter() - started) * 1000.0)
        if image is None:
            raise RuntimeError("the stream produced no image for a new frame")
    stream.close()
    engine = {"fps": 1000.0 * len(times) / sum(times), "p50_ms": _percentile(times, 50),
              "p99_ms": _percentile(times, 99), "stages_ms": stream.timer.means()}

    # 2. the baseline: diffusers' pipeline, PIL in and out, SD-turbo settings
    baseline: dict[str, float] | None = None
    if options.baseline_frames:
        from diffusers import AutoPipelineForImage2Image
        from PIL import Image

        pipe = AutoPipelineForImage2Image.from_pipe(baseline_model.img2img_pipeline())
        pipe.set_progress_bar_config(disable=True)
        pictures = [Image.fromarray(f) for f in frames]
        base_times = []
        for i in range(2 + options.baseline_frames):
            started = time.perf_counter()
            out = pipe(PROMPT, image=pictures[i % len(pictures)], num_inference_steps=2, strength=0.5,
                       guidance_scale=0.0, generator=torch.Generator().manual_seed(0)).images[0]
            np.asarray(out)
            if i >= 2:
                base_times.append((time.perf_counter() - started) * 1000.0)
        baseline = {"fps": 1000.0 * len(base_times) / sum(base_times), "p50_ms": _percentile(base_times, 50)}

    result = {
        "device": choice.device.type,
        "gpu_name": torch.cuda.get_device_name(choice.device) if choice.is_cuda else None,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "arch": "tiny" if options.weights == "tiny" else options.arch,
        "weights": weights,
        "size": options.size,
        "steps": steps,
        "dtype": str(choice.dtype).removeprefix("torch."),
        "vae": options.vae,
        "accel": stream.accel,
        "accel_requested": stream.accel_requested,
        "accel_ready_s": stream.accel_ready_s,
        "accel_error": stream.accel_error,
        "startup": {"load_s": load_s, "first_frame_s": stream.first_image_s},
        "frames": options.frames,
        "engine": engine,
        "baseline": baseline,
        "ratio": engine["fps"] / baseline["fps"] if baseline else None,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()},
        "command": "dreamdeck bench diffusion " + " ".join(sys.argv[1:]) if sys.argv else "",
    }
    if options.json_path is not None:
        from engine.files import write_atomic

        options.json_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(options.json_path, (json.dumps(result, indent=2) + "\n").encode("utf-8"))
    return result


def format_table(result: dict[str, Any]) -> str:
    device = result["gpu_name"] or f"{result['device']} ({result['cpu']}, {result['threads']} threads)"
    engine, baseline = result["engine"], result["baseline"]
    stages = "  ".join(f"{name} {ms:.2f}" for name, ms in engine["stages_ms"].items())
    lines = [
        f"diffusion img2img: {result['arch']} ({result['weights']}) {result['size']}x{result['size']}, "
        f"{result['steps']} step(s), {result['dtype']}, VAE {result['vae']}, accel {result['accel']}, on {device}",
        f"{'':24}{'fps':>9}{'p50 ms':>10}{'p99 ms':>10}",
        f"{'engine (hot path)':24}{engine['fps']:9.1f}{engine['p50_ms']:10.2f}{engine['p99_ms']:10.2f}",
        f"{'  stages, mean ms':24}{stages}",
    ]
    if baseline:
        lines.append(f"{'baseline (diffusers)':24}{baseline['fps']:9.1f}{baseline['p50_ms']:10.2f}")
        lines.append(f"{'ratio':24}{result['ratio']:8.1f}x")
    startup = result["startup"]
    lines.append(f"first frame {startup['first_frame_s']:.2f} s after the weights loaded "
                 f"(weights: {startup['load_s']:.1f} s)")
    if result["accel_error"]:
        lines.append(f"accel: {result['accel_error']}")
    elif result["accel_ready_s"] is not None:
        lines.append(f"accel {result['accel']} ready after {result['accel_ready_s']:.1f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
