"""One status per frame: the ShowStatus snapshot, the HUD text made from it, and what
outputs get (a RenderedFrame, never the App). A real App on headless EGL where a frame
is needed; the HUD text from hand-made snapshots."""

from __future__ import annotations

import ast
import dataclasses
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import engine.app as app_module
from engine.app import App, AppConfig
from engine.clock import ManualClock
from engine.params import Change
from engine.render.hud import hud_lines
from engine.render.surface import HeadlessSurface
from engine.status import STATUS_REFRESH, MemoryProbe, PartStatus, RenderedFrame, ShowStatus

ROOT = Path(__file__).resolve().parents[1]


# -- the HUD is a function of the snapshot ------------------------------------------------------


def test_hud_lines_are_made_from_the_snapshot_alone() -> None:
    status = ShowStatus(
        frame=1200,
        fps=59.94,
        scene_fps=12.5,
        dropped_source=2,
        dropped_scene=1,
        rss_mb=812.4,
        scene="ddpm",
        scene_realtime=False,
        scene_status="cuda (float16)",
        loading="realtime",
        preloading=True,
        preset="gallery",
        loaded=("ddpm", "reaction_diffusion"),
        loaded_mb=900,
        memory_budget_mb=12000,
        source="camera:0 ok 30.0 fps",
        last_change=Change("/mix/crossfade", 0.123456, "midi"),
        controls=(PartStatus("osc", "osc :9000 in 5 ok 5 refused 0"), PartStatus("web", "port 9330")),
        outputs=(PartStatus("status feed", ""), PartStatus("recorder", "REC 00:12 take.mp4")),
        errors=("shader fx.frag: syntax error", "preset refused: segmnets"),
    )
    assert hud_lines(status) == [
        "render  59.9 fps  scene  12.5 fps  dropped 3  memory 812 MB",
        "scene ddpm (preloading realtime) 12.5 img/s [cuda (float16)]   preset gallery",
        "loaded ddpm, reaction_diffusion (900 of 12000 MB)",
        "source camera:0 ok 30.0 fps",
        "last control /mix/crossfade = 0.123 (midi)",
        "osc :9000 in 5 ok 5 refused 0",  # a line that starts with its name is shown as it is
        "web port 9330",
        "recorder REC 00:12 take.mp4",  # the status feed has nothing to say: no line
        "error shader fx.frag: syntax error",
        "error preset refused: segmnets",
    ]
    assert hud_lines(status) == hud_lines(dataclasses.replace(status)), "nothing but the snapshot counts"


def test_hud_lines_before_anything_is_known() -> None:
    assert hud_lines(ShowStatus()) == [
        "render   0.0 fps  scene   0.0 fps  dropped 0",
        "scene -   preset -",
        "loaded - (0 of 0 MB)",
        "source ",
        "last control -",
    ]
    loading = hud_lines(ShowStatus(scene="a", loading="b"))[1]
    assert loading == "scene a (loading b)   preset -", "a scene on its way to play is loading, not preloading"


def test_a_snapshot_cannot_be_changed() -> None:
    status = ShowStatus(frame=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.frame = 4  # type: ignore[misc]


def test_memory_probe_reads_this_process() -> None:
    rss = MemoryProbe().read()
    if sys.platform.startswith("linux"):
        held = bytearray(64 * 2**20)
        held[::4096] = b"x" * len(held[::4096])  # touch every page: resident, not just reserved
        grown = MemoryProbe().read()
        assert rss is not None and grown is not None and grown >= rss + 50, (rss, grown)
        del held
    else:
        assert rss is None or rss > 0


# -- outputs get the frame, not the App ----------------------------------------------------------

OUTPUT_MODULES = [
    "engine.outputs.recorder",
    "engine.outputs.sharing",
    "engine.outputs.readback",
    "engine.web.feed",
    "engine.service",
    "engine.state",
    "engine.status",
]


def test_outputs_do_not_import_the_app() -> None:
    for module in OUTPUT_MODULES:
        path = ROOT / (module.replace(".", "/") + ".py")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert "engine.app" not in names, f"{module} imports engine.app (even under TYPE_CHECKING, it is a cycle)"


def test_the_recorder_imports_first_in_a_fresh_interpreter() -> None:
    """app -> catalog -> outputs.recorder used to lead back to app; now nothing does."""
    code = (
        "import sys\n"
        f"for name in {OUTPUT_MODULES!r}:\n"
        "    __import__(name)\n"
        "assert 'engine.app' not in sys.modules, 'an output pulled in the App'\n"
        "import engine.app\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


class Watcher:
    """An output that keeps what each frame gave it and counts how often its status is asked."""

    name = "watcher"

    def __init__(self) -> None:
        self.frames: list[RenderedFrame] = []
        self.asked = 0

    @property
    def status(self) -> str:
        self.asked += 1
        return f"{len(self.frames)} frames"

    def start(self) -> None:
        """Nothing to open."""

    def stop(self) -> None:
        """Nothing to close."""

    def after_render(self, frame: RenderedFrame) -> None:
        self.frames.append(frame)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    presets = tmp_path / "presets"
    presets.mkdir()
    shutil.copy(ROOT / "presets" / "default.toml", presets)
    surface = HeadlessSurface()
    application = App(
        AppConfig(source="pattern", presets_dir=presets, output_size=(160, 90), hot_reload=False),
        surface,
        ManualClock(64.0),
    )  # 1/64 s is exact in binary: frame times are exact
    yield application
    application.close()
    surface.close()


def test_each_frame_makes_one_snapshot_and_every_output_gets_it(app: App, monkeypatch) -> None:
    made: list[ShowStatus] = []

    def counting(**fields: object) -> ShowStatus:
        made.append(ShowStatus(**fields))  # type: ignore[arg-type]
        return made[-1]

    monkeypatch.setattr(app_module, "ShowStatus", counting)
    first, second = app.add_output(Watcher()), app.add_output(Watcher())
    app.start()
    for _ in range(10):
        app.step()
    assert len(made) == 10, "one snapshot per frame"
    assert [f.status for f in first.frames] == [f.status for f in second.frames] == made
    assert app.status is made[-1]
    frame = first.frames[-1]
    assert frame.number == frame.status.frame == app.stats.frames == 10
    assert frame.time == frame.status.time == app.clock.now()
    assert frame.size == (160, 90) == frame.texture.size and frame.texture.components == 4
    assert frame.ctx is app.compositor.ctx and frame.params is app.params
    assert not hasattr(frame, "app")


def test_parts_are_asked_for_their_line_every_status_refresh_not_every_frame(app: App) -> None:
    watcher = app.add_output(Watcher())
    app.start()
    frames = 64  # one second of the manual clock
    for _ in range(frames):
        app.step()
    refreshes = int(1.0 / STATUS_REFRESH)
    assert refreshes <= watcher.asked <= refreshes + 1, watcher.asked
    line = dict((p.name, p.status) for p in app.status.outputs)["watcher"]
    assert line.endswith(" frames") and int(line.split()[0]) >= frames - 64 * STATUS_REFRESH - 1, line
    app.step()
    assert app.status.rss_mb is None or app.status.rss_mb > 10
