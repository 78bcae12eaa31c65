"""Soak test: run the engine headless for N frames while everything that can go wrong does.

    python scripts/soak.py --frames 3600                    # a minute of frames, fast (ManualClock)
    python scripts/soak.py --clock real --seconds 86400 --json soak.json   # 24 hours, paced at 60 fps

What it does to the show, in turn, every ``--every`` frames: switch scenes; recall presets
(good ones and broken ones); flood OSC with valid and malformed packets (raw UDP garbage
when this build has no OSC server); make the camera stand-in (an MJPG file played as
``file:PATH``) vanish and come back; break a shader in a private copy of shaders/ and
fix it. The status page runs too, polled by a client thread.

What it measures, every ``--sample-every`` frames: resident memory (psutil if installed,
else /proc/self/statm), accelerator memory (when CUDA is in use), open files, threads.
At the end everything is put right and the show must recover (source playing, no shader
error) within ``--recover-s`` seconds.

It exits 1 when: a frame raised, a thread died of an uncaught exception, resident
memory grew by more than ``--max-rss-growth`` (a fraction) between the end of the
warm-up and the end, open files grew by more than ``--max-fd-growth``, or the show did
not recover. It prints a summary and, with ``--json``, writes every sample.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import random
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engine.app import App, AppConfig
from engine.catalog import PRESETS_DIR, SHADERS_DIR
from engine.clock import ManualClock, RealClock
from engine.params import Kind, ParamError
from engine.render.surface import HeadlessSurface
from engine.scenes import SceneCatalog, installed_catalog
from engine.web import StatusConfig, accelerator_memory, install_status_page

log = logging.getLogger("soak")

BROKEN_PRESETS = {
    "broken_syntax": "[fx.kaleido\nsegments = 3\n",
    "broken_range": "[fx.kaleido]\nenabled = true\nsegments = 999\n",
    "broken_key": "[fx.kaleido]\nsegmnets = 5\n",
}
BROKEN_SHADER = "fx/grade.glsl"  # on in the default preset, so breaking it shows at once
EVENTS = ("scene", "preset", "osc", "clip_away", "shader_break", "preset", "clip_back", "shader_fix")


# -- measuring ------------------------------------------------------------------------------

def release_free_memory() -> None:
    """Give freed heap pages back to the system before a sample: resident memory then tracks
    what is alive, not what the allocator happens to keep (glibc's malloc_trim; elsewhere a no-op).

    Without it one video reopen or burst of OSC can leave a few MB of free-but-kept heap late
    in a short run, which reads as growth; a real leak stays alive and still shows."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def rss_mb() -> float:
    """Resident memory of this process in MB (psutil when installed, else /proc/self/statm)."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm", encoding="ascii") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    return psutil.Process().memory_info().rss / 2**20


def open_files() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: no cheap count; the fd check is skipped
        return -1


@dataclass
class Sample:
    frame: int
    seconds: float
    rss_mb: float
    accelerator_mb: float | None
    open_files: int
    threads: int
    shader_programs: int  # compiled variants are kept (bounded by the effect combinations): memory that is not a leak
    fps: float


def sample(app: App, frame: int, started: float) -> Sample:
    accel = accelerator_memory()
    release_free_memory()
    return Sample(frame, round(time.monotonic() - started, 2), round(rss_mb(), 1),
                  None if not accel or "allocated_mb" not in accel else accel["allocated_mb"],
                  open_files(), threading.active_count(), len(app.shaders.compile_ms), round(app.stats.render_fps, 1))


# -- the workspace: private copies the soak may break ---------------------------------------------

@dataclass
class Workspace:
    root: Path
    presets: Path
    shaders: Path
    clip: Path
    hidden_clip: Path
    shader_file: Path
    shader_text: str


def make_clip(path: Path, frames: int = 24, size: tuple[int, int] = (160, 90)) -> Path:
    """An MJPG clip of a bar sweeping across: the camera stand-in (OpenCV writes it, no ffmpeg needed)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, size)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write MJPG video to {path}")
    w, h = size
    for i in range(frames):
        frame = np.full((h, w, 3), 30, np.uint8)
        x = i * w // frames
        frame[:, x: x + w // 6] = (40, 200, 250)
        writer.write(frame)
    writer.release()
    return path


def make_workspace(root: Path) -> Workspace:
    presets = root / "presets"
    shutil.copytree(PRESETS_DIR, presets)
    for name, text in BROKEN_PRESETS.items():
        (presets / f"{name}.toml").write_text(text, encoding="utf-8")
    shaders = root / "shaders"
    shutil.copytree(SHADERS_DIR, shaders)
    clip = make_clip(root / "camera.avi")
    shader_file = shaders / BROKEN_SHADER
    return Workspace(root, presets, shaders, clip, root / "camera-unplugged.avi", shader_file,
                     shader_file.read_text(encoding="utf-8"))


# -- the troublemakers ------------------------------------------------------------------------------

class Flooder:
    """Sends bursts of OSC (valid and malformed) on its own thread, never waiting on the app."""

    def __init__(self, port: int, paths: list[str], seed: int) -> None:
        self.port = port
        self.paths = paths
        self.random = random.Random(seed)
        self.sent = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._bursts: list[int] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak osc flood", daemon=True)

    def start(self) -> "Flooder":
        self._thread.start()
        return self

    def burst(self, packets: int) -> None:
        self._bursts.append(packets)
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(5)
        self._sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            while self._bursts and not self._stop.is_set():
                for _ in range(self._bursts.pop()):
                    try:
                        self._sock.sendto(self._packet(), ("127.0.0.1", self.port))
                    except OSError as exc:  # a full buffer drops a datagram: that is what UDP does
                        log.debug("osc flood: %s", exc)
                    self.sent += 1

    def _packet(self) -> bytes:
        r = self.random
        choice = r.random()
        if choice < 0.4:
            return r.randbytes(r.randint(0, 400))  # garbage
        address = f"/dreamdeck{r.choice(self.paths)}" if choice < 0.9 else "/dreamdeck/scene/next"
        if choice < 0.7:  # a float in 0..1: valid for many parameters, out of range for some
            return _osc(address, b",f", struct.pack(">f", r.random()))
        return _osc(address, b"," + bytes(r.choice(b"ifsTFN[]") for _ in range(r.randint(0, 4))),
                    r.randbytes(r.randint(0, 16)))  # type tags that lie about their arguments


def _osc(address: str, tags: bytes, args: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        b += b"\0"
        return b + b"\0" * (-len(b) % 4)
    return pad(address.encode()) + pad(tags) + args


class WebPoller:
    """A phone left on the status page: health and thumbnail twice a second, a fader now and then."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.requests = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak web poller", daemon=True)

    def start(self) -> "WebPoller":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(0.5):
            n += 1
            self._get("/health")
            self._get("/thumbnail.jpg", ok=(200, 503))  # 503 until the first frame
            if n % 4 == 0:
                body = json.dumps({"path": "/layer/source/opacity", "value": (n % 10) / 10}).encode()
                self._get("/api/param", data=body)

    def _get(self, path: str, data: bytes | None = None, ok: tuple[int, ...] = (200,)) -> None:
        self.requests += 1
        request = urllib.request.Request(self.base + path, data=data,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError as exc:
            self.failures.append(f"{path}: {exc}")
            return
        if status not in ok:
            self.failures.append(f"{path}: HTTP {status}")


# -- the run --------------------------------------------------------------------------------------------

@dataclass
class Report:
    ok: bool = True
    failures: list[str] = field(default_factory=list)
    frames: int = 0
    clock: str = "manual"
    seconds: float = 0.0
    warmup_frames: int = 0
    rss_baseline_mb: float = 0.0
    rss_final_mb: float = 0.0
    rss_growth: float = 0.0
    open_files_growth: int = 0
    new_shader_programs: int = 0  # frame-program variants compiled after the warm-up
    threads_final: int = 0
    events: dict[str, int] = field(default_factory=dict)
    errors_seen: list[str] = field(default_factory=list)
    osc: str = ""
    osc_packets_sent: int = 0
    http_requests: int = 0
    http_failures: list[str] = field(default_factory=list)
    thread_crashes: list[str] = field(default_factory=list)
    final_source: str = ""
    samples: list[Sample] = field(default_factory=list)

    def fail(self, why: str) -> None:
        self.ok = False
        self.failures.append(why)


def _add_osc(app: App, report: Report) -> Any:
    """The OSC server, when this build has one; the soak works without (raw UDP garbage then)."""
    try:
        from engine.control.osc import OscServer
    except ImportError:
        report.osc = "no OSC server in this build: sending raw UDP garbage instead"
        return None
    server = OscServer(app.params, app.actions, "127.0.0.1", 0)
    app.add_control(server)
    return server


def run_soak(args: argparse.Namespace) -> Report:
    report = Report(clock=args.clock)
    crashes: list[str] = []
    previous_hook = threading.excepthook

    def on_thread_crash(hook_args: threading.ExceptHookArgs) -> None:
        name = hook_args.thread.name if hook_args.thread else "?"
        crashes.append(f"thread {name}: {hook_args.exc_type.__name__}: {hook_args.exc_value}")
        previous_hook(hook_args)

    threading.excepthook = on_thread_crash
    root = Path(tempfile.mkdtemp(prefix="dreamdeck-soak-"))
    surface = HeadlessSurface()
    app: App | None = None
    flooder: Flooder | None = None
    poller: WebPoller | None = None
    try:
        ws = make_workspace(root)
        clock = ManualClock(args.fps) if args.clock == "manual" else RealClock(args.fps)
        app = App(AppConfig(source=f"file:{ws.clip}", presets_dir=ws.presets, shaders_dir=ws.shaders,
                            output_size=args.size, hot_reload=True), surface, clock, catalog=soak_catalog(args))
        osc = _add_osc(app, report)
        server = install_status_page(app, StatusConfig(port=0))
        app.start()
        _pin(app, args.set)
        paths = [p.path for p in app.params.params()]
        osc_port = osc.port if osc is not None else _free_udp_port()
        flooder = Flooder(osc_port, paths, args.seed).start()
        poller = WebPoller(server.port).start()
        presets = [e.name for e in app.presets.entries()]
        leak: list[bytes] = []  # --self-test-leak-kb: proves the detector catches a leak
        errors_seen: set[str] = set()
        started = time.monotonic()
        # the warm-up covers two rounds of every perturbation: each code path has run (shader
        # variants compiled, buffers sized, arenas grown) before memory is judged
        report.warmup_frames = max(int(args.frames * args.warmup), 2 * len(EVENTS) * args.every)
        fd_baseline = -1
        deadline = None if args.seconds is None else started + args.seconds
        for frame in range(1, args.frames + 1):
            last = frame == args.frames or (deadline is not None and time.monotonic() >= deadline)
            try:
                app.step()
            except Exception:  # the one thing a soak must report rather than survive
                report.fail(f"frame {frame} raised:\n{traceback.format_exc()}")
                break
            if args.clock == "manual":
                time.sleep(0.001)  # let the capture, scene and server threads run on a small machine
            if frame % args.every == 0:
                event = EVENTS[(frame // args.every - 1) % len(EVENTS)]
                if event in args.events:
                    _perturb(event, app, ws, flooder, presets, frame)
                    _pin(app, args.set)  # a preset or an OSC burst may have moved them
                    report.events[event] = report.events.get(event, 0) + 1
            if frame % 30 == 0:
                errors_seen.update(app.errors_now())
            if frame > report.warmup_frames and args.self_test_leak_kb:
                leak.append(b"x" * (args.self_test_leak_kb * 1024))
            if frame % args.sample_every == 0 or last:
                report.samples.append(sample(app, frame, started))
                if fd_baseline < 0 and frame > report.warmup_frames:
                    fd_baseline = report.samples[-1].open_files
            if last:
                break
        report.frames = app.stats.frames
        report.seconds = round(time.monotonic() - started, 1)
        if report.ok:
            _recover(app, ws, args.recover_s, report)
        report.errors_seen = sorted(errors_seen)
        report.final_source = app.input.status
        report.osc = report.osc or str(getattr(osc, "status", ""))
        _judge_memory(report, args, fd_baseline)
    finally:
        if flooder is not None:
            flooder.stop()
            report.osc_packets_sent = flooder.sent
        if poller is not None:
            poller.stop()
            report.http_requests = poller.requests
            report.http_failures = poller.failures[:20]
        if app is not None:
            app.close()
        surface.close()
        threading.excepthook = previous_hook
        shutil.rmtree(root, ignore_errors=True)
    report.thread_crashes = crashes
    report.threads_final = threading.active_count()
    if crashes:
        report.fail(f"{len(crashes)} thread(s) died of an uncaught exception: {crashes[0]}")
    if report.http_failures:
        report.fail(f"the status page failed: {report.http_failures[0]}")
    return report


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _perturb(event: str, app: App, ws: Workspace, flooder: Flooder, presets: list[str], frame: int) -> None:
    if event == "scene":
        app.actions.post("scene/next", origin="soak")
    elif event == "preset":
        app.recall_preset(presets[(frame // 7) % len(presets)])  # loaded on its own thread, as a key press is
    elif event == "osc":
        flooder.burst(300)
    elif event == "clip_away" and ws.clip.exists():
        ws.clip.rename(ws.hidden_clip)  # the camera is unplugged
    elif event == "clip_back" and ws.hidden_clip.exists():
        ws.hidden_clip.rename(ws.clip)
    elif event == "shader_break":
        ws.shader_file.write_text(ws.shader_text + "\nthis is not GLSL;\n", encoding="utf-8")
    elif event == "shader_fix":
        ws.shader_file.write_text(ws.shader_text, encoding="utf-8")


def _recover(app: App, ws: Workspace, timeout_s: float, report: Report) -> None:
    """Put everything right, then the show must come back by itself: source playing, shaders fine."""
    if ws.hidden_clip.exists():
        ws.hidden_clip.rename(ws.clip)
    ws.shader_file.write_text(ws.shader_text, encoding="utf-8")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app.step()
        time.sleep(0.002)
        if not app.input.fallback_active and not app.shaders.errors:
            return
    report.fail(f"not recovered {timeout_s:g} s after the clip and the shader were restored: "
                f"source {app.input.status!r}, shader errors {list(app.shaders.errors.values())}")


def _judge_memory(report: Report, args: argparse.Namespace, fd_baseline: int) -> None:
    after = [s for s in report.samples if s.frame > report.warmup_frames]
    if len(after) < 2:
        report.fail("too few samples after the warm-up to judge memory: use more --frames or a smaller "
                    "--sample-every")
        return
    window = max(1, min(3, len(after) // 4))  # medians of a few samples: one GC pause is not a leak
    report.rss_baseline_mb = statistics.median(s.rss_mb for s in after[:window])
    report.rss_final_mb = statistics.median(s.rss_mb for s in after[-window:])
    report.rss_growth = round(report.rss_final_mb / report.rss_baseline_mb - 1.0, 4)
    report.new_shader_programs = after[-1].shader_programs - after[0].shader_programs
    if report.rss_growth > args.max_rss_growth:
        why = (f"resident memory grew {report.rss_growth:.1%} after the warm-up "
               f"({report.rss_baseline_mb:.0f} -> {report.rss_final_mb:.0f} MB; limit {args.max_rss_growth:.0%})")
        if report.new_shader_programs > 0:  # kept by design, one per combination of effects: say so
            why += (f"; {report.new_shader_programs} new shader variants were compiled meanwhile (each is kept): "
                    "a longer warm-up lets every combination compile first")
        report.fail(why)
    if fd_baseline >= 0 and after[-1].open_files >= 0:
        report.open_files_growth = after[-1].open_files - fd_baseline
        if report.open_files_growth > args.max_fd_growth:
            report.fail(f"open files grew by {report.open_files_growth} after the warm-up (a leak of handles)")


# -- the command line ---------------------------------------------------------------------------

def _pin(app: App, assignments: list[tuple[str, str]]) -> None:
    """Set the --set parameters (again); numbers stay text for text parameters (a prompt "1999")."""
    for path, text in assignments:
        try:
            numeric = app.params.param(path).kind in (Kind.FLOAT, Kind.INT)
            app.params.set(path, float(text) if numeric else text, origin="soak")
        except (KeyError, ValueError, ParamError) as exc:
            raise SystemExit(f"soak: --set {path}={text}: {exc}") from None


def _assignment(text: str) -> tuple[str, str]:
    path, sep, value = text.partition("=")
    if not sep or not path.startswith("/"):
        raise argparse.ArgumentTypeError(f"{text!r} is not PATH=VALUE, e.g. /scene/realtime/model=./tiny-turbo")
    return path, value


def _size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu-scenes", action="store_true",
                        help="also switch to scenes that need an accelerator (the real-time diffusion scene): "
                             "for the installation's GPU machine, with its models in the cache")
    parser.add_argument("--scenes", type=lambda text: [n.strip() for n in text.split(",") if n.strip()],
                        help="exactly these scenes, comma-separated (e.g. reaction_diffusion,passthrough,ddpm: the "
                             "shipped DDPM runs on a CPU with no download)")
    parser.add_argument("--frames", type=int, help="frames to run (default 3600, or --seconds x --fps)")
    parser.add_argument("--seconds", type=float, help="stop after this long instead (a 24-hour run: 86400)")
    parser.add_argument("--clock", choices=["manual", "real"], default="manual",
                        help="manual: as fast as it goes, fixed time per frame; real: paced at --fps")
    parser.add_argument("--fps", type=float, default=60.0)
    parser.add_argument("--size", type=_size, default=(480, 270), help="output WxH (default 480x270)")
    parser.add_argument("--every", type=int, default=30, help="frames between perturbations (default 30)")
    parser.add_argument("--sample-every", type=int, default=0, help="frames between samples (default frames/50)")
    parser.add_argument("--warmup", type=float, default=0.2,
                        help="fraction of frames before memory is judged (at least two rounds of --every events)")
    parser.add_argument("--max-rss-growth", type=float, default=0.05, help="fraction (default 0.05 = 5%%)")
    parser.add_argument("--max-fd-growth", type=int, default=20)
    parser.add_argument("--recover-s", type=float, default=30.0, help="seconds allowed to recover at the end")
    parser.add_argument("--events", default=",".join(dict.fromkeys(EVENTS)),
                        help="which perturbations, comma-separated (default all: %(default)s)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", type=_assignment,
                        help="set a parameter before the run (repeatable), e.g. --set /scene/realtime/model=DIR "
                             "to soak the realtime scene on a local model")
    parser.add_argument("--json", type=Path, help="write the report and every sample here")
    parser.add_argument("--self-test-leak-kb", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.frames is None:  # with --seconds: about the frames that fit, which also sizes warm-up and samples
        args.frames = 3600 if args.seconds is None else int(args.seconds * args.fps)
    if args.frames < 10 or args.every < 1:
        parser.error("--frames must be at least 10 and --every at least 1")
    args.sample_every = args.sample_every or max(1, args.frames // 50)
    args.events = [e for e in args.events.split(",") if e]
    unknown = sorted(set(args.events) - set(EVENTS))
    if unknown:
        parser.error(f"unknown events {', '.join(unknown)}; known: {', '.join(dict.fromkeys(EVENTS))}")
    return args


def soak_catalog(args: argparse.Namespace) -> SceneCatalog:
    """On a machine without a GPU the diffusion scene can only fail to load; its first attempt
    imports torch (hundreds of MB, once), which would read as a leak. Leave it out unless asked."""
    full = installed_catalog()
    if args.scenes:
        return SceneCatalog(tuple(full.get(n) for n in args.scenes))  # KeyError names the known scenes
    if args.gpu_scenes:
        return full
    return SceneCatalog(tuple(full.get(n) for n in full.names() if full.get(n).needs.accelerator_mb == 0))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    report = run_soak(args)
    print(f"soak: {report.frames} frames in {report.seconds:.1f} s ({report.clock} clock); "
          f"events {report.events}")
    print(f"  resident memory {report.rss_baseline_mb:.0f} -> {report.rss_final_mb:.0f} MB after warm-up "
          f"({report.rss_growth:+.1%}); open files {report.open_files_growth:+d}; threads {report.threads_final}; "
          f"shader variants compiled after warm-up {report.new_shader_programs}")
    accel = [s.accelerator_mb for s in report.samples if s.accelerator_mb is not None]
    print(f"  accelerator memory: {f'{accel[0]:.0f} -> {accel[-1]:.0f} MB' if accel else 'none in use'}")
    print(f"  OSC: {report.osc_packets_sent} packets sent; {report.osc}")
    print(f"  status page: {report.http_requests} requests, {len(report.http_failures)} failed")
    print(f"  distinct errors shown (expected: broken presets, shader, lost source): {len(report.errors_seen)}")
    print(f"  final source: {report.final_source}")
    if args.json:
        data = asdict(report)
        args.json.write_text(json.dumps(data, indent=1), encoding="utf-8")
        print(f"  report: {args.json}")
    print("PASS" if report.ok else "FAIL:\n  " + "\n  ".join(report.failures))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
