"""Architectures as plain config dicts, and random-weight models built from them.

A forward pass costs the same whatever the weights are, so the benchmark builds the
full-size SD-turbo (SD 2.1-base) and SD 1.5 architectures with random weights and needs no
download; the tests build diffusers' own tiny test architecture (``block_out_channels=
(32, 64)``, ``cross_attention_dim=32``) the same way. The dicts are the published
``config.json`` files of ``stabilityai/sd-turbo`` and ``stable-diffusion-v1-5``, trimmed to
the keys that differ from the diffusers / transformers defaults.

No tokenizer files can be downloaded either: ``byte_level_clip_tokenizer`` writes a
CLIP BPE vocabulary of the 256 byte symbols (no merges). It tokenises any text the way CLIP
does before merging, which is all a random-weight model needs.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from engine.diffusion.loading import DiffusionModel

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

_EULER_TRAILING = {  # stabilityai/sd-turbo scheduler/scheduler_config.json
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "timestep_type": "discrete",
    "use_karras_sigmas": False,
}
_LCM = {  # SimianLuo/LCM_Dreamshaper_v7 scheduler/scheduler_config.json (also what LCM-LoRA uses)
    "_class_name": "LCMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "original_inference_steps": 50,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
    "clip_sample": False,
}
_SD_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
_SD_UNET_BLOCKS = {
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "sample_size": 64,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


@dataclass(frozen=True)
class Architecture:
    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler: dict[str, Any]
    default_steps: int
    text_encoder_2: dict[str, Any] | None = None  # SDXL: the second (projecting) text encoder


ARCHITECTURES: dict[str, Architecture] = {
    # SD 2.1-base architecture: OpenCLIP ViT-H text encoder (23 layers, width 1024).
    "sd-turbo": Architecture(
        "sd-turbo",
        unet={
            **_SD_UNET_BLOCKS,
            "attention_head_dim": [5, 10, 20, 20],
            "cross_attention_dim": 1024,
            "use_linear_projection": True,
        },
        vae=_SD_VAE,
        text_encoder={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 23,
            "hidden_act": "gelu",
            "projection_dim": 512,
            "vocab_size": 49408,
            "max_position_embeddings": 77,
        },
        scheduler=_EULER_TRAILING,
        default_steps=1,
    ),
    # SD 1.5 architecture with the LCM scheduler: what SD 1.5 + fused LCM-LoRA runs.
    "sd15": Architecture(
        "sd15",
        unet={**_SD_UNET_BLOCKS, "attention_head_dim": 8, "cross_attention_dim": 768},
        vae=_SD_VAE,
        text_encoder={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
            "vocab_size": 49408,
            "max_position_embeddings": 77,
        },
        scheduler=_LCM,
        default_steps=4,
    ),
    # diffusers' own test components (tests/pipelines/stable_diffusion/test_stable_diffusion_img2img.py)
    "tiny": Architecture(
        "tiny",
        unet={
            "block_out_channels": [32, 64],
            "layers_per_block": 2,
            "sample_size": 32,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "cross_attention_dim": 32,
        },
        vae={
            "block_out_channels": [32, 64],
            "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2,
        },
        text_encoder={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 5,
            "vocab_size": 1000,
            "layer_norm_eps": 1e-05,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 1,
        },
        scheduler=_EULER_TRAILING,
        default_steps=1,
    ),
}
_TINY_XL_TEXT = {
    **ARCHITECTURES["tiny"].text_encoder,
    "hidden_act": "gelu",
    "projection_dim": 32,
}
# diffusers' own SDXL test components (tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl_img2img.py),
# without the aesthetic score (SDXL-turbo's 6 time ids: 6 * 8 + 32 = 80)
ARCHITECTURES["tiny-xl"] = Architecture(
    "tiny-xl",
    unet={
        "block_out_channels": [32, 64],
        "layers_per_block": 2,
        "sample_size": 32,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [2, 4],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "transformer_layers_per_block": [1, 2],
        "projection_class_embeddings_input_dim": 80,
        "cross_attention_dim": 64,
    },
    vae={**ARCHITECTURES["tiny"].vae, "sample_size": 128},
    text_encoder=_TINY_XL_TEXT,
    text_encoder_2=_TINY_XL_TEXT,
    scheduler=_EULER_TRAILING,
    default_steps=1,
)
# stabilityai/sdxl-turbo's config.json files, trimmed (its scheduler is Euler ancestral, trailing;
# the benchmark runs plain trailing Euler: the same UNet cost)
ARCHITECTURES["sdxl-turbo"] = Architecture(
    "sdxl-turbo",
    unet={
        "block_out_channels": [320, 640, 1280],
        "layers_per_block": 2,
        "sample_size": 64,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [5, 10, 20],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "transformer_layers_per_block": [1, 2, 10],
        "projection_class_embeddings_input_dim": 2816,
        "cross_attention_dim": 2048,
    },
    vae={**_SD_VAE, "scaling_factor": 0.13025, "force_upcast": True},
    text_encoder={  # CLIP ViT-L
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
        "vocab_size": 49408,
        "max_position_embeddings": 77,
    },
    text_encoder_2={  # OpenCLIP ViT-bigG
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_attention_heads": 20,
        "num_hidden_layers": 32,
        "hidden_act": "gelu",
        "projection_dim": 1280,
        "vocab_size": 49408,
        "max_position_embeddings": 77,
    },
    scheduler=_EULER_TRAILING,
    default_steps=1,
)
SCHEDULERS = {"euler": _EULER_TRAILING, "lcm": _LCM}
TAESD = {  # madebyollin/taesd: diffusers' AutoencoderTiny defaults, written out
    "encoder_block_out_channels": [64, 64, 64, 64],
    "decoder_block_out_channels": [64, 64, 64, 64],
    "num_encoder_blocks": [1, 3, 3, 3],
    "num_decoder_blocks": [3, 3, 3, 1],
    "latent_channels": 4,
    "scaling_factor": 1.0,
}
TINY_TAESD = {
    **TAESD,
    "encoder_block_out_channels": [8, 8, 8, 8],
    "decoder_block_out_channels": [8, 8, 8, 8],
    "num_encoder_blocks": [1, 1, 1, 1],
    "num_decoder_blocks": [1, 1, 1, 1],
}


def _bytes_to_unicode() -> list[str]:
    """CLIP's (and GPT-2's) printable stand-ins for the 256 byte values, in id order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def byte_level_clip_tokenizer() -> CLIPTokenizer:
    """A CLIPTokenizer over byte symbols only (ids < 514), built without any download."""
    from transformers import CLIPTokenizer

    symbols = _bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as folder:  # the slow tokenizer of transformers 4 reads files
        vocab_file, merges_file = Path(folder, "vocab.json"), Path(folder, "merges.txt")
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n", encoding="utf-8")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)


