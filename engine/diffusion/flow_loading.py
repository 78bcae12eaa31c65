"""Flow models from where users keep them, with their memory declared before anything loads.

``load_flow(FlowSpec(...), choice)`` gives diffusers' img2img pipeline of the model (FLUX,
SD3 / SD3.5, SANA-Sprint): the hot path uses its transformer, VAE and scheduler, the prompt
bank its own ``encode_prompt``, and the benchmark the pipeline itself.

- A hub id or a local diffusers folder: ``from_pretrained`` (the family is read from
  ``model_index.json``). Offline (``HF_HUB_OFFLINE=1``) nothing is fetched, and a model that
  is not there is one ``ModelNotFound`` line with the command that gets it.
- A single file: FLUX is published as the transformer alone (``flux1-schnell.safetensors``),
  SD3.5 as the whole model (``sd3.5_large_turbo.safetensors``); the rest comes from ``config``
  (a diffusers folder or hub id of the same model; by default the official one).
- Gated models (FLUX.1-dev, every SD3.5) need their licence accepted on the Hub and a token:
  without one the load stops with that line, before any download.
- ``declared_mb`` is what a model takes on the GPU (weights at bf16 plus working memory),
  from the published sizes, so ``check_fits`` can refuse it with the figures while the
  previous scene plays; ``offload_text`` leaves the text encoders on the CPU between prompts.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.diffusion.device import DeviceChoice
from engine.diffusion.errors import ModelNotFound
from engine.diffusion.flow import FlowKind, check_scheduler, flow_kind
from engine.diffusion.loading import (
    ModelSpec,
    classify_source,
    dtype_argument,
    how_to_get,
    hub_cache_dir,
    offline,
    require_cached,
)

log = logging.getLogger(__name__)

IMG2IMG = {
    "flux": "FluxImg2ImgPipeline",
    "sd3": "StableDiffusion3Img2ImgPipeline",
    "sana_sprint": "SanaSprintImg2ImgPipeline",
}
PIPELINE_KINDS: dict[str, FlowKind] = {
    "FluxPipeline": "flux",
    "FluxImg2ImgPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
    "SanaSprintPipeline": "sana_sprint",
    "SanaSprintImg2ImgPipeline": "sana_sprint",
}
GATED_PREFIXES = ("black-forest-labs/FLUX.1-dev", "stabilityai/stable-diffusion-3")
DEFAULT_CONFIGS: dict[FlowKind, str] = {  # where a single file's other parts come from, by default
    "flux": "black-forest-labs/FLUX.1-schnell",
    "sd3": "stabilityai/stable-diffusion-3.5-large-turbo",
    "sana_sprint": "Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers",
}


@dataclass(frozen=True)
class Footprint:
    """GPU memory of a model in MB: what stays (transformer, VAE, working memory) and its text encoders."""

    transformer_mb: int
    text_mb: int
    vae_mb: int = 200
    working_mb: int = 2000  # activations and the compile's buffers at 512-1024 px

    def total(self, offload_text: bool) -> int:
        return self.transformer_mb + self.vae_mb + self.working_mb + (0 if offload_text else self.text_mb)


# bf16 weights: parameters x 2 bytes (the published parameter counts)
FOOTPRINTS: dict[str, Footprint] = {
    "sana_sprint_0.6b": Footprint(transformer_mb=1200, text_mb=5300, vae_mb=650, working_mb=1500),  # Gemma-2-2B
    "sana_sprint_1.6b": Footprint(transformer_mb=3200, text_mb=5300, vae_mb=650, working_mb=1500),
    "flux.1-schnell": Footprint(transformer_mb=23800, text_mb=9800),  # T5-XXL 9.5 GB + CLIP-L
    "flux.1-dev": Footprint(transformer_mb=23800, text_mb=9800),
    "stable-diffusion-3.5-large": Footprint(transformer_mb=16300, text_mb=11200),  # T5-XXL + CLIP-G + CLIP-L
    "stable-diffusion-3.5-medium": Footprint(transformer_mb=5000, text_mb=11200),
    "sd3.5_large": Footprint(transformer_mb=16300, text_mb=11200),
    "sd3.5_medium": Footprint(transformer_mb=5000, text_mb=11200),
    "flux1-schnell": Footprint(transformer_mb=23800, text_mb=9800),
    "flux1-dev": Footprint(transformer_mb=23800, text_mb=9800),
}


@dataclass(frozen=True)
class FlowSpec:
    model: str
    config: str = ""  # a single file's other parts: a diffusers folder or hub id
    offload_text: bool = False
    cache_dir: str | None = None


class DoesNotFit(ValueError):
    """The model needs more GPU memory than the budget or the GPU has."""


def footprint(spec: FlowSpec) -> Footprint | None:
    """The published footprint of a known model (by the name in its id or file), else None."""
    name = spec.model.lower()
    for key, known in sorted(FOOTPRINTS.items(), key=lambda item: -len(item[0])):
        if key in name:
            return known
    return None


def declared_mb(spec: FlowSpec) -> int:
    """GPU memory the model will take, in MB: the published figure, else its weight files on disk (+2 GB);
    0 when neither is known (nothing can be said before loading)."""
    known = footprint(spec)
    if known is not None:
        return known.total(spec.offload_text)
    path = Path(spec.model).expanduser()
    if path.exists():
        files = [path] if path.is_file() else list(path.rglob("*.safetensors"))
        text = sum(f.stat().st_size for f in files if "text_encoder" in str(f)) if path.is_dir() else 0
        total = sum(f.stat().st_size for f in files) - (text if spec.offload_text else 0)
        return int(total / 2**20) + 2000
    return 0


def check_fits(spec: FlowSpec, budget_mb: int, choice: DeviceChoice) -> int:
    """Refuse (``DoesNotFit``, with the figures and the fixes) a model larger than the budget or the GPU.

    ``budget_mb``: /scene/memory_budget (0: no budget). The free memory is the GPU's own figure
    (CUDA only). Returns the declared MB."""
    need = declared_mb(spec)
    if need == 0:
        return 0
    limits: list[str] = []
    if budget_mb > 0 and need > budget_mb:
        limits.append(f"the budget is {budget_mb} MB (/scene/memory_budget)")
    if choice.is_cuda:
        free, total = torch.cuda.mem_get_info(choice.device)
        if need > free // 2**20:
            limits.append(f"{free // 2**20} of {total // 2**20} MB are free on the GPU")
    if not limits:
        return need
    fixes = []
    if budget_mb > 0 and need > budget_mb:
        fixes.append(f"/scene/memory_budget {need} or more (if the GPU has it)")
    known = footprint(spec)
    if not spec.offload_text and known is not None:
        fixes.append(f"text_offload on ({known.total(True)} MB)")
    fixes.append("a smaller model (SANA-Sprint 0.6B: 8650 MB, SD3.5 Medium: 18400 MB)")
    raise DoesNotFit(
        f"{spec.model} needs about {need} MB of GPU memory, but {' and '.join(limits)}: try {', or '.join(fixes)}"
    )


def is_gated(name: str) -> bool:
    return name.startswith(GATED_PREFIXES)


def require_token(name: str) -> None:
    """A gated hub model that is not cached, with no token: one line saying what to do."""
    from huggingface_hub import get_token, try_to_load_from_cache

    if not is_gated(name) or get_token() is not None:
        return
    if isinstance(try_to_load_from_cache(name, "model_index.json"), str):
        return  # downloaded before: the cache needs no token
    raise ModelNotFound(
        name,
        f"it is gated: accept its licence on https://huggingface.co/{name}, then log in "
        "(`hf auth login`) or set HF_TOKEN",
    )


def model_index(spec: FlowSpec) -> dict[str, Any] | None:
    """The model's model_index.json (a folder's, or a cached hub id's); None for a file or an uncached id."""
    kind = classify_source(spec.model)
    index: Path | None = None
    if kind == "folder":
        index = Path(spec.model).expanduser() / "model_index.json"
    elif kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec.model, "model_index.json", cache_dir=hub_cache_dir(_spec(spec)))
        index = Path(cached) if isinstance(cached, str) else None
    if index is None or not index.is_file():
        return None
    loaded: dict[str, Any] = json.loads(index.read_text(encoding="utf-8"))
    return loaded


