"""OSCQuery's WebSocket: LISTEN / IGNORE, PATH_* notices, OSC in, over real sockets.

A render loop thread plays the app's part (apply_pending, then the control's frame, about 60
times a second) and records each frame's values; a separate process blasts 10,000 OSC
messages a second over UDP. A client proves "at most one message per path per frame" by
the values it gets: each must be one frame's value, each frame's at most once, in order.
Nothing here asserts a speed.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import http.server
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pythonosc.osc_message_builder import OscMessageBuilder
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from engine.catalog import build_registry
from engine.control import oscquery_ws
from engine.control.actions import Actions
from engine.control.osc import OscServer, parse_plain_message
from engine.control.oscquery import OscQueryServer
from engine.params import ParamRegistry, enum_param, float_param
from test_web_status import browser  # noqa: F401  (a fixture: Chromium as the status page tests start it)

TIMEOUT = 15.0
WATCHED = ("/test/listen/a", "/test/listen/b", "/test/listen/c")
FULL = tuple("/dreamdeck" + path for path in WATCHED)

# The UDP sender, in its own process so that it is not fighting the test for the GIL: float
# values that only grow, round-robin over the paths, paced in 1 ms slices.
SENDER = r"""
import socket, struct, sys, time
port, rate, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
def pad(b):
    return b + b"\0" * (4 - len(b) % 4)
heads = [pad(p.encode()) + pad(b",f") for p in sys.argv[4:]]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.connect(("127.0.0.1", port))
total = int(rate * seconds)
start, n = time.perf_counter(), 0
while n < total:
    due = min(total, int((time.perf_counter() - start) * rate) + 1)
    while n < due:
        sock.send(heads[n % len(heads)] + struct.pack(">f", (n + 1) / (total + 1)))
        n += 1
    time.sleep(0.001)
print(n)
"""


@pytest.fixture
def registry() -> ParamRegistry:
    registry = build_registry()
    for path in WATCHED:
        registry.declare(float_param(path, 0.0, 0.0, 1.0, description="a value the test listens to"))
    return registry


@pytest.fixture
def osc(registry: ParamRegistry) -> Iterator[OscServer]:
    server = OscServer(registry, Actions(), port=0)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def query(registry: ParamRegistry, osc: OscServer) -> Iterator[OscQueryServer]:
    server = OscQueryServer(registry, lambda: osc.port, port=0, osc=osc)
    server.start()
    yield server
    server.stop()


class RenderLoop(threading.Thread):
    """The app's frame boundary, about 60 times a second: land values, run the control, record."""

    def __init__(self, registry: ParamRegistry, query: OscQueryServer, watched: tuple[str, ...] = WATCHED) -> None:
        super().__init__(name="test render loop", daemon=True)
        self.registry, self.query, self.watched = registry, query, watched
        self.frames: list[dict[str, Any]] = []
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                started = time.perf_counter()
                self.registry.apply_pending(1 / 60)
                self.query.frame(started)
                self.frames.append({path: self.registry.get(path) for path in self.watched})
                time.sleep(max(0.0, 1 / 60 - (time.perf_counter() - started)))
        except BaseException as exc:  # the test reports it
            self.error = exc

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)
        assert self.error is None, self.error


def wait_for(condition: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.01)


def listen(ws: ClientConnection, *paths: str, command: str = "LISTEN") -> None:
    for path in paths:
        ws.send(json.dumps({"COMMAND": command, "DATA": path}))


class Collector(threading.Thread):
    """Receives on a websockets client: OSC values as (address, value), text as JSON."""

    def __init__(self, ws: ClientConnection) -> None:
        super().__init__(name="test ws client", daemon=True)
        self.ws = ws
        self.values: list[tuple[str, Any]] = []
        self.notes: list[dict[str, Any]] = []

    def run(self) -> None:
        with contextlib.suppress(Exception):  # ends when the connection closes
            for message in self.ws:
                if isinstance(message, str):
                    self.notes.append(json.loads(message))
                else:
                    address, args = parse_plain_message(message)
                    self.values.append((address, args[0] if args else None))

    def of(self, full_path: str) -> list[Any]:
        return [value for address, value in list(self.values) if address == full_path]


def blast(osc_port: int, rate: int = 10_000, seconds: float = 1.5) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SENDER, str(osc_port), str(rate), str(seconds), *FULL], stdout=subprocess.PIPE
    )


def check_once_per_frame(frames: list[dict[str, Any]], path: str, received: list[Any]) -> None:
    """Each value received is one frame's value; no frame's twice; in frame order."""
    first_frame: dict[Any, int] = {}
    for i, frame in enumerate(frames):
        first_frame.setdefault(frame[path], i)
    indices = []
    for value in received:
        assert value in first_frame, f"{path}: {value!r} was no frame's value"
        indices.append(first_frame[value])
    assert indices == sorted(set(indices)), f"{path}: a frame's value came twice or out of order"
    assert len(received) <= len(frames)


