"""Reverse steps per second of the DDPM scene on this machine: the shipped size and 256x256.

    PYTHONPATH=. python3 scripts/bench_ddpm.py [--threads 1] [--steps 5]

The 256x256 case builds the google/ddpm-church-256 architecture (also celebahq-256,
bedroom-256) with random weights: a step costs the same whatever the weights are, so no
download is needed. Each case runs a few reverse steps after one warm-up step, batch 1, as
the scene does; figures and the ratio are from the same run.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see scripts/train_ddpm.py

import torch  # noqa: E402

from engine.ddpm.model import TEXTURE_SCHEDULE, DdpmModel, build_unet, load_ddpm  # noqa: E402
from engine.ddpm.reverse import ReverseConfig, ReverseProcess  # noqa: E402

# The published unet/config.json of google/ddpm-church-256, trimmed to the keys that differ
# from diffusers' defaults (113.7 M parameters).
CHURCH_256_UNET = {
    "sample_size": 256,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "block_out_channels": (128, 128, 256, 256, 512, 512),
    "norm_eps": 1e-6,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "down_block_types": ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
}


def steps_per_second(model: DdpmModel, steps: int) -> float:
    process = ReverseProcess(model, ReverseConfig(scheduler="ddim", steps=steps + 1))
    next(process)  # warm-up: first-call allocations
    start = time.perf_counter()
    for _ in range(steps):
        next(process)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="torch threads (default: what the scene uses, all cores but one)",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (after one warm-up)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    print(f"device {device}, {dtype}, {args.threads} torch thread(s), torch {torch.__version__}")

    shipped = load_ddpm("", device=device, dtype=dtype)
    church_unet = build_unet(CHURCH_256_UNET).to(device=device)
    if dtype != church_unet.dtype:
        church_unet.to(dtype=dtype)
    church = DdpmModel(
        unet=church_unet.eval(), schedule=dict(TEXTURE_SCHEDULE), source="random google/ddpm-church-256 architecture"
    )
    results = {}
    for name, model, steps in (
        ("shipped textures 32x32", shipped, args.steps * 10),
        ("church-256 architecture 256x256", church, args.steps),
    ):
        params = sum(p.numel() for p in model.unet.parameters()) / 1e6
        results[name] = steps_per_second(model, steps)
        print(f"{name:34s} {params:6.1f} M params  {results[name]:8.2f} steps/s  ({1000 / results[name]:8.1f} ms/step)")
    small, big = results.values()
    print(f"ratio: the shipped model steps {small / big:.0f}x faster than a 256x256 google DDPM")


if __name__ == "__main__":
    main()