def read_kind(spec: FlowSpec) -> FlowKind:
    """The family, from model_index.json (folder or cache) or, for a file or an uncached id, its name."""
    index = model_index(spec)
    if index is not None:
        name = index.get("_class_name", "")
        if name in PIPELINE_KINDS:
            return PIPELINE_KINDS[name]
        raise ValueError(f"{spec.model} is a {name}, not a FLUX, SD3 or SANA-Sprint pipeline")
    lowered = spec.model.lower()
    for needle, found in (("flux", "flux"), ("sd3", "sd3"), ("stable-diffusion-3", "sd3"), ("sana", "sana_sprint")):
        if needle in lowered:
            return found  # type: ignore[return-value]  # the tuple's values are FlowKinds
    raise ValueError(f"{spec.model}: cannot tell whether it is FLUX, SD3 or SANA-Sprint (no model_index.json)")


def _spec(spec: FlowSpec) -> ModelSpec:
    return ModelSpec(model=spec.model, cache_dir=spec.cache_dir)


def load_flow(spec: FlowSpec, choice: DeviceChoice) -> Any:
    """The model's img2img pipeline on the device, inference only. Raises ModelNotFound (missing,
    gated), ValueError (not a flow model, unsupported scheduler)."""
    import diffusers

    kind = read_kind(spec)
    cls: Any = getattr(diffusers, IMG2IMG[kind])
    source = classify_source(spec.model)
    where: dict[str, Any] = {"local_files_only": offline(), "cache_dir": spec.cache_dir, **dtype_argument(choice.dtype)}
    try:
        if source == "file":
            pipe = _load_single_file(kind, spec, cls, where)
        else:
            if source == "hub":
                require_token(spec.model)
                require_cached(spec.model, _spec(spec), "model_index.json")
            pipe = cls.from_pretrained(spec.model, **absent_parts(cls, model_index(spec)), **where)
    except OSError as exc:  # diffusers reports missing, partial and gated files as OSErrors
        text = str(exc)
        if "gated" in text.lower() or "401" in text or "403" in text:
            how = f"it is gated: accept its licence on https://huggingface.co/{spec.model} and log in ({exc})"
        elif offline():
            how = f"{how_to_get(spec.model, _spec(spec))} ({exc})"
        else:
            how = f"it could not be loaded ({exc})"
        raise ModelNotFound(spec.model, how) from exc
    check_scheduler(flow_kind(pipe), pipe.scheduler)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval().requires_grad_(False)
            if not (spec.offload_text and name.startswith("text_encoder")):
                module.to(device=choice.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def absent_parts(cls: Any, index: dict[str, Any] | None) -> dict[str, None]:
    """Parts the pipeline takes that the folder lacks (an SD3.5 without T5, a FLUX without it), as None:
    diffusers refuses a folder with a part missing; the text encoders' check then names it."""
    import inspect

    if index is None:
        return {}
    taken = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    return {name: None for name in taken if index.get(name) in (None, [None, None])}


def _load_single_file(kind: FlowKind, spec: FlowSpec, cls: Any, where: dict[str, Any]) -> Any:
    config = spec.config or DEFAULT_CONFIGS[kind]
    if classify_source(config) == "hub":
        require_token(config)
        require_cached(config, ModelSpec(model=config, cache_dir=spec.cache_dir), "model_index.json")
    if kind == "flux":  # the published file is the transformer alone
        from diffusers import FluxTransformer2DModel

        transformer = FluxTransformer2DModel.from_single_file(
            spec.model, config=config, subfolder="transformer", **where
        )
        return cls.from_pretrained(config, transformer=transformer, **where)
    return cls.from_single_file(spec.model, config=config, **where)


def model_name(path_or_id: str) -> str:
    """A short name for logs and the HUD: the id's or file's last part."""
    return os.path.basename(path_or_id.rstrip("/")) or path_or_id
