"""Sources with real parts: video files written by cv2.VideoWriter stand in for cameras.

Every wait is a polling loop bounded by a timeout; no test asserts on wall-clock speed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.params import ParamRegistry
from engine.sources import (
    CaptureSource,
    ImageSource,
    LiveInput,
    PatternSource,
    Source,
    SourceSpec,
    SourceSpecError,
    open_source,
    parse_source_spec,
    render_pattern,
)
from engine.sources.pacing import Backoff

TIMEOUT = 10.0
FAST_BACKOFF = (0.05, 0.2)
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)  # RGB


def wait_for(condition: Callable[[], bool], timeout: float = TIMEOUT, interval: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def colour_name(frame: np.ndarray) -> str:
    """Which of the test colours a (lossily coded) solid frame is."""
    mean = frame.reshape(-1, 3).mean(axis=0)
    named = {"red": RED, "blue": BLUE, "green": GREEN}
    name, ref = min(named.items(), key=lambda kv: np.abs(mean - kv[1]).sum())
    assert np.abs(mean - ref).max() < 40, f"frame colour {mean} is none of the test colours"
    return name


def write_video(path: Path, fourcc: str = "MJPG", frames: int = 20, fps: float = 30) -> Path:
    """64x48 clip: first half red, second half blue, so a loop shows as blue then red again."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (64, 48))
    assert writer.isOpened(), f"cannot write {fourcc} video here"
    for i in range(frames):
        rgb = RED if i < frames // 2 else BLUE
        writer.write(np.full((48, 64, 3), rgb[::-1], np.uint8))  # VideoWriter takes BGR
    writer.release()
    return path


def write_image(path: Path, rgb: tuple[int, int, int]) -> Path:
    assert cv2.imwrite(str(path), np.full((30, 40, 3), rgb[::-1], np.uint8))
    return path


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return write_video(tmp_path / "clip.avi")


@pytest.fixture
def running() -> list:
    """Sources and inputs a test started; stopped at the end even when the test fails."""
    started: list = []
    yield started
    for item in started:
        item.stop()


# -- spec parsing -------------------------------------------------------------------


def test_parse_good_specs(clip: Path, tmp_path: Path) -> None:
    image = write_image(tmp_path / "still.png", RED)
    assert parse_source_spec("camera:0") == SourceSpec("camera", 0)
    assert parse_source_spec(" camera:3 ") == SourceSpec("camera", 3)
    assert parse_source_spec("camera:/dev/video2") == SourceSpec("camera", "/dev/video2")
    assert parse_source_spec(f"file:{clip}") == SourceSpec("file", str(clip))
    assert parse_source_spec(f"image:{image}") == SourceSpec("image", str(image))
    assert parse_source_spec("pattern") == SourceSpec("pattern")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty source spec"),
        ("webcam:0", "unknown source kind 'webcam'"),
        ("plasma", "unknown source 'plasma'"),
        ("camera:", "missing camera index"),
        ("camera:front", "camera must be an index"),
        ("camera:-1", "must be 0 or more"),
        ("camera:1.5", "camera must be an index"),
        ("file:", "missing path after 'file:'"),
        ("image:  ", "missing path after 'image:'"),
        ("file:/no/such/clip.mp4", "does not exist"),
        ("image:/no/such/still.png", "does not exist"),
        ("pattern:fast", "takes no argument"),
    ],
)
def test_parse_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(SourceSpecError, match=message):
        parse_source_spec(spec)


def test_parse_rejects_a_folder(tmp_path: Path) -> None:
    with pytest.raises(SourceSpecError, match="is not a file"):
        parse_source_spec(f"file:{tmp_path}")
    assert issubclass(SourceSpecError, ValueError)


def test_open_source_builds_unstarted_sources(clip: Path, tmp_path: Path) -> None:
    image = write_image(tmp_path / "still.png", RED)
    registry = ParamRegistry()
    built = {
        "camera:5": CaptureSource,
        f"file:{clip}": CaptureSource,
        f"image:{image}": ImageSource,
        "pattern": PatternSource,
    }
    for spec, cls in built.items():
        source = open_source(spec, registry, size=(160, 90))
        assert isinstance(source, cls), spec
        assert not source.running
    assert open_source("camera:/dev/video9").name == "camera:/dev/video9"
    assert open_source(f"file:{clip}").name == "file:clip.avi"
    assert "/source/pattern/speed" in registry
    if not Path("/dev/video0").exists():
        assert isinstance(open_source(None, size=(160, 90)), PatternSource)


# -- the pattern --------------------------------------------------------------------


