"""The classic VQGAN+CLIP loop, one Adam step at a time; every step's image is a frame.

    z (pre-quantisation latent, the only thing optimised)
      -> nearest codebook vectors, straight-through gradient
      -> VQGAN decoder -> image in [0, 1] (clamped, gradient kept where it points back in)
      -> N random cutouts (random sizes and offsets, flips, noise) at CLIP's input size
      -> CLIP image embeddings
      -> per prompt: weight x mean spherical distance to its text embedding (negative: push away)
      -> Adam on z; z is kept inside the codebook's range

This is the loop of Katherine Crowson's VQGAN+CLIP notebook (the one most users know), with
transformers' CLIP and diffusers' VQModel under it. A live prompt change only re-encodes the
text: z and Adam's moments carry on, so the image morphs instead of starting over.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine.prompt_syntax import WeightedPrompt
from engine.vqclip.clip import Clip
from engine.vqclip.vqgan import Vqgan


@dataclass(frozen=True)
class Cutouts:
    count: int = 32
    power: float = 1.0  # > 1 favours small cutouts (detail), < 1 large ones (composition)
    noise: float = 0.1  # the most Gaussian noise added to a cutout (0..1 image units)


class _ClampWithGrad(torch.autograd.Function):
    """clamp(x, 0, 1), but the gradient still flows where it would move x back into range."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (grad * (x - x.clamp(0.0, 1.0)) >= 0)


def spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared great-circle distance between the directions of a (N, D) and b (M, D): (N, M)."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    chord = (a.unsqueeze(1) - b.unsqueeze(0)).norm(dim=-1)
    return chord.div(2).clamp(max=1.0).arcsin().pow(2).mul(2)


def make_cutouts(
    image: torch.Tensor, size: int, cutouts: Cutouts, rng: random.Random, noise_generator: torch.Generator
) -> torch.Tensor:
    """(1, 3, H, W) -> (count, 3, size, size): random squares, pooled to ``size``, flipped, noised."""
    _, _, h, w = image.shape
    largest = min(h, w)
    smallest = min(h, w, size)
    cuts = []
    for _ in range(cutouts.count):
        side = int(rng.random() ** cutouts.power * (largest - smallest) + smallest)
        x, y = rng.randrange(w - side + 1), rng.randrange(h - side + 1)
        cut = image[:, :, y : y + side, x : x + side]
        if rng.random() < 0.5:
            cut = cut.flip(3)
        cuts.append(F.adaptive_avg_pool2d(cut, size))
    batch = torch.cat(cuts)
    if cutouts.noise > 0:
        amount = (
            torch.rand(batch.shape[0], 1, 1, 1, generator=noise_generator, device=batch.device, dtype=batch.dtype)
            * cutouts.noise
        )
        batch = batch + amount * torch.randn(
            batch.shape, generator=noise_generator, device=batch.device, dtype=batch.dtype
        )
    return batch


def image_to_uint8(image: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] -> (H, W, 3) RGB uint8."""
    return image[0].detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def frame_to_tensor(frame: np.ndarray, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 of any size -> (1, 3, h, w) in [0, 1], resized (anti-aliased) to ``size`` (h, w)."""
    pixels = torch.from_numpy(np.ascontiguousarray(frame[..., :3])).to(device).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


