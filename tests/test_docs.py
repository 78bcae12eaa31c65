"""The README and the documentation site: short README, working links, generated pages that
cannot go stale, benchmark data in the shape the benchmarks write."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BENCH = DOCS / "data" / "bench"
PROVENANCE = {"command", "conditions", "date"}  # what a stored figure adds: how and where it was measured
UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _hook():
    spec = importlib.util.spec_from_file_location("dreamdeck_docs_hook", DOCS / "hooks" / "generated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hook = _hook()


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md"))


# ---- the README --------------------------------------------------------------------------


def test_readme_fits_on_a_screen_and_says_how_to_install_run_and_test():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 200
    for needed in (
        'pip install -e ".[dev]"',
        "dreamdeck run",
        'pip install -e ".[diffusion]"',
        "python3 -m pytest -q",
        "sudo bash scripts/setup-dev.sh",
        "docs/screenshot.png",
    ):
        assert needed in readme, needed


def test_readme_links_resolve_inside_the_repository():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    local = [link for link in MD_LINK.findall(readme) if "://" not in link]
    assert local, "the README links into the docs"
    for link in local:
        target = (ROOT / link.split("#")[0]).resolve()
        assert target.is_file() and ROOT in target.parents, link


def test_nothing_points_outside_the_repository():
    for path in [ROOT / "README.md", ROOT / "mkdocs.yml", *_pages()]:
        text = path.read_text(encoding="utf-8")
        assert "../shared" not in text and "DESIGN.md" not in text, path


# ---- generated blocks -------------------------------------------------------------------


def test_every_marker_fills_and_every_generated_table_keeps_its_columns():
    used = set()
    for page in _pages():
        text = page.read_text(encoding="utf-8")
        used.update(name for name, _ in hook.MARKER.findall(text))
        filled = hook.fill(text, page.name)
        assert not re.search(r"^<!-- dreamdeck:", filled, re.MULTILINE), page  # a marker no generator took
        header = None
        for line in filled.splitlines():
            if not line.startswith("|"):
                header = None
                continue
            count = len(UNESCAPED_PIPE.findall(line))
            header = header or count
            assert count == header, f"{page.name}: {line}"
    assert used == set(hook.GENERATORS)  # every generated block is on some page


def test_every_benchmark_file_has_a_table():
    used = set()
    for page in _pages():
        for _, args in hook.MARKER.findall(page.read_text(encoding="utf-8")):
            used.update(args.split())
    assert {p.name for p in BENCH.glob("*.json")} <= used


def test_a_bad_marker_or_data_file_fails_the_page(tmp_path, monkeypatch):
    with pytest.raises(hook.GenerationError, match="unknown marker dreamdeck:nope"):
        hook.fill("text\n<!-- dreamdeck:nope -->\n")
    with pytest.raises(hook.GenerationError, match="no benchmark file docs/data/bench/missing.json"):
        hook.fill("<!-- dreamdeck:bench-render missing.json -->")
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "empty.json").write_text("{}")
    monkeypatch.setattr(hook, "BENCH_DATA", tmp_path)
    with pytest.raises(hook.GenerationError, match="not JSON"):
        hook.fill("<!-- dreamdeck:bench-render broken.json -->")
    with pytest.raises(hook.GenerationError, match="no 'results'"):
        hook.fill("<!-- dreamdeck:bench-render empty.json -->")


def test_a_new_benchmark_run_is_a_new_table(tmp_path, monkeypatch):
    """A GPU check's summary.json, as scripts/bench_diffusion.py writes it, makes a table as it is:
    both baselines with their ratios, a backend that fell back marked, the in-app case as a line,
    its VQGAN+CLIP and LoRA cases left to their own tables, a failed or skipped case saying why."""
    stages = {"upload": 0.1, "encode": 0.4, "unet": 5.2, "decode": 0.6, "download": 0.2}
    bench = {
        "kind": "bench",
        "status": "ok",
        "device": "cuda",
        "gpu_name": "NVIDIA H200",
        "arch": "sd-turbo",
        "size": 512,
        "steps": 1,
        "dtype": "float16",
        "accel": "compile",
        "accel_requested": "compile",
        "fell_back": False,
        "startup": {"load_s": 9.0, "first_frame_s": 2.5},
        "engine": {"fps": 150.2, "p50_ms": 6.61, "p99_ms": 7.1, "stages_ms": stages},
        "baselines": {"own_vae": {"fps": 13.3, "p50_ms": 75.2}, "taesd": {"fps": 22.7, "p50_ms": 44.0}},
        "ratios": {"own_vae": 150.2 / 13.3, "taesd": 150.2 / 22.7},
    }
    summary = {
        "cases": [
            dict(bench, case="turbo-compile-warm"),
            dict(bench, case="turbo-tensorrt", accel_requested="tensorrt", fell_back=True),
            {
                "case": "turbo-inapp",
                "kind": "inapp",
                "status": "ok",
                "accel": "compile",
                "fell_back": False,
                "device": "cuda",
                "scene_fps": 120.0,
                "cap_fps": 60,
                "render_fps": 60.0,
                "ratio": 0.8,
                "compare_to": "turbo-compile-warm",
            },
            {"case": "lora", "kind": "other", "status": "ok", "device": "NVIDIA H200", "weight_change_ms": 0.1},
            {"case": "lcm4-compile", "kind": "bench", "status": "failed", "error": "stopped after 420 s"},
            {"case": "vqgan-clip", "kind": "other", "status": "skipped", "skipped": "wall-time budget: 20 s left"},
        ]
    }
    (tmp_path / "gpu.json").write_text(json.dumps(summary))
    monkeypatch.setattr(hook, "BENCH_DATA", tmp_path)
    block = hook.bench_diffusion("gpu.json")
    rows = [line for line in block.splitlines() if line.startswith("| `")]
    assert len(rows) == 4
    assert "NVIDIA H200" in rows[0] and "150.20 (7)" in rows[0] and "11.3x" in rows[0] and "6.6x" in rows[0]
    assert "FELL BACK" in rows[1] and "FELL BACK" not in rows[0]
    assert "failed: stopped after 420 s" in rows[2] and "skipped: wall-time budget" in rows[3]
    assert "`turbo-inapp`" in block and "0.80x the `turbo-compile-warm` bench" in block


# ---- benchmark data: the shape the benchmarks write --------------------------------------


def _literal_key_sets(script: Path) -> list[frozenset[str]]:
    """The key sets of every dict literal in a benchmark's source (its JSON records)."""
    sets = []
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.Dict)
            and node.keys
            and all(isinstance(k, ast.Constant) and isinstance(k.value, str) for k in node.keys)
        ):
            sets.append(frozenset(k.value for k in node.keys))
    return sets


