"""The app: one explicit, ordered frame loop (read ``step``; it is the whole engine).

    capture thread   source -> newest frame slot          (engine/sources)
    scene worker     newest frame + params -> image slot  (engine/scenes)
    render thread    this file: events + params at the frame boundary, newest frame and
                     newest scene image (never waiting), composite, present, HUD

The render thread never waits on a scene, a file, the network or a device: a missing
frame is the last frame again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from engine.catalog import NO_CUE, PRESETS_DIR, SHADERS_DIR, build_registry
from engine.clock import RealClock
from engine.control.actions import ActionError, Actions, Control
from engine.diffusion.options import TorchDefaults
from engine.files import write_atomic
from engine.params import Change, ParamError
from engine.presets import PresetError, PresetLibrary, load_preset, recall_values
from engine.render.compositor import Compositor
from engine.render.hud import Hud, hud_lines
from engine.render.output import OutputTransform, PreviewView
from engine.render.shaders import ShaderLibrary
from engine.scenes import SceneCatalog, SceneWorker, installed_catalog
from engine.sources import ImageSource, LiveInput, open_source
from engine.status import STATUS_REFRESH, MemoryProbe, PartStatus, RenderedFrame, ShowStatus

log = logging.getLogger(__name__)

PATTERN_SIZE = (640, 360)  # the built-in pattern is soft: render it small, let the GPU scale it
HUD_REFRESH = 0.25  # seconds between HUD text updates (the text is rasterised on the CPU)


class Clock(Protocol):
    def now(self) -> float: ...
    def tick(self) -> float: ...


class Output(Protocol):
    """Something that takes rendered frames: it must not block (copy, queue, return).

    ``after_render`` gets the frame's texture and the show's status (engine/status.py),
    never the App: an output reads the frame and changes the show, if at all, through
    ``frame.params`` like any control. ``status`` is its line for the HUD and /health.
    """

    name: str
    status: str

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def after_render(self, frame: RenderedFrame) -> None: ...


class Surface(Protocol):
    has_window: bool
    ctx: object
    size: tuple[int, int]
    should_close: bool

    def poll(self) -> list[str]: ...
    def swap(self) -> None: ...
    def toggle_fullscreen(self) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class AppConfig:
    source: str | None = None  # None: the first camera that opens, else the pattern
    preset: str | None = "default"
    output_size: tuple[int, int] = (1280, 720)
    source_fps: float = 30.0
    presets_dir: Path = PRESETS_DIR
    shaders_dir: Path = SHADERS_DIR
    hot_reload: bool = True
    source_max_age: float = 2.0  # seconds without a frame before the fallback pattern shows
    torch: TorchDefaults = TorchDefaults()  # what "auto" device / dtype / accel means for the torch scenes


@dataclass
class Stats:
    frames: int = 0
    render_fps: float = 0.0
    frame_ms: float = 0.0
    longest_frame_ms: float = 0.0
    scene_transitions: int = 0
    errors: deque = field(default_factory=lambda: deque(maxlen=20))


class App:
    def __init__(
        self, config: AppConfig, surface: Surface, clock: Clock | None = None, catalog: SceneCatalog | None = None
    ) -> None:
        self.config = config
        self.surface = surface
        self.clock = clock or RealClock(60.0)
        self.catalog = catalog or installed_catalog()
        self.params = build_registry(self.catalog)
        self.presets = PresetLibrary(config.presets_dir, self.params)
        self.preset_name: str | None = None
        self.stats = Stats()
        self.last_error: str | None = None
        self.running = False
        self._closed = False

        source = open_source(config.source, self.params, size=config.output_size, fps=config.source_fps)
        if source.kind == "pattern":
            source = open_source("pattern", self.params, size=PATTERN_SIZE, fps=config.source_fps)
        self.input = LiveInput(
            source, fallback_size=PATTERN_SIZE, fps=config.source_fps, params=self.params, max_age=config.source_max_age
        )
        self.shaders = ShaderLibrary(surface.ctx, config.shaders_dir)
        self.compositor = Compositor(surface.ctx, self.shaders, self.params, config.output_size)
        self.hud = Hud(surface.ctx, self.shaders)
        preview_window = getattr(surface, "preview", None)  # WindowConfig(preview=True)
        self.preview = PreviewView(preview_window, config.shaders_dir) if preview_window is not None else None
        self.worker = SceneWorker(self.catalog, self.params, self._scene_input, torch=config.torch)
        self.overlay: ImageSource | None = None
        self.actions = Actions()
        self.controls: list[Control] = []
        self.outputs: list[Output] = []  # recorder, status thumbnail, virtual camera...
        self.status = ShowStatus()  # the latest frame's snapshot (render thread writes, anyone reads)
        self._memory = MemoryProbe()
        self._sampled: tuple[tuple[PartStatus, ...], tuple[PartStatus, ...], float | None] = ((), (), None)
        self._sample_next = float("-inf")
        self._register_actions()

        self._showing_scene: str | None = None
        self._scene_seq = 0
        self._scene_arrived = 0.0  # when the scene's newest image arrived
        self._fallen_back: set[str] = set()  # fallback scenes tried since the last scene that played
        self._preset_transition = False
        self._hud_next = 0.0
        self._lock = threading.Lock()  # guards last_error / preset_name set by loader threads
        self.params.add_listener(self._on_change)

    # -- life cycle --------------------------------------------------------------------
    def start(self) -> App:
        """Start the threads and put the first preset in place (before the first frame)."""
        if self.config.preset:
            try:
                preset = self.presets.load(self.config.preset)
                self.params.set_many(recall_values(preset, self.params), origin="preset")
                self.preset_name = preset.name
            except (PresetError, ParamError) as exc:
                self._error(f"preset {self.config.preset} refused: {exc}")
        self._import_scene_modules()
        self._preset_transition = True  # the first preset is the start, not a change: no crossfade
        self.params.apply_pending(0.0)
        self._preset_transition = False
        self._prewarm()
        self.input.start()
        self.worker.request(self.params.get("/scene/active"))
        self.worker.start()
        if self.config.hot_reload:
            self.shaders.start_watching()
        for part in [*self.controls, *self.outputs]:
            self._start_part(part)
        self.running = True
        return self

    def _import_scene_modules(self) -> None:
        """Import what the scenes will import (torch, diffusers...) now, before the show:
        an import on a loader thread mid-show holds the GIL and freezes the render loop.

        ``needs.imports`` names modules, or ``module:Name`` for a library that imports
        lazily (diffusers and transformers load a class's module when it is first used).
        """
        import importlib
        import importlib.util

        wanted = dict.fromkeys(m for name in self.catalog.names() for m in self.catalog.get(name).needs.imports)
        started = time.perf_counter()
        done: list[str] = []
        for spec in wanted:
            module, _, attr = spec.partition(":")
            try:
                if importlib.util.find_spec(module) is None:
                    continue  # not installed: the scene will say so when it is chosen
                loaded = importlib.import_module(module)
                if attr:
                    getattr(loaded, attr)
                done.append(spec)
            except Exception as exc:  # a broken install must not stop the show: the scene will report it
                log.warning("importing %s failed: %s", spec, exc)
        if done:
            log.info(
                "imported %d scene modules in %.1f s (once, before the show)", len(done), time.perf_counter() - started
            )

    def add_output(self, output: Output) -> Output:
        """Plug in an output that reads each rendered frame (started and stopped with the app)."""
        self.outputs.append(output)
        if self.running:
            self._start_part(output)
        return output

    def add_control(self, control: Control) -> Control:
        """Plug in a control (OSC, MIDI, audio...); started and stopped with the app."""
        self.controls.append(control)
        if self.running:
            self._start_part(control)
        return control

    def _start_part(self, part: Control | Output) -> None:
        """Start a control or output; one that cannot start (port taken, no device) is reported
        in the HUD and the log, and the show goes on without it."""
        try:
            part.start()
        except (OSError, ValueError, RuntimeError) as exc:
            self._error(f"{part.name} not started: {exc}")

    def stop(self) -> None:
        self.running = False
        for part in [*reversed(self.outputs), *reversed(self.controls)]:
            try:
                part.stop()
            except Exception:  # one part failing to stop must not keep the others running
                log.exception("stopping %s failed", part.name)
        self.shaders.stop_watching()
        self.worker.stop()
        self.input.stop()
        if self.overlay is not None:
            self.overlay.stop()

    def close(self) -> None:
        """Stop the threads and free GL objects (the surface is the caller's to close). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.stop()
        self.hud.release()
        if self.preview is not None:
            self.preview.release()
        self.compositor.release()
        self.shaders.release()
        self._memory.close()

    def run(self, frames: int | None = None) -> None:
        """The loop: step until the window closes, Esc, or ``frames`` frames."""
        while self.running and not self.surface.should_close:
            if frames is not None and self.stats.frames >= frames:
                break
            self.step()

    # -- one frame ---------------------------------------------------------------------
    def step(self) -> None:
        dt = self.clock.tick()
        now = self.clock.now()
        started = time.perf_counter()

        # 1. poll events, run posted actions, apply control changes at the frame boundary
        for action in self.surface.poll():
            self.handle_action(action)
        self.actions.run_pending()
        self.shaders.poll()
        self._preset_transition = False
        self.params.apply_pending(dt)  # listeners run here: scene requests, transitions
        for control in self.controls:  # modulation, feedback to controllers
            control.frame(now)
        self._revert_failed_scene()

        # 2. take the newest source frame and the newest scene image, never waiting
        frame, key, _ = self.input.latest()
        self.compositor.set_layer("source", frame, ("source", key))
        scene_frame, seq = self.worker.output.latest()
        morph = 0.0
        if scene_frame is not None and scene_frame.scene != self._showing_scene:
            if self._showing_scene is not None:  # a new scene has its first image: transition to it
                self.compositor.begin_transition(now)
                self.stats.scene_transitions += 1
            self._showing_scene = scene_frame.scene
            self._scene_arrived = now
            self._fallen_back.clear()
        elif scene_frame is not None and seq != self._scene_seq:
            morph = self._morph_time(scene_frame.scene, now)
        self._scene_seq = seq
        self.compositor.set_layer(
            "scene", None if scene_frame is None else scene_frame.image, ("scene", seq), morph=morph, now=now
        )
        if self.overlay is not None:
            image, overlay_seq = self.overlay.slot.latest()
            self.compositor.set_layer("overlay", image, ("overlay", overlay_seq))

        # 3. composite layers + effects + feedback + transitions into the output framebuffer;
        #    the frame's status, once, for the outputs and the HUD
        self.compositor.render(now)
        status = self.status = self._snapshot(now)
        texture = self.compositor.output_texture
        rendered = RenderedFrame(self.compositor.ctx, texture, texture.size, status.frame, now, status, self.params)
        for output in self.outputs:
            output.after_render(rendered)

        # 4. present (vsync) with the room's transforms, HUD (in the preview window if there is one)
        if self.surface.has_window:
            size = self.surface.size
            self.compositor.present(size, OutputTransform.from_params(self.params.get))
            hud_on = self.params.get("/hud/visible")
            if hud_on:
                self._update_hud(now)
            if self.preview is not None:
                self.preview.draw(
                    self.compositor.output_texture,
                    self.hud.lines if hud_on else None,
                    self.hud.error_lines,
                    self.params.get("/output/master"),
                )
            elif hud_on:
                self.hud.draw(size)
        elif now >= self._hud_next:
            self._update_hud(now)  # headless: keep the HUD text current for the status views
        self.surface.swap()
        self._count_frame(dt, time.perf_counter() - started)

    def _morph_time(self, scene: str, now: float) -> float:
        """Seconds a slow scene's new image takes to fade in over its previous one (0: at once)."""
        last, self._scene_arrived = self._scene_arrived, now
        if self.catalog.get(scene).realtime:
            return 0.0
        longest = self.params.get("/mix/morph")
        if not self.params.get("/mix/morph_follow"):
            return longest
        interval = now - last  # the next image is due about this long from now
        return min(longest, interval) if interval > 0 else longest

    # -- controls ------------------------------------------------------------------------
    def handle_action(self, action: str) -> None:
        """Keys from the window: next scene, scenes F1-F9, presets 1-9, fullscreen, HUD, quit."""
        if action == "quit":
            self.running = False
        elif action == "next_scene":
            self.actions.post("scene/next", origin="key")
        elif action == "fullscreen":
            self.surface.toggle_fullscreen()
        elif action == "hud":
            self.params.set("/hud/visible", not self.params.get("/hud/visible"), origin="key")
        elif action.startswith("preset:"):
            self.actions.post("preset/recall", int(action.split(":", 1)[1]), origin="key")
        elif action.startswith("scene:"):
            self.actions.post("scene/select", int(action.split(":", 1)[1]), origin="key")
        elif action == "learn":
            self.learn_last_touched()

    def learn_last_touched(self) -> None:
        """L in the window: arm MIDI learn for the parameter touched last (by OSC, web, keys)."""
        midi = next((c for c in self.controls if hasattr(c, "learn_last_touched")), None)
        if midi is None:
            self._error("MIDI learn: MIDI is off (start with --midi-in NAME)")
            return
        try:
            path = midi.learn_last_touched()
        except ActionError as exc:
            self._error(f"MIDI learn: {exc}")
            return
        log.info("MIDI learn armed for %s: move a control", path)

    def _register_actions(self) -> None:
        """The app's handlers for the actions declared in engine.control.actions.ACTIONS (the
        declaration checks the arguments before a handler sees them; the tempo registers tap,
        MIDI midi/learn)."""
        handlers = {
            "scene/next": self.next_scene,
            "scene/select": self.select_scene,
            "scene/preload": self.preload_scene,
            "preset/recall": self.recall_preset,
            "preset/save": self._save_preset_async,
            "prompt": self.set_prompt,
        }
        for name, handler in handlers.items():
            self.actions.register(name, handler)

    def next_scene(self) -> None:
        names = self.catalog.names()
        current = self.params.target("/scene/active")
        self.params.set("/scene/active", names[(names.index(current) + 1) % len(names)], origin="key")

    def select_scene(self, ref: str | int) -> None:
        """By name, or by 0-based index in the scene list (``dreamdeck params`` lists it)."""
        names = self.catalog.names()
        if isinstance(ref, (int, float)) and not isinstance(ref, bool):
            if not float(ref).is_integer() or not 0 <= int(ref) < len(names):
                raise ActionError(f"scene index {ref} out of range 0..{len(names) - 1}")
            ref = names[int(ref)]
        if ref not in names:
            raise ActionError(f"no scene {ref!r}; scenes: {', '.join(names)}")
        self.params.set("/scene/active", ref, origin="action")

    def preload_scene(self, name: str) -> None:
        """Load a scene in the background (it stays loaded within /scene/memory_budget)."""
        try:
            self.worker.preload(str(name))
        except KeyError as exc:
            raise ActionError(str(exc.args[0])) from None

    def set_prompt(self, text: str) -> None:
        path = f"/scene/{self.params.get('/scene/active')}/prompt"
        if path not in self.params:
            raise ActionError(f"scene {self.params.get('/scene/active')} has no prompt")
        try:
            self.params.set(path, str(text), origin="action")
        except ParamError as exc:
            raise ActionError(str(exc)) from None

    def _save_preset_async(self, name: str) -> None:
        def save() -> None:
            try:
                self.save_preset(str(name))
            except (PresetError, OSError, ValueError) as exc:
                self._error(f"preset {name} not saved: {exc}")

        threading.Thread(target=save, name="preset saver", daemon=True).start()

    def recall_preset(self, ref: str | int) -> None:
        """Load, validate and apply a preset off the render thread; it lands with a crossfade.

        A preset that fails validation is refused whole and the show goes on unchanged.
        """
        if isinstance(ref, float) and ref.is_integer():
            ref = int(ref)  # OSC clients often send numbers as floats
        threading.Thread(target=self._load_preset, args=(ref,), name="preset loader", daemon=True).start()

    def recall_preset_now(self, ref: str | int) -> bool:
        """The same, synchronously (tests and the command line); True if it was applied."""
        return self._load_preset(ref)

    def _load_preset(self, ref: str | int) -> bool:
        try:
            preset = self.presets.load(ref)
            self.params.set_many(recall_values(preset, self.params), origin="preset")
        except (PresetError, ParamError) as exc:
            self._error(f"preset refused: {exc}")
            return False
        with self._lock:
            self.preset_name = preset.name
        log.info("preset %s recalled", preset.name)
        return True

    def save_preset(self, name: str, description: str = "") -> Path:
        path = self.presets.save(name, description)
        with self._lock:
            self.preset_name = name
        return path

    def _on_change(self, change: Change) -> None:
        """Registry listener (render thread, frame boundary)."""
        if change.origin == "preset" and not self._preset_transition:
            self._preset_transition = True  # one crossfade per recall, however many values land
            self.compositor.begin_transition(self.clock.now())
        if change.path == "/scene/active":
            self.worker.request(change.value)
        elif change.path == "/scene/cue" and change.value != NO_CUE:
            self.worker.preload(change.value)
        elif change.path == "/layer/overlay/image":
            self._open_overlay(change.value)

    def _open_overlay(self, path: str) -> None:
        if self.overlay is not None:
            self.overlay.stop(timeout=0.0)
            self.overlay = None
        self.compositor.set_layer("overlay", None, None)
        if path:
            self.overlay = ImageSource(path).start()

    def _revert_failed_scene(self) -> None:
        """A scene that could not load: the one playing goes on; with none playing (the
        start of a show), the scene's fallback plays (e.g. the shipped DDPM when a hub
        model is missing offline), else the first scene."""
        failed, self.worker.failed = self.worker.failed, None
        if failed is None:
            return
        self._error(self.worker.last_error or f"scene {failed} could not load")
        if self.params.target("/scene/active") != failed:
            return  # the performer has already moved on
        instead = self.worker.pending_name or self.worker.active_name
        if instead is None:
            self._fallen_back.add(failed)
            options = [self.catalog.get(failed).fallback, self.catalog.names()[0]]
            instead = next(
                (name for name in options if name and name not in self._fallen_back and name in self.catalog.names()),
                None,
            )
            if instead is not None:
                log.info("scene %s could not load: playing %s instead", failed, instead)
        if instead is not None:
            self.params.set("/scene/active", instead, origin="engine")

    # -- the scene worker's view of the input ------------------------------------------
    def _scene_input(self) -> tuple[np.ndarray | None, object]:
        frame, key, _ = self.input.latest()
        return frame, key

    # -- outputs -------------------------------------------------------------------------
    def screenshot(self, path: str | Path) -> Path:
        """Write the last output frame as an image, atomically."""
        path = Path(path)
        try:
            ok, data = cv2.imencode(path.suffix or ".png", self.compositor.read_output()[:, :, ::-1])
        except cv2.error:  # OpenCV raises, rather than returns False, for a suffix it has no encoder for
            ok = False
        if not ok:
            raise ValueError(f"cannot encode a screenshot as {path.suffix!r}")
        write_atomic(path, data.tobytes())
        return path

    # -- status ----------------------------------------------------------------------------
    def _error(self, message: str) -> None:
        with self._lock:
            self.last_error = message
            self.stats.errors.append((time.time(), message))
        log.error("%s", message)

    def errors_now(self) -> list[str]:
        """Errors to show: shader errors (until fixed), the scene worker's last error and the
        latest other error (the two are not ordered in time, so neither may hide the other)."""
        out = [
            *self.shaders.errors.values(),
            *(e for k, e in self.compositor.errors.items() if e not in self.shaders.errors.values()),
        ]
        active = self.worker.active
        warning = active.warning if active is not None else None
        for error in (self.worker.last_error, warning, self.last_error, self.actions.last_error):
            if error and error not in out:
                out.append(error)
        return out

    def hud_lines(self) -> list[str]:
        """The HUD's text for the latest frame (``engine.render.hud.hud_lines`` of ``self.status``)."""
        return hud_lines(self.status)

    def _snapshot(self, now: float) -> ShowStatus:
        """This frame's ShowStatus, from values the render thread already has; the parts' lines
        and the process's memory are asked for every STATUS_REFRESH seconds, not every frame."""
        if now >= self._sample_next:
            self._sample_next = now + STATUS_REFRESH
            self._sampled = (
                tuple(PartStatus(c.name, str(c.status)) for c in self.controls),
                tuple(PartStatus(o.name, str(o.status)) for o in self.outputs),
                self._memory.read(),
            )
        controls, outputs, rss_mb = self._sampled
        s, worker, showing = self.stats, self.worker, self._showing_scene
        # each read once: the worker thread may change them mid-snapshot, which must agree with itself
        active, loading, loaded = worker.active, worker.loading, worker.loaded_names
        with self._lock:
            preset, recent = self.preset_name, tuple(s.errors)
        fullscreen = getattr(self.surface, "fullscreen", None)  # a window says; headless has none
        return ShowStatus(
            frame=s.frames + 1,
            time=now,
            fps=s.render_fps,
            frame_ms=s.frame_ms,
            longest_frame_ms=s.longest_frame_ms,
            dropped_source=self.input.primary.slot.drops,
            dropped_scene=worker.output.drops,
            scene_transitions=s.scene_transitions,
            scene=None if active is None else active.name,
            scene_selected=self.params.get("/scene/active"),
            scene_realtime=showing is None or self.catalog.get(showing).realtime,
            scene_fps=worker.fps,
            scene_backend="" if active is None else active.backend,
            scene_status="" if active is None else active.status,
            scene_warning=None if active is None else active.warning,
            loading=loading,
            preloading=loading is not None and loading != worker.pending_name,
            loaded=tuple(reversed(loaded)),
            loaded_mb=sum(self.catalog.get(n).needs.accelerator_mb for n in loaded),
            memory_budget_mb=self.params.get("/scene/memory_budget"),
            source=self.input.status,
            source_fallback=bool(self.input.fallback_active),
            preset=preset,
            last_change=self.params.last_change,
            controls=controls,
            outputs=outputs,
            errors=tuple(self.errors_now()),
            recent_errors=recent,
            rss_mb=rss_mb,
            fullscreen=fullscreen if isinstance(fullscreen, bool) else None,
        )

    def _update_hud(self, now: float) -> None:
        """Rasterise the HUD's text, every HUD_REFRESH seconds at most (it is drawn on the CPU)."""
        if now < self._hud_next:
            return
        self._hud_next = now + HUD_REFRESH
        self.hud.update(hud_lines(self.status), error_lines=len(self.status.errors))

    def _count_frame(self, dt: float, busy: float) -> None:
        s = self.stats
        s.frames += 1
        s.frame_ms = busy * 1000.0
        if s.frames > 10:  # the first frames compile shaders
            s.longest_frame_ms = max(s.longest_frame_ms, s.frame_ms)
        if dt > 0:
            s.render_fps += (1.0 / dt - s.render_fps) * (0.1 if s.frames > 1 else 1.0)

    def _prewarm(self) -> None:
        """Compile the frame programs the presets need now, not in the middle of the show."""
        states = [self.params.snapshot()]
        for entry in self.presets.entries():
            if entry.error is None:
                try:
                    states.append(load_preset(entry.path, self.params).values)
                except PresetError:
                    continue  # listed as broken by `dreamdeck presets`; recall will say why
        slow_scenes = any(not self.catalog.get(name).realtime for name in self.catalog.names())
        self.compositor.prewarm(states, morph=slow_scenes)
