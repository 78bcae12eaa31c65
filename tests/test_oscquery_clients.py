"""The OSCQuery tree as two independent clients read it: python-oscquery (the library that
VRChat-style tools and Python patchers use: zeroconf discovery, a strict node parser) and a
strict reader written here from the Vidvox proposal's rules, which checks every attribute of
every node against TYPE.

python-oscquery is used as a user would: its browser finds the show by name, its client reads
HOST_INFO and the tree; the value is set over OSC to the port its HOST_INFO names.
"""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from engine.catalog import build_registry
from engine.control.actions import Actions
from engine.control.osc import OscServer
from engine.control.oscquery import OscQueryServer
from engine.params import ParamRegistry

TIMEOUT = 15.0


@pytest.fixture
def registry() -> ParamRegistry:
    return build_registry()


@pytest.fixture
def osc(registry: ParamRegistry) -> Iterator[OscServer]:
    server = OscServer(registry, Actions(), port=0)
    server.start()
    yield server
    server.stop()


def http_get(port: int, target: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    return response.status, json.loads(body) if body else None


def walk(node: dict) -> Iterator[dict]:
    yield node
    for child in node.get("CONTENTS", {}).values():
        yield from walk(child)


def wait_for(condition: Any, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.01)


# -- python-oscquery -------------------------------------------------------------------------


def test_python_oscquery_discovers_the_show_reads_every_node_and_a_value_set_over_osc(
    registry: ParamRegistry, osc: OscServer
) -> None:
    from pythonosc.udp_client import SimpleUDPClient
    from pythonoscquery.osc_query_browser import OSCQueryBrowser  # the dev extra has it: no skip
    from pythonoscquery.osc_query_client import OSCQueryClient
    from pythonoscquery.shared.osc_access import OSCAccess

    name = f"dreamdeck-pyoscq-{time.monotonic_ns() % 10**9}"
    query = OscQueryServer(registry, lambda: osc.port, port=0, name=name, advertise=True, osc=osc)
    query.start()
    browser = None
    try:
        wait_for(lambda: query.advertised or query.last_error is not None, "zeroconf announcement")
        if not query.advertised:
            pytest.skip(f"zeroconf cannot announce on loopback here: {query.last_error}")
        browser = OSCQueryBrowser()
        found: list[Any] = []
        wait_for(lambda: found.append(browser.find_service_by_name(name)) or found[-1] is not None, "discovery")
        client = OSCQueryClient(found[-1])
        info = client.get_host_info()
        assert info.name == name and info.osc_port == osc.port and info.osc_transport == "UDP"
        assert info.extensions["LISTEN"] is True

        root = client.query_node("/")  # OSCPathNode.from_json: raises on any node it finds out of spec
        theirs = {node.full_path: node for node in root}
        _, tree = http_get(query.port, "/")
        ours = {node["FULL_PATH"]: node for node in walk(tree)}
        assert theirs.keys() == ours.keys() and len(theirs) > 300
        for path, node in ours.items():  # every node as it parsed it, and every node on its own
            parsed = theirs[path]
            assert parsed.access == OSCAccess(node["ACCESS"]), path
            assert parsed.value == node.get("VALUE"), path
            assert parsed.is_container == ("CONTENTS" in node), path
        for path in ours:
            alone = client.query_node(path)
            assert alone is not None and alone.full_path == path
        assert theirs["/dreamdeck/scene/next"].access is OSCAccess.WRITEONLY_VALUE  # the node it stopped at

        segments = "/dreamdeck/fx/kaleido/segments"
        assert client.query_node(segments).value == [registry.target("/fx/kaleido/segments")]
        sender = SimpleUDPClient(info.osc_ip, info.osc_port)
        sender.send_message(segments, 23)
        sender.send_message("/dreamdeck/layer/scene/blend", "screen")
        sender._sock.close()
        wait_for(lambda: osc.counts.applied >= 2, "OSC applied")
        registry.apply_pending(0.0)  # the frame boundary
        assert client.query_node(segments).value == [23]
        assert client.query_node("/dreamdeck/layer/scene/blend").value == ["screen"]
    finally:
        if browser is not None:
            browser.zc.close()
        query.stop()


# -- a strict reader of our own, from the spec -------------------------------------------------

_TAG_CHARS = set("ifsbhtdScrmTFNI")
_CLIPMODES = {"none", "low", "high", "both"}


def _tags(type_string: str) -> list[str]:
    """The value tags of a TYPE string (array brackets group values, they are not values)."""
    assert isinstance(type_string, str), type_string
    tags = [c for c in type_string if c not in "[]"]
    assert tags and set(tags) <= _TAG_CHARS, f"not an OSC type tag string: {type_string!r}"
    return tags


def _json_matches(tag: str, item: Any) -> bool:
    """The spec's table of JSON equivalents of OSC types."""
    if tag in "NIbm":
        return item is None
    if tag in "ih":
        return isinstance(item, int) and not isinstance(item, bool)
    if tag in "fdt":
        return isinstance(item, (int, float)) and not isinstance(item, bool)
    if tag in "sSc":
        return isinstance(item, str)
    if tag in "TF":
        return isinstance(item, bool)
    if tag == "r":
        return isinstance(item, str) and re.fullmatch(r"#[0-9a-fA-F]{8}", item) is not None
    return False


def strict_read(node: dict, parent: str | None = None, name: str | None = None) -> int:
    """Check one node and everything under it; return how many nodes were read."""
    path = node.get("FULL_PATH")
    assert isinstance(path, str) and path.startswith("/"), node
    if parent is not None:
        assert path == parent.rstrip("/") + "/" + name, f"{path}: FULL_PATH does not follow the tree"
    assert isinstance(node.get("DESCRIPTION", ""), str), path
    access = node.get("ACCESS", 3)  # absent: writable, readable if VALUE is served (the spec)
    assert access in (0, 1, 2, 3) and not isinstance(access, bool), f"{path}: ACCESS {access!r}"
    contents = node.get("CONTENTS")
    if "TYPE" not in node:
        assert isinstance(contents, dict), f"{path}: neither a method (TYPE) nor a container (CONTENTS)"
        assert access == 0, f"{path}: a container with no value must say ACCESS 0"
        assert not {"VALUE", "RANGE", "UNIT", "CLIPMODE"} & node.keys(), f"{path}: value attributes without TYPE"
    else:
        tags = _tags(node["TYPE"])
        assert access != 0, f"{path}: a method with TYPE but ACCESS 0"
        for attribute in ("VALUE", "RANGE", "UNIT", "CLIPMODE", "EXTENDED_TYPE"):
            if attribute in node:
                items = node[attribute]
                assert isinstance(items, list) and len(items) == len(tags), f"{path}: {attribute} per TYPE tag"
        values = node.get("VALUE")
        if access & 1:
            assert values is not None, f"{path}: readable but no VALUE"
            for tag, item in zip(tags, values):
                assert _json_matches(tag, item), f"{path}: VALUE {item!r} is not JSON for OSC {tag!r}"
        elif values is not None:
            assert all(item is None for item in values), f"{path}: a write-only VALUE must be placeholders"
        for tag, bounds, value in zip(tags, node.get("RANGE", []), values or [None] * len(tags)):
            if bounds is None:
                continue
            assert isinstance(bounds, dict) and set(bounds) <= {"MIN", "MAX", "VALS"}, f"{path}: RANGE {bounds!r}"
            if "MIN" in bounds and "MAX" in bounds:
                assert bounds["MIN"] <= bounds["MAX"], path
                if value is not None:
                    assert bounds["MIN"] <= value <= bounds["MAX"], f"{path}: VALUE out of its RANGE"
            if "VALS" in bounds:
                assert isinstance(bounds["VALS"], list) and all(_json_matches(tag, v) for v in bounds["VALS"])
                if value is not None:
                    assert value in bounds["VALS"], f"{path}: VALUE not one of VALS"
        for mode in node.get("CLIPMODE", []):
            assert mode in _CLIPMODES, f"{path}: CLIPMODE {mode!r}"
        for unit in node.get("UNIT", []):
            assert unit is None or isinstance(unit, str), path
    count = 1
    for child_name, child in (contents or {}).items():
        assert "/" not in child_name and child_name, f"{path}: bad child name {child_name!r}"
        count += strict_read(child, path, child_name)
    return count


def test_a_strict_reader_from_the_spec_accepts_every_node(registry: ParamRegistry, osc: OscServer) -> None:
    query = OscQueryServer(registry, lambda: osc.port, port=0, osc=osc)
    query.start()
    try:
        status, tree = http_get(query.port, "/")
        assert status == 200
        assert strict_read(tree) == len(list(walk(tree))) > 300
        for node in walk(tree):  # what each node answers alone agrees with the tree
            if "TYPE" not in node:
                continue
            status, body = http_get(query.port, node["FULL_PATH"] + "?VALUE")
            if node["ACCESS"] & 1:
                assert (status, body) == (200, {"VALUE": node["VALUE"]}), node["FULL_PATH"]
            else:
                assert status == 204, f"{node['FULL_PATH']}: a write-only value is not served"
    finally:
        query.stop()


def test_the_strict_reader_can_fail() -> None:
    """The reader is a test: the trees it must refuse (the old root without ACCESS among them), it refuses."""
    old_action = {"FULL_PATH": "/x", "DESCRIPTION": "next", "TYPE": "N", "ACCESS": 2}
    good = {"FULL_PATH": "/", "ACCESS": 0, "CONTENTS": {"x": {**old_action, "VALUE": [None]}}}
    assert strict_read(good) == 2
    bad_trees = [
        {"FULL_PATH": "/", "CONTENTS": {"x": {**old_action, "VALUE": [None]}}},  # root without ACCESS 0
        {"FULL_PATH": "/", "ACCESS": 0, "CONTENTS": {"x": {"FULL_PATH": "/x", "TYPE": "f", "ACCESS": 3}}},
        {
            "FULL_PATH": "/",
            "ACCESS": 0,
            "CONTENTS": {"x": {"FULL_PATH": "/x", "TYPE": "i", "ACCESS": 3, "VALUE": [1.5]}},
        },
        {"FULL_PATH": "/", "ACCESS": 0, "CONTENTS": {"y": {"FULL_PATH": "/x", "TYPE": "i", "ACCESS": 3, "VALUE": [1]}}},
        {
            "FULL_PATH": "/",
            "ACCESS": 0,
            "CONTENTS": {
                "x": {"FULL_PATH": "/x", "TYPE": "f", "ACCESS": 3, "VALUE": [2.0], "RANGE": [{"MIN": 0, "MAX": 1}]}
            },
        },
    ]
    for tree in bad_trees:
        with pytest.raises(AssertionError):
            strict_read(tree)