def build_random_model(
    arch: str,
    *,
    scheduler: str | None = None,
    tiny_vae: bool = False,
    time_cond_proj_dim: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> DiffusionModel:
    """An architecture with random weights (float32), as diffusers' tests build theirs.

    ``scheduler``: "euler" (SD-turbo's trailing Euler) or "lcm"; default: the architecture's.
    ``time_cond_proj_dim``: give the UNet LCM_Dreamshaper's guidance embedding.
    ``device``: where the weights are made (a GPU initialises a full-size UNet in a blink).
    """
    import diffusers
    from diffusers import AutoencoderKL, AutoencoderTiny, SchedulerMixin, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = ARCHITECTURES[arch]
    sched_config = SCHEDULERS[scheduler] if scheduler else spec.scheduler
    with torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**spec.unet, time_cond_proj_dim=time_cond_proj_dim)
        torch.manual_seed(seed)
        vae: AutoencoderKL | AutoencoderTiny
        if tiny_vae:
            vae = AutoencoderTiny(**(TINY_TAESD if arch.startswith("tiny") else TAESD))
        else:
            vae = AutoencoderKL(**spec.vae)
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**spec.text_encoder))
        text_encoder_2 = None
        if spec.text_encoder_2 is not None:
            torch.manual_seed(seed + 1)
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**spec.text_encoder_2))
    scheduler_cls: type[SchedulerMixin] = getattr(diffusers, cast(str, sched_config["_class_name"]))
    sched = scheduler_cls.from_config({k: v for k, v in sched_config.items() if k != "_class_name"})
    parts: tuple[Any, ...] = (unet, vae, text_encoder, text_encoder_2)  # Any: diffusers' models are not nn.Modules
    for module in parts:
        if module is not None:
            module.eval().requires_grad_(False)
    return DiffusionModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=byte_level_clip_tokenizer(),
        scheduler=sched,
        source=f"random {arch}" + (" + random TAESD" if tiny_vae else ""),
        text_encoder_2=text_encoder_2,
        tokenizer_2=byte_level_clip_tokenizer() if text_encoder_2 is not None else None,
    )


# -- SDXL (train-lora; the realtime scene plays SD 1.5 / 2.1 only) -----------------------------------
SDXL_UNETS: dict[str, dict[str, Any]] = {
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, trimmed as above
    "sdxl": {
        "block_out_channels": [320, 640, 1280],
        "layers_per_block": 2,
        "sample_size": 128,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [5, 10, 20],
        "transformer_layers_per_block": [1, 2, 10],
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + the 1280 pooled text
    },
    # diffusers' own test components (tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py)
    "tiny-sdxl": {
        "block_out_channels": [2, 4],
        "layers_per_block": 2,
        "sample_size": 32,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [2, 4],
        "transformer_layers_per_block": [1, 2],
        "cross_attention_dim": 64,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 80,  # 6 x 8 + 32
        "norm_num_groups": 1,
    },
}


def build_random_sdxl(seed: int = 0) -> Any:
    """diffusers' tiny SDXL test pipeline (two text encoders, added time ids), random weights,
    byte-level tokenizers: a ``StableDiffusionXLPipeline`` to save and train on."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SDXL_UNETS["tiny-sdxl"])
    torch.manual_seed(seed)
    vae = AutoencoderKL(**{**ARCHITECTURES["tiny"].vae, "sample_size": 128})
    text = CLIPTextConfig(**{**ARCHITECTURES["tiny"].text_encoder, "hidden_act": "gelu", "projection_dim": 32})
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text)
    text_encoder_2 = CLIPTextModelWithProjection(text)
    scheduler = EulerDiscreteScheduler.from_config({k: v for k, v in _EULER_TRAILING.items() if k != "_class_name"})
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=byte_level_clip_tokenizer(),
        tokenizer_2=byte_level_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )
