"""Session state: saved atomically off the render thread, restored after a crash.

The crash tests kill a real child process with SIGKILL, once at a chosen point in the
middle of a write and several times at arbitrary points, and check that what is on disk
is always a whole, readable state: the old one or the new one.
"""

from __future__ import annotations

import logging
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.app import App, AppConfig
from engine.clock import ManualClock
from engine.render.surface import HeadlessSurface
from engine.state import SessionState, StateStore, StateTracker, load_state, state_dir, state_path, write_atomic
from engine.status import RenderedFrame, ShowStatus

ROOT = Path(__file__).resolve().parents[1]
FULL = SessionState(
    preset="tunnel",
    fullscreen=True,
    monitor=1,
    window_size=(1920, 1080),
    output_size=(1280, 720),
    midi_mappings="/home/vj/.config/dreamdeck/apc40.toml",
    source="camera:/dev/video2",
)


def test_state_lives_in_the_xdg_state_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert state_dir({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "dreamdeck"
    assert state_dir({}) == Path.home() / ".local" / "state" / "dreamdeck"
    assert state_dir({"XDG_STATE_HOME": "not/absolute"}) == Path.home() / ".local" / "state" / "dreamdeck"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert state_path() == tmp_path / "dreamdeck" / "state.toml"


def test_state_round_trips_and_leaves_out_what_is_unset() -> None:
    assert SessionState.from_toml(FULL.to_toml().decode()) == FULL
    partial = SessionState(preset="default")
    text = partial.to_toml().decode()
    assert "source" not in text and "window_size" not in text
    assert SessionState.from_toml(text) == partial


def test_missing_state_is_the_defaults(tmp_path: Path) -> None:
    assert load_state(tmp_path / "state.toml") == SessionState()


@pytest.mark.parametrize(
    "text",
    [
        "[dreamdeck\npreset = 'x'",  # TOML syntax
        "preset = 'no table'\n",
        "[dreamdeck]\nmonitor = 'one'\n",
        "[dreamdeck]\nwindow_size = [1920]\n",
        "[dreamdeck]\nfullscreen = 1\n",
        "[dreamdeck]\npreset = 3\n",
    ],
)
def test_corrupt_state_is_one_log_line_defaults_and_kept_aside(tmp_path: Path, caplog, text: str) -> None:
    path = tmp_path / "state.toml"
    path.write_text(text, encoding="utf-8")
    with caplog.at_level(logging.DEBUG, logger="engine.state"):
        assert load_state(path) == SessionState()
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "corrupt" in lines[0].getMessage() and "state.toml.bad" in lines[0].getMessage()
    assert not path.exists() and (tmp_path / "state.toml.bad").read_text(encoding="utf-8") == text
    assert load_state(path) == SessionState(), "the next start is clean"


def test_binary_garbage_and_unknown_fields(tmp_path: Path) -> None:
    path = tmp_path / "state.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert load_state(path) == SessionState() and (tmp_path / "state.toml.bad").exists()
    path.write_text("[dreamdeck]\npreset = 'kept'\nfrom_a_newer_version = true\n", encoding="utf-8")
    assert load_state(path) == SessionState(preset="kept"), "unknown fields are ignored, not corruption"


# -- the store ------------------------------------------------------------------------------


class RecordingWriter:
    """Writes for real, and records each write and the thread that did it."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, bytes]] = []
        self.wrote = threading.Event()

    def __call__(self, path: Path, data: bytes) -> None:
        write_atomic(path, data)
        self.writes.append((threading.current_thread().name, data))
        self.wrote.set()


def test_changes_are_debounced_into_one_write_on_the_writer_thread(tmp_path: Path) -> None:
    writer = RecordingWriter()
    store = StateStore(tmp_path / "state.toml", debounce_s=0.3, writer=writer).start()
    for n in range(50):
        store.update(preset=f"p{n}")
    store.update(fullscreen=True)
    assert writer.wrote.wait(10), "no write"
    time.sleep(0.5)  # longer than the debounce: nothing more may come
    assert [name for name, _ in writer.writes] == ["state writer"]
    assert load_state(tmp_path / "state.toml") == SessionState(preset="p49", fullscreen=True)
    store.update(preset="p49")  # no change: no write
    store.close()
    assert len(writer.writes) == 1


def test_close_writes_what_is_pending(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.toml", debounce_s=3600).start()
    store.update(source="file:clip.mp4", monitor=2)
    store.close()  # a clean exit within the debounce loses nothing
    assert load_state(tmp_path / "state.toml") == SessionState(monitor=2, source="file:clip.mp4")


def test_a_failing_disk_is_reported_not_raised(tmp_path: Path) -> None:
    def full_disk(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    store = StateStore(tmp_path / "state.toml", writer=full_disk)
    store.update(preset="x")
    store.flush()
    assert "No space left" in store.last_error and "No space left" in StateTracker(store).status
    with pytest.raises(TypeError):
        store.update(no_such_field=1)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    presets = tmp_path / "presets"
    presets.mkdir()
    shutil.copy(ROOT / "presets" / "default.toml", presets)
    (presets / "tunnel.toml").write_text("[fx.kaleido]\nenabled = true\nsegments = 5\n", encoding="utf-8")
    surface = HeadlessSurface()
    application = App(
        AppConfig(source="pattern", presets_dir=presets, output_size=(160, 90), hot_reload=False),
        surface,
        ManualClock(60.0),
    )
    yield application
    application.close()
    surface.close()


def test_preset_changes_are_saved_and_restored(app: App, tmp_path: Path) -> None:
    path = tmp_path / "state" / "state.toml"
    writer = RecordingWriter()
    store = StateStore(path, SessionState(source="pattern"), debounce_s=0.05, writer=writer)
    app.add_output(StateTracker(store))
    app.start()
    app.step()
    assert writer.wrote.wait(10)
    assert load_state(path) == SessionState(preset="default", source="pattern")

    writer.wrote.clear()
    assert app.recall_preset_now("tunnel")
    app.step()
    assert writer.wrote.wait(10)
    assert {name for name, _ in writer.writes} == {"state writer"}, "the render thread never writes"
    app.stop()  # stops the store: the last state is on disk
    assert load_state(path) == SessionState(preset="tunnel", source="pattern")


def test_the_tracker_follows_the_frames_status_not_the_app(tmp_path: Path) -> None:
    def frame(**status: object) -> RenderedFrame:  # the tracker reads the status, never the pixels
        return RenderedFrame(
            ctx=None,
            texture=None,
            size=(0, 0),
            number=1,
            time=0.0,  # type: ignore[arg-type]
            status=ShowStatus(**status),
            params=None,
        )  # type: ignore[arg-type]

    path = tmp_path / "state.toml"
    store = StateStore(path, SessionState(preset="kept", fullscreen=True), debounce_s=0.05)
    tracker = StateTracker(store)
    tracker.start()
    tracker.after_render(frame(preset=None, fullscreen=None))  # no preset yet, no window: nothing to say
    assert store.state == SessionState(preset="kept", fullscreen=True)
    tracker.after_render(frame(preset="tunnel", fullscreen=False))
    tracker.stop()
    assert load_state(path) == SessionState(preset="tunnel", fullscreen=False)


# -- crashes ----------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from engine.state import SessionState, write_atomic

    path, marker, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    if mode == "freeze-in-fsync":
        real_fsync = os.fsync
        def frozen(fd):
            real_fsync(fd)
            marker.write_text("in fsync")  # the temp file is written; the rename has not happened
            time.sleep(3600)
        os.fsync = frozen
        write_atomic(path, SessionState(preset="new", source="x" * 3000).to_toml())
    else:
        marker.write_text("writing")
        n = 0
        while True:  # killed at an arbitrary point of some write
            n += 1
            write_atomic(path, SessionState(preset=f"p{n}", source="y" * (n % 4000)).to_toml())
""")


def run_child(tmp_path: Path, path: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / f"marker-{mode}"
    marker.unlink(missing_ok=True)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(marker), mode], cwd=ROOT)
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert child.poll() is None, f"the child ended early with {child.returncode}"
        assert time.monotonic() < deadline, "the child never reached the write"
        time.sleep(0.01)
    return child, marker


def kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(10)


def test_crash_mid_write_leaves_the_old_state(tmp_path: Path) -> None:
    path = tmp_path / "state.toml"
    write_atomic(path, SessionState(preset="old", fullscreen=True).to_toml())
    child, _ = run_child(tmp_path, path, "freeze-in-fsync")
    temps = list(tmp_path.glob(".state.toml.*.tmp"))
    assert len(temps) == 1 and b"new" in temps[0].read_bytes(), "the new state was being written beside it"
    kill(child)
    assert load_state(path) == SessionState(preset="old", fullscreen=True)
    assert not list(tmp_path.glob(".state.toml.*.tmp")), "the killed write's temp file is cleared on load"
    assert not (tmp_path / "state.toml.bad").exists()


def test_killed_at_any_moment_the_state_is_whole(tmp_path: Path) -> None:
    path = tmp_path / "state.toml"
    write_atomic(path, SessionState(preset="p0").to_toml())
    chooser = random.Random(1234)
    for _ in range(4):
        child, _ = run_child(tmp_path, path, "loop")
        time.sleep(chooser.uniform(0.01, 0.15))
        kill(child)
        state = load_state(path)
        assert state.preset is not None and state.preset.startswith("p"), state
        assert not (tmp_path / "state.toml.bad").exists(), "a kill produced a corrupt state file"
