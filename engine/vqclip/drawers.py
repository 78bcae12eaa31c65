"""Drawers: what the CLIP loop optimises, each a different way of making a picture from parameters.

A drawer is a ``torch.nn.Module`` whose parameters are all that Adam moves; ``image()`` turns
them into a (1, 3, H, W) picture in [0, 1] with gradients back to them. Everything else of the
loop (prompts, cutouts, augmentations, the spherical distance loss, the morph on the
compositor) is the same for all of them (``engine.vqclip.optimise``).

- ``VqganDrawer``: a VQGAN latent, quantised to the codebook and decoded (the classic loop).
- ``PixelDrawer``: a grid of ``cells_x`` x ``cells_y`` flat colours, upscaled nearest-neighbour
  (PixelDraw / pixray). The upscaling is a plain repeat, so CLIP sees the crisp blocks and each
  cell gets the summed gradient of its block; with a palette every cell shows its nearest
  palette colour, with a straight-through gradient to the cell and the gradient of the colour
  shown to the palette entry (the palette learns as a VQ codebook does).
- ``FftDrawer``: the picture's Fourier coefficients (an ``rfft2`` grid) scaled by 1/f^decay, in a
  decorrelated colour space, through a sigmoid (Aphantasia, after Lucid's ``fft_image``). Adam
  then moves low frequencies as easily as high ones, which a pixel parameterisation does not:
  the pictures are smooth and coherent at any size, with no decoder.

Every drawer can start from a picture (``from_image``): a restart from the camera, and a drawer
change that carries the current picture over to the new drawer. Only ``VqganDrawer`` needs a
checkpoint; the other two need nothing but CLIP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.vqclip.vqgan import Vqgan

DRAWERS = ("vqgan", "pixel", "fft")

# Lucid's colour correlation (the square root of the ImageNet colour covariance, from its SVD):
# the FFT drawer's three channels are uncorrelated, this mixes them into RGB
COLOR_CORRELATION_SVD_SQRT = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _resized(image: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(1, 3, h, w) -> (1, 3, *hw), anti-aliased; unchanged when it already has that size."""
    if tuple(image.shape[-2:]) == hw:
        return image
    return F.interpolate(image, size=hw, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


class ClampWithGrad(torch.autograd.Function):
    """clamp(x, 0, 1), but the gradient still flows where it would move x back into range."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (grad * (x - x.clamp(0.0, 1.0)) >= 0)


class Drawer(torch.nn.Module):
    """What the loop optimises. Subclasses set ``name``, build their parameters and ``shape``."""

    name = "drawer"
    lr_scale = 1.0  # Adam's step is the scene's lr times this (parameters live on different scales)
    uses_autocast = False  # whether image() may run in half precision (the VQGAN decoder; not FFTs)

    def __init__(self) -> None:
        super().__init__()
        self.shape: tuple[int, int] = (0, 0)  # the image's (H, W)

    def image(self) -> torch.Tensor:
        """(1, 3, H, W) in [0, 1], differentiable in the parameters."""
        raise NotImplementedError

    def from_image(self, image: torch.Tensor) -> None:
        """Set the parameters so that ``image()`` is (close to) this (1, 3, h, w) picture in [0, 1]."""
        raise NotImplementedError

    def resize(self, size: int | tuple[int, int]) -> None:
        """A new image size; the picture carries on (resampled). New parameter tensors: a fresh Adam."""
        with torch.no_grad():
            picture = self.image().float()
        self._build(_hw(size))
        with torch.no_grad():
            self.from_image(picture)

    def constrain(self) -> None:
        """After each step: keep the parameters where the drawer means them to be."""

    def _build(self, hw: tuple[int, int]) -> None:
        raise NotImplementedError


class VqganDrawer(Drawer):
    """A VQGAN latent z: nearest codes (straight-through) -> decoder -> [0, 1]."""

    name = "vqgan"
    uses_autocast = True

    def __init__(self, vqgan: Vqgan, size: int | tuple[int, int] = 256, seed: int = 0) -> None:
        super().__init__()
        self.vqgan = vqgan  # a plain object, not a submodule: its weights are not parameters here
        codebook = vqgan.codebook.float()
        self._z_min = codebook.min(0).values.view(1, -1, 1, 1)
        self._z_max = codebook.max(0).values.view(1, -1, 1, 1)
        self._seed = seed
        self._build(_hw(size))

    def _cells(self, hw: tuple[int, int]) -> tuple[int, int]:
        return max(1, hw[0] // self.vqgan.factor), max(1, hw[1] // self.vqgan.factor)

    def _build(self, hw: tuple[int, int]) -> None:
        """A random codebook vector per latent cell; the image is the largest multiple of the factor within hw."""
        cells = self._cells(hw)
        generator = torch.Generator(device="cpu").manual_seed(self._seed)
        codebook = self.vqgan.codebook
        codes = torch.randint(codebook.shape[0], (cells[0] * cells[1],), generator=generator)
        z = codebook[codes.to(codebook.device)].float().view(1, *cells, -1).permute(0, 3, 1, 2)
        self.z = torch.nn.Parameter(z.contiguous())
        self.shape = (cells[0] * self.vqgan.factor, cells[1] * self.vqgan.factor)

    def image(self) -> torch.Tensor:
        decoded = self.vqgan.decode(self.vqgan.quantize(self.z))
        return ClampWithGrad.apply(decoded.float().add(1).div(2))

    def from_image(self, image: torch.Tensor) -> None:
        """z = the encoder's latent of the picture (at this drawer's size)."""
        pixels = _resized(image.float(), self.shape).to(self.z.device)
        with torch.no_grad():
            self.z.copy_(self.vqgan.encode(pixels * 2 - 1).float())

    def resize(self, size: int | tuple[int, int]) -> None:
        """z is resampled nearest (codes stay codes), rather than re-encoded."""
        cells = self._cells(_hw(size))
        z = F.interpolate(self.z.detach(), size=cells, mode="nearest")
        self.z = torch.nn.Parameter(z.contiguous())
        self.shape = (cells[0] * self.vqgan.factor, cells[1] * self.vqgan.factor)

    def constrain(self) -> None:
        """Stay where the codebook lives (the decoder never saw beyond it)."""
        with torch.no_grad():
            self.z.copy_(torch.maximum(torch.minimum(self.z, self._z_max), self._z_min))


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 8) -> torch.Tensor:
    """(N, 3) -> (k, 3) centres: farthest-first points to start (a palette spread over the
    picture's colours, not k from its commonest one), then a few Lloyd iterations."""
    k = max(1, min(k, points.shape[0]))
    first = int(torch.randint(points.shape[0], (1,), generator=generator))
    chosen = [first]
    distance = (points - points[first]).norm(dim=1)
    for _ in range(k - 1):
        chosen.append(int(distance.argmax()))
        distance = torch.minimum(distance, (points - points[chosen[-1]]).norm(dim=1))
    centres = points[chosen].clone()
    for _ in range(iterations):
        nearest = torch.cdist(points, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, nearest, points)
        counts = torch.bincount(nearest, minlength=k).unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)  # an empty cluster stays put
    return centres


