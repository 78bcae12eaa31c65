"""Models from where real users keep them: a hub id, a local diffusers folder, a single file.

``load_model(ModelSpec(...))`` gives the five parts the hot path needs (UNet, VAE, text
encoder, tokenizer, scheduler) and nothing else: no safety checker, no pipeline object.

- Hub ids go through diffusers' ``from_pretrained``: the first run downloads with progress
  bars into the standard Hugging Face cache; later runs read the cache.
- Offline (``HF_HUB_OFFLINE=1``) nothing is fetched, and a model that is not there raises
  ``ModelNotFound`` with one message: which model, where it was looked for, and the
  command that gets it. The scene lets it propagate, so the previous scene plays on.
- A LoRA (e.g. ``latent-consistency/lcm-lora-sdv1-5``) is loaded, fused into the UNet and
  its adapter layers removed: the hot path then runs a plain UNet, as fast as the base model.
- ``tiny_vae`` swaps in TAESD (``madebyollin/taesd``, an ``AutoencoderTiny``): the VAE is
  most of a one-step frame's cost and TAESD is about 10x cheaper.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from engine.diffusion.device import DeviceChoice
from engine.diffusion.errors import ModelNotFound

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
SchedulerChoice = Literal["auto", "euler", "lcm"]
SUPPORTED_SCHEDULERS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LCMScheduler")


@dataclass(frozen=True)
class ModelSpec:
    """What to load. Every field is a hub id, a local folder or a local file."""

    model: str = "stabilityai/sd-turbo"
    lora: str = ""  # fused into the UNet; "lcm" in its name also selects the LCM scheduler
    tiny_vae: str = ""  # an AutoencoderTiny (TAESD) in place of the model's own VAE
    config: str = ""  # single-file checkpoints: a diffusers folder or hub id with the matching configs
    scheduler: SchedulerChoice = "auto"  # auto: keep Euler / LCM; anything else becomes trailing Euler
    cache_dir: str | None = None  # None: the standard Hugging Face cache (HF_HOME / HF_HUB_CACHE)


@dataclass
class DiffusionModel:
    """The parts of an SD 1.5 / 2.1 / SDXL model that the hot path uses (SDXL: two text encoders)."""

    unet: Any
    vae: Any  # AutoencoderKL or AutoencoderTiny
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    source: str = ""
    extras: dict[str, str] = field(default_factory=dict)  # what was fused or swapped in, for logs
    text_encoder_2: Any = None  # SDXL's second text encoder (CLIPTextModelWithProjection: the pooled embeds)
    tokenizer_2: Any = None

    @property
    def xl(self) -> bool:
        """An SDXL UNet: pooled text embeddings and added time ids go into each call."""
        return self.text_encoder_2 is not None

    def to(self, choice: DeviceChoice) -> DiffusionModel:
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if module is None:
                continue
            if module.dtype == choice.dtype:  # diffusers warns about dtype casts it did not make itself
                module.to(device=choice.device)
            else:
                module.to(device=choice.device, dtype=choice.dtype)
        return self

    def img2img_pipeline(self) -> Any:
        """diffusers' own StableDiffusionImg2ImgPipeline over these parts (baseline, tests, saving);
        SDXL: StableDiffusionXLImg2ImgPipeline, as SDXL-turbo runs it (no aesthetic score)."""
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

        if self.xl:
            xl: Any = StableDiffusionXLImg2ImgPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer,
                tokenizer_2=self.tokenizer_2,
                unet=self.unet,
                scheduler=self.scheduler,
                requires_aesthetics_score=False,
                force_zeros_for_empty_prompt=True,
            )
            xl.set_progress_bar_config(disable=True)
            return xl
        # Any: the pipeline's mixin methods (progress bar, LoRA, saving) are not seen through diffusers' typing
        pipe: Any = StableDiffusionImg2ImgPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        """A standard diffusers folder (model_index.json + one subfolder per part)."""
        self.img2img_pipeline().save_pretrained(folder)


def dtype_argument(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The precision keyword of diffusers' ``from_pretrained``: ``dtype`` where diffusers knows it
    (it warns about ``torch_dtype`` on every load there), ``torch_dtype`` in older versions."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def offline() -> bool:
    """Downloads are off: ``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it only at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or value.strip().lower() in ("1", "on", "yes", "true")