def run_listen_round(
    registry: ParamRegistry, query: OscQueryServer, osc: OscServer, received: Callable[[str], list[Any]]
) -> RenderLoop:
    """Frames running, 10,000 msgs/s over UDP for 1.5 s, then frames until the last value arrived."""
    loop = RenderLoop(registry, query)
    loop.start()
    try:
        sender = blast(osc.port)
        out, _ = sender.communicate(timeout=60)
        assert int(out) == 15_000
        settled: list[
            int
        ] = []  # until the OSC counts stop moving (a datagram lost in a full buffer is no failure here)
        wait_for(lambda: settled.append(osc.counts.received) or settled[-30:] == [settled[-1]] * 30, "the blast landed")
        assert osc.counts.rejected == 0 and osc.counts.received > 0
        for path, full in zip(WATCHED, FULL):  # the newest value reaches the client
            wait_for(lambda full=full, path=path: received(full)[-1:] == [registry.get(path)], f"last {full}")
    finally:
        loop.stop()
    return loop


def test_a_websockets_client_gets_each_change_at_most_once_per_frame(
    registry: ParamRegistry, osc: OscServer, query: OscQueryServer
) -> None:
    with connect(f"ws://127.0.0.1:{query.port}/", open_timeout=10) as ws:
        collector = Collector(ws)
        collector.start()
        listen(ws, *FULL)
        listen(ws, "/dreamdeck/norm/test/listen/a")
        wait_for(lambda: query._hub is not None and len(query._hub.listened) == 4, "LISTEN registered")
        loop = run_listen_round(registry, query, osc, collector.of)
        for path, full in zip(WATCHED, FULL):
            check_once_per_frame(loop.frames, path, collector.of(full))
            assert len(collector.of(full)) > 1
        assert collector.of("/dreamdeck/norm/test/listen/a")[-1] == pytest.approx(registry.get(WATCHED[0]), abs=1e-6)

        listen(ws, FULL[0], command="IGNORE")
        wait_for(lambda: FULL[0] not in query._hub.listened, "IGNORE registered")
        before = len(collector.of(FULL[0])), len(collector.of(FULL[1]))
        registry.set_many({WATCHED[0]: 0.01, WATCHED[1]: 0.02})
        loop = RenderLoop(registry, query)
        loop.start()
        try:
            wait_for(lambda: collector.of(FULL[1])[-1:] == [pytest.approx(0.02)], "the one still listened to")
        finally:
            loop.stop()
        assert len(collector.of(FULL[0])) == before[0], "ignored: nothing more"
    assert query.counts.commands_refused == 0


PAGE = """<!doctype html><meta charset="utf-8"><title>listen</title><script>
window.got = []; window.ready = false; window.failed = null;
const ws = new WebSocket("ws://127.0.0.1:%(port)d/");
ws.binaryType = "arraybuffer";
ws.onerror = () => { window.failed = "error"; };
ws.onopen = () => {
  for (const path of %(paths)s) ws.send(JSON.stringify({COMMAND: "LISTEN", DATA: path}));
  window.ready = true;
};
ws.onmessage = (event) => {
  if (typeof event.data === "string") return;
  const bytes = new Uint8Array(event.data), view = new DataView(event.data);
  const end = bytes.indexOf(0), address = new TextDecoder().decode(bytes.subarray(0, end));
  let i = (end + 4) & ~3;
  const tagsEnd = bytes.indexOf(0, i), tags = new TextDecoder().decode(bytes.subarray(i + 1, tagsEnd));
  i = (tagsEnd + 4) & ~3;
  if (tags === "f") window.got.push([address, view.getFloat32(i, false)]);
};
</script>"""


@pytest.fixture
def page_server() -> Iterator[Callable[[str], str]]:
    """Serves one page from 127.0.0.1 (a page's origin must be this machine to open the WebSocket)."""
    pages: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages.get(self.path, b"")
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def serve(html: str) -> str:
        pages["/listen.html"] = html.encode("utf-8")
        return f"http://127.0.0.1:{server.server_address[1]}/listen.html"

    yield serve
    server.shutdown()
    server.server_close()


def test_chromium_native_websocket_gets_each_change_at_most_once_per_frame(
    registry: ParamRegistry, osc: OscServer, query: OscQueryServer, browser: Any, page_server: Callable[[str], str]
) -> None:
    browser.get(page_server(PAGE % {"port": query.port, "paths": json.dumps(list(FULL))}))
    wait_for(lambda: browser.execute_script("return window.ready || window.failed"), "the page's WebSocket opened")
    assert browser.execute_script("return window.failed") is None
    wait_for(lambda: query._hub is not None and len(query._hub.listened) == 3, "LISTEN registered")

    def received(full: str) -> list[Any]:
        return [value for address, value in browser.execute_script("return window.got") if address == full]

    loop = run_listen_round(registry, query, osc, received)
    for path, full in zip(WATCHED, FULL):
        check_once_per_frame(loop.frames, path, received(full))
        assert len(received(full)) > 1


