"""``scripts/bench_diffusion.py --tiny``: the one-shot GPU check's whole plan, on the CPU.

Every case runs in its own process, as on the GPU machine: the hot-path benches (eager,
compile with dynamo's eager backend, tensorrt falling back to compile), the real show
headless through EGL playing a video file (in-app fps), and a slow scene's bench. What is
checked: the exit status, one JSON per case, summary.json, the fell-back flag, the in-app
ratio, the wall-time budget, and the "no OpenGL here" skip. Figures are never asserted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="the diffusion extra is not installed")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_diffusion.py"
NO_EGL = {"__EGL_VENDOR_LIBRARY_FILENAMES": "/nonexistent/egl_vendor.json"}  # glvnd finds no EGL driver


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def check_script(path: Path = SCRIPT):
    spec = importlib.util.spec_from_file_location(f"{path.stem}_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def gl_works(extra: dict[str, str] | None = None) -> bool:
    probe = "from engine.render.surface import HeadlessSurface; HeadlessSurface().close()"
    return (
        subprocess.run(
            [sys.executable, "-c", probe], env=env(**(extra or {})), capture_output=True, timeout=60
        ).returncode
        == 0
    )


def run_check(out: Path, *args: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out), *args],
        cwd=ROOT,
        env=env(**(extra or {})),
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.mark.timeout(1200)  # about 100 CPU-seconds, in six processes; a shared build machine stretches that
def test_the_tiny_plan_runs_every_case(tmp_path):
    done = run_check(tmp_path, "--budget-s", "1200")  # (the default 8 minutes is the GPU machine's)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    plan = list(check_script().TINY_CASES)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["complete"] and summary["failed"] == [] and [c["case"] for c in summary["cases"]] == plan
    for name in plan:
        assert (tmp_path / f"{name}.json").exists(), name
    cases = {c["case"]: c for c in summary["cases"]}
    # the hot-path benches: both baselines and their ratios, the backend that ran
    for name in ("tiny-turbo-eager", "tiny-turbo-compile", "tiny-lcm4-eager", "tiny-turbo-tensorrt"):
        case = cases[name]
        assert case["status"] == "ok" and set(case["ratios"]) == {"own_vae", "taesd"}
        assert case["recompiles"]["in_timed_frames"] == 0
    assert cases["tiny-turbo-compile"]["accel"] == "compile" and not cases["tiny-turbo-compile"]["fell_back"]
    assert cases["tiny-lcm4-eager"]["steps"] == 4
    for kind in ("canny", "depth"):  # a ControlNet: against diffusers' ControlNet img2img (TAESD: its latent size)
        case = cases[f"tiny-turbo-{kind}-eager"]
        assert case["status"] == "ok" and case["controlnet"] == kind and set(case["ratios"]) == {"taesd"}
        assert case["baselines"]["taesd"]["pipeline"] == "StableDiffusionControlNetImg2ImgPipeline"
        assert "control" in case["engine"]["stages_ms"] and case["recompiles"]["in_timed_frames"] == 0
    xl = cases["tiny-sdxl-turbo-eager"]  # SDXL: against StableDiffusionXLImg2ImgPipeline, both VAEs
    assert xl["status"] == "ok" and xl["arch"] == "tiny-xl" and set(xl["ratios"]) == {"own_vae", "taesd"}
    assert xl["baselines"]["taesd"]["pipeline"] == "StableDiffusionXLImg2ImgPipeline"
    ip = cases["tiny-turbo-ip-adapter-eager"]
    assert ip["status"] == "ok" and ip["ip_adapter"] is True and set(ip["ratios"]) == {"own_vae", "taesd"}
    # tensorrt cannot run on a CPU: it fell back to compile, and the summary says so
    trt = cases["tiny-turbo-tensorrt"]
    assert trt["accel_requested"] == "tensorrt" and trt["accel"] == "compile" and trt["fell_back"] is True
    assert summary["fell_back"] == ["tiny-turbo-tensorrt"]
    row = next(line for line in summary["table"] if line.startswith("tiny-turbo-tensorrt"))
    assert "compile FELL BACK" in row and "FELL BACK (ran another backend than asked for)" in done.stdout
    # the in-app case: the real show through EGL, its scene fps held against the eager bench's
    inapp = cases["tiny-inapp"]
    if not gl_works():
        assert inapp["status"] == "skipped" and inapp["skipped"].startswith("no OpenGL here: ")
        pytest.skip("no EGL on this machine: the in-app case was skipped (checked above)")
    assert inapp["status"] == "ok" and inapp["active_scene"] == "realtime" and inapp["accel"] == "eager"
    assert inapp["fell_back"] is False and inapp["scene_fps"] > 0 and inapp["render_fps"] > 0
    assert inapp["compare_to"] == "tiny-turbo-eager"
    assert inapp["ratio"] == pytest.approx(inapp["scene_fps"] / cases["tiny-turbo-eager"]["engine"]["fps"])
    assert inapp["source"].startswith("file:") and "realtime" not in inapp["errors"]


def test_no_opengl_is_a_skip_not_a_failure(tmp_path):
    if gl_works(NO_EGL):
        pytest.skip("this machine's EGL does not go through glvnd: cannot take GL away here")
    done = run_check(tmp_path, "--cases", "tiny-inapp", extra=NO_EGL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failed"] == [] and summary["skipped"]["tiny-inapp"].startswith("no OpenGL here: ")
    assert "SKIPPED: no OpenGL here" in done.stdout


def test_a_spent_budget_starts_nothing_and_still_writes_the_summary(tmp_path):
    done = run_check(tmp_path, "--budget-s", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["complete"] and summary["failed"] == []
    assert set(summary["skipped"]) == set(check_script().TINY_CASES)
    assert all("wall-time budget" in why for why in summary["skipped"].values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_case_past_its_time_is_stopped_and_fails(tmp_path):
    script = check_script()
    case = script.Case(("-c", "import time; time.sleep(60)"), estimate_s=1)
    result = script.run_case("sleeper", case, tmp_path, env(), timeout=1.0)
    assert result["status"] == "failed" and result["error"].startswith("stopped after 1 s")
    assert "FAILED: stopped after 1 s" in script.table_row(result)


def test_a_failing_case_makes_the_check_fail(tmp_path):
    done = run_check(tmp_path, "--cases", "no-such-case")
    assert done.returncode == 2 and "unknown case" in done.stderr
    script = check_script()
    result = script.run_case("crash", script.Case(("-c", "raise SystemExit('boom')"), 1), tmp_path, env(), 60.0)
    assert result["status"] == "failed" and "boom" in result["error"]


def test_scripts_reach_the_package_without_editing_sys_path():
    for script in sorted((ROOT / "scripts").glob("bench_*.py")):
        text = script.read_text()
        assert "sys.path.insert" not in text and "sys.path.append" not in text, script.name
        assert "../shared" not in text, script.name


def test_every_gpu_case_is_a_valid_command_line():
    """The GPU plan cannot be run here: its command lines are at least accepted by their parsers
    (a typo found on the GPU machine costs a whole lease)."""
    import argparse

    from engine.diffusion.bench import add_arguments, options_from_args

    script = check_script()
    inapp_parser = check_script(ROOT / "scripts" / "bench_inapp.py").build_parser()
    checked = 0
    for name, case in script.GPU_CASES.items():
        bench = case.args[:2] == script.BENCH  # -m engine.diffusion.bench ..., else a script's path ...
        argv = [*(case.args[2:] if bench else case.args[1:]), "--json", "x.json"]
        if bench:
            parser = argparse.ArgumentParser()
            add_arguments(parser)
            options_from_args(parser.parse_args(argv))
        elif case.kind == "inapp":
            inapp_parser.parse_args(argv)
            assert case.compare in script.GPU_CASES
            assert list(script.GPU_CASES).index(case.compare) < list(script.GPU_CASES).index(name)
        else:
            continue
        checked += 1
    assert checked >= 6


def test_the_flow_cases_are_valid_command_lines_and_run_tiny(tmp_path):
    """The flow benches' GPU command lines parse; their tiny twins run and write their JSON."""
    import argparse

    from engine.diffusion.flow_bench import add_arguments

    script = check_script()
    for name in ("sana-sprint", "flux-schnell", "sd35-turbo"):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        parser.parse_args([*script.GPU_CASES[name].args[2:], "--json", "x.json"])
    done = run_check(tmp_path, "--cases", "tiny-sana-sprint", "--budget-s", "600")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "tiny-sana-sprint.json").exists()
    result = json.loads((tmp_path / "summary.json").read_text())["cases"][0]
    assert result["case"] == "tiny-sana-sprint" and result["kind"] == "other" and result["status"] == "ok"
    assert result["recompiles"]["in_timed_frames"] == 0 and result["ratio"] > 0 and result["steps"] == 1
