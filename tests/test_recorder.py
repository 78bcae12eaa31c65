"""Recording and sharing the output: a headless App (EGL), a real ffmpeg, real files, real threads.

Every wait is bounded; no test asserts on wall-clock speed: the stuck-writer and stuck-receiver
tests hold the writer on an Event, and a render loop that waited on it would make that wait
give up (the test checks it never did).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.app import App, AppConfig
from engine.catalog import PRESETS_DIR
from engine.clock import ManualClock
from engine.outputs.recorder import RECORD_PARAM, RECORDER_PARAMS, FfmpegEncoder, Recorder, free_path, recording_path
from engine.outputs.sharing import FrameShare, SpoutOutput, SyphonOutput, ndi, virtual_camera
from engine.render.surface import HeadlessSurface

# an exception escaping the writer thread is a bug even when the test's checks pass
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = (160, 96)
TIMEOUT = 20.0

needs_ffmpeg = pytest.mark.skipif(
    shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
    reason="ffmpeg/ffprobe not installed (apt-get install ffmpeg)",
)


@pytest.fixture
def make_app() -> Iterator[Callable[[], App]]:
    made: list[tuple[App, HeadlessSurface]] = []

    def make() -> App:
        surface = HeadlessSurface()
        config = AppConfig(source="pattern", presets_dir=PRESETS_DIR, output_size=OUTPUT, hot_reload=False)
        app = App(config, surface, ManualClock(60.0))
        app.params.declare_all(RECORDER_PARAMS)  # engine/catalog.py declares these once wired
        made.append((app, surface))
        return app.start()

    yield make
    for app, surface in made:
        app.close()
        surface.close()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.005)


def warm_up(app: App) -> None:
    """Until the scene has drawn: the first frames compile shaders and load the scene."""
    wait_for(lambda: (app.step(), app.worker.output.latest()[0] is not None)[1], "the scene's first image")
    for _ in range(3):
        app.step()


def record(app: App, on: bool) -> None:
    app.params.set(RECORD_PARAM, on, origin="test")


def probe(path: Path) -> dict:
    result = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=codec_name,width,height,nb_read_frames,avg_frame_rate",
            "-of",
            "json",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["streams"][0]


def decode(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame[:, :, ::-1].astype(int))  # RGB, as read_output gives
    capture.release()
    return frames


# -- a real recording -----------------------------------------------------------------------------


@needs_ffmpeg
def test_records_every_frame_of_the_show_into_an_mp4(make_app, tmp_path: Path) -> None:
    app = make_app()
    recorder = app.add_output(Recorder(str(tmp_path / "takes" / "take-%Y%m%d.mp4"), fps=60.0, queue_frames=4))
    warm_up(app)
    assert recorder.status == ""  # nothing to say until the first take

    n = 24
    shown = []
    # every frame of the show must look different, or "frame k is the show's frame k" means nothing
    app.params.set("/fx/kaleido/enabled", True)
    record(app, True)
    for i in range(n):
        app.params.set("/fx/kaleido/segments", 2 + i)
        app.step()
        shown.append(app.compositor.read_output().astype(int))
        # pace the test so the writer keeps up: this test is about content, not about dropping
        wait_for(lambda: recorder.current.waiting == 0, "the writer to take the frame")
    assert recorder.status.startswith("REC 00:00 take-") and " 0 dropped" in recorder.status
    record(app, False)
    app.step()
    take = recorder.last
    assert recorder.current is None and take is not None
    recorder.stop()  # waits for the file
    assert take.finished.is_set() and take.error is None, take.error

    assert take.due == n and take.dropped == 0 and take.written == n
    assert take.path == recording_path(str(tmp_path / "takes" / "take-%Y%m%d.mp4"))
    assert sorted(p.name for p in take.path.parent.iterdir()) == [take.path.name], "a .part file was left"
    assert recorder.status.startswith(f"saved {take.path}") and f"({n} frames" in recorder.status
    info = probe(take.path)
    assert (info["codec_name"], info["width"], info["height"]) == ("h264", OUTPUT[0], OUTPUT[1])
    assert int(info["nb_read_frames"]) == n and info["avg_frame_rate"] == "60/1"

    frames = decode(take.path)
    assert len(frames) == n
    assert all(f.std() > 10 for f in frames), "a recorded frame is blank"
    for k in (0, n // 2, n - 1):  # frame k of the file is the show's frame k (lossy: compare errors)
        own = np.abs(frames[k] - shown[k]).mean()
        assert own < 8, f"recorded frame {k} is off by {own:.1f} on average"
        others = [np.abs(frames[k] - shown[j]).mean() for j in (0, n - 1) if abs(j - k) > 4]
        assert all(own < o for o in others), f"frame {k} looks more like another frame of the show"


@needs_ffmpeg
def test_each_take_is_a_new_file(make_app, tmp_path: Path) -> None:
    app = make_app()
    recorder = app.add_output(Recorder(str(tmp_path / "take.mp4"), fps=30.0))
    warm_up(app)
    for _ in range(2):
        record(app, True)
        for _ in range(6):
            app.step()
        record(app, False)
        app.step()
        assert recorder.last.wait(TIMEOUT) and recorder.last.error is None, recorder.last.error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["take-2.mp4", "take.mp4"]
    for name in ("take.mp4", "take-2.mp4"):
        assert int(probe(tmp_path / name)["nb_read_frames"]) == 3  # 6 frames at 60 fps into 30 fps slots


# -- a slow writer: the recording drops frames, the show does not wait ----------------------------


class StuckSink:
    """An encoder stuck in its first write until the test lets it go: a disk or an encoder
    that cannot keep up, made deterministic. If the render loop ever waited for the writer,
    the steps taken while it is stuck would hang until ``hold`` runs out."""

    def __init__(self, hold: float = TIMEOUT) -> None:
        self.hold = hold
        self.gate = threading.Event()
        self.held_out = False  # a write gave up waiting: the test never let it go
        self.writes = 0
        self.frames = 0

    def open(self, path: Path, size: tuple[int, int], fps: float) -> None:
        self.path = path
        path.write_bytes(b"")

    def write(self, rgba: bytearray, count: int) -> None:
        if not self.gate.wait(self.hold):
            self.held_out = True
        self.writes += 1
        self.frames += count

    def finish(self) -> None:
        self.path.write_bytes(b"done")

    def abort(self) -> None:
        raise AssertionError("nothing failed: abort must not be called")


def test_a_stuck_writer_drops_recording_frames_and_never_blocks_the_show(make_app, tmp_path: Path) -> None:
    app = make_app()
    sink = StuckSink()
    recorder = app.add_output(Recorder(str(tmp_path / "slow.mp4"), fps=60.0, queue_frames=2, encoder=lambda: sink))
    warm_up(app)

    n = 30
    record(app, True)
    for _ in range(n):
        app.step()
    assert not sink.gate.is_set() and sink.writes == 0, "the writer was held in its first write all along"
    take = recorder.current
    assert take.due == n and take.dropped >= n - 4, "with the writer stuck, only the pool's frames are kept"
    assert not sink.held_out, "the render loop waited for the writer (its write gave up waiting for the test)"

    sink.gate.set()  # the disk catches up
    record(app, False)
    app.step()
    recorder.stop()
    assert take.error is None and take.path.read_bytes() == b"done"
    assert sink.writes == n - take.dropped, "every frame not dropped reaches the writer once"
    assert sink.frames == take.written and n - take.dropped <= take.written <= n
    assert app.stats.frames >= n


# -- failures: the show goes on --------------------------------------------------------------------


@pytest.mark.parametrize("case", ["no ffmpeg", "folder is a file"])
def test_a_recording_that_cannot_start_says_so_once_and_the_show_goes_on(
    make_app, tmp_path: Path, caplog, case: str
) -> None:
    app = make_app()
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the folder should be")
    if case == "no ffmpeg":
        recorder = Recorder(str(tmp_path / "x.mp4"), encoder=lambda: FfmpegEncoder(ffmpeg=str(tmp_path / "ffmpeg")))
    else:
        recorder = Recorder(str(blocker / "x.mp4"))
    app.add_output(recorder)
    warm_up(app)
    frames = app.stats.frames
    record(app, True)
    wait_for(
        lambda: (app.step(), not app.params.get(RECORD_PARAM) and recorder.current is None)[1],
        "the recorder to give up and turn /output/record off",
    )
    assert recorder.last.wait(TIMEOUT), "the failed take's writer thread did not end"
    for _ in range(5):
        app.step()
    assert app.stats.frames > frames + 5
    expected = "ffmpeg not found" if case == "no ffmpeg" else "blocker"
    assert recorder.status.startswith("failed: ") and expected in recorder.status, recorder.status
    failures = [r for r in caplog.records if r.name == "engine.outputs.recorder" and r.levelname == "ERROR"]
    assert len(failures) == 1 and expected in failures[0].getMessage()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"], "a failed recording left a file"


SHOW_RUN = """
import signal, sys, time
from engine.app import App, AppConfig
from engine.catalog import PRESETS_DIR
from engine.clock import ManualClock
from engine.outputs.recorder import RECORD_PARAM, RECORDER_PARAMS, Recorder
from engine.render.surface import HeadlessSurface

