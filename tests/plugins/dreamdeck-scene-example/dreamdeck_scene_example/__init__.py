"""An example dreamdeck scene plugin: the source frame, every other band of rows tinted.

No torch, no GL: a scene is a ``Scene`` subclass with a name, relative parameters and
``process``. The entry point in pyproject.toml is all dreamdeck needs to find it.
"""

from __future__ import annotations

import numpy as np

from engine.params import colour_param, int_param
from engine.scenes import Scene


class Bands(Scene):
    name = "bands"
    description = "The source in horizontal bands, every other one tinted"
    PARAMS = (
        int_param("count", 8, 1, 64, description="How many bands from top to bottom"),
        colour_param("tint", (1.0, 0.3, 0.1), description="The colour the tinted bands are multiplied by"),
    )

    def process(self, frame: np.ndarray | None, t: float) -> np.ndarray | None:
        if frame is None:
            return None
        out = frame.copy()
        rows = np.arange(frame.shape[0]) * self.param("count") // frame.shape[0]
        tinted = rows % 2 == 1
        tint = np.asarray(self.param("tint")[:3], np.float32)
        out[tinted] = (out[tinted] * tint).astype(np.uint8)
        return out
