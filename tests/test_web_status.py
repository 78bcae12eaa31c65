"""The status page and remote: real HTTP against a real App, and the page in real Chromium.

The App runs on its own render thread (``RenderThread``), as in the program: the GL
context belongs to that thread, the server's threads serve requests, and a test only
waits, bounded, for conditions. Chromium is Debian's, driven by selenium through
Debian's chromedriver (no driver download).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
import socket
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from engine.app import App, AppConfig
from engine.clock import ManualClock
from engine.control.actions import ACTIONS
from engine.render.surface import HeadlessSurface
from engine.web import StatusConfig, StatusFeed, StatusServer, accelerator_memory, install_status_page
from engine.web import feed as feed_module

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = (480, 270)
TIMEOUT = 20.0


# -- the harness ----------------------------------------------------------------------------


class RenderThread:
    """An App built, stepped and closed on its own thread, with the status page plugged in."""

    def __init__(
        self,
        presets_dir: Path,
        config: StatusConfig = StatusConfig(port=0),
        feed: StatusFeed | None = None,
        setup: Callable[[App], None] | None = None,
        **app_config: Any,
    ) -> None:
        self.presets_dir = presets_dir
        self.setup = setup  # runs on the render thread before app.start(): plug in more parts
        self.config = config
        self.feed = feed or StatusFeed(interval_s=0.25)
        self.app_config = app_config
        self.steps = 0
        self.error: BaseException | None = None
        self.paused = threading.Event()  # set: the loop stops stepping (a frozen frame loop)
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test render thread", daemon=True)

    def __enter__(self) -> RenderThread:
        self._thread.start()
        if not self._ready.wait(60) or self.error is not None:
            raise AssertionError(f"the app did not start: {self.error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the render thread did not end"

    def _run(self) -> None:
        surface = HeadlessSurface()
        app: App | None = None
        try:
            settings = {
                "source": "pattern",
                "presets_dir": self.presets_dir,
                "output_size": OUTPUT,
                "hot_reload": False,
                **self.app_config,
            }
            app = App(AppConfig(**settings), surface, ManualClock(60.0))
            self.app = app
            self.server: StatusServer = install_status_page(app, self.config, self.feed)
            if self.setup is not None:
                self.setup(app)
            app.start()
            self._ready.set()
            while not self._stop.is_set():
                if self.paused.is_set():
                    time.sleep(0.005)
                    continue
                app.step()
                self.steps += 1
                time.sleep(0.002)  # let the source, scene and server threads run on a small machine
        except BaseException as exc:  # reported by the test that waits on this thread
            self.error = exc
            self._ready.set()
        finally:
            if app is not None:
                app.close()
            surface.close()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.error is not None:
                raise AssertionError(f"the render thread failed: {self.error!r}")
            if condition():
                return
            time.sleep(0.02)
        raise AssertionError(f"{what}: not within {timeout} s; hud: {self.app.hud_lines()}")


def request(
    url: str,
    body: Any = None,
    *,
    method: str | None = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request; (status, headers, body) whatever the status."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    all_headers = {"Content-Type": "application/json"} if data is not None else {}
    all_headers.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=all_headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def get_json(url: str, **kwargs: Any) -> tuple[int, Any]:
    status, _, body = request(url, **kwargs)
    return status, json.loads(body)


@pytest.fixture
def presets_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "presets"
    folder.mkdir()
    shutil.copy(ROOT / "presets" / "default.toml", folder / "default.toml")
    (folder / "kaleido.toml").write_text("[fx.kaleido]\nenabled = true\nsegments = 7\n", encoding="utf-8")
    (folder / "zz_broken.toml").write_text("[fx.kaleido]\nsegments = 999\n", encoding="utf-8")
    return folder


@pytest.fixture
def running(presets_dir: Path):
    with RenderThread(presets_dir) as rt:
        rt.wait_for(lambda: rt.server.feed.latest_jpeg() is not None, "the first thumbnail")
        yield rt


# -- health and thumbnail --------------------------------------------------------------------


def test_health_reports_the_running_show(running: RenderThread) -> None:
    rt = running
    rt.wait_for(lambda: rt.app.worker.active_name is not None, "the scene loaded")
    rt.wait_for(
        lambda: (
            get_json(rt.base + "/health")[1].get("scene") == "reaction_diffusion"
            and get_json(rt.base + "/health")[1]["frames"] > 2
        ),
        "health to see it",
    )
    status, health = get_json(rt.base + "/health")
    assert status == 200 and health["ok"] is True and health["state"] == "running"
    assert health["preset"] == "default" and health["scene"] == "reaction_diffusion"
    assert health["scene_status"] == ""  # reaction-diffusion has no state to tell
    assert health["fps"] > 0 and health["frames"] > 0 and health["uptime_s"] >= 0
    assert health["source"].startswith("pattern ok")
    assert set(health["dropped_frames"]) == {"source", "scene"}
    assert health["accelerator"] is None  # torch's CUDA is not initialised in this process
    assert health["errors"] == [] and "web" in health["controls"] and "status feed" in health["outputs"]
    assert health["scenes_loaded"] == ["reaction_diffusion"] and health["scene_selected"] == "reaction_diffusion"
    assert health["scene_memory_mb"] == {"loaded": 0, "budget": 12000} and health["scene_backend"] == ""
    assert health["rss_mb"] is None or health["rss_mb"] > 10
    assert 0 < health["thumbnail_frame"] <= health["frames"]

    frames = health["frames"]
    rt.wait_for(lambda: get_json(rt.base + "/health")[1]["frames"] > frames, "health to follow the frames")

    rt.app.recall_preset("zz_broken")  # an error in the show is on the page's health
    rt.wait_for(
        lambda: any("zz_broken" in e for e in get_json(rt.base + "/health")[1]["errors"]),
        "the refused preset in /health errors",
    )
    assert get_json(rt.base + "/health")[1]["recent_errors"][-1]["message"].startswith("preset refused")


def test_health_says_when_the_frame_loop_stalls(presets_dir: Path) -> None:
    with RenderThread(presets_dir, feed=StatusFeed(interval_s=0.1, stale_after_s=0.5)) as rt:
        rt.wait_for(lambda: get_json(rt.base + "/health")[1]["ok"], "a fresh snapshot")
        rt.paused.set()  # the frame loop freezes; the server still answers
        rt.wait_for(lambda: not get_json(rt.base + "/health")[1]["ok"], "the stall to show")
        assert get_json(rt.base + "/health")[1]["state"].startswith("stalled")
        rt.paused.clear()
        rt.wait_for(lambda: get_json(rt.base + "/health")[1]["ok"], "recovery")


def thumbnail(rt: RenderThread) -> np.ndarray:
    status, headers, body = request(rt.base + "/thumbnail.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and headers["Cache-Control"] == "no-store"
    return cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)


def test_thumbnail_is_a_small_jpeg_of_the_output(running: RenderThread) -> None:
    assert thumbnail(running).shape == (180, 320, 3), "downscaled to 320 wide, aspect kept"
    # the first frames may be black until the source's first frame: then the picture shows
    running.wait_for(lambda: thumbnail(running).std() > 5, "a thumbnail with a picture in it")
    count = running.feed.encoded
    running.wait_for(lambda: running.feed.encoded > count + 1, "new thumbnails while the show runs")


def test_thumbnail_is_encoded_off_the_render_thread(presets_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    encode = feed_module.encode_thumbnail

    def spy(rgb: np.ndarray, *args: Any) -> bytes:
        threads.append(threading.current_thread().name)
        return encode(rgb, *args)

    monkeypatch.setattr(feed_module, "encode_thumbnail", spy)
    with RenderThread(presets_dir) as rt:
        rt.wait_for(lambda: len(threads) >= 3, "three thumbnails")
    assert set(threads) == {"status encoder"}, threads


def test_the_thumbnail_is_read_back_a_frame_later_without_a_synchronous_read(
    presets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The render thread queues a GPU copy on a due frame and fetches it on the next one;
    nothing in the frame loop reads pixels synchronously (glReadPixels into host memory)."""
    moderngl = pytest.importorskip("moderngl")
    reads: list[tuple[str, str, int]] = []  # (thread, what, frame being rendered)
    app: App | None = None

    def spy(cls: type, method: str) -> None:
        original = getattr(cls, method)

        def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            into = args[0] if args else kwargs.get("buffer")
            if cls is moderngl.Buffer:
                what = "fetch of a queued copy"  # a GL pixel buffer read into host memory
            elif method == "read_into" and isinstance(into, moderngl.Buffer):
                what = "queued copy"  # into a GL pixel buffer: the GPU does it when it gets there
            else:
                what = f"synchronous {cls.__name__}.{method}"  # waits for the GPU to finish the frame
            frame = app.stats.frames + 1 if app is not None else 0
            reads.append((threading.current_thread().name, what, frame))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, counted)

    for cls in (moderngl.Framebuffer, moderngl.Texture, moderngl.Buffer):
        spy(cls, "read")
        spy(cls, "read_into")
    surface = HeadlessSurface()
    feed = StatusFeed(interval_s=0.25)
    try:
        app = App(
            AppConfig(source="pattern", presets_dir=presets_dir, output_size=OUTPUT, hot_reload=False),
            surface,
            ManualClock(60.0),
        )
        app.add_output(feed)
        app.start()
        reads.clear()
        app.step()  # frame 1 is due: a copy is queued on the GPU, nothing is read
        assert reads == [("MainThread", "queued copy", 1)], reads
        time.sleep(0.2)  # the encoder has had time to encode, if it had been given anything
        assert feed.encoded == 0 and feed.latest_jpeg() is None and feed.health()["frames"] == 0

        app.step()  # frame 2: the copy has long finished; its pixels are fetched and handed over
        assert reads[1:] == [("MainThread", "fetch of a queued copy", 2)], reads
        deadline = time.monotonic() + TIMEOUT
        while feed.encoded == 0:
            assert time.monotonic() < deadline, "no thumbnail"
            time.sleep(0.01)
        health = feed.health()
        assert health["thumbnail_frame"] == health["frames"] == 1 and app.status.frame == 2
        assert cv2.imdecode(np.frombuffer(feed.latest_jpeg(), np.uint8), cv2.IMREAD_COLOR).shape == (180, 320, 3)

        for _ in range(60):  # a second of frames: four due, each fetched one frame later
            app.step()
        queued = [frame for _, what, frame in reads if what == "queued copy"]
        fetched = [frame for _, what, frame in reads if what == "fetch of a queued copy"]
        assert len(queued) == 5 and fetched == [frame + 1 for frame in queued], reads
        assert all(what in ("queued copy", "fetch of a queued copy") for _, what, _ in reads), reads
        assert {thread for thread, _, _ in reads} == {"MainThread"}
    finally:
        if app is not None:
            app.close()
        surface.close()