class PixelDrawer(Drawer):
    """``cells_x`` x ``cells_y`` flat colours, each shown as a ``block`` x ``block`` square.

    The image is ``(cells_y * block, cells_x * block)`` with ``block = size // max(cells)``
    (at least 1), so every cell is a whole number of pixels and exactly flat. ``palette`` > 0
    limits the picture to that many (learnt) colours; 0 lets every cell have its own.
    """

    name = "pixel"
    lr_scale = 0.5  # colours live in [0, 1]: the VQGAN's lr would jump them across the range

    def __init__(
        self,
        cells_x: int = 32,
        cells_y: int = 32,
        palette: int = 16,
        size: int | tuple[int, int] = 256,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.cells_x, self.cells_y = max(1, int(cells_x)), max(1, int(cells_y))
        self.palette_size = max(0, min(int(palette), self.cells_x * self.cells_y))
        self._generator = torch.Generator(device="cpu").manual_seed(seed)
        cells = torch.rand(1, 3, self.cells_y, self.cells_x, generator=self._generator)
        self.cells = torch.nn.Parameter(cells.to(device))
        self.palette = torch.nn.Parameter(torch.zeros(self.palette_size, 3, device=device))
        self._fit_palette()
        self._build(_hw(size))

    def _build(self, hw: tuple[int, int]) -> None:
        """Only the block size depends on the image size: the cells and palette carry on unchanged."""
        self.block = max(1, min(hw[0] // self.cells_y, hw[1] // self.cells_x))
        self.shape = (self.cells_y * self.block, self.cells_x * self.block)

    def resize(self, size: int | tuple[int, int]) -> None:
        self._build(_hw(size))

    def colours(self) -> torch.Tensor:
        """(1, 3, cells_y, cells_x): each cell's colour as shown (its palette colour when there is a palette)."""
        if not self.palette_size:
            return self.cells
        flat = self.cells.permute(0, 2, 3, 1).reshape(-1, 3)
        shown = self.palette[torch.cdist(flat.detach(), self.palette.detach()).argmin(1)]
        shown = shown + (flat - flat.detach())  # straight-through: the cell moves as if it were shown
        return shown.view(1, self.cells_y, self.cells_x, 3).permute(0, 3, 1, 2)

    def image(self) -> torch.Tensor:
        colours = self.colours()
        return colours.repeat_interleave(self.block, dim=2).repeat_interleave(self.block, dim=3)

    def from_image(self, image: torch.Tensor) -> None:
        """Each cell = the mean colour of its area of the picture; the palette = its k-means colours."""
        with torch.no_grad():
            cells = F.adaptive_avg_pool2d(image.float().to(self.cells.device), (self.cells_y, self.cells_x))
            self.cells.copy_(cells.clamp(0, 1))
        self._fit_palette()

    def _fit_palette(self) -> None:
        if self.palette_size:
            with torch.no_grad():
                flat = self.cells.detach().permute(0, 2, 3, 1).reshape(-1, 3)
                self.palette.copy_(kmeans(flat, self.palette_size, self._generator))

    def constrain(self) -> None:
        with torch.no_grad():
            self.cells.clamp_(0, 1)
            self.palette.clamp_(0, 1)


def spectrum_scale(hw: tuple[int, int], decay: float) -> torch.Tensor:
    """(H, W//2 + 1): 1 / f^decay over the rfft2 grid (f in cycles per pixel, floored at one cycle
    per image so the mean is finite), normalised so unit coefficients make a unit-variance image."""
    h, w = hw
    fy = torch.fft.fftfreq(h).view(-1, 1)
    fx = torch.fft.rfftfreq(w).view(1, -1)
    freqs = (fx.square() + fy.square()).sqrt()
    scale = freqs.clamp(min=1.0 / max(h, w)).pow(-decay)
    return scale / scale.square().mean().sqrt()


class FftDrawer(Drawer):
    """Aphantasia's image: Fourier coefficients x 1/f^decay -> irfft2 -> decorrelated colour -> sigmoid.

    With random coefficients (the start) each channel's power spectrum falls as 1/f^(2 decay):
    ``decay`` = 1 is the 1/f^2 power of natural images; larger is smoother, smaller finer.
    """

    name = "fft"
    lr_scale = 0.5  # Aphantasia's 0.05 at the scene's default lr

    def __init__(
        self,
        size: int | tuple[int, int] = 256,
        decay: float = 1.0,
        seed: int = 0,
        device: str | torch.device = "cpu",
        std: float = 0.25,
    ) -> None:
        super().__init__()
        self.decay = float(decay)
        self._seed, self._std = seed, std
        correlation = torch.tensor(COLOR_CORRELATION_SVD_SQRT)
        mix = correlation / correlation.norm(dim=0).max()  # Lucid's normalisation: the largest column has norm 1
        self.register_buffer("colour_mix", mix.to(device), persistent=False)
        self.register_buffer("colour_unmix", torch.linalg.inv(mix).to(device), persistent=False)
        self._device = torch.device(device)
        self._build(_hw(size))

    def _build(self, hw: tuple[int, int]) -> None:
        h, w = hw
        self.shape = (h, w)
        self.register_buffer("scale", spectrum_scale(hw, self.decay).to(self._device), persistent=False)
        generator = torch.Generator(device="cpu").manual_seed(self._seed)
        coefficients = torch.randn(1, 3, h, w // 2 + 1, 2, generator=generator) * self._std / math.sqrt(2)
        self.coefficients = torch.nn.Parameter(coefficients.to(self._device))

    def spatial(self) -> torch.Tensor:
        """(1, 3, H, W): the decorrelated channels before the colour mix and the sigmoid."""
        spectrum = torch.view_as_complex(self.coefficients.float()) * self.scale
        return torch.fft.irfft2(spectrum, s=self.shape, norm="ortho")

    def image(self) -> torch.Tensor:
        mixed = torch.einsum("ij,bjhw->bihw", self.colour_mix, self.spatial())
        return torch.sigmoid(mixed)

    def from_image(self, image: torch.Tensor) -> None:
        """The exact inverse of ``image()`` (for colours inside (0.5 %, 99.5 %)): logit, unmix, rfft2, / scale."""
        with torch.no_grad():
            pixels = _resized(image.float().to(self._device), self.shape).clamp(0.005, 0.995)
            spatial = torch.einsum("ij,bjhw->bihw", self.colour_unmix, torch.logit(pixels))
            spectrum = torch.fft.rfft2(spatial, norm="ortho") / self.scale
            self.coefficients.copy_(torch.view_as_real(spectrum))
