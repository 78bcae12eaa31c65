#!/usr/bin/env python3
"""Render-loop frame times while a slow scene computes on the CPU: a figure, not a test.

    python scripts/bench_slow_scene.py                      # 360 frames at 60 Hz, 640x360
    python scripts/bench_slow_scene.py --frames 1200 --json slow.json

The app runs headless (EGL) on a real 60 Hz clock. It cuts to the shipped DDPM, which
loads and then denoises on the scene worker as fast as it can (``step_rate`` 120, no
hold), and records every frame interval: from the cut until the DDPM's first image (the
load), then ``--frames`` frames while it computes flat out. It prints the longest, p99
and mean interval of each phase and how many images the scene made meanwhile (a loop
that is smooth because the scene idled would show few). At 60 Hz one vsync period is
16.7 ms; a loop that never waits on the scene stays near it on an idle machine. The
figures depend on the machine and its load, so nothing here passes or fails: the
behaviour (the loop never waits on the scene) is tests/test_slow_scene_frames.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.app import App, AppConfig
from engine.clock import RealClock
from engine.render.surface import HeadlessSurface
from engine.scenes import SceneCatalog
from engine.scenes.ddpm import DdpmScene
from engine.scenes.reaction_diffusion import ReactionDiffusion

FPS = 60.0
WARMUP_FRAMES = 60  # the first frames of a show compile shaders and upload: not measured


class RecordingClock(RealClock):
    """A real clock that keeps every frame interval it measured."""

    def __init__(self, fps: float) -> None:
        super().__init__(fps)
        self.intervals: list[float] = []

    def tick(self) -> float:
        dt = super().tick()
        self.intervals.append(dt)
        return dt


def summary(intervals_s: list[float]) -> dict[str, float | int]:
    ms = np.array(intervals_s) * 1000.0
    if ms.size == 0:
        return {"frames": 0}
    return {
        "frames": int(ms.size),
        "longest_ms": round(float(ms.max()), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "mean_ms": round(float(ms.mean()), 2),
    }


def run(frames: int, size: tuple[int, int], load_timeout: float) -> dict[str, Any]:
    clock = RecordingClock(FPS)
    surface = HeadlessSurface()
    with tempfile.TemporaryDirectory(prefix="dd-bench-slow-") as presets:
        app = App(
            AppConfig(source="pattern", preset=None, output_size=size, hot_reload=False, presets_dir=Path(presets)),
            surface,
            clock,
            catalog=SceneCatalog((ReactionDiffusion, DdpmScene)),
        )
        try:
            app.start()
            for _ in range(WARMUP_FRAMES):
                app.step()
            clock.intervals.clear()
            app.params.set_many(
                {"/scene/active": "ddpm", "/scene/ddpm/step_rate": 120.0, "/scene/ddpm/hold": 0.0}, origin="bench"
            )
            deadline = time.monotonic() + load_timeout
            while app.worker.active_name != "ddpm" or app.worker.output.latest()[0] is None:
                if time.monotonic() > deadline:
                    raise SystemExit(f"the DDPM scene never played within {load_timeout:.0f} s: {app.hud_lines()}")
                app.step()
            loading = clock.intervals[1:]  # the first interval spans the parameter change, not a frame
            clock.intervals = []
            images_before = app.worker.output.latest()[1]
            for _ in range(frames):
                app.step()
            images = app.worker.output.latest()[1] - images_before
            computing = clock.intervals
        finally:
            app.close()
            surface.close()
    return {
        "fps": FPS,
        "vsync_ms": round(1000.0 / FPS, 2),
        "size": list(size),
        "cpus": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "load": summary(loading),
        "computing": summary(computing),
        "scene_images": int(images),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=360, help="frames measured while the scene computes")
    parser.add_argument("--size", default="640x360", help="output size, WxH")
    parser.add_argument("--load-timeout", type=float, default=120.0, help="seconds the DDPM may take to load")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    result = run(args.frames, (width, height), args.load_timeout)
    for phase in ("load", "computing"):
        s = result[phase]
        if s["frames"]:
            print(
                f"{phase:>9}: {s['frames']} frames, longest {s['longest_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, "
                f"mean {s['mean_ms']:.1f} ms"
            )
    print(
        f"{result['scene_images']} scene images while computing; vsync {result['vsync_ms']} ms; "
        f"{result['cpus']} CPUs, load average {result['loadavg']}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