SHAPES = {  # data file -> (the benchmark that writes it, the lists of records in it)
    "render-llvmpipe.json": ("engine/bench.py", ("results",)),
    "osc-640x360.json": ("scripts/bench_osc.py", ("with_render", "osc_alone")),
    "osc-1280x720.json": ("scripts/bench_osc.py", ("with_render",)),
    "vqgan-clip-cpu.json": ("scripts/bench_vqgan_clip.py", ("results",)),
    "drawers-cpu.json": ("scripts/bench_vqgan_clip.py", ("results",)),
    "lora-cpu.json": ("scripts/bench_lora.py", ()),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_benchmark_data_has_the_keys_its_benchmark_writes(name):
    script, record_lists = SHAPES[name]
    shapes = _literal_key_sets(ROOT / script)
    data = json.loads((BENCH / name).read_text())
    keys = frozenset(data) - PROVENANCE
    # a report is one dict literal, or one updated with another (bench_osc: the common fields, then a case's)
    assert keys in shapes or any(keys == a | b for a in shapes for b in shapes), (
        f"{name}: top-level keys differ from {script}'s"
    )
    for key in record_lists:
        for record in data[key]:
            assert frozenset(record) in shapes, f"{name}: a {key} record's keys differ from {script}'s"


# diffusion-cpu.json was measured before the bench had two baselines (1aa86c2): one `baseline`
# (the model's own VAE) and one `ratio`. The table still reads that shape; new data has today's.
DIFFUSION_CASE_BEFORE_TWO_BASELINES = frozenset(
    {
        "device",
        "gpu_name",
        "cpu",
        "threads",
        "arch",
        "weights",
        "size",
        "steps",
        "dtype",
        "vae",
        "accel",
        "accel_requested",
        "accel_ready_s",
        "accel_error",
        "startup",
        "frames",
        "engine",
        "baseline",
        "ratio",
        "versions",
        "command",
    }
)


def test_diffusion_data_has_the_keys_the_diffusion_bench_writes():
    shapes = _literal_key_sets(ROOT / "engine" / "diffusion" / "bench.py")
    summaries = _literal_key_sets(ROOT / "scripts" / "bench_diffusion.py")
    data = json.loads((BENCH / "diffusion-cpu.json").read_text())
    top = frozenset(data) - PROVENANCE
    assert top == {"cases"} or top in summaries  # scripts/bench_diffusion.py's summary.json
    for case in data["cases"]:  # each case: the bench's result + what the script adds
        keys = frozenset(case) - {"case", "wall_s", "kind", "status", "cpu_s"}
        assert keys in shapes or keys == DIFFUSION_CASE_BEFORE_TWO_BASELINES
        assert frozenset(case["startup"]) in shapes and frozenset(case["engine"]) in shapes


# ---- prose check ----------------------------------------------------------------------


def test_prose_paths_are_checked_against_the_registry():
    ok = (
        "`/fx/kaleido/segments`, `/lfo/<n>/rate`, `/output/keystone/{tl,tr,br,bl}_{x,y}`, `/fx/*/enabled`,"
        " `/dreamdeck/norm/fx/kaleido/rotate`, `/dreamdeck/norm/<path>`, `/dreamdeck/get`, `/scene/cue NAME`,"
        " `/dreamdeck/fx/kaleido/segments?VALUE`, `/dev/video2`, `/api/params`"
    )
    assert hook.unknown_paths(ok) == []
    stale = "set `/scene/realtime/config` or `/dreamdeck/fx/kaleido/wedges 6` or `/mod/<n>/depth`"
    assert hook.unknown_paths(stale) == ["/scene/realtime/config", "/dreamdeck/fx/kaleido/wedges", "/mod/<n>/depth"]


# ---- the site ---------------------------------------------------------------------------


def test_site_builds_strict(tmp_path):
    """What CI runs: a broken link or anchor, a bad marker or a stale parameter path fails it."""
    pytest.importorskip("mkdocs", reason='the docs extra: pip install -e ".[docs]"')
    pytest.importorskip("material", reason='the docs extra: pip install -e ".[docs]"')
    mkdocs = shutil.which("mkdocs")
    command = [mkdocs] if mkdocs else [sys.executable, "-m", "mkdocs"]
    done = subprocess.run(
        [*command, "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    parameters = (tmp_path / "site" / "reference" / "parameters" / "index.html").read_text(encoding="utf-8")
    assert "/fx/kaleido/segments" in parameters and "<table>" in parameters
