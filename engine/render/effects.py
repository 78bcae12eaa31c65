"""The effects chain, as data: each effect is a GLSL file and the parameters bound to it.

A parameter ``/fx/<effect>/<name>`` feeds the uniform ``u_<effect>_<name>`` declared in
``shaders/fx/<effect>.glsl``; ``/fx/<effect>/enabled`` feeds ``u_<effect>_enabled``, and a
disabled effect is skipped in the frame shader. Adding an effect is one entry here, one
GLSL file and its line in ``shaders/frame.frag``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.params import Kind, Param, bool_param, float_param, int_param

Getter = Callable[[str], Any]


@dataclass(frozen=True)
class EffectSpec:
    name: str
    description: str
    params: tuple[Param, ...]
    # uniforms computed on the CPU once per frame instead of per pixel
    derived: Callable[[Getter], dict[str, Any]] | None = field(default=None, compare=False)

    @property
    def shader(self) -> str:
        return f"fx/{self.name}.glsl"

    @property
    def enabled_path(self) -> str:
        return f"/fx/{self.name}/enabled"

    def uniforms(self, get: Getter) -> dict[str, Any]:
        """Uniform values from a parameter getter (``registry.get``)."""
        out: dict[str, Any] = {f"u_{self.name}_enabled": bool(get(self.enabled_path))}
        for p in self.params:
            value = get(p.path)
            out[f"u_{self.name}_{p.name}"] = float(value) if p.kind is Kind.FLOAT else value
        if self.derived is not None:
            out.update(self.derived(get))
        return out

    def all_params(self) -> tuple[Param, ...]:
        return (bool_param(self.enabled_path, False, description=f"Turn the {self.name} effect on"),) + self.params


def _fx(effect: str, name: str) -> str:
    return f"/fx/{effect}/{name}"


_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def hue_matrix(degrees: float) -> tuple[float, ...]:
    """RGB -> RGB hue rotation (about the YIQ luma axis), column-major for GLSL's mat3."""
    if degrees == 0.0:
        return (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    a = math.radians(degrees)
    rotation = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    m = _YIQ_TO_RGB @ rotation @ _RGB_TO_YIQ
    return tuple(float(v) for v in m.T.ravel())


EFFECTS: tuple[EffectSpec, ...] = (
    EffectSpec(
        "grade",
        "Colour grade: hue, saturation, contrast, brightness",
        (
            float_param(
                _fx("grade", "hue"), 0.0, -180.0, 180.0, unit="deg", smoothing=0.05, description="Hue rotation"
            ),
            float_param(
                _fx("grade", "saturation"), 1.0, 0.0, 3.0, smoothing=0.05, description="0 = grey, 1 = unchanged"
            ),
            float_param(_fx("grade", "contrast"), 1.0, 0.0, 3.0, smoothing=0.05, description="1 = unchanged"),
            float_param(
                _fx("grade", "brightness"), 0.0, -1.0, 1.0, smoothing=0.05, description="Added to every channel"
            ),
        ),
        derived=lambda get: {"u_grade_hue_matrix": hue_matrix(get("/fx/grade/hue"))},
    ),
    EffectSpec(
        "kaleido",
        "Kaleidoscope: mirrored wedges around the centre",
        (
            int_param(_fx("kaleido", "segments"), 6, 1, 32, description="Number of wedges; 1 = off"),
            float_param(
                _fx("kaleido", "rotate"),
                0.0,
                -360.0,
                360.0,
                unit="deg",
                smoothing=0.1,
                description="Rotation of the wedges",
            ),
        ),
    ),
    EffectSpec(
        "rgbshift",
        "RGB shift: red and blue drift apart",
        (
            float_param(
                _fx("rgbshift", "amount"),
                0.0,
                0.0,
                0.1,
                unit="width",
                smoothing=0.05,
                description="Distance between channels, as a fraction of the width",
            ),
            float_param(_fx("rgbshift", "angle"), 0.0, -180.0, 180.0, unit="deg", description="Direction of the shift"),
        ),
    ),
    EffectSpec(
        "pixelate",
        "Pixelate into square cells",
        (
            float_param(
                _fx("pixelate", "size"),
                1.0,
                1.0,
                128.0,
                unit="px",
                smoothing=0.05,
                description="Cell size in output pixels; 1 = off",
            ),
        ),
    ),
    EffectSpec(
        "vignette",
        "Darken the corners",
        (
            float_param(
                _fx("vignette", "amount"), 0.0, 0.0, 1.0, smoothing=0.05, description="0 = off, 1 = black corners"
            ),
            float_param(_fx("vignette", "softness"), 0.4, 0.0, 0.75, description="Width of the fall-off"),
        ),
    ),
)
