"""CLIP through transformers (the weighted prompt syntax is in ``engine.prompt_syntax``).

``load_clip`` takes a hub id (``openai/clip-vit-base-patch32``, or open_clip weights published
in transformers format such as ``laion/CLIP-ViT-B-32-laion2B-s34B-b79K``) or a local folder
saved with ``save_pretrained``; it resolves names like the diffusion models do, so offline a
missing model raises ``ModelNotFound`` with the one-line message of ``engine.diffusion.loading``.

The embeddings are taken through the vision / text towers and their projections directly
(not ``get_image_features``, whose return type changed between transformers 4 and 5).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from engine.diffusion.errors import ModelNotFound

log = logging.getLogger(__name__)

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
# the normalisation every OpenAI and open_clip ViT was trained with
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Clip:
    model: Any  # transformers CLIPModel, eval, no grad on its weights
    tokenizer: Any
    source: str = ""

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def device(self) -> torch.device:
        return self.model.visual_projection.weight.device

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """(N, projection_dim) text embeddings, float32."""
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        )
        with torch.no_grad():
            out = self.model.text_model(
                input_ids=tokens.input_ids.to(self.device), attention_mask=tokens.attention_mask.to(self.device)
            )
            return self.model.text_projection(out.pooler_output).float()

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1], S = ``image_size`` -> (B, projection_dim) image embeddings (differentiable)."""
        mean = pixels.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = pixels.new_tensor(CLIP_STD).view(1, 3, 1, 1)
        out = self.model.vision_model(pixel_values=(pixels - mean) / std)
        return self.model.visual_projection(out.pooler_output)

    def to(self, device: torch.device) -> Clip:
        self.model.to(device)
        return self


def load_clip(name: str = DEFAULT_CLIP) -> Clip:
    """A hub id or local folder as a ``Clip`` on the CPU, float32. Raises ModelNotFound."""
    from transformers import CLIPModel, CLIPTokenizer

    # the same resolution rules and messages as the diffusion models (hub id / folder / missing)
    from engine.diffusion.loading import ModelSpec, classify_source, how_to_get, offline, require_cached

    name = name.strip() or DEFAULT_CLIP
    kind = classify_source(name)
    if kind == "file":
        raise ModelNotFound(name, "CLIP loads from a transformers folder or hub id, not a single file")
    if kind == "hub":
        require_cached(name, ModelSpec(), "config.json")
    try:
        model = CLIPModel.from_pretrained(name, local_files_only=offline())
        tokenizer = CLIPTokenizer.from_pretrained(name, local_files_only=offline())
    except OSError as exc:  # transformers reports every missing or partial file as an OSError
        how = how_to_get(name, ModelSpec()) if kind == "hub" and offline() else "it could not be loaded"
        raise ModelNotFound(name, f"{how} ({exc})") from exc
    model.eval().requires_grad_(False)
    log.info(
        "clip: %s (%d px, %d-d embeddings)", name, model.config.vision_config.image_size, model.config.projection_dim
    )
    return Clip(model, tokenizer, source=name)
