"""The HUD: a few lines of live state drawn over the window (never into the output).

``hud_lines`` is the text: a pure function of the frame's ``ShowStatus``. The text is
rasterised with OpenCV's built-in Hershey font into an RGBA image, only when it
changes, and drawn with alpha blending in the window's top-left corner.
"""

from __future__ import annotations

import cv2
import moderngl
import numpy as np

from engine.render.shaders import ShaderError, ShaderLibrary, set_uniform
from engine.status import ShowStatus

FONT = cv2.FONT_HERSHEY_SIMPLEX
SCALE = 0.45
LINE_HEIGHT = 18
PAD = 6
MAX_CHARS = 110


def hud_lines(status: ShowStatus) -> list[str]:
    """The HUD's text for one snapshot: figures, scene, memory, source, last control, the
    parts that have something to say, then the errors (``len(status.errors)`` lines, last)."""
    s = status
    figures = f"render {s.fps:5.1f} fps  scene {s.scene_fps:5.1f} fps  dropped {s.dropped_source + s.dropped_scene}"
    if s.rss_mb is not None:
        figures += f"  memory {s.rss_mb:.0f} MB"
    scene = s.scene or "-"
    if s.loading:
        scene += f" ({'preloading' if s.preloading else 'loading'} {s.loading})"
    if not s.scene_realtime:
        scene += f" {s.scene_fps:.1f} img/s"
    if s.scene_status:
        scene += f" [{s.scene_status}]"
    last = s.last_change
    lines = [
        figures,
        f"scene {scene}   preset {s.preset or '-'}",
        f"loaded {', '.join(s.loaded) or '-'} ({s.loaded_mb} of {s.memory_budget_mb} MB)",
        f"source {s.source}",
        f"last control {last.path} = {_short(last.value)} ({last.origin})" if last else "last control -",
    ]
    for part in (*s.controls, *s.outputs):
        if part.status:
            lines.append(part.status if part.status.startswith(part.name) else f"{part.name} {part.status}")
    return lines + [f"error {e}" for e in s.errors]


def _short(value: object) -> str:
    text = f"{value:.3g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 40 else text[:39] + "…"


def render_text(lines: list[str], error_lines: int = 0) -> np.ndarray:
    """RGBA uint8 image of the lines on a translucent panel; the last ``error_lines`` in red."""
    lines = [ln if len(ln) <= MAX_CHARS else ln[: MAX_CHARS - 1] + "…" for ln in lines]
    width = max((cv2.getTextSize(ln, FONT, SCALE, 1)[0][0] for ln in lines), default=0) + 2 * PAD
    height = LINE_HEIGHT * len(lines) + 2 * PAD
    image = np.zeros((height, max(width, 1), 4), np.uint8)
    image[..., 3] = 160
    for i, line in enumerate(lines):
        colour = (255, 90, 90, 255) if i >= len(lines) - error_lines else (235, 235, 235, 255)
        y = PAD + LINE_HEIGHT * (i + 1) - 5
        cv2.putText(image, line.encode("ascii", "replace").decode(), (PAD, y), FONT, SCALE, colour, 1, cv2.LINE_AA)
    return image


class Hud:
    def __init__(self, ctx: moderngl.Context, shaders: ShaderLibrary) -> None:
        self.ctx = ctx
        self.shaders = shaders
        self.lines: list[str] = []
        self._texture: moderngl.Texture | None = None
        self._shown: tuple[tuple[str, ...], int] | None = None
        self.error_lines = 0

    def update(self, lines: list[str], error_lines: int = 0) -> None:
        """Re-rasterise only when the text changed (fps figures are rounded by the caller)."""
        key = (tuple(lines), error_lines)
        self.lines = list(lines)
        self.error_lines = error_lines
        if key == self._shown:
            return
        self._shown = key
        image = render_text(lines, error_lines)
        if self._texture is not None:
            self._texture.release()
        self._texture = self.ctx.texture((image.shape[1], image.shape[0]), 4, image.tobytes())

    def draw(self, window_size: tuple[int, int]) -> None:
        if self._texture is None:
            return
        try:
            program, vao = self.shaders.get("hud.frag")
        except ShaderError:
            return  # the HUD is a convenience; the compositor already reports shader errors
        w, h = self._texture.size
        w, h = min(w, window_size[0]), min(h, window_size[1])
        self.ctx.screen.use()
        self.ctx.screen.viewport = (0, window_size[1] - h, w, h)
        self.ctx.enable(moderngl.BLEND)
        self.ctx.blend_func = moderngl.SRC_ALPHA, moderngl.ONE_MINUS_SRC_ALPHA
        self._texture.use(0)
        set_uniform(program, "u_input", 0)
        vao.render(moderngl.TRIANGLES)
        self.ctx.disable(moderngl.BLEND)
        self.ctx.screen.viewport = (0, 0, *window_size)

    def release(self) -> None:
        if self._texture is not None:
            self._texture.release()
