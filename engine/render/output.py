"""How the output meets a real room: flips, rotation, fit, keystone and a master fade.

Projectors hang upside down from ceilings, project from behind the screen, or stand off
to one side so the picture lands as a trapezoid. These corrections belong to the window
only: the output framebuffer that recordings, thumbnails and screenshots read stays the
clean picture, so a rotated projector never makes a rotated recording.

Every correction is one 3x3 projective matrix, computed here on the CPU with numpy from
the parameters, that maps a window point to the image point shown there; ``present.frag``
applies it per pixel and paints black outside the image. Composing

    window  --keystone⁻¹-->  virtual screen  --fit-->  picture  --flip, rotate⁻¹-->  image

into one matrix costs nothing per pixel, and one inside-the-image test covers both the
keystone quad and the letterbox bars (the fit rectangle lies inside the quad's square).

Coordinates are window-normalised: (0, 0) is the window's top-left corner, (1, 1) its
bottom-right, x to the right, y down; images use the same convention (row 0 at the top).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import moderngl
import numpy as np

from engine.params import Kind, Param, bool_param, enum_param, float_param
from engine.render.hud import render_text
from engine.render.shaders import ShaderError, ShaderLibrary, set_uniform

if TYPE_CHECKING:
    from engine.render.surface import PreviewWindow

log = logging.getLogger(__name__)

Getter = Callable[[str], Any]
Point = tuple[float, float]

ROTATIONS = ("0", "90", "180", "270")  # degrees clockwise, as seen in the window
FITS = ("letterbox", "stretch")
CORNERS = ("tl", "tr", "br", "bl")  # clockwise from the top-left, as seen in the window
UNIT_SQUARE: tuple[Point, ...] = ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0))  # in CORNERS order
NO_KEYSTONE: tuple[Point, ...] = ((0.0, 0.0),) * 4
KEYSTONE_RANGE = 0.5


def _keystone_params() -> tuple[Param, ...]:
    names = {"tl": "top-left", "tr": "top-right", "br": "bottom-right", "bl": "bottom-left"}
    return tuple(
        float_param(
            f"/output/keystone/{corner}_{axis}",
            0.0,
            -KEYSTONE_RANGE,
            KEYSTONE_RANGE,
            description=f"Keystone: move the {names[corner]} corner of the picture, as seen in the "
            f"window, along {axis} (in window widths/heights; +x right, +y down)",
        )
        for corner in CORNERS
        for axis in ("x", "y")
    )


OUTPUT_PARAMS: tuple[Param, ...] = (
    bool_param("/output/flip_x", False, description="Mirror the window's picture left-right (rear projection)"),
    bool_param("/output/flip_y", False, description="Mirror the window's picture top-bottom"),
    enum_param(
        "/output/rotate",
        "0",
        ROTATIONS,
        description="Rotate the window's picture clockwise, in degrees (ceiling projectors: 180)",
    ),
    enum_param(
        "/output/fit",
        "letterbox",
        FITS,
        description="letterbox: whole picture at its aspect ratio, black bars; stretch: fill the window",
    ),
    *_keystone_params(),
    # a fade the schedules and the performer ride: not part of a look, so not in presets
    Param(
        "/output/master",
        Kind.FLOAT,
        1.0,
        0.0,
        1.0,
        smoothing=0.1,
        in_presets=False,
        description="Master fade of the window: 0 is black, 1 the full picture",
    ),
)


class KeystoneError(ValueError):
    """Keystone corners that do not make a convex quad, so no picture can map onto them."""


def homography(src: tuple[Point, ...], dst: tuple[Point, ...]) -> np.ndarray:
    """The 3x3 projective map taking four points ``src`` onto four points ``dst``.

    The classic direct linear solve with h33 = 1: two equations per point pair.
    Raises KeystoneError when the points are degenerate (three on a line).
    """
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        rows.append([x, y, 1.0, 0.0, 0.0, 0.0, -u * x, -u * y])
        rows.append([0.0, 0.0, 0.0, x, y, 1.0, -v * x, -v * y])
        rhs.extend([u, v])
    try:
        h = np.linalg.solve(np.array(rows), np.array(rhs))
    except np.linalg.LinAlgError:
        raise KeystoneError("keystone corners are degenerate (three on one line)") from None
    return np.append(h, 1.0).reshape(3, 3)


def keystone_quad(offsets: tuple[Point, ...]) -> tuple[Point, ...]:
    """Where the picture's corners land in the window: the window's corners plus the offsets."""
    return tuple((cx + dx, cy + dy) for (cx, cy), (dx, dy) in zip(UNIT_SQUARE, offsets, strict=True))


def check_convex(quad: tuple[Point, ...]) -> None:
    """Refuse a quad that is not convex and clockwise on screen (a twisted or folded keystone)."""
    pts = np.array(quad)
    for i in range(4):
        a, b, c = pts[i], pts[(i + 1) % 4], pts[(i + 2) % 4]
        e1, e2 = b - a, c - b
        if e1[0] * e2[1] - e1[1] * e2[0] <= 1e-6:
            raise KeystoneError(
                f"keystone corners must form a convex quad (the turn at {CORNERS[(i + 1) % 4]} folds the picture over)"
            )


def _flip_rotate(flip_x: bool, flip_y: bool, rotate: int) -> np.ndarray:
    """Picture point (as seen) -> image point: undo the screen-axis mirrors, then the rotation."""
    # inverse of a clockwise rotation by `rotate` degrees, on the unit square
    inverse_rotation = {
        0: [[1, 0, 0], [0, 1, 0]],
        90: [[0, 1, 0], [-1, 0, 1]],  # image top-left shows at the window's top-right
        180: [[-1, 0, 1], [0, -1, 1]],
        270: [[0, -1, 1], [1, 0, 0]],
    }[rotate]
    r = np.vstack([np.array(inverse_rotation, float), [0.0, 0.0, 1.0]])
    mirror = np.diag([-1.0 if flip_x else 1.0, -1.0 if flip_y else 1.0, 1.0])
    mirror[0, 2], mirror[1, 2] = float(flip_x), float(flip_y)
    return r @ mirror


def _fit(fit: str, picture_size: tuple[float, float], window_size: tuple[int, int]) -> np.ndarray:
    """Virtual-screen point -> picture point: letterbox keeps the picture's aspect ratio."""
    if fit == "stretch":
        return np.eye(3)
    scale = min(window_size[0] / picture_size[0], window_size[1] / picture_size[1])
    rw = picture_size[0] * scale / window_size[0]
    rh = picture_size[1] * scale / window_size[1]
    return np.array([[1 / rw, 0.0, -(1 - rw) / (2 * rw)], [0.0, 1 / rh, -(1 - rh) / (2 * rh)], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class OutputTransform:
    """The window's corrections, as plain values (the identity by default)."""

    flip_x: bool = False
    flip_y: bool = False
    rotate: int = 0  # degrees clockwise: 0, 90, 180 or 270
    fit: str = "letterbox"
    keystone: tuple[Point, ...] = field(default=NO_KEYSTONE)  # offsets of tl, tr, br, bl
    master: float = 1.0

    def __post_init__(self) -> None:
        if self.rotate not in (0, 90, 180, 270):
            raise ValueError(f"rotate must be 0, 90, 180 or 270, not {self.rotate!r}")
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {', '.join(FITS)}, not {self.fit!r}")
        if len(self.keystone) != 4:
            raise ValueError("keystone needs four corner offsets (tl, tr, br, bl)")

    @classmethod
    def from_params(cls, get: Getter) -> OutputTransform:
        """Read the ``/output/...`` parameters (``registry.get``)."""
        return cls(
            flip_x=bool(get("/output/flip_x")),
            flip_y=bool(get("/output/flip_y")),
            rotate=int(get("/output/rotate")),
            fit=str(get("/output/fit")),
            keystone=tuple(
                (float(get(f"/output/keystone/{c}_x")), float(get(f"/output/keystone/{c}_y"))) for c in CORNERS
            ),
            master=float(get("/output/master")),
        )

    @property
    def has_keystone(self) -> bool:
        return self.keystone != NO_KEYSTONE

    def window_to_image(self, image_size: tuple[int, int], window_size: tuple[int, int]) -> np.ndarray:
        """The 3x3 matrix taking a window point (x, y, 1) to a homogeneous image point.

        Raises KeystoneError for a keystone that is not a convex quad.
        """
        if self.has_keystone:
            quad = keystone_quad(self.keystone)
            check_convex(quad)
            unwarp = np.linalg.inv(homography(UNIT_SQUARE, quad))
        else:
            unwarp = np.eye(3)
        w, h = image_size
        picture = (h, w) if self.rotate in (90, 270) else (w, h)
        return _flip_rotate(self.flip_x, self.flip_y, self.rotate) @ _fit(self.fit, picture, window_size) @ unwarp

    def uniforms(self, image_size: tuple[int, int], window_size: tuple[int, int]) -> dict[str, object]:
        """present.frag's uniforms (GLSL wants matrices column by column)."""
        matrix = self.window_to_image(image_size, window_size)
        return {"u_window_to_image": tuple(float(v) for v in matrix.T.flatten()), "u_master": float(self.master)}


class Presenter:
    """Draws an output texture into a window framebuffer through an ``OutputTransform``.

    One per GL context (programs do not travel between contexts). A keystone that is
    not a convex quad — a corner dragged too far mid-calibration — keeps the last good
    keystone on screen and says why in ``error``; the show does not jump or go black.
    """

    SHADER = "present.frag"

    def __init__(self, shaders: ShaderLibrary) -> None:
        self.shaders = shaders
        self.error: str | None = None
        self._good_keystone: tuple[Point, ...] = NO_KEYSTONE

    def present(
        self,
        texture: moderngl.Texture,
        target_size: tuple[int, int],
        transform: OutputTransform | None = None,
        target: moderngl.Framebuffer | None = None,
    ) -> bool:
        """Fill ``target`` (the context's window by default) with the transformed picture.

        Returns False (and leaves the target black) when present.frag does not compile.
        """
        transform = transform or OutputTransform()
        ctx = self.shaders.ctx
        target = target if target is not None else ctx.screen
        target.use()
        target.viewport = (0, 0, *target_size)
        # the shader paints every pixel, but Mesa's software GL only notices that a window
        # was resized (fullscreen) when it is cleared: without this, a corner stays drawn
        ctx.clear(0.0, 0.0, 0.0, 1.0)
        try:
            program, vao = self.shaders.get(self.SHADER)
        except ShaderError as exc:
            self.error = str(exc)
            return False
        try:
            uniforms = transform.uniforms(texture.size, target_size)
            self._good_keystone, self.error = transform.keystone, None
        except KeystoneError as exc:
            if self.error != f"keystone: {exc}":
                log.warning("%s; keeping the last good keystone", exc)
            self.error = f"keystone: {exc}"
            uniforms = replace(transform, keystone=self._good_keystone).uniforms(texture.size, target_size)
        texture.use(0)
        set_uniform(program, "u_input", 0)
        for name, value in uniforms.items():
            set_uniform(program, name, value)
        vao.render(moderngl.TRIANGLES)
        return True


class PreviewView:
    """What the performer sees in the preview window: the output upright, with the HUD.

    The projector window gets the room's corrections; the preview shows the picture as
    made (only the master fade, so a faded-out room reads as black here too) and the HUD
    in its top-left corner. It draws the compositor's output texture itself, through the
    shared contexts, and compiles its own programs: GL programs and vertex arrays belong
    to one context.
    """

    HUD_SHADER = "hud.frag"

    def __init__(self, window: PreviewWindow, shaders_dir: Path) -> None:
        self.window = window
        with window.current() as ctx:
            self.shaders = ShaderLibrary(ctx, shaders_dir)
        self.shaders.start_watching()  # shader edits reach the preview too
        self.presenter = Presenter(self.shaders)
        self._shared: dict[tuple[int, tuple[int, int], int], moderngl.Texture] = {}
        self._hud: moderngl.Texture | None = None
        self._hud_key: tuple[tuple[str, ...], int] | None = None

    def draw(
        self, texture: moderngl.Texture, hud_lines: list[str] | None = None, error_lines: int = 0, master: float = 1.0
    ) -> None:
        """Show ``texture`` (a main-context texture) and the HUD lines; swaps the preview."""
        with self.window.current():
            self.shaders.poll()
            size = self.window.size
            self.presenter.present(self._share(texture), size, OutputTransform(master=master))
            if hud_lines:
                self._draw_hud(hud_lines, error_lines, size)
            self.window.swap()

    def _share(self, texture: moderngl.Texture) -> moderngl.Texture:
        """This context's handle on a texture of the main context (the GL object is shared)."""
        key = (texture.glo, texture.size, texture.components)
        shared = self._shared.get(key)
        if shared is None:
            if len(self._shared) > 8:  # the output was remade: forget old handles (they own nothing)
                self._shared.clear()
            shared = self._shared[key] = self.window.ctx.external_texture(
                texture.glo, texture.size, texture.components, 0, "f1"
            )
        return shared

    def _draw_hud(self, lines: list[str], error_lines: int, size: tuple[int, int]) -> None:
        ctx = self.window.ctx
        key = (tuple(lines), error_lines)
        if key != self._hud_key:  # rasterise only when the text changed
            image = render_text(list(lines), error_lines)
            if self._hud is not None:
                self._hud.release()
            self._hud = ctx.texture((image.shape[1], image.shape[0]), 4, image.tobytes())
            self._hud_key = key
        try:
            program, vao = self.shaders.get(self.HUD_SHADER)
        except ShaderError:
            return  # the HUD is a convenience; the main window's compositor reports shader errors
        w, h = self._hud.size
        scale = min(1.0, size[0] / w, size[1] / h)  # a narrow preview shrinks the panel, whole
        w, h = max(1, int(w * scale)), max(1, int(h * scale))
        ctx.screen.viewport = (0, size[1] - h, w, h)
        ctx.enable(moderngl.BLEND)
        ctx.blend_func = moderngl.SRC_ALPHA, moderngl.ONE_MINUS_SRC_ALPHA
        self._hud.use(0)
        set_uniform(program, "u_input", 0)
        vao.render(moderngl.TRIANGLES)
        ctx.disable(moderngl.BLEND)
        ctx.screen.viewport = (0, 0, *size)

    def release(self) -> None:
        self.shaders.stop_watching()
        with self.window.current():
            if self._hud is not None:
                self._hud.release()
            self.shaders.release()
        self._shared.clear()
