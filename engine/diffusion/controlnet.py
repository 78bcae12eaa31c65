"""ControlNets on the real-time hot path: the models, their control images, their scales.

A ControlNet slot is (model, type, scale, start, end). The hot path (``hotpath.py``) calls
every ControlNet once per frame, on the same stream batch as the UNet, and sums their
residuals as diffusers' ``MultiControlNetModel`` does; so one ControlNet and one step is
one ControlNet + one UNet call per frame.

The control image is made on the device, in the frame's CUDA stream, from the frame the
UNet sees (already fitted to the model's size), by the slot's type:

    canny    edges (``canny``: a torch Canny, held to OpenCV's in the tests)
    depth    a transformers depth model (Depth Anything V2 Small by default) at its own size
    tile     the frame itself (tile and recolour ControlNets)
    source   the same as tile
    none     a still image from a file (a fixed composition), written once

Scale, start and end are one tensor write each (``stage_scales``): per stream stage ``j``
of ``k`` the scale is ``scale * keep_j``, with diffusers' ``controlnet_keep`` rule
``keep_j = not (j / k < start or (j + 1) / k > end)``. Changing them never recompiles;
adding or removing a ControlNet rebuilds the compiled frame in the background.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from engine.diffusion.loading import dtype_argument, offline
from engine.diffusion.options import CONTROL_TYPES, DEFAULT_DEPTH_MODEL

log = logging.getLogger(__name__)


# the tiny ControlNet of diffusers' own tests (tests/pipelines/controlnet/test_controlnet_img2img.py),
# for the tiny UNet of configs.ARCHITECTURES["tiny"]
TINY_CONTROLNET = {
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "in_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "cross_attention_dim": 32,
    "conditioning_embedding_out_channels": [16, 32],
}


class ControlNetError(ValueError):
    """A ControlNet that cannot play (one line: which slot, which model, why)."""


def stage_scales(scale: float, start: float, end: float, steps: int) -> list[float]:
    """The scale of each stream stage: diffusers' ``controlnet_keep`` over the stream's ``steps``."""
    return [scale * (1.0 - float(j / steps < start or (j + 1) / steps > end)) for j in range(steps)]


def random_controlnet(config: dict[str, Any] | None = None, seed: int = 0, std: float = 1.0) -> Any:
    """A ControlNetModel with random weights everywhere, its zero convolutions too.

    A new ControlNet's output convolutions start at zero (so it changes nothing until
    trained); a test with those could not fail, so every parameter is drawn here.
    """
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet: Any = ControlNetModel(**(config or TINY_CONTROLNET))  # Any: not seen as an nn.Module
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in controlnet.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return controlnet.eval().requires_grad_(False)


def check_fits(controlnet: Any, unet: Any, where: str) -> None:
    """Raise ControlNetError when the ControlNet was made for another base model (an SD 1.5 one on SDXL)."""
    cn, un = controlnet.config, unet.config
    problems = []
    if cn.cross_attention_dim != un.cross_attention_dim:
        problems.append(f"text width {cn.cross_attention_dim}, the model's {un.cross_attention_dim}")
    if list(cn.block_out_channels) != list(un.block_out_channels):
        problems.append(f"blocks {list(cn.block_out_channels)}, the model's {list(un.block_out_channels)}")
    if getattr(cn, "addition_embed_type", None) != getattr(un, "addition_embed_type", None):
        problems.append(f"added embeddings {cn.addition_embed_type}, the model's {un.addition_embed_type}")
    if problems:
        raise ControlNetError(f"{where}: made for another base model ({'; '.join(problems)})")


def load_controlnet(source: str, unet: Any, dtype: torch.dtype, where: str) -> Any:
    """A ControlNetModel from a hub id, a local folder or a single file, checked against the UNet."""
    from diffusers import ControlNetModel

    try:
        path = Path(source)
        if path.is_file():
            controlnet = ControlNetModel.from_single_file(str(path), **dtype_argument(dtype))
        else:
            controlnet = ControlNetModel.from_pretrained(source, **dtype_argument(dtype), local_files_only=offline())
    except Exception as exc:  # whatever the loader raises, the show gets one line
        raise ControlNetError(f"{where}: cannot load {source!r}: {type(exc).__name__}: {exc}") from exc
    check_fits(controlnet, unet, where)
    return controlnet.eval().requires_grad_(False)


# -- preprocessors: uint8 (H, W, 3) on the device -> float (3, H, W) in [0, 1] -----------------------
Preprocessor = Callable[[torch.Tensor], torch.Tensor]


def source_image(pixels: torch.Tensor) -> torch.Tensor:
    """The frame itself, as diffusers' control image processor makes it (no normalising)."""
    return pixels.permute(2, 0, 1).to(torch.float32) / 255.0


