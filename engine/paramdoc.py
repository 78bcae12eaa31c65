"""The parameter registry written out for people: a table, Markdown (README) or JSON.

``dreamdeck params --markdown`` generates the README's address-space section, so the
documentation is a view of the registry like every other one and cannot drift from it.
"""

from __future__ import annotations

import json
from typing import Any

from engine.control.actions import ACTIONS
from engine.params import Kind, Param, ParamRegistry

OSC_PREFIX = "/dreamdeck"


def _range(p: Param) -> str:
    if p.kind in (Kind.FLOAT, Kind.INT):
        return f"{p.min:g} .. {p.max:g}"
    if p.kind is Kind.ENUM:
        return " \\| ".join(p.choices)
    if p.kind is Kind.COLOUR:
        return "r g b [a] 0..1, or #rrggbb"
    return ""


def _default(p: Param) -> str:
    value = p.default
    if p.kind is Kind.TRIGGER:
        return ""
    if p.kind is Kind.COLOUR:
        return "#" + "".join(f"{round(c * 255):02x}" for c in value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return repr(value) if value == "" else value
    return str(value).lower() if isinstance(value, bool) else str(value)


def param_record(p: Param) -> dict[str, Any]:
    return {
        "path": p.path, "osc": OSC_PREFIX + p.path, "kind": p.kind.value, "min": p.min, "max": p.max,
        "choices": list(p.choices) or None, "default": None if p.kind is Kind.TRIGGER else p.default,
        "unit": p.unit or None, "smoothing_s": p.smoothing or None, "in_presets": p.in_presets,
        "description": p.description,
    }


def params_json(registry: ParamRegistry) -> str:
    return json.dumps([param_record(p) for p in registry.params()], indent=2)


def params_text(registry: ParamRegistry) -> str:
    rows = [(p.path, p.kind.value, _range(p).replace("\\|", "|"), _default(p), p.unit, p.description)
            for p in registry.params()]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(5)) + "  " + r[5] for r in rows)


def params_markdown(registry: ParamRegistry) -> str:
    lines = [
        f"Every parameter is at `{OSC_PREFIX}<path>` over OSC, and at "
        f"`{OSC_PREFIX}/norm<path>` with a 0..1 value mapped onto its range.",
        "",
        "| path | kind | range | default | unit | description |",
        "|---|---|---|---|---|---|",
    ]
    for p in registry.params():
        default, description = (text.replace("|", "\\|") for text in (_default(p), p.description))
        lines.append(f"| `{p.path}` | {p.kind.value} | {_range(p)} | {default} | {p.unit} | {description} |")
    lines += ["", "| action | OSC address | arguments |", "|---|---|---|"]
    for name, spec in ACTIONS.items():
        lines.append(f"| {name} | `{OSC_PREFIX}/{name}` | {spec.description} |")
    return "\n".join(lines)


START, END = "<!-- params:start -->", "<!-- params:end -->"


def readme_with_params(readme: str, registry: ParamRegistry) -> str:
    """The README with its address-space section regenerated (appended if it has none)."""
    block = f"{START}\n{params_markdown(registry)}\n{END}"
    if START in readme and END in readme:
        head, rest = readme.split(START, 1)
        return head + block + rest.split(END, 1)[1]
    return readme.rstrip("\n") + "\n\n## Address space\n\n" + block + "\n"
