"""Flow-matching pipelines with random weights: diffusers' own tiny test components, and full sizes.

As for the UNet models (``configs.py``): a forward pass costs the same whatever the weights
are, so the benchmark builds the full-size FLUX.1-schnell, SD3.5 Large (Turbo) and
SANA-Sprint 0.6B transformers and VAEs with random weights and needs no download, and the
tests build the tiny components of diffusers' own pipeline tests
(``tests/pipelines/flux/test_pipeline_flux_img2img.py``,
``stable_diffusion_3/test_pipeline_stable_diffusion_3_img2img.py``,
``sana/test_sana_sprint_img2img.py``). The full-size dicts are the published
``config.json`` files, trimmed to the keys that differ from diffusers' defaults.

Those tests download tiny T5 / CLIP / Gemma tokenizers; these are built here instead, over
byte symbols (``byte_level_tokenizer``), which is all a random-weight text encoder needs.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.diffusion.flow import FlowKind

TINY_FLUX: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": [4, 4, 8],
}
TINY_SD3: dict[str, Any] = {
    "sample_size": 32,
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 1,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 64,
    "out_channels": 4,
}
TINY_SANA: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 1,
    "num_attention_heads": 2,
    "attention_head_dim": 4,
    "num_cross_attention_heads": 2,
    "cross_attention_head_dim": 4,
    "cross_attention_dim": 8,
    "caption_channels": 8,
    "sample_size": 32,
    "qk_norm": "rms_norm_across_heads",
    "guidance_embeds": True,
}
TINY_KL_VAE: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (4,),
    "layers_per_block": 1,
    "norm_num_groups": 1,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "shift_factor": 0.0609,
    "scaling_factor": 1.5035,
}
TINY_DC_AE: dict[str, Any] = {
    "in_channels": 3,
    "latent_channels": 4,
    "attention_head_dim": 2,
    "encoder_block_types": ("ResBlock", "EfficientViTBlock"),
    "decoder_block_types": ("ResBlock", "EfficientViTBlock"),
    "encoder_block_out_channels": (8, 8),
    "decoder_block_out_channels": (8, 8),
    "encoder_qkv_multiscales": ((), (5,)),
    "decoder_qkv_multiscales": ((), (5,)),
    "encoder_layers_per_block": (1, 1),
    "decoder_layers_per_block": [1, 1],
    "downsample_block_type": "conv",
    "upsample_block_type": "interpolate",
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
    "scaling_factor": 0.41407,
}
TINY_CLIP: dict[str, Any] = {
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_size": 32,
    "intermediate_size": 37,
    "layer_norm_eps": 1e-05,
    "num_attention_heads": 4,
    "num_hidden_layers": 5,
    "pad_token_id": 1,
    "vocab_size": 1000,
    "hidden_act": "gelu",
    "projection_dim": 32,
}
TINY_T5: dict[str, Any] = {  # hf-internal-testing/tiny-random-t5, written out
    "vocab_size": 1000,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 37,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
}
TINY_GEMMA2: dict[str, Any] = {
    "head_dim": 16,
    "hidden_size": 8,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "max_position_embeddings": 8192,
    "num_attention_heads": 2,
    "num_hidden_layers": 1,
    "num_key_value_heads": 2,
    "vocab_size": 300,
    "attn_implementation": "eager",
}

# full sizes (transformer, VAE, scheduler): the bench's architectures
FULL_KL_VAE: dict[str, Any] = {
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "sample_size": 1024,
}
FULL: dict[str, dict[str, Any]] = {
    # black-forest-labs/FLUX.1-schnell
    "flux-schnell": {
        "transformer": {
            "attention_head_dim": 128,
            "guidance_embeds": False,
            "in_channels": 64,
            "joint_attention_dim": 4096,
            "num_attention_heads": 24,
            "num_layers": 19,
            "num_single_layers": 38,
            "patch_size": 1,
            "pooled_projection_dim": 768,
            "axes_dims_rope": [16, 56, 56],
        },
        "vae": {**FULL_KL_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159},
        "scheduler": {"shift": 1.0, "use_dynamic_shifting": False},
        "text": (256, 4096, 768),  # (T5 tokens, T5 width, pooled CLIP width)
        "steps": 4,
    },
    # stabilityai/stable-diffusion-3.5-large-turbo
    "sd35-turbo": {
        "transformer": {
            "attention_head_dim": 64,
            "caption_projection_dim": 2432,
            "in_channels": 16,
            "joint_attention_dim": 4096,
            "num_attention_heads": 38,
            "num_layers": 38,
            "out_channels": 16,
            "patch_size": 2,
            "pooled_projection_dim": 2048,
            "pos_embed_max_size": 192,
            "qk_norm": "rms_norm",
            "sample_size": 128,
        },
        "vae": {**FULL_KL_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609},
        "scheduler": {"shift": 3.0},
        "text": (333, 4096, 2048),  # 77 CLIP + 256 T5 tokens
        "steps": 4,
    },
    # Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers
    "sana-sprint": {
        "transformer": {
            "attention_head_dim": 32,
            "caption_channels": 2304,
            "cross_attention_dim": 1152,
            "cross_attention_head_dim": 72,
            "num_attention_heads": 36,
            "num_cross_attention_heads": 16,
            "num_layers": 28,
            "in_channels": 32,
            "out_channels": 32,
            "sample_size": 32,
            "qk_norm": "rms_norm_across_heads",
            "guidance_embeds": True,
        },
        "vae": {"scaling_factor": 0.41407},  # mit-han-lab dc-ae-f32c32-sana-1.0: AutoencoderDC's defaults
        "scheduler": {},
        "text": (300, 2304, 0),  # Gemma-2-2B tokens and width
        "steps": 1,
    },
}
FULL_KINDS: dict[str, FlowKind] = {"flux-schnell": "flux", "sd35-turbo": "sd3", "sana-sprint": "sana_sprint"}


def byte_level_tokenizer(max_length: int, bos: bool = False) -> Any:
    """A fast tokenizer over the 256 bytes (ids 3..258; pad 0, eos 1, unk 2, bos 259), no download.

    It ends a text with eos as T5 does (and starts it with bos, as Gemma does, if ``bos``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from engine.diffusion.configs import _bytes_to_unicode

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({s: 3 + i for i, s in enumerate(_bytes_to_unicode())})
    vocab["<bos>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    single = ("<bos> $A </s>" if bos else "$A </s>").split()
    special = [("</s>", 1), ("<bos>", vocab["<bos>"])] if bos else [("</s>", 1)]
    tokenizer.post_processor = processors.TemplateProcessing(single=" ".join(single), special_tokens=special)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<bos>" if bos else None,
        model_max_length=max_length,
    )


def build_tiny_flow_pipeline(kind: FlowKind, seed: int = 0) -> Any:
    """diffusers' img2img pipeline of ``kind`` over its own tests' tiny components, float32, CPU."""
    import diffusers
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        Gemma2Config,
        Gemma2Model,
        T5Config,
        T5EncoderModel,
    )

    from engine.diffusion.configs import byte_level_clip_tokenizer

    def seeded(make: Any) -> Any:
        torch.manual_seed(seed)
        return make().eval().requires_grad_(False)

    pipe: Any
    if kind == "flux":
        pipe = diffusers.FluxImg2ImgPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
            vae=seeded(lambda: diffusers.AutoencoderKL(**TINY_KL_VAE, latent_channels=1)),
            text_encoder=seeded(lambda: CLIPTextModel(CLIPTextConfig(**TINY_CLIP))),
            tokenizer=byte_level_clip_tokenizer(),
            text_encoder_2=seeded(lambda: T5EncoderModel(T5Config(**TINY_T5))),
            tokenizer_2=byte_level_tokenizer(512),
            transformer=seeded(lambda: diffusers.FluxTransformer2DModel(**TINY_FLUX)),
        )
    elif kind == "sd3":
        pipe = diffusers.StableDiffusion3Img2ImgPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
            vae=seeded(lambda: diffusers.AutoencoderKL(**TINY_KL_VAE, latent_channels=4)),
            text_encoder=seeded(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP))),
            tokenizer=byte_level_clip_tokenizer(),
            text_encoder_2=seeded(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP))),
            tokenizer_2=byte_level_clip_tokenizer(),
            text_encoder_3=seeded(lambda: T5EncoderModel(T5Config(**TINY_T5))),
            tokenizer_3=byte_level_tokenizer(512),
            transformer=seeded(lambda: diffusers.SD3Transformer2DModel(**TINY_SD3)),
        )
    else:
        pipe = diffusers.SanaSprintImg2ImgPipeline(
            tokenizer=byte_level_tokenizer(4096, bos=True),
            text_encoder=seeded(lambda: Gemma2Model(Gemma2Config(**TINY_GEMMA2))),
            vae=seeded(lambda: diffusers.AutoencoderDC(**TINY_DC_AE)),
            transformer=seeded(lambda: diffusers.SanaTransformer2DModel(**TINY_SANA)),
            scheduler=diffusers.SCMScheduler(),
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_full_flow_parts(name: str, device: str | torch.device, dtype: torch.dtype) -> Any:
    """The full-size transformer, VAE and scheduler of a benchmark case (random weights), as a pipeline
    with no text encoders (the bench feeds random prompt embeddings of the right shape)."""
    import diffusers

    spec: Any = FULL[name]
    kind = FULL_KINDS[name]
    transformer: Any
    vae: Any
    with torch.device(device):
        if kind == "flux":
            transformer = diffusers.FluxTransformer2DModel(**spec["transformer"])
            vae = diffusers.AutoencoderKL(**spec["vae"])
        elif kind == "sd3":
            transformer = diffusers.SD3Transformer2DModel(**spec["transformer"])
            vae = diffusers.AutoencoderKL(**spec["vae"])
        else:
            transformer = diffusers.SanaTransformer2DModel(**spec["transformer"])
            vae = diffusers.AutoencoderDC(**spec["vae"])
    for module in (transformer, vae):
        module.to(dtype=dtype).eval().requires_grad_(False)
    if kind == "sana_sprint":
        return diffusers.SanaSprintImg2ImgPipeline(
            tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=diffusers.SCMScheduler()
        )
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**spec["scheduler"])
    if kind == "flux":
        return diffusers.FluxImg2ImgPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=transformer,
        )
    return diffusers.StableDiffusion3Img2ImgPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
        transformer=transformer,
    )
