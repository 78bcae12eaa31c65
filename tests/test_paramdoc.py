"""`dreamdeck params`: the address space written out from the registry itself."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from engine.catalog import build_registry
from engine.control.actions import ACTIONS
from engine.paramdoc import (
    ACTION_COLUMNS,
    PARAM_COLUMNS,
    TEXT_WIDTH,
    action_records,
    actions_markdown,
    params_json,
    params_markdown,
    params_text,
)
from engine.params import ParamRegistry, enum_param, float_param, string_param

UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")


def _dreamdeck(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _table_rows(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("|")]


def _words(text: str) -> str:
    return " ".join(text.split())


def test_plain_output_fits_100_columns_and_keeps_every_description():
    registry = build_registry()
    text = _dreamdeck("params")
    lines = text.splitlines()
    too_wide = [line for line in lines if len(line) > TEXT_WIDTH]
    assert not too_wide, f"{len(too_wide)} lines wider than {TEXT_WIDTH} columns, e.g. {too_wide[0]!r}"
    starts = {line.split()[0] for line in lines if line.startswith("/")}
    assert starts == {p.path for p in registry.params()}
    flowed = _words(text)
    for p in registry.params():  # wrapped onto following lines, never cut
        assert _words(p.description) in flowed, p.path
    # the long choice list that once widened every row is wrapped under its own row, whole
    mod = registry.param("/mod/1/source")
    assert ", ".join(mod.choices) in flowed


def test_plain_table_wraps_what_does_not_fit():
    registry = ParamRegistry()
    long_path = "/scene/" + "a_very_long_scene_name_" * 3 + "/strength"
    registry.declare(float_param(long_path, 0.5, 0, 1, description="word " * 60))
    registry.declare(enum_param("/x/mode", "c0", [f"c{i}" for i in range(80)], description="many choices"))
    registry.declare(string_param("/x/prompt", "a prompt " * 20, description="a long default"))
    text = params_text(registry)
    assert max(len(line) for line in text.splitlines()) <= TEXT_WIDTH
    assert long_path in text.splitlines()  # a path too long for its column has a line of its own
    assert "80 choices" in text and _words(", ".join(f"c{i}" for i in range(80))) in _words(text)
    assert "default: " + ("a prompt " * 20).strip() in _words(text)


def test_json_parses_and_lists_every_parameter():
    registry = build_registry()
    records = {r["path"]: r for r in json.loads(_dreamdeck("params", "--json"))}
    assert set(records) == {p.path for p in registry.params()}
    seg = records["/fx/kaleido/segments"]
    assert (seg["kind"], seg["min"], seg["max"], seg["osc"]) == ("int", 1, 32, "/dreamdeck/fx/kaleido/segments")
    assert records["/hud/visible"]["in_presets"] is False
    assert records["/mod/1/source"]["choices"] == list(registry.param("/mod/1/source").choices)
    assert json.loads(params_json(registry)) == list(records.values())


def test_markdown_table_has_the_same_columns_on_every_row():
    registry = build_registry()
    rows = _table_rows(_dreamdeck("params", "--markdown"))
    assert len(rows) == 2 + len(registry.params())
    for row in rows:  # '|' in defaults and descriptions (the weighted prompt syntax) is escaped
        assert len(UNESCAPED_PIPE.findall(row)) == len(PARAM_COLUMNS) + 1, row
    for p in registry.params():
        assert any(row.startswith(f"| `{p.path}` | {p.kind.value} |") for row in rows), p.path


def test_grouped_markdown_has_a_table_per_group():
    registry = build_registry()
    text = params_markdown(registry, heading="##")
    groups = sorted({p.path.split("/")[1] for p in registry.params()})
    assert [line[3:] for line in text.splitlines() if line.startswith("## ")] == [f"/{g}" for g in groups]
    rows = _table_rows(text)
    assert len(rows) == 2 * len(groups) + len(registry.params())
    assert all(len(UNESCAPED_PIPE.findall(row)) == len(PARAM_COLUMNS) + 1 for row in rows)


def test_actions_markdown_lists_every_action():
    rows = _table_rows(actions_markdown())
    assert len(rows) == 2 + len(ACTIONS)
    assert all(len(UNESCAPED_PIPE.findall(row)) == len(ACTION_COLUMNS) + 1 for row in rows)
    assert [r["name"] for r in action_records()] == list(ACTIONS)
    for name in ACTIONS:
        assert any(f"`/dreamdeck/{name}`" in row for row in rows), name