def test_render_pattern_is_colourful_and_animated() -> None:
    a = render_pattern(0.0, 160, 90)
    assert a.shape == (90, 160, 3) and a.dtype == np.uint8
    assert a.std() > 30, "pattern looks blank"
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 50, "pattern has too few colours"
    assert all(a[..., c].std() > 20 for c in range(3)), "a colour channel is flat"
    np.testing.assert_array_equal(a, render_pattern(0.0, 160, 90))  # pure
    assert np.abs(a.astype(int) - render_pattern(0.5, 160, 90)).mean() > 5  # moves
    np.testing.assert_array_equal(render_pattern(3.0, 160, 90, speed=0.0), a)  # speed 0 freezes
    assert np.abs(a.astype(int) - render_pattern(0.0, 160, 90, scale=3.0)).mean() > 5  # zooms
    with pytest.raises(ValueError):
        render_pattern(0.0, 0, 90)


def test_pattern_source_runs_and_obeys_speed(running: list) -> None:
    registry = ParamRegistry()
    source = PatternSource((160, 90), fps=60, params=registry)
    assert {p.path for p in PatternSource.PARAMS} == {"/source/pattern/speed", "/source/pattern/scale"}
    assert registry.get("/source/pattern/speed") == 1.0
    running.append(source.start())

    assert wait_for(lambda: source.slot.latest()[1] >= 2)
    first, seq = source.slot.latest()
    assert first.shape == (90, 160, 3) and first.dtype == np.uint8
    assert wait_for(lambda: source.slot.latest()[1] >= seq + 3)
    assert not np.array_equal(first, source.slot.latest()[0]), "pattern source is not animated"
    assert "pattern ok" in source.status and source.healthy(2.0)

    registry.set("/source/pattern/speed", 0.0)
    registry.apply_pending(0.0)
    _, seq = source.slot.latest()
    assert wait_for(lambda: source.slot.latest()[1] >= seq + 2)  # a frame rendered at speed 0
    frozen, seq = source.slot.latest()
    assert wait_for(lambda: source.slot.latest()[1] >= seq + 3)
    np.testing.assert_array_equal(frozen, source.slot.latest()[0])


# -- video files --------------------------------------------------------------------


@pytest.mark.parametrize("name, fourcc", [("clip.avi", "MJPG"), ("clip.mp4", "mp4v")])
def test_video_file_colours_and_loop(tmp_path: Path, running: list, name: str, fourcc: str) -> None:
    source = CaptureSource.video_file(write_video(tmp_path / name, fourcc), backoff=FAST_BACKOFF)
    running.append(source.start())
    seen: list[tuple[str, int]] = []

    def looped() -> bool:
        frame, seq = source.slot.latest()
        if frame is not None and (not seen or seen[-1][1] != seq):
            seen.append((colour_name(frame), seq))
        names = [n for n, _ in seen]
        # red then blue then red again: the RGB order is right, and the file looped
        return "blue" in names and "red" in names[names.index("blue") :]

    assert wait_for(looped), f"saw {seen[:5]}...; status {source.status}"
    frame, _ = source.slot.latest()
    assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8
    assert source.slot.puts > 20
    assert source.status.startswith(f"file:{name} ok")
    assert source.problem is None


def test_vanishing_file_falls_back_and_recovers(clip: Path, running: list) -> None:
    live = LiveInput(CaptureSource.video_file(clip, backoff=FAST_BACKOFF), fallback_size=(80, 45), fps=30)
    running.append(live.start())
    assert wait_for(lambda: not live.latest()[2] and live.latest()[0].shape == (48, 64, 3))
    _, key_primary, _ = live.latest()

    hidden = clip.with_name("hidden.avi")
    clip.rename(hidden)
    assert wait_for(lambda: live.latest()[2]), f"no fallback; status {live.status}"
    assert "file:clip.avi lost (cannot open) — showing pattern" in live.status
    assert live.fallback_active

    # the pattern keeps frames coming, each with a new key
    frame, key, active = live.latest()
    assert active and frame.shape == (45, 80, 3) and key > key_primary
    assert wait_for(lambda: live.latest()[1] >= key + 5)
    assert live.latest()[0].std() > 10

    hidden.rename(clip)
    assert wait_for(lambda: not live.latest()[2]), f"no recovery; status {live.status}"
    frame, key_back, active = live.latest()
    assert frame.shape == (48, 64, 3) and colour_name(frame) in ("red", "blue")
    assert key_back > key and not active
    assert live.status.startswith("file:clip.avi ok")


def test_capture_watchdog_reports_a_stall() -> None:
    # a source whose thread never runs is as stuck as one blocked in a driver call
    source = CaptureSource.camera(0, watchdog=0.1)
    source._publish(np.zeros((4, 4, 3), np.uint8))
    assert "ok" in source.status
    assert wait_for(lambda: "lost (no frame for" in source.status)
    assert not source.healthy(0.1)


