"""Fuzzing the network inputs with hypothesis, against a real App stepping on its own thread.

HTTP: random methods, paths, headers and bodies (JSON near the API's shape, and
garbage) go to the status server over raw sockets (``http.client`` would refuse to send
most of them). Properties: every request gets an answer with a status line and none is a
server error; a server
that requires a token answers nothing but 4xx to requests without it (505 for an HTTP
version it does not speak); afterwards the
server still answers /health, and the App kept stepping the whole time.

OSC: random datagrams (garbage, near-valid messages for real addresses, bundles with
lying sizes) to the OSC server on the same App. Properties: the receiver keeps running
and a valid message sent afterwards still lands.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.app import App
from engine.control.actions import ACTIONS
from engine.params import Kind, Param
from engine.web import StatusConfig, StatusServer
from test_web_status import RenderThread  # the same render-thread harness as the status page tests

ROOT = Path(__file__).resolve().parents[1]
FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
KNOWN_PATHS = [
    "/",
    "/index.html",
    "/health",
    "/thumbnail.jpg",
    "/api/params",
    "/api/presets",
    "/api/param",
    "/api/action",
]
TOKEN = "fuzz-token-0123456789"


@pytest.fixture(scope="module")
def show(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RenderThread]:
    presets = tmp_path_factory.mktemp("presets")
    (presets / "default.toml").write_text(
        (ROOT / "presets" / "default.toml").read_text(encoding="utf-8"), encoding="utf-8"
    )
    (presets / "broken.toml").write_text("[fx.kaleido\n", encoding="utf-8")
    with RenderThread(presets, setup=_add_osc) as rt:
        rt.wait_for(lambda: rt.server.feed.latest_jpeg() is not None, "the first thumbnail")
        yield rt
        assert rt.error is None, f"the render thread failed: {rt.error!r}"


def _add_osc(app: App) -> None:
    try:
        from engine.control.osc import OscServer
    except ImportError:
        return  # no OSC in this build: the OSC fuzz skips
    app.add_control(OscServer(app.params, app.actions, "127.0.0.1", 0))


@pytest.fixture(scope="module")
def params(show: RenderThread) -> list[Param]:
    return show.app.params.params()


# -- HTTP ---------------------------------------------------------------------------------------


def exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, close our side, read the whole answer (the server closes after one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def final_status(response: bytes) -> int:
    """The status of the final response (an interim 100 Continue may come first)."""
    codes = [int(c) for c in re.findall(rb"(?:^|\r\n\r\n)HTTP/1\.[01] (\d{3})", response)]
    assert codes, f"no HTTP response at all: {response[:200]!r}"
    final = [c for c in codes if c >= 200]
    assert final, f"only interim responses: {response[:200]!r}"
    return final[0]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=255, blacklist_characters="\x7f"), max_size=60)


def valid_values(param: Param) -> st.SearchStrategy[Any]:
    """Values the registry accepts for ``param``: the fuzz must also reach what happens after."""
    if param.kind is Kind.FLOAT:
        return st.floats(param.min, param.max)
    if param.kind is Kind.INT:
        return st.integers(int(param.min), int(param.max))
    if param.kind is Kind.BOOL:
        return st.booleans()
    if param.kind is Kind.ENUM:
        return st.sampled_from(param.choices)
    if param.kind is Kind.COLOUR:
        return st.lists(st.floats(0, 1), min_size=3, max_size=4)
    return st.text(max_size=30)


@st.composite
def param_bodies(draw: st.DrawFn, params: list[Param]) -> bytes:
    param = draw(st.sampled_from(params))
    value = draw(valid_values(param) | json_values)
    return json.dumps({"path": param.path, "value": value}).encode()


def action_bodies() -> st.SearchStrategy[bytes]:
    plausible = st.sampled_from(["reaction_diffusion", "passthrough", "default", "broken", "nope"]) | st.integers(-2, 5)
    args = st.lists(plausible, min_size=1, max_size=1) | st.lists(plausible, max_size=2) | json_values
    names = st.sampled_from(["scene/select", "preset/recall", "scene/next", *sorted(ACTIONS)]) | st.text(max_size=20)
    return st.builds(lambda n, a: json.dumps({"name": n, "args": a}).encode(), names, args)


def api_bodies(params: list[Param]) -> st.SearchStrategy[bytes]:
    """JSON shaped like the API's, with values valid and not: the registry and the actions judge them."""
    return param_bodies(params) | action_bodies()


@st.composite
def api_requests(draw: st.DrawFn, params: list[Param]) -> bytes:
    """Well-formed HTTP/1.1 to the real routes: the fuzz reaches the handlers, not only the parser."""
    target = draw(st.sampled_from(KNOWN_PATHS + ["/api/param", "/api/action"] * 3))  # mostly the writes
    post = target in ("/api/param", "/api/action")
    body = b"" if not post else draw(param_bodies(params) if target == "/api/param" else action_bodies())
    method = draw(st.sampled_from(["POST"] * 4 + ["GET"])) if post else draw(st.sampled_from(["GET", "HEAD"]))
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@st.composite
def wild_requests(draw: st.DrawFn, params: list[Param]) -> bytes:
    """Anything that fits on the wire: odd methods, paths, versions, headers, lengths and bodies."""
    method = draw(
        st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"])
        | st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12)
    )
    target = draw(
        st.sampled_from(KNOWN_PATHS)
        | st.builds(lambda p, q: p + "?" + q, st.sampled_from(KNOWN_PATHS), header_text)
        | st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), max_size=80)
    )
    version = draw(st.sampled_from(["HTTP/1.0", "HTTP/1.1", "HTTP/1.1", "HTTP/2.0", "HTTP/x", ""]))
    body = draw(
        st.sampled_from([b""])
        | st.binary(max_size=300)
        | json_values.map(lambda v: json.dumps(v).encode())
        | api_bodies(params)
    )
    headers: list[tuple[str, str]] = []
    if draw(st.booleans()):
        headers.append(
            (
                "Content-Type",
                draw(
                    st.sampled_from(["application/json", "text/plain", "application/json; charset=utf-8"]) | header_text
                ),
            )
        )
    length = draw(st.sampled_from(["right", "none", "other"]))
    if length == "right":
        headers.append(("Content-Length", str(len(body))))
    elif length == "other":
        headers.append(("Content-Length", draw(st.integers(-5, 70_000).map(str) | header_text)))
    headers += draw(
        st.lists(
            st.tuples(
                st.sampled_from(
                    ["Host", "Origin", "Authorization", "Expect", "Transfer-Encoding", "Cookie", "X-Anything"]
                )
                | st.text(
                    st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters=":"),
                    min_size=1,
                    max_size=20,
                ),
                header_text,
            ),
            max_size=5,
        )
    )
    head = f"{method} {target} {version}".rstrip() + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("utf-8", "surrogateescape") + body


