"""Presets: round trips, every kind of mistake, all-or-nothing recall, atomic saves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from engine import presets
from engine.params import (
    ParamRegistry,
    bool_param,
    colour_param,
    enum_param,
    float_param,
    int_param,
    string_param,
    trigger_param,
)
from engine.presets import PresetError, PresetLibrary, load_preset, recall_values, save_preset

ROOT = Path(__file__).resolve().parents[1]


def make_registry() -> ParamRegistry:
    registry = ParamRegistry()
    registry.declare_all(
        [
            float_param("/mix/crossfade", 0.0, 0.0, 1.0, smoothing=0.5),
            colour_param("/mix/tint", "#ff8000"),
            int_param("/fx/kaleido/segments", 4, 1, 32),
            bool_param("/fx/kaleido/enabled", False),
            enum_param("/fx/blend", "add", ["add", "screen", "multiply"]),
            string_param("/scene/prompt", "a forest"),
            trigger_param("/scene/reseed"),
            bool_param("/hud/visible", True, in_presets=False),
        ]
    )
    return registry


def apply(registry: ParamRegistry, values: dict) -> None:
    registry.set_many(values, origin="preset")
    registry.apply_pending(0.0)


def targets(registry: ParamRegistry) -> dict:
    return {p.path: registry.target(p.path) for p in registry.params()}


LOOK = {
    "/mix/crossfade": 0.25,
    "/mix/tint": (0.1, 0.2, 0.30000000000000004, 1.0),
    "/fx/kaleido/segments": 7,
    "/fx/kaleido/enabled": True,
    "/fx/blend": "screen",
    "/scene/prompt": 'a "quoted" city\nat night',
}


def write(tmp_path: Path, text: str, name: str = "look") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# -- round trip ------------------------------------------------------------------------


def test_save_load_recall_round_trip(tmp_path):
    registry = make_registry()
    apply(registry, LOOK)
    path = save_preset(tmp_path / "look.toml", registry, description="city at night")

    preset = load_preset(path, make_registry())
    assert preset.name == "look"
    assert preset.path == path
    assert preset.description == "city at night"
    assert preset.values == LOOK

    fresh = make_registry()
    apply(fresh, recall_values(preset, fresh))
    assert targets(fresh) == targets(registry)


def test_saved_file_mirrors_paths_as_tables_and_skips_triggers_and_engine_values(tmp_path):
    registry = make_registry()
    apply(registry, LOOK)
    path = save_preset(tmp_path / "look.toml", registry)
    text = path.read_text()
    assert "[fx.kaleido]" in text and "segments = 7" in text
    document = tomllib.loads(text)
    assert document["fx"]["kaleido"] == {"segments": 7, "enabled": True}
    assert document["mix"]["tint"] == [0.1, 0.2, 0.30000000000000004, 1.0]
    assert "reseed" not in document["scene"]
    assert "hud" not in document


def test_save_writes_the_target_of_a_gliding_fader(tmp_path):
    registry = make_registry()
    registry.set("/mix/crossfade", 0.8)
    registry.apply_pending(0.01)
    assert registry.get("/mix/crossfade") < 0.8
    preset = load_preset(save_preset(tmp_path / "glide.toml", registry), registry)
    assert preset.values["/mix/crossfade"] == 0.8


def test_recall_resets_unmentioned_values_to_defaults(tmp_path):
    registry = make_registry()
    apply(registry, {"/scene/prompt": "the sea", "/fx/blend": "multiply", "/hud/visible": False})
    path = write(
        tmp_path,
        """
        [fx.kaleido]
        segments = 12
        [mix]
        tint = "#00ff00"
    """,
    )
    values = recall_values(load_preset(path, registry), registry)
    assert values["/fx/kaleido/segments"] == 12
    assert values["/mix/tint"] == (0.0, 1.0, 0.0, 1.0)
    assert values["/scene/prompt"] == "a forest"
    assert values["/fx/blend"] == "add"
    assert "/scene/reseed" not in values and "/hud/visible" not in values
    apply(registry, values)
    assert registry.target("/hud/visible") is False  # engine-room values are the performer's, not the preset's


# -- mistakes ----------------------------------------------------------------------------

MISTAKES = [
    ("[fx.kaleido]\nsegmnets = 6\n", "fx.kaleido.segmnets", "unknown parameter (did you mean fx.kaleido.segments?)"),
    ('[fx.kaleido]\nsegments = "six"\n', "fx.kaleido.segments", "expected a number, got text 'six'"),
    ("[fx.kaleido]\nsegments = true\n", "fx.kaleido.segments", "expected a number, got true/false"),
    ("[fx.kaleido]\nsegments = 6.5\n", "fx.kaleido.segments", "expected a whole number, got 6.5"),
    ("[fx.kaleido]\nsegments = 99\n", "fx.kaleido.segments", "99 is out of range [1, 32]"),
    ('[fx.kaleido]\nenabled = "maybe"\n', "fx.kaleido.enabled", "expected true or false"),
    ('[fx]\nblend = "overlay"\n', "fx.blend", "'overlay' is not one of add, screen, multiply"),
    ("[fx]\nblend = 1\n", "fx.blend", "(as text)"),
    ("[mix]\ntint = [2.0, 0.0, 0.0]\n", "mix.tint", "colour must be 3 or 4 numbers in [0, 1]"),
    ('[mix]\ntint = "#zz0000"\n', "mix.tint", "colour text must be #rrggbb"),
    ("fx = 3\n", "fx", "is a group of parameters"),
    ("[fx.kaleido.segments]\nx = 1\n", "fx.kaleido.segments", "is a value (int), not a table"),
    ("[scene]\nreseed = true\n", "scene.reseed", "presets do not hold it"),
    ("[hud]\nvisible = false\n", "hud.visible", "presets do not hold it"),
    ('[preset]\nauthor = "me"\n', "preset.author", "unknown [preset] field"),
    ("[preset]\ndescription = 3\n", "preset.description", "expected text"),
    ('"fx/blend" = "add"\n', "fx/blend", "unknown parameter"),
]


@pytest.mark.parametrize("text, key, reason", MISTAKES, ids=[m[1] + ":" + m[2][:20] for m in MISTAKES])
def test_each_mistake_names_file_key_and_reason(tmp_path, text, key, reason):
    path = write(tmp_path, text)
    with pytest.raises(PresetError) as info:
        load_preset(path, make_registry())
    assert f"{path}: {key}: " in str(info.value)
    assert reason in str(info.value)
    assert info.value.errors == [str(info.value)]


def test_bad_toml_names_file_and_line(tmp_path):
    path = write(tmp_path, "[fx.kaleido]\nsegments = 6\nenabled = \n")
    with pytest.raises(PresetError) as info:
        load_preset(path, make_registry())
    assert str(info.value).startswith(f"{path}:3:")
    assert "TOML syntax error" in str(info.value)


def test_missing_file_is_a_preset_error(tmp_path):
    with pytest.raises(PresetError, match="cannot read"):
        load_preset(tmp_path / "nope.toml", make_registry())


def test_all_mistakes_of_a_file_are_reported(tmp_path):
    path = write(
        tmp_path,
        """
        [preset]
        author = "me"
        [fx.kaleido]
        segments = 99
        enabled = true
        [fx]
        blend = "overlay"
        [mix]
        crossfade = 0.5
    """,
    )
    with pytest.raises(PresetError) as info:
        load_preset(path, make_registry())
    assert [e.split(": ")[1] for e in info.value.errors] == ["preset.author", "fx.kaleido.segments", "fx.blend"]
    assert str(info.value).endswith("(and 2 more)")


def test_a_refused_preset_leaves_the_registry_untouched(tmp_path):
    registry = make_registry()
    apply(registry, LOOK)
    before = targets(registry)
    path = write(
        tmp_path,
        """
        [mix]
        crossfade = 1.0
        [fx.kaleido]
        segments = 0
    """,
    )
    with pytest.raises(PresetError):
        apply(registry, recall_values(load_preset(path, registry), registry))
    registry.apply_pending(0.0)
    assert targets(registry) == before


def test_recall_refuses_a_preset_that_no_longer_fits(tmp_path):
    path = write(tmp_path, "[mix]\ncrossfade = 0.5\n")
    preset = load_preset(path, make_registry())
    smaller = ParamRegistry()
    smaller.declare(int_param("/fx/kaleido/segments", 4, 1, 32))
    with pytest.raises(PresetError, match="mix.crossfade: parameter no longer exists"):
        recall_values(preset, smaller)


# -- atomic save ----------------------------------------------------------------------------

CRASHING_SAVE = """
import os, signal, sys
from engine import presets
from tests.test_presets import apply, make_registry