def test_thumbnail_before_the_first_frame_is_a_503_with_retry(presets_dir: Path) -> None:
    feed = StatusFeed()
    fake = types.SimpleNamespace(params=None, actions=None, presets=None, preset_name=None)
    server = StatusServer(fake, feed, StatusConfig(port=0))
    server.start()
    try:
        status, headers, _ = request(f"http://127.0.0.1:{server.port}/thumbnail.jpg")
        assert status == 503 and headers["Retry-After"] == "1"
        status, health = get_json(f"http://127.0.0.1:{server.port}/health")
        assert status == 200 and health["ok"] is False and health["state"].startswith("starting")
    finally:
        server.stop()


def test_accelerator_memory_reads_an_initialised_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []

    class FakeCuda:
        """Two devices; this process has memory on device 1 only."""

        initialised = False
        reserved = {0: 0, 1: 4 * 2**30}

        def is_available(self) -> bool:
            return True

        def is_initialized(self) -> bool:
            return self.initialised

        def device_count(self) -> int:
            return 2

        def mem_get_info(self, device: int) -> tuple[int, int]:
            asked.append(device)  # on a device without a context, this would create one
            return 60 * 2**30, 80 * 2**30

        def get_device_name(self, device: int) -> str:
            return "Fake H100"

        def memory_allocated(self, device: int) -> int:
            return 3 * 2**30 if device == 1 else 0

        def memory_reserved(self, device: int) -> int:
            return self.reserved[device]

    cuda = FakeCuda()
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    assert accelerator_memory() is None and asked == [], "must not create a CUDA context to report nothing"
    cuda.initialised = True
    assert accelerator_memory() == {
        "allocated_mb": 3072.0,
        "reserved_mb": 4096.0,
        "total_mb": 81920.0,
        "devices": [
            {
                "index": 1,
                "name": "Fake H100",
                "allocated_mb": 3072.0,
                "reserved_mb": 4096.0,
                "free_mb": 61440.0,
                "total_mb": 81920.0,
            }
        ],
    }
    assert asked == [1], "only the device this process uses is asked"
    cuda.reserved[1] = 0
    assert accelerator_memory() is None
    monkeypatch.delitem(sys.modules, "torch")
    assert accelerator_memory() is None