# -- clients that vanish -----------------------------------------------------------------------


def raw_websocket(port: int, *paths: str) -> socket.socket:
    """A WebSocket by hand (handshake and masked text frames): a client that can vanish mid-stream."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 101"), answer[:80]
    for path in paths:
        payload = json.dumps({"COMMAND": "LISTEN", "DATA": path}).encode()
        mask = os.urandom(4)
        sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    return sock


def test_a_hundred_clients_vanishing_leave_the_show_running_and_frame_never_waits(
    registry: ParamRegistry, osc: OscServer, query: OscQueryServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(oscquery_ws, "MAX_INBOX", 50)  # what waits for a stuck loop stays bounded
    clients = [raw_websocket(query.port, *FULL) for _ in range(100)]  # none of them ever reads
    hub = query._hub
    assert hub is not None
    wait_for(lambda: query.counts.clients == 100 and len(hub.listened) == 3, "100 clients listening")

    # Wedge the server's loop thread outright: frame() must not care.
    wedged, release = threading.Event(), threading.Event()
    hub._loop.call_soon_threadsafe(lambda: (wedged.set(), release.wait(60)))
    assert wedged.wait(10)
    frames_done: list[int] = []

    def frames() -> None:
        for i in range(120):
            registry.set(WATCHED[0], (i + 1) / 1000)
            registry.apply_pending(1 / 60)
            query.frame(float(i))
            frames_done.append(i)

    try:
        render = threading.Thread(target=frames, daemon=True)
        render.start()
        render.join(timeout=30)
        assert not render.is_alive() and len(frames_done) == 120, "frame() waited on the WebSocket side"
        assert query.counts.skipped == 70, "past 50 frames behind, values are skipped, not queued"
        for sock in clients:  # vanish: a reset, no closing handshake
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
    finally:
        release.set()

    loop = RenderLoop(registry, query)
    loop.start()
    try:
        wait_for(lambda: query.counts.clients == 0 and not hub.listened, "the vanished clients dropped")
        conn = http.client.HTTPConnection("127.0.0.1", query.port, timeout=10)
        conn.request("GET", FULL[1] + "?TYPE")
        assert conn.getresponse().read() == b'{"TYPE": "f"}'
        conn.close()
        with connect(f"ws://127.0.0.1:{query.port}/", open_timeout=10) as ws:  # and a new one is served
            collector = Collector(ws)
            collector.start()
            listen(ws, FULL[1])
            wait_for(lambda: FULL[1] in hub.listened, "LISTEN")
            registry.set(WATCHED[1], 0.75)
            wait_for(lambda: collector.of(FULL[1])[-1:] == [0.75], "a change after the storm")
    finally:
        loop.stop()
    assert "oscquery" in query.status and osc.running


# -- who may talk ------------------------------------------------------------------------------


def osc_packet(address: str, *args: Any) -> bytes:
    builder = OscMessageBuilder(address=address)
    for arg in args:
        builder.add_arg(arg)
    return builder.build().dgram


def connect_from(port: int, source: str, target: str = "/", **options: Any) -> ClientConnection:
    sock = socket.create_connection(("127.0.0.1", port), source_address=(source, 0), timeout=10)
    return connect(f"ws://127.0.0.1:{port}{target}", sock=sock, open_timeout=10, **options)


def test_the_allowlist_and_the_token_decide_who_may_listen_and_write(registry: ParamRegistry) -> None:
    osc = OscServer(registry, Actions(), host="0.0.0.0", port=0, allow=["127.0.0.2"])
    osc.start()
    query = OscQueryServer(
        registry, lambda: osc.port, host="0.0.0.0", port=0, allow=["127.0.0.2"], osc=osc, token="sesame"
    )
    query.start()
    try:
        with pytest.raises((OSError, InvalidHandshake, ConnectionClosed)):  # not on the list: cut off unanswered
            connect_from(query.port, "127.0.0.1")
        with pytest.raises(InvalidStatus) as page:  # a web page elsewhere, open in a browser here
            connect_from(query.port, "127.0.0.2", origin="http://evil.example")
        assert page.value.response.status_code == 403

        with connect_from(query.port, "127.0.0.2") as reader:  # on the list, no token: reads, never writes
            collector = Collector(reader)
            collector.start()
            listen(reader, FULL[2])
            reader.send(osc_packet(FULL[2], 0.5))
            wait_for(lambda: query.counts.refused == 1, "the write without a token refused")
            registry.apply_pending(0.0)
            assert registry.get(WATCHED[2]) == 0.0 and osc.counts.applied == 0

            with connect_from(query.port, "127.0.0.2", "/?token=sesame") as writer:
                writer.send(osc_packet(FULL[2], 0.5))
                writer.send(osc_packet("/dreamdeck/get", WATCHED[2]))
                writer.send(osc_packet(FULL[2], 7.0))  # out of range: the OSC server's rules refuse it
                wait_for(lambda: osc.counts.applied == 2 and osc.counts.rejected == 1, "applied like UDP OSC")
                reply = parse_plain_message(writer.recv(timeout=10))
                assert reply == (FULL[2], [0.0]), "the /get answer comes back on the socket"
                registry.apply_pending(0.0)
                assert registry.get(WATCHED[2]) == 0.5
                query.frame(0.0)
                wait_for(lambda: collector.of(FULL[2]) == [0.5], "the listener hears what the writer set")
    finally:
        query.stop()
        osc.stop()
    assert query.counts.refused == 1


# -- the address space changing ----------------------------------------------------------------


def test_parameters_added_changed_and_removed_are_announced(registry: ParamRegistry, query: OscQueryServer) -> None:
    with connect(f"ws://127.0.0.1:{query.port}/", open_timeout=10) as ws:
        collector = Collector(ws)
        collector.start()
        wait_for(lambda: query.counts.clients == 1, "connected")
        query.frame(0.0)  # the address space as this client found it
        registry.declare(float_param("/scene/plugin/glow", 0.2, 0.0, 1.0))
        registry.declare(enum_param("/scene/plugin/mode", "a", ("a", "b")))
        query.frame(0.0)
        added = [("PATH_ADDED", "/dreamdeck/scene/plugin/glow"), ("PATH_ADDED", "/dreamdeck/norm/scene/plugin/glow")]
        added += [("PATH_ADDED", "/dreamdeck/scene/plugin/mode"), ("PATH_ADDED", "/dreamdeck/norm/scene/plugin/mode")]
        wait_for(lambda: len(collector.notes) == 4, "PATH_ADDED")
        assert [(note["COMMAND"], note["DATA"]) for note in collector.notes] == added

        listen(ws, "/dreamdeck/scene/plugin/glow")
        wait_for(lambda: "/dreamdeck/scene/plugin/glow" in query._hub.listened, "LISTEN to the new path")
        query.frame(0.0)
        wait_for(lambda: collector.of("/dreamdeck/scene/plugin/glow") == [pytest.approx(0.2)], "its value")

        registry.replace_choices("/scene/plugin/mode", ("a", "b", "c"))
        registry.set("/scene/plugin/glow", 0.9)  # queued, then its parameter goes: the change goes too
        registry.remove(["/scene/plugin/glow", "/scene/plugin/never-was"])
        assert registry.apply_pending(0.0) == []
        query.frame(0.0)
        wait_for(lambda: len(collector.notes) == 8, "PATH_CHANGED and PATH_REMOVED")
        assert [(note["COMMAND"], note["DATA"]) for note in collector.notes[4:]] == [
            ("PATH_REMOVED", "/dreamdeck/scene/plugin/glow"),
            ("PATH_REMOVED", "/dreamdeck/norm/scene/plugin/glow"),
            ("PATH_CHANGED", "/dreamdeck/scene/plugin/mode"),
            ("PATH_CHANGED", "/dreamdeck/norm/scene/plugin/mode"),
        ]
        assert "/dreamdeck/scene/plugin/glow" not in query._hub.listened, "a removed method is not streamed"
        listen(ws, "/dreamdeck/scene/plugin/glow", "/dreamdeck/scene/next", "/dreamdeck/fx")
        wait_for(lambda: query.counts.commands_refused == 3, "nothing readable there: refused")
        ws.send("not json")
        ws.send(json.dumps({"COMMAND": "RENAME", "DATA": "/x"}))
        wait_for(lambda: query.counts.commands_refused == 5, "garbage refused, the session goes on")
        status = http.client.HTTPConnection("127.0.0.1", query.port, timeout=10)
        status.request("GET", "/dreamdeck/scene/plugin/glow")
        assert status.getresponse().status == 404, "gone from the tree too"
        status.close()


def test_a_taken_port_is_one_clear_error(registry: ParamRegistry, query: OscQueryServer) -> None:
    second = OscQueryServer(registry, 9, port=query.port)
    with pytest.raises(OSError, match=f"OSCQuery cannot listen on 127.0.0.1:{query.port}"):
        second.start()
    assert second.status == "oscquery off"
    second.stop()  # harmless when it never started
