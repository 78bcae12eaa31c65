"""Video in from other apps: NDI (real senders and receivers over loopback), Spout and Syphon refusals.

The NDI tests run in a network namespace that has only loopback (``unshare -n``), so no
discovery traffic leaves the machine; NDI is told to look at 127.0.0.1, not multicast.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.show import ShowConfig, ShowError, StatusPageConfig, build_show
from engine.sources import SourceSpecError, parse_source_spec
from engine.sources.gpu_share import platform_refusal
from engine.sources.ndi import NdiSource, match_sender
from engine.sources.receiving import FrameRefused, packed_to_rgb
from engine.web import StatusConfig

ROOT = Path(__file__).resolve().parents[1]

# the picture sent: four solid quadrants, recognised on the far side by their colours
QUADRANTS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255))  # RGB: top-left, top-right, bottom-l, bottom-r


def quadrant_image(width: int, height: int) -> np.ndarray:
    image = np.empty((height, width, 3), np.uint8)
    h2, w2 = height // 2, width // 2
    image[:h2, :w2], image[:h2, w2:], image[h2:, :w2], image[h2:, w2:] = QUADRANTS
    return image


def looks_like_quadrants(frame: np.ndarray) -> bool:
    height, width = frame.shape[:2]
    h4, w4 = height // 4, width // 4
    centres = [frame[h4, w4], frame[h4, 3 * w4], frame[3 * h4, w4], frame[3 * h4, 3 * w4]]
    return all(np.abs(c.astype(int) - np.array(q)).max() < 40 for c, q in zip(centres, QUADRANTS))


# -- the parts, without a network ---------------------------------------------------------------


def test_ndi_sender_names_match_in_full_by_stream_or_in_part() -> None:
    names = ["STUDIO (OBS)", "STUDIO (dreamdeck box)", "LAPTOP (obs scene)"]
    assert match_sender(names, "studio (obs)") == "STUDIO (OBS)"
    assert match_sender(names, "OBS") == "STUDIO (OBS)"  # the stream name, before a part of another
    assert match_sender(names, "box") == "STUDIO (dreamdeck box)"
    assert match_sender(names, "laptop") == "LAPTOP (obs scene)"
    assert match_sender(names, "resolume") is None


def test_packed_frames_of_each_format_read_as_rgb() -> None:
    rgb = quadrant_image(8, 6)
    rgba = np.concatenate([rgb, np.full((6, 8, 1), 255, np.uint8)], axis=2)
    assert np.array_equal(packed_to_rgb(rgba.reshape(-1), 8, 6, 32, "RGBA"), rgb)
    bgra = rgba[:, :, [2, 1, 0, 3]]
    assert np.array_equal(packed_to_rgb(bgra.reshape(-1), 8, 6, 32, "BGRX"), rgb)
    padded = np.zeros((6, 40), np.uint8)  # a stride with 8 bytes of padding a row
    padded[:, :32] = rgba.reshape(6, 32)
    assert np.array_equal(packed_to_rgb(padded.reshape(-1), 8, 6, 40, "RGBX"), rgb)


@pytest.mark.parametrize(
    ("fourcc", "size", "reason"),
    [("P216", (8, 6), "pixel format P216"), ("RGBA", (1, 6), "resolution 1x6"), ("RGBA", (8, 9), "too short")],
)
def test_a_frame_we_cannot_read_is_refused_with_its_reason(fourcc, size, reason) -> None:
    with pytest.raises(FrameRefused, match=reason):
        packed_to_rgb(np.zeros(8 * 6 * 4, np.uint8), *size, size[0] * 4, fourcc)


def test_a_refused_frame_is_one_line_and_the_status_says_why(caplog) -> None:
    source = NdiSource("nobody")
    caplog.set_level(logging.WARNING)
    for _ in range(5):  # a sender that keeps sending the odd format: one line, not one per frame
        source._refuse("pixel format P216 is not one we read (RGBA, BGRA or UYVY)")
    assert source.status == "ndi:nobody refused: pixel format P216 is not one we read (RGBA, BGRA or UYVY)"
    assert len([r for r in caplog.records if "P216" in r.getMessage()]) == 1
    source._accept(quadrant_image(16, 8))
    assert source.status.startswith("ndi:nobody ok 16x8")
    source._accept(quadrant_image(32, 16))  # a new resolution: taken as it comes
    assert source.size == (32, 16) and source.slot.latest()[0].shape == (16, 32, 3)


@pytest.mark.parametrize("kind", ["spout", "syphon"])
def test_spout_and_syphon_elsewhere_are_refused_in_one_line(kind) -> None:
    refusal = platform_refusal(kind)
    if refusal is None:
        pytest.skip(f"{kind} is this platform's own: the refusal does not apply")
    with pytest.raises(SourceSpecError, match=f"{kind}: sources run on") as caught:
        parse_source_spec(f"{kind}:Resolume")
    assert "\n" not in str(caught.value) and "ndi:NAME" in str(caught.value)
    with pytest.raises(ShowError, match=f"{kind}: sources run on"):
        build_show(ShowConfig.bare(app=_app_config(f"{kind}:Resolume")))


def test_an_ndi_source_without_a_name_is_refused() -> None:
    with pytest.raises(SourceSpecError, match="missing the NDI sender's name"):
        parse_source_spec("ndi:")


def _app_config(source: str):
    from engine.app import AppConfig
    from engine.catalog import PRESETS_DIR

    return AppConfig(source=source, presets_dir=PRESETS_DIR, output_size=(160, 96), hot_reload=False)


# -- NDI over loopback, between processes -------------------------------------------------------

# The sender: dreamdeck's own NDI output (NdiSender) sending the quadrants, at each size in turn
# for the seconds given ("160x96:3,200x120:0": 0 = until killed).
NDI_SEND = """
import sys, time
import numpy as np
sys.path.insert(0, sys.argv[3])
from test_video_in import quadrant_image
from engine.outputs.sharing import NdiSender

