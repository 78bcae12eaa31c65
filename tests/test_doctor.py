"""The doctor: every check gives a row, probes are isolated, the table lines up."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

from engine import doctor


def test_collect_gives_one_one_line_row_per_check():
    rows = doctor.collect()
    assert [row[0] for row in rows] == list(doctor.CHECKS)
    assert set(doctor.CHECKS) >= {
        "python",
        "numpy",
        "opencv",
        "torch",
        "accelerator",
        "gl",
        "display",
        "cameras",
        "midi",
        "model cache",
    }
    for check, status, detail in rows:
        assert status in ("ok", "warn", "missing"), (check, status)
        assert detail and "\n" not in detail, (check, detail)
    by_name = {row[0]: row for row in rows}
    assert by_name["python"][2].startswith(f"{sys.version_info.major}.{sys.version_info.minor}.")


def test_gl_row_names_the_renderer_and_version():
    moderngl = pytest.importorskip("moderngl")
    try:
        ctx = moderngl.create_context(standalone=True, backend="egl")
    except Exception as exc:  # no EGL on this machine: the row's own test is the failure one below
        pytest.skip(f"no EGL here: {exc}")
    renderer, version = ctx.info["GL_RENDERER"], ctx.info["GL_VERSION"]
    ctx.release()

    check, status, detail = doctor.probe_gl()
    assert check == "gl"
    assert renderer in detail and version in detail
    if "llvmpipe" in renderer:
        assert status == "warn" and "software rendering" in detail
    else:
        assert status == "ok"


def test_a_failing_probe_becomes_a_warn_row_and_the_others_still_run(monkeypatch):
    def broken() -> doctor.Row:
        raise RuntimeError("driver exploded\nwith a long traceback-ish message")

    monkeypatch.setattr(doctor, "PROBES", (("gl", broken), ("python", doctor.probe_python)))
    rows = doctor.collect()
    assert rows[0] == ("gl", "warn", "probe failed: RuntimeError: driver exploded")
    assert rows[1][0] == "python" and rows[1][1] == "ok"


def test_gl_failure_is_one_line(monkeypatch):
    def no_egl(**kwargs):
        raise OSError("libEGL.so.1: cannot open shared object file\nmore detail")

    monkeypatch.setitem(sys.modules, "moderngl", types.SimpleNamespace(create_context=no_egl))
    assert doctor.probe_gl() == ("gl", "warn", "no EGL context: OSError: libEGL.so.1: cannot open shared object file")


def test_missing_torch_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    assert doctor.probe_torch() == ("torch", "missing", "not installed — install the diffusion extra")
    assert doctor.probe_accelerator() == ("accelerator", "warn", "unknown: torch is not installed")


def test_accelerator_row_on_cpu_or_gpu():
    torch = pytest.importorskip("torch")
    check, status, detail = doctor.probe_accelerator()
    if torch.cuda.is_available():
        assert status == "ok" and torch.cuda.get_device_name(0) in detail and "GiB" in detail
    elif not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        assert (status, detail) == ("warn", "CPU only: diffusion scenes will not be real time")


def test_midi_rows(monkeypatch):
    monkeypatch.setitem(sys.modules, "mido", None)
    assert doctor.probe_midi() == ("midi", "missing", "not installed — pip install mido python-rtmidi")

    def no_backend():
        raise ModuleNotFoundError("No module named 'rtmidi'")

    monkeypatch.setitem(
        sys.modules, "mido", types.SimpleNamespace(get_input_names=no_backend, get_output_names=lambda: [])
    )
    assert doctor.probe_midi() == ("midi", "warn", "cannot list ports: ModuleNotFoundError: No module named 'rtmidi'")

    monkeypatch.setitem(
        sys.modules,
        "mido",
        types.SimpleNamespace(get_input_names=lambda: ["nanoKONTROL2"], get_output_names=lambda: []),
    )
    assert doctor.probe_midi() == ("midi", "ok", "in: nanoKONTROL2; out: none")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="X11/Wayland display variables")
def test_display_without_a_display_says_why(monkeypatch):
    pytest.importorskip("glfw")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    check, status, detail = doctor.probe_display()
    assert (check, status) == ("display", "warn")
    assert detail.startswith("no DISPLAY or WAYLAND_DISPLAY; glfw.init() failed: ")
    assert "b'" not in detail and detail.endswith("(headless only)")


def test_cameras_none_found_and_nodes_that_do_not_open(tmp_path):
    assert doctor.probe_cameras(str(tmp_path / "video*")) == ("cameras", "warn", "none found")
    (tmp_path / "video0").write_bytes(b"not a camera")
    assert doctor.probe_cameras(str(tmp_path / "video*")) == ("cameras", "warn", "none found (1 nodes, none opens)")


def test_model_cache_lists_models_with_sizes(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert doctor.probe_model_cache() == (
        "model cache",
        "warn",
        f"{cache} does not exist (models download on first use)",
    )
    cache.mkdir()
    (cache / "version.txt").write_text("1")
    assert doctor.probe_model_cache()[1:] == ("warn", f"{cache} is empty (models download on first use)")

    tiny = cache / "models--org--tiny"
    (tiny / "blobs").mkdir(parents=True)
    (tiny / "blobs" / "abc123").write_bytes(b"x" * 3000)
    (tiny / "snapshots" / "main").mkdir(parents=True)
    if os.name == "posix":  # the hub links snapshots to blobs; a link must not count twice
        os.symlink(tiny / "blobs" / "abc123", tiny / "snapshots" / "main" / "model.safetensors")
    (cache / "models--gpt2" / "blobs").mkdir(parents=True)
    (cache / "models--gpt2" / "blobs" / "b").write_bytes(b"y" * 10)
    (cache / "datasets--org--data").mkdir()

    check, status, detail = doctor.probe_model_cache()
    assert (check, status) == ("model cache", "ok")
    assert detail == f"{cache}: gpt2 (10 B), org/tiny (2.9 KiB)"


def test_model_cache_dir_follows_the_hub_rules():
    home = Path.home()
    assert doctor.model_cache_dir({}) == home / ".cache" / "huggingface" / "hub"
    assert doctor.model_cache_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/huggingface/hub")
    assert doctor.model_cache_dir({"HF_HOME": "/h", "XDG_CACHE_HOME": "/x"}) == Path("/h/hub")
    assert doctor.model_cache_dir({"HF_HUB_CACHE": "/c", "HF_HOME": "/h"}) == Path("/c")
    assert doctor.model_cache_dir({"HF_HOME": "~/hf"}) == home / "hf" / "hub"


def test_scene_models_names_the_shipped_ddpm_and_where_the_vqgan_goes(tmp_path):
    check, status, detail = doctor.probe_scene_models({"XDG_CACHE_HOME": str(tmp_path)})
    assert (check, status) == ("scene models", "ok")
    assert detail.startswith("shipped DDPM 8.") and "MiB" in detail  # the fp16 weights in git
    assert f"no VQGAN checkpoint in {tmp_path}/dreamdeck/vqgan_imagenet_f16_16384" in detail

    folder = tmp_path / "dreamdeck" / "vqgan_imagenet_f16_16384"
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"x")
    (folder / "model.yaml").write_text("model: {}")
    assert doctor.probe_scene_models({"XDG_CACHE_HOME": str(tmp_path)})[2].endswith(f"VQGAN in {folder}")


def test_format_table_aligns_columns():
    rows = [("python", "ok", "3.11.7"), ("model cache", "missing", "/a/b"), ("gl", "warn", "")]
    lines = doctor.format_table(rows).splitlines()
    assert lines == [
        "check        status   detail",
        "python       ok       3.11.7",
        "model cache  missing  /a/b",
        "gl           warn",
    ]
