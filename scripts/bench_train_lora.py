"""``dreamdeck train-lora``'s training step on a full-size UNet with random weights: steps/s and
the minutes 500 steps take (rank 16, 512x512 by default).

    PYTHONPATH=$PWD python3 scripts/bench_train_lora.py --tiny                 # smoke run (seconds, CPU)
    PYTHONPATH=$PWD python3 scripts/bench_train_lora.py --steps 2 --warmup 1   # SD-turbo size on the CPU
    PYTHONPATH=$PWD python3 scripts/bench_train_lora.py --device cuda --json train-lora.json
    PYTHONPATH=$PWD python3 scripts/bench_train_lora.py --device cuda --arch sdxl --size 1024

(from a checkout's root; with dreamdeck installed, PYTHONPATH is not needed)

A step costs the same whatever the weights are, so no download is needed: the UNet is the
published architecture (engine/diffusion/configs.py) with random weights, the LoRA is the
one train-lora adds (attention projections, alpha = rank), and the step is train-lora's own
``train_step`` (sampled latents, DDPM noise, UNet forward and backward, AdamW). The training
set is 8 random latents and caption embeddings of the right shapes: train-lora encodes the
pictures and captions once before its loop, so the loop is all a step costs. Not counted:
loading the model and that one-time encoding (seconds), and the samples (off here).
Target (issue 16): 500 SD 1.5-class steps in under 5 minutes on one H100 / H200.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep on a shared CPU

import torch

from engine.diffusion.configs import ARCHITECTURES, SDXL_UNETS
from engine.diffusion.device import DeviceChoice
from engine.diffusion.train_lora import Trainee, add_lora, make_optimizer, train_step

ARCHS = ("sd-turbo", "sd15", "sdxl", "tiny")
TEXT_WIDTH = {"sd-turbo": 1024, "sd15": 768, "sdxl": 2048, "tiny": 32}


def build(arch: str, size: int, rank: int, choice: DeviceChoice, pictures: int = 8) -> Trainee:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    config = SDXL_UNETS[arch] if arch == "sdxl" else ARCHITECTURES[arch].unet
    with torch.device(choice.device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**config).requires_grad_(False)
    if choice.dtype != torch.float32:
        unet.to(choice.dtype)
    add_lora(unet, rank, seed=0)
    unet.train()
    generator = torch.Generator().manual_seed(0)
    latent = size // 8
    mean = torch.randn((pictures, 4, latent, latent), generator=generator)
    text = torch.randn((pictures, 77, TEXT_WIDTH[arch]), generator=generator).to(choice.device, choice.dtype)
    pooled = time_ids = None
    if arch == "sdxl":
        pooled = torch.randn((pictures, 1280), generator=generator).to(choice.device, choice.dtype)
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * pictures, device=choice.device, dtype=choice.dtype)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return Trainee(None, unet, scheduler, arch == "sdxl", 0.18215, mean, mean.abs() * 0.1, text, pooled, time_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=ARCHS, default="sd-turbo", help="UNet architecture (default sd-turbo)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 / float16 / float32 (default: bfloat16 on cuda)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--size", type=int, default=512, help="training resolution (latents are size / 8)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="steps measured")
    parser.add_argument("--warmup", type=int, default=3, help="steps run first, not measured")
    parser.add_argument("--target-steps", type=int, default=500, help="the run to extrapolate to")
    parser.add_argument("--tiny", action="store_true", help="smoke run: the tiny test UNet at 64x64, 5 steps")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.tiny:
        args.arch, args.size, args.steps, args.warmup = "tiny", 64, 5, 1
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    choice = DeviceChoice(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    started = time.perf_counter()
    trainee = build(args.arch, args.size, args.rank, choice)
    build_s = time.perf_counter() - started
    optimizer = make_optimizer(trainee.unet, 1e-4)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(args.warmup):
        losses.append(float(train_step(trainee, optimizer, generator, args.batch, choice)))
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step(trainee, optimizer, generator, args.batch, choice)
    sync()
    seconds = time.perf_counter() - started
    losses.append(float(loss))
    steps_per_s = args.steps / seconds
    trainable = sum(p.numel() for p in trainee.unet.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainee.unet.parameters())
    result = {
        "arch": args.arch,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "rank": args.rank,
        "size": args.size,
        "batch": args.batch,
        "unet_params_m": round(total / 1e6, 1),
        "lora_params_m": round(trainable / 1e6, 2),
        "build_s": round(build_s, 1),
        "steps_measured": args.steps,
        "steps_per_s": round(steps_per_s, 3),
        "s_per_step": round(1 / steps_per_s, 3),
        f"minutes_to_{args.target_steps}_steps": round(args.target_steps / steps_per_s / 60, 1),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 1) if device.type == "cuda" else None,
        "finite_loss": all(math.isfinite(v) for v in losses),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    print(
        f"{args.arch} rank {args.rank}, {args.size}x{args.size}, batch {args.batch} on {result['device']} "
        f"({result['dtype']}): {steps_per_s:.3f} steps/s, {args.target_steps} steps in "
        f"{result[f'minutes_to_{args.target_steps}_steps']} min"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