name, phases = sys.argv[1], [p.split(":") for p in sys.argv[2].split(",")]
sender = NdiSender(name)
for size, seconds in phases:
    width, height = (int(v) for v in size.split("x"))
    rgba = np.concatenate([quadrant_image(width, height), np.full((height, width, 1), 255, np.uint8)], axis=2)
    sender.open((width, height), 30.0)
    print("sending", width, height, flush=True)
    end = time.monotonic() + (float(seconds) or 1e9)
    while time.monotonic() < end:
        sender.send(np.ascontiguousarray(rgba))
        time.sleep(1 / 30)
    sender.close()
"""

# The show: an App whose source is ndi:NAME, stepped while the sender comes, changes size,
# goes away and comes back. It prints what it saw as JSON, one line per stage.
NDI_SHOW = """
import json, subprocess, sys, time
sys.path.insert(0, sys.argv[2])
from test_video_in import looks_like_quadrants
from engine.app import App, AppConfig
from engine.catalog import PRESETS_DIR
from engine.clock import ManualClock
from engine.render.hud import hud_lines
from engine.render.surface import HeadlessSurface

send_script = sys.argv[1]
def start_sender(phases):
    return subprocess.Popen([sys.executable, "-c", send_script, "dd-test-sender", phases, sys.argv[2]])

surface = HeadlessSurface()
app = App(AppConfig(source="ndi:test-sender", presets_dir=PRESETS_DIR, output_size=(160, 96), hot_reload=False,
                    source_max_age=1.0), surface, ManualClock(60.0))
app.input.primary.backoff.first = app.input.primary.backoff.cap = 0.3
app.input.primary.watchdog = 1.0
app.start()

def until(condition, timeout=40):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        app.step()
        if condition():
            return True
        time.sleep(0.01)
    return False

def seen(size):
    frame = app.input.primary.slot.latest()[0]
    return (not app.input.fallback_active and frame is not None and frame.shape[:2] == size[::-1]
            and looks_like_quadrants(frame))