def http_requests(params: list[Param]) -> st.SearchStrategy[bytes]:
    return api_requests(params) | wild_requests(params)


def test_http_fuzz_never_breaks_the_server_or_stalls_the_show(show: RenderThread, params: list[Param]) -> None:
    guarded = StatusServer(show.app, show.feed, StatusConfig(port=0, token=TOKEN))  # the same app, token required
    guarded.start()
    steps_before = show.steps
    seen: dict[int, int] = {}

    @FUZZ
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        request = data.draw(http_requests(params))
        status = final_status(exchange(show.server.port, request))
        seen[status] = seen.get(status, 0) + 1
        # 505 (HTTP version not supported) is the protocol's answer to "HTTP/2.0", not a failure
        assert status < 500 or status == 505, f"{status} for {request[:300]!r}"
        locked = final_status(exchange(guarded.port, request))
        assert 400 <= locked < 500 or locked == 505, f"{locked} without the token for {request[:300]!r}"

    try:
        fuzz()
        assert show.server.alive and guarded.alive
        assert request_health(show.server.port) == 200
        assert request_health(guarded.port, f"Authorization: Bearer {TOKEN}\r\n") == 200
    finally:
        guarded.stop()
    assert show.error is None, f"the render thread failed: {show.error!r}"
    assert show.steps > steps_before, "the app did not step while the server was fuzzed"
    mark = show.steps
    show.wait_for(lambda: show.steps > mark + 10, "the app to keep stepping after the fuzz")
    assert {200, 400, 405} <= set(seen), f"the fuzz reached too little: {seen}"


def request_health(port: int, extra: str = "") -> int:
    return final_status(exchange(port, f"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()))


# -- OSC -----------------------------------------------------------------------------------------


def osc_string(text: bytes) -> bytes:
    text += b"\0"
    return text + b"\0" * (-len(text) % 4)


@st.composite
def osc_packets(draw: st.DrawFn, paths: list[str]) -> bytes:
    kind = draw(st.sampled_from(["garbage", "message", "bundle"]))
    if kind == "garbage":
        return draw(st.binary(max_size=600))
    actions = [f"/dreamdeck/{name}" for name in ACTIONS]
    address = draw(
        st.sampled_from(
            [f"/dreamdeck{p}" for p in paths]
            + actions
            + ["/dreamdeck/get", "/dreamdeck/norm/fx/kaleido/segments", "/dreamdeck/fx/*/enabled"]
        )
        | st.text(max_size=40).map(lambda t: "/" + t)
    )
    tags = draw(st.text(st.sampled_from("ifsbTFNIhdtcrm[]"), max_size=6))
    args = draw(st.binary(max_size=64))
    message = osc_string(address.encode("utf-8", "surrogatepass")) + osc_string(b"," + tags.encode()) + args
    if kind == "message":
        return message
    elements = draw(st.lists(st.sampled_from([message, b"#bundle\0" + bytes(8)]) | st.binary(max_size=40), max_size=4))
    body = b"".join(struct.pack(">i", len(e) + draw(st.sampled_from([0, 0, 0, 4, -4, 1000]))) + e for e in elements)
    return b"#bundle\0" + draw(st.binary(min_size=8, max_size=8)) + body


def osc_int_message(address: str, value: int) -> bytes:
    return osc_string(address.encode()) + osc_string(b",i") + struct.pack(">i", value)


def test_osc_fuzz_never_stops_the_receiver(show: RenderThread, params: list[Param]) -> None:
    servers = [c for c in show.app.controls if c.name == "osc"]
    if not servers:
        pytest.skip("engine.control.osc is not in this build")
    osc = servers[0]
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    steps_before = show.steps

    @FUZZ
    @given(packet=osc_packets([p.path for p in params]))
    def fuzz(packet: bytes) -> None:
        client.sendto(packet, ("127.0.0.1", osc.port))

    try:
        fuzz()
        assert osc.running, "the OSC receiver stopped"
        current = show.app.params.target("/fx/kaleido/segments")
        wanted = 5 if current != 5 else 6
        deadline = time.monotonic() + 20
        while show.app.params.get("/fx/kaleido/segments") != wanted:  # resent: UDP may drop under a flood
            assert time.monotonic() < deadline, f"a valid OSC message no longer lands; osc: {osc.status}"
            client.sendto(osc_int_message("/dreamdeck/fx/kaleido/segments", wanted), ("127.0.0.1", osc.port))
            time.sleep(0.1)
    finally:
        client.close()
    assert show.error is None, f"the render thread failed: {show.error!r}"
    assert show.steps > steps_before, "the app did not step during the OSC fuzz"