# -- the API ---------------------------------------------------------------------------------


def test_params_api_lists_records_with_values(running: RenderThread) -> None:
    status, params = get_json(running.base + "/api/params")
    assert status == 200
    by_path = {p["path"]: p for p in params}
    assert set(by_path) == {p.path for p in running.app.params.params()}
    segments = by_path["/fx/kaleido/segments"]
    assert segments["kind"] == "int" and segments["min"] == 1 and segments["max"] == 32
    assert segments["value"] == running.app.params.target("/fx/kaleido/segments")
    assert by_path["/scene/active"]["choices"] == running.app.catalog.names()
    colour = next(p for p in params if p["kind"] == "colour")
    assert isinstance(colour["value"], list) and len(colour["value"]) == 4


def test_presets_api_lists_numbers_and_validity(running: RenderThread) -> None:
    status, data = get_json(running.base + "/api/presets")
    assert status == 200 and data["current"] == "default"
    assert [(p["number"], p["name"], p["ok"]) for p in data["presets"]] == [
        (1, "default", True),
        (2, "kaleido", True),
        (3, "zz_broken", False),
    ]
    assert "out of range" in data["presets"][2]["error"]


def test_post_param_sets_the_registry_or_says_why_not(running: RenderThread) -> None:
    rt = running
    status, reply = get_json(rt.base + "/api/param", body={"path": "/fx/kaleido/segments", "value": 12})
    assert status == 200 and reply == {"path": "/fx/kaleido/segments", "value": 12}
    rt.wait_for(lambda: rt.app.params.get("/fx/kaleido/segments") == 12, "the value to land")
    assert rt.app.params.last_change.origin == "web"

    status, reply = get_json(rt.base + "/api/param", body={"path": "/fx/kaleido/segments", "value": 99})
    assert status == 400 and reply["error"] == "/fx/kaleido/segments: 99 is out of range [1, 32]"
    status, reply = get_json(rt.base + "/api/param", body={"path": "/no/such", "value": 1})
    assert status == 400 and "unknown parameter" in reply["error"]
    status, reply = get_json(rt.base + "/api/param", body={"value": 1})
    assert status == 400 and "path" in reply["error"]
    status, reply = get_json(rt.base + "/api/param", raw=b"[" * 30_000 + b"]" * 30_000)
    assert status == 400 and "not JSON" in reply["error"], "deep nesting is refused, not a crash"
    status, reply = get_json(rt.base + "/api/param", raw=b'{"path": "/fx/kaleido/segments", "value": 1e999}')
    assert status == 400 and "finite" in reply["error"]
    assert rt.app.params.target("/fx/kaleido/segments") == 12, "refused values changed nothing"


