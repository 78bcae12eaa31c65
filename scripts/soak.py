"""Soak test: run the show headless for N frames while everything that can go wrong does.

    python scripts/soak.py --frames 3600                    # a minute of frames, fast (ManualClock)
    python scripts/soak.py --clock real --seconds 86400 --json soak.json   # 24 hours, paced at 60 fps

The show is the one ``dreamdeck run`` plays, built by the same ``build_show``: OSC, OSCQuery,
tempo, Link and modulation, opening hours (always open), MIDI (on a private JACK dummy
server where jackd is installed), the recorder, the state tracker, the systemd notifier
(talking to a socket of the soak's own) and the status page, polled by a client thread.

What it does to the show, in turn, every ``--every`` frames: switch scenes; recall presets
(good ones and broken ones); flood OSC with valid and malformed packets; start and stop a
recording; send a burst of MIDI (mapped and unmapped controllers, notes, clock); make the
camera stand-in (an MJPG file played as ``file:PATH``) vanish and come back; break a shader
in a private copy of shaders/ and fix it.

``--set PATH=VALUE`` pins a parameter: it is written into every preset of the private copy
(so a recall lands the pinned value) and kept out of the OSC and MIDI floods, set again
after every perturbation, and checked every frame. The scenes it names (``/scene/active``
or ``/scene/NAME/...``) must really play: the images each produced are counted.

What it measures, every ``--sample-every`` frames: resident memory (psutil if installed,
else /proc/self/statm), accelerator memory (when CUDA is in use), open files, threads.
At the end everything is put right and the show must recover (source playing, no shader
error) within ``--recover-s`` seconds.

It exits 1 when: a frame raised, a thread died of an uncaught exception, resident
memory grew by more than ``--max-rss-growth`` (a fraction) between the end of the
warm-up and the end, open files grew by more than ``--max-fd-growth``, the show did
not recover, a pinned parameter did not hold, a pinned scene produced no image or
played less than ``--min-pinned-share`` of the frames it was asked for, the recorder
finished no take (with ffmpeg installed), or systemd was never told READY. It prints a
summary and, with ``--json``, writes every sample.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import random
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tomli_w

from engine.app import App, AppConfig
from engine.catalog import PRESETS_DIR, SHADERS_DIR
from engine.control.setup import ControlConfig
from engine.outputs.recorder import RECORD_PARAM
from engine.params import Kind, ParamError
from engine.presets import is_presettable
from engine.scenes import installed_catalog
from engine.schedule import parse_hours
from engine.show import OutputConfig, Show, ShowConfig, ShowError, StateConfig, StatusPageConfig, build_show
from engine.web import StatusConfig, accelerator_memory

log = logging.getLogger("soak")

BROKEN_PRESETS = {
    "broken_syntax": "[fx.kaleido\nsegments = 3\n",
    "broken_range": "[fx.kaleido]\nenabled = true\nsegments = 999\n",
    "broken_key": "[fx.kaleido]\nsegmnets = 5\n",
}
BROKEN_SHADER = "fx/grade.glsl"  # on in the default preset, so breaking it shows at once
EVENTS = (
    "scene",
    "preset",
    "osc",
    "record",
    "clip_away",
    "shader_break",
    "midi",
    "preset",
    "clip_back",
    "record",
    "shader_fix",
)
MIDI_MAPPED = ("/fx/grade/hue", "/fx/kaleido/segments", "/layer/scene/opacity")  # CC 1, 2, 3 on channel 1
WATCHDOG_S = 1.0  # the watchdog period the soak's pretend systemd asks for: a ping every 0.5 s of show time


# -- measuring ------------------------------------------------------------------------------


def release_free_memory() -> None:
    """Give freed heap pages back to the system before a sample: resident memory then tracks
    what is alive, not what the allocator happens to keep (glibc's malloc_trim; elsewhere a no-op).

    Without it one video reopen or burst of OSC can leave a few MB of free-but-kept heap late
    in a short run, which reads as growth; a real leak stays alive and still shows."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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
    return Sample(
        frame,
        round(time.monotonic() - started, 2),
        round(rss_mb(), 1),
        None if not accel or "allocated_mb" not in accel else accel["allocated_mb"],
        open_files(),
        threading.active_count(),
        len(app.shaders.compile_ms),
        round(app.stats.render_fps, 1),
    )


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
    takes: Path  # the recorder's files
    midi_map: Path
    state: Path
    notify_socket: Path


def make_clip(path: Path, frames: int = 24, size: tuple[int, int] = (160, 90)) -> Path:
    """An MJPG clip of a bar sweeping across: the camera stand-in (OpenCV writes it, no ffmpeg needed)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, size)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write MJPG video to {path}")
    w, h = size
    for i in range(frames):
        frame = np.full((h, w, 3), 30, np.uint8)
        x = i * w // frames
        frame[:, x : x + w // 6] = (40, 200, 250)
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
    takes = root / "takes"
    takes.mkdir()
    return Workspace(
        root,
        presets,
        shaders,
        clip,
        root / "camera-unplugged.avi",
        shader_file,
        shader_file.read_text(encoding="utf-8"),
        takes,
        root / "midi.toml",
        root / "state.toml",
        root / "notify.sock",
    )


def write_pins_into_presets(ws: Workspace, pins: dict[str, Any]) -> None:
    """Every good preset of the private copy recalls the pinned values: a recall lands them
    unchanged, so a pinned model is never swapped for the preset's, not even for a frame."""
    for path in ws.presets.glob("*.toml"):
        if path.stem in BROKEN_PRESETS:
            continue
        document = tomllib.loads(path.read_text(encoding="utf-8"))
        for param, value in pins.items():
            *tables, key = param.strip("/").split("/")
            table = document
            for name in tables:
                table = table.setdefault(name, {})
            table[key] = value
        path.write_text(tomli_w.dumps(document), encoding="utf-8")


def write_midi_map(ws: Workspace, port: str, params: list[str]) -> None:
    maps = [
        {"port": port, "channel": 1, "type": "cc", "number": n, "param": path, "mode": "absolute", "takeover": "jump"}
        for n, path in enumerate(params, 1)
    ]
    ws.midi_map.write_text(tomli_w.dumps({"version": 1, "map": maps}), encoding="utf-8")


# -- the troublemakers ------------------------------------------------------------------------------


class Flooder:
    """Sends bursts of OSC (valid and malformed) on its own thread, never waiting on the app."""

    def __init__(self, port: int, paths: list[str], seed: int, next_scene: bool = True) -> None:
        self.port = port
        self.paths = paths
        self.next_scene = next_scene  # False while /scene/active is pinned
        self.random = random.Random(seed)
        self.sent = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._bursts: list[int] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak osc flood", daemon=True)

    def start(self) -> Flooder:
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
        next_scene = choice >= 0.9 and self.next_scene
        address = "/dreamdeck/scene/next" if next_scene else f"/dreamdeck{r.choice(self.paths)}"
        if choice < 0.7:  # a float in 0..1: valid for many parameters, out of range for some
            return _osc(address, b",f", struct.pack(">f", r.random()))
        return _osc(
            address, b"," + bytes(r.choice(b"ifsTFN[]") for _ in range(r.randint(0, 4))), r.randbytes(r.randint(0, 16))
        )  # type tags that lie about their arguments


def _osc(address: str, tags: bytes, args: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        b += b"\0"
        return b + b"\0" * (-len(b) % 4)

    return pad(address.encode()) + pad(tags) + args


class WebPoller:
    """A phone left on the status page: health and thumbnail twice a second, a fader now and then."""

    def __init__(self, port: int, fader: str | None = "/layer/source/opacity") -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.fader = fader  # None while it is pinned
        self.requests = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak web poller", daemon=True)

    def start(self) -> WebPoller:
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
            if n % 4 == 0 and self.fader is not None:
                body = json.dumps({"path": self.fader, "value": (n % 10) / 10}).encode()
                self._get("/api/param", data=body)

    def _get(self, path: str, data: bytes | None = None, ok: tuple[int, ...] = (200,)) -> None:
        self.requests += 1
        request = urllib.request.Request(
            self.base + path, data=data, headers={"Content-Type": "application/json"} if data else {}
        )
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


class JackController:
    """A MIDI controller on a private JACK dummy server: the show opens its port by name.

    ``start`` returns None, with the reason, where jackd or JACK MIDI is missing; the soak
    then runs without MIDI and says so."""

    NAME = "soak-controller"

    def __init__(self, server: subprocess.Popen, port: Any, log_path: Path) -> None:
        self.server = server
        self.port = port
        self.log_path = log_path
        self.sent = 0

    @classmethod
    def start(cls, root: Path) -> tuple[JackController | None, str]:
        jackd = shutil.which("jackd")
        if jackd is None:
            return None, "off: jackd is not installed (apt-get install jackd2)"
        try:
            import rtmidi
        except ImportError:
            return None, "off: python-rtmidi is not installed"
        name = f"dreamdeck-soak-{os.getpid()}"
        os.environ["JACK_DEFAULT_SERVER"] = name  # this process only: never another JACK server
        log_path = root / "jackd.log"
        with open(log_path, "wb") as log_file:
            # --sync: a busy machine delays MIDI but never drops it
            server = subprocess.Popen(
                [jackd, "--no-realtime", "--sync", "-n", name, "-d", "dummy", "-r", "48000", "-p", "256"],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10.0
        while True:
            try:
                port = rtmidi.MidiOut(rtapi=rtmidi.API_UNIX_JACK, name=cls.NAME)
                port.open_virtual_port(cls.NAME)
                return cls(server, port, log_path), f"on: JACK dummy server {name}, port {cls.NAME}"
            except rtmidi.SystemError:
                if server.poll() is not None or time.monotonic() > deadline:
                    _stop_process(server)
                    why = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                    return None, f"off: jackd did not come up ({why[0]})"
                time.sleep(0.05)

    def burst(self, rng: random.Random, messages: int) -> None:
        """Mapped controllers (CC 1-3), unmapped ones, notes, pitch bend and clock with start."""
        self._send([0xFA])  # start: the tempo follows the clock that comes
        for _ in range(messages):
            kind = rng.random()
            if kind < 0.4:
                message = [0xB0, rng.randint(1, len(MIDI_MAPPED)), rng.randint(0, 127)]
            elif kind < 0.6:
                message = [0xB0 | rng.randint(0, 15), rng.randint(0, 127), rng.randint(0, 127)]
            elif kind < 0.7:
                message = [0x90 | rng.randint(0, 15), rng.randint(0, 127), rng.randint(0, 127)]
            elif kind < 0.75:
                message = [0xE0, rng.randint(0, 127), rng.randint(0, 127)]
            else:
                message = [0xF8]  # clock
            self._send(message)

    def _send(self, message: list[int]) -> None:
        self.port.send_message(message)
        self.sent += 1

    def close(self) -> None:
        from engine.control.midi import JACK_CLOSE_PAUSE

        self.port.delete()
        time.sleep(JACK_CLOSE_PAUSE)  # libjack can crash when clients close back to back
        _stop_process(self.server)
        os.environ.pop("JACK_DEFAULT_SERVER", None)


def _stop_process(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class NotifyListener:
    """The soak's pretend systemd: a datagram socket that counts what the show's notifier says."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.counts: dict[str, int] = {}
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak systemd", daemon=True)

    def start(self) -> NotifyListener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode(errors="replace").splitlines():
                key = line.partition("=")[0]
                self.counts[key] = self.counts.get(key, 0) + 1


@contextlib.contextmanager
def systemd_environment(ws: Workspace) -> Iterator[None]:
    """NOTIFY_SOCKET and WATCHDOG_USEC as systemd sets them, while the show's notifier reads them."""
    wanted = {
        "NOTIFY_SOCKET": str(ws.notify_socket),
        "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6)),
        "WATCHDOG_PID": str(os.getpid()),
    }
    before = {key: os.environ.get(key) for key in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -- pins -----------------------------------------------------------------------------------------


@dataclass
class SceneTally:
    """What a pinned scene did: images it produced; frames it was asked for, played, loaded, missed."""

    images: int = 0
    asked: int = 0
    playing: int = 0
    loading: int = 0
    missing: int = 0  # asked for, not loading, yet another scene (or none) played

    @property
    def share(self) -> float:
        return self.playing / max(1, self.playing + self.missing)


@dataclass
class Pins:
    values: dict[str, Any]  # path -> value as the registry holds it
    scenes: dict[str, SceneTally]
    broken: dict[str, str] = field(default_factory=dict)  # path -> the first time it did not hold
    _seq: int = -1

    @classmethod
    def parse(cls, app: App, assignments: list[tuple[str, str]]) -> Pins:
        """Numbers stay text for text parameters (a prompt "1999")."""
        values: dict[str, Any] = {}
        for path, text in assignments:
            try:
                numeric = app.params.param(path).kind in (Kind.FLOAT, Kind.INT)
                values[path] = app.params.param(path).coerce(float(text) if numeric else text)
            except (KeyError, ValueError, ParamError) as exc:
                raise SystemExit(f"soak: --set {path}={text}: {exc}") from None
        names = app.catalog.names()
        scenes = [values["/scene/active"]] if "/scene/active" in values else []
        scenes += [p.split("/")[2] for p in values if p.startswith("/scene/") and p.count("/") >= 3]
        return cls(values, {name: SceneTally() for name in dict.fromkeys(scenes) if name in names})

    def apply(self, app: App) -> None:
        app.params.set_many(self.values, origin="soak")

    def check(self, app: App, frame: int) -> None:
        """Once a frame: each pin still holds, and what each pinned scene is doing."""
        for path, value in self.values.items():
            now = app.params.target(path)
            if now != value and path not in self.broken:
                last = app.params.last_change
                self.broken[path] = f"--set {path}={value!r} did not hold: {now!r} at frame {frame}" + (
                    f" (last outside change {last.path} from {last.origin})" if last else ""
                )
        latest, seq = app.worker.output.latest()
        worker = app.worker
        for name, tally in self.scenes.items():
            if latest is not None and latest.scene == name and seq != self._seq:
                tally.images += 1
            if app.params.target("/scene/active") != name:
                continue
            tally.asked += 1
            if worker.active_name == name:
                tally.playing += 1
            elif worker.loading == name or worker.pending_name == name:
                tally.loading += 1
            else:
                tally.missing += 1
        self._seq = seq

    def judge(self, report: Report, app: App, min_share: float) -> None:
        for why in self.broken.values():
            report.fail(why)
        for name, tally in self.scenes.items():
            report.pinned_scenes[name] = asdict(tally)
            error = f"; last scene error: {app.worker.last_error}" if app.worker.last_error else ""
            if tally.images == 0:
                report.fail(
                    f"pinned scene {name} produced no image ({tally.asked} frames asked for it, "
                    f"{tally.loading} of them loading){error}"
                )
            elif tally.share < min_share:
                report.fail(
                    f"pinned scene {name} played only {tally.share:.0%} of the {tally.playing + tally.missing} "
                    f"frames it was asked for (loads not counted; at least {min_share:.0%} needed){error}"
                )


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
    parts: list[str] = field(default_factory=list)  # the show's controls and outputs, by name (as dreamdeck run's)
    midi: str = ""
    midi_messages_sent: int = 0
    midi_received: int = 0  # channel messages the show handled
    recordings: int = 0  # takes the recorder finished (MP4 files with something in them)
    systemd: dict[str, int] = field(default_factory=dict)  # what the notifier said, by key (READY, WATCHDOG...)
    pinned_scenes: dict[str, dict[str, int]] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)

    def fail(self, why: str) -> None:
        self.ok = False
        self.failures.append(why)


def soak_config(args: argparse.Namespace, ws: Workspace, midi_port: str | None) -> ShowConfig:
    """The show ``dreamdeck run`` plays, on the soak's private copies and free ports."""
    return ShowConfig(
        app=AppConfig(
            source=f"file:{ws.clip}",
            presets_dir=ws.presets,
            shaders_dir=ws.shaders,
            output_size=args.size,
            hot_reload=True,
        ),
        fps=args.fps,
        clock=args.clock,
        scenes=soak_scenes(args),
        controls=ControlConfig(
            osc_port=0,
            oscquery_port=0,
            midi=midi_port is not None,
            midi_inputs=(midi_port,) if midi_port else (),
            midi_map=ws.midi_map,
            midi_api="jack",
            hours=parse_hours("always"),
        ),
        outputs=OutputConfig(record_pattern=str(ws.takes / "take-%Y%m%d-%H%M%S.mp4")),
        state=StateConfig(path=ws.state),
        status=StatusPageConfig(StatusConfig(port=0), required=True),
    )


@dataclass
class Rig:
    """What the soak does to the show with."""

    ws: Workspace
    flooder: Flooder
    midi: JackController | None
    presets: list[str]
    pins: Pins
    random: random.Random


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
    show: Show | None = None
    flooder: Flooder | None = None
    poller: WebPoller | None = None
    midi: JackController | None = None
    systemd: NotifyListener | None = None
    show_seconds = 0.0
    try:
        ws = make_workspace(root)
        midi, report.midi = JackController.start(root)
        systemd = NotifyListener(ws.notify_socket).start()
        with systemd_environment(ws):
            show = build_show(soak_config(args, ws, midi.NAME if midi else None))
        app = show.app
        report.parts = sorted(show.parts)
        pins = Pins.parse(app, args.set)
        write_pins_into_presets(ws, {p: v for p, v in pins.values.items() if is_presettable(app.params.param(p))})
        write_midi_map(ws, JackController.NAME, [p for p in MIDI_MAPPED if p in app.params and p not in pins.values])
        show.start()
        pins.apply(app)
        osc = show.parts["osc"]
        paths = [p.path for p in app.params.params() if p.path not in pins.values]
        flooder = Flooder(osc.port, paths, args.seed, next_scene="/scene/active" not in pins.values).start()
        poller = WebPoller(
            show.status_page.port, None if "/layer/source/opacity" in pins.values else "/layer/source/opacity"
        ).start()
        rig = Rig(ws, flooder, midi, [e.name for e in app.presets.entries()], pins, random.Random(args.seed))
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
            pins.check(app, frame)
            if args.clock == "manual":
                time.sleep(0.001)  # let the capture, scene and server threads run on a small machine
            if frame % args.every == 0:
                event = EVENTS[(frame // args.every - 1) % len(EVENTS)]
                if event in args.events and _perturb(event, app, rig, frame):
                    pins.apply(app)  # again after every perturbation (a value equal to the pin changes nothing)
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
        report.osc = str(osc.status)
        if "midi" in show.parts:
            report.midi_received = show.parts["midi"].received
        pins.judge(report, app, args.min_pinned_share)
        _judge_memory(report, args, fd_baseline)
        show_seconds = app.clock.now()
    finally:
        if flooder is not None:
            flooder.stop()
            report.osc_packets_sent = flooder.sent
        if poller is not None:
            poller.stop()
            report.http_requests = poller.requests
            report.http_failures = poller.failures[:20]
        if show is not None:
            show.close()  # the recorder finishes its last take here
        if midi is not None:
            report.midi_messages_sent = midi.sent
            midi.close()
        if systemd is not None:
            systemd.stop()
            report.systemd = dict(systemd.counts)
        report.recordings = sum(1 for take in root.glob("takes/*.mp4") if take.stat().st_size > 0)
        threading.excepthook = previous_hook
        shutil.rmtree(root, ignore_errors=True)
    report.thread_crashes = crashes
    report.threads_final = threading.active_count()
    if crashes:
        report.fail(f"{len(crashes)} thread(s) died of an uncaught exception: {crashes[0]}")
    if report.http_failures:
        report.fail(f"the status page failed: {report.http_failures[0]}")
    _judge_outputs(report, show_seconds)
    return report


def _judge_outputs(report: Report, show_seconds: float) -> None:
    """MIDI, the recorder and the notifier did their jobs: parts that worked, not only constructed."""
    if report.midi_messages_sent and not report.midi_received:
        report.fail(f"MIDI: {report.midi_messages_sent} messages sent, none reached the show")
    if report.events.get("record", 0) >= 2 and shutil.which("ffmpeg") and report.recordings == 0:
        report.fail(f"the recorder finished no take in {report.events['record'] // 2} start/stop rounds")
    if not report.systemd.get("READY"):
        report.fail("the systemd notifier never said READY=1")
    elif show_seconds > 2 * WATCHDOG_S and not report.systemd.get("WATCHDOG"):
        report.fail(f"the systemd notifier sent no watchdog ping in {show_seconds:.0f} s of show time")


def _perturb(event: str, app: App, rig: Rig, frame: int) -> bool:
    """Do one thing to the show; False when it was not done (a pin forbids it, no MIDI)."""
    ws = rig.ws
    if event == "scene":
        if "/scene/active" in rig.pins.values:
            return False  # the pinned scene plays on
        app.actions.post("scene/next", origin="soak")
    elif event == "preset":
        app.recall_preset(rig.presets[(frame // 7) % len(rig.presets)])  # loaded on its own thread, as a key press is
    elif event == "osc":
        rig.flooder.burst(300)
    elif event == "record":
        app.params.set(RECORD_PARAM, not app.params.target(RECORD_PARAM), origin="soak")
    elif event == "midi":
        if rig.midi is None:
            return False
        rig.midi.burst(rig.random, 200)
    elif event == "clip_away" and ws.clip.exists():
        ws.clip.rename(ws.hidden_clip)  # the camera is unplugged
    elif event == "clip_back" and ws.hidden_clip.exists():
        ws.hidden_clip.rename(ws.clip)
    elif event == "shader_break":
        ws.shader_file.write_text(ws.shader_text + "\nthis is not GLSL;\n", encoding="utf-8")
    elif event == "shader_fix":
        ws.shader_file.write_text(ws.shader_text, encoding="utf-8")
    return True


def _recover(app: App, ws: Workspace, timeout_s: float, report: Report) -> None:
    """Put everything right, then the show must come back by itself: source playing, shaders fine."""
    app.params.set(RECORD_PARAM, False, origin="soak")
    if ws.hidden_clip.exists():
        ws.hidden_clip.rename(ws.clip)
    ws.shader_file.write_text(ws.shader_text, encoding="utf-8")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app.step()
        time.sleep(0.002)
        if not app.input.fallback_active and not app.shaders.errors:
            return
    report.fail(
        f"not recovered {timeout_s:g} s after the clip and the shader were restored: "
        f"source {app.input.status!r}, shader errors {list(app.shaders.errors.values())}"
    )


def _judge_memory(report: Report, args: argparse.Namespace, fd_baseline: int) -> None:
    after = [s for s in report.samples if s.frame > report.warmup_frames]
    if len(after) < 2:
        report.fail("too few samples after the warm-up to judge memory: use more --frames or a smaller --sample-every")
        return
    window = max(1, min(3, len(after) // 4))  # medians of a few samples: one GC pause is not a leak
    report.rss_baseline_mb = statistics.median(s.rss_mb for s in after[:window])
    report.rss_final_mb = statistics.median(s.rss_mb for s in after[-window:])
    report.rss_growth = round(report.rss_final_mb / report.rss_baseline_mb - 1.0, 4)
    report.new_shader_programs = after[-1].shader_programs - after[0].shader_programs
    if report.rss_growth > args.max_rss_growth:
        why = (
            f"resident memory grew {report.rss_growth:.1%} after the warm-up "
            f"({report.rss_baseline_mb:.0f} -> {report.rss_final_mb:.0f} MB; limit {args.max_rss_growth:.0%})"
        )
        if report.new_shader_programs > 0:  # kept by design, one per combination of effects: say so
            why += (
                f"; {report.new_shader_programs} new shader variants were compiled meanwhile (each is kept): "
                "a longer warm-up lets every combination compile first"
            )
        report.fail(why)
    if fd_baseline >= 0 and after[-1].open_files >= 0:
        report.open_files_growth = after[-1].open_files - fd_baseline
        if report.open_files_growth > args.max_fd_growth:
            report.fail(f"open files grew by {report.open_files_growth} after the warm-up (a leak of handles)")


# -- the command line ---------------------------------------------------------------------------


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
    parser.add_argument(
        "--gpu-scenes",
        action="store_true",
        help="also switch to scenes that need an accelerator (the real-time diffusion scene): "
        "for the installation's GPU machine, with its models in the cache",
    )
    parser.add_argument(
        "--scenes",
        type=lambda text: [n.strip() for n in text.split(",") if n.strip()],
        help="exactly these scenes, comma-separated (e.g. reaction_diffusion,passthrough,ddpm: the "
        "shipped DDPM runs on a CPU with no download)",
    )
    parser.add_argument("--frames", type=int, help="frames to run (default 3600, or --seconds x --fps)")
    parser.add_argument("--seconds", type=float, help="stop after this long instead (a 24-hour run: 86400)")
    parser.add_argument(
        "--clock",
        choices=["manual", "real"],
        default="manual",
        help="manual: as fast as it goes, fixed time per frame; real: paced at --fps",
    )
    parser.add_argument("--fps", type=float, default=60.0)
    parser.add_argument("--size", type=_size, default=(480, 270), help="output WxH (default 480x270)")
    parser.add_argument("--every", type=int, default=30, help="frames between perturbations (default 30)")
    parser.add_argument("--sample-every", type=int, default=0, help="frames between samples (default frames/50)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=0.2,
        help="fraction of frames before memory is judged (at least two rounds of --every events)",
    )
    parser.add_argument("--max-rss-growth", type=float, default=0.05, help="fraction (default 0.05 = 5%%)")
    parser.add_argument("--max-fd-growth", type=int, default=20)
    parser.add_argument("--recover-s", type=float, default=30.0, help="seconds allowed to recover at the end")
    parser.add_argument(
        "--events",
        default=",".join(dict.fromkeys(EVENTS)),
        help="which perturbations, comma-separated (default all: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        type=_assignment,
        help="set a parameter before the run (repeatable), e.g. --set /scene/realtime/model=DIR "
        "to soak the realtime scene on a local model",
    )
    parser.add_argument(
        "--min-pinned-share",
        type=float,
        default=0.9,
        help="a pinned scene must play at least this fraction of the frames it is asked for, "
        "loads not counted (default 0.9)",
    )
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


def soak_scenes(args: argparse.Namespace) -> tuple[str, ...] | None:
    """On a machine without a GPU the diffusion scene can only fail to load; its first attempt
    imports torch (hundreds of MB, once), which would read as a leak. Leave it out unless asked."""
    if args.scenes:
        return tuple(args.scenes)  # build_show names the known scenes when one is not
    if args.gpu_scenes:
        return None
    full = installed_catalog()
    return tuple(n for n in full.names() if full.get(n).needs.accelerator_mb == 0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    try:
        report = run_soak(args)
    except ShowError as exc:  # e.g. --scenes names a scene there is not
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    print(f"soak: {report.frames} frames in {report.seconds:.1f} s ({report.clock} clock); events {report.events}")
    print(
        f"  resident memory {report.rss_baseline_mb:.0f} -> {report.rss_final_mb:.0f} MB after warm-up "
        f"({report.rss_growth:+.1%}); open files {report.open_files_growth:+d}; threads {report.threads_final}; "
        f"shader variants compiled after warm-up {report.new_shader_programs}"
    )
    accel = [s.accelerator_mb for s in report.samples if s.accelerator_mb is not None]
    print(f"  accelerator memory: {f'{accel[0]:.0f} -> {accel[-1]:.0f} MB' if accel else 'none in use'}")
    print(f"  show parts: {', '.join(report.parts)}")
    print(f"  OSC: {report.osc_packets_sent} packets sent; {report.osc}")
    print(f"  MIDI {report.midi}; {report.midi_messages_sent} messages sent, {report.midi_received} handled")
    print(f"  recorder: {report.recordings} takes finished; systemd heard {report.systemd}")
    for name, tally in report.pinned_scenes.items():
        print(
            f"  pinned scene {name}: {tally['images']} images, played {tally['playing']} of the "
            f"{tally['playing'] + tally['missing']} frames it was asked for (+{tally['loading']} loading)"
        )
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
