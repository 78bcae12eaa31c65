"""The reverse process, one step at a time, so every x_t can be a frame.

``ReverseProcess`` is an iterator: each ``next()`` runs the UNet once, takes one DDPM or
DDIM step (diffusers' schedulers) and yields the new noisy state x_{t-1} together with the
model's current guess of the clean image x_0 (``pred_original_sample``). From noise it walks
the whole schedule; in SDEdit mode (Meng et al. 2022) it starts from an image noised to a
chosen fraction of the schedule (``scheduler.add_noise``) and walks only the rest, so at a
small strength the result stays close to the image and at a large one it departs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch

from engine.ddpm.model import DdpmModel

SchedulerKind = Literal["ddpm", "ddim"]


@dataclass(frozen=True)
class ReverseConfig:
    scheduler: SchedulerKind = "ddim"
    steps: int = 50  # reverse steps over the full schedule (fewer when SDEdit starts part way)
    strength: float = 1.0  # where to start, as a fraction of the schedule: 1 = pure noise (SDEdit < 1)
    seed: int = 0


@dataclass(frozen=True)
class ReverseStep:
    x_t: torch.Tensor  # the noisy state after this step, (B, 3, H, W) in [-1, 1]
    x0: torch.Tensor  # the model's current prediction of the clean image
    index: int  # 1-based: this was step index of total
    total: int
    timestep: int  # the training timestep this step started from


def make_scheduler(kind: SchedulerKind, schedule: dict):
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind not in ("ddpm", "ddim"):
        raise ValueError(f"scheduler {kind!r} is not ddpm or ddim")
    cls = DDPMScheduler if kind == "ddpm" else DDIMScheduler
    # from_config ignores the keys of the other scheduler and keeps the schedule's betas.
    return cls.from_config({k: v for k, v in schedule.items() if not k.startswith("_")})


def image_to_tensor(image: np.ndarray, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """RGB uint8 of any size (or grey, or RGBA) -> (1, 3, size, size) in [-1, 1]."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    image = np.ascontiguousarray(image[..., :3]).astype(np.uint8, copy=False)
    h, w = image.shape[:2]
    small = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if min(h, w) > size else cv2.INTER_LINEAR)
    x = torch.from_numpy(small).permute(2, 0, 1)[None].to(device=device, dtype=torch.float32)
    return (x / 127.5 - 1.0).to(dtype)


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) RGB uint8."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class ReverseProcess:
    """Iterate the reverse process; ``len()`` is the number of steps it will take."""

    def __init__(
        self, model: DdpmModel, config: ReverseConfig, init: torch.Tensor | None = None, batch: int = 1
    ) -> None:
        # 1. the schedule, and the part of it to walk
        if not 0.0 < config.strength <= 1.0:
            raise ValueError(f"strength {config.strength} is not in (0, 1]")
        if config.steps < 1:
            raise ValueError(f"steps {config.steps} is not >= 1")
        self.model = model
        self.scheduler = make_scheduler(config.scheduler, model.schedule)
        self.scheduler.set_timesteps(config.steps, device=model.device)
        skip = config.steps - max(1, round(config.steps * config.strength))
        self.timesteps = self.scheduler.timesteps[skip:]
        # 2. the starting state: noise, or the image noised to the first timestep (SDEdit)
        self.generator = torch.Generator(device=model.device).manual_seed(config.seed)
        shape = (batch if init is None else init.shape[0], model.unet.config.in_channels, model.size, model.size)
        noise = torch.randn(shape, generator=self.generator, device=model.device, dtype=torch.float32).to(model.dtype)
        if init is None:
            self.x = noise * self.scheduler.init_noise_sigma
        else:
            self.x = self.scheduler.add_noise(init.to(model.device, model.dtype), noise, self.timesteps[:1])
        self.index = 0

    def __len__(self) -> int:
        return len(self.timesteps)

    def __iter__(self) -> Iterator[ReverseStep]:
        return self

    @torch.inference_mode()
    def __next__(self) -> ReverseStep:
        if self.index >= len(self.timesteps):
            raise StopIteration
        t = self.timesteps[self.index]
        eps = self.model.unet(self.x, t).sample
        out = self.scheduler.step(eps, t, self.x, generator=self.generator)
        self.x = out.prev_sample
        self.index += 1
        return ReverseStep(x_t=self.x, x0=out.pred_original_sample, index=self.index, total=len(self), timestep=int(t))


def sample(model: DdpmModel, config: ReverseConfig, batch: int) -> np.ndarray:
    """Run the whole reverse process: (batch, H, W, 3) RGB uint8 images."""
    last = deque(ReverseProcess(model, config, batch=batch), maxlen=1)[0]  # only the last step is kept
    return tensor_to_images(last.x_t)
