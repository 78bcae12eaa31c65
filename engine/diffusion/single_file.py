"""Write a model as one original-layout (CompVis / LDM) ``.safetensors`` checkpoint.

The layout A1111 and ComfyUI share: ``model.diffusion_model.*`` (UNet),
``first_stage_model.*`` (VAE), ``cond_stage_model.transformer.*`` (CLIP text encoder). It is
the inverse of diffusers' single-file conversion, so a fused LCM-LoRA model can be handed to
those tools, and the tests can check ``from_single_file`` loading with a model they build.
The text encoder is always written in the CLIP layout (SD 1.x); diffusers reads that back
for SD 2.x architectures too, the original SD 2.x tools expect OpenCLIP's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from engine.diffusion.loading import DiffusionModel

_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_ATTENTION = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)


def _replace_all(text: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for old, new in pairs:
        text = text.replace(old, new)
    return text


def unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    mapping: Any = DIFFUSERS_TO_LDM_MAPPING  # diffusers types it as dict[str, object]
    direct: dict[str, str] = mapping["unet"]["layers"]
    per = layers_per_block + 1
    up_with_attention = {int(m.group(1)) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in direct:
            new = direct[key]
        elif m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"input_blocks.{int(m[1]) * per + int(m[2]) + 1}.0.{_replace_all(m[3], _RESNET)}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new = f"input_blocks.{int(m[1]) * per + int(m[2]) + 1}.1.{m[3]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_replace_all(m[2], _RESNET)}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"output_blocks.{int(m[1]) * per + int(m[2])}.0.{_replace_all(m[3], _RESNET)}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new = f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            slot = 2 if int(m[1]) in up_with_attention else 1
            new = f"output_blocks.{int(m[1]) * per + layers_per_block}.{slot}.conv.{m[2]}"
        else:
            raise ValueError(f"UNet weight {key} has no place in the original layout")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    mapping: Any = DIFFUSERS_TO_LDM_MAPPING  # diffusers types it as dict[str, object]
    direct: dict[str, str] = mapping["vae"]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in direct:
            new = direct[key]
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = (
                f"decoder.up.{num_blocks - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
            )
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
            new = f"{m[1]}.mid.attn_1.{_replace_all(m[2], _VAE_ATTENTION)}"
            if value.ndim == 2:  # the original attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        else:
            raise ValueError(f"VAE weight {key} has no place in the original layout")
        out["first_stage_model." + new] = value
    return out


def save_single_file(model: DiffusionModel, path: str | Path) -> Path:
    """UNet + VAE (``AutoencoderKL``) + text encoder as one ``.safetensors`` file (weights as they are)."""
    from safetensors.torch import save_file

    if type(model.vae).__name__ != "AutoencoderKL":
        raise ValueError("a single-file checkpoint holds the full VAE (AutoencoderKL), not TAESD")
    state = unet_to_ldm(model.unet.state_dict(), model.unet.config.layers_per_block)
    state.update(vae_to_ldm(model.vae.state_dict(), len(model.vae.config.down_block_types)))
    for key, value in model.text_encoder.state_dict().items():
        # transformers 5 dropped the ``text_model.`` level from CLIPTextModel; the file format keeps it
        key = key if key.startswith(("text_model.", "text_projection")) else "text_model." + key
        state["cond_stage_model.transformer." + key] = value
    path = Path(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))
    return path
