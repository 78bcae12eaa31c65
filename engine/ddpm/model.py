"""Unconditional DDPM models: the UNet and its training noise schedule, nothing else.

A model is a hub id (``google/ddpm-church-256``), a local diffusers folder in the
``DDPMPipeline`` layout (``unet/`` + ``scheduler/``; the early google/ddpm-* repos keep the
UNet at the top level, which works too), or "" for the texture DDPM the project trains
itself and ships in ``engine/models/ddpm-textures``. Offline, a hub id that was never
downloaded raises ``ModelNotFound`` with the same one-line message as the SD loader
(``engine.diffusion.loading``), whose helpers are reused here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.diffusion.errors import ModelNotFound
from engine.diffusion.loading import ModelSpec, classify_source, dtype_argument, how_to_get, hub_cache_dir, offline

log = logging.getLogger(__name__)

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "models" / "ddpm-textures"

# The shipped model's architecture (32x32 RGB, 4.5 M parameters, 9 MB in float16): four
# levels, attention only at 8x8 and 4x4 where it is cheap. Measured on 2 CPU cores it
# trains about 4x faster than two levels of 64+ channels with attention at 16x16.
TEXTURE_UNET: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 128, 128),
    "norm_num_groups": 16,
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
}
# The cosine schedule (Nichol & Dhariwal 2021) wastes fewer steps on near-pure noise than the
# linear one, which matters at 32x32.
TEXTURE_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "variance_type": "fixed_small",
}


@dataclass
class DdpmModel:
    """A denoiser and the schedule it was trained with."""

    unet: Any  # diffusers UNet2DModel
    schedule: dict[str, Any]  # the scheduler config; DDPM or DDIM schedulers are made from it
    source: str = ""

    @property
    def size(self) -> int:
        size = self.unet.config.sample_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype


def build_unet(config: dict[str, Any] | None = None):
    """A fresh (random-weight) UNet2DModel; the texture architecture by default."""
    from diffusers import UNet2DModel

    return UNet2DModel(**(config or TEXTURE_UNET))


def _layout(folder: Path) -> tuple[str | None, str | None]:
    """(unet subfolder, scheduler subfolder) of a local folder: DDPMPipeline or flat layout."""
    unet = "unet" if (folder / "unet" / "config.json").is_file() else None
    scheduler = "scheduler" if (folder / "scheduler" / "scheduler_config.json").is_file() else None
    return unet, scheduler


def _hub_layouts(name: str, cache_dir: str | None) -> list[tuple[str | None, str | None]]:
    """The layouts to try for a hub repo, from what is cached; offline and not cached: ModelNotFound."""
    from huggingface_hub import try_to_load_from_cache

    def cached(file: str) -> bool:
        return isinstance(try_to_load_from_cache(name, file, cache_dir=cache_dir), str)

    if cached("unet/config.json"):
        return [("unet", "scheduler" if cached("scheduler/scheduler_config.json") else None)]
    if cached("config.json"):
        return [(None, None)]
    if offline():
        raise ModelNotFound(name, how_to_get(name, ModelSpec(model=name, cache_dir=cache_dir)))
    return [("unet", "scheduler"), (None, None)]  # online: diffusers downloads whichever the repo has


def _one_line(exc: BaseException) -> str:
    """diffusers' messages span lines; the show reports one."""
    return " ".join(str(exc).split())


def load_ddpm(
    name: str = "", device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, cache_dir: str | None = None
) -> DdpmModel:
    """Load a DDPM UNet and its schedule for inference. Raises ModelNotFound."""
    from diffusers import DDPMScheduler, UNet2DModel

    source = name or str(SHIPPED_MODEL)
    kind = classify_source(source)  # raises ModelNotFound for a path that is not there
    if kind == "file":
        raise ModelNotFound(source, "a DDPM is a diffusers folder (unet/ + scheduler/) or a hub id, not a file")
    cache = hub_cache_dir(ModelSpec(model=source, cache_dir=cache_dir)) if kind == "hub" else None
    layouts = _hub_layouts(source, cache) if kind == "hub" else [_layout(Path(source).expanduser())]
    where = {"local_files_only": offline(), "cache_dir": cache}
    for attempt, (unet_sub, scheduler_sub) in enumerate(layouts, start=1):
        try:
            unet = UNet2DModel.from_pretrained(source, subfolder=unet_sub, **dtype_argument(dtype), **where)
            schedule = dict(DDPMScheduler.load_config(source, subfolder=scheduler_sub, **where))
            break
        except OSError as exc:  # diffusers reports every missing or partial file as an OSError
            if attempt < len(layouts):
                continue
            if kind == "hub" and offline():
                how = f"{how_to_get(source, ModelSpec(model=source, cache_dir=cache_dir))} ({_one_line(exc)})"
            else:
                how = f"it could not be loaded as a DDPM folder (unet/ + scheduler/): {_one_line(exc)}"
            raise ModelNotFound(source, how) from exc
        except (ValueError, TypeError) as exc:  # a folder of something else (e.g. an SD model's configs)
            raise ModelNotFound(source, f"it is not an unconditional DDPM UNet2DModel: {_one_line(exc)}") from exc
    unet.to(device=device).eval().requires_grad_(False)
    model = DdpmModel(unet=unet, schedule=schedule, source=source)
    log.info(
        "DDPM %s: %dx%d, %.1f M parameters on %s",
        source,
        model.size,
        model.size,
        sum(p.numel() for p in unet.parameters()) / 1e6,
        device,
    )
    return model
