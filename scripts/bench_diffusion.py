#!/usr/bin/env python3
"""The one-shot GPU check: every diffusion case, each in its own process, JSON per case, one summary.

Made for one H100 / H200 with no network, and at most 8 minutes of wall time (``--budget-s``:
once it is spent no case is started, and the summary is written all the same). From the
root of a checkout, with nothing installed but torch, transformers and peft:

    PYTHONPATH=$PWD python3 scripts/bench_diffusion.py --out bench-out

(the scripts import the ``engine`` package from the installed dreamdeck or from
PYTHONPATH; they never edit ``sys.path``). Packages that machine lacks travel as wheels in
the checkout's ``.whl/`` folder (git ignores it), fetched beforehand on a machine with
network, for the GPU machine's Python and platform:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl diffusers importlib_metadata tomli_w moderngl glcontext glfw
    # (pin each to the version you test with: python3 -m pip show NAME; a package the GPU
    #  machine lacks besides these shows as "missing Python modules" below, or an ImportError)
    # on the GPU machine:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 scripts/bench_diffusion.py --out bench-out

The in-app case also needs EGL: the Debian packages libegl1 libglvnd0 libgl1 libglx0
libopengl0 libgles2 (``apt-get download`` them into a folder, ``dpkg -x`` each into / there,
then ``ldconfig``; the GPU driver brings the NVIDIA EGL vendor library). Without GL the
case is listed as skipped ("no OpenGL here: ..."), not failed, and the others still count.

Cases, in the order they run (full-size architectures, random weights: a forward pass
costs the same whatever the weights; fp16 on the GPU):

    turbo-eager          SD-turbo 512x512, 1 step, eager; both diffusers baselines (own VAE, TAESD)
    turbo-compile-cold   the same with torch.compile, an empty inductor cache (the cold build)
    turbo-compile-warm   the same again: the first one's cache is warm
    turbo-inapp          the real show, headless (EGL), a video file through the realtime
                         scene, compiled; its scene fps against turbo-compile-warm's
    lcm4-compile         SD 1.5 + LCM, 4 steps as one stream batch, torch.compile
    turbo-tensorrt       --accel tensorrt (experimental): TensorRT where installed, else its
                         fallback to compile, flagged in the summary
    vqgan-clip, lora     the slow scenes' benches (scripts/bench_vqgan_clip.py: each drawer; bench_lora.py)
    turbo-canny-compile  SD-turbo + a canny ControlNet (the torch Canny on the device), compiled;
                         baseline: StableDiffusionControlNetImg2ImgPipeline with cv2.Canny
    turbo-depth-compile  SD-turbo + a depth ControlNet, Depth Anything V2 Small (random weights)
                         included; baseline: the same with transformers' depth-estimation pipeline
    sdxl-turbo-compile   SDXL-turbo 512x512, 1 step, compiled; baselines StableDiffusionXLImg2ImgPipeline
    turbo-ip-adapter-compile  SD-turbo + an IP-Adapter (random, ViT-H encoder), compiled; baselines
                         get ip_adapter_image (diffusers encodes the picture each call)
    sana-sprint          SANA-Sprint 0.6B 512x512, 1 step, compiled, bf16: fps against
                         SanaSprintImg2ImgPipeline in the same run (engine.diffusion.flow_bench)
    flux-schnell         FLUX.1-schnell 512x512, 4 steps, compiled, bf16: seconds per image
    sd35-turbo           SD3.5 Large Turbo 512x512, 4 steps, compiled, bf16: seconds per image
                         (the three flow cases come last: past the 8 minutes of the UNet cases,
                         run them on their own with ``--cases sana-sprint flux-schnell sd35-turbo``)

Each bench case reports fps, p50/p99, ratios against both baselines, the first diffused
frame after the weights loaded, the backend's build time, whether the backend asked for is
the one that ran (``fell_back``), dynamo recompiles in the timed frames and host syncs per
frame. Exit status: 0 all ran (or were skipped), 1 a case failed, 2 a usage error.

``--tiny`` runs the same plan with tiny models on the CPU (the CI check of this script:
under two minutes on two cores); its compile cases use dynamo's ``eager`` backend (tracing,
guards and recompiles without inductor's minutes of code generation), and its LCM case runs
eager (the stream batch is what it checks).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from engine.files import write_atomic

SCRIPTS = Path(__file__).resolve().parent
NEEDED = ("torch", "diffusers", "transformers", "PIL", "cv2", "numpy")
DEFAULT_BUDGET_S = 480.0


@dataclass(frozen=True)
class Case:
    """One process: ``args`` after ``python3``; ``estimate_s``: about what it takes (not started
    with less budget left); ``compare``: the bench case an in-app case is held against."""

    args: tuple[str, ...]
    estimate_s: float
    kind: str = "bench"  # bench | inapp | other (a slow scene's bench, with its own table)
    compare: str | None = None


BENCH = ("-m", "engine.diffusion.bench")
INAPP = (str(SCRIPTS / "bench_inapp.py"),)
VQGAN_CLIP = (str(SCRIPTS / "bench_vqgan_clip.py"),)
LORA = (str(SCRIPTS / "bench_lora.py"),)
FLOW = ("-m", "engine.diffusion.flow_bench")
TURBO = (*BENCH, "--arch", "sd-turbo", "--random-weights")
# estimates from the H200 anchors (DESIGN.md): ~20 s of process start, imports and random
# weights a case, a cold compile 86 s, a warm one 21 s; the first five fit the 8-minute budget
GPU_CASES = {
    "turbo-eager": Case((*TURBO, "--accel", "eager"), 40),
    "turbo-compile-cold": Case((*TURBO, "--accel", "compile"), 130),
    "turbo-compile-warm": Case((*TURBO, "--accel", "compile"), 70),
    "turbo-inapp": Case(
        (*INAPP, "--random-weights", "--accel", "compile", "--seconds", "8"), 90, "inapp", compare="turbo-compile-warm"
    ),
    "lcm4-compile": Case((*BENCH, "--arch", "sd15", "--random-weights", "--steps", "4", "--accel", "compile"), 130),
    "turbo-tensorrt": Case((*TURBO, "--accel", "tensorrt"), 90),
    "vqgan-clip": Case(
        (*VQGAN_CLIP, "--device", "cuda", "--autocast", "bfloat16", "--steps", "20", "--warmup", "3"), 90, "other"
    ),
    "lora": Case((*LORA, "--device", "cuda"), 60, "other"),
    "turbo-canny-compile": Case((*TURBO, "--accel", "compile", "--controlnet", "canny"), 110),
    "turbo-depth-compile": Case((*TURBO, "--accel", "compile", "--controlnet", "depth"), 120),
    "sdxl-turbo-compile": Case((*BENCH, "--arch", "sdxl-turbo", "--random-weights", "--accel", "compile"), 180),
    "turbo-ip-adapter-compile": Case((*TURBO, "--accel", "compile", "--ip-adapter"), 120),
    "sana-sprint": Case((*FLOW, "--case", "sana-sprint", "--device", "cuda"), 120, "other"),
    "flux-schnell": Case((*FLOW, "--case", "flux-schnell", "--device", "cuda", "--frames", "20"), 200, "other"),
    "sd35-turbo": Case((*FLOW, "--case", "sd35-turbo", "--device", "cuda", "--frames", "20"), 180, "other"),
}
TINY_BENCH = (*BENCH, "--tiny", "--device", "cpu", "--frames", "3", "--warmup", "1", "--baseline-frames", "2")
TINY_CASES = {
    "tiny-turbo-eager": Case((*TINY_BENCH, "--accel", "eager"), 5),
    "tiny-turbo-compile": Case((*TINY_BENCH, "--accel", "compile", "--compile-backend", "eager"), 5),
    "tiny-inapp": Case(
        (*INAPP, "--tiny", "--device", "cpu", "--accel", "eager", "--seconds", "3", "--warmup-s", "1"),
        5,
        "inapp",
        compare="tiny-turbo-eager",
    ),
    "tiny-lcm4-eager": Case((*TINY_BENCH, "--arch", "sd15", "--accel", "eager"), 5),
    "tiny-turbo-tensorrt": Case((*TINY_BENCH, "--accel", "tensorrt", "--compile-backend", "eager"), 5),
    "tiny-vqgan-clip": Case((*VQGAN_CLIP, "--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1"), 5, "other"),
    "tiny-turbo-canny-eager": Case((*TINY_BENCH, "--accel", "eager", "--controlnet", "canny"), 5),
    "tiny-turbo-depth-eager": Case((*TINY_BENCH, "--accel", "eager", "--controlnet", "depth"), 5),
    "tiny-sdxl-turbo-eager": Case((*TINY_BENCH, "--arch", "sdxl-turbo", "--accel", "eager"), 5),
    "tiny-turbo-ip-adapter-eager": Case((*TINY_BENCH, "--accel", "eager", "--ip-adapter"), 5),
    **{
        f"tiny-{name}": Case(
            (*FLOW, "--case", name, "--tiny", "--frames", "3", "--warmup", "1", "--baseline-frames", "2"), 5, "other"
        )
        for name in ("sana-sprint", "flux-schnell", "sd35-turbo")
    },
}


def missing_modules() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def run_case(name: str, case: Case, out: Path, env: dict[str, str], timeout: float) -> dict:
    """Run one case's process; its JSON, with ``case``, ``kind``, ``status`` and ``wall_s`` added."""
    json_path = out / f"{name}.json"
    command = [sys.executable, *case.args, "--json", str(json_path)]
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    started, cpu_before = time.monotonic(), _children_cpu_s()
    head = {"case": name, "kind": case.kind}
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        print(f"   stopped after {timeout:.0f} s", flush=True)
        tail = (exc.stderr or b"")[-2000:]
        print(tail.decode(errors="replace") if isinstance(tail, bytes) else tail, file=sys.stderr, flush=True)
        return {
            **head,
            "status": "failed",
            "error": f"stopped after {timeout:.0f} s (case timeout or wall-time budget)",
            "wall_s": round(time.monotonic() - started, 1),
        }
    print(done.stdout, end="", flush=True)
    wall = round(time.monotonic() - started, 1)
    if done.returncode != 0 or not json_path.exists():
        print(done.stderr[-3000:], file=sys.stderr, flush=True)
        last = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {**head, "status": "failed", "error": f"exit {done.returncode}: {last[0][:300]}", "wall_s": wall}
    result = json.loads(json_path.read_text())
    status = "skipped" if "skipped" in result else "ok"
    cpu_after = _children_cpu_s()
    cpu = round(cpu_after - cpu_before, 1) if cpu_after is not None and cpu_before is not None else None
    return {**result, **head, "status": status, "wall_s": wall, "cpu_s": cpu}


