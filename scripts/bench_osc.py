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

The LISTEN case: the same app with OSCQuery as a control, 50 float parameters moved every
frame through the registry's modulation offsets (what the modulation matrix sets; its 8
slots are too few for 50 targets, so a bench control plays a 50-route matrix), and 10
WebSocket clients in another process, each LISTENing to all 50. Measured against a baseline
of the same app with nobody listening: frames held (fps, longest frame, frames over 25 ms),
messages pushed per second (received by the clients), how many of the expected
clients x paths x frames arrived, and latency from the frame that changed a value (right
after the control's frame() handed it over) to the client receiving it (p50, p99).

    python3 scripts/bench_osc.py [--case all|udp|listen] [--quick]
                                 [--rates 0,1000,5000,10000,20000] [--bare-rates 10000,50000]
                                 [--seconds 4] [--size 1280x720] [--listen-clients 10]
                                 [--listen-paths 50] [--json out.json]

``--quick``: a short run (1.5 s per rate, rates 0 and 10000, no bare table, 3 s of LISTEN,
320x180 output) to check the benchmark itself works.
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


# -- the LISTEN case ----------------------------------------------------------------------------

LISTEN_PREFIX = "/bench/listen"
MOD_PERIOD = 100_000  # frames before a path's modulated value repeats (each value names its frame)


def _f32(value: float) -> float:
    """A value as it arrives over OSC (float32)."""
    return struct.unpack(">f", struct.pack(">f", value))[0]


def _ws_connect(port: int, paths: list[str]) -> socket.socket:
    """A WebSocket opened by hand (handshake, masked LISTEN frames): the client must be cheap enough
    not to be the thing measured, and websockets' client costs ~20 us of Python per message."""
    import base64

    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(4096)
    if not answer.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"no WebSocket: {answer[:60]!r}")
    for path in paths:
        payload = json.dumps({"COMMAND": "LISTEN", "DATA": path}).encode()
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    sock.setblocking(False)
    return sock


def listen_clients(port: int, paths: list[str], clients: int, ready: Any, stop: Any, results: Any) -> None:
    """Client process: ``clients`` WebSocket connections, each LISTENing to every path, read on one
    thread; records (client, path, value, perf_counter when its bytes were read) and sends them
    back when told to stop. Frames from the server are unmasked; values are small messages."""
    import selectors

    selector = selectors.DefaultSelector()
    buffers: dict[int, bytearray] = {}
    for n in range(clients):
        sock = _ws_connect(port, paths)
        selector.register(sock, selectors.EVENT_READ, n)
        buffers[n] = bytearray()
        ready.release()
    got: list[tuple[int, str, float, float]] = []
    while not stop.is_set():
        for key, _ in selector.select(timeout=0.2):
            try:
                chunk = key.fileobj.recv(1 << 20)
            except BlockingIOError:
                continue
            now = time.perf_counter()
            buf = buffers[key.data]
            buf += chunk
            i = 0
            while len(buf) - i >= 2:
                size, head = buf[i + 1] & 0x7F, 2
                if size == 126:
                    if len(buf) - i < 4:
                        break
                    size, head = struct.unpack_from(">H", buf, i + 2)[0], 4
                elif size == 127:
                    if len(buf) - i < 10:
                        break
                    size, head = struct.unpack_from(">Q", buf, i + 2)[0], 10
                if len(buf) - i < head + size:
                    break
                if buf[i] & 0x0F == 2:  # a binary frame: an OSC message /path ,f value
                    frame = bytes(buf[i + head : i + head + size])
                    got.append(
                        (key.data, frame[: frame.index(b"\0")].decode(), struct.unpack(">f", frame[-4:])[0], now)
                    )
                i += head + size
            del buf[:i]
    results.send(got)
    results.close()


