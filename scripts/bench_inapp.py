#!/usr/bin/env python3
"""In-app fps: the real show, headless through EGL, playing a video file through the realtime scene.

    PYTHONPATH=$PWD python3 scripts/bench_inapp.py --tiny --device cpu --accel eager --json inapp.json
    PYTHONPATH=$PWD python3 scripts/bench_inapp.py --random-weights --accel compile --json inapp.json

What runs is what ``dreamdeck run --headless --source file:CLIP`` runs: the App with its
capture thread, scene worker, compositor (EGL) and RealClock, the realtime scene loading a
local diffusers folder (written first, random weights: no download) with a TAESD folder as
its VAE. The clip is a short MJPG file made here with OpenCV, at 240 fps (the most a file
plays at), so the source is never what limits the scene. What it measures, once the
scene's first image is out and its backend has finished building: the scene's images per
second (the worker's output), the render loop's fps, and what backend the scene runs.
``scripts/bench_diffusion.py`` puts that next to the hot-path bench of the same case.

Limits it reports rather than hides: the scene worker runs a scene at most at the scene's
``max_fps`` (``cap_fps``), and the render loop at the clock's fps.

When no GL context can be made (no EGL, no moderngl), it writes ``{"skipped": "no OpenGL
here: <reason>"}`` and exits 0: a machine without GL cannot run this case, which is not
a failure of the engine. Exit 1: the scene never showed an image (its error is in the JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from engine.files import write_atomic

PROMPT = "a watercolour painting of a city at night, vivid colours"
CLIP_FPS = 240.0  # engine.sources.capture.MAX_FILE_FPS: a file plays at most this fast
CLIP_FRAMES = 48
log = logging.getLogger("bench_inapp")


def make_clip(path: Path, size: int, frames: int = CLIP_FRAMES, fps: float = CLIP_FPS) -> Path:
    """A short MJPG clip of the moving test pattern (every frame differs from the last)."""
    import cv2

    from engine.sources.pattern import render_pattern

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (size, size))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write an MJPG clip to {path}")
    try:
        for i in range(frames):
            writer.write(cv2.cvtColor(render_pattern(i * 0.37, size, size), cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return path


def make_models(folder: Path, tiny: bool, device: str, dtype: str) -> tuple[Path, Path]:
    """(model folder, TAESD folder): the bench's architecture with random weights, saved as a user's
    local diffusers folders are (in the precision they will run at, so the load moves no more bytes)."""
    import torch
    from diffusers import AutoencoderTiny

    from engine.diffusion.configs import TAESD, TINY_TAESD, build_random_model
    from engine.diffusion.device import choose_device

    choice = choose_device(device, dtype)
    model = build_random_model("tiny" if tiny else "sd-turbo", scheduler="euler", device=choice.device)
    model = model.to(choice)
    model.save_pretrained(folder / "model")
    with torch.device(choice.device):
        torch.manual_seed(0)
        taesd = AutoencoderTiny(**(TINY_TAESD if tiny else TAESD))
    if taesd.dtype != choice.dtype:  # (diffusers warns about a cast to the dtype a model already has)
        taesd = taesd.to(dtype=choice.dtype)
    taesd.save_pretrained(folder / "taesd")
    del model, taesd
    if choice.is_cuda:
        torch.cuda.empty_cache()  # the scene loads its own copy
    return folder / "model", folder / "taesd"


def gl_missing() -> str | None:
    """Why GL cannot start here (no moderngl, no EGL driver), or None when it can."""
    try:
        from engine.render.surface import HeadlessSurface, SurfaceError
    except ImportError as exc:  # moderngl (or glcontext) is not installed
        return f"{exc}"
    try:
        HeadlessSurface().close()
    except SurfaceError as exc:
        return str(exc)
    return None


def scene_stream(scene: Any) -> Any:
    """The realtime scene's playing stream (``stream`` if the scene offers it, else its attribute)."""
    return getattr(scene, "stream", None) or getattr(scene, "_stream", None)