def _children_cpu_s() -> float | None:
    """CPU seconds of the finished case processes so far (what a shared CI machine pays); None on Windows."""
    try:
        import resource
    except ImportError:
        return None
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def compare_inapp(results: list[dict], cases: dict[str, Case]) -> None:
    """Each in-app result gets its bench case's fps and the ratio scene fps / bench fps."""
    by_name = {r["case"]: r for r in results}
    for result in results:
        compare = cases[result["case"]].compare
        if result["kind"] != "inapp" or result["status"] != "ok" or compare is None:
            continue
        bench = by_name.get(compare)
        result["compare_to"] = compare
        if bench is None or bench["status"] != "ok":
            result["bench_fps"] = result["ratio"] = None
            continue
        result["bench_fps"] = bench["engine"]["fps"]
        result["ratio"] = result["scene_fps"] / bench["engine"]["fps"]


def _num(value: float | None, width: int, digits: int = 1) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def table_row(r: dict) -> str:
    """One line of the summary: a bench case, an in-app case, a slow-scene case, or why not."""
    head = f"{r['case']:28}"
    if r["status"] in ("failed", "skipped") and "engine" not in r and "scene_fps" not in r:
        return f"{head}{r['status'].upper()}: {r.get('error') or r.get('skipped')}"
    if r["kind"] == "other":
        return f"{head}ok (its own table above)"
    backend = r["accel"] + (" FELL BACK" if r.get("fell_back") else "")
    if r["kind"] == "inapp":
        ratio = f"{r['ratio']:.2f}x {r['compare_to']}" if r.get("ratio") is not None else "-"
        return (
            f"{head}{backend:20}{r['scene_fps']:9.1f}{'':18}"
            f"{'in-app scene fps, cap ' + format(r['cap_fps'], '.0f'):>36}"
            f"  render {r['render_fps']:.1f} fps; vs bench {ratio}"
        )
    e, ratios, b = r["engine"], r["ratios"], r["baselines"]
    own, taesd = b.get("own_vae", {}), b.get("taesd", {})
    syncs = r["syncs"]["per_frame"]
    return (
        f"{head}{backend:20}{e['fps']:9.1f}{e['p50_ms']:9.2f}{e['p99_ms']:9.2f}"
        f"{_num(own.get('fps'), 9)}{_num(ratios.get('own_vae'), 7)}{_num(taesd.get('fps'), 9)}"
        f"{_num(ratios.get('taesd'), 7)}{_num(r['startup']['first_frame_s'], 9, 2)}{_num(r['accel_ready_s'], 8)}"
        f"{r['recompiles']['in_timed_frames']:6d}{_num(syncs, 7)}  {r['gpu_name'] or r['device']}"
    )