def hub_cache_dir(spec: ModelSpec) -> str:
    from huggingface_hub import constants

    return spec.cache_dir or os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def how_to_get(name: str, spec: ModelSpec) -> str:
    return (
        f"it is not in the Hugging Face cache ({hub_cache_dir(spec)}) and downloads are off "
        f"(HF_HUB_OFFLINE=1). On a machine with network run `hf download {name}` (older "
        f"huggingface_hub: `huggingface-cli download {name}`) and copy the cache here, or "
        "point the model at a local diffusers folder or .safetensors file"
    )


def classify_source(name: str) -> Literal["folder", "file", "hub"]:
    path = Path(name).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "file"
    if name.endswith(SINGLE_FILE_SUFFIXES) or name.startswith((".", "/", "~")) or not HUB_ID.match(name):
        raise ModelNotFound(name, "no such folder or file, and it is not a hub id like org/name")
    return "hub"


def require_cached(name: str, spec: ModelSpec, marker: str) -> None:
    """Offline: refuse early, with the one clear message, if the hub id was never downloaded."""
    from huggingface_hub import try_to_load_from_cache

    if offline() and not isinstance(try_to_load_from_cache(name, marker, cache_dir=hub_cache_dir(spec)), str):
        raise ModelNotFound(name, how_to_get(name, spec))


def load_model(spec: ModelSpec, choice: DeviceChoice) -> DiffusionModel:
    """Load, fuse, pick the scheduler, move to the device. Raises ModelNotFound."""
    # 1. the base model
    model = _load_base(spec, choice.dtype)
    # 2. LoRA, fused and unloaded: a plain UNet again
    if spec.lora:
        _fuse_lora(model, spec, choice.dtype)
    # 3. a scheduler the hot path implements
    model.scheduler = _hot_path_scheduler(model.scheduler, spec)
    # 4. TAESD in place of the full VAE
    if spec.tiny_vae:
        model.vae = load_tiny_vae(spec, choice.dtype)
        model.extras["vae"] = spec.tiny_vae
    # 5. device, precision, inference only
    for module in (model.unet, model.vae, model.text_encoder, model.text_encoder_2):
        if module is not None:
            module.eval().requires_grad_(False)
    return model.to(choice)


