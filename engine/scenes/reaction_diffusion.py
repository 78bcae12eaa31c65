"""Gray-Scott reaction-diffusion: a living, GPU-free generative scene.

Two chemicals U and V spread and react (Pearson, "Complex patterns in a simple system",
1993). Bright parts of the source frame feed V, so the pattern grows out of the camera.
Plain numpy on a small grid: it runs on any machine and keeps the default preset alive.
"""

from __future__ import annotations

import cv2
import numpy as np

from engine.params import colour_param, float_param, int_param
from engine.scenes.base import Scene


def laplacian(z: np.ndarray) -> np.ndarray:
    """5-point Laplacian on a torus (the pattern wraps around the edges)."""
    return (np.roll(z, 1, 0) + np.roll(z, -1, 0) + np.roll(z, 1, 1) + np.roll(z, -1, 1)) - 4.0 * z


def gray_scott_step(u: np.ndarray, v: np.ndarray, feed: float, kill: float, du: float = 0.16, dv: float = 0.08) -> None:
    """One explicit Euler step, in place (dt = 1; stable for du, dv < 0.25)."""
    uvv = u * v * v
    u += du * laplacian(u) - uvv + feed * (1.0 - u)
    v += dv * laplacian(v) + uvv - (feed + kill) * v


class ReactionDiffusion(Scene):
    name = "reaction_diffusion"
    order = 10  # F1, and the first scene of a fresh show
    description = "Gray-Scott reaction-diffusion seeded by the bright parts of the source"
    uses_input = False  # it lives on its own; a source frame only feeds it
    max_fps = 60.0
    size = (256, 256)
    PARAMS = (
        float_param("feed", 0.037, 0.01, 0.1, smoothing=0.2, description="Feed rate of U (pattern family)"),
        float_param("kill", 0.06, 0.03, 0.075, smoothing=0.2, description="Kill rate of V (pattern family)"),
        int_param("speed", 8, 1, 40, description="Simulation steps per frame"),
        float_param(
            "source_seed", 0.3, 0.0, 1.0, smoothing=0.1, description="How strongly bright source areas seed the pattern"
        ),
        colour_param("colour_a", (0.02, 0.02, 0.08), description="Colour where V is absent"),
        colour_param("colour_b", (1.0, 0.55, 0.15), description="Colour where V is dense"),
    )

    def load(self) -> None:
        h, w = self.size
        rng = np.random.default_rng(0)
        self.u = np.ones((h, w), np.float32)
        self.v = np.zeros((h, w), np.float32)
        self._seed(rng, 12)
        self._rng = rng

    def unload(self) -> None:
        self.u = self.v = None

    def _seed(self, rng: np.random.Generator, spots: int) -> None:
        h, w = self.size
        for _ in range(spots):
            y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
            self.v[y : y + 8, x : x + 8] = 0.5 + 0.1 * rng.random()
            self.u[y : y + 8, x : x + 8] = 0.5

    def process(self, frame: np.ndarray | None, t: float) -> np.ndarray:
        feed, kill = self.param("feed"), self.param("kill")
        seed = self.param("source_seed")
        if frame is not None and seed > 0:
            small = cv2.resize(frame, (self.size[1], self.size[0]), interpolation=cv2.INTER_AREA)
            luma = small.astype(np.float32).mean(axis=2) / 255.0
            self.v += (0.02 * seed) * np.clip(luma - 0.6, 0.0, 1.0)
        for _ in range(self.param("speed")):
            gray_scott_step(self.u, self.v, feed, kill)
        np.clip(self.u, 0.0, 1.0, out=self.u)
        np.clip(self.v, 0.0, 1.0, out=self.v)
        if self.v.max() < 0.05:  # died out: an unattended gallery piece must never go blank
            self._seed(self._rng, 6)
        a = np.asarray(self.param("colour_a")[:3], np.float32)
        b = np.asarray(self.param("colour_b")[:3], np.float32)
        level = np.clip(self.v * 3.0, 0.0, 1.0)[..., None]
        return ((a + (b - a) * level) * 255.0).astype(np.uint8)