TABLE_HEAD = (
    f"{'case':28}{'backend':20}{'fps':>9}{'p50 ms':>9}{'p99 ms':>9}{'KL fps':>9}{'ratio':>7}"
    f"{'TAESD':>9}{'ratio':>7}{'1st fr s':>9}{'build s':>8}{'recmp':>6}{'syncs':>7}  device"
)


def write_summary(out: Path, results: list[dict], budget_s: float, started: float, done: bool) -> None:
    summary = {
        "budget_s": budget_s,
        "elapsed_s": round(time.monotonic() - started, 1),
        "complete": done,
        "failed": [r["case"] for r in results if r["status"] == "failed"],
        "skipped": {r["case"]: r.get("skipped") or r.get("error") for r in results if r["status"] == "skipped"},
        "fell_back": [r["case"] for r in results if r.get("fell_back")],
        "table": [TABLE_HEAD, *(table_row(r) for r in results)],
        "cases": results,
    }
    write_atomic(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT", "bench-out")),
        help="folder for the JSON files (default $OUT, else ./bench-out)",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (checks the script)")
    parser.add_argument("--cases", nargs="+", help="run only these cases (in the plan's order)")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds per case at most (default 420)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="wall-time budget of the whole run: no case starts once it is spent, and none "
        "without about its usual time left (default 480 = 8 minutes)",
    )
    args = parser.parse_args(argv)

    missing = missing_modules()
    if missing:
        print(
            f"bench_diffusion: missing Python modules: {', '.join(missing)} (bring their wheels in .whl/: "
            "`scripts/bench_diffusion.py --help` says how)",
            file=sys.stderr,
        )
        return 2
    cases = TINY_CASES if args.tiny else GPU_CASES
    chosen = args.cases or list(cases)
    unknown = [c for c in chosen if c not in cases]
    if unknown:
        print(f"bench_diffusion: unknown case(s) {', '.join(unknown)}; cases: {', '.join(cases)}", file=sys.stderr)
        return 2
    chosen = [c for c in cases if c in chosen]  # the plan's order: a warm case after its cold one
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="dreamdeck-cache-") as cache:
        env["XDG_CACHE_HOME"] = cache  # an empty inductor cache for the cold case, kept for the warm one
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)
        for name in chosen:
            case = cases[name]
            left = args.budget_s - (time.monotonic() - started)
            if left < case.estimate_s:
                why = f"wall-time budget: {max(left, 0):.0f} s left, the case takes about {case.estimate_s:.0f} s"
                print(f"== {name}: skipped ({why})", flush=True)
                results.append({"case": name, "kind": case.kind, "status": "skipped", "skipped": why})
            else:
                results.append(run_case(name, case, args.out, env, min(args.timeout, left)))
            compare_inapp(results, cases)
            write_summary(args.out, results, args.budget_s, started, done=False)  # a killed run keeps its summary
    write_summary(args.out, results, args.budget_s, started, done=True)
    print(f"\n{TABLE_HEAD}")
    for result in results:
        print(table_row(result))
    flagged = [r["case"] for r in results if r.get("fell_back")]
    if flagged:
        print(f"\nFELL BACK (ran another backend than asked for): {', '.join(flagged)}")
    failed = [r["case"] for r in results if r["status"] == "failed"]
    print(
        f"\n{len(results) - len(failed)} of {len(results)} case(s) ran or were skipped, "
        f"{len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; "
        f"{time.monotonic() - started:.0f} s of a {args.budget_s:.0f} s budget; summary in {args.out / 'summary.json'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
