#!/usr/bin/env python3
"""CLIP-guided drawing steps per second for each drawer, full-size architectures with random weights.

A step costs the same whatever the weights are, so this builds ``vqgan_imagenet_f16_16384``
(ch 128, ch_mult 1-1-2-2-4, 2 res blocks, attention at 16, 16384 x 256 codebook) and CLIP
ViT-B/32 from their configs and times ``VqganClip.step()`` (the drawer's image, cutouts, CLIP
image forward, backward through both, Adam) for each drawer at each size: ``vqgan`` (decoder
and all), ``pixel`` (32 x 32 cells, 16 colours) and ``fft`` (a 1/f spectrum). No download,
no GL. From the repo root (``PYTHONPATH=.`` unless dreamdeck is installed with ``pip install -e .``):

    PYTHONPATH=. python3 scripts/bench_vqgan_clip.py                 # CPU, all drawers, 256 and 512
    PYTHONPATH=. python3 scripts/bench_vqgan_clip.py --drawers pixel fft --steps 2
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
DRAWERS = ("vqgan", "pixel", "fft")
PIXEL_CELLS, PIXEL_PALETTE, FFT_DECAY = 32, 16, 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps")
    parser.add_argument("--sizes", type=int, nargs="+", help="square image sizes (default 256 512; --tiny: 32 64)")
    parser.add_argument("--drawers", nargs="+", choices=DRAWERS, default=list(DRAWERS), help="drawers to time")
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
    from engine.vqclip.drawers import FftDrawer, PixelDrawer, VqganDrawer
    from engine.vqclip.optimise import Cutouts, VqganClip

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = None if args.autocast == "none" else getattr(torch, args.autocast)
    vq_config, clip_config = (TINY_VQGAN, TINY_CLIP) if args.tiny else (F16_16384, CLIP_VIT_B32)
    vqgan = build_random_vqgan(vq_config, device=device) if "vqgan" in args.drawers else None
    clip = build_random_clip(clip_config, device=device)
    vqgan_name = "tiny" if args.tiny else "vqgan_imagenet_f16_16384 (random weights)"
    settings = {
        "vqgan": vqgan_name,
        "pixel": f"{PIXEL_CELLS}x{PIXEL_CELLS} cells, {PIXEL_PALETTE} colours",
        "fft": f"1/f^{FFT_DECAY:g} spectrum, decorrelated colour",
    }

    def drawer(name: str, size: int):
        if name == "pixel":
            return PixelDrawer(PIXEL_CELLS, PIXEL_CELLS, PIXEL_PALETTE, size=size, device=device)
        if name == "fft":
            return FftDrawer(size, decay=FFT_DECAY, device=device)
        return VqganDrawer(vqgan, size)

    prompts = [WeightedPrompt("a lighthouse in a storm, oil painting", 1.0), WeightedPrompt("blurry", -0.5)]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows = []
    for name, size in ((name, size) for name in args.drawers for size in sizes):
        cutouts = Cutouts(count=args.cutouts)
        run = VqganClip(drawer(name, size), clip, prompts, size=size, cutouts=cutouts, autocast=autocast)
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
                "drawer": name,
                "setting": settings[name],
                "size": size,
                "image": list(image.shape[:2]),
                "cutouts": args.cutouts,
                "steps": args.steps,
                "seconds_per_step": seconds,
                "steps_per_second": 1.0 / seconds,
            }
        )
        print(f"  {name} {size}: {1.0 / seconds:.3f} it/s", file=sys.stderr, flush=True)

    result = {
        "vqgan": vqgan_name,
        "clip": "tiny" if args.tiny else "ViT-B/32 (random weights)",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "autocast": args.autocast,
        "torch": torch.__version__,
        "results": rows,
    }
    print(f"CLIP-guided drawing steps, CLIP {result['clip']}, on {result['device']}, autocast {args.autocast}")
    print(f"{'drawer':>7} {'size':>6} {'image':>9} {'cutouts':>8} {'steps':>6} {'s/step':>9} {'it/s':>8}")
    for row in rows:
        image = "x".join(str(n) for n in row["image"])
        print(
            f"{row['drawer']:>7} {row['size']:>6} {image:>9} {row['cutouts']:>8} {row['steps']:>6} "
            f"{row['seconds_per_step']:>9.3f} {row['steps_per_second']:>8.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
