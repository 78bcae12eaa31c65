"""The source, unchanged: the simplest scene, and the one to read first."""

from __future__ import annotations

import numpy as np

from engine.scenes.base import Scene


class Passthrough(Scene):
    name = "passthrough"
    order = 20
    description = "Shows the source as it is"

    def process(self, frame: np.ndarray | None, t: float) -> np.ndarray | None:
        return frame
