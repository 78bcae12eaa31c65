"""IP-Adapter: a style taken from a picture, on the real-time UNet.

diffusers loads the adapter (``_load_ip_adapter_weights``: the image projection and an extra
key/value pair in every cross-attention). What is done here is what a live show needs:

- the image embedding (CLIP vision, ``image_embeds``) is computed off the frame path, on a
  background thread, when the style image changes (like prompt embeddings), and published
  with one reference assignment; the stream copies it into its fixed style input between
  two frames (``StyleBank``);
- the scale is a tensor write: diffusers' ``set_ip_adapter_scale`` sets Python floats that a
  compiled graph guards on (and skips the branch at 0: a data-dependent branch). The adapter's
  value projections ``to_v_ip`` have no bias, so the IP branch ``softmax(q k_ip) v_ip`` scales
  exactly with them: the bank keeps each one's trained weight and writes ``scale * weight``
  into it, the processors' own scale staying 1.0.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


class StyleError(ValueError):
    """A style image or IP-Adapter that cannot play (one line)."""


def random_ip_adapter(unet: Any, image_embed_dim: int, seed: int = 0, tokens: int = 4) -> dict[str, Any]:
    """An IP-Adapter state dict for ``unet`` with random weights (diffusers' test helper's layout)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor
    from diffusers.models.embeddings import ImageProjection

    torch.manual_seed(seed)
    config = unet.config
    cross: dict[str, torch.Tensor] = {}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = config.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(config.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = config.block_out_channels[int(name[len("down_blocks.")])]
        weights = IPAdapterAttnProcessor(
            hidden_size=hidden, cross_attention_dim=config.cross_attention_dim
        ).state_dict()
        cross[f"{key_id}.to_k_ip.weight"] = weights["to_k_ip.0.weight"]
        cross[f"{key_id}.to_v_ip.weight"] = weights["to_v_ip.0.weight"]
        key_id += 2
    projection = ImageProjection(
        cross_attention_dim=config.cross_attention_dim, image_embed_dim=image_embed_dim, num_image_text_embeds=tokens
    ).state_dict()
    image_proj = {
        "proj.weight": projection["image_embeds.weight"],
        "proj.bias": projection["image_embeds.bias"],
        "norm.weight": projection["norm.weight"],
        "norm.bias": projection["norm.bias"],
    }
    return {"image_proj": image_proj, "ip_adapter": cross}


class IPAdapterScale:
    """The adapter's scale as weight writes (see the module docstring)."""

    def __init__(self, unet: Any) -> None:
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for processor in unet.attn_processors.values():
            to_v = getattr(processor, "to_v_ip", None)
            if to_v is None:
                continue
            processor.scale = [1.0] * len(processor.scale)  # fixed: the scale lives in the weights
            for linear in to_v:
                self._layers.append((linear.weight, linear.weight.detach().clone()))
        if not self._layers:
            raise StyleError("the UNet has no IP-Adapter layers")
        self.scale = 1.0

    def set(self, scale: float) -> None:
        if scale == self.scale:
            return
        with torch.no_grad():
            for weight, trained in self._layers:
                weight.copy_(trained * scale)
        self.scale = scale


def load_ip_adapter_weights(unet: Any, state_dict: dict[str, Any]) -> IPAdapterScale:
    """The adapter into the UNet (diffusers' own loader), its scale made a weight write."""
    unet._load_ip_adapter_weights([state_dict])
    return IPAdapterScale(unet)


class StyleBank:
    """The style image's embedding, computed on a background thread when the image changes.

    ``request(image)`` returns at once; ``current`` is the latest published (1, 1, D) embedding
    and ``version`` counts publications (the stream copies a new one in between two frames).
    """

    def __init__(self, image_encoder: Any, feature_extractor: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.image_encoder = image_encoder
        self.feature_extractor = feature_extractor
        self.device, self.dtype = device, dtype
        self.error: str | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="style encoder")
        self._lock = threading.Lock()
        self._key: object = None
        self._pending: Future[None] | None = None
        self._published: tuple[torch.Tensor, int] | None = None
        self.scale: IPAdapterScale | None = None  # the adapter's scale, when the bank came with one (load_ip_adapter)

    @property
    def current(self) -> torch.Tensor | None:
        published = self._published
        return None if published is None else published[0]

    @property
    def version(self) -> int:
        published = self._published
        return 0 if published is None else published[1]

    def request(self, image: np.ndarray | str, key: object = None) -> None:
        """An RGB uint8 image, or an image file; ``key`` names it (the same key: nothing to do)."""
        key = image if isinstance(image, str) else key
        with self._lock:
            if key is not None and key == self._key:
                return
            self._key = key
        self._pending = self._executor.submit(self._encode_and_publish, image, key)

    def wait(self, timeout: float | None = None) -> None:
        if self._pending is not None:
            self._pending.result(timeout)

    def encode(self, image: np.ndarray) -> torch.Tensor:
        """(1, 1, D) ``image_embeds``, as diffusers' ``prepare_ip_adapter_image_embeds`` makes them."""
        from PIL import Image

        pixels = self.feature_extractor(Image.fromarray(image), return_tensors="pt").pixel_values
        encoder_dtype = next(self.image_encoder.parameters()).dtype
        with torch.inference_mode():
            embeds: torch.Tensor = self.image_encoder(pixels.to(self.device, encoder_dtype)).image_embeds
        return embeds[None].to(self.dtype)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _encode_and_publish(self, image: np.ndarray | str, key: object) -> None:
        try:
            if isinstance(image, str):
                image = read_style_image(image)
            embeds = self.encode(image)
        except Exception as exc:  # a bad style image never ends the show: the last style plays on
            self.error = (
                f"style image: {exc}" if isinstance(exc, StyleError) else f"style image: {type(exc).__name__}: {exc}"
            )
            log.warning("%s", self.error)
            with self._lock:
                if self._key == key:
                    self._key = None  # asked again, it is tried again
            return
        self.error = None
        with self._lock:
            if key != self._key:
                return  # a newer image was asked for meanwhile
            self._published = (embeds, self.version + 1)


def read_style_image(path: str) -> np.ndarray:
    import cv2

    image = cv2.imread(path, cv2.IMREAD_COLOR) if path else None
    if image is None:
        raise StyleError(f"{path!r} is missing or unreadable")
    return np.ascontiguousarray(image[..., ::-1])


def split_adapter_source(source: str) -> tuple[str, str, str]:
    """(folder or hub id, subfolder, weight file) of ``hub-id/subfolder/file.safetensors`` or a local file."""
    from pathlib import Path

    path = Path(source).expanduser()
    if path.is_file():
        return str(path.parent), "", path.name
    parts = source.strip("/").split("/")
    if len(parts) < 3 or not parts[-1].endswith((".safetensors", ".bin")):
        raise StyleError(f"IP-Adapter {source!r}: give hub-id/subfolder/file.safetensors or a local file")
    return "/".join(parts[:2]), "/".join(parts[2:-1]), parts[-1]


def save_ip_adapter(state_dict: dict[str, Any], path: Any) -> Any:
    """An IP-Adapter state dict as the .safetensors file diffusers' ``load_ip_adapter`` reads."""
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{part}.{key}": value.contiguous() for part in state_dict for key, value in state_dict[part].items()}
    save_file(flat, str(path))
    return path


def load_ip_adapter(model: Any, source: str, choice: Any) -> StyleBank:
    """The IP-Adapter (and its image encoder, ``image_encoder`` next to the weights) into the
    model's UNet, through diffusers' ``load_ip_adapter``; its StyleBank, with ``.scale``.
    Raises ModelNotFound (one line; the previous scene plays on)."""
    from engine.diffusion.errors import ModelNotFound
    from engine.diffusion.loading import offline

    try:
        folder, subfolder, weight = split_adapter_source(source)
        pipe = model.img2img_pipeline()
        pipe.load_ip_adapter(folder, subfolder=subfolder, weight_name=weight, local_files_only=offline())
    except (OSError, StyleError, ValueError) as exc:
        raise ModelNotFound(source, f"the IP-Adapter could not be loaded ({exc})") from exc
    encoder = pipe.image_encoder.to(device=choice.device, dtype=choice.dtype).eval().requires_grad_(False)
    model.unet.to(device=choice.device, dtype=choice.dtype)
    bank = StyleBank(encoder, pipe.feature_extractor, choice.device, choice.dtype)
    bank.scale = IPAdapterScale(model.unet)
    return bank
