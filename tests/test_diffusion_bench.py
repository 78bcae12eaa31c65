"""``dreamdeck bench diffusion --tiny --json`` writes every key, both baselines and what backend ran.

The figures themselves are never asserted (they depend on the machine); only that they are
there, are numbers, and describe what ran. The GPU check script that runs these as cases
is tested in test_bench_gpu_check.py.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="the diffusion extra is not installed")

from diffusion_fixtures import one_torch_thread  # noqa: E402,F401  (fixtures)
from engine.diffusion.bench import main  # noqa: E402

STAGES = {"upload", "diffuse", "download"}


def check_result(result: dict, steps: int, accel: str = "eager", requested: str = "eager") -> None:
    """Every key of a tiny CPU result, with the values that describe what ran."""
    for key in (
        "device",
        "gpu_name",
        "arch",
        "size",
        "steps",
        "accel",
        "accel_requested",
        "fell_back",
        "fallback_reason",
        "engine",
        "baselines",
        "ratios",
        "recompiles",
        "syncs",
        "startup",
    ):
        assert key in result, key
    assert result["device"] == "cpu" and result["gpu_name"] is None
    assert result["arch"] == "tiny" and result["steps"] == steps
    assert result["accel"] == accel and result["accel_requested"] == requested
    assert result["fell_back"] is (accel != requested)
    engine = result["engine"]
    assert {"fps", "p50_ms", "p99_ms", "stages_ms"} <= set(engine)
    assert set(engine["stages_ms"]) == STAGES
    assert engine["fps"] > 0 and 0 < engine["p50_ms"] <= engine["p99_ms"]
    assert all(value >= 0 for value in engine["stages_ms"].values()) and engine["stages_ms"]["diffuse"] > 0
    # two baselines, the model's own VAE and the engine's TAESD, each with its ratio
    baselines = result["baselines"]
    assert set(baselines) == {"own_vae", "taesd"} == set(result["ratios"])
    assert baselines["own_vae"]["vae"] == "AutoencoderKL" and baselines["taesd"]["vae"] == "AutoencoderTiny"
    for name, baseline in baselines.items():
        assert baseline["pipeline"] == "StableDiffusionImg2ImgPipeline"
        assert baseline["fps"] > 0 and baseline["p50_ms"] > 0
        assert result["ratios"][name] == pytest.approx(engine["fps"] / baseline["fps"])
    # the first diffused frame, timed from the loaded weights: at least the frames that fill the stream batch
    startup = result["startup"]
    assert startup["load_s"] > 0 and startup["first_frame_s"] > 0
    assert startup["first_frame_s"] >= steps * engine["stages_ms"]["diffuse"] / 1000.0 * 0.5
    # nothing compiles in the timed frames; on a CPU there is no CUDA sync check to run
    assert result["recompiles"]["in_timed_frames"] == 0
    assert result["syncs"]["per_frame"] is None and "cpu" in result["syncs"]["how"]


def test_bench_tiny_json_has_every_key(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert (
        main(
            [
                "--tiny",
                "--device",
                "cpu",
                "--frames",
                "3",
                "--warmup",
                "1",
                "--baseline-frames",
                "2",
                "--json",
                str(path),
            ]
        )
        == 0
    )
    result = json.loads(path.read_text())
    check_result(result, steps=1)
    assert result["recompiles"]["by_build"] == 0  # eager: dynamo never ran
    table = capsys.readouterr().out
    for line in ("engine (hot path)", "diffusers, the model's own VAE", "diffusers, the same TAESD", "recompiles"):
        assert line in table
    assert "FELL BACK" not in table


def test_bench_tensorrt_on_cpu_falls_back_to_compile_and_says_so(tmp_path, capsys):
    """No TensorRT here: the policy's fallback runs, and the result says which backend ran."""
    path = tmp_path / "bench.json"
    assert (
        main(
            [
                "--tiny",
                "--device",
                "cpu",
                "--frames",
                "2",
                "--warmup",
                "1",
                "--baseline-frames",
                "1",
                "--accel",
                "tensorrt",
                "--compile-backend",
                "eager",
                "--json",
                str(path),
            ]
        )
        == 0
    )
    result = json.loads(path.read_text())
    check_result(result, steps=1, accel="compile", requested="tensorrt")
    assert "CUDA" in result["fallback_reason"] and result["compile_backend"] == "eager"
    assert result["recompiles"]["by_build"] > 0  # the fallback really compiled (dynamo traced the stages)
    assert "asked for tensorrt: FELL BACK" in capsys.readouterr().out


def test_bench_usage_errors_are_one_line(capsys):
    assert main(["--tiny", "--frames", "0"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert main(["--tiny", "--sync-frames", "-1"]) == 2
    assert "--sync-frames" in capsys.readouterr().err


def test_accel_help_calls_tensorrt_experimental():
    import argparse

    from engine.diffusion.bench import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert "tensorrt (experimental, never run on a GPU yet)" in " ".join(parser.format_help().split())
