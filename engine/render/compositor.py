"""The compositor: layers, effects, feedback and transitions, into a fixed-size output.

One frame is one full-screen pass of ``shaders/frame.frag`` (read it: it is the whole
chain, in order). Its target alternates between two output buffers so the feedback stage
can read the previous output. The output has its own resolution, independent of the
window, and ``present`` draws it into the window through the room's corrections
(engine/render/output.py: letterbox or stretch, flips, rotation, keystone, master fade).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import moderngl
import numpy as np

from engine.params import Param, ParamRegistry, bool_param, enum_param, float_param, string_param
from engine.render.effects import EFFECTS
from engine.render.output import OutputTransform, Presenter
from engine.render.shaders import ShaderError, ShaderLibrary, set_uniform

log = logging.getLogger(__name__)

BLEND_MODES = ("normal", "add", "multiply", "screen", "difference")
LAYERS = ("source", "scene", "overlay")
TRANSITIONS = ("fade", "luma_wipe", "feedback_dissolve")  # shaders/transitions/<name>.frag
DISSOLVE_ZOOM = 1.015  # feedback dissolve: how fast the old picture flows outwards per frame
_TURN = math.radians(0.4)
DISSOLVE_ROTATION = (math.cos(_TURN), math.sin(_TURN), -math.sin(_TURN), math.cos(_TURN))  # ... and turns


def _layer_params(layer: str, opacity: float) -> tuple[Param, ...]:
    return (
        float_param(
            f"/layer/{layer}/opacity", opacity, 0.0, 1.0, smoothing=0.05, description=f"Opacity of the {layer} layer"
        ),
        enum_param(
            f"/layer/{layer}/blend",
            "normal",
            BLEND_MODES,
            description=f"How the {layer} layer combines with the layers below it",
        ),
    )


COMPOSITOR_PARAMS: tuple[Param, ...] = (
    *_layer_params("source", 1.0),
    *_layer_params("scene", 1.0),
    *_layer_params("overlay", 1.0),
    string_param("/layer/overlay/image", "", description="Image file shown on the overlay layer (empty: none)"),
    float_param(
        "/fx/feedback/amount",
        0.0,
        0.0,
        0.98,
        smoothing=0.05,
        description="Trails: how much of the previous output stays",
    ),
    float_param(
        "/fx/feedback/zoom",
        1.0,
        0.8,
        1.25,
        smoothing=0.1,
        description="Zoom of the previous output per frame (>1 flows outwards)",
    ),
    float_param(
        "/fx/feedback/rotate",
        0.0,
        -5.0,
        5.0,
        unit="deg",
        smoothing=0.1,
        description="Rotation of the previous output per frame",
    ),
    float_param(
        "/mix/transition",
        1.0,
        0.0,
        10.0,
        unit="s",
        description="Transition time for scene and preset changes (0 = a cut)",
    ),
    enum_param(
        "/mix/transition_type",
        "fade",
        TRANSITIONS,
        description="How scene and preset changes look: fade, luma_wipe (bright parts first), "
        "feedback_dissolve (the old picture flows out in trails as the new one dissolves in)",
    ),
    float_param("/mix/wipe_softness", 0.1, 0.0, 0.5, description="Edge width of the luma wipe (0 = hard)"),
    float_param(
        "/mix/morph",
        0.5,
        0.0,
        10.0,
        unit="s",
        description="A slow scene's new image fades in over its previous one in this time (0 = a cut)",
    ),
    bool_param(
        "/mix/morph_follow",
        True,
        description="Morph over the time between the slow scene's last two images (at most /mix/morph): "
        "continuous motion, one image behind",
    ),
)


def cover_fit(layer_size: tuple[int, int], out_size: tuple[int, int]) -> tuple[float, float]:
    """uv scale that makes a layer fill the output, cropping the sides or the top and bottom."""
    la, oa = layer_size[0] / layer_size[1], out_size[0] / out_size[1]
    return (oa / la, 1.0) if la > oa else (1.0, la / oa)


def letterbox(out_size: tuple[int, int], window: tuple[int, int]) -> tuple[int, int, int, int]:
    """Viewport (x, y, w, h) that shows the whole output in the window at its aspect ratio."""
    scale = min(window[0] / out_size[0], window[1] / out_size[1])
    w, h = max(1, round(out_size[0] * scale)), max(1, round(out_size[1] * scale))
    return (window[0] - w) // 2, (window[1] - h) // 2, w, h


@dataclass
class _Layer:
    texture: moderngl.Texture
    key: object = None


class _Morph:
    """The scene layer's previous image and how far the newest has faded in over it.

    A slow scene (DDPM, VQGAN+CLIP) gives a new image a few times a second; instead of
    jumping, the newest fades in over the previous one. When another image arrives
    before the fade ends, the half-finished mix is baked into the "previous" image, so
    nothing ever jumps.
    """

    def __init__(self) -> None:
        self.prev: moderngl.Framebuffer | None = None  # the image fading out
        self.scratch: moderngl.Framebuffer | None = None  # where a half-finished mix is baked
        self.start = 0.0
        self.duration = 0.0
        self.progress = 1.0

    def active(self) -> bool:
        return self.prev is not None and self.progress < 1.0

    def release(self) -> None:
        for fbo in (self.prev, self.scratch):
            if fbo is not None:
                fbo.color_attachments[0].release()
                fbo.release()
        self.prev = self.scratch = None


class Compositor:
    def __init__(
        self, ctx: moderngl.Context, shaders: ShaderLibrary, params: ParamRegistry, size: tuple[int, int] = (1280, 720)
    ) -> None:
        self.ctx = ctx
        self.shaders = shaders
        self.params = params
        self.size = size
        self.errors: dict[str, str] = {}
        self._frame = 0
        self._empty = ctx.texture((1, 1), 4, bytes(4))  # a layer with nothing yet: transparent
        self._layers = {name: _Layer(self._empty) for name in LAYERS}
        self._morph = _Morph()
        self._outputs = [self._make_target() for _ in range(2)]
        self._snapshot = self._make_target()
        self._work = self._make_target()  # the frame before a transition's crossfade
        # the variant (not the program object: a hot reload releases that) that last compiled
        self._last_good: tuple[str, ...] | None = None
        self._transition: tuple[float, float] | None = None  # (start time, duration)
        self._progress_at = 0.0
        self._last_output = self._outputs[0]
        self._presenter = Presenter(shaders)
        for fbo in self._outputs:
            fbo.clear(0.0, 0.0, 0.0, 1.0)

    def _make_target(self, size: tuple[int, int] | None = None) -> moderngl.Framebuffer:
        tex = self.ctx.texture(size or self.size, 4)
        tex.repeat_x = tex.repeat_y = False
        return self.ctx.framebuffer(color_attachments=[tex])

    # -- inputs ----------------------------------------------------------------------
    def set_layer(
        self, name: str, frame: np.ndarray | None, key: object, *, morph: float = 0.0, now: float = 0.0
    ) -> None:
        """Upload a layer's newest image; nothing happens when ``key`` is unchanged.

        ``morph`` (the scene layer only): seconds over which the new image fades in over
        the one it replaces, starting at ``now``; 0 replaces it at once.
        """
        layer = self._layers[name]
        if frame is None:
            if layer.texture is not self._empty:
                layer.texture.release()  # an empty slot must not keep a texture alive
            layer.key, layer.texture = key, self._empty
            if name == "scene":
                self._morph.release()
            return
        if key == layer.key and layer.texture is not self._empty:
            return
        h, w = frame.shape[:2]
        comps = 1 if frame.ndim == 2 else frame.shape[2]
        data = np.ascontiguousarray(frame, dtype=np.uint8)
        if name == "scene":
            self._keep_for_morph(layer, (w, h), comps, morph, now)
        tex = layer.texture
        if tex is self._empty or tex.size != (w, h) or tex.components != comps:
            if tex is not self._empty:
                tex.release()
            tex = self.ctx.texture((w, h), comps, data, alignment=1)
            tex.repeat_x = tex.repeat_y = False
        else:
            tex.write(data, alignment=1)
        layer.texture, layer.key = tex, key

    def _keep_for_morph(self, layer: _Layer, size: tuple[int, int], comps: int, morph: float, now: float) -> None:
        """Before the scene layer's texture is overwritten: keep what shows now as the morph's start."""
        m = self._morph
        old = layer.texture
        if morph <= 0 or old is self._empty or old.size != size or old.components != comps:
            m.progress = 1.0  # a cut: a new scene, a new size, or morphing is off
            return
        if m.prev is None or m.prev.color_attachments[0].size != size:
            m.release()
            m.prev, m.scratch = self._make_target(size), self._make_target(size)
        # what shows now: the half-finished mix if a fade runs (so the next one starts
        # where this one is), else the old image (the mix at progress 1)
        progress = m.progress if m.active() else 1.0
        if not self._draw(
            self._program("transitions/fade.frag"),
            {"u_progress": progress},
            {"u_from": m.prev.color_attachments[0], "u_input": old},
            m.scratch,
        ):
            m.progress = 1.0  # no fade program (a broken edit): cut
            return
        m.prev, m.scratch = m.scratch, m.prev
        m.start, m.duration, m.progress = now, morph, 0.0

    @property
    def morph_progress(self) -> float | None:
        """How far a slow scene's newest image has faded in (None: no morph running)."""
        return self._morph.progress if self._morph.active() else None

    def begin_transition(self, now: float, duration: float | None = None, kind: str | None = None) -> None:
        """Freeze the last output and go from it to the live picture (``kind``: one of TRANSITIONS)."""
        duration = self.params.get("/mix/transition") if duration is None else duration
        kind = self.params.get("/mix/transition_type") if kind is None else kind
        if duration <= 0:
            self._transition = None
            return
        self.ctx.copy_framebuffer(self._snapshot, self._last_output)
        self._transition = (now, duration, kind)

    @property
    def transition_progress(self) -> float | None:
        return None if self._transition is None else self._progress_at

    # -- one frame -----------------------------------------------------------------
    FRAME_SHADER = "frame.frag"

    def variant(self, get: Callable[[str], Any] | None = None) -> tuple[str, ...]:
        """The frame program's defines for a state: the stages that are on."""
        get = get or self.params.get
        defines = [fx.name.upper() for fx in EFFECTS if get(fx.enabled_path)]
        if get("/fx/feedback/amount") > 0:
            defines.append("FEEDBACK")
        if get("/layer/overlay/opacity") > 0 and self._layers["overlay"].texture is not self._empty:
            defines.append("OVERLAY")
        if self._morph.active():
            defines.append("MORPH")
        return tuple(sorted(defines))

    def prewarm(self, states: list[dict[str, Any]], morph: bool = False) -> None:
        """Compile the programs these parameter states need, before the show needs them.

        ``morph``: also each state's MORPH variant (a slow scene can be cut to from any look).
        """
        for kind in TRANSITIONS:
            self._program(f"transitions/{kind}.frag")
        for state in states:
            variant = self.variant(lambda path, state=state: state.get(path, self.params.get(path)))
            variants = [variant, tuple(sorted({*variant, "MORPH"}))] if morph else [variant]
            for defines in variants:
                try:
                    self.shaders.get(self.FRAME_SHADER, defines)
                except ShaderError as exc:
                    self.errors[self.FRAME_SHADER] = str(exc)

    def render(self, now: float) -> moderngl.Texture:
        """Draw this frame into the next output buffer; returns the output texture."""
        self._frame += 1
        previous = self._last_output
        output = self._outputs[self._frame % 2]
        get = self.params.get

        progress, kind = None, "fade"
        if self._transition is not None:
            start, duration, kind = self._transition
            progress = self._progress_at = min(1.0, max(0.0, (now - start) / duration))
            if progress >= 1.0:
                self._transition = progress = None
        m = self._morph
        if m.active():
            m.progress = 1.0 if m.duration <= 0 else min(1.0, max(0.0, (now - m.start) / m.duration))

        rotate = math.radians(get("/fx/feedback/rotate"))
        uniforms: dict[str, object] = {
            "u_resolution": (float(self.size[0]), float(self.size[1])),
            "u_time": float(now),
            "u_feedback_amount": get("/fx/feedback/amount"),
            "u_feedback_zoom": get("/fx/feedback/zoom"),
            "u_feedback_rotation": (math.cos(rotate), math.sin(rotate), -math.sin(rotate), math.cos(rotate)),
        }
        textures = {"u_previous": previous.color_attachments[0]}
        for name, layer in self._layers.items():
            textures[f"u_{name}"] = layer.texture
            uniforms[f"u_{name}_fit"] = cover_fit(layer.texture.size, self.size)
            uniforms[f"u_{name}_opacity"] = get(f"/layer/{name}/opacity")
            uniforms[f"u_{name}_blend"] = BLEND_MODES.index(get(f"/layer/{name}/blend"))
        if m.active():
            textures["u_scene_prev"] = m.prev.color_attachments[0]
            uniforms["u_morph"] = m.progress
        for fx in EFFECTS:
            uniforms.update(fx.uniforms(get))

        frame_target = output if progress is None else self._work
        if not self._draw(self._frame_program(), uniforms, textures, frame_target):
            frame_target.clear(0.0, 0.0, 0.0, 1.0)
        if progress is not None:
            self._transition_pass(kind, progress, previous, output)
        self._last_output = output
        return output.color_attachments[0]

    def _transition_pass(
        self, kind: str, progress: float, previous: moderngl.Framebuffer, output: moderngl.Framebuffer
    ) -> None:
        """From the frozen frame (or, for the feedback dissolve, the previous output) to this frame's picture."""
        uniforms: dict[str, object] = {"u_progress": progress}
        textures = {"u_input": self._work.color_attachments[0]}
        if kind == "feedback_dissolve":
            textures["u_previous"] = previous.color_attachments[0]
            uniforms.update(
                u_zoom=DISSOLVE_ZOOM,
                u_rotation=DISSOLVE_ROTATION,
                u_resolution=(float(self.size[0]), float(self.size[1])),
            )
        else:
            textures["u_from"] = self._snapshot.color_attachments[0]
            uniforms["u_softness"] = self.params.get("/mix/wipe_softness")
        if not self._draw(self._program(f"transitions/{kind}.frag"), uniforms, textures, output):
            self.ctx.copy_framebuffer(output, self._work)  # a broken transition shader: cut, never garbage

    def _frame_program(self) -> tuple[moderngl.Program, moderngl.VertexArray] | None:
        """This frame's variant; if it cannot compile, the last one that did (and say why)."""
        variant = self.variant()
        try:
            found = self.shaders.get(self.FRAME_SHADER, variant)
        except ShaderError as exc:
            if self.errors.get(self.FRAME_SHADER) != str(exc):
                log.error("%s (keeping the last good frame program)", exc)
            self.errors[self.FRAME_SHADER] = str(exc)
            return None if self._last_good is None else self.shaders.get(self.FRAME_SHADER, self._last_good)
        if self.errors.get(self.FRAME_SHADER) and not self.shaders.errors.get(self.FRAME_SHADER):
            self.errors.pop(self.FRAME_SHADER, None)
        self._last_good = variant
        return found

    def _program(self, name: str) -> tuple[moderngl.Program, moderngl.VertexArray] | None:
        try:
            found = self.shaders.get(name)
        except ShaderError as exc:
            self.errors[name] = str(exc)
            return None
        self.errors.pop(name, None)
        return found

    def _draw(
        self,
        found: tuple[moderngl.Program, moderngl.VertexArray] | None,
        uniforms: dict[str, object],
        textures: dict[str, moderngl.Texture],
        target: moderngl.Framebuffer,
    ) -> bool:
        if found is None:
            return False
        program, vao = found
        for unit, (name, tex) in enumerate(textures.items()):
            tex.use(unit)
            set_uniform(program, name, unit)
        for name, value in uniforms.items():
            set_uniform(program, name, value)
        target.use()
        vao.render(moderngl.TRIANGLES)
        return True

    # -- outputs -----------------------------------------------------------------------
    @property
    def output_texture(self) -> moderngl.Texture:
        return self._last_output.color_attachments[0]

    def read_output(self) -> np.ndarray:
        """The last output frame as RGB uint8 (H, W, 3), row 0 at the top."""
        data = self._last_output.read(components=3, alignment=1)
        return np.frombuffer(data, dtype=np.uint8).reshape(self.size[1], self.size[0], 3).copy()

    def present(
        self,
        window_size: tuple[int, int],
        transform: OutputTransform | None = None,
        target: moderngl.Framebuffer | None = None,
    ) -> None:
        """Draw the output into the window (``target``: another framebuffer standing in for it).

        ``transform`` is the room's corrections (flips, rotation, fit, keystone, master fade;
        see engine/render/output.py); none means letterboxed as it is. They apply here only,
        never to the output framebuffer that recordings and screenshots read.
        """
        self._presenter.present(self.output_texture, window_size, transform, target)
        if self._presenter.error:
            self.errors["present"] = self._presenter.error
        else:
            self.errors.pop("present", None)

    def release(self) -> None:
        for layer in self._layers.values():
            if layer.texture is not self._empty:
                layer.texture.release()
        self._morph.release()
        for fbo in (*self._outputs, self._snapshot, self._work):
            fbo.color_attachments[0].release()
            fbo.release()
        self._empty.release()
