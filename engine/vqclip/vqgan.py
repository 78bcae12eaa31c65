"""taming-transformers VQGAN checkpoints (``.ckpt`` + ``.yaml``) as a diffusers ``VQModel``.

The published VQGANs (``vqgan_imagenet_f16_16384`` and its siblings) are PyTorch Lightning
checkpoints of ``taming.models.vqgan.VQModel``: ``{"state_dict": {...}}`` with keys
``encoder.*``, ``decoder.*``, ``quantize.embedding.weight``, ``quant_conv.*``,
``post_quant_conv.*`` and the training loss ``loss.*``; the ``.yaml`` beside it holds the
architecture (``model.params.ddconfig``, ``n_embed``, ``embed_dim``).

diffusers' ``VQModel`` is the same network (ResNet blocks, single-head attention at the
``attn_resolutions`` levels, asymmetric-padding downsampling, nearest upsampling), so the
weights are renamed into it rather than carried as a copy of taming's code: no
pytorch-lightning, no taming package at run time, and diffusers' attention kernels. The
tests build taming's own Encoder/Decoder, save a real checkpoint and compare the decode.

Lightning checkpoints also pickle training state (callbacks, hyper-parameters) whose
classes are not installed here; ``read_state_dict`` loads the tensors and replaces any
such object with an inert placeholder, so nothing from the file is ever executed.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.diffusion.errors import ModelNotFound

log = logging.getLogger(__name__)

VQGAN_NAME = "vqgan_imagenet_f16_16384"
_HEIBOX = "https://heibox.uni-heidelberg.de/d/a7530b09fed84f80a887/files/?p=%2F"
DOWNLOAD_HINT = (
    f"download {VQGAN_NAME} ({_HEIBOX}ckpts%2Flast.ckpt&dl=1 and {_HEIBOX}configs%2Fmodel.yaml&dl=1) "
    "as model.ckpt and model.yaml into one folder and point vqgan at it"
)
CHECKPOINT_NAMES = ("model.ckpt", "last.ckpt")


def default_vqgan_path() -> Path:
    """Where the scene looks when no path is given: ``$XDG_CACHE_HOME/dreamdeck/vqgan_imagenet_f16_16384``."""
    from engine.diffusion.accel import dreamdeck_cache_dir

    return dreamdeck_cache_dir() / VQGAN_NAME


def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint, yaml) for a ``.ckpt`` (yaml beside it with the same stem, or ``model.yaml``)
    or a folder holding ``model.ckpt`` (or ``last.ckpt``) and ``model.yaml``. Raises ModelNotFound."""
    given = Path(path).expanduser()
    if given.is_dir():
        ckpt = next((given / n for n in CHECKPOINT_NAMES if (given / n).is_file()), None)
        yaml_candidates = [given / "model.yaml"]
    else:
        ckpt = given if given.is_file() else None
        yaml_candidates = [given.with_suffix(".yaml"), given.parent / "model.yaml"]
    if ckpt is None:
        raise ModelNotFound(str(path), f"no VQGAN checkpoint there; {DOWNLOAD_HINT}")
    config = next((y for y in yaml_candidates if y.is_file()), None)
    if config is None:
        raise ModelNotFound(
            str(path), f"the checkpoint has no .yaml config beside it ({yaml_candidates[0].name}); {DOWNLOAD_HINT}"
        )
    return ckpt, config


# -- the architecture ------------------------------------------------------------------------------
def read_config(yaml_path: Path) -> dict[str, Any]:
    """``model.params`` of a taming config: ``ddconfig``, ``n_embed``, ``embed_dim``."""
    import yaml

    with open(yaml_path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    try:
        params = doc["model"]["params"]
        return {
            "ddconfig": dict(params["ddconfig"]),
            "n_embed": int(params["n_embed"]),
            "embed_dim": int(params["embed_dim"]),
        }
    except (KeyError, TypeError) as exc:
        raise ValueError(
            f"{yaml_path} is not a taming VQGAN config (no model.params.ddconfig / n_embed / embed_dim: {exc})"
        ) from None


def vqmodel_config(taming: dict[str, Any]) -> dict[str, Any]:
    """diffusers ``VQModel`` keyword arguments for a taming config (see ``read_config``)."""
    dd = taming["ddconfig"]
    if dd.get("double_z", False):
        raise ValueError("double_z: true is a KL autoencoder config, not a VQGAN")
    if not dd.get("resamp_with_conv", True):
        raise ValueError("resamp_with_conv: false is not supported (every published VQGAN resamples with a conv)")
    mult = list(dd["ch_mult"])
    # taming puts attention in every level whose resolution (of the training size) is listed
    attn = [dd["resolution"] // 2**level in dd["attn_resolutions"] for level in range(len(mult))]
    return {
        "in_channels": dd["in_channels"],
        "out_channels": dd["out_ch"],
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)],
        "block_out_channels": [dd["ch"] * m for m in mult],
        "layers_per_block": dd["num_res_blocks"],
        "latent_channels": dd["z_channels"],
        "num_vq_embeddings": taming["n_embed"],
        "vq_embed_dim": taming["embed_dim"],
        "sample_size": dd["resolution"],
        "norm_num_groups": 32,
    }


