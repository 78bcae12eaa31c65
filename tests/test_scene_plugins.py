"""Scenes as plugins: the dreamdeck.scenes entry points, their order, their failures, their parameters.

The end-to-end test installs tests/plugins/dreamdeck-scene-example with pip into a folder of
its own and plays it in a real show (a subprocess): its parameters appear in OSCQuery, a
preset sets them, the status page lists them, with no change to dreamdeck. The other tests
find scenes through real package metadata (dist-info folders on sys.path), the way
importlib.metadata finds any installed package.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from engine.catalog import build_registry
from engine.paramdoc import params_json
from engine.params import float_param, string_param
from engine.scenes import (
    ENTRY_POINT_GROUP,
    LastGood,
    Scene,
    SceneCatalog,
    ScenesNotFound,
    find_scenes,
    installed_catalog,
)
from engine.scenes.passthrough import Passthrough

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).resolve().parent / "plugins"
SNAPSHOT = Path(__file__).resolve().parent / "scene_params_snapshot.json"
BUILTIN_ORDER = ["reaction_diffusion", "passthrough", "realtime", "ddpm", "vqgan_clip", "sana_sprint", "flow"]
NEWER = ("sana_sprint", "flow")  # in pyproject.toml; installed metadata older than them lacks them until
# `pip install -e .`: the tests below then hold the rest to the same promises


def _installed_builtins() -> list[str]:
    """BUILTIN_ORDER less the newer scenes the installed metadata does not have yet."""
    names = {f.scene.name for f in find_scenes()}
    return [n for n in BUILTIN_ORDER if n in names or n not in NEWER]


INSTALLED = _installed_builtins()  # read once, before any test installs a fake plugin


def installed_builtins() -> list[str]:
    return list(INSTALLED)


def only_installed(records: list[dict]) -> list[dict]:
    """Snapshot records of the installed scenes (and the engine's /scene/ parameters), choices
    of /scene/active and /scene/cue to the installed scenes."""
    missing = [n for n in NEWER if n not in installed_builtins()]
    kept = []
    for record in records:
        if any(record["path"].startswith(f"/scene/{n}/") for n in missing):
            continue
        if record["path"] in ("/scene/active", "/scene/cue"):
            record = {**record, "choices": [c for c in record["choices"] if c not in missing]}
        kept.append(record)
    return kept


# -- the built-in scenes through their own entry points ---------------------------------------------


def test_builtin_scenes_come_from_entry_points_in_a_stable_order() -> None:
    found = find_scenes()
    order = installed_builtins()
    assert [f.scene.name for f in found if f.builtin] == order
    assert installed_catalog().names()[: len(order)] == order  # F1..F7 and scene/select 0..6
    assert all(f.distribution == "dreamdeck" for f in found[: len(order)])
    assert found[1].entry_point == "passthrough = engine.scenes.passthrough:Passthrough"


def test_every_scene_parameter_keeps_its_path_and_declaration() -> None:
    """Presets, OSC addresses and MIDI maps name these paths: they must never move.

    tests/scene_params_snapshot.json is ``dreamdeck params --json`` (without descriptions)
    as it was before scenes declared their parameters relative to their names."""
    keys = ("path", "osc", "kind", "min", "max", "choices", "default", "unit", "smoothing_s", "in_presets")
    now = [
        {k: p[k] for k in keys} for p in json.loads(params_json(build_registry())) if p["path"].startswith("/scene/")
    ]
    before = only_installed(json.loads(SNAPSHOT.read_text()))
    assert [p["path"] for p in now] == [p["path"] for p in before]
    assert now == before


def test_parameters_are_declared_relative_to_the_scene() -> None:
    class Glow(Scene):
        name = "glow"
        PARAMS = (float_param("amount", 0.5, 0.0, 1.0), string_param("layers/1/file"))

    assert [p.path for p in Glow.PARAMS] == ["/scene/glow/amount", "/scene/glow/layers/1/file"]
    assert Glow.path("amount") == "/scene/glow/amount"

    class Brighter(Glow):  # a renamed subclass takes what it inherits to its own name
        name = "brighter"

    assert [p.path for p in Brighter.PARAMS] == ["/scene/brighter/amount", "/scene/brighter/layers/1/file"]
    assert [p.path for p in Glow.PARAMS] == ["/scene/glow/amount", "/scene/glow/layers/1/file"]
    registry = build_registry(SceneCatalog((Passthrough, Glow, Brighter)))
    assert registry.get("/scene/brighter/amount") == 0.5
    with pytest.raises(ValueError, match=r"by their own name.*/scene/glow/amount"):
        type("Absolute", (Scene,), {"name": "glow", "PARAMS": (float_param("/scene/glow/amount", 0.5, 0.0, 1.0),)})


# -- finding plugins through package metadata --------------------------------------------------------


def install_fake_distribution(root: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """What pip leaves for a package: its modules and a dist-info folder naming its entry points."""
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}")
    for name, source in modules.items():
        (root / f"{name}.py").write_text(source)


SCENE_SOURCE = """
from engine.scenes import Scene

class {cls}(Scene):
    name = {name!r}
    {extra}
    def process(self, frame, t):
        return frame
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path where a test installs packages (taken away again afterwards)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("acme_")]:
        del sys.modules[name]