def load_pipeline(spec: ModelSpec, dtype: torch.dtype) -> Any:
    """``spec.model`` as diffusers loads it (any pipeline class its model_index.json names;
    a single file as SD 1.5 / 2.1), on the CPU. Raises ModelNotFound with the way to get it."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    kind = classify_source(spec.model)
    local_only = offline()
    try:
        if kind == "file":
            config = spec.config or None
            if config and classify_source(config) == "hub":
                require_cached(config, spec, "model_index.json")
            if config and _is_xl_config(config):  # an SDXL checkpoint (its config folder says so)
                pipe = StableDiffusionXLPipeline.from_single_file(
                    spec.model, config=config, **dtype_argument(dtype), local_files_only=local_only
                )
            else:
                pipe = StableDiffusionPipeline.from_single_file(
                    spec.model,
                    config=config,
                    **dtype_argument(dtype),
                    local_files_only=local_only,
                    cache_dir=spec.cache_dir,
                    safety_checker=None,
                    requires_safety_checker=False,
                )
        else:
            if kind == "hub":
                require_cached(spec.model, spec, "model_index.json")
            pipe = DiffusionPipeline.from_pretrained(
                spec.model,
                **dtype_argument(dtype),
                local_files_only=local_only,
                cache_dir=spec.cache_dir,
                safety_checker=None,
                requires_safety_checker=False,
            )
    except OSError as exc:  # diffusers reports every missing or partial file as an OSError
        if kind == "file" and not spec.config:
            how = (
                "a single-file checkpoint needs the diffusers configs of its architecture: set the "
                "config to a local diffusers folder of the same architecture, or cache the default "
                f"configs first ({exc})"
            )
        elif local_only:
            how = f"{how_to_get(spec.model, spec)} ({exc})"
        else:
            how = f"it could not be loaded ({exc})"
        raise ModelNotFound(spec.model, how) from exc
    return pipe


def _load_base(spec: ModelSpec, dtype: torch.dtype) -> DiffusionModel:
    pipe = load_pipeline(spec, dtype)
    missing = [
        part for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if getattr(pipe, part, None) is None
    ]
    if missing:
        raise ValueError(f"{spec.model} is not an SD 1.5 / 2.1 / SDXL model: it has no {', '.join(missing)}")
    return DiffusionModel(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=pipe.scheduler,
        source=spec.model,
        text_encoder_2=getattr(pipe, "text_encoder_2", None),
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
    )


def _is_xl_config(config: str) -> bool:
    """A local diffusers folder of an SDXL model (its model_index.json names a second text encoder)."""
    index = Path(config).expanduser() / "model_index.json"
    if not index.is_file():
        return "xl" in config.lower()  # a hub id: stabilityai/sdxl-turbo, stable-diffusion-xl-base-1.0
    import json

    return "text_encoder_2" in json.loads(index.read_text(encoding="utf-8"))


def _fuse_lora(model: DiffusionModel, spec: ModelSpec, dtype: torch.dtype) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = model.img2img_pipeline()
    kind = classify_source(spec.lora)
    where: dict[str, Any] = {"local_files_only": offline(), "cache_dir": spec.cache_dir}
    source = spec.lora
    if kind == "file":
        source, where["weight_name"] = str(Path(spec.lora).parent), Path(spec.lora).name
    elif kind == "hub":
        require_cached(spec.lora, spec, "pytorch_lora_weights.safetensors")
    try:
        if model.xl:  # (SDXL's loader: both text encoders, kohya's SDXL keys)
            pipe.load_lora_weights(source, **where)
        else:
            StableDiffusionPipeline.load_lora_weights(pipe, source, **where)
    except OSError as exc:
        raise ModelNotFound(spec.lora, f"the LoRA could not be loaded ({exc})") from exc
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
    model.unet, model.text_encoder = pipe.unet, pipe.text_encoder
    if model.xl:
        model.text_encoder_2 = pipe.text_encoder_2
    model.extras["lora"] = spec.lora
    log.info("fused LoRA %s into %s", spec.lora, spec.model)


def _hot_path_scheduler(scheduler: Any, spec: ModelSpec) -> Any:
    """The named policy: keep Euler / Euler ancestral / LCM; an LCM LoRA or ``lcm`` asks for LCM;
    any other scheduler (PNDM, DDIM of plain SD 1.5) becomes Euler with trailing timesteps."""
    from diffusers import EulerDiscreteScheduler, LCMScheduler

    wanted = spec.scheduler
    if wanted == "auto":
        if "lcm" in spec.lora.lower():
            wanted = "lcm"
        elif type(scheduler).__name__ in SUPPORTED_SCHEDULERS:
            return scheduler
        else:
            wanted = "euler"
    if wanted == "lcm":
        if isinstance(scheduler, LCMScheduler):
            return scheduler
        replacement = LCMScheduler.from_config(scheduler.config)
    elif wanted == "euler":
        if type(scheduler).__name__ in SUPPORTED_SCHEDULERS[:2]:
            return scheduler
        replacement = EulerDiscreteScheduler.from_config(scheduler.config, timestep_spacing="trailing")
    else:
        raise ValueError(f"scheduler {wanted!r} is not one of auto, euler, lcm")
    log.info("scheduler: %s -> %s for the hot path", type(scheduler).__name__, type(replacement).__name__)
    return replacement


def load_tiny_vae(spec: ModelSpec, dtype: torch.dtype) -> Any:
    """``spec.tiny_vae`` (hub id or folder) as an AutoencoderTiny, on the CPU. Raises ModelNotFound."""
    from diffusers import AutoencoderTiny

    kind = classify_source(spec.tiny_vae)
    if kind == "hub":
        require_cached(spec.tiny_vae, spec, "config.json")
    if kind == "file":
        raise ModelNotFound(spec.tiny_vae, "TAESD loads from a diffusers folder or hub id, not a single file")
    try:
        return AutoencoderTiny.from_pretrained(
            spec.tiny_vae, **dtype_argument(dtype), local_files_only=offline(), cache_dir=spec.cache_dir
        )
    except OSError as exc:
        raise ModelNotFound(spec.tiny_vae, f"the tiny VAE could not be loaded ({exc})") from exc
