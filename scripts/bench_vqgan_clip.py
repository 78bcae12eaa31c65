#!/usr/bin/env python3
"""VQGAN+CLIP optimisation steps per second, full-size architectures with random weights.

A step costs the same whatever the weights are, so this builds ``vqgan_imagenet_f16_16384``
(ch 128, ch_mult 1-1-2-2-4, 2 res blocks, attention at 16, 16384 x 256 codebook) and CLIP
ViT-B/32 from their configs and times ``VqganClip.step()`` (decode, cutouts, CLIP image
forward, backward through both, Adam) at each size. No download, no GL. From the repo root
(``PYTHONPATH=.`` unless dreamdeck is installed with ``pip install -e .``):

    PYTHONPATH=. python3 scripts/bench_vqgan_clip.py                 # CPU, 256 and 512
    PYTHONPATH=. python3 scripts/bench_vqgan_clip.py --device cuda --autocast bfloat16 --steps 50 --json out.json
    PYTHONPATH=. python3 scripts/bench_vqgan_clip.py --tiny          # the machinery, 32 and 64 px, in seconds

The first ``--warmup`` steps are not timed (allocator, kernel selection).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

AUTOCAST = ("none", "bfloat16", "float16")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps")
    parser.add_argument("--sizes", type=int, nargs="+", help="square image sizes (default 256 512; --tiny: 32 64)")
    parser.add_argument("--cutouts", type=int, default=32, help="cutouts per step (the classic default)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per size")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per size first")
    parser.add_argument(
        "--autocast",
        choices=AUTOCAST,
        default="none",
        help="half-precision forward passes on a GPU (z and Adam stay float32)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--tiny", action="store_true", help="tiny models (a quick check of this script)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    sizes = args.sizes or ([32, 64] if args.tiny else [256, 512])

    import torch

    from engine.prompt_syntax import WeightedPrompt
    from engine.vqclip.configs import (
        CLIP_VIT_B32,
        F16_16384,
        TINY_CLIP,
        TINY_VQGAN,
        build_random_clip,
        build_random_vqgan,
    )
    from engine.vqclip.optimise import Cutouts, VqganClip

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = None if args.autocast == "none" else getattr(torch, args.autocast)
    vq_config, clip_config = (TINY_VQGAN, TINY_CLIP) if args.tiny else (F16_16384, CLIP_VIT_B32)
    vqgan = build_random_vqgan(vq_config, device=device)
    clip = build_random_clip(clip_config, device=device)
    prompts = [WeightedPrompt("a lighthouse in a storm, oil painting", 1.0), WeightedPrompt("blurry", -0.5)]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows = []
    for size in sizes:
        run = VqganClip(vqgan, clip, prompts, size=size, cutouts=Cutouts(count=args.cutouts), autocast=autocast)
        for _ in range(args.warmup):
            run.step()
        sync()
        started = time.perf_counter()
        for _ in range(args.steps):
            image = run.step()
        sync()
        seconds = (time.perf_counter() - started) / max(args.steps, 1)
        rows.append(
            {
                "size": size,
                "image": list(image.shape[:2]),
                "cutouts": args.cutouts,
                "steps": args.steps,
                "seconds_per_step": seconds,
                "steps_per_second": 1.0 / seconds,
            }
        )
        print(f"  {size}: {1.0 / seconds:.3f} it/s", file=sys.stderr, flush=True)

    result = {
        "vqgan": "tiny" if args.tiny else "vqgan_imagenet_f16_16384 (random weights)",
        "clip": "tiny" if args.tiny else "ViT-B/32 (random weights)",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "autocast": args.autocast,
        "torch": torch.__version__,
        "results": rows,
    }
    print(f"VQGAN+CLIP steps, {result['vqgan']} + {result['clip']}, on {result['device']}, autocast {args.autocast}")
    print(f"{'size':>6} {'cutouts':>8} {'steps':>6} {'s/step':>9} {'it/s':>8}")
    for row in rows:
        print(
            f"{row['size']:>6} {row['cutouts']:>8} {row['steps']:>6} {row['seconds_per_step']:>9.3f} "
            f"{row['steps_per_second']:>8.3f}"
        )
    if len(rows) > 1:
        ratio = rows[0]["steps_per_second"] / rows[-1]["steps_per_second"]
        print(f"{rows[-1]['size']} vs {rows[0]['size']}: {ratio:.2f}x slower per step")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
