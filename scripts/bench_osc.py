#!/usr/bin/env python3
"""OSC messages per second the engine takes while its render loop holds 60 fps.

The app runs headless (EGL) on a RealClock at 60 fps with the default preset and an
OscServer added as a control. For each rate, a separate process blasts
``/dreamdeck/bench/seq <n>`` for a few seconds (each n once, paced in 1 ms slices) and
records when it sent each n; a registry listener records when each n landed (the frame
boundary, on the render thread). Both use time.perf_counter, which is CLOCK_MONOTONIC on
Linux and so comparable across processes. Rate 0 is the baseline, measured in the same run.

Per rate: messages landed per second, losses, render fps, the longest frame interval and
how many exceeded 1.5 vsync periods (25 ms), and send -> landed latency (p50, p99, max).
A second table runs the same blasts against the OSC server and the registry alone, at
60 frame boundaries a second and no rendering: the ceiling of the OSC path itself.

    python3 scripts/bench_osc.py [--rates 0,1000,5000,10000,20000] [--bare-rates 10000,50000]
                                 [--seconds 4] [--size 1280x720] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SEQ_PATH = "/bench/seq"
SEQ_MAX = 2**31 - 1
VSYNC_MS = 1000.0 / 60.0
LATE_MS = 1.5 * VSYNC_MS  # a frame this late is a visible stutter
DRAIN_S = 0.5  # frames run on after the sender stops: what is still in the socket buffer lands


def _seq_packet(n: int) -> bytes:
    """``/dreamdeck/bench/seq ,i n`` packed by hand: the sender must not be the bottleneck."""
    return b"/dreamdeck/bench/seq\x00\x00\x00\x00,i\x00\x00" + struct.pack(">i", n)


def blast(port: int, rate: int, seconds: float, first: int, sent_times: Any) -> None:
    """Sender process: send ``rate`` messages a second for ``seconds``, record each send time."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    total = int(rate * seconds)
    times = [0.0] * total
    start = time.perf_counter()
    n = 0
    while n < total:
        due = min(total, int((time.perf_counter() - start) * rate) + 1)
        while n < due:
            times[n] = time.perf_counter()
            sock.send(_seq_packet(first + n))
            n += 1
        time.sleep(0.001)
    sent_times[:total] = times
    sock.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))]


class Bench:
    """One engine under test: ``step`` runs one frame; the listener records when each n lands."""

    def __init__(self, params: Any, osc: Any, step: Callable[[], float]) -> None:
        self.osc = osc
        self.step = step  # runs one frame, returns the ms of work it took
        self.landed_at: dict[int, float] = {}
        self.next_seq = 1
        self.spawn = mp.get_context("spawn")  # the sender imports nothing of the engine
        params.add_listener(self._on_change)

    def _on_change(self, change: Any) -> None:
        if change.path == SEQ_PATH:
            self.landed_at[change.value] = time.perf_counter()

    def phase(self, rate: int, seconds: float) -> dict:
        first, total = self.next_seq, int(rate * seconds)
        self.next_seq += total
        sent_times = self.spawn.Array("d", max(total, 1), lock=False)
        sender = self.spawn.Process(target=blast, args=(self.osc.port, rate, seconds, first, sent_times), daemon=True)
        if total:
            sender.start()
        ends: list[float] = []  # when each frame ended
        busy: list[float] = []  # ms of work in each frame
        started = time.perf_counter()
        drain_until = None
        while True:
            busy.append(self.step())
            now = time.perf_counter()
            ends.append(now)
            if sender.is_alive() if total else now - started < seconds:  # rate 0: the baseline
                continue
            drain_until = drain_until or now + DRAIN_S
            if now >= drain_until:
                break
        if total:
            sender.join()
        seqs = [n for n in range(first, first + total) if n in self.landed_at]
        latencies = [(self.landed_at[n] - sent_times[n - first]) * 1000.0 for n in seqs]
        # the window: first message sent -> last one landed (the sender's start-up is not counted)
        window = (sent_times[0], max(self.landed_at[n] for n in seqs)) if seqs else (started, ends[-1])
        inside = [i for i, end in enumerate(ends) if window[0] <= end <= window[1] and i > 0]
        intervals = [(ends[i] - ends[i - 1]) * 1000.0 for i in inside]
        return {
            "rate": rate,
            "seconds": round(window[1] - window[0], 2),
            "sent": total,
            "landed": len(seqs),
            "lost": total - len(seqs),
            "landed_per_s": round(len(seqs) / (window[1] - window[0]), 1),
            "fps": round(len(intervals) / (sum(intervals) / 1000.0), 1),
            "longest_frame_ms": round(max(intervals), 2),
            "frames_over_25ms": sum(f > LATE_MS for f in intervals),
            "busy_p50_ms": round(statistics.median(busy[i] for i in inside), 2),
            "latency_p50_ms": round(percentile(latencies, 0.5), 2) if latencies else None,
            "latency_p99_ms": round(percentile(latencies, 0.99), 2) if latencies else None,
            "latency_max_ms": round(max(latencies), 2) if latencies else None,
        }