surface = HeadlessSurface()
app = App(AppConfig(source="pattern", presets_dir=PRESETS_DIR, output_size=(160, 96), hot_reload=False),
          surface, ManualClock(60.0))
app.params.declare_all(RECORDER_PARAMS)
app.add_output(Recorder(sys.argv[1], fps=60.0))
app.start()
app.params.set(RECORD_PARAM, True)
# Ctrl+C ends the loop at a frame boundary: a KeyboardInterrupt raised at a random point
# can leave a lock of another thread's slot held, and closing then waits forever
interrupted = []
signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
while not interrupted:
    app.step()
    time.sleep(0.002)
app.close()
surface.close()
"""


def holders(path: Path) -> list[int]:
    """Processes that have ``path`` open (Linux /proc; elsewhere none are seen)."""
    pids = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == str(path) for fd in fd_dir.iterdir()):
                pids.append(int(fd_dir.parent.name))
        except OSError:  # processes come and go; other users' are unreadable
            continue
    return pids


@needs_ffmpeg
@pytest.mark.parametrize("how", ["kill -9", "Ctrl+C"])
def test_ending_the_show_mid_recording(tmp_path: Path, how: str) -> None:
    """Killed: nothing at the final name. Ctrl+C in the terminal (SIGINT to the foreground
    process group): the show finishes the take and it is kept under its final name."""
    final = tmp_path / "take.mp4"
    part = tmp_path / ".take.mp4.part"
    proc = subprocess.Popen(
        [sys.executable, "-c", SHOW_RUN, str(final)],
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: proc.poll() is None and part.exists() and part.stat().st_size > 0, "ffmpeg writing the .part file"
        )
        time.sleep(0.3)  # some frames in
        if how == "kill -9":
            os.kill(proc.pid, signal.SIGKILL)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT)
        # ffmpeg, in its own session, reads end-of-file on its stdin and exits by itself
        wait_for(lambda: not holders(part), "ffmpeg to exit after the show ended")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for pid in holders(part):  # the ffmpeg this test's show started, if it outlived the wait
            os.kill(pid, signal.SIGKILL)
    assert "Traceback" not in err, err[-2000:]
    if how == "kill -9":
        assert not final.exists(), "a killed recording must not appear under its final name"
        assert part.exists(), "the partial take stays, hidden, beside where the file would be"
    else:
        assert proc.returncode == 0, err[-2000:]
        assert final.exists() and not part.exists(), sorted(p.name for p in tmp_path.iterdir())
        assert int(probe(final)["nb_read_frames"]) > 5


# -- naming ---------------------------------------------------------------------------------------


def test_recording_path_fills_the_pattern_and_never_overwrites(tmp_path: Path) -> None:
    when = time.mktime((2025, 3, 4, 5, 6, 7, 0, 0, -1))
    assert (
        recording_path("~/Videos/dreamdeck-%Y%m%d-%H%M%S.mp4", when)
        == Path.home() / "Videos" / "dreamdeck-20250304-050607.mp4"
    )
    take = tmp_path / "take.mp4"
    assert free_path(take) == take
    take.write_bytes(b"x")
    (tmp_path / "take-2.mp4").write_bytes(b"x")
    assert free_path(take) == tmp_path / "take-3.mp4"


# -- sharing with other apps (engine/outputs/sharing.py) ------------------------------------------


class FakeSender:
    """A FrameSender that keeps what it was sent; with ``stuck``, its first send waits for ``gate``."""

    description = "fake"

    def __init__(self, stuck: bool = False) -> None:
        self.gate = threading.Event()
        if not stuck:
            self.gate.set()
        self.frames: list[np.ndarray] = []
        self.closed = False
        self.gave_up = False  # a send gave up waiting: the test never let it go

    def open(self, size: tuple[int, int], fps: float) -> None:
        self.size = size

    def send(self, rgba: np.ndarray) -> None:
        if not self.gate.wait(TIMEOUT):
            self.gave_up = True
            raise AssertionError("the test never let the sender go")
        self.frames.append(rgba.copy())

    def close(self) -> None:
        self.closed = True


def test_frame_sharing_sends_the_output_at_its_own_rate(make_app) -> None:
    sender = FakeSender()
    share = FrameShare("fake", sender, fps=30.0)
    app = make_app()
    warm_up(app)
    app.add_output(share)
    shown = []
    for _ in range(40):  # 40 frames at 60 fps: 20 due at 30 fps
        app.step()
        shown.append(app.compositor.read_output().astype(int))
        wait_for(lambda: not share.waiting, "the sender to take the frame")  # keep up: none skipped
    app.stop()  # stops the outputs (the fixture closes the rest)
    assert sender.closed and share.skipped == 0
    assert len(sender.frames) in (19, 20), "one frame in two at half the render rate (the last may be in flight)"
    assert sender.frames[0].shape == (OUTPUT[1], OUTPUT[0], 4)
    for frame in (sender.frames[0], sender.frames[-1]):  # each one is a frame the show rendered
        assert min(np.abs(frame[..., :3].astype(int) - s).max() for s in shown) == 0
    assert share.status == f"fake  sent {len(sender.frames)}  skipped 0"


def test_a_stuck_receiver_skips_frames_and_never_blocks_the_show(make_app) -> None:
    sender = FakeSender(stuck=True)
    share = FrameShare("stuck", sender, fps=60.0)
    app = make_app()
    warm_up(app)
    app.add_output(share)
    for _ in range(30):
        app.step()
    assert not sender.frames and not sender.gave_up, "the render loop waited for the sender"
    assert share.skipped >= 25, "frames the stuck sender could not take are replaced by newer ones"
    sender.gate.set()
    wait_for(lambda: not share.waiting, "the sender to take the newest frame")
    app.stop()
    assert 1 <= len(sender.frames) <= 2 and sender.closed


@pytest.mark.parametrize(
    ("output", "module", "message"),
    [
        (virtual_camera, "pyvirtualcam", "pyvirtualcam is not installed"),
        (ndi, "cyndilib", "NDI needs cyndilib"),
    ],
    ids=["virtualcam", "ndi"],
)
def test_a_missing_package_is_one_clear_error_and_the_show_goes_on(
    make_app, monkeypatch, caplog, output, module, message
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises ImportError
    share = output()
    app = make_app()
    app.add_output(share)
    warm_up(app)
    frames = app.stats.frames
    wait_for(lambda: (app.step(), share.last_error is not None)[1], "the output to give up")
    for _ in range(5):
        app.step()
    assert app.stats.frames > frames + 5
    assert share.status.startswith(f"off: {message}"), share.status
    errors = [r for r in caplog.records if r.levelname == "ERROR" and r.name == "engine.outputs.sharing"]
    assert len(errors) == 1 and message in errors[0].getMessage()


@pytest.mark.parametrize("output", [SpoutOutput, SyphonOutput])
def test_gpu_sharing_on_another_platform_is_one_clear_error(make_app, caplog, output) -> None:
    if sys.platform.startswith(output.platform):
        pytest.skip(f"{output.name} is this platform's own: the error case does not apply")
    share = output()
    app = make_app()
    app.add_output(share)
    warm_up(app)
    for _ in range(5):
        app.step()
    assert share.status == f"off: {output.name} runs on {output.platform} only"
    assert len([r for r in caplog.records if r.levelname == "ERROR" and output.name in r.getMessage()]) == 1


def test_virtual_camera_without_a_loopback_device_says_so(make_app) -> None:
    pytest.importorskip("pyvirtualcam", reason="pyvirtualcam not installed (an optional extra)")
    if sys.platform.startswith("linux") and any(Path("/sys/devices/virtual/video4linux").glob("video*")):
        pytest.skip("a v4l2loopback device exists here: the error case does not apply")
    share = virtual_camera()
    app = make_app()
    app.add_output(share)
    warm_up(app)
    wait_for(lambda: (app.step(), share.last_error is not None)[1], "the virtual camera to give up")
    expected = "v4l2loopback" if sys.platform.startswith("linux") else "virtual camera"
    assert share.status.startswith("off: ") and expected in share.status, share.status


NDI_RUN = """
import json, time
import numpy as np
from cyndilib import Finder, Receiver, RecvBandwidth, RecvColorFormat, VideoRecvFrame
from cyndilib.receiver import ReceiveFrameType
from engine.app import App, AppConfig
from engine.catalog import PRESETS_DIR
from engine.clock import ManualClock
from engine.outputs.sharing import ndi
from engine.render.surface import HeadlessSurface