def test_post_action_posts_to_the_render_thread(running: RenderThread) -> None:
    rt = running
    status, reply = get_json(rt.base + "/api/action", body={"name": "scene/select", "args": ["passthrough"]})
    assert status == 202 and reply["queued"] == "scene/select"
    rt.wait_for(lambda: rt.app.params.get("/scene/active") == "passthrough", "the scene to change")

    status, reply = get_json(rt.base + "/api/action", body={"name": "preset/recall", "args": ["kaleido"]})
    assert status == 202
    # the name is set when the values are queued; they land at the next frame boundary
    rt.wait_for(
        lambda: rt.app.preset_name == "kaleido" and rt.app.params.get("/fx/kaleido/segments") == 7, "the preset to land"
    )

    status, reply = get_json(rt.base + "/api/action", body={"name": "self/destruct"})
    assert status == 400 and reply["error"] == "unknown action 'self/destruct'"
    for args in ([[1, 2]], [{"a": 1}], [10**400], "passthrough", [1] * 9):
        status, reply = get_json(rt.base + "/api/action", body={"name": "scene/select", "args": args})
        assert status == 400, args
    status, _ = get_json(rt.base + "/api/action", body={"name": "scene/select", "args": [99]})
    assert status == 202  # valid shape; the handler refuses it on the render thread, shown in /health
    rt.wait_for(
        lambda: any("scene index 99" in e for e in get_json(rt.base + "/health")[1]["errors"]), "the refusal in /health"
    )