class ModulatedPaths:
    """A bench Control: every frame, new modulation offsets for the listened paths (each value unique
    per path and frame, so a received value names the frame that made it)."""

    name = "bench modulation"
    status = ""

    def __init__(self, params: Any, paths: list[str]) -> None:
        self.params, self.paths, self.frame_index = params, paths, 0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.params.set_modulation({})

    def offsets(self, frame_index: int) -> dict[str, float]:
        return {path: ((frame_index + 997 * i) % MOD_PERIOD) / MOD_PERIOD for i, path in enumerate(self.paths)}

    def frame(self, now: float) -> None:
        self.frame_index += 1
        self.params.set_modulation(self.offsets(self.frame_index))


def listen_case(seconds: float, size: tuple[int, int], clients: int, path_count: int) -> dict:
    # imported here, as in run(): the spawned client process needs none of it
    from engine.app import App, AppConfig
    from engine.clock import RealClock
    from engine.control.oscquery import OscQueryServer
    from engine.params import float_param
    from engine.render.surface import HeadlessSurface

    surface = HeadlessSurface()
    app = App(
        AppConfig(source="pattern", preset="default", output_size=size, hot_reload=False), surface, RealClock(60.0)
    )
    paths = [f"{LISTEN_PREFIX}/{i}" for i in range(path_count)]
    for path in paths:
        app.params.declare(float_param(path, 0.0, 0.0, 1.0, description="benchmark: modulated every frame"))
    moved = app.add_control(ModulatedPaths(app.params, paths))
    query = OscQueryServer(app.params, 9, port=0)  # OSC port: not used here
    app.add_control(query)
    posted: dict[int, float] = {}  # frame index -> when frame() handed its changes over
    query_frame = query.frame

    def timed_frame(now: float) -> None:
        query_frame(now)
        posted[moved.frame_index] = time.perf_counter()

    query.frame = timed_frame  # type: ignore[method-assign]
    app.start()

    def frames(duration: float) -> dict:
        ends: list[float] = []
        first = moved.frame_index
        until = time.perf_counter() + duration
        while time.perf_counter() < until:
            app.step()
            ends.append(time.perf_counter())
        intervals = [(b - a) * 1000.0 for a, b in zip(ends, ends[1:])]
        return {
            "frames": len(ends),
            "first_frame": first + 1,
            "last_frame": moved.frame_index,
            "window": (ends[0], ends[-1]),
            "fps": round(len(intervals) / (sum(intervals) / 1000.0), 1),
            "longest_frame_ms": round(max(intervals), 2),
            "frames_over_25ms": sum(f > LATE_MS for f in intervals),
        }

    settle_until = time.perf_counter() + 2.0
    while time.perf_counter() < settle_until:
        app.step()
    baseline = frames(seconds)

    spawn = mp.get_context("spawn")
    ready, stop = spawn.Semaphore(0), spawn.Event()
    receive, send = spawn.Pipe(duplex=False)
    full = ["/dreamdeck" + path for path in paths]
    process = spawn.Process(target=listen_clients, args=(query.port, full, clients, ready, stop, send), daemon=True)
    process.start()
    for _ in range(clients):  # connected and LISTEN sent; the frames below let the server see them
        if not ready.acquire(timeout=30):
            raise RuntimeError("the LISTEN clients did not connect")
    settle_until = time.perf_counter() + 1.0
    while time.perf_counter() < settle_until or len(query._hub.listened) < path_count:
        app.step()
    listening = frames(seconds)
    tail_until = time.perf_counter() + DRAIN_S  # what is in flight arrives
    while time.perf_counter() < tail_until:
        app.step()
    stop.set()
    got = receive.recv()
    process.join(timeout=10)
    pushed_by_server = query.counts.pushed
    app.close()
    surface.close()

    # which frame made each value: the offsets are unique per (path, frame) within MOD_PERIOD frames
    frame_of: dict[tuple[str, float], int] = {}
    for index in range(listening["first_frame"], listening["last_frame"] + 1):
        for path, offset in moved.offsets(index).items():
            frame_of[("/dreamdeck" + path, _f32(offset))] = index
    latencies = []
    for _client, path, value, at in got:
        index = frame_of.get((path, value))
        if index is not None and index in posted:
            latencies.append((at - posted[index]) * 1000.0)
    window = listening["window"][1] - listening["window"][0]
    expected = clients * path_count * listening["frames"]
    return {
        "clients": clients,
        "paths_each": path_count,
        "seconds": round(window, 2),
        "baseline": {k: v for k, v in baseline.items() if k != "window"},
        "listening": {k: v for k, v in listening.items() if k != "window"},
        "received_in_window": len(latencies),
        "expected_in_window": expected,
        "received_share": round(len(latencies) / expected, 3) if expected else None,
        "pushed_per_s": round(len(latencies) / window, 1),
        "server_pushed_total": pushed_by_server,
        "latency_p50_ms": round(percentile(latencies, 0.5), 2) if latencies else None,
        "latency_p99_ms": round(percentile(latencies, 0.99), 2) if latencies else None,
        "latency_max_ms": round(max(latencies), 2) if latencies else None,
    }