surface = HeadlessSurface()
app = App(AppConfig(source="pattern", presets_dir=PRESETS_DIR, output_size=(160, 96), hot_reload=False), surface,
          ManualClock(60.0))
share = app.add_output(ndi("dreamdeck-test", fps=30.0))
app.start()
finder = Finder()
finder.open()
names, deadline = [], time.monotonic() + 20
while not names and time.monotonic() < deadline:
    app.step()
    finder.update_sources()
    names = [n for n in finder.get_source_names() if "dreamdeck-test" in n]
receiver = Receiver(color_format=RecvColorFormat.RGBX_RGBA, bandwidth=RecvBandwidth.highest)
frame = VideoRecvFrame()
receiver.set_video_frame(frame)
receiver.set_source(finder.get_source(names[0]))
got, deadline = None, time.monotonic() + 20
while got is None and time.monotonic() < deadline:
    app.step()
    if receiver.receive(ReceiveFrameType.recv_video, 50) & ReceiveFrameType.recv_video:
        got = np.empty(frame.get_buffer_size(), np.uint8)
        frame.fill_p_data(got)
print(json.dumps({"sources": names, "size": frame.get_resolution(), "std": float(got[..., None].std()),
                  "status": share.status}))
receiver.disconnect()
finder.close()
app.close()
surface.close()
"""


def test_ndi_reaches_a_receiver_over_loopback(tmp_path: Path) -> None:
    """A real NDI sender and receiver, in a network namespace that has only loopback: no
    discovery traffic leaves the machine (NDI is told to look at 127.0.0.1, not multicast)."""
    pytest.importorskip("cyndilib", reason="cyndilib not installed (the optional NDI extra)")
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"]).returncode != 0:
        pytest.skip("needs `unshare -n` (root) to keep NDI inside a loopback-only network namespace")
    config = tmp_path / ".ndi"
    config.mkdir()
    (config / "ndi-config.v1.json").write_text(
        json.dumps(
            {"ndi": {"networks": {"ips": "127.0.0.1", "discovery": ""}, "multicast": {"send": {"enable": False}}}}
        )
    )
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "NDI_CONFIG_DIR": str(config),
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
    }
    result = subprocess.run(
        ["unshare", "-n", "sh", "-c", f'ip link set lo up && exec {sys.executable} -c "$0"', NDI_RUN],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["size"] == list(OUTPUT) and facts["std"] > 10, facts
    assert "dreamdeck-test" in facts["status"] and " sent " in facts["status"]