_GRAY = (0.299, 0.587, 0.114)  # cv2.COLOR_RGB2GRAY
_TAN_22_5 = math.tan(math.pi / 8)


def canny(pixels: torch.Tensor, low: float = 100.0, high: float = 200.0, iterations: int = 64) -> torch.Tensor:
    """Canny edges of an RGB uint8 (H, W, 3) frame as a float (H, W) map of 0 and 1, on its device.

    OpenCV's steps (``cv2.Canny(gray, low, high)``, aperture 3, L1 gradient): 3x3 Sobel,
    non-maximum suppression along the gradient's direction (4 sectors), double threshold,
    and hysteresis. Hysteresis grows the strong edges through weak ones for a fixed number
    of ``iterations`` (a fixed graph, no host synchronisation), so a weak chain longer than
    that is cut short where OpenCV's flood fill would follow it to the end.
    """
    gray = (pixels.to(torch.float32) * torch.tensor(_GRAY, device=pixels.device)).sum(-1).round()
    image = F.pad(gray[None, None], (1, 1, 1, 1), mode="replicate")  # cv2's BORDER_REPLICATE
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=pixels.device)
    kernels = torch.stack([sobel_x, sobel_x.T])[:, None]
    gx, gy = F.conv2d(image, kernels)[0]
    magnitude = gx.abs() + gy.abs()
    # non-maximum suppression: compare with the two neighbours along the gradient
    m = F.pad(magnitude[None, None], (1, 1, 1, 1))[0, 0]
    height, width = magnitude.shape

    def at(dy: int, dx: int) -> torch.Tensor:
        return m[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]

    ax, ay = gx.abs(), gy.abs()
    horizontal = ay <= ax * _TAN_22_5  # the gradient points along x: compare left and right
    vertical = ay >= ax / _TAN_22_5
    same_sign = (gx * gy) > 0
    # OpenCV: the first neighbour must be strictly less, the second less or equal
    keep_h = (magnitude > at(0, -1)) & (magnitude >= at(0, 1))
    keep_v = (magnitude > at(-1, 0)) & (magnitude >= at(1, 0))
    keep_d1 = (magnitude > at(-1, -1)) & (magnitude > at(1, 1))  # gx, gy of one sign: the main diagonal
    keep_d2 = (magnitude > at(-1, 1)) & (magnitude > at(1, -1))
    diagonal = torch.where(same_sign, keep_d1, keep_d2)
    maximum = torch.where(horizontal, keep_h, torch.where(vertical, keep_v, diagonal))
    candidate = maximum & (magnitude > low)
    edges = (candidate & (magnitude > high)).to(torch.float32)
    weak = candidate.to(torch.float32)
    for _ in range(iterations):
        edges = F.max_pool2d(edges[None, None], 3, stride=1, padding=1)[0, 0] * weak
    # OpenCV leaves the image's outermost pixels unmarked
    edges = F.pad(edges[1:-1, 1:-1], (1, 1, 1, 1))
    return edges


@dataclass
class CannyPreprocessor:
    """Canny edges in three channels (what canny ControlNets are trained on); thresholds live."""

    low: float = 100.0
    high: float = 200.0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return canny(pixels, self.low, self.high).expand(3, -1, -1)


class StillImage:
    """A still control image from a file (type ``none``): read once, fitted once per frame size."""

    def __init__(self, path: str) -> None:
        import cv2

        image = cv2.imread(path, cv2.IMREAD_COLOR) if path else None
        if image is None:
            raise ControlNetError(f"control image {path!r}: missing or unreadable")
        self.path = path
        self.rgb = np.ascontiguousarray(image[..., ::-1])
        self._fitted: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        from engine.diffusion.stream import fit_into

        key = (tuple(pixels.shape), pixels.device)
        if key not in self._fitted:
            fitted = np.empty(tuple(pixels.shape), dtype=np.uint8)
            fit_into(self.rgb, fitted)
            self._fitted[key] = source_image(torch.from_numpy(fitted)).to(pixels.device)
        return self._fitted[key]


