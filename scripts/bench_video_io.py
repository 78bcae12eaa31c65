"""NDI round trip through a passthrough show: added latency, frame rate held, frames lost.

    python scripts/bench_video_io.py            # 512x512 and 1280x720, 10 s each
    python scripts/bench_video_io.py --quick    # 512x512, 3 s (a smoke run)
    python scripts/bench_video_io.py --isolated # inside a loopback-only network namespace (root)

A sender thread sends frames at --fps with the frame's number drawn into it as 16 black or
white blocks; the show (in this process, ``--source ndi:bench-in``, the passthrough scene,
``--ndi bench-out``) plays them; a receiver thread reads the show's NDI output, decodes the
number and notes when it came back. Latency = receive time - send time (the same clock);
lost = numbers sent and never seen again (a number replaced by a newer one before the show
took it counts as lost: that is what "newest frame only" costs).

Everything is in one process because NDI discovery without mDNS (as in a loopback-only
namespace) sees one sending process per machine; in one process both senders are found.
Not a test: figures depend on the machine. WebRTC is not benchmarked here yet.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

BITS = 16


def stamp(image: np.ndarray, number: int) -> None:
    """Draw ``number`` as 16 blocks along the top eighth of the image (white = 1)."""
    height, width = image.shape[:2]
    block = width // BITS
    for bit in range(BITS):
        image[: height // 8, bit * block : (bit + 1) * block, :3] = 255 if number >> bit & 1 else 0


def read_stamp(image: np.ndarray) -> int:
    height, width = image.shape[:2]
    block = width // BITS
    row = image[height // 16, :, :3].mean(axis=1)
    return sum(1 << bit for bit in range(BITS) if row[bit * block + block // 2] > 127)


def run_size(size: tuple[int, int], seconds: float, fps: float) -> dict[str, float | int | str]:
    import cyndilib as ndi
    from cyndilib.receiver import ReceiveFrameType

    from engine.app import App, AppConfig
    from engine.clock import RealClock
    from engine.outputs.sharing import NdiSender
    from engine.outputs.sharing import ndi as ndi_output
    from engine.render.surface import HeadlessSurface

    width, height = size
    presets = Path(tempfile.mkdtemp(prefix="bench-video-io-"))
    (presets / "pass.toml").write_text('[scene]\nactive = "passthrough"\n\n[layer.source]\nopacity = 0.0\n')
    surface = HeadlessSurface()
    config = AppConfig(source="ndi:bench-in", presets_dir=presets, preset="pass", output_size=size, hot_reload=False)
    app = App(config, surface, RealClock(fps))
    app.add_output(ndi_output("bench-out", fps=fps))
    sent: dict[int, float] = {}
    back: dict[int, float] = {}
    stop = threading.Event()

    def send() -> None:
        sender = NdiSender("bench-in")
        sender.open(size, fps)
        image = np.zeros((height, width, 4), np.uint8)
        image[..., 3] = 255
        number, period, due = 1, 1.0 / fps, time.perf_counter()
        while not stop.is_set():
            stamp(image, number % (1 << BITS))
            sent[number % (1 << BITS)] = time.perf_counter()
            sender.send(image)
            number += 1
            due += period
            time.sleep(max(0.0, due - time.perf_counter()))
        sender.close()

    def receive() -> None:
        finder = ndi.Finder()
        finder.open()
        name = None
        while name is None and not stop.is_set():
            finder.wait_for_sources(0.5)
            finder.update_sources()
            name = next((n for n in finder.get_source_names() if "bench-out" in n), None)
        if name is None:
            return
        receiver = ndi.Receiver(color_format=ndi.RecvColorFormat.RGBX_RGBA, bandwidth=ndi.RecvBandwidth.highest)
        frame = ndi.VideoRecvFrame()
        receiver.set_video_frame(frame)
        receiver.set_source(finder.get_source(name))
        buffer = np.empty(0, np.uint8)
        while not stop.is_set():
            if receiver.receive(ReceiveFrameType.recv_video, 100) & ReceiveFrameType.recv_video:
                now = time.perf_counter()
                if buffer.size != frame.get_buffer_size():
                    buffer = np.empty(frame.get_buffer_size(), np.uint8)
                if frame.fill_p_data(buffer):
                    w, h = frame.get_resolution()
                    stride = frame.get_line_stride()
                    image = buffer[: stride * h].reshape(h, stride)[:, : w * 4].reshape(h, w, 4)
                    back.setdefault(read_stamp(image), now)
        receiver.disconnect()
        finder.close()

    threads = [threading.Thread(target=send, daemon=True), threading.Thread(target=receive, daemon=True)]
    app.start()
    for thread in threads:
        thread.start()
    # warm up until frames come back, then measure
    deadline = time.monotonic() + 60
    while not back and time.monotonic() < deadline:
        app.step()
    first_sent = max(sent) if sent else 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        app.step()
    last_sent = max(sent)
    settle = time.perf_counter() + 0.5
    while time.perf_counter() < settle:
        app.step()
    stop.set()
    for thread in threads:
        thread.join(5)
    app.close()
    surface.close()
    shutil.rmtree(presets, ignore_errors=True)
    window = range(first_sent + 1, last_sent + 1)
    latencies = sorted((back[n] - sent[n]) * 1000 for n in window if n in back and n in sent)
    if not latencies:
        return {"size": f"{width}x{height}", "error": "no frame came back"}
    return {
        "size": f"{width}x{height}",
        "frames_sent": len(window),
        "frames_back": len(latencies),
        "frames_lost": len(window) - len(latencies),
        "fps_held": round(len(latencies) / seconds, 1),
        "latency_p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "latency_p99_ms": round(float(np.percentile(latencies, 99)), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512x512 only, 3 s")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fps", type=float, default=60.0)
    parser.add_argument("--isolated", action="store_true", help="run in a loopback-only network namespace (root)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.isolated and os.environ.get("BENCH_VIDEO_IO_INSIDE") != "1":
        home = Path(tempfile.mkdtemp(prefix="bench-ndi-"))
        (home / ".ndi").mkdir()
        (home / ".ndi" / "ndi-config.v1.json").write_text(
            json.dumps(
                {"ndi": {"networks": {"ips": "127.0.0.1", "discovery": ""}, "multicast": {"send": {"enable": False}}}}
            )
        )
        env = {**os.environ, "BENCH_VIDEO_IO_INSIDE": "1", "HOME": str(home), "NDI_CONFIG_DIR": str(home / ".ndi")}
        argv = " ".join(f"'{a}'" for a in sys.argv[1:])
        command = f"ip link set lo up && exec {sys.executable} {Path(__file__).resolve()} {argv}"
        return subprocess.run(["unshare", "-n", "sh", "-c", command], env=env).returncode
    sizes = [(512, 512)] if args.quick else [(512, 512), (1280, 720)]
    seconds = 3.0 if args.quick else args.seconds
    results = []
    for size in sizes:
        result = run_size(size, seconds, args.fps)
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