def die(*args):
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[2] == "fsync":  # everything written, not yet renamed over the old file
    os.fsync = die
else:  # half of the new file written
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, file):
            self.file = file
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return False
        def fileno(self):
            return self.file.fileno()
        def write(self, data):
            self.file.write(data[: len(data) // 2])
            self.file.flush()
            die()

    os.fdopen = lambda *a, **k: HalfWriter(real_fdopen(*a, **k))

registry = make_registry()
apply(registry, {"/fx/kaleido/segments": 9, "/scene/prompt": "new"})
presets.save_preset(sys.argv[1], registry, description="new")
"""


@pytest.mark.skipif(os.name != "posix", reason="needs SIGKILL")
@pytest.mark.parametrize("crash_at", ["write", "fsync"])
def test_a_save_killed_mid_write_leaves_the_old_preset_intact(tmp_path, crash_at):
    registry = make_registry()
    apply(registry, {"/fx/kaleido/segments": 3})
    path = save_preset(tmp_path / "show.toml", registry, description="old")
    old_bytes = path.read_bytes()

    result = subprocess.run(
        [sys.executable, "-c", CRASHING_SAVE, str(path), crash_at], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == -signal.SIGKILL, result.stderr

    leftovers = [p.name for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].startswith(".show.toml.")  # the crash really was mid-save
    assert path.read_bytes() == old_bytes
    preset = load_preset(path, registry)
    assert preset.description == "old" and preset.values["/fx/kaleido/segments"] == 3
    assert [(e.name, e.error) for e in PresetLibrary(tmp_path, registry).entries()] == [("show", None)]


def test_a_failed_save_removes_its_temp_file(tmp_path, monkeypatch):
    registry = make_registry()
    path = save_preset(tmp_path / "show.toml", registry)
    old_bytes = path.read_bytes()

    def refuse(*args):
        raise OSError("disk full")

    monkeypatch.setattr(presets.os, "replace", refuse)
    apply(registry, {"/fx/kaleido/segments": 9})
    with pytest.raises(OSError, match="disk full"):
        save_preset(path, registry)
    assert list(tmp_path.iterdir()) == [path]
    assert path.read_bytes() == old_bytes


def test_save_keeps_a_new_preset_readable(tmp_path):
    path = save_preset(tmp_path / "show.toml", make_registry())
    if os.name == "posix":
        assert path.stat().st_mode & 0o777 == 0o644


# -- library -----------------------------------------------------------------------------------


def test_library_lists_sorted_entries_and_indexes_from_one(tmp_path):
    registry = make_registry()
    library = PresetLibrary(tmp_path / "presets", registry)
    assert library.entries() == []
    for name, segments in [("b-tunnel", 2), ("C_storm", 3), ("a_calm", 1)]:
        apply(registry, {"/fx/kaleido/segments": segments})
        library.save(name, description=name)
    write(tmp_path / "presets", "[fx]\nblend = 'overlay'\n", name="d_broken")

    entries = library.entries()
    assert [e.name for e in entries] == ["a_calm", "b-tunnel", "C_storm", "d_broken"]
    assert [e.error is None for e in entries] == [True, True, True, False]
    assert "fx.blend" in entries[3].error and "d_broken.toml" in entries[3].error

    assert library.load(1).values["/fx/kaleido/segments"] == 1
    assert library.load(3).name == "C_storm"
    assert library.load("b-tunnel").values["/fx/kaleido/segments"] == 2
    with pytest.raises(PresetError, match="d_broken.toml: fx.blend"):
        library.load(4)


@pytest.mark.parametrize("bad", [0, 5, -1])
def test_library_refuses_unknown_indexes(tmp_path, bad):
    library = PresetLibrary(tmp_path, make_registry())
    for name in ["a", "b", "c", "d"]:
        library.save(name)
    with pytest.raises(PresetError, match=f"no preset number {bad}: there are 4"):
        library.load(bad)


def test_library_refuses_unknown_and_bad_names(tmp_path):
    library = PresetLibrary(tmp_path, make_registry())
    library.save("calm")
    with pytest.raises(PresetError, match=r"no preset named 'storm' \(have: calm\)"):
        library.load("storm")
    for bad in ["../escape", "has space", "dot.ted", "", ".hidden"]:
        with pytest.raises(PresetError, match="letters, digits, - and _ only"):
            library.save(bad)
        with pytest.raises(PresetError, match="letters, digits, - and _ only"):
            library.load(bad)
    assert [p.name for p in tmp_path.iterdir()] == ["calm.toml"]