def print_listen(row: dict) -> None:
    base, live = row["baseline"], row["listening"]
    print(
        f"\nLISTEN: {row['clients']} WebSocket clients x {row['paths_each']} paths, every path modulated every frame"
        f"\n{'':>12} {'fps':>6} {'longest ms':>10} {'>25ms':>6}"
        f"\n{'nobody':>12} {base['fps']:>6.1f} {base['longest_frame_ms']:>10.2f} {base['frames_over_25ms']:>6}"
        f"\n{'listening':>12} {live['fps']:>6.1f} {live['longest_frame_ms']:>10.2f} {live['frames_over_25ms']:>6}"
        f"\npushed {row['pushed_per_s']:.0f} msgs/s to the clients ({row['received_in_window']} of "
        f"{row['expected_in_window']} expected, {row['received_share']:.1%}); change -> client latency "
        f"p50 {row['latency_p50_ms']} ms, p99 {row['latency_p99_ms']} ms, max {row['latency_max_ms']} ms",
        flush=True,
    )


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


def run(rates: list[int], bare_rates: list[int], seconds: float, size: tuple[int, int]) -> dict:
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

    return {
        "gl_renderer": renderer,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "receive_buffer_bytes": osc.receive_buffer,
        "target": "landed/s >= 10000 with no frame over 25 ms (1.5 vsync periods at 60 Hz)",
        "with_render": with_render,
        "osc_alone": without_render,
    }


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
    parser.add_argument("--case", choices=("all", "udp", "listen"), default="all", help="which cases to run")
    parser.add_argument("--listen-clients", type=int, default=10, help="WebSocket clients in the LISTEN case")
    parser.add_argument("--listen-paths", type=int, default=50, help="paths each LISTEN client listens to")
    parser.add_argument("--quick", action="store_true", help="a short run that checks the benchmark works")
    args = parser.parse_args(argv)
    if args.quick:
        args.rates, args.bare_rates, args.seconds, args.size = "0,10000", "", 1.5, "320x180"
    try:
        rates = [int(r) for r in args.rates.split(",") if r.strip()]
        bare_rates = [int(r) for r in args.bare_rates.split(",") if r.strip()]
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error("--rates and --bare-rates take integers like 0,1000,10000; --size takes WxH like 1280x720")
    if any(r < 0 for r in rates + bare_rates) or args.seconds <= 0:
        parser.error("rates must be >= 0 and --seconds > 0")
    if args.listen_clients < 1 or args.listen_paths < 1:
        parser.error("--listen-clients and --listen-paths must be >= 1")
    report: dict[str, Any] = {
        "benchmark": "osc",
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "output_size": f"{width}x{height}",
    }
    if args.case in ("all", "udp"):
        report.update(run(rates, bare_rates, args.seconds, (width, height)))
    if args.case in ("all", "listen"):
        listen_seconds = 3.0 if args.quick else args.seconds
        row = listen_case(listen_seconds, (width, height), args.listen_clients, args.listen_paths)
        print_listen(row)
        report["listen"] = row
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
