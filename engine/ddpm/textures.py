"""Procedural textures: the images the shipped DDPM learns to dream.

The project trains its own small DDPM so the ``ddpm`` scene plays offline on a fresh
machine, with no download. Its training set is made here, from a seed, in numpy: marble,
wood, cells, stripes and plasma, each coloured by a random cosine palette
(``a + b * cos(2 pi (c * v + d))``, after Inigo Quilez), so colours stay smooth and varied.
Textures are drawn at twice the output size and shrunk with area filtering, which
anti-aliases them: a DDPM spends its few parameters on what the images really hold.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

KINDS = ("marble", "wood", "cells", "stripes", "plasma")


def value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a cells x cells random grid, upsampled with bicubic filtering."""
    grid = rng.random((cells + 3, cells + 3)).astype(np.float32)
    big = cv2.resize(grid, (size * (cells + 3) // cells,) * 2, interpolation=cv2.INTER_CUBIC)
    off = size // cells  # crop away the border, where cubic filtering is lopsided
    return big[off : off + size, off : off + size]


def fbm(rng: np.random.Generator, size: int, octaves: int = 4, base: int = 3) -> np.ndarray:
    """Fractal noise: octaves of value noise, each twice as fine and half as strong; about [0, 1]."""
    total, weight, norm = np.zeros((size, size), np.float32), 1.0, 0.0
    for octave in range(octaves):
        total += weight * value_noise(rng, size, base * 2**octave)
        norm += weight
        weight *= 0.5
    return total / norm


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in [0, 1)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return x, y


def _marble(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    angle = rng.uniform(0, np.pi)
    along = x * np.cos(angle) + y * np.sin(angle)
    turbulence = rng.uniform(3.0, 6.0) * fbm(rng, size, octaves=4)
    return 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.7, 2.0) * along + turbulence)


def _wood(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    cx, cy = rng.uniform(-0.5, 1.5, 2)
    stretch = rng.uniform(0.2, 1.0)  # rings cut lengthwise look like planks
    r = np.sqrt((x - cx) ** 2 + ((y - cy) * stretch) ** 2)
    rings = r * rng.uniform(2.5, 6.0) + rng.uniform(0.5, 1.5) * fbm(rng, size, octaves=3)
    phase = rings % 1.0
    return phase ** rng.uniform(0.7, 2.5)  # the sharp edge of each ring is the late wood


def _cells(rng: np.random.Generator, size: int) -> np.ndarray:
    """Worley noise: distance to the nearest / second nearest of scattered points."""
    x, y = _grid(size)
    points = rng.random((int(rng.integers(4, 12)), 2)).astype(np.float32)
    # Points repeated on the 3x3 torus, so cells wrap without a seam at the edges.
    tiles = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)], np.float32)
    points = (points[None, :, :] + tiles[:, None, :]).reshape(-1, 2)
    d = np.sqrt((x[..., None] - points[:, 0]) ** 2 + (y[..., None] - points[:, 1]) ** 2)
    d.sort(axis=-1)
    f1, f2 = d[..., 0], d[..., 1]
    if rng.random() < 0.5:
        value = np.clip((f2 - f1) * rng.uniform(4.0, 8.0), 0.0, 1.0)  # bright cells, dark walls
    else:
        value = np.clip(f1 * rng.uniform(2.5, 4.5), 0.0, 1.0)  # glowing seeds
    return value + 0.15 * (fbm(rng, size, octaves=3) - 0.5)


def _stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    angle = rng.uniform(0, np.pi)
    warp = rng.uniform(0.0, 0.25) * (fbm(rng, size, octaves=3) - 0.5)
    along = x * np.cos(angle) + y * np.sin(angle) + warp
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(1.5, 4.0) * along)
    sharpness = rng.uniform(1.0, 6.0)  # soft waves to hard-edged bands
    return 1.0 / (1.0 + np.exp(-sharpness * 2 * (wave - 0.5)))


def _plasma(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    value = np.zeros_like(x)
    for _ in range(3):
        fx, fy = rng.uniform(-3.5, 3.5, 2)
        value += np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))
    cx, cy = rng.random(2)
    value += np.sin(2 * np.pi * rng.uniform(1.5, 4.0) * np.sqrt((x - cx) ** 2 + (y - cy) ** 2))
    return 0.5 + value / 8.0


PATTERNS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "marble": _marble,
    "wood": _wood,
    "cells": _cells,
    "stripes": _stripes,
    "plasma": _plasma,
}


def cosine_palette(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """a + b cos(2 pi (c v + d)): a bright mid-tone, a strong swing, phases apart per channel."""
    a = rng.uniform(0.35, 0.65, 3)
    b = rng.uniform(0.25, 0.5, 3)
    c = rng.choice([0.5, 1.0, 1.0, 1.5]) * np.ones(3) + rng.uniform(-0.1, 0.1, 3)
    d = rng.random() + rng.uniform(0.0, 0.35, 3)
    return a, b, c, d


def colourise(value: np.ndarray, palette: tuple[np.ndarray, ...]) -> np.ndarray:
    a, b, c, d = (np.asarray(p, np.float32) for p in palette)
    rgb = a + b * np.cos(2 * np.pi * (c * value[..., None] + d))
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def texture(rng: np.random.Generator, size: int, kind: str | None = None) -> np.ndarray:
    """One texture, RGB uint8 (size, size, 3); ``kind`` None picks one of KINDS at random."""
    kind = kind or KINDS[int(rng.integers(len(KINDS)))]
    value = PATTERNS[kind](rng, 2 * size)
    rgb = colourise(value, cosine_palette(rng))
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)


def texture_set(count: int, size: int, seed: int) -> np.ndarray:
    """``count`` textures (N, size, size, 3) uint8, the same for the same seed; kinds in turn."""
    rng = np.random.default_rng(seed)
    return np.stack([texture(rng, size, KINDS[i % len(KINDS)]) for i in range(count)])