# -- the weights -----------------------------------------------------------------------------------
_RENAMES = (  # taming name -> diffusers name, applied in order
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.down\.(\d+)\.attn\.", r"encoder.down_blocks.\1.attentions."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
    (r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
)
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def convert_state_dict(taming_sd: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """Rename a taming VQGAN state dict into diffusers ``VQModel`` names; drops ``loss.*``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in taming_sd.items():
        if key.startswith("loss."):
            continue  # the perceptual loss and discriminator of training
        # decoder levels count up from the output in taming and down from the latent in diffusers
        up = re.match(r"^decoder\.up\.(\d+)\.(block|attn|upsample)\.(.*)$", key)
        if up:
            block = levels - 1 - int(up.group(1))
            part = {"block": "resnets.", "attn": "attentions.", "upsample": "upsamplers.0."}[up.group(2)]
            key = f"decoder.up_blocks.{block}.{part}{up.group(3)}"
        for pattern, replacement in _RENAMES:
            key = re.sub(pattern, replacement, key)
        attn = re.match(r"^(.*\.attentions\.\d+)\.(norm|q|k|v|proj_out)\.(weight|bias)$", key)
        if attn:
            key = f"{attn.group(1)}.{_ATTENTION[attn.group(2)]}.{attn.group(3)}"
            if value.ndim == 4:  # taming's 1x1 convolutions are diffusers' linear layers
                value = value[:, :, 0, 0]
        out[key] = value
    return out


class _Placeholder:
    """Stands in for any pickled object whose class is not a tensor type (Lightning callbacks...)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


_SAFE_GLOBALS = frozenset(
    {  # what tensors, containers and numpy scalars in a checkpoint need; nothing callable beyond
        ("collections", "OrderedDict"),
        ("collections", "defaultdict"),
        ("_codecs", "encode"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch", "Size"),
        ("torch", "device"),
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        *(
            ("builtins", name)
            for name in (
                "set",
                "frozenset",
                "dict",
                "list",
                "tuple",
                "int",
                "float",
                "complex",
                "bool",
                "str",
                "bytes",
                "bytearray",
                "slice",
                "range",
            )
        ),
    }
)


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Resolves tensors, storages, dtypes and plain containers; anything else becomes a ``_Placeholder``."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and (name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        return _Placeholder


class _TensorsOnlyPickle:
    """A ``pickle_module`` for ``torch.load``: the standard one with the restricted Unpickler."""

    Unpickler = _TensorsOnlyUnpickler
    load = staticmethod(pickle.load)
    __name__ = "tensors_only_pickle"


def read_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning checkpoint (or a bare state dict), on the CPU."""
    try:
        data = torch.load(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # training state pickled with classes torch's safe loader refuses: load the tensors only
        log.info("vqgan: %s holds training state; reading its tensors only", ckpt.name)
        data = torch.load(ckpt, map_location="cpu", weights_only=False, pickle_module=_TensorsOnlyPickle)
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or "quantize.embedding.weight" not in state:
        raise ValueError(f"{ckpt} is not a taming VQGAN checkpoint (no quantize.embedding.weight)")
    return state


# -- the model -------------------------------------------------------------------------------------
@dataclass
class Vqgan:
    """A loaded VQGAN: images in [-1, 1] <-> pre-quantisation latents z (``embed_dim`` channels)."""

    model: Any  # diffusers VQModel, eval, no grad on its weights
    source: str = ""

    @property
    def codebook(self) -> torch.Tensor:
        return self.model.quantize.embedding.weight  # (n_embed, embed_dim)

    @property
    def factor(self) -> int:
        """Image pixels per latent cell along one side (16 for the f16 models)."""
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> z (B, embed_dim, H/f, W/f), before quantisation."""
        return self.model.encode(image).latents

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest codebook vectors, with a straight-through gradient back to ``z``."""
        flat = z.movedim(1, -1)
        codebook = self.codebook
        distances = flat.pow(2).sum(-1, keepdim=True) - 2 * flat @ codebook.T + codebook.pow(2).sum(-1)
        nearest = codebook[distances.argmin(-1)]
        return (flat + (nearest - flat).detach()).movedim(-1, 1)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantised latents -> images in about [-1, 1] (post_quant_conv + decoder)."""
        return self.model.decode(z_q, force_not_quantize=True).sample

    def to(self, device: torch.device) -> Vqgan:
        self.model.to(device)
        return self


def build_vqmodel(taming_config: dict[str, Any]) -> Any:
    from diffusers import VQModel

    return VQModel(**vqmodel_config(taming_config))


def load_vqgan(path: str | Path) -> Vqgan:
    """A taming checkpoint (see ``find_checkpoint``) as a ``Vqgan`` on the CPU, float32.

    Raises ModelNotFound when it is not there, ValueError when it is not a VQGAN.
    """
    ckpt, yaml_path = find_checkpoint(path)
    config = read_config(yaml_path)
    model = build_vqmodel(config)
    state = convert_state_dict(read_state_dict(ckpt), levels=len(config["ddconfig"]["ch_mult"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt} does not match {yaml_path.name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval().requires_grad_(False)
    log.info("vqgan: %s (%d codes, f%d)", ckpt, config["n_embed"], 2 ** (len(config["ddconfig"]["ch_mult"]) - 1))
    return Vqgan(model, source=str(ckpt))
