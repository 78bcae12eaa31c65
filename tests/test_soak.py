"""The soak, short: 600 frames of everything going wrong, and the leak detector proven to fire.

Run as a subprocess, as a person runs it: the memory it measures is its own, not pytest's.
The 24-hour procedure is in the README.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOAK = ROOT / "scripts" / "soak.py"
EVENTS = {"scene", "preset", "osc", "clip_away", "shader_break", "clip_back", "shader_fix"}


def soak(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, str(SOAK), "--json", str(out), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    report = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {}
    return done, report


def test_short_soak_survives_everything_without_growing(tmp_path: Path) -> None:
    done, report = soak(tmp_path, "--frames", "600", "--every", "15")
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert report["ok"] and report["frames"] >= 600 and report["failures"] == []
    assert set(report["events"]) == EVENTS, report["events"]
    assert report["rss_growth"] < 0.05 and report["warmup_frames"] >= 240
    assert report["osc_packets_sent"] >= 300 and report["http_requests"] > 0 and report["http_failures"] == []
    errors = report["errors_seen"]
    assert any("preset refused" in e for e in errors), errors  # the broken presets were tried and refused
    assert any("grade.glsl" in e for e in errors), errors  # the broken shader was reported
    assert report["final_source"].startswith("file:camera.avi ok"), "the camera stand-in came back"
    assert "PASS" in done.stdout and "resident memory" in done.stdout
    assert len(report["samples"]) >= 10 and all(s["rss_mb"] > 0 for s in report["samples"])


def test_soak_catches_a_leak(tmp_path: Path) -> None:
    done, report = soak(tmp_path, "--frames", "400", "--every", "15", "--events", "scene",
                        "--self-test-leak-kb", "500")
    assert done.returncode == 1, done.stdout + done.stderr[-4000:]
    assert not report["ok"] and "resident memory grew" in report["failures"][0]
    assert "FAIL" in done.stdout
