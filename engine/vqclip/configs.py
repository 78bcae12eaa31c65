"""The VQGAN and CLIP architectures as plain configs, and random-weight models built from them.

A step costs the same whatever the weights are, so the benchmark builds the full-size
``vqgan_imagenet_f16_16384`` (its published ``model.yaml``, trimmed to the architecture) and
CLIP ViT-B/32 (transformers' ``CLIPConfig`` defaults are exactly ViT-B/32) with random
weights; the tests build tiny ones. The tokenizer is the byte-level CLIP tokenizer of
``engine.diffusion.configs`` (no vocabulary can be downloaded).
"""

from __future__ import annotations

from typing import Any

import torch

from engine.vqclip.clip import Clip
from engine.vqclip.vqgan import Vqgan, build_vqmodel

F16_16384: dict[str, Any] = {  # vqgan_imagenet_f16_16384 configs/model.yaml, model.params
    "embed_dim": 256,
    "n_embed": 16384,
    "ddconfig": {
        "double_z": False,
        "z_channels": 256,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 128,
        "ch_mult": [1, 1, 2, 2, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [16],
        "dropout": 0.0,
    },
}
TINY_VQGAN: dict[str, Any] = {  # f4, attention at the lowest level (as f16_16384 has), 64 codes
    "embed_dim": 8,
    "n_embed": 64,
    "ddconfig": {
        "double_z": False,
        "z_channels": 8,
        "resolution": 32,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 1, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [8],
        "dropout": 0.0,
    },
}
_BYTE_TOKENS = {"bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513}  # byte_level_clip_tokenizer's
CLIP_VIT_B32: dict[str, Any] = {"text_config": {**_BYTE_TOKENS}, "vision_config": {}, "projection_dim": 512}
TINY_CLIP: dict[str, Any] = {
    "text_config": {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": 1000,
        "max_position_embeddings": 77,
        **_BYTE_TOKENS,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "image_size": 32,
        "patch_size": 8,
    },
    "projection_dim": 16,
}


def taming_yaml(config: dict[str, Any]) -> str:
    """A taming ``model.yaml`` for one of the configs above (what the loader reads)."""
    import yaml

    return yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel", "params": config}})


def build_random_vqgan(config: dict[str, Any] = F16_16384, seed: int = 0, device: str | torch.device = "cpu") -> Vqgan:
    with torch.device(device):
        torch.manual_seed(seed)
        model = build_vqmodel(config)
    model.eval().requires_grad_(False)
    return Vqgan(model, source="random vqgan")


def build_random_clip_model(
    config: dict[str, Any] = CLIP_VIT_B32, seed: int = 0, device: str | torch.device = "cpu"
) -> Any:
    """A ``CLIPModel`` with random weights (save it with ``save_pretrained`` for a folder)."""
    from transformers import CLIPConfig, CLIPModel

    with torch.device(device):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(**config))
    return model.eval().requires_grad_(False)


def build_random_clip(config: dict[str, Any] = CLIP_VIT_B32, seed: int = 0, device: str | torch.device = "cpu") -> Clip:
    from engine.diffusion.configs import byte_level_clip_tokenizer

    return Clip(build_random_clip_model(config, seed, device), byte_level_clip_tokenizer(), source="random clip")