def print_table(title: str, rows: list[dict]) -> None:
    header = (
        f"{'rate/s':>7} {'landed/s':>9} {'lost':>6} {'fps':>6} {'longest ms':>10} {'>25ms':>6} "
        f"{'busy p50':>8} {'lat p50':>8} {'lat p99':>8} {'lat max':>8}"
    )
    print(f"\n{title}\n{header}\n{'-' * len(header)}")
    for row in rows:
        lat = " ".join(
            f"{row[k]:8.2f}" if row[k] is not None else f"{'-':>8}"
            for k in ("latency_p50_ms", "latency_p99_ms", "latency_max_ms")
        )
        print(
            f"{row['rate']:>7} {row['landed_per_s']:>9.0f} {row['lost']:>6} {row['fps']:>6.1f} "
            f"{row['longest_frame_ms']:>10.2f} {row['frames_over_25ms']:>6} {row['busy_p50_ms']:>8.2f} {lat}",
            flush=True,
        )


def run(rates: list[int], bare_rates: list[int], seconds: float, size: tuple[int, int], json_path: Path | None) -> dict:
    # imported here, not at the top: the spawned sender imports this file and needs none of it
    from engine.app import App, AppConfig
    from engine.catalog import build_registry
    from engine.clock import RealClock
    from engine.control.actions import Actions
    from engine.control.osc import OscServer
    from engine.params import int_param
    from engine.render.surface import HeadlessSurface

    seq = int_param(SEQ_PATH, 0, 0, SEQ_MAX, description="benchmark sequence number")
    load_before = os.getloadavg()

    # 1. the app: render loop at 60 fps, default preset, OSC as one of its controls
    surface = HeadlessSurface()
    app = App(
        AppConfig(source="pattern", preset="default", output_size=size, hot_reload=False), surface, RealClock(60.0)
    )
    app.params.declare(seq)
    osc = app.add_control(OscServer(app.params, app.actions, port=0))
    app.start()

    def app_step() -> float:
        app.step()
        return app.stats.frame_ms

    bench = Bench(app.params, osc, app_step)
    renderer = surface.ctx.info["GL_RENDERER"]
    print(
        f"GL {renderer}, output {size[0]}x{size[1]}, {os.cpu_count()} CPUs, "
        f"load average {load_before[0]:.2f}, OSC receive buffer {osc.receive_buffer // 1024} KiB",
        flush=True,
    )
    settle_until = time.perf_counter() + 2.0  # shaders compiled, the scene's first image, caches warm
    while time.perf_counter() < settle_until:
        app.step()
    with_render = [bench.phase(rate, seconds) for rate in rates]
    app.close()
    surface.close()
    print_table("with the render loop (App, headless, RealClock 60 fps, default preset)", with_render)

    # 2. the ceiling: the OSC server and the registry alone, 60 frame boundaries a second
    registry = build_registry()
    registry.declare(seq)
    bare = OscServer(registry, Actions(), port=0)
    clock = RealClock(60.0)

    def bare_step() -> float:
        dt = clock.tick()
        started = time.perf_counter()
        registry.apply_pending(dt)
        bare.frame(clock.now())
        return (time.perf_counter() - started) * 1000.0

    bare.start()
    alone = Bench(registry, bare, bare_step)
    without_render = [alone.phase(rate, seconds) for rate in bare_rates]
    bare.stop()
    print_table("OSC server and registry alone (no rendering): the ceiling", without_render)

    report = {
        "benchmark": "osc",
        "gl_renderer": renderer,
        "cpu_count": os.cpu_count(),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "machine": platform.machine(),
        "python": platform.python_version(),
        "output_size": f"{size[0]}x{size[1]}",
        "receive_buffer_bytes": osc.receive_buffer,
        "target": "landed/s >= 10000 with no frame over 25 ms (1.5 vsync periods at 60 Hz)",
        "with_render": with_render,
        "osc_alone": without_render,
    }
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {json_path}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rates",
        default="0,1000,5000,10000,20000",
        help="messages per second with the render loop, comma-separated (0 = baseline)",
    )
    parser.add_argument(
        "--bare-rates", default="10000,50000", help="messages per second against the OSC server alone (empty: skip)"
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds of sending per rate")
    parser.add_argument("--size", default="1280x720", help="output size WxH")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    try:
        rates = [int(r) for r in args.rates.split(",") if r.strip()]
        bare_rates = [int(r) for r in args.bare_rates.split(",") if r.strip()]
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error("--rates and --bare-rates take integers like 0,1000,10000; --size takes WxH like 1280x720")
    if any(r < 0 for r in rates + bare_rates) or args.seconds <= 0:
        parser.error("rates must be >= 0 and --seconds > 0")
    run(rates, bare_rates, args.seconds, (width, height), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
