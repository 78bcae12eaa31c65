"""The numbers of a stream batch: which timestep each stage denoises and how it hands on.

A stream batch runs ``k`` denoising stages in one UNet call: stage 0 holds the newest
frame, stage ``k-1`` the frame that finishes now. Every supported scheduler fits one update,
written in the UNet's input space ``x = sqrt(a) * x0 + sqrt(1 - a) * noise``:

    x0, eps   = split(model_output, x)                      # epsilon / v / sample prediction
    denoised  = c_out * x0 + c_skip * x                     # LCM boundary condition; Euler: x0
    x_next    = next_signal * denoised + next_eps * eps + next_noise * fresh_noise

    Euler            next_eps = sqrt(a') * sigma'          next_noise = 0      (deterministic)
    Euler ancestral  next_eps = sqrt(a') * sigma_down      next_noise = sqrt(a') * sigma_up
    LCM              next_eps = 0                          next_noise = sqrt(1 - a')

This is exactly what diffusers' schedulers compute step by step (``sigma = sqrt((1-a)/a)``);
the tests hold the hot path to diffusers' pipelines. Only the timesteps are chosen here:

- Euler family: ``t_i = round(T * strength * (k - i) / k) - 1``, i.e. SD-turbo's trailing
  spacing continued to any strength: at ``steps / strength`` whole (1 step at 0.5) it is the
  schedule diffusers' img2img pipeline runs with trailing spacing (``num_inference_steps=2``).
- LCM: the scheduler's own ``set_timesteps(k, strength=strength)``, as its pipeline does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class StageCoefficients(NamedTuple):
    """Per-stage tensors, shaped (k, 1, 1, 1) to broadcast over latents; timesteps (k,)."""

    timesteps: torch.Tensor
    sqrt_alpha: torch.Tensor
    sqrt_one_minus_alpha: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor
    next_signal: torch.Tensor
    next_eps: torch.Tensor
    next_noise: torch.Tensor


@dataclass(frozen=True)
class StreamSchedule:
    """Plain numbers, one per stage (the last stage's ``next_*`` are unused zeros)."""

    kind: str
    timesteps: tuple[float, ...]
    alphas: tuple[float, ...]  # alpha-bar at each stage's timestep
    c_skip: tuple[float, ...]
    c_out: tuple[float, ...]
    next_signal: tuple[float, ...]
    next_eps: tuple[float, ...]
    next_noise: tuple[float, ...]
    prediction_type: str

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def tensors(self, device: torch.device, dtype: torch.dtype) -> StageCoefficients:
        def column(values: tuple[float, ...]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float64).view(-1, 1, 1, 1).to(device=device, dtype=dtype)

        return StageCoefficients(
            timesteps=torch.tensor(self.timesteps, dtype=torch.float32, device=device),
            sqrt_alpha=column(tuple(math.sqrt(a) for a in self.alphas)),
            sqrt_one_minus_alpha=column(tuple(math.sqrt(1.0 - a) for a in self.alphas)),
            c_skip=column(self.c_skip),
            c_out=column(self.c_out),
            next_signal=column(self.next_signal),
            next_eps=column(self.next_eps),
            next_noise=column(self.next_noise),
        )


def build_schedule(scheduler: Any, steps: int, strength: float) -> StreamSchedule:
    """The stream schedule for a diffusers scheduler instance (never modified)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength:g}")
    config = scheduler.config
    prediction = config.prediction_type
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"prediction type {prediction!r} is not one of {', '.join(PREDICTION_TYPES)}")
    if getattr(config, "thresholding", False) or getattr(config, "clip_sample", False):
        raise ValueError(
            f"{type(scheduler).__name__} with thresholding or clip_sample is not supported by the hot path"
        )
    name = type(scheduler).__name__
    if name == "LCMScheduler":
        return _lcm(scheduler, steps, strength)
    if name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"):
        return _euler(scheduler, steps, strength, ancestral=name.startswith("EulerAncestral"))
    raise ValueError(
        f"{name} is not supported by the hot path: use EulerDiscreteScheduler, "
        "EulerAncestralDiscreteScheduler or LCMScheduler"
    )


def _euler(scheduler: Any, steps: int, strength: float, ancestral: bool) -> StreamSchedule:
    config = scheduler.config
    for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        if getattr(config, flag, False):
            raise ValueError(f"Euler with {flag} is not supported by the hot path (it needs plain sigmas)")
    if getattr(config, "timestep_type", "discrete") != "discrete":
        raise ValueError("Euler with continuous timesteps is not supported by the hot path")
    total = config.num_train_timesteps
    timesteps = [round(total * strength * (steps - i) / steps) - 1 for i in range(steps)]
    if timesteps[-1] < 0 or len(set(timesteps)) < steps:
        raise ValueError(f"strength {strength:g} is too low for {steps} steps")
    alphas_cumprod = scheduler.alphas_cumprod.double()
    alphas = [float(alphas_cumprod[t]) for t in timesteps]
    sigmas = [math.sqrt((1.0 - a) / a) for a in alphas] + [0.0]
    next_signal, next_eps, next_noise = [], [], []
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if ancestral:
            sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
            sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        else:
            sigma_up, sigma_down = 0.0, sigma_next
        scale = 1.0 / math.sqrt(1.0 + sigma_next**2) if i + 1 < steps else 0.0  # sqrt(a') of the next stage
        next_signal.append(scale)
        next_eps.append(scale * sigma_down)
        next_noise.append(scale * sigma_up)
    return StreamSchedule(
        kind="euler-ancestral" if ancestral else "euler",
        timesteps=tuple(float(t) for t in timesteps),
        alphas=tuple(alphas),
        c_skip=(0.0,) * steps,
        c_out=(1.0,) * steps,
        next_signal=tuple(next_signal),
        next_eps=tuple(next_eps),
        next_noise=tuple(next_noise),
        prediction_type=config.prediction_type,
    )


def _lcm(scheduler: Any, steps: int, strength: float) -> StreamSchedule:
    from diffusers import LCMScheduler

    planner = LCMScheduler.from_config(scheduler.config)  # set_timesteps mutates: use a copy
    planner.set_timesteps(num_inference_steps=steps, strength=strength)
    timesteps = [int(t) for t in planner.timesteps]
    if len(timesteps) != steps:
        raise ValueError(f"strength {strength:g} leaves {len(timesteps)} LCM timesteps, not {steps}")
    alphas_cumprod = planner.alphas_cumprod.double()
    alphas = [float(alphas_cumprod[t]) for t in timesteps]
    scalings = [planner.get_scalings_for_boundary_condition_discrete(t) for t in timesteps]
    next_alphas = alphas[1:] + [None]
    return StreamSchedule(
        kind="lcm",
        timesteps=tuple(float(t) for t in timesteps),
        alphas=tuple(alphas),
        c_skip=tuple(float(s[0]) for s in scalings),
        c_out=tuple(float(s[1]) for s in scalings),
        next_signal=tuple(math.sqrt(a) if a is not None else 0.0 for a in next_alphas),
        next_eps=(0.0,) * steps,
        next_noise=tuple(math.sqrt(1.0 - a) if a is not None else 0.0 for a in next_alphas),
        prediction_type=planner.config.prediction_type,
    )


def guidance_embedding(w: float, dim: int, steps: int) -> torch.Tensor:
    """LCM_Dreamshaper's guidance-scale embedding (w = guidance - 1), one row per stage (float32).

    The same formula as ``LatentConsistencyModelPipeline.get_guidance_scale_embedding``.
    """
    w_scaled = torch.full((steps,), float(w) * 1000.0)
    half = dim // 2
    rate = torch.log(torch.tensor(10000.0)) / (half - 1)  # float32, as the pipeline computes it
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -rate)
    emb = w_scaled[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
