"""``dreamdeck bench diffusion``: the hot path against diffusers' own pipeline, same weights, same run.

Frames come from host memory and go back to host memory, as a camera loop would. Two
baselines run in the same process, on the same UNet and text encoder, both diffusers
``StableDiffusionImg2ImgPipeline`` with PIL in and out (``strength=0.5``, ``guidance_scale=0``,
``num_inference_steps = 2 x steps``: as many UNet calls per image as the stream batch gives
each frame):

    own_vae   with the model's own VAE (AutoencoderKL): what a diffusers user runs
    taesd     with the same TAESD (AutoencoderTiny) the engine decodes with

and ``ratios`` = engine fps / each baseline's fps. The engine's VAE is TAESD unless ``--vae full``,
so ``taesd`` is the like-for-like ratio and ``own_vae`` the one a user feels.

Also measured: the first diffused frame after the weights loaded, the backend's build time,
whether the backend asked for is the one that ran (``fell_back``), dynamo recompiles during
the timed frames, and synchronisations per frame (CUDA: ``torch.cuda.set_sync_debug_mode``).

    --tiny                 diffusers' tiny test architecture (CI; seconds on a CPU)
    --random-weights       the full-size --arch with random weights: no download, real cost
    --model ID|PATH        real weights (hub id, diffusers folder, .safetensors)
    --arch sdxl-turbo      SDXL-turbo (two text encoders, added time ids); baselines: StableDiffusionXLImg2ImgPipeline
    --ip-adapter           an IP-Adapter of random weights (ViT-H image encoder; tiny ones with --tiny) and a
                           style picture: its embedding off the frame path; baselines get ip_adapter_image
    --controlnet canny|depth   one ControlNet of the UNet's architecture (random weights), its
                           control image made by the engine's preprocessor; the baselines are
                           then ``StableDiffusionControlNetImg2ImgPipeline`` with the control
                           image made as a diffusers user makes it (``cv2.Canny``; transformers'
                           depth-estimation pipeline on a random Depth Anything V2 Small), timed too

Importing this module is free (no torch): ``add_arguments`` can build the CLI at start-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from engine.diffusion.options import ACCEL_CHOICES, ACCEL_HELP, DTYPE_CHOICES

ARCHS = ("sd-turbo", "sd15", "sdxl-turbo")
DEFAULT_MODELS = {
    "sd-turbo": "stabilityai/sd-turbo",
    "sd15": "SimianLuo/LCM_Dreamshaper_v7",
    "sdxl-turbo": "stabilityai/sdxl-turbo",
}
TAESD_ID = "madebyollin/taesd"
TAESDXL_ID = "madebyollin/taesdxl"
PROMPT = "a watercolour painting of a city at night, vivid colours"
STRENGTH = 0.5
BASELINES = {"own_vae": "diffusers, the model's own VAE", "taesd": "diffusers, the same TAESD"}
COMPILE_BACKENDS = ("inductor", "eager")
LCM_GUIDANCE_DIM = {"tiny": 32, "sd15": 256}  # LCM_Dreamshaper's guidance embedding (sd15); the tiny test one


@dataclass(frozen=True)
class BenchOptions:
    arch: str = "sd-turbo"
    weights: str = "random"  # random | tiny | model
    model: str = ""
    size: int = 512
    steps: int | None = None  # default: the architecture's (1 for sd-turbo, 4 for sd15 LCM)
    frames: int = 100
    warmup: int = 10
    baseline_frames: int = 30  # 0: no baselines
    sync_frames: int = 5  # frames run under the CUDA sync check (0: none)
    accel: str = "auto"
    compile_backend: str = "inductor"  # torch.compile's backend for compile (and tensorrt's fallback)
    device: str = "auto"
    dtype: str = "auto"
    vae: str = "tiny"  # the engine's VAE: tiny (TAESD) or full; the baselines run both
    controlnet: str | None = None  # canny | depth: one ControlNet on the hot path and in the baselines
    ip_adapter: bool = False  # an IP-Adapter (random weights) with a style picture, on the hot path and the baselines
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
    parser.add_argument("--baseline-frames", type=int, default=30, help="timed frames per baseline; 0 skips them")
    parser.add_argument(
        "--sync-frames",
        type=int,
        default=5,
        help="frames run under torch.cuda.set_sync_debug_mode to count syncs (CUDA; default 5)",
    )
    parser.add_argument(
        "--accel",
        choices=ACCEL_CHOICES,
        default="auto",
        help=f"{ACCEL_HELP}; auto: compile on CUDA, eager elsewhere. Here tensorrt falls back to "
        "compile where TensorRT cannot run, and the result says so (fell_back)",
    )
    parser.add_argument(
        "--compile-backend",
        choices=COMPILE_BACKENDS,
        default="inductor",
        help="torch.compile backend (default inductor; eager: dynamo tracing alone, for CPU checks)",
    )
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N | mps | cpu")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    parser.add_argument("--vae", choices=("tiny", "full"), default="tiny", help="engine VAE (default tiny = TAESD)")
    parser.add_argument(
        "--controlnet",
        choices=("canny", "depth"),
        help="one ControlNet (random weights) with this control image; baselines: diffusers' ControlNet img2img",
    )
    parser.add_argument(
        "--ip-adapter",
        action="store_true",
        help="an IP-Adapter (random weights, CLIP ViT-H image encoder) and a style picture; baselines with "
        "ip_adapter_image",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    weights = "tiny" if args.tiny else "random" if args.random_weights else "model"
    for name in ("frames", "warmup", "baseline_frames", "sync_frames"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative")
    if args.frames < 1:
        raise ValueError("--frames must be at least 1")
    if args.steps is not None and not 1 <= args.steps <= 8:
        raise ValueError("--steps must be between 1 and 8")
    size = args.size or (32 if args.tiny else 512)
    if not 16 <= size <= 2048:
        raise ValueError("--size must be between 16 and 2048")
    return BenchOptions(
        arch=args.arch,
        weights=weights,
        model=args.model or DEFAULT_MODELS[args.arch],
        size=size,
        steps=args.steps,
        frames=args.frames,
        warmup=args.warmup,
        baseline_frames=args.baseline_frames,
        sync_frames=args.sync_frames,
        accel=args.accel,
        compile_backend=args.compile_backend,
        device=args.device,
        dtype=args.dtype,
        vae=args.vae,
        controlnet=args.controlnet,
        ip_adapter=args.ip_adapter,
        json_path=args.json,
    )


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


def _models(options: BenchOptions, choice: Any) -> tuple[Any, dict[str, Any], str]:
    """(engine model, {baseline name: model}, weights description): one UNet and text encoder in all."""
    import torch
    from diffusers import AutoencoderTiny

    from engine.diffusion.configs import TAESD, TINY_TAESD, build_random_model
    from engine.diffusion.loading import ModelSpec, load_model, load_tiny_vae

    if options.weights == "model":
        base = load_model(ModelSpec(model=options.model), choice)
        described = options.model
        tiny = load_tiny_vae(ModelSpec(tiny_vae=TAESDXL_ID if base.xl else TAESD_ID), choice.dtype)
    else:
        tiny_arch = "tiny-xl" if options.arch == "sdxl-turbo" else "tiny"
        arch = tiny_arch if options.weights == "tiny" else options.arch
        lcm = options.arch == "sd15"
        base = build_random_model(
            arch,
            scheduler="lcm" if lcm else "euler",
            device=choice.device,
            time_cond_proj_dim=LCM_GUIDANCE_DIM[arch] if lcm else None,
        ).to(choice)
        described = f"random {arch}"
        with torch.device(choice.device):
            torch.manual_seed(0)
            tiny = AutoencoderTiny(**(TINY_TAESD if arch.startswith("tiny") else TAESD))
    tiny = tiny.eval().requires_grad_(False).to(device=choice.device)
    if tiny.dtype != choice.dtype:  # (diffusers warns about a cast to the dtype a model already has)
        tiny = tiny.to(dtype=choice.dtype)
    with_taesd = replace(base, vae=tiny)
    baselines = {"own_vae": base, "taesd": with_taesd}
    if options.vae == "tiny":
        return with_taesd, baselines, described + " + TAESD"
    return base, baselines, described


def _frames(size: int, count: int = 8) -> list[Any]:
    from engine.sources.pattern import render_pattern

    return [render_pattern(i * 0.37, size, size) for i in range(count)]


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q))


def _accelerator(options: BenchOptions, device: Any) -> Any:
    """The backend asked for, as the show builds it; ``tensorrt`` with its fallback to compile."""
    from engine.diffusion.accel import CompileAccelerator, choose_accelerator
    from engine.diffusion.tensorrt import tensorrt_or_compile

    compiled = CompileAccelerator(backend=options.compile_backend)
    if options.accel == "tensorrt":
        return tensorrt_or_compile(device.type, fallback=compiled)
    if options.accel == "compile":
        return compiled
    return choose_accelerator(options.accel, device)


def _dynamo_frames() -> int:
    """Graphs dynamo has captured in this process so far (recompiles show as more)."""
    if "torch._dynamo" not in sys.modules:  # nothing was compiled: importing it would cost a second
        return 0
    from engine.diffusion.accel import compile_counts

    return compile_counts().graphs


def count_syncs(stream: Any, frames: list[Any], count: int) -> dict[str, Any]:
    """Host synchronisations in ``count`` whole frames (upload to download).

    Uses the stream's own check when it has one (``stream.check_frame``: a frame with a sync
    before its download counts one); else runs the frames under
    ``torch.cuda.set_sync_debug_mode("warn")`` and counts its warnings.
    A frame's designed wait for its download is an event wait, which that mode does not flag;
    anything it does flag (a ``.item()``, a pageable copy, a stream sync) stalls the frame.
    """
    import torch

    if count == 0:
        return {"per_frame": None, "frames": 0, "how": "not measured (--sync-frames 0)"}
    if not stream.choice.is_cuda:
        return {
            "per_frame": None,
            "frames": 0,
            "how": f"not measured: {stream.choice.device.type} has no CUDA sync check",
        }
    check = getattr(stream, "check_frame", None)
    if callable(check):  # the stream's own check: set_sync_debug_mode("error") up to the download
        reports = [check(frames[i % len(frames)]) for i in range(count)]
        errors = [r.sync_error for r in reports if r.sync_error is not None]
        return {
            "per_frame": len(errors) / count,
            "frames": count,
            "how": 'stream.check_frame: set_sync_debug_mode("error") up to the download',
            "first": errors[0] if errors else None,
            "graphs_per_frame": sum(r.graphs for r in reports) / count,
            "graph_breaks_per_frame": sum(r.graph_breaks for r in reports) / count,
        }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(count):
                stream(frames[i % len(frames)])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    flagged = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    return {
        "per_frame": len(flagged) / count,
        "frames": count,
        "how": "torch.cuda.set_sync_debug_mode('warn')",
        "first": flagged[0][:200] if flagged else None,
    }


def _controlnet_case(options: BenchOptions, model: Any, choice: Any) -> tuple[Any, Any, Any]:
    """(ControlUnit for the engine, ControlNet, the diffusers user's control-image function)."""
    import cv2
    import numpy as np
    from PIL import Image

    from engine.diffusion.controlnet import (
        TINY_CONTROLNET,
        CannyPreprocessor,
        ControlUnit,
        DepthPreprocessor,
        random_controlnet,
        random_depth_model,
    )

    tiny = options.weights == "tiny"
    if tiny:  # its control-image embedding halves as often as the engine's VAE (TAESD: 3 times)
        from engine.diffusion.stream import vae_scale_factor

        halvings = vae_scale_factor(model.vae).bit_length() - 1
        embedding = [16 * 2**i for i in range(halvings + 1)]
        controlnet = random_controlnet({**TINY_CONTROLNET, "conditioning_embedding_out_channels": embedding})
    else:  # the UNet's own architecture (a ControlNet for it), random weights
        from diffusers import ControlNetModel

        controlnet = ControlNetModel.from_unet(model.unet).eval().requires_grad_(False)
    controlnet = controlnet.to(device=choice.device, dtype=choice.dtype)
    if options.controlnet == "canny":
        preprocess: Any = CannyPreprocessor()

        def user_control(picture: Any) -> Any:  # what diffusers' ControlNet docs do
            edges = cv2.Canny(np.asarray(picture.convert("L")), 100, 200)
            return Image.fromarray(np.stack([edges] * 3, axis=-1))

    else:
        from transformers import pipeline

        depth_model, processor = random_depth_model(tiny, choice.device)
        depth_model = depth_model.to(dtype=choice.dtype)
        preprocess = DepthPreprocessor(depth_model, processor, choice.dtype)
        estimator = pipeline("depth-estimation", model=depth_model, image_processor=processor, device=choice.device)

        def user_control(picture: Any) -> Any:
            return estimator(picture)["depth"].convert("RGB")

    return ControlUnit(1, controlnet, preprocess), controlnet, user_control


def _ip_adapter_case(options: BenchOptions, model: Any, choice: Any) -> tuple[Any, Any, Any]:
    """(StyleBank for the engine, image encoder, feature extractor): a random IP-Adapter in the UNet."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from engine.diffusion.ip_adapter import StyleBank, load_ip_adapter_weights, random_ip_adapter

    tiny = options.weights == "tiny"
    vision: dict[str, Any] = (
        {"hidden_size": 32, "image_size": 32, "projection_dim": 32, "intermediate_size": 37}
        | {"num_attention_heads": 4, "num_hidden_layers": 2, "patch_size": 8}
        if tiny  # h94/IP-Adapter models/image_encoder: OpenCLIP ViT-H/14
        else {"hidden_size": 1280, "image_size": 224, "projection_dim": 1024, "intermediate_size": 5120}
        | {"num_attention_heads": 16, "num_hidden_layers": 32, "patch_size": 14, "hidden_act": "gelu"}
    )
    with choice.device:
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision)).eval().requires_grad_(False)
    encoder = encoder.to(dtype=choice.dtype)
    size = vision["image_size"]
    extractor = CLIPImageProcessor(crop_size=size, size=size, do_center_crop=True, resample=3)
    adapter = random_ip_adapter(model.unet, image_embed_dim=int(vision["projection_dim"]))
    scale = load_ip_adapter_weights(model.unet, adapter)
    model.unet.to(device=choice.device, dtype=choice.dtype)
    bank = StyleBank(encoder, extractor, choice.device, choice.dtype)
    bank.scale = scale
    return bank, encoder, extractor


def _baseline(
    model: Any,
    pictures: list[Any],
    frames: int,
    steps: int,
    controlnet: Any = None,
    user_control: Any = None,
    style: Any = None,
) -> dict[str, Any]:
    """diffusers' StableDiffusionImg2ImgPipeline over ``model``: PIL in, PIL out, ``steps`` UNet calls
    (with a ControlNet: StableDiffusionControlNetImg2ImgPipeline, the control image made each frame)."""
    import numpy as np
    import torch

    pipe = model.img2img_pipeline()
    extra: dict[str, Any] = {}
    if controlnet is not None:
        from diffusers import StableDiffusionControlNetImg2ImgPipeline

        pipe = cast(Any, StableDiffusionControlNetImg2ImgPipeline)(**pipe.components, controlnet=controlnet)
        pipe.set_progress_bar_config(disable=True)
    if style is not None:  # (encoder, extractor, picture): the pipeline encodes the picture each call
        components = {**pipe.components, "image_encoder": style[0], "feature_extractor": style[1]}
        pipe = type(pipe)(**components)
        pipe.set_progress_bar_config(disable=True)
        extra["ip_adapter_image"] = style[2]
    times = []
    for i in range(2 + frames):  # two untimed calls first (allocations, cuDNN choices)
        started = time.perf_counter()
        picture = pictures[i % len(pictures)]
        if user_control is not None:
            extra["control_image"] = user_control(picture)
        out = pipe(
            PROMPT,
            image=picture,
            num_inference_steps=round(steps / STRENGTH),
            strength=STRENGTH,
            guidance_scale=0.0,
            generator=torch.Generator().manual_seed(0),
            **extra,
        ).images[0]
        np.asarray(out)
        if i >= 2:
            times.append((time.perf_counter() - started) * 1000.0)
    return {
        "pipeline": type(pipe).__name__,
        "vae": type(model.vae).__name__,
        "fps": 1000.0 * len(times) / sum(times),
        "p50_ms": _percentile(times, 50),
    }


def bench_diffusion(options: BenchOptions) -> dict[str, Any]:
    import diffusers
    import torch
    from PIL import Image

    from engine.diffusion.configs import ARCHITECTURES
    from engine.diffusion.device import choose_device
    from engine.diffusion.stream import LiveSettings, StreamConfig, StreamImg2Img

    choice = choose_device(options.device, options.dtype)
    steps = options.steps or ARCHITECTURES[options.arch].default_steps
    started = time.monotonic()
    engine_model, baseline_models, weights = _models(options, choice)
    load_s = time.monotonic() - started
    frames = _frames(options.size)
    controls, controlnet, user_control = (
        _controlnet_case(options, engine_model, choice) if options.controlnet else ((), None, None)
    )

    style, style_parts = None, None
    if options.ip_adapter:
        style, encoder, extractor = _ip_adapter_case(options, engine_model, choice)
        style.request(frames[-1], key="style")
        style.wait()
        style_parts = (encoder, extractor, Image.fromarray(frames[-1]))

    # 1. the engine: hot path, host frames in and out
    accelerator = _accelerator(options, choice.device)
    compiled_before = _dynamo_frames()
    stream = StreamImg2Img(
        engine_model,
        choice,
        StreamConfig(size=(options.size, options.size), steps=steps),
        LiveSettings(strength=STRENGTH, similarity_threshold=0.0),
        prompts=[(PROMPT, 1.0)],
        accelerator=accelerator,
        timing=True,
        controls=[cast(Any, controls)] if controlnet is not None else (),
        style=style,
    )
    stream.prompts.wait()
    # 2. the first image, as a show gets it: eager frames while a compiled or TensorRT build starts
    #    in the background (the first frame starts it), timed from the loaded weights
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
    compiled_built = _dynamo_frames()
    # 3. warm-up, then the timed frames
    for i in range(options.warmup):
        stream(frames[i % len(frames)])
    compiled_warm = _dynamo_frames()
    stream.timer.reset()
    times = []
    for i in range(options.frames):
        started = time.perf_counter()
        image = stream(frames[i % len(frames)])
        times.append((time.perf_counter() - started) * 1000.0)
        if image is None:
            raise RuntimeError("the stream produced no image for a new frame")
    compiled_timed = _dynamo_frames()
    engine = {
        "fps": 1000.0 * len(times) / sum(times),
        "p50_ms": _percentile(times, 50),
        "p99_ms": _percentile(times, 99),
        "stages_ms": stream.timer.means(),
    }
    # 4. synchronisations per frame, after the timed frames (the check itself slows a frame)
    syncs = count_syncs(stream, frames, options.sync_frames)
    stream.close()
    fell_back = stream.accel != stream.accel_requested
    fallback_reason = getattr(accelerator, "fell_back", None) or stream.accel_error if fell_back else None

    # 5. the baselines: diffusers' pipeline, PIL in and out, with the model's VAE and with TAESD
    baselines: dict[str, dict[str, Any]] = {}
    if options.baseline_frames:
        pictures = [Image.fromarray(f) for f in frames]
        from engine.diffusion.stream import vae_scale_factor

        for name, model in baseline_models.items():
            if controlnet is not None and vae_scale_factor(model.vae) != vae_scale_factor(engine_model.vae):
                continue  # (tiny models: a ControlNet takes one VAE's latent size; full-size VAEs all halve 3x)
            baselines[name] = _baseline(
                model, pictures, options.baseline_frames, steps, controlnet, user_control, style_parts
            )

    result = {
        "device": choice.device.type,
        "gpu_name": torch.cuda.get_device_name(choice.device) if choice.is_cuda else None,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "arch": ("tiny-xl" if options.arch == "sdxl-turbo" else "tiny") if options.weights == "tiny" else options.arch,
        "weights": weights,
        "size": options.size,
        "steps": steps,
        "dtype": str(choice.dtype).removeprefix("torch."),
        "vae": options.vae,
        "controlnet": options.controlnet,
        "ip_adapter": options.ip_adapter,
        "accel": stream.accel,  # what ran the timed frames
        "accel_requested": stream.accel_requested,
        "fell_back": fell_back,
        "fallback_reason": fallback_reason,
        "compile_backend": options.compile_backend if stream.accel_requested in ("compile", "tensorrt") else None,
        "accel_ready_s": stream.accel_ready_s,
        "accel_error": stream.accel_error,
        "startup": {"load_s": load_s, "first_frame_s": stream.first_image_s},
        "frames": options.frames,
        "engine": engine,
        "recompiles": {
            "by_build": compiled_built - compiled_before,
            "in_warmup": compiled_warm - compiled_built,
            "in_timed_frames": compiled_timed - compiled_warm,
            "per_frame": (compiled_timed - compiled_warm) / options.frames,
        },
        "syncs": syncs,
        "baselines": baselines,
        "ratios": {name: engine["fps"] / b["fps"] for name, b in baselines.items()},
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        },
        "command": "dreamdeck bench diffusion " + " ".join(sys.argv[1:]) if sys.argv else "",
    }
    if options.json_path is not None:
        from engine.files import write_atomic

        options.json_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(options.json_path, (json.dumps(result, indent=2) + "\n").encode("utf-8"))
    return result


def format_table(result: dict[str, Any]) -> str:
    device = result["gpu_name"] or f"{result['device']} ({result['cpu']}, {result['threads']} threads)"
    engine = result["engine"]
    stages = "  ".join(f"{name} {ms:.2f}" for name, ms in engine["stages_ms"].items())
    accel = result["accel"] + (f" (asked for {result['accel_requested']}: FELL BACK)" if result["fell_back"] else "")
    lines = [
        f"diffusion img2img: {result['arch']} ({result['weights']}) {result['size']}x{result['size']}, "
        f"{result['steps']} step(s), {result['dtype']}, VAE {result['vae']}, accel {accel}, on {device}"
        + (f", ControlNet {result['controlnet']}" if result.get("controlnet") else "")
        + (", IP-Adapter" if result.get("ip_adapter") else ""),
        f"{'':30}{'fps':>9}{'p50 ms':>10}{'p99 ms':>10}{'ratio':>9}",
        f"{'engine (hot path)':30}{engine['fps']:9.1f}{engine['p50_ms']:10.2f}{engine['p99_ms']:10.2f}",
        f"{'  stages, mean ms':30}{stages}",
    ]
    for name, baseline in result["baselines"].items():
        lines.append(
            f"{BASELINES[name]:30}{baseline['fps']:9.1f}{baseline['p50_ms']:10.2f}{'':10}{result['ratios'][name]:8.1f}x"
        )
    startup = result["startup"]
    lines.append(
        f"first frame {startup['first_frame_s']:.2f} s after the weights loaded (weights: {startup['load_s']:.1f} s)"
    )
    if result["fallback_reason"]:
        lines.append(f"accel: {result['fallback_reason']}")
    elif result["accel_ready_s"] is not None:
        lines.append(f"accel {result['accel']} ready after {result['accel_ready_s']:.1f} s")
    recompiles, syncs = result["recompiles"], result["syncs"]
    lines.append(
        f"recompiles: {recompiles['by_build']} by the build, {recompiles['in_timed_frames']} in the timed "
        f"frames; syncs per frame: "
        + (f"{syncs['per_frame']:.1f} ({syncs['how']})" if syncs["per_frame"] is not None else syncs["how"])
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
