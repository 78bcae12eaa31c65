"""The classic VQGAN+CLIP loop, one Adam step at a time; every step's image is a frame.

    a drawer's parameters (the only thing optimised; the classic one is a VQGAN latent z
      -> nearest codebook vectors, straight-through gradient
      -> VQGAN decoder -> image in [0, 1], clamped, gradient kept where it points back in)
      -> N random cutouts (random sizes and offsets, flips, noise) at CLIP's input size
      -> CLIP image embeddings
      -> per prompt: weight x mean spherical distance to its text embedding (negative: push away)
      -> Adam on the drawer's parameters; the drawer keeps them in range (z: the codebook's)

This is the loop of Katherine Crowson's VQGAN+CLIP notebook (the one most users know), with
transformers' CLIP and diffusers' VQModel under it. A live prompt change only re-encodes the
text: the parameters and Adam's moments carry on, so the image morphs instead of starting over.
The other drawers (pixel grid, Fourier spectrum: ``engine.vqclip.drawers``) share all of it.
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
from engine.vqclip.drawers import Drawer, VqganDrawer
from engine.vqclip.vqgan import Vqgan


@dataclass(frozen=True)
class Cutouts:
    count: int = 32
    power: float = 1.0  # > 1 favours small cutouts (detail), < 1 large ones (composition)
    noise: float = 0.1  # the most Gaussian noise added to a cutout (0..1 image units)


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
    """One running optimisation: ``step()`` = one Adam step, returning that step's image (uint8).

    What is optimised is a ``Drawer`` (``engine.vqclip.drawers``); a ``Vqgan`` given in its
    place is drawn by a ``VqganDrawer`` of ``size`` (the classic loop). ``set_drawer`` swaps the
    drawer mid-run, carrying the picture over; prompts, cutouts and the step count carry on.
    """

    def __init__(
        self,
        drawer: Drawer | Vqgan,
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
        self.clip = clip
        self.device = clip.device
        self.cutouts = cutouts
        self.autocast = autocast  # bfloat16 / float16 forward passes on a GPU; parameters and Adam stay float32
        self._rng = random.Random(seed)
        self._noise = torch.Generator(device=self.device).manual_seed(seed)
        self.steps = 0
        self.lr = lr
        self.prompts: list[WeightedPrompt] = []
        self._targets = torch.empty(0)
        self._weights = torch.empty(0)
        self.set_prompts(prompts)
        self.drawer = VqganDrawer(drawer, size, seed) if isinstance(drawer, Vqgan) else drawer
        self.size = size  # as asked; the drawer's image is the nearest it can make (``drawer.shape``)
        if init is not None:
            self.drawer.from_image(frame_to_tensor(init, self.drawer.shape, self.device))
        self._new_adam()

    @property
    def z(self) -> torch.Tensor:
        """The VQGAN drawer's latent (the classic loop's name for it)."""
        return self.drawer.z

    # -- live changes ------------------------------------------------------------------------------
    def set_prompts(self, prompts: list[WeightedPrompt]) -> None:
        """New targets; the drawer and Adam's state carry on."""
        self.prompts = list(prompts)
        if prompts:
            self._targets = self.clip.encode_text([p.text for p in prompts])
        self._weights = torch.tensor([p.weight for p in prompts], device=self.device)

    def set_drawer(self, drawer: Drawer, carry: bool = True) -> None:
        """Optimise ``drawer`` (built for this run's size) from now on, started from the current picture."""
        if carry:
            with torch.no_grad():
                drawer.from_image(self._synth().detach())
        self.drawer = drawer
        self._new_adam()

    def set_targets(self, prompts: list[WeightedPrompt], targets: torch.Tensor, weights: torch.Tensor) -> None:
        """Text embeddings (N, D) and their weights (N,) given directly, e.g. a prompt timeline's
        blend of two lines: nothing is encoded; ``prompts`` says what they came from. The drawer
        and Adam carry on."""
        self.prompts = list(prompts)
        self._targets = targets.to(self.device, torch.float32)
        self._weights = weights.to(self.device, torch.float32)

    def resize(self, size: int) -> None:
        """A new image size: the drawer resamples its parameters; optimising goes on with a fresh Adam."""
        self.drawer.resize(size)
        self._new_adam()  # its moments had the old shapes
        self.size = size

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr * self.drawer.lr_scale

    # -- the loop ----------------------------------------------------------------------------------
    def step(self) -> np.ndarray:
        """One Adam step toward the prompts; returns the image the step was taken from."""
        self.optimizer.zero_grad(set_to_none=True)
        image = self._synth()
        if self.prompts:
            self._loss(image, self._rng, self._noise).backward()
            self.optimizer.step()
            self.drawer.constrain()
        self.steps += 1
        return image_to_uint8(image)

    def loss(self, prompts: list[WeightedPrompt] | None = None, seed: int = 0) -> float:
        """The loss of the current picture with fixed cutouts (``seed``): comparable between steps."""
        saved = None
        if prompts is not None:
            saved = (self.prompts, self._targets, self._weights)
            self.set_prompts(prompts)
        try:
            noise = torch.Generator(device=self.device).manual_seed(seed)
            with torch.no_grad():
                return float(self._loss(self._synth(), random.Random(seed), noise))
        finally:
            if saved is not None:
                self.prompts, self._targets, self._weights = saved

    def image(self) -> np.ndarray:
        """The current picture, without stepping."""
        with torch.no_grad():
            return image_to_uint8(self._synth())

    # -- internals ---------------------------------------------------------------------------------
    def _new_adam(self) -> None:
        self.optimizer = torch.optim.Adam(self.drawer.parameters(), lr=self.lr * self.drawer.lr_scale)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _synth(self) -> torch.Tensor:
        context = self._autocast() if self.drawer.uses_autocast else contextlib.nullcontext()
        with context:
            return self.drawer.image().float()

    def _loss(self, image: torch.Tensor, rng: random.Random, noise: torch.Generator) -> torch.Tensor:
        if not self.prompts:
            return image.new_zeros(())
        batch = make_cutouts(image, self.clip.image_size, self.cutouts, rng, noise)
        with self._autocast():
            embeddings = self.clip.encode_image(batch)
        distances = spherical_distance(embeddings.float(), self._targets)  # (cutouts, prompts)
        return (distances.mean(0) * self._weights).sum()