def test_actions_are_listed_and_checked_from_their_declaration(running: RenderThread) -> None:
    status, listed = get_json(running.base + "/api/actions")
    assert status == 200
    assert [a["name"] for a in listed] == running.app.actions.names()
    by_name = {a["name"]: a for a in listed}
    for name, record in by_name.items():
        assert record == ACTIONS[name].record(), "the listing is the declaration, nothing else"
    assert by_name["scene/select"]["signature"] == "scene/select(ref: str|int)"
    assert by_name["scene/select"]["args"] == [
        {
            "name": "ref",
            "type": "str|int",
            "required": True,
            "default": None,
            "description": ACTIONS["scene/select"].args[0].description,
        }
    ]
    # every registered handler takes the declared arguments (register() checks; this is the app's)
    for name, handler in running.app.actions._handlers.items():
        inspect.signature(handler).bind(*range(len(ACTIONS[name].args)))

    for args, expected in (
        ([], "scene/select(ref: str|int): got 0 arguments"),
        (["a", "b"], "scene/select(ref: str|int): got 2 arguments ('a', 'b')"),
        ([1.5], "scene/select(ref: str|int): ref takes a name or a whole number, got 1.5"),
        ([True], "scene/select(ref: str|int): ref takes a name or a whole number, got True"),
    ):
        status, reply = get_json(running.base + "/api/action", body={"name": "scene/select", "args": args})
        assert (status, reply["error"]) == (400, expected)
    status, reply = get_json(running.base + "/api/action", body={"name": "scene/next", "args": [1]})
    assert (status, reply["error"]) == (400, "scene/next(): got 1 argument (1)")
    status, reply = get_json(running.base + "/api/action", body={"name": "scene/select", "args": [1.0]})
    assert status == 202 and reply["args"] == [1], "a whole float is the number, as from OSC"