# -- still images -------------------------------------------------------------------


def test_image_reads_and_reloads_on_change(tmp_path: Path, running: list) -> None:
    path = write_image(tmp_path / "still.png", RED)
    source = ImageSource(path)
    running.append(source.start())
    assert wait_for(lambda: source.slot.latest()[0] is not None)
    frame, seq = source.slot.latest()
    assert frame.shape == (30, 40, 3) and frame.dtype == np.uint8
    assert colour_name(frame) == "red"
    assert wait_for(lambda: source.slot.latest()[1] > seq)  # re-published, so it stays fresh
    assert source.status == "image:still.png ok 40x30"

    write_image(path, GREEN)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # coarse clocks
    assert wait_for(lambda: colour_name(source.slot.latest()[0]) == "green")
    assert source.loads == 2


def test_missing_image_falls_back_then_recovers(tmp_path: Path, running: list) -> None:
    path = tmp_path / "later.png"
    live = LiveInput(ImageSource(path, backoff=FAST_BACKOFF), fallback_size=(80, 45))
    running.append(live.start())
    assert wait_for(lambda: live.latest()[0] is not None)
    frame, _, active = live.latest()
    assert active and frame.shape == (45, 80, 3)
    assert wait_for(lambda: "cannot read" in live.primary.status)
    assert live.status.startswith("image:later.png lost (cannot read) — showing pattern")

    write_image(path, BLUE)
    assert wait_for(lambda: not live.latest()[2])
    assert colour_name(live.latest()[0]) == "blue"


# -- cameras that are not there, and stopping ---------------------------------------


def test_camera_that_cannot_open_falls_back(running: list) -> None:
    live = LiveInput(open_source("camera:7", size=(64, 48)), fallback_size=(80, 45))
    running.append(live.start())
    assert wait_for(lambda: live.primary.problem is not None)
    assert wait_for(lambda: live.latest()[0] is not None)
    frame, key, active = live.latest()
    assert active and frame.shape == (45, 80, 3)
    assert wait_for(lambda: live.latest()[1] > key)  # still delivering
    assert live.status.startswith("camera:7 lost (cannot open) — showing pattern, retry in")
    live.stop()
    assert not live.primary.running and not live.fallback.running


def test_stop_interrupts_a_long_back_off(tmp_path: Path) -> None:
    source = CaptureSource.video_file(tmp_path / "gone.mp4", backoff=(30.0, 30.0)).start()
    assert wait_for(lambda: source.problem == "cannot open")
    assert "retry in" in source.status
    source.stop(timeout=5.0)
    assert not source.running, "stop() did not interrupt the 30 s back-off"


def test_stop_during_playback(clip: Path) -> None:
    source = CaptureSource.video_file(clip).start()
    assert wait_for(lambda: source.slot.puts > 2)
    source.stop(timeout=5.0)
    assert not source.running


class HandFedSource(Source):
    """A real source whose frames the test hands in, to pin down LiveInput's switching."""

    kind = "hand-fed"

    def _run(self) -> None:
        self._stop.wait()

    def feed(self, frame: np.ndarray) -> None:
        self._publish(frame)


def test_key_changes_on_every_switch_even_when_sequence_numbers_match(running: list) -> None:
    primary = HandFedSource("hand")
    live = LiveInput(primary, fallback_size=(80, 45), fps=2, max_age=0.3)  # slow pattern: seq 1 stays
    running.append(live.start())
    assert wait_for(lambda: live.latest()[0] is not None)
    pattern_frame, key, active = live.latest()
    assert active and live.status == "hand starting — showing pattern"

    primary.feed(np.full((4, 4, 3), 7, np.uint8))  # primary sequence 1, like the pattern's first frame
    frame, key_primary, active = live.latest()
    assert not active and frame[0, 0, 0] == 7
    assert key_primary != key
    assert live.latest()[1] == key_primary  # nothing new: same key, so nothing to re-upload

    assert wait_for(lambda: live.latest()[2])  # no frame for max_age: back to the pattern
    assert live.latest()[1] not in (key, key_primary)
    assert live.status.startswith("hand lost (no frame for")


def test_pattern_primary_has_no_fallback(running: list) -> None:
    live = LiveInput(PatternSource((80, 45)))
    running.append(live.start())
    assert wait_for(lambda: live.latest()[0] is not None)
    assert not live.latest()[2] and live.fallback is None
    assert live.status.startswith("pattern ok")


def test_backoff_doubles_up_to_the_cap() -> None:
    backoff = Backoff(0.5, 5.0)
    assert [backoff.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    backoff.reset()
    assert backoff.next_delay() == 0.5
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)