def stage(name, ok):
    app.step()
    print(json.dumps({"stage": name, "ok": ok, "source": app.status.source, "fallback": app.status.source_fallback,
                      "hud": [l for l in hud_lines(app.status) if "ndi:" in l]}), flush=True)

before = until(lambda: app.status.source_fallback, 5)
stage("before the sender", before)
sender = start_sender("160x96:4,200x120:0")
stage("first picture", until(lambda: seen((160, 96))))
stage("new resolution", until(lambda: seen((200, 120))))
sender.kill(); sender.wait()
stage("sender gone", until(lambda: app.status.source_fallback and "lost" in app.status.source))
sender = start_sender("160x96:0")
stage("sender back", until(lambda: seen((160, 96)) and not app.status.source_fallback))
sender.kill(); sender.wait()
app.close()
surface.close()
"""


def ndi_namespace_env(tmp_path: Path) -> dict[str, str]:
    """Skip unless NDI can run inside a loopback-only namespace; the environment that keeps it there."""
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
    return {
        **os.environ,
        "HOME": str(tmp_path),
        "NDI_CONFIG_DIR": str(config),
        "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT), *sys.path] if p),
    }


def in_loopback_namespace(script: str, args: list[str], env: dict[str, str], timeout: float = 240):
    quoted = " ".join(f'"${i + 1}"' for i in range(len(args)))
    return subprocess.run(
        ["unshare", "-n", "sh", "-c", f'ip link set lo up && exec {sys.executable} -c "$0" {quoted}', script, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_ndi_round_trip_recognised_survives_resolution_change_and_sender_restart(tmp_path: Path) -> None:
    env = ndi_namespace_env(tmp_path)
    result = in_loopback_namespace(NDI_SHOW, [NDI_SEND, str(Path(__file__).parent)], env)
    stages = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0, result.stderr[-3000:]
    by_name = {s["stage"]: s for s in stages}
    assert [s["stage"] for s in stages] == [
        "before the sender",
        "first picture",
        "new resolution",
        "sender gone",
        "sender back",
    ], result.stderr[-3000:]
    assert all(s["ok"] for s in stages), json.dumps(stages, indent=1)
    assert "showing pattern" in by_name["before the sender"]["source"]
    assert by_name["first picture"]["source"].startswith("ndi:test-sender ok 160x96")
    assert by_name["new resolution"]["source"].startswith("ndi:test-sender ok 200x120")
    gone = by_name["sender gone"]
    assert gone["fallback"] and "lost" in gone["source"] and "showing pattern" in gone["source"], gone
    assert any("lost" in line for line in gone["hud"]), gone  # the HUD says so, as /health does (same snapshot)
    back = by_name["sender back"]
    assert not back["fallback"] and back["source"].startswith("ndi:test-sender ok 160x96"), back


# -- a browser's camera over WebRTC ---------------------------------------------------------------


class ShowThread:
    """A show built by build_show (as `dreamdeck run` builds it), stepped on its own thread
    (its GL context belongs to that thread), with the status page on a free port."""

    def __init__(self, source: str, token: str | None = "secret") -> None:
        self.source = source
        self.token = token
        self.error: BaseException | None = None
        self.steps = 0
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test show", daemon=True)

    def __enter__(self) -> ShowThread:
        self._thread.start()
        assert self._ready.wait(60) and self.error is None, f"the show did not start: {self.error!r}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        try:
            page = StatusPageConfig(StatusConfig(port=0, token=self.token), required=True)
            show = build_show(ShowConfig.bare(app=_app_config(self.source), status=page))
        except BaseException as exc:
            self.error = exc
            self._ready.set()
            return
        self.show = show
        try:
            show.start()
            self._ready.set()
            while not self._stop.is_set():
                show.app.step()
                self.steps += 1
                time.sleep(0.005)
        except BaseException as exc:
            self.error = exc
        finally:
            show.close()

    @property
    def base(self) -> str:
        assert self.show.status_page is not None
        return f"http://127.0.0.1:{self.show.status_page.port}"

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.base}/health?token={self.token}", timeout=10) as reply:
            return json.loads(reply.read())

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.error is None, f"the show failed: {self.error!r}"
            if condition():
                return
            time.sleep(0.05)
        raise AssertionError(f"{what}: not within {timeout} s; source: {self.show.app.status.source}")


def post(url: str, body: object, token: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=15) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def webrtc_show():
    pytest.importorskip("aiortc", reason="aiortc not installed (the webrtc extra)")
    with ShowThread("webrtc") as show:
        yield show


def test_a_malformed_offer_or_a_wrong_token_is_refused_and_the_show_plays_on(webrtc_show, caplog) -> None:
    show = webrtc_show
    url = f"{show.base}/api/webrtc/offer"
    status, body = post(url, {"type": "offer", "sdp": "v=0\r\nthis is not SDP"}, "secret")
    assert status == 400 and body["error"].startswith(("malformed offer", "the offer has no video")), body
    assert "\n" not in body["error"]
    status, body = post(url, {"sdp": 5}, "secret")
    assert status == 400 and "expected" in body["error"], body
    status, body = post(url, {"type": "offer", "sdp": "v=0"}, "wrong")
    assert status == 401, body
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{show.base}/camera?token=wrong", timeout=10)
    assert refused.value.code == 401
    steps = show.steps
    show.wait_for(lambda: show.steps > steps + 10, "the show to play on")
    assert show.health()["source_fallback"] is True and "webrtc" in show.health()["source"]
    assert len([r for r in caplog.records if "webrtc offer refused" in r.getMessage()]) == 2


def test_an_offer_to_a_show_without_the_webrtc_source_is_a_404() -> None:
    with ShowThread("pattern") as show:
        status, body = post(f"{show.base}/api/webrtc/offer", {"type": "offer", "sdp": "v=0"}, "secret")
    assert status == 404 and "--source webrtc" in body["error"]


def test_browser_camera_reaches_the_show_over_webrtc(webrtc_show, tmp_path: Path) -> None:
    browser = _chromium(tmp_path, "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream")
    show = webrtc_show
    try:
        browser.get(f"{show.base}/camera?token=secret")
        show.wait_for(lambda: show.health()["source"].startswith("webrtc ok"), "the browser's frames in /health")
        health = show.health()
        assert health["source_fallback"] is False, health
        frame = show.show.app.input.primary.slot.latest()[0]
        assert frame is not None and frame.ndim == 3 and frame.std() > 5  # Chromium's fake camera, not black
        assert browser.execute_script("return document.querySelector('#state').textContent") == "connected"
    finally:
        browser.quit()
    show.wait_for(lambda: show.health()["source_fallback"], "the fallback once the browser has gone")


def _chromium(tmp_path: Path, *extra: str):
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if importlib.util.find_spec("selenium") is None or browser is None or driver is None:
        pytest.skip("needs selenium, chromium and chromedriver (scripts/setup-dev.sh)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium'}",
        *extra,
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver), options=options)
    driver.set_page_load_timeout(30)
    return driver


def test_the_status_page_serves_https_with_a_self_signed_certificate(tmp_path: Path) -> None:
    import ssl

    from engine.web import StatusFeed, StatusServer
    from engine.web.tls import self_signed

    pytest.importorskip("cryptography", reason="cryptography not installed (comes with the webrtc extra)")
    cert, key = self_signed(tmp_path / "state", ("127.0.0.1",))
    assert self_signed(tmp_path / "state") == (cert, key)  # kept: a phone's exception survives a restart
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    with ShowThread("pattern") as show:
        app = show.show.app
    server = StatusServer(app, StatusFeed(), StatusConfig(port=0, token="secret", cert=str(cert), key=str(key)))
    server.start()
    try:
        assert server.url.startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        url = f"https://127.0.0.1:{server.port}/camera?token=secret"
        with urllib.request.urlopen(url, timeout=10, context=context) as reply:
            assert reply.status == 200 and b"getUserMedia" in reply.read()
    finally:
        server.stop()


def test_a_missing_certificate_is_one_line_at_start(tmp_path: Path, capsys) -> None:
    from engine.cli import main

    code = main(["--no-log-file", "run", "--headless", "--fresh", "--status-cert", str(tmp_path / "none.pem")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dreamdeck run: --status-cert") and "\n" not in err


# -- a GPU box serving the venue: `dreamdeck serve`, and the laptop's fallback scene ------------------


def test_serve_stands_for_a_headless_run_with_nothing_open_by_default() -> None:
    from engine.cli import build_parser, serve_run_args, show_config

    closed = serve_run_args(build_parser().parse_args(["serve", "--from", "laptop", "--", "--preset", "box"]))
    assert closed == ["run", "--headless", "--source", "ndi:laptop", "--ndi", "dreamdeck-box", "--preset", "box"]
    config = show_config(build_parser().parse_args(closed))
    assert config.window is None and config.app.source == "ndi:laptop" and config.outputs.ndi == "dreamdeck-box"
    assert config.controls.osc_host == "127.0.0.1" and config.status.server.host == "127.0.0.1"

    args = ["serve", "--from", "webrtc", "--ndi-name", "box1", "--allow", "192.168.1.0/24", "--token", "t0k3n"]
    opened = show_config(build_parser().parse_args(serve_run_args(build_parser().parse_args(args))))
    assert opened.app.source == "webrtc" and opened.outputs.ndi == "box1"
    assert opened.controls.osc_host == "0.0.0.0" and opened.controls.osc_allow == ("192.168.1.0/24",)
    server = opened.status.server
    assert (server.host, server.allow, server.token) == ("0.0.0.0", ("192.168.1.0/24",), "t0k3n")


def test_an_unknown_fallback_scene_is_refused() -> None:
    with pytest.raises(ShowError, match="fallback scene 'nope'"):
        build_show(ShowConfig.bare(app=_app_config("pattern"), fallback_scene="nope"))


# The laptop: a show (build_show) whose source is the box's NDI stream, with a local fallback
# scene; the box: `dreamdeck serve`, passthrough, sent back over NDI. The box's own source is
# the quadrants as an image (given after --): NDI discovery inside a loopback-only namespace
# (no mDNS daemon there) sees one sending process at a time, and here that is the box. The
# NDI leg into a show is the round-trip test above.
BOX_LAPTOP = """
import json, os, subprocess, sys, time
tests, presets, image = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, tests)
from test_video_in import looks_like_quadrants
from engine.app import AppConfig
from engine.show import ShowConfig, build_show