def test_http_errors_are_4xx_with_reasons(running: RenderThread) -> None:
    base = running.base
    assert request(base + "/nope")[0] == 404
    status, headers, _ = request(base + "/health", method="POST", raw=b"{}")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    assert request(base + "/api/param")[0] == 405
    assert request(base + "/health", method="DELETE")[0] == 405
    assert request(base + "/health", method="BREW")[0] == 405, "an unknown method is the client's error"
    status, headers, body = request(base + "/health", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 10
    status, _, body = request(
        base + "/api/param", raw=b'{"path": "/hud/visible", "value": true}', headers={"Content-Type": "text/plain"}
    )
    assert status == 415, "a cross-site form cannot send JSON: requiring it stops CSRF"
    status, _, _ = request(
        base + "/api/param", body={"path": "/hud/visible", "value": True}, headers={"Origin": "http://evil.example"}
    )
    assert status == 403
    status, _, _ = request(base + "/api/param", raw=b"x" * (70 * 1024))
    assert status == 413
    status, _, _ = request(base + "/health", headers={"Host": "evil.example:9330"})
    assert status == 403, "a DNS-rebinding page must not reach a loopback-only server"
    assert request(base + "/health?" + "&".join(f"k{i}=1" for i in range(50)))[0] == 400
    status, headers, page = request(base + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert b"http://" not in page and b"https://" not in page, "the page loads nothing from elsewhere"


def test_token_is_required_off_the_loopback(presets_dir: Path) -> None:
    with RenderThread(presets_dir, config=StatusConfig(host="0.0.0.0", port=0)) as rt:
        server = rt.server
        assert server.token_generated and len(server.token) >= 20
        assert f"?token={server.token}" in server.url
        base = rt.base
        status, headers, _ = request(base + "/health")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert request(base + "/health?token=wrong")[0] == 401
        assert request(base + "/health", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert request(base + f"/health?token={server.token}")[0] == 200
        assert request(base + "/health", headers={"Authorization": f"Bearer {server.token}"})[0] == 200
        # with a token, any Host name is fine: the LAN address is whatever the phone typed
        assert request(base + f"/health?token={server.token}", headers={"Host": "gallery.local:9330"})[0] == 200
        status, _, _ = request(base + "/api/param", body={"path": "/hud/visible", "value": False})
        assert status == 401
        assert rt.app.params.target("/hud/visible") is True

    with RenderThread(presets_dir, config=StatusConfig(port=0, token="given-secret")) as rt:
        assert not rt.server.token_generated and rt.server.token == "given-secret"
        assert request(rt.base + "/health")[0] == 401, "a token given on the loopback is enforced too"
        assert request(rt.base + "/health?token=given-secret")[0] == 200


def test_idle_connections_are_capped_and_dropped(presets_dir: Path) -> None:
    config = StatusConfig(port=0, max_connections=2, request_timeout_s=1.0)
    with RenderThread(presets_dir, config=config) as rt:
        idle = [socket.create_connection(("127.0.0.1", rt.server.port)) for _ in range(2)]  # send nothing
        try:
            shed = socket.create_connection(("127.0.0.1", rt.server.port))
            shed.settimeout(10)
            try:
                assert shed.recv(100) == b"", "a connection over the cap is closed unanswered"
            except ConnectionResetError:
                pass  # closed unanswered, as a reset: the same verdict
            finally:
                shed.close()

            # the idle ones are dropped after request_timeout_s, and the server answers again
            def answers() -> bool:
                try:
                    return request(rt.base + "/health")[0] == 200
                except OSError:  # shed while the idle ones still hold both places
                    return False

            rt.wait_for(answers, "the server to answer again")
        finally:
            for sock in idle:
                sock.close()


def test_port_in_use_is_an_error_at_construction(presets_dir: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        fake = types.SimpleNamespace(params=None, actions=None, presets=None, preset_name=None)
        with pytest.raises(OSError):
            StatusServer(fake, StatusFeed(), StatusConfig(port=taken.getsockname()[1]))
    finally:
        taken.close()


# -- the page in Chromium -----------------------------------------------------------------------


def _chromium() -> tuple[str, str] | None:
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture
def browser(tmp_path: Path):
    found = _chromium()
    missing = "selenium" if not _has_selenium() else ("chromium and chromedriver" if found is None else None)
    if missing:
        message = f"{missing} not installed (apt-get install chromium chromium-driver; pip install selenium)"
        if os.environ.get("CI"):
            pytest.fail(message + ": CI must install them")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not try to download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=420,900",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _has_selenium() -> bool:
    return importlib.util.find_spec("selenium") is not None


def wait_page(driver: Any, script: str, what: str, timeout: float = TIMEOUT) -> Any:
    """Poll a JavaScript expression in the page until it is truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script("return " + script)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"page: {what}: not within {timeout} s")


def test_page_in_chromium_drives_the_show(running: RenderThread, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    rt, params = running, running.app.params
    browser.get(rt.base + "/")
    wait_page(browser, "document.querySelector('#thumb').naturalWidth > 0", "the thumbnail")
    assert browser.execute_script("return document.querySelector('#thumb').naturalWidth") == 320
    wait_page(browser, "document.querySelectorAll('#params .row').length > 20", "the controls")
    wait_page(browser, "document.querySelector('#conn').className === 'live'", "the live status")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors

    def open_group(path: str) -> Any:
        row = browser.find_element(By.CSS_SELECTOR, f'.row[data-path="{path}"]')
        browser.execute_script("arguments[0].closest('details').open = true", row)
        return show(row)

    def show(element: Any) -> Any:  # in the middle of the screen, as a thumb would reach for it
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        return element

    # a slider: End moves it to its maximum, as a thumb dragged to the end would
    row = open_group("/fx/feedback/zoom")
    before = params.target("/fx/feedback/zoom")
    row.find_element(By.CSS_SELECTOR, "input[type=range]").send_keys(Keys.END)
    top = params.param("/fx/feedback/zoom").max
    assert before != top
    rt.wait_for(lambda: params.target("/fx/feedback/zoom") == top, "the slider to reach the registry")

    # a toggle
    row = open_group("/fx/kaleido/enabled")
    was = params.target("/fx/kaleido/enabled")
    row.find_element(By.CSS_SELECTOR, "input[type=checkbox]").click()
    rt.wait_for(lambda: params.get("/fx/kaleido/enabled") is (not was), "the toggle to reach the registry")

    # a scene button
    show(browser.find_element(By.CSS_SELECTOR, '#scenes button[data-scene="passthrough"]')).click()
    rt.wait_for(lambda: params.get("/scene/active") == "passthrough", "the scene button to switch scenes")
    wait_page(
        browser,
        "document.querySelector('#scenes button.active')?.dataset.scene === 'passthrough'",
        "the page to mark the playing scene",
    )

    # a preset button
    show(browser.find_element(By.CSS_SELECTOR, '#presets button[data-preset="kaleido"]')).click()
    rt.wait_for(
        lambda: rt.app.preset_name == "kaleido" and params.target("/fx/kaleido/segments") == 7,
        "the preset button to recall",
    )

    # the action rows come from /api/actions; wrong arguments are refused with the signature
    listed = browser.execute_script(
        "return [...document.querySelectorAll('#actions .action')].map((row) => row.dataset.action)"
    )
    assert listed == rt.app.actions.names()
    select = show(browser.find_element(By.CSS_SELECTOR, '#actions .action[data-action="scene/select"]'))
    select.find_element(By.CSS_SELECTOR, "button").click()
    message = wait_page(
        browser,
        "!document.querySelector('#message').hidden && "
        "document.querySelector('#message').textContent.includes('scene/select(') && "
        "document.querySelector('#message').textContent",
        "the refusal",
    )
    assert message == "scene/select(ref: str|int): ref must not be empty"
    select.find_element(By.CSS_SELECTOR, "input").send_keys("reaction_diffusion", Keys.ENTER)
    rt.wait_for(lambda: params.get("/scene/active") == "reaction_diffusion", "the action row to switch scenes")

    # a bad value typed into a number box: the engine's reason shows on the page
    row = open_group("/fx/kaleido/segments")
    box = row.find_element(By.CSS_SELECTOR, "input[type=number]")
    box.clear()
    box.send_keys("999", Keys.ENTER)
    message = wait_page(
        browser,
        "!document.querySelector('#message').hidden && "
        "document.querySelector('#message').textContent.includes('999') && "
        "document.querySelector('#message').textContent",
        "the error message",
    )
    assert message == "/fx/kaleido/segments: 999 is out of range [1, 32]"
    assert "out of range" in row.find_element(By.CSS_SELECTOR, ".note").text
    assert "bad" in row.get_attribute("class")
    assert params.target("/fx/kaleido/segments") == 7, "the refused value changed nothing"

    shots = Path(os.environ.get("DREAMDECK_SHOTS", "/tmp"))
    if shots.is_dir():
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(str(shots / "dreamdeck-status-page.png"))
