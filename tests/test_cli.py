"""The ``dreamdeck`` command as a user runs it: real processes, real GL (headless EGL), real files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # seconds for one command; far above what any of them needs


def dreamdeck_command() -> list[str]:
    """The installed console script; ``python -m engine`` where it is not on PATH."""
    script = shutil.which("dreamdeck")
    return [script] if script else [sys.executable, "-m", "engine"]


def dreamdeck(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    return subprocess.run(
        [*dreamdeck_command(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=cwd or ROOT,
        env=env,
    )


def start(*args: str | Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    return subprocess.Popen(
        [*dreamdeck_command(), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )


@pytest.fixture
def presets_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "presets"
    folder.mkdir()
    shutil.copy(ROOT / "presets" / "default.toml", folder / "default.toml")
    return folder


# -- run ----------------------------------------------------------------------------------------


def test_headless_run_writes_a_screenshot_that_moves_with_time(tmp_path: Path) -> None:
    shots = {frames: tmp_path / f"out{frames}.png" for frames in (30, 120)}
    runs = {
        frames: start("run", "--headless", "--source", "pattern", "--frames", frames, "--screenshot", path)
        for frames, path in shots.items()
    }  # both at once: two cores, half the wait
    images = {}
    for frames, proc in runs.items():
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        finally:
            proc.kill()
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert f"{frames} frames" in err  # the closing summary line
        image = cv2.imread(str(shots[frames]), cv2.IMREAD_UNCHANGED)
        assert image is not None, f"{shots[frames]} is not an image"
        assert image.shape == (720, 1280, 3), image.shape
        assert image.std() > 20, f"the screenshot after {frames} frames looks blank (std {image.std():.1f})"
        images[frames] = image.astype(int)
    change = np.abs(images[30] - images[120]).mean()
    assert change > 2, f"30 and 120 frames gave nearly the same image (mean change {change:.2f})"


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--headless", "--size", "12"], "argument --size: '12' is not a size like 1280x720"),
        (["run", "--headless", "--output", "8x8"], "must be between 16 and 16384"),
        (["run", "--headless", "--frames", "-3"], "must not be negative"),
        (["run", "--headless", "--fps", "0"], "must be positive"),
        (["run", "--headless", "--device", "tpu"], "device 'tpu' is not one of auto, cuda, mps, cpu (or cuda:N)"),
        (["run", "--headless", "--accel", "fast"], "invalid choice: 'fast'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "required"),
    ],
)
def test_argument_errors_exit_2_with_one_error_line(args: list[str], message: str) -> None:
    result = dreamdeck(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and not result.stdout
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and lines[-1] == errors[0], lines  # the usage, then one line that says why
    assert lines[-1].startswith("dreamdeck") and message in lines[-1], lines[-1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--source", "webcam:0"], "unknown source kind 'webcam'"),
        (["--source", "camera:front"], "camera must be an index"),
        (["--source", "file:/no/such/clip.mp4"], "/no/such/clip.mp4 does not exist"),
        (["--source", "image:/no/such/still.png"], "/no/such/still.png does not exist"),
        (["--screenshot", "out.xyz"], "cannot write '.xyz' images"),
    ],
)
def test_run_usage_errors_are_one_line_before_anything_starts(args: list[str], message: str, tmp_path: Path) -> None:
    result = dreamdeck("run", "--headless", "--frames", "5", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("dreamdeck run: ") and message in lines[0], lines[0]
    assert not list(tmp_path.iterdir()), "a refused run must not write anything"


# -- presets, doctor, help -----------------------------------------------------------------------


def test_presets_lists_default_as_ok(presets_dir: Path) -> None:
    result = dreamdeck("presets", "--presets-dir", presets_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["1", "default", "ok"]


def test_presets_flags_a_broken_preset(presets_dir: Path) -> None:
    (presets_dir / "broken.toml").write_text("[fx.kaleido]\nsegmnets = 5\n", encoding="utf-8")
    result = dreamdeck("presets", "--presets-dir", presets_dir)
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].split()[:3] == ["1", "broken", "INVALID:"] and "segmnets" in lines[0]
    assert lines[1].split() == ["2", "default", "ok"]


def test_presets_in_an_empty_folder(tmp_path: Path) -> None:
    result = dreamdeck("presets", "--presets-dir", tmp_path)
    assert result.returncode == 1
    assert result.stdout.strip() == f"no presets in {tmp_path}"


def test_shipped_presets_are_all_valid() -> None:
    result = dreamdeck("presets")
    assert result.returncode == 0, result.stdout
    assert "INVALID" not in result.stdout and " default " in f" {result.stdout} "


def test_doctor_prints_a_table_with_a_gl_row() -> None:
    result = dreamdeck("doctor")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    header = lines[0]
    assert header.split() == ["check", "status", "detail"]
    status_at, detail_at = header.index("status"), header.index("detail")  # columns (names may hold spaces)
    rows = {line[:status_at].strip(): line[status_at:detail_at].strip() for line in lines[1:]}
    assert {"python", "numpy", "opencv", "gl", "display"} <= set(rows), rows
    assert set(rows.values()) <= {"ok", "warn", "missing"}, rows  # the doctor's three words
    assert rows["python"] == "ok"
    gl = next(line for line in lines if line.startswith("gl "))
    assert len(gl.split()) > 2, f"the gl row says nothing: {gl!r}"


@pytest.mark.parametrize(
    "command", [[], ["run"], ["presets"], ["params"], ["doctor"], ["bench"], ["bench", "render"], ["install-service"]]
)
def test_help_works_on_every_command(command: list[str]) -> None:
    result = dreamdeck(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {' '.join(['dreamdeck', *command])}"), result.stdout[:200]
    assert not result.stderr
