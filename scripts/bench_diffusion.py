#!/usr/bin/env python3
"""The diffusion benchmark on a GPU machine, in one go: every case, JSON per case, one summary.

Made for the offline GPU machine (torch, transformers, peft, onnx there; diffusers carried
as wheels in .whl/, see ../shared/device/fetch-wheels.sh). From the repository root:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
    python3 scripts/bench_diffusion.py --out "$OUT"

Each case runs in its own process, so the compile cases measure real cold and warm starts
(the second run finds the first one's inductor cache). Cases (full-size architectures,
random weights, fp16 / bf16):

    turbo-eager           SD-turbo, 1 step, eager, 512x512 (python -m engine.diffusion.bench)
    turbo-compile-cold    SD-turbo, 1 step, torch.compile, empty inductor cache
    turbo-compile-warm    the same again: the cache is warm
    lcm4-compile          SD 1.5 + LCM, 4 steps as one stream batch, torch.compile
    vqgan-clip            VQGAN f16_16384 + CLIP ViT-B/32 steps/s at 256 and 512 (scripts/bench_vqgan_clip.py)
    lora                  LoRA weight change and file hot-swap on the SD 1.5 UNet (scripts/bench_lora.py)

``--tiny`` runs the same machinery with tiny models on the CPU (the CI check of this script).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from engine.files import write_atomic  # noqa: E402  (no torch: the script checks for it first)
NEEDED = ("torch", "diffusers", "transformers", "PIL", "cv2", "numpy")

BENCH = ["-m", "engine.diffusion.bench"]  # a case is the command line after `python3`
VQGAN_CLIP = [str(ROOT / "scripts" / "bench_vqgan_clip.py")]
LORA = [str(ROOT / "scripts" / "bench_lora.py")]
GPU_CASES = {
    "turbo-eager": [*BENCH, "--arch", "sd-turbo", "--random-weights", "--accel", "eager"],
    "turbo-compile-cold": [*BENCH, "--arch", "sd-turbo", "--random-weights", "--accel", "compile"],
    "turbo-compile-warm": [*BENCH, "--arch", "sd-turbo", "--random-weights", "--accel", "compile"],
    "lcm4-compile": [*BENCH, "--arch", "sd15", "--random-weights", "--steps", "4", "--accel", "compile"],
    "vqgan-clip": [*VQGAN_CLIP, "--device", "cuda", "--autocast", "bfloat16", "--steps", "20", "--warmup", "3"],
    "lora": [*LORA, "--device", "cuda"],
}
TINY_CASES = {
    "tiny-turbo-eager": [*BENCH, "--tiny", "--device", "cpu", "--accel", "eager", "--frames", "3", "--warmup", "1",
                         "--baseline-frames", "2"],
    "tiny-lcm4-eager": [*BENCH, "--tiny", "--arch", "sd15", "--device", "cpu", "--accel", "eager", "--frames", "3",
                        "--warmup", "1", "--baseline-frames", "2"],
    "tiny-vqgan-clip": [*VQGAN_CLIP, "--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1"],
}


def missing_modules() -> list[str]:
    import importlib.util

    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def run_case(name: str, args: list[str], out: Path, env: dict[str, str], timeout: float) -> dict:
    json_path = out / f"{name}.json"
    command = [sys.executable, *args, "--json", str(json_path)]
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"   timed out after {timeout:.0f} s", flush=True)
        return {"case": name, "error": f"timed out after {timeout:.0f} s"}
    print(done.stdout, end="", flush=True)
    if done.returncode != 0 or not json_path.exists():
        print(done.stderr[-3000:], file=sys.stderr, flush=True)
        return {"case": name, "error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    result = json.loads(json_path.read_text())
    result["case"], result["wall_s"] = name, round(time.monotonic() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")),
                        help="folder for the JSON files (default $OUT, else ./bench-out)")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (checks the script)")
    parser.add_argument("--cases", nargs="+", help="run only these cases")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds per case (default 420)")
    args = parser.parse_args(argv)

    missing = missing_modules()
    if missing:
        print(f"bench_diffusion: missing Python modules: {', '.join(missing)} "
              "(carry their wheels: ../shared/device/fetch-wheels.sh pillow ...)", file=sys.stderr)
        return 2
    cases = TINY_CASES if args.tiny else GPU_CASES
    chosen = args.cases or list(cases)
    unknown = [c for c in chosen if c not in cases]
    if unknown:
        print(f"bench_diffusion: unknown case(s) {', '.join(unknown)}; cases: {', '.join(cases)}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(ROOT)) if p)
    env["PYTHONUNBUFFERED"] = "1"
    with tempfile.TemporaryDirectory(prefix="dreamdeck-cache-") as cache:
        env["XDG_CACHE_HOME"] = cache  # an empty inductor cache for the cold case, kept for the warm one
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)
        results = [run_case(name, cases[name], args.out, env, args.timeout) for name in chosen]
    summary = {"cases": results}
    write_atomic(args.out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    print(f"\n{'case':22}{'fps':>9}{'p50 ms':>9}{'p99 ms':>9}{'base fps':>10}{'ratio':>8}{'1st frame s':>12}"
          f"{'accel s':>9}  device")
    for r in results:
        if "error" in r:
            print(f"{r['case']:22}  {r['error']}")
            continue
        if "engine" not in r:  # the slow-scene and LoRA benches print their own tables above
            continue
        e, b = r["engine"], r["baseline"] or {}
        ready = f"{r['accel_ready_s']:.1f}" if r["accel_ready_s"] is not None else "-"
        print(f"{r['case']:22}{e['fps']:9.1f}{e['p50_ms']:9.2f}{e['p99_ms']:9.2f}{b.get('fps', 0):10.1f}"
              f"{(r['ratio'] or 0):8.1f}{r['startup']['first_frame_s']:12.2f}{ready:>9}  {r['gpu_name'] or r['device']}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