def test_plugins_follow_the_builtins_by_order_then_name(site) -> None:
    install_fake_distribution(
        site,
        "acme-scenes",
        {"zeta": "acme_zeta:Zeta", "alpha": "acme_alpha:Alpha", "early": "acme_early:Early"},
        {
            "acme_zeta": SCENE_SOURCE.format(cls="Zeta", name="zeta", extra=""),
            "acme_alpha": SCENE_SOURCE.format(cls="Alpha", name="alpha", extra=""),
            "acme_early": SCENE_SOURCE.format(cls="Early", name="early", extra="order = 1"),
        },
    )
    # a plugin's order sorts it among the plugins; it never moves a built-in scene's key
    assert installed_catalog().names() == [*installed_builtins(), "early", "alpha", "zeta"]
    assert {f.scene.name: f.distribution for f in find_scenes()}["alpha"] == "acme-scenes"


def test_a_broken_plugin_is_one_log_line_and_the_rest_plays(site, caplog) -> None:
    install_fake_distribution(
        site,
        "acme-mixed",
        {
            "good": "acme_good:Good",
            "missing_dep": "acme_missing:Missing",  # its import fails
            "typo": "acme_good:Goood",  # no such class
            "not_a_class": "acme_good:helper",  # not a scene
            "misnamed": "acme_good:Misnamed",  # entry point and scene name differ
            "absolute": "acme_absolute:Absolute",  # a parameter by path: refused as the class is made
            "passthrough": "acme_good:Impostor",  # a built-in's name: the built-in keeps it
        },
        {
            "acme_good": SCENE_SOURCE.format(cls="Good", name="good", extra="")
            + SCENE_SOURCE.format(cls="Misnamed", name="other", extra="")
            + SCENE_SOURCE.format(cls="Impostor", name="passthrough", extra="")
            + "\ndef helper():\n    pass\n",
            "acme_missing": "import acme_no_such_module\n",
            "acme_absolute": "from engine.params import int_param\n"
            + SCENE_SOURCE.format(
                cls="Absolute", name="absolute", extra="PARAMS = (int_param('/scene/absolute/n', 1, 0, 9),)"
            ),
        },
    )
    with caplog.at_level(logging.DEBUG, logger="engine.scenes.plugins"):
        catalog = installed_catalog()
    assert catalog.names() == [*installed_builtins(), "good"]
    assert catalog.get("passthrough") is Passthrough
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 6, errors
    for name, why in (
        ("missing_dep", "ModuleNotFoundError: No module named 'acme_no_such_module'"),
        ("typo", "AttributeError"),
        ("not_a_class", "is not a subclass of engine.scenes.Scene"),
        ("misnamed", "the entry point is named 'misnamed' but the scene is named 'other'"),
        ("absolute", "by their own name ('strength'), not a path: /scene/absolute/n"),
        ("passthrough", "the name is taken by passthrough = engine.scenes.passthrough:Passthrough"),
    ):
        mine = [e for e in errors if e.startswith(f"scene plugin {name!r}")]
        assert len(mine) == 1 and why in mine[0] and "from acme-mixed" in mine[0] and "left out" in mine[0], errors
        assert "\n" not in mine[0]
    # the show's registry builds with what is left, the good plugin included
    assert build_registry(catalog).param("/scene/active").choices[-1] == "good"


