"""``dreamdeck bench diffusion --tiny --json`` writes every key; the GPU check script runs its plan.

The figures themselves are never asserted (they depend on the machine); only that they are
there, are numbers, and describe what ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="the diffusion extra is not installed")

from engine.diffusion.bench import main  # noqa: E402
from diffusion_fixtures import one_torch_thread  # noqa: E402,F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
STAGES = {"upload", "diffuse", "download"}


def check_result(result: dict, steps: int) -> None:
    for key in ("device", "gpu_name", "arch", "size", "steps", "accel", "engine", "baseline", "ratio"):
        assert key in result, key
    assert result["device"] == "cpu" and result["gpu_name"] is None
    assert result["arch"] == "tiny" and result["steps"] == steps and result["accel"] == "eager"
    engine = result["engine"]
    assert {"fps", "p50_ms", "p99_ms", "stages_ms"} <= set(engine)
    assert set(engine["stages_ms"]) == STAGES
    assert engine["fps"] > 0 and 0 < engine["p50_ms"] <= engine["p99_ms"]
    assert all(value >= 0 for value in engine["stages_ms"].values()) and engine["stages_ms"]["diffuse"] > 0
    assert result["baseline"]["fps"] > 0 and result["baseline"]["p50_ms"] > 0
    assert result["ratio"] == pytest.approx(engine["fps"] / result["baseline"]["fps"])
    # the first diffused frame, timed from the loaded weights: at least the frames that fill the stream batch
    startup = result["startup"]
    assert startup["load_s"] > 0 and startup["first_frame_s"] > 0
    assert startup["first_frame_s"] >= steps * engine["stages_ms"]["diffuse"] / 1000.0 * 0.5


def test_bench_tiny_json_has_every_key(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["--tiny", "--device", "cpu", "--frames", "3", "--warmup", "1", "--baseline-frames", "2",
                 "--json", str(path)]) == 0
    check_result(json.loads(path.read_text()), steps=1)
    table = capsys.readouterr().out
    assert "engine (hot path)" in table and "baseline (diffusers)" in table and "ratio" in table


def test_bench_usage_errors_are_one_line(capsys):
    assert main(["--tiny", "--frames", "0"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_gpu_check_script_runs_with_tiny_models(tmp_path):
    """Two cases of the --tiny plan: the diffusion bench and a slow-scene bench (each case is
    a process of its own: seconds of imports)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_diffusion.py"), "--tiny", "--out",
                           str(tmp_path), "--cases", "tiny-lcm4-eager", "tiny-vqgan-clip"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [case["case"] for case in summary["cases"]] == ["tiny-lcm4-eager", "tiny-vqgan-clip"]
    check_result(json.loads((tmp_path / "tiny-lcm4-eager.json").read_text()), steps=4)
    assert "tiny-lcm4-eager" in done.stdout and "ratio" in done.stdout
    vqgan = json.loads((tmp_path / "tiny-vqgan-clip.json").read_text())
    assert [r["size"] for r in vqgan["results"]] == [32, 64] and all(r["steps_per_second"] > 0 for r in vqgan["results"])
