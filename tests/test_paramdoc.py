"""`dreamdeck params`: the address space written out from the registry itself."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from engine.catalog import build_registry
from engine.control.actions import ACTIONS
from engine.paramdoc import params_json, params_markdown, params_text


def test_markdown_lists_every_parameter_and_action():
    registry = build_registry()
    text = params_markdown(registry)
    for p in registry.params():
        assert f"| `{p.path}` | {p.kind.value} |" in text
    for name in ACTIONS:
        assert f"`/dreamdeck/{name}`" in text
    # enum choices are escaped so the Markdown table keeps its columns
    row = next(line for line in text.splitlines() if line.startswith("| `/layer/scene/blend`"))
    assert row.count(" | ") == 5
    # so are '|' in defaults and descriptions (the weighted prompt syntax): every row has six cells
    for line in text.splitlines():
        if line.startswith("| `/"):
            assert len(re.findall(r"(?<!\\)\|", line)) == 7, line


def test_json_round_trips_ranges_and_defaults():
    registry = build_registry()
    records = {r["path"]: r for r in json.loads(params_json(registry))}
    assert set(records) == {p.path for p in registry.params()}
    seg = records["/fx/kaleido/segments"]
    assert (seg["kind"], seg["min"], seg["max"], seg["osc"]) == ("int", 1, 32, "/dreamdeck/fx/kaleido/segments")
    assert records["/hud/visible"]["in_presets"] is False


def test_text_table_has_one_line_per_parameter():
    registry = build_registry()
    assert len(params_text(registry).splitlines()) == len(registry.params())


def test_cli_params_markdown():
    out = subprocess.run([sys.executable, "-m", "engine", "params", "--markdown"], capture_output=True, text=True)
    assert out.returncode == 0 and "/fx/kaleido/segments" in out.stdout


def test_readme_address_space_is_generated_from_the_registry():
    from pathlib import Path

    from engine.paramdoc import readme_with_params

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert readme_with_params(readme, build_registry()) == readme, \
        "README's address space is stale: run python3 scripts/update_readme.py"
