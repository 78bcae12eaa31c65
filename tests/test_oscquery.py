"""OSCQuery over real HTTP on loopback, checked against the Vidvox proposal's attributes,
and zeroconf advertisement on the loopback interface where multicast works there."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from engine.catalog import build_registry
from engine.control.actions import ACTIONS, Actions
from engine.control.osc import OscServer
from engine.control.oscquery import ATTRIBUTES, OscQueryServer
from engine.params import Kind, ParamRegistry, trigger_param

TYPE_OF_KIND = {
    Kind.FLOAT: "f",
    Kind.INT: "i",
    Kind.BOOL: "T",
    Kind.ENUM: "s",
    Kind.STRING: "s",
    Kind.COLOUR: "r",
    Kind.TRIGGER: "N",
}


@pytest.fixture
def registry() -> ParamRegistry:
    return build_registry()


@pytest.fixture
def osc(registry: ParamRegistry) -> Iterator[OscServer]:
    server = OscServer(registry, Actions(), port=0)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def make_query(registry: ParamRegistry, osc: OscServer) -> Iterator[Callable[..., OscQueryServer]]:
    made: list[OscQueryServer] = []

    def make(**options: Any) -> OscQueryServer:
        options.setdefault("port", 0)
        server = OscQueryServer(registry, osc.port, **options)
        made.append(server)
        server.start()
        return server

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def query(make_query: Callable[..., OscQueryServer]) -> OscQueryServer:
    return make_query()


def get(server: OscQueryServer, target: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        body = response.read()
        kind = response.getheader("Content-Type", "")
    finally:
        conn.close()
    return response.status, json.loads(body) if body and kind == "application/json" else body


def walk(node: dict) -> Iterator[dict]:
    yield node
    for child in node.get("CONTENTS", {}).values():
        yield from walk(child)


def test_the_whole_tree_has_the_attributes_the_spec_requires(query: OscQueryServer, registry: ParamRegistry) -> None:
    status, tree = get(query, "/")
    assert status == 200 and tree["FULL_PATH"] == "/"
    nodes = {node["FULL_PATH"]: node for node in walk(tree)}
    for path, node in nodes.items():
        assert "DESCRIPTION" in node and isinstance(node["DESCRIPTION"], str), path
        assert set(node) <= ATTRIBUTES, f"{path}: {set(node) - ATTRIBUTES}"
        if "CONTENTS" in node:
            for name, child in node["CONTENTS"].items():
                assert child["FULL_PATH"] == (path.rstrip("/") + "/" + name), child["FULL_PATH"]
        else:
            assert "TYPE" in node and node["ACCESS"] in (1, 2, 3), path

    for param in registry.params():
        node = nodes["/dreamdeck" + param.path]
        assert node["TYPE"] == TYPE_OF_KIND[param.kind]
        if param.kind is Kind.TRIGGER:  # a trigger is written, never read (VQGAN+CLIP's restart)
            assert node["ACCESS"] == 2 and node["VALUE"] == [None], "null: the spec's placeholder for N"
            continue
        assert node["ACCESS"] == 3
        assert len(node["VALUE"]) == len(node["TYPE"]) == 1
        if param.kind in (Kind.FLOAT, Kind.INT):
            assert node["RANGE"] == [{"MIN": param.min, "MAX": param.max}]
        elif param.kind is Kind.ENUM:
            assert node["RANGE"] == [{"VALS": list(param.choices)}]
            assert node["VALUE"][0] in param.choices
        if param.unit:
            assert node["UNIT"] == [param.unit]

    segments = nodes["/dreamdeck/fx/kaleido/segments"]
    assert segments["VALUE"] == [registry.target("/fx/kaleido/segments")] and segments["TYPE"] == "i"
    assert nodes["/dreamdeck/fx/grade/enabled"]["VALUE"][0] in (True, False)
    colour = nodes["/dreamdeck/scene/reaction_diffusion/colour_a"]["VALUE"][0]
    assert colour.startswith("#") and len(colour) == 9

    norm = nodes["/dreamdeck/norm/fx/kaleido/segments"]
    assert norm["TYPE"] == "f" and norm["RANGE"] == [{"MIN": 0.0, "MAX": 1.0}] and 0.0 <= norm["VALUE"][0] <= 1.0
    assert "/dreamdeck/norm/layer/overlay/image" not in nodes, "text has no 0..1 form"

    for name, spec in ACTIONS.items():  # TYPE and DESCRIPTION come from the action's declaration
        action = nodes[f"/dreamdeck/{name}"]
        assert action["ACCESS"] == 2 and action["VALUE"] == [None] * len(action["TYPE"])
        assert action["DESCRIPTION"] == f"{spec.description}: {spec.signature}"
    assert nodes["/dreamdeck/scene/next"]["TYPE"] == "N" and nodes["/dreamdeck/prompt"]["TYPE"] == "s"
    assert nodes["/dreamdeck/midi/learn"]["DESCRIPTION"].endswith("midi/learn(path: path, mode: str = '')")
    assert nodes["/dreamdeck/midi/learn"]["TYPE"] == "s", "the required arguments: a client may leave mode out"
    assert nodes["/dreamdeck/scene"]["CONTENTS"].keys() >= {"active", "next", "select"}


def test_one_node_and_one_attribute(query: OscQueryServer, registry: ParamRegistry) -> None:
    status, node = get(query, "/dreamdeck/fx/kaleido/segments")
    assert status == 200 and node["FULL_PATH"] == "/dreamdeck/fx/kaleido/segments" and "CONTENTS" not in node
    segments = registry.target("/fx/kaleido/segments")
    assert get(query, "/dreamdeck/fx/kaleido/segments?VALUE") == (200, {"VALUE": [segments]})
    assert get(query, "/dreamdeck/fx/kaleido/segments?TYPE") == (200, {"TYPE": "i"})
    assert get(query, "/dreamdeck/fx/kaleido/segments?RANGE") == (200, {"RANGE": [{"MIN": 1, "MAX": 32}]})
    status, container = get(query, "/dreamdeck/fx/kaleido/")  # a trailing slash names the same node
    assert status == 200 and set(container["CONTENTS"]) == {"enabled", "rotate", "segments"}
    assert get(query, "/dreamdeck/fx?VALUE")[0] == 204, "a container has no value: no content"
    assert get(query, "/dreamdeck/scene/next?VALUE")[0] == 204, "write-only: no value"


def test_host_info_names_the_osc_server(query: OscQueryServer, osc: OscServer) -> None:
    status, info = get(query, "/?HOST_INFO")
    assert status == 200
    assert info["OSC_PORT"] == osc.port and info["OSC_TRANSPORT"] == "UDP" and info["OSC_IP"] == "127.0.0.1"
    assert info["NAME"] == "dreamdeck"
    extensions = info["EXTENSIONS"]
    assert all(extensions[name] for name in ("ACCESS", "VALUE", "RANGE", "DESCRIPTION"))
    assert extensions["LISTEN"] is True and extensions["PATH_ADDED"] is True and extensions["PATH_REMOVED"] is True
    assert extensions["PATH_CHANGED"] is True and extensions["PATH_RENAMED"] is False, "nothing is renamed"
    assert "WS_PORT" not in info, "absent: the WebSocket is on this port (the spec's default)"


def test_unknown_paths_and_attributes(query: OscQueryServer) -> None:
    status, body = get(query, "/dreamdeck/fx/nope")
    assert status == 404 and "/dreamdeck/fx/nope" in body["ERROR"]
    assert get(query, "/elsewhere")[0] == 404
    assert get(query, "/dreamdeck/fx/kaleido/segments?GABBAGABBAHEY")[0] == 400
    assert get(query, "/dreamdeck/fx/kaleido/segments?LISTEN")[0] == 400, "a WebSocket command, not an attribute"


def test_values_are_read_live(query: OscQueryServer, osc: OscServer, registry: ParamRegistry) -> None:
    from pythonosc.udp_client import SimpleUDPClient

    client = SimpleUDPClient("127.0.0.1", osc.port)
    client.send_message("/dreamdeck/fx/kaleido/segments", 17)
    client.send_message("/dreamdeck/layer/scene/blend", "screen")
    client._sock.close()
    deadline = time.monotonic() + 10
    while osc.counts.applied < 2 and time.monotonic() < deadline:
        time.sleep(0.002)
    registry.apply_pending(0.0)
    assert get(query, "/dreamdeck/fx/kaleido/segments?VALUE") == (200, {"VALUE": [17]})
    assert get(query, "/dreamdeck/layer/scene/blend?VALUE") == (200, {"VALUE": ["screen"]})
    assert get(query, "/dreamdeck/norm/fx/kaleido/segments?VALUE") == (200, {"VALUE": [16 / 31]})


def test_parameters_declared_later_and_triggers_appear(query: OscQueryServer, registry: ParamRegistry) -> None:
    registry.declare(trigger_param("/scene/flash", description="Flash once"))
    status, node = get(query, "/dreamdeck/scene/flash")
    assert status == 200 and node["TYPE"] == "N" and node["ACCESS"] == 2 and node["VALUE"] == [None]
    assert get(query, "/dreamdeck/scene/flash?VALUE")[0] == 204, "write-only: the value is not shown"


def test_listing_only_the_engines_actions(make_query: Callable[..., OscQueryServer]) -> None:
    actions = Actions()
    actions.register("scene/next", lambda: None)
    server = make_query(actions=actions)
    assert get(server, "/dreamdeck/scene/next")[0] == 200
    assert get(server, "/dreamdeck/tap")[0] == 404


def test_an_action_node_is_built_from_its_declaration(make_query: Callable[..., OscQueryServer]) -> None:
    from engine.control.actions import ActionSpec, Arg

    spec = ActionSpec(
        "fx/burst",
        "Flash the kaleidoscope",
        (Arg("segments", "int"), Arg("speed", "float", 1.0), Arg("label", "str", "")),
    )
    actions = Actions({**ACTIONS, spec.name: spec})
    actions.register("fx/burst", lambda segments, speed, label: None)
    server = make_query(actions=actions)
    status, node = get(server, "/dreamdeck/fx/burst")
    assert status == 200 and node["TYPE"] == "i" and node["ACCESS"] == 2
    assert node["DESCRIPTION"] == "Flash the kaleidoscope: fx/burst(segments: int, speed: float = 1.0, label: str = '')"


def test_garbage_requests_do_not_kill_the_server(query: OscQueryServer) -> None:
    junk = [
        b"GARBAGE\r\n\r\n",
        b"GET\r\n\r\n",
        b"\x00\xff\xfe" * 100 + b"\r\n\r\n",
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /%ff%fe?%zz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /dreamdeck?VALUE&VALUE HTTP/1.1\r\n\r\n",
    ]
    for payload in junk:
        with socket.create_connection(("127.0.0.1", query.port), timeout=10) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
    with socket.create_connection(("127.0.0.1", query.port), timeout=10):
        pass  # connect and hang up without a word
    for method, status, has_body in (("POST", 405, True), ("HEAD", 200, False), ("GET", 200, True)):
        conn = http.client.HTTPConnection("127.0.0.1", query.port, timeout=10)
        conn.request(method, "/?HOST_INFO")
        response = conn.getresponse()
        assert response.status == status and bool(response.read()) == has_body, method
        conn.close()
    assert get(query, "/dreamdeck/fx/kaleido/segments?TYPE") == (200, {"TYPE": "i"})


def test_binding_beyond_loopback_needs_an_allowlist(
    registry: ParamRegistry, make_query: Callable[..., OscQueryServer]
) -> None:
    with pytest.raises(ValueError, match="allowlist"):
        OscQueryServer(registry, 9321, host="0.0.0.0", port=0)
    server = make_query(host="0.0.0.0", allow=["127.0.0.2"])
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        get(server, "/")  # from 127.0.0.1: not on the list, the connection is closed unanswered
    with socket.create_connection(("127.0.0.1", server.port), source_address=("127.0.0.2", 0), timeout=10) as sock:
        sock.sendall(b"GET /?HOST_INFO HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and b'"OSC_PORT"' in answer


def test_zeroconf_advertises_and_withdraws(make_query: Callable[..., OscQueryServer]) -> None:
    zeroconf = pytest.importorskip("zeroconf")
    name = f"dreamdeck-test-{time.monotonic_ns() % 10**9}"
    server = make_query(name=name, advertise=True)
    deadline = time.monotonic() + 15
    while not server.advertised and server.last_error is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.advertised:
        pytest.skip(f"zeroconf cannot announce on loopback here: {server.last_error or 'timed out'}")
    browser = zeroconf.Zeroconf(interfaces=["127.0.0.1"], ip_version=zeroconf.IPVersion.V4Only)
    try:
        info = browser.get_service_info("_oscjson._tcp.local.", f"{name}._oscjson._tcp.local.", timeout=3000)
        assert info is not None and info.port == server.port and "127.0.0.1" in info.parsed_addresses()
        osc_info = browser.get_service_info("_osc._udp.local.", f"{name}._osc._udp.local.", timeout=3000)
        assert osc_info is not None and osc_info.port == server.osc_port
        server.stop()
        assert not server.advertised
        gone = zeroconf.Zeroconf(interfaces=["127.0.0.1"], ip_version=zeroconf.IPVersion.V4Only)
        try:  # a fresh listener, so no cached record answers for the withdrawn service
            assert gone.get_service_info("_oscjson._tcp.local.", f"{name}._oscjson._tcp.local.", timeout=1000) is None
        finally:
            gone.close()
    finally:
        browser.close()
