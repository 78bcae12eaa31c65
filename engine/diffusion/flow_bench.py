"""The flow hot path against diffusers' own img2img pipeline, same weights, same run.

    python3 -m engine.diffusion.flow_bench --case sana-sprint [--tiny] [--json out.json]

Cases (full-size architectures, random weights: a forward pass costs the same whatever the
weights; bf16 on CUDA; 512x512; random prompt embeddings of the real shapes, since no text
encoder is built):

    sana-sprint   SANA-Sprint 0.6B, 1 step: frames per second of the stream, against
                  SanaSprintImg2ImgPipeline on the same transformer and DC-AE (target >= 60 fps
                  on an H100 / H200, >= 5x diffusers)
    flux-schnell  FLUX.1-schnell, 4 steps from pure noise (strength 1): seconds per image,
                  one image finished per stream-batch call (target <= 0.25 s), against
                  FluxImg2ImgPipeline's seconds per image
    sd35-turbo    SD3.5 Large Turbo, 4 steps, the same (target <= 0.2 s)

``--tiny`` runs the same with diffusers' tiny test components on the CPU (32x32, prompts
encoded by the tiny text encoders): the CI check of this script; its figures mean nothing.
Also reported: the backend that ran, dynamo graphs compiled during the timed frames
(recompiles: must be 0), the GPU memory it peaked at against what the model declares.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

CASES = ("sana-sprint", "flux-schnell", "sd35-turbo")
TARGETS = {"sana-sprint": "fps >= 60 and >= 5x diffusers", "flux-schnell": "<= 0.25 s", "sd35-turbo": "<= 0.2 s"}
DECLARED = {  # what the flow scenes declare for the real models (flow_loading.FOOTPRINTS), MB
    "sana-sprint": "sana_sprint_0.6b",
    "flux-schnell": "flux.1-schnell",
    "sd35-turbo": "stable-diffusion-3.5-large",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--case", choices=CASES, required=True)
    parser.add_argument("--tiny", action="store_true", help="diffusers' tiny test components on the CPU (CI)")
    parser.add_argument("--size", type=int, help="square frame size (default 512; 32 with --tiny)")
    parser.add_argument("--frames", type=int, default=50, help="timed frames (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed frames first (default 5)")
    parser.add_argument("--baseline-frames", type=int, default=10, help="timed diffusers calls; 0 skips them")
    parser.add_argument("--accel", choices=("auto", "eager", "compile"), default="auto")
    parser.add_argument("--compile-backend", choices=("inductor", "eager"), default="inductor")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="also write the results here")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    result = run(args)
    print_table(result)
    if args.json is not None:
        from engine.files import write_atomic

        write_atomic(args.json, (json.dumps(result, indent=2) + "\n").encode("utf-8"))
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from engine.diffusion.accel import CompileAccelerator, EagerAccelerator, compile_counts
    from engine.diffusion.device import choose_device
    from engine.diffusion.flow import TRIGFLOW_MAX, FlowText, flow_kind
    from engine.diffusion.flow_configs import FULL, FULL_KINDS, build_full_flow_parts, build_tiny_flow_pipeline
    from engine.diffusion.flow_loading import FOOTPRINTS
    from engine.diffusion.flow_prompts import FlowPromptBank
    from engine.diffusion.flow_stream import FlowSettings, FlowStream, FlowStreamConfig

    case = args.case
    kind = FULL_KINDS[case]
    device = "cpu" if args.tiny and args.device == "auto" else args.device
    choice = choose_device(device, "float32" if args.tiny else ("bfloat16" if device != "cpu" else "float32"))
    size = args.size or (32 if args.tiny else 512)
    steps = int(FULL[case]["steps"])
    strength = 0.6 if kind == "sana_sprint" else 1.0
    started = time.monotonic()
    pipe = build_tiny_flow_pipeline(kind) if args.tiny else build_full_flow_parts(case, choice.device, choice.dtype)
    if args.tiny:
        for module in (pipe.transformer, pipe.vae):
            module.to(choice.device)
    build_s = time.monotonic() - started
    bank = FlowPromptBank(flow_kind(pipe), pipe, choice)
    prompts = [("a bench of flowers", 1.0)]
    if args.tiny:
        bank.request(prompts)
        bank.wait()
    else:
        tokens, width, pooled = FULL[case]["text"]
        g = torch.Generator(choice.device).manual_seed(0)
        embeds = torch.randn((1, tokens, width), generator=g, device=choice.device, dtype=choice.dtype)
        bank.publish_embeddings(
            prompts,
            FlowText(
                embeds,
                torch.randn((1, pooled), generator=g, device=choice.device, dtype=choice.dtype) if pooled else None,
                torch.ones((1, tokens), device=choice.device, dtype=torch.long) if kind == "sana_sprint" else None,
            ),
        )
    wanted = args.accel if args.accel != "auto" else ("compile" if choice.is_cuda else "eager")
    accelerator: Any = CompileAccelerator(backend=args.compile_backend) if wanted == "compile" else EagerAccelerator()
    stream = FlowStream(
        pipe,
        choice,
        FlowStreamConfig(size=(size, size), steps=steps),
        FlowSettings(strength=strength, similarity_threshold=0.0),
        prompts=prompts,
        accelerator=accelerator,
        bank=bank,
    )
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(4)]
    for i in range(max(steps, 1)):
        stream(frames[i % 4])
    stream.wait_for_accel()
    for i in range(args.warmup):
        stream(frames[i % 4])
    if choice.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    before = compile_counts()
    for i in range(args.frames):
        t0 = time.perf_counter()
        image = stream(frames[i % 4])
        times.append(time.perf_counter() - t0)
        assert image is not None
    recompiles = (compile_counts() - before).graphs
    peak_mb = int(torch.cuda.max_memory_allocated() / 2**20) if choice.is_cuda else None
    engine_s = statistics.median(times)
    baseline_s = time_pipeline(pipe, stream, frames, args.baseline_frames, kind, steps, strength, TRIGFLOW_MAX)
    declared = FOOTPRINTS[DECLARED[case]]
    return {
        "case": case,
        "tiny": args.tiny,
        "kind": kind,
        "device": str(choice.device),
        "gpu_name": torch.cuda.get_device_name(choice.device) if choice.is_cuda else None,
        "dtype": str(choice.dtype).removeprefix("torch."),
        "size": stream.size,
        "steps": steps,
        "accel_requested": wanted,
        "accel": stream.accel,
        "fell_back": stream.accel != wanted,
        "accel_ready_s": stream.accel_ready_s,
        "build_s": round(build_s, 1),
        "engine": {
            "fps": 1.0 / engine_s,
            "s_per_image": engine_s,
            "p50_ms": 1000 * engine_s,
            "p99_ms": 1000 * sorted(times)[min(len(times) - 1, math.ceil(0.99 * len(times)) - 1)],
        },
        "diffusers": None if baseline_s is None else {"fps": 1.0 / baseline_s, "s_per_image": baseline_s},
        "ratio": None if baseline_s is None else baseline_s / engine_s,
        "recompiles": {"in_timed_frames": recompiles},
        "memory": {"peak_mb": peak_mb, "declared_transformer_vae_mb": declared.total(offload_text=True)},
        "target": TARGETS[case],
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def time_pipeline(
    pipe: Any, stream: Any, frames: list[Any], count: int, kind: str, steps: int, strength: float, trig_max: float
) -> float | None:
    """diffusers' img2img pipeline on the same parts and embeddings: median seconds per image (PIL in, numpy out)."""
    if count <= 0:
        return None
    import torch
    from PIL import Image

    text = stream.prompts.current
    height, width = stream.size
    common: dict[str, Any] = {"height": height, "width": width, "output_type": "np"}
    if kind == "sana_sprint":
        common.update(
            prompt_embeds=text.embeds,
            prompt_attention_mask=text.mask,
            num_inference_steps=steps,
            strength=1.0,
            max_timesteps=strength * trig_max,
            intermediate_timesteps=None,
            use_resolution_binning=False,
        )
    else:
        common.update(
            prompt_embeds=text.embeds, pooled_prompt_embeds=text.pooled, num_inference_steps=steps, strength=strength
        )
        if kind == "sd3":
            common["guidance_scale"] = 0.0
    times = []
    with torch.inference_mode():
        for i in range(count + 1):  # the first call warms up
            t0 = time.perf_counter()
            pipe(image=Image.fromarray(frames[i % len(frames)]), generator=torch.Generator().manual_seed(0), **common)
            if i:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def print_table(r: dict[str, Any]) -> None:
    e, d = r["engine"], r["diffusers"]
    base = f"diffusers {d['fps']:.2f} fps / {d['s_per_image']:.4f} s, ratio {r['ratio']:.2f}x" if d else "no baseline"
    print(
        f"{r['case']}{' (tiny)' if r['tiny'] else ''}: {r['accel']}{' FELL BACK' if r['fell_back'] else ''} "
        f"{r['size'][0]}x{r['size'][1]} {r['steps']} step(s) {r['dtype']} on {r['gpu_name'] or r['device']}: "
        f"{e['fps']:.2f} fps, {e['s_per_image']:.4f} s/image (p99 {e['p99_ms']:.1f} ms); {base}; "
        f"recompiles {r['recompiles']['in_timed_frames']}; peak {r['memory']['peak_mb']} MB; target {r['target']}"
    )


if __name__ == "__main__":
    sys.exit(main())
