"""Train the texture DDPM the project ships, on 2 CPU cores, from a seed.

The recipe is the plain DDPM one (Ho et al. 2020): pick a timestep, noise a training image
to it, teach the UNet to predict the noise (MSE). What makes it fit a CPU budget: 32x32
images, a 4.5 M-parameter UNet (``model.TEXTURE_UNET``), the cosine schedule, a short
warm-up then cosine-decayed learning rate, and an exponential moving average of the weights
(EMA), which is what gets saved: after a few thousand steps the raw weights still jitter,
the average makes clean samples. The 8 flips/rotations of each texture are also textures,
so every batch is randomly flipped and transposed.

The model folder is written to a temporary folder and renamed into place, so an
interrupted run never leaves a half-written model behind.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from engine.ddpm import plots
from engine.ddpm.model import TEXTURE_SCHEDULE, TEXTURE_UNET, build_unet, load_ddpm
from engine.ddpm.reverse import ReverseConfig, sample
from engine.ddpm.textures import texture_set

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1800
    batch: int = 32
    lr: float = 8e-4
    warmup: int = 150  # steps of linear learning-rate warm-up
    ema_decay: float = 0.998  # averages about the last 500 steps
    images: int = 8000  # size of the procedural training set
    size: int = 32
    seed: int = 0
    threads: int = 2


def _dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image randomly flipped and/or transposed: one of the 8 symmetries of the square."""
    flips = torch.randint(0, 2, (3, x.shape[0]), generator=generator).bool()
    x = torch.where(flips[0, :, None, None, None], x.flip(3), x)
    x = torch.where(flips[1, :, None, None, None], x.flip(2), x)
    return torch.where(flips[2, :, None, None, None], x.transpose(2, 3), x)


def _learning_rate(config: TrainConfig, step: int) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    decay = min(decay, (1 + step) / (10 + step))  # average over fewer steps early on
    ema_params, params = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def train(config: TrainConfig, progress: bool = True) -> tuple[torch.nn.Module, list[float]]:
    """Train from scratch; returns the EMA UNet (float32) and the loss of every step."""
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    # 1. determinism and threads
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    generator = torch.Generator().manual_seed(config.seed)
    # 2. the procedural training set, in [-1, 1]
    images = texture_set(config.images, config.size, seed=config.seed)
    data = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    # 3. model, EMA copy, optimiser, noise schedule
    unet = build_unet({**TEXTURE_UNET, "sample_size": config.size}).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    optimiser = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = DDPMScheduler(**TEXTURE_SCHEDULE)
    # 4. the loop: noise a batch to random timesteps, predict the noise
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc="train ddpm", disable=not progress, mininterval=2.0)
    for step in bar:
        index = torch.randint(0, len(data), (config.batch,), generator=generator)
        clean = _dihedral(data[index], generator)
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (config.batch,), generator=generator)
        noisy = scheduler.add_noise(clean, noise, t)
        loss = torch.nn.functional.mse_loss(unet(noisy, t).sample, noise)
        for group in optimiser.param_groups:
            group["lr"] = _learning_rate(config, step)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimiser.step()
        _ema_update(ema, unet, step, config.ema_decay)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    return ema, losses


def save_model(unet: torch.nn.Module, folder: Path, report: dict) -> None:
    """A DDPMPipeline folder (unet/ in float16 safetensors, scheduler/), written atomically."""
    from diffusers import DDPMPipeline, DDPMScheduler

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model is package data
    try:
        pipe = DDPMPipeline(unet=copy.deepcopy(unet).to(torch.float16), scheduler=DDPMScheduler(**TEXTURE_SCHEDULE))
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training.json").write_text(json.dumps(report, indent=1) + "\n")
        for path in tmp.rglob("*"):  # safetensors writes private files; the model is package data
            path.chmod(0o755 if path.is_dir() else 0o644)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}-old-{os.getpid()}")
            folder.rename(old)
        tmp.rename(folder)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_figures(folder: Path, losses: list[float], config: TrainConfig, docs: Path, minutes: float) -> None:
    """docs/ddpm-loss.png and docs/ddpm-samples.png (samples from the saved float16 model)."""
    docs.mkdir(parents=True, exist_ok=True)
    title = (
        f"texture DDPM, {config.size}x{config.size}: training loss (MSE on noise), batch {config.batch}, "
        f"{minutes:.1f} min on {config.threads} CPU threads"
    )
    plots.write_rgb(docs / "ddpm-loss.png", plots.loss_plot(losses, title))
    model = load_ddpm(str(folder))
    samples = sample(model, ReverseConfig(scheduler="ddim", steps=50, seed=config.seed + 1), batch=64)
    fresh = texture_set(64, config.size, seed=config.seed + 12345)  # not the training images
    left = plots.titled(plots.image_grid(fresh, 8, scale=3), "procedural textures (training distribution)")
    right = plots.titled(plots.image_grid(samples, 8, scale=3), "DDPM samples (DDIM, 50 steps, float16 weights)")
    plots.write_rgb(docs / "ddpm-samples.png", plots.side_by_side(left, right))
    write_reverse_figure(model, docs / "ddpm-reverse.png", seed=config.seed + 1)


def write_reverse_figure(model, path: Path, seed: int, steps: int = 50, shown: int = 11) -> None:
    """What the scene shows: x_t and the predicted x0 along one reverse process, and SDEdit."""
    from engine.ddpm.reverse import ReverseProcess, image_to_tensor, tensor_to_images
    from engine.ddpm.textures import texture

    def strip(process: ReverseProcess) -> tuple[np.ndarray, np.ndarray]:
        frames = [(s.x_t, s.x0) for s in process]
        picks = np.linspace(0, len(frames) - 1, shown).round().astype(int)
        x_t = np.concatenate([tensor_to_images(frames[i][0]) for i in picks])
        x0 = np.concatenate([tensor_to_images(frames[i][1]) for i in picks])
        return x_t, x0

    x_t, x0 = strip(ReverseProcess(model, ReverseConfig(steps=steps, seed=seed)))
    camera = texture(np.random.default_rng(seed), model.size, "cells")  # stands in for a camera frame
    init = image_to_tensor(camera, model.size, model.device, model.dtype)
    rows = [
        plots.titled(plots.image_grid(x_t, shown, scale=3), f"x_t, from noise ({steps} DDIM steps)"),
        plots.titled(plots.image_grid(x0, shown, scale=3), "x0: the model's guess at each step"),
    ]
    for strength in (0.3, 0.6):
        sdedit, _ = strip(ReverseProcess(model, ReverseConfig(steps=steps, strength=strength, seed=seed), init=init))
        row = np.concatenate([tensor_to_images(init), sdedit[1:]])
        rows.append(
            plots.titled(plots.image_grid(row, shown, scale=3), f"SDEdit at strength {strength}: the input, then x_t")
        )
    plots.write_rgb(path, np.concatenate(rows, axis=0))


def run(config: TrainConfig, folder: Path, docs: Path, progress: bool = True) -> dict:
    """Train, save the model folder, draw the figures; returns the report saved with the model."""
    start = time.perf_counter()
    ema, losses = train(config, progress=progress)
    minutes = (time.perf_counter() - start) / 60.0
    report = {
        "config": asdict(config),
        "train_minutes": round(minutes, 2),
        "final_loss_mean_last_200": float(np.mean(losses[-200:])),
        "torch": torch.__version__,
        "losses": [round(v, 5) for v in losses],
    }
    save_model(ema, folder, report)
    write_figures(folder, losses, config, docs, minutes)
    return report