class VqganClip:
    """One running optimisation: ``step()`` = one Adam step, returning that step's image (uint8)."""

    def __init__(
        self,
        vqgan: Vqgan,
        clip: Clip,
        prompts: list[WeightedPrompt],
        *,
        size: int = 256,
        init: np.ndarray | None = None,
        lr: float = 0.1,
        cutouts: Cutouts = Cutouts(),
        seed: int = 0,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.vqgan, self.clip = vqgan, clip
        self.device = clip.device
        self.cutouts = cutouts
        self.autocast = autocast  # bfloat16 / float16 forward passes on a GPU; z and Adam stay float32
        self._rng = random.Random(seed)
        self._noise = torch.Generator(device=self.device).manual_seed(seed)
        codebook = vqgan.codebook.float()
        self._z_min = codebook.min(0).values.view(1, -1, 1, 1)
        self._z_max = codebook.max(0).values.view(1, -1, 1, 1)
        self.steps = 0
        self.size = size  # as asked; the image is the largest multiple of the VQGAN's factor within it
        self.prompts: list[WeightedPrompt] = []
        self._targets = torch.empty(0)
        self._weights = torch.empty(0)
        self.set_prompts(prompts)
        self.z = self._initial_z(size, init, seed).requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.z], lr=lr)

    # -- live changes ------------------------------------------------------------------------------
    def set_prompts(self, prompts: list[WeightedPrompt]) -> None:
        """New targets; z and Adam's state carry on."""
        self.prompts = list(prompts)
        if prompts:
            self._targets = self.clip.encode_text([p.text for p in prompts])
        self._weights = torch.tensor([p.weight for p in prompts], device=self.device)

    def set_targets(self, prompts: list[WeightedPrompt], targets: torch.Tensor, weights: torch.Tensor) -> None:
        """Text embeddings (N, D) and their weights (N,) given directly, e.g. a prompt timeline's
        blend of two lines: nothing is encoded; ``prompts`` says what they came from. z and Adam
        carry on."""
        self.prompts = list(prompts)
        self._targets = targets.to(self.device, torch.float32)
        self._weights = weights.to(self.device, torch.float32)

    def resize(self, size: int) -> None:
        """A new image size: z is resampled (nearest) and optimising goes on with a fresh Adam."""
        cells = max(1, size // self.vqgan.factor)
        lr = self.optimizer.param_groups[0]["lr"]
        z = F.interpolate(self.z.detach(), size=(cells, cells), mode="nearest")
        self.z = z.contiguous().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.z], lr=lr)  # its moments had the old shape
        self.size = size

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # -- the loop ----------------------------------------------------------------------------------
    def step(self) -> np.ndarray:
        """One Adam step toward the prompts; returns the image the step was taken from."""
        self.optimizer.zero_grad(set_to_none=True)
        image = self._synth(self.z)
        if self.prompts:
            self._loss(image, self._rng, self._noise).backward()
            self.optimizer.step()
            with torch.no_grad():  # stay where the codebook lives (the decoder never saw beyond it)
                self.z.copy_(torch.maximum(torch.minimum(self.z, self._z_max), self._z_min))
        self.steps += 1
        return image_to_uint8(image)

    def loss(self, prompts: list[WeightedPrompt] | None = None, seed: int = 0) -> float:
        """The loss of the current z with fixed cutouts (``seed``): comparable between steps."""
        saved = None
        if prompts is not None:
            saved = (self.prompts, self._targets, self._weights)
            self.set_prompts(prompts)
        try:
            with torch.no_grad():
                return float(
                    self._loss(
                        self._synth(self.z), random.Random(seed), torch.Generator(device=self.device).manual_seed(seed)
                    )
                )
        finally:
            if saved is not None:
                self.prompts, self._targets, self._weights = saved

    def image(self) -> np.ndarray:
        """The current z's image, without stepping."""
        with torch.no_grad():
            return image_to_uint8(self._synth(self.z))

    # -- internals ---------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _synth(self, z: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            decoded = self.vqgan.decode(self.vqgan.quantize(z))
        return _ClampWithGrad.apply(decoded.float().add(1).div(2))

    def _loss(self, image: torch.Tensor, rng: random.Random, noise: torch.Generator) -> torch.Tensor:
        if not self.prompts:
            return image.new_zeros(())
        batch = make_cutouts(image, self.clip.image_size, self.cutouts, rng, noise)
        with self._autocast():
            embeddings = self.clip.encode_image(batch)
        distances = spherical_distance(embeddings.float(), self._targets)  # (cutouts, prompts)
        return (distances.mean(0) * self._weights).sum()

    def _initial_z(self, size: int, init: np.ndarray | None, seed: int) -> torch.Tensor:
        """From a frame: its encoding. From noise: a random codebook vector per latent cell."""
        cells = max(1, size // self.vqgan.factor)
        if init is not None:
            pixels = frame_to_tensor(init, (cells * self.vqgan.factor,) * 2, self.device)
            with torch.no_grad():
                return self.vqgan.encode(pixels * 2 - 1).float().detach().clone()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        codes = torch.randint(self.vqgan.codebook.shape[0], (cells * cells,), generator=generator)
        z = self.vqgan.codebook[codes.to(self.device)].float()
        return z.view(1, cells, cells, -1).permute(0, 3, 1, 2).contiguous()