class DepthPreprocessor:
    """A transformers depth model (``AutoModelForDepthEstimation``) as a control image.

    The frame is resized to the model's own input size (its image processor's), normalised
    as that processor does, and the predicted depth resized back to the frame's size and
    scaled to [0, 1] (near bright), in three channels: what depth ControlNets are trained on.
    """

    def __init__(self, model: Any, processor: Any, dtype: torch.dtype) -> None:
        self.model = model.eval().requires_grad_(False)
        self.dtype = dtype
        size = processor.size
        self.input_size = (int(size["height"]), int(size["width"]))
        device = next(model.parameters()).device
        self.mean = torch.tensor(processor.image_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std, device=device).view(1, 3, 1, 1)

    @classmethod
    def load(cls, model_id: str, device: torch.device, dtype: torch.dtype) -> DepthPreprocessor:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        try:
            processor = AutoImageProcessor.from_pretrained(model_id, local_files_only=offline())
            model: Any = AutoModelForDepthEstimation.from_pretrained(model_id, dtype=dtype, local_files_only=offline())
            model = model.to(device)
        except Exception as exc:
            raise ControlNetError(f"depth model {model_id!r}: {type(exc).__name__}: {exc}") from exc
        return cls(model, processor, dtype)

    def depth(self, pixels: torch.Tensor) -> torch.Tensor:
        """The model's predicted depth (1, h, w) at its own input size."""
        image = pixels.permute(2, 0, 1)[None].to(torch.float32) / 255.0
        if tuple(image.shape[-2:]) != self.input_size:
            image = F.interpolate(image, self.input_size, mode="bicubic", align_corners=False).clamp(0, 1)
        image = ((image - self.mean) / self.std).to(self.dtype)
        predicted: torch.Tensor = self.model(pixel_values=image).predicted_depth
        return predicted

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        depth = self.depth(pixels).to(torch.float32)[None]
        depth = F.interpolate(depth, tuple(pixels.shape[:2]), mode="bicubic", align_corners=False)[0, 0]
        low, high = depth.amin(), depth.amax()
        return ((depth - low) / (high - low).clamp_min(1e-6)).expand(3, -1, -1)


@dataclass
class ControlUnit:
    """One playing ControlNet slot: the model, how its control image is made, its scales."""

    slot: int
    controlnet: Any
    preprocess: Preprocessor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


def model_mb(module: Any) -> float:
    """A model's declared size: its parameters' and buffers' bytes, in MB."""
    tensors = [*module.parameters(), *module.buffers()]
    return float(sum(t.numel() * t.element_size() for t in tensors)) / 2**20


@dataclass(frozen=True)
class ControlSpec:
    """What a slot asks for: a ControlNet and the control image it gets."""

    model: str
    type: str = "canny"
    image: str = ""  # type "none": the still control image's file
    depth_model: str = DEFAULT_DEPTH_MODEL


@dataclass
class _Loaded:
    spec: ControlSpec
    unit: ControlUnit
    mb: float