box_cmd = [sys.executable, "-m", "engine", "--no-log-file", "serve", "--from", "laptop-cam", "--ndi-name", "dd-box",
           "--", "--source", "image:" + image, "--presets-dir", presets, "--preset", "box", "--output", "160x96",
           "--fps", "30", "--fresh"]
box = subprocess.Popen(box_cmd)
show = build_show(ShowConfig.bare(app=AppConfig(source="ndi:dd-box", presets_dir=presets, preset="box",
                  output_size=(160, 96), hot_reload=False), fallback_scene="reaction_diffusion"))
app = show.app
app.input.primary.backoff.first = app.input.primary.backoff.cap = 0.3
show.start()

def until(condition, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        app.step()
        if condition():
            return True
        time.sleep(0.01)
    return False

def box_picture():
    frame = app.input.primary.slot.latest()[0]
    return not app.input.fallback_active and frame is not None and looks_like_quadrants(frame)

def stage(name, ok):
    print(json.dumps({"stage": name, "ok": ok, "source": app.status.source, "scene": app.params.target("/scene/active"),
                      "fallback": show.parts["fallback"].status}), flush=True)

stage("box picture", until(lambda: box_picture() and app.params.target("/scene/active") == "passthrough"))
box.kill(); box.wait()
stage("box gone", until(lambda: app.params.target("/scene/active") == "reaction_diffusion"
                        and "lost" in app.status.source and show.parts["fallback"].standing_in))
box = subprocess.Popen(box_cmd)
stage("box back", until(lambda: box_picture() and app.params.target("/scene/active") == "passthrough"))
box.kill()
show.close()
"""


def test_gpu_box_round_trip_and_the_laptops_fallback_scene(tmp_path: Path) -> None:
    env = ndi_namespace_env(tmp_path)
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "box.toml").write_text('[scene]\nactive = "passthrough"\n\n[layer.source]\nopacity = 0.0\n')
    image = tmp_path / "quadrants.png"
    cv2.imwrite(str(image), cv2.cvtColor(quadrant_image(320, 192), cv2.COLOR_RGB2BGR))
    result = in_loopback_namespace(BOX_LAPTOP, [str(Path(__file__).parent), str(presets), str(image)], env, 400)
    stages = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0 and len(stages) == 3, result.stderr[-3000:]
    assert all(s["ok"] for s in stages), json.dumps(stages, indent=1) + result.stderr[-2000:]
    assert stages[1]["fallback"] == "reaction_diffusion standing in for passthrough", stages[1]


# -- several projectors: shows side by side on one box ----------------------------------------------

# Two headless shows, each with its own ports, NDI name and device, as docs/guides/video-in.md
# sets them up; then a third on the first one's ports, which must be refused in one line.
TWO_SHOWS = """
import json, subprocess, sys, time, urllib.request
presets = sys.argv[1]

def show(n, extra=()):
    ports = ["--osc-port", str(9321 + 100 * n), "--oscquery-port", str(9322 + 100 * n),
             "--status-port", str(9330 + 100 * n)]
    return subprocess.Popen([sys.executable, "-m", "engine", "--no-log-file", "run", "--headless", "--fresh",
                             "--source", "pattern", "--output", "160x96", "--fps", "30", "--presets-dir", presets,
                             "--preset", "linked", "--ndi", f"projector-{n}", "--device", "cpu", *ports, *extra],
                            stderr=subprocess.PIPE, text=True)

def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return json.loads(reply.read())
    except OSError:
        return None

shows = [show(1), show(2)]
from pythonosc.udp_client import SimpleUDPClient
facts, deadline = {}, time.monotonic() + 120
while time.monotonic() < deadline:
    for n in (1, 2):  # Link on, over each show's own OSC port (a preset does not hold it)
        SimpleUDPClient("127.0.0.1", 9321 + 100 * n).send_message("/dreamdeck/link/enabled", True)
    health = [get(f"http://127.0.0.1:{9330 + 100 * n}/health") for n in (1, 2)]
    oscquery = [get(f"http://127.0.0.1:{9322 + 100 * n}/?HOST_INFO") for n in (1, 2)]
    facts = {"health": health, "oscquery": oscquery}
    if all(h and h["frames"] > 5 and "1 peer" in h["controls"].get("link", "") for h in health) and all(oscquery):
        break
    time.sleep(0.5)
third = show(1)  # the first one's ports again
try:
    third.wait(60)
    facts["third"] = {"code": third.returncode, "stderr": third.stderr.read().strip().splitlines()}
except subprocess.TimeoutExpired:
    third.kill()
    facts["third"] = {"code": None, "stderr": []}
for s in shows:
    s.terminate()
facts["codes"] = [s.wait(30) for s in shows]
print(json.dumps(facts))
"""


def test_two_shows_side_by_side_keep_their_own_ports_and_share_link_tempo(tmp_path: Path) -> None:
    env = ndi_namespace_env(tmp_path)
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "linked.toml").write_text('[scene]\nactive = "passthrough"\n')
    result = subprocess.run(
        [
            "unshare",
            "-n",
            "sh",
            "-c",
            f"ip link set lo up && ip link set lo multicast on && ip route add 224.0.0.0/4 dev lo && "
            f'exec {sys.executable} -c "$0" "$1"',
            TWO_SHOWS,
            str(presets),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    for n, health in enumerate(facts["health"], 1):
        assert health is not None and health["frames"] > 5, facts
        assert f"(projector-{n})'" in health["outputs"]["ndi"], health
        assert "1 peer" in health["controls"]["link"], health["controls"]  # Link: each sees the other
    assert all(facts["oscquery"]), facts
    third = facts["third"]
    assert third["code"] == 2 and len(third["stderr"]) >= 1, third
    assert third["stderr"][-1].startswith("dreamdeck run: status page on 127.0.0.1:9430"), third
    assert facts["codes"] == [0, 0], facts


# -- an offline bundle ----------------------------------------------------------------------------


def fake_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Put ``folder`` into ``cache`` as the hub would have downloaded it: blobs by hash, a
    snapshot of relative links to them, refs/main naming the snapshot."""
    import hashlib

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


BUNDLE_PRESET = """[scene]
active = "realtime"

[scene.realtime]
model = "dreamdeck-test/tiny-turbo"
vae = ""
steps = 1
"""


def test_a_bundle_of_tiny_models_installs_offline_and_plays_its_preset(tmp_path: Path) -> None:
    pytest.importorskip("diffusers", reason="the diffusion extra is not installed")
    from engine.bundle import make_bundle
    from engine.diffusion.configs import build_random_model

    cache = tmp_path / "cache"
    build_random_model("tiny").save_pretrained(tmp_path / "tiny-turbo")
    fake_hub_cache(cache, "dreamdeck-test/tiny-turbo", tmp_path / "tiny-turbo")
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "gallery.toml").write_text(BUNDLE_PRESET)
    (presets / "elsewhere.toml").write_text(BUNDLE_PRESET.replace("dreamdeck-test/tiny-turbo", "nobody/not-cached"))
    out = tmp_path / "bundle"

    report = make_bundle(["gallery", "elsewhere"], out, presets, cache_dir=cache, deps=False)
    assert report.models == ["dreamdeck-test/tiny-turbo"] and report.missing == {"nobody/not-cached": ["elsewhere"]}
    assert any(name.startswith("dreamdeck-") for name in report.wheels) and report.size_bytes > 10_000
    assert (out / "hf" / "hub" / "models--dreamdeck-test--tiny-turbo" / "refs" / "main").is_file()

    # the offline machine: a fresh venv (the heavy dependencies from the system's site-packages,
    # as --no-deps bundles only dreamdeck's wheel), installed from the bundle with no index
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    pip = subprocess.run(
        [
            str(venv / "bin" / "pip"),
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--ignore-installed",
            "--find-links",
            str(out / "wheels"),
            "dreamdeck",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_HOME", "HF_HUB_CACHE")}
    env.update(HF_HOME=str(out / "hf"), HF_HUB_OFFLINE="1", HOME=str(tmp_path), OMP_NUM_THREADS="1")
    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [
            str(venv / "bin" / "dreamdeck"),
            "--no-log-file",
            "run",
            "--headless",
            "--fresh",
            "--source",
            "pattern",
            "--presets-dir",
            str(out / "presets"),
            "--shaders-dir",
            str(out / "shaders"),
            "--preset",
            "gallery",
            "--output",
            "64x64",
            "--frames",
            "400",
            "--no-status",
            "--no-osc",
            "--device",
            "cpu",
            "--screenshot",
            str(shot),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (
        str(venv)
        in subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import engine; print(engine.__file__)"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert "scene realtime loaded" in run.stderr, run.stderr[-3000:]


def test_bundle_names_a_model_the_cache_lacks_with_the_command_that_fetches_it(tmp_path: Path, capsys) -> None:
    pytest.importorskip("huggingface_hub")
    from engine.cli import main

    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "elsewhere.toml").write_text(BUNDLE_PRESET.replace("dreamdeck-test/tiny-turbo", "nobody/not-cached"))
    (tmp_path / "cache").mkdir()
    argv = ["--no-log-file", "bundle", "--preset", "elsewhere", "--out", str(tmp_path / "out"), "--no-wheels"]
    code = main([*argv, "--presets-dir", str(presets), "--cache-dir", str(tmp_path / "cache")])
    captured = capsys.readouterr()
    assert code == 1
    assert "elsewhere needs nobody/not-cached" in captured.err and "hf download nobody/not-cached" in captured.err
    assert "total " in captured.out and "pip install --no-index --find-links wheels" in captured.out