def run_show(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from engine.app import AppConfig
    from engine.control.setup import ControlConfig
    from engine.show import OutputConfig, ShowConfig, build_show

    # 1. what a performer would have on disk: a clip and a local model folder
    clip = make_clip(work / "clip.avi", args.size)
    started = time.monotonic()
    model, taesd = make_models(work, args.tiny, args.device, args.dtype)
    models_s = time.monotonic() - started

    # 2. the show, built as `dreamdeck run --headless --source file:CLIP` builds it (the recorder
    #    idle, tempo and modulation running); no listeners, saved state or systemd: a benchmark
    #    must not take the ports or the state file of a show running beside it
    empty_presets = work / "presets"
    empty_presets.mkdir()
    show = build_show(
        ShowConfig(
            app=AppConfig(
                source=f"file:{clip}", preset=None, output_size=tuple(args.output), presets_dir=empty_presets
            ),
            fps=args.render_fps,
            controls=ControlConfig(osc_port=None, oscquery_port=None),
            outputs=OutputConfig(systemd=False),
            state=None,
            status=None,
        )
    )
    app = show.app
    prefix = "/scene/realtime"
    app.params.set_many(
        {
            "/scene/active": "realtime",
            f"{prefix}/model": str(model),
            f"{prefix}/vae": str(taesd),
            f"{prefix}/accel": args.accel,
            f"{prefix}/device": args.device,
            f"{prefix}/dtype": args.dtype,
            f"{prefix}/resolution": args.size,
            f"{prefix}/steps": 1,
            f"{prefix}/strength": 0.5,
            f"{prefix}/similarity_threshold": 0.0,
            f"{prefix}/prompt": PROMPT,
        },
        origin="bench",
    )
    app.params.apply_pending(10.0)  # land them (smoothing included) before the first frame
    result: dict[str, Any] = {
        "models_s": round(models_s, 1),
        "clip": {"fps": CLIP_FPS, "size": args.size},
        "output": list(args.output),
        "render_fps_target": args.render_fps,
    }
    try:
        app.start()
        started = time.monotonic()
        # 3. play until the scene's first image is out and its backend has finished building
        ready_s = first_s = None
        stream = None
        deadline = started + args.ready_timeout
        while time.monotonic() < deadline:
            app.step()
            scene = app.worker.active
            if scene is None or scene.name != "realtime":
                if app.worker.active_name not in (None, "realtime") or app.worker.failed == "realtime":
                    break  # the scene failed to load and its fallback plays: nothing to measure
                continue
            stream = scene_stream(scene)
            if stream is None:
                continue
            if first_s is None and app.worker.output.latest()[1] > 0:
                first_s = time.monotonic() - started
            settled = (
                stream.accel_requested == "eager" or stream.accel_ready_s is not None or stream.accel_error is not None
            )  # switched (maybe to a fallback), or failed
            if first_s is not None and settled:
                ready_s = time.monotonic() - started
                break
        result.update(active_scene=app.worker.active_name, errors=app.errors_now())
        if ready_s is None or stream is None:
            result["error"] = (
                f"the realtime scene showed no image in {args.ready_timeout:.0f} s: "
                f"{app.worker.last_error or 'no error reported'}"
            )
            return result
        # 4. warm up, then count the scene's images and the render loop's frames
        until = time.monotonic() + args.warmup_s
        while time.monotonic() < until:
            app.step()
        _, seq0 = app.worker.output.latest()
        frames0, t0 = app.stats.frames, time.monotonic()
        while time.monotonic() - t0 < args.seconds:
            app.step()
        _, seq1 = app.worker.output.latest()
        elapsed = time.monotonic() - t0
        scene = app.worker.active
        result.update(
            {
                "scene_fps": (seq1 - seq0) / elapsed,
                "scene_fps_smoothed": app.worker.fps,
                "render_fps": (app.stats.frames - frames0) / elapsed,
                "cap_fps": min(float(scene.max_fps), CLIP_FPS),
                "seconds": round(elapsed, 2),
                "startup": {
                    "first_image_s": first_s,
                    "ready_s": ready_s,
                    "weights_to_first_image_s": stream.first_image_s,
                },
                "accel": stream.accel,
                "accel_requested": stream.accel_requested,
                "fell_back": stream.accel != stream.accel_requested,
                "accel_error": stream.accel_error,
                "scene_status": scene.status,
                "source": app.input.status,
                "errors": app.errors_now(),
                "device": stream.choice.device.type,
                "size": list(stream.size),
            }
        )
        return result
    finally:
        show.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--tiny", action="store_true", help="the tiny test architecture (CI, CPU)")
    which.add_argument("--random-weights", action="store_true", help="full-size SD-turbo, random weights")
    parser.add_argument("--size", type=int, help="square clip and scene size (default 512; 32 with --tiny)")
    parser.add_argument(
        "--output",
        type=int,
        nargs=2,
        metavar=("W", "H"),
        help="composited output size (default 1280 720; 320 180 with --tiny)",
    )
    parser.add_argument("--accel", default="auto", help="the scene's backend (default auto)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--render-fps", type=float, default=60.0, help="the render clock (default 60)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds (default 10)")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="seconds played before measuring (default 2)")
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=300.0,
        help="seconds for the first image and the backend build (default 300)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.size = args.size or (32 if args.tiny else 512)
    args.output = args.output or ((320, 180) if args.tiny else (1280, 720))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    why = gl_missing()
    if why is not None:
        result: dict[str, Any] = {"skipped": f"no OpenGL here: {why}"}
    else:
        with tempfile.TemporaryDirectory(prefix="dreamdeck-inapp-") as work:
            result = run_show(args, Path(work))
    result["case"] = "tiny" if args.tiny else "sd-turbo"
    result["accel_asked"] = args.accel
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.json, (json.dumps(result, indent=2) + "\n").encode("utf-8"))
    if "skipped" in result:
        print(f"in-app: skipped: {result['skipped']}")
        return 0
    if "error" in result:
        print(f"in-app: {result['error']}", file=sys.stderr)
        return 1
    print(
        f"in-app ({result['case']}, {result['size'][1]}x{result['size'][0]}, accel {result['accel']}"
        f"{' FELL BACK from ' + result['accel_requested'] if result['fell_back'] else ''}): "
        f"scene {result['scene_fps']:.1f} fps (cap {result['cap_fps']:.0f}), render {result['render_fps']:.1f} fps; "
        f"first image {result['startup']['first_image_s']:.1f} s after start; status [{result['scene_status']}]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