class ControlBank:
    """The ControlNet slots of one model: loaded on a background thread, swapped in between frames.

    ``request(slot, spec)`` starts loading (the slot's old ControlNet plays until the new one is
    ready; a bad one is reported and the old one plays on); ``apply(stream)`` between two frames
    hands the stream the playing set when it changed (the stream rebuilds its compiled frame in
    the background). ``budget_mb``: the ControlNets and depth models together; a load that would
    pass it is refused with the figures.
    """

    def __init__(self, unet: Any, device: torch.device, dtype: torch.dtype, budget_mb: float) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.unet, self.device, self.dtype = unet, device, dtype
        self.budget_mb = budget_mb
        self.canny = CannyPreprocessor()  # the thresholds every canny slot shares (live)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="controlnet load")
        self._wanted: dict[int, ControlSpec | None] = {}
        self._pending: dict[int, Any] = {}  # slot -> Future of _Loaded | None
        self._playing: dict[int, _Loaded] = {}
        self._depth: dict[str, tuple[DepthPreprocessor, float]] = {}
        self.errors: dict[int, str] = {}
        self.version = 0  # bumped when the playing set changes

    @property
    def error(self) -> str | None:
        return "; ".join(self.errors[slot] for slot in sorted(self.errors)) or None

    @property
    def used_mb(self) -> float:
        return float(sum(loaded.mb for loaded in self._playing.values()) + sum(mb for _, mb in self._depth.values()))

    def request(self, slot: int, spec: ControlSpec | None) -> None:
        """Ask for a slot's ControlNet (None or an empty model: off); nothing if it is asked for already."""
        if spec is not None and not spec.model:
            spec = None
        if self._wanted.get(slot) == spec:
            return
        self._wanted[slot] = spec
        self._pending[slot] = self._executor.submit(self._load, slot, spec)

    def units(self) -> list[ControlUnit]:
        return [self._playing[slot].unit for slot in sorted(self._playing)]

    def apply(self, stream: Any, scales: dict[int, tuple[float, float, float]]) -> None:
        """Between two frames: finished loads in, scales written (tensor writes)."""
        changed = False
        for slot, future in list(self._pending.items()):
            if not future.done():
                continue
            del self._pending[slot]
            try:
                loaded = future.result()
            except ControlNetError as exc:
                self.errors[slot] = str(exc)
                log.warning("%s", exc)
                continue
            self.errors.pop(slot, None)
            if loaded is None:
                changed |= self._playing.pop(slot, None) is not None
            else:
                self._playing[slot] = loaded
                changed = True
        for slot, (scale, start, end) in scales.items():
            if slot in self._playing:
                unit = self._playing[slot].unit
                if not changed:
                    stream.set_control_scale(slot, scale, start, end)
                else:
                    unit.scale, unit.start, unit.end = scale, start, end
        if changed:
            self.version += 1
            stream.set_controls(self.units())

    def wait(self, timeout: float | None = None) -> None:
        """Block until every requested load is done (tests, the first frame of a preset)."""
        for future in list(self._pending.values()):
            future.exception(timeout)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- the loader thread ----------------------------------------------------------------------
    def _load(self, slot: int, spec: ControlSpec | None) -> _Loaded | None:
        if spec is None:
            return None
        where = f"ControlNet {slot}"
        if spec.type not in CONTROL_TYPES:
            raise ControlNetError(f"{where}: type {spec.type!r} is not one of {', '.join(CONTROL_TYPES)}")
        controlnet = load_controlnet(spec.model, self.unet, self.dtype, where)
        mb = model_mb(controlnet)
        others = sum(loaded.mb for s, loaded in self._playing.items() if s != slot)
        others += sum(size for _, size in self._depth.values())
        if others + mb > self.budget_mb:
            raise ControlNetError(
                f"{where}: {spec.model} needs {mb:.0f} MB, {others:.0f} of the {self.budget_mb:.0f} MB "
                "ControlNet budget are in use: refused"
            )
        controlnet = controlnet.to(self.device)
        preprocess: Preprocessor
        if spec.type == "canny":
            preprocess = self.canny
        elif spec.type == "depth":
            preprocess = self._depth_model(spec.depth_model, where, others + mb)
        elif spec.type == "none":
            try:
                preprocess = StillImage(spec.image)
            except ControlNetError as exc:
                raise ControlNetError(f"{where}: {exc}") from exc
        else:  # tile, source
            preprocess = source_image
        return _Loaded(spec, ControlUnit(slot, controlnet, preprocess), mb)

    def _depth_model(self, model_id: str, where: str, used: float) -> DepthPreprocessor:
        if model_id not in self._depth:
            try:
                depth = DepthPreprocessor.load(model_id, self.device, self.dtype)
            except ControlNetError as exc:
                raise ControlNetError(f"{where}: {exc}") from exc
            mb = model_mb(depth.model)
            if used + mb > self.budget_mb:
                raise ControlNetError(
                    f"{where}: the depth model {model_id} needs {mb:.0f} MB, {used:.0f} of the "
                    f"{self.budget_mb:.0f} MB ControlNet budget are in use: refused"
                )
            self._depth[model_id] = (depth, mb)
        return self._depth[model_id][0]


def random_depth_model(tiny: bool, device: torch.device | str = "cpu", seed: int = 0) -> tuple[Any, Any]:
    """(model, image processor): Depth Anything V2 Small's architecture with random weights (the
    benchmark: the cost without a download), or a tiny one of 28x28 (tests, ``--tiny``)."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    size = 28 if tiny else 518
    if tiny:
        stages: dict[str, Any] = {"out_features": ["stage1", "stage2", "stage3", "stage4"]}
        backbone = Dinov2Config(
            image_size=28,
            patch_size=14,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            reshape_hidden_states=False,
            **stages,
        )
        config = DepthAnythingConfig(
            backbone_config=backbone,
            reassemble_hidden_size=32,
            patch_size=14,
            neck_hidden_sizes=[16, 16, 16, 16],
            fusion_hidden_size=16,
            head_hidden_size=16,
        )
    else:  # depth-anything/Depth-Anything-V2-Small-hf config.json
        backbone = Dinov2Config(
            image_size=518,
            patch_size=14,
            hidden_size=384,
            num_hidden_layers=12,
            num_attention_heads=6,
            reshape_hidden_states=False,
            **cast(dict[str, Any], {"out_indices": [3, 6, 9, 12]}),
        )
        config = DepthAnythingConfig(
            backbone_config=backbone,
            reassemble_hidden_size=384,
            patch_size=14,
            neck_hidden_sizes=[48, 96, 192, 384],
            fusion_hidden_size=64,
            head_hidden_size=32,
        )
    torch.manual_seed(seed)
    with torch.device(device):
        model = DepthAnythingForDepthEstimation(config).eval().requires_grad_(False)
    processor = DPTImageProcessor(  # Depth Anything V2's preprocessing
        size={"height": size, "width": size},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        resample=3,
    )
    return model, processor
