"""Benchmarks that print figures measured in this run (never asserted by tests).

``bench_render``: the compositor's frame time with a camera-sized source and a scene
image uploaded every frame, and three effects on (grade, kaleidoscope, vignette), at each
output size, on whatever GL this machine has (headless EGL).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from engine.catalog import SHADERS_DIR, build_registry
from engine.render.compositor import Compositor
from engine.render.shaders import ShaderLibrary
from engine.render.surface import HeadlessSurface
from engine.sources.pattern import render_pattern

EFFECTS_ON = ("grade", "kaleido", "vignette")
CASES = {
    "source+scene+3fx": {},
    "source+scene+3fx+feedback": {"/fx/feedback/amount": 0.6},
}


def _frames(size: tuple[int, int], count: int) -> list[np.ndarray]:
    return [render_pattern(i * 0.1, size[0], size[1]) for i in range(count)]


def bench_render(
    sizes: list[tuple[int, int]],
    frames: int = 200,
    json_path: Path | None = None,
    source_size: tuple[int, int] = (1280, 720),
    scene_size: tuple[int, int] = (512, 512),
) -> dict:
    surface = HeadlessSurface()
    ctx = surface.ctx
    shaders = ShaderLibrary(ctx, SHADERS_DIR)
    sources = _frames(source_size, 8)
    scenes = _frames(scene_size, 8)
    results = []
    for size in sizes:
        for case, extra in CASES.items():
            params = build_registry()
            values = {f"/fx/{name}/enabled": True for name in EFFECTS_ON}
            values.update({"/fx/grade/hue": 20.0, "/fx/grade/saturation": 1.2, "/fx/vignette/amount": 0.5})
            values.update(extra)
            params.set_many(values)
            params.apply_pending(10.0)
            compositor = Compositor(ctx, shaders, params, size)
            times = []
            for i in range(frames + 10):
                started = time.perf_counter()
                compositor.set_layer("source", sources[i % len(sources)], i)
                compositor.set_layer("scene", scenes[i % len(scenes)], i)
                compositor.render(i / 60.0)
                ctx.finish()  # count the GPU's work, not just the submission
                if i >= 10:  # the first frames compile and warm caches
                    times.append((time.perf_counter() - started) * 1000.0)
            compositor.release()
            times.sort()
            p50 = statistics.median(times)
            row = {
                "size": f"{size[0]}x{size[1]}",
                "case": case,
                "frames": frames,
                "fps": round(1000.0 / statistics.fmean(times), 1),
                "p50_ms": round(p50, 2),
                "p99_ms": round(times[int(0.99 * (len(times) - 1))], 2),
            }
            results.append(row)
            print(
                f"{row['size']:>10}  {case:<28} {row['fps']:7.1f} fps  p50 {row['p50_ms']:6.2f} ms"
                f"  p99 {row['p99_ms']:6.2f} ms",
                flush=True,
            )
    report = {
        "benchmark": "render",
        "gl_renderer": ctx.info["GL_RENDERER"],
        "gl_version": ctx.info["GL_VERSION"],
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "source_size": f"{source_size[0]}x{source_size[1]}",
        "scene_size": f"{scene_size[0]}x{scene_size[1]}",
        "effects": list(EFFECTS_ON),
        "results": results,
    }
    shaders.release()
    surface.close()
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {json_path}")
    return report