def test_no_scenes_of_dreamdeck_is_an_install_error_that_says_the_fix() -> None:
    only_a_plugin = metadata.EntryPoints(
        [metadata.EntryPoint("passthrough_copy", "tests.test_scene_plugins:PassthroughCopy", ENTRY_POINT_GROUP)]
    )
    with pytest.raises(ScenesNotFound, match=r"none of dreamdeck's own scenes.*passthrough_copy.*pip install -e \."):
        find_scenes(only_a_plugin)
    with pytest.raises(ScenesNotFound, match=r"pip install -e \."):
        find_scenes(metadata.EntryPoints([]))


class PassthroughCopy(Passthrough):
    name = "passthrough_copy"


def test_dreamdeck_params_says_the_fix_in_one_line_when_the_metadata_is_stale(tmp_path) -> None:
    """A dreamdeck metadata folder first on the path without the entry points (an install older
    than scenes as plugins): the command says what to do, no traceback."""
    install_fake_distribution(tmp_path, "dreamdeck", {}, {})
    entry_points = next(tmp_path.glob("*.dist-info")) / "entry_points.txt"
    entry_points.write_text("[console_scripts]\ndreamdeck = engine.cli:main\n")
    done = subprocess.run(
        [sys.executable, "-m", "engine", "--no-log-file", "params"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("dreamdeck: none of dreamdeck's own scenes is registered"), done.stderr
    assert str(tmp_path) in done.stderr and done.stderr.rstrip().endswith("pip install -e .")
    assert "Traceback" not in done.stderr


# -- LastGood: a live value that can be refused ---------------------------------------------------------


class Strictly:
    """An apply function that takes even numbers, refuses odd ones and breaks on negative ones."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, n: int) -> str:
        self.calls.append(n)
        if n < 0:
            raise RuntimeError("the device went away")
        if n % 2:
            raise ValueError(f"{n} is odd")
        return f"applied {n}"


def test_last_good_applies_changes_once_and_keeps_the_last_good_value(caplog) -> None:
    apply = Strictly()
    value = LastGood("test: number refused, the last one stays", apply, initial="nothing yet")
    assert value.value == "nothing yet" and not value.refused
    caplog.set_level(logging.WARNING, logger="engine.scenes.base")
    for n in (2, 2, 2, 3, 3, 3, 3):  # frames: each value arrives many times
        shown = value.update(n)
    assert apply.calls == [2, 3], "an unchanged input was applied again"
    assert shown == "applied 2" and value.value == "applied 2"
    assert value.refusal == "test: number refused, the last one stays: 3 is odd" and value.refused
    assert [r.getMessage() for r in caplog.records] == [value.refusal], "a refusal is said exactly once"

    assert value.update(4) == "applied 4" and value.refusal is None
    for _ in range(3):
        value.update(5)  # a new refusal after a good value: said once more
    assert [r.getMessage() for r in caplog.records][1:] == ["test: number refused, the last one stays: 5 is odd"]
    assert value.value == "applied 4" and value.refused


def test_last_good_lets_other_errors_through_and_tries_them_again() -> None:
    apply = Strictly()
    value = LastGood("test", apply)
    value.update(2)
    for _ in range(2):  # not a refusal: the worker reports it, and the next frame tries again
        with pytest.raises(RuntimeError, match="went away"):
            value.update(-2)
    assert apply.calls == [2, -2, -2] and value.value == "applied 2" and not value.refused
    value.update(2)
    assert apply.calls == [2, -2, -2]  # still the input tried last with success
    value.forget()
    value.update(2)
    assert apply.calls == [2, -2, -2, 2], "forget() did not let the same input through again"


# -- end to end: a pip-installed plugin in a running show ------------------------------------------------


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return json.loads(reply.read())
    except OSError:
        return None


def wait_for(condition, timeout: float = 240.0):  # a loaded CI machine starts a show slowly
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    return None


def oscquery_node(tree: dict[str, Any], path: str) -> dict[str, Any] | None:
    node: dict[str, Any] | None = tree
    for part in path.strip("/").split("/"):
        node = (node or {}).get("CONTENTS", {}).get(part)
    return node


@pytest.fixture(scope="module")
def installed_plugins(tmp_path_factory) -> Path:
    """tests/plugins/* installed by pip into a folder of their own (copies: pip builds in the tree)."""
    # --no-build-isolation builds with this environment's setuptools (no index needed)
    assert importlib.util.find_spec("setuptools") is not None, (
        "building the test plugins needs setuptools: pip install 'setuptools>=68'"
    )
    work = tmp_path_factory.mktemp("plugin-build")
    target = tmp_path_factory.mktemp("plugin-site")
    for package in ("dreamdeck-scene-example", "dreamdeck-scene-broken"):
        source = shutil.copytree(PLUGINS / package, work / package)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-index",
                "--no-deps",
                "--no-build-isolation",
                "--target",
                str(target),
                str(source),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    assert (target / "dreamdeck_scene_example").is_dir() and list(target.glob("dreamdeck_scene_example-*.dist-info"))
    return target


def test_a_pip_installed_plugin_plays_in_oscquery_presets_and_the_web_page(installed_plugins, tmp_path) -> None:
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "bands.toml").write_text(
        '[preset]\ndescription = "the example plugin"\n\n[scene]\nactive = "bands"\n\n'
        "[scene.bands]\ncount = 5\ntint = [0.2, 0.9, 0.4]\n"
    )
    osc_port, query_port, status_port = free_port(socket.SOCK_DGRAM), free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": f"{installed_plugins}{os.pathsep}{ROOT}", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine",
            "--no-log-file",
            "run",
            "--headless",
            "--fresh",
            "--no-midi",
            "--source",
            "pattern",
            "--presets-dir",
            str(presets),
            "--preset",
            "bands",
            "--osc-port",
            str(osc_port),
            "--oscquery-port",
            str(query_port),
            "--status-port",
            str(status_port),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        status = f"http://127.0.0.1:{status_port}"
        # the preset validated and applied: the plugin scene plays, with the preset's values
        health = wait_for(
            lambda: (lambda h: h if h and h.get("scene") == "bands" and h["scene_fps"] > 0 else None)(
                get_json(f"{status}/health")
            )
        )
        assert health is not None, f"the plugin scene never played: {get_json(f'{status}/health')}"
        assert health["preset"] == "bands" and not health["errors"], health
        listed = get_json(f"{status}/api/presets")["presets"]
        assert [(p["name"], p["ok"]) for p in listed] == [("bands", True)], listed
        # the web page's parameter listing
        records = {r["path"]: r for r in get_json(f"{status}/api/params")}
        assert records["/scene/bands/count"]["value"] == 5 and records["/scene/bands/count"]["max"] == 64
        assert records["/scene/bands/tint"]["value"] == [0.2, 0.9, 0.4, 1.0]
        assert records["/scene/active"]["choices"] == [*installed_builtins(), "bands"]
        # OSCQuery's whole tree, as TouchDesigner or Chataigne reads it
        tree = wait_for(lambda: get_json(f"http://127.0.0.1:{query_port}/"))
        assert tree is not None, "no OSCQuery tree"
        count = oscquery_node(tree, "/dreamdeck/scene/bands/count")
        assert count is not None, sorted(oscquery_node(tree, "/dreamdeck/scene")["CONTENTS"])
        assert count["FULL_PATH"] == "/dreamdeck/scene/bands/count" and count["TYPE"] == "i"
        assert count["VALUE"] == [5] and count["RANGE"] == [{"MIN": 1, "MAX": 64}]
        assert "How many bands" in count["DESCRIPTION"]
        assert oscquery_node(tree, "/dreamdeck/scene/bands/tint") is not None
        assert oscquery_node(tree, "/dreamdeck/scene/active")["RANGE"] == [{"VALS": [*installed_builtins(), "bands"]}]
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    # each broken plugin installed beside it is one line in the log, and the show played on
    left_out = [line for line in err.splitlines() if "scene plugin" in line]
    assert len(left_out) == 3, left_out
    for name, why in (
        ("needs_missing", "No module named 'dreamdeck_no_such_module'"),
        ("not_a_scene", "not a subclass"),
        ("passthrough", "the name is taken"),
    ):
        assert sum(f"scene plugin {name!r}" in line and why in line for line in left_out) == 1, left_out
    assert "Traceback" not in err, err[-3000:]
