"""The show, assembled in one place: one typed config in, every part of the show out.

    ShowConfig ──build_show──► Show
        surface      a window (WindowConfig) or offscreen EGL
        app          sources, scenes (with the show's TorchDefaults), compositor    (engine/app.py)
        controls     audio, Link, tempo, modulation, MIDI, DMX, OSC, OSCQuery, opening hours
        outputs      recorder, virtual camera, NDI, Spout, Syphon, state tracker, systemd notifier
        status page  the web page and phone remote

``dreamdeck run``, scripts/soak.py and the tests all build their show here, so the soak
plays the show users run. A config that cannot work is refused with one line (ShowError)
before anything opens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from engine.app import App, AppConfig, Surface
from engine.clock import ManualClock, RealClock
from engine.control.dmx import SACN_NEEDS, parse_inputs, sacn_available
from engine.control.osc import check_binding
from engine.control.setup import ControlConfig, install_controls
from engine.outputs.recorder import DEFAULT_PATTERN, RECORD_PARAM, Recorder
from engine.outputs.sharing import SpoutOutput, SyphonOutput, ndi, virtual_camera
from engine.render.surface import HeadlessSurface, WindowConfig, WindowSurface
from engine.scenes import SceneCatalog, installed_catalog
from engine.service import Notifier
from engine.sources import SourceSpecError, parse_source_spec
from engine.state import SessionState, StateStore, StateTracker
from engine.web import StatusConfig, StatusServer, install_status_page

log = logging.getLogger(__name__)


class ShowError(ValueError):
    """A config the show cannot be built from; the message is one line for the performer."""


@dataclass(frozen=True)
class OutputConfig:
    recorder: bool = True  # the recorder is there, idle until /output/record starts a take
    record_pattern: str = DEFAULT_PATTERN
    record_fps: float = 30.0
    record_at_start: bool = False  # /output/record on from the first frame
    virtualcam: str | None = None  # None: off; "": the default device (v4l2loopback on Linux)
    ndi: str | None = None  # the NDI source name; None: off
    spout: str | None = None  # the Spout sender name; None: off
    syphon: str | None = None  # the Syphon server name; None: off
    systemd: bool = True  # READY and watchdog pings when systemd runs the show; nothing otherwise


@dataclass(frozen=True)
class StateConfig:
    """What the show remembers across restarts (last preset, source, window)."""

    path: Path | None = None  # None: the user's state file (engine.state.state_path)
    initial: SessionState = SessionState()


@dataclass(frozen=True)
class StatusPageConfig:
    server: StatusConfig = StatusConfig()
    required: bool = False  # True: a port that cannot be bound is a ShowError; False: the show runs without the page


@dataclass(frozen=True)
class ShowConfig:
    app: AppConfig = AppConfig()  # source, preset, output size, folders, TorchDefaults for the torch scenes
    window: WindowConfig | None = None  # None: headless (offscreen EGL)
    fps: float = 60.0
    clock: Literal["real", "manual"] = "real"  # manual: each frame advances 1/fps, as fast as it goes (soak, tests)
    scenes: tuple[str, ...] | None = None  # these scenes of the catalog, in this order; None: all of them
    controls: ControlConfig = ControlConfig()
    outputs: OutputConfig = OutputConfig()
    state: StateConfig | None = StateConfig()  # None: remember nothing
    status: StatusPageConfig | None = StatusPageConfig()  # None: no status page

    @classmethod
    def bare(cls, app: AppConfig = AppConfig(), **overrides: object) -> ShowConfig:
        """The app alone, headless, on a manual clock: no controls, outputs, saved state or status page (tests)."""
        quiet = dict(
            controls=ControlConfig(osc_port=None, oscquery_port=None, tempo=False),
            clock="manual",
            outputs=OutputConfig(recorder=False, systemd=False),
            state=None,
            status=None,
        )
        return cls(app=app, **{**quiet, **overrides})

    def check(self) -> None:
        """Refuse, with one line, what would fail once the show is half built."""
        if not self.fps > 0:
            raise ShowError(f"fps {self.fps!r} must be positive")
        if self.clock not in ("real", "manual"):
            raise ShowError(f"clock {self.clock!r} is not real or manual")
        if self.app.source is not None:
            try:
                parse_source_spec(self.app.source)
            except SourceSpecError as exc:
                raise ShowError(str(exc)) from None
        controls = self.controls
        if controls.osc_port is not None:
            try:  # opening OSC to the network without saying who may send is refused before the show
                check_binding(controls.osc_host, controls.osc_allow or None, "OSC")
            except ValueError as exc:
                raise ShowError(str(exc)) from None
        if controls.dmx_inputs:
            try:  # the same rule as OSC: a desk on the show network needs an allowlist
                inputs = parse_inputs(list(controls.dmx_inputs))
                check_binding(controls.dmx_host, controls.dmx_allow or None, "DMX")
            except ValueError as exc:
                raise ShowError(str(exc)) from None
            if any(i.protocol == "sacn" for i in inputs) and not sacn_available():
                raise ShowError(SACN_NEEDS)
        if not self.outputs.record_fps > 0:
            raise ShowError(f"record fps {self.outputs.record_fps!r} must be positive")


@dataclass
class Show:
    """One assembled show: the surface, the app, and every part plugged into it, by name."""

    config: ShowConfig
    surface: Surface
    app: App
    parts: dict[str, object] = field(default_factory=dict)  # "osc", "midi", "tempo", "recorder", "systemd"...
    status_page: StatusServer | None = None

    def start(self) -> Show:
        self.app.start()
        return self

    def run(self, frames: int | None = None) -> None:
        """The frame loop (App.run): until the window closes, Esc, ``app.running = False`` or ``frames``."""
        self.app.run(frames=frames)

    def close(self) -> None:
        """Stop every part and close the surface. Idempotent."""
        try:
            self.app.close()
        finally:
            self.surface.close()

    def __enter__(self) -> Show:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_show(config: ShowConfig, *, catalog: SceneCatalog | None = None) -> Show:
    """Make every part of the show from ``config`` (nothing runs until ``Show.start``).

    ``catalog``: the scene classes (default: the built-in ones); ``config.scenes`` picks from it.
    Raises ShowError for a config that cannot work (nothing is left open) and SurfaceError
    when no window or GL context can be had.
    """
    # 1. check what can be checked before anything opens
    config.check()
    catalog = _pick_scenes(catalog or installed_catalog(), config.scenes)

    # 2. the surface, then the app on it: sources, scenes, compositor
    surface = HeadlessSurface() if config.window is None else WindowSurface(config.window)
    clock = ManualClock(config.fps) if config.clock == "manual" else RealClock(config.fps)
    try:
        app = App(config.app, surface, clock, catalog=catalog)
    except BaseException:
        surface.close()
        raise
    show = Show(config, surface, app)
    try:
        # 3. the controls, in the order they run at the frame boundary
        show.parts.update(install_controls(app, config.controls))
        # 4. the outputs, in the order they read each frame
        _add_outputs(show)
        # 5. the status page (it reads the frames the outputs above have seen)
        if config.status is not None:
            show.status_page = _add_status_page(show, config.status)
    except BaseException:
        show.close()
        raise
    return show


def _pick_scenes(catalog: SceneCatalog, names: tuple[str, ...] | None) -> SceneCatalog:
    if names is None:
        return catalog
    if not names:
        raise ShowError("a show needs at least one scene")
    try:
        return SceneCatalog(tuple(catalog.get(name) for name in names))
    except KeyError as exc:
        raise ShowError(str(exc.args[0])) from None


def _add_outputs(show: Show) -> None:
    app, outputs, parts = show.app, show.config.outputs, show.parts
    if outputs.recorder:
        parts["recorder"] = app.add_output(Recorder(outputs.record_pattern, fps=outputs.record_fps))
    if outputs.record_at_start:
        app.params.set(RECORD_PARAM, True, origin="config")
    if outputs.virtualcam is not None:
        parts["virtualcam"] = app.add_output(virtual_camera(device=outputs.virtualcam or None))
    if outputs.ndi is not None:
        parts["ndi"] = app.add_output(ndi(outputs.ndi))
    if outputs.spout is not None:
        parts["spout"] = app.add_output(SpoutOutput(outputs.spout))
    if outputs.syphon is not None:
        parts["syphon"] = app.add_output(SyphonOutput(outputs.syphon))
    if show.config.state is not None:
        store = StateStore(show.config.state.path, initial=show.config.state.initial)
        parts["state"] = app.add_output(StateTracker(store))
    if outputs.systemd:
        parts["systemd"] = app.add_output(Notifier())


def _add_status_page(show: Show, page: StatusPageConfig) -> StatusServer | None:
    where = f"{page.server.host}:{page.server.port}"
    try:
        server = install_status_page(show.app, page.server)
    except ValueError as exc:  # a setting that can never work (e.g. a bad token)
        raise ShowError(f"status page on {where}: {exc}") from None
    except OSError as exc:
        if page.required:
            raise ShowError(f"status page on {where}: {exc}") from None
        # a port that is taken (another dreamdeck?) when none was asked for: the show matters more than the page
        log.warning("status page off: %s: %s (choose a port with --status-port)", where, exc)
        return None
    show.parts["status"] = server
    return server
