"""The parameter registry and the actions written out for people: a table, Markdown or JSON.

``dreamdeck params`` prints these, and the documentation site's reference pages are
generated from the same functions at build time (``docs/hooks/generated.py``), so the
documentation is a view of the registry like every other one and cannot drift from it.
"""

from __future__ import annotations

import json
import textwrap
from itertools import groupby
from typing import Any

from engine.params import Kind, Param, ParamRegistry

OSC_PREFIX = "/dreamdeck"
TEXT_WIDTH = 100  # `dreamdeck params` fits a 100-column terminal
_INDENT = "    "  # description and choice lines under a row


def _number(p: Param, value: float) -> str:
    return str(int(value)) if p.kind is Kind.INT else f"{value:g}"


def _choices(p: Param) -> str:
    return ", ".join(p.choices)


def _range(p: Param) -> str:
    if p.kind in (Kind.FLOAT, Kind.INT):
        return f"{_number(p, p.min)} .. {_number(p, p.max)}"
    if p.kind is Kind.ENUM:
        return _choices(p)
    if p.kind is Kind.COLOUR:
        return "r g b [a] 0..1, or #rrggbb"
    return ""


def _default(p: Param) -> str:
    value = p.default
    if p.kind is Kind.TRIGGER:
        return ""
    if p.kind is Kind.COLOUR:
        return "#" + "".join(f"{round(c * 255):02x}" for c in value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and value == "":
        return "''"
    return str(value)


def _description(p: Param) -> str:
    return p.description + ("" if p.in_presets else " (not in presets)")


def param_record(p: Param) -> dict[str, Any]:
    return {
        "path": p.path,
        "osc": OSC_PREFIX + p.path,
        "kind": p.kind.value,
        "min": p.min,
        "max": p.max,
        "choices": list(p.choices) or None,
        "default": None if p.kind is Kind.TRIGGER else p.default,
        "unit": p.unit or None,
        "smoothing_s": p.smoothing or None,
        "in_presets": p.in_presets,
        "description": p.description,
    }


def params_json(registry: ParamRegistry) -> str:
    return json.dumps([param_record(p) for p in registry.params()], indent=2)


# ---- the terminal table --------------------------------------------------------------------


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def params_text(registry: ParamRegistry, width: int = TEXT_WIDTH) -> str:
    """One row per parameter (path, kind, range and unit, default), its description below.

    Nothing is wider than ``width``: long descriptions and choice lists wrap onto the lines
    under the row, a default too long for its column is cut with '…' and given whole below,
    and a path too long for its column gets a line of its own.
    """
    params = registry.params()
    gap = "  "
    path_w = min(max(len(p.path) for p in params), width // 2 - 8)
    kind_w = max(len(k.value) for k in Kind)
    range_w = 26
    default_w = max(8, width - path_w - kind_w - range_w - 3 * len(gap))
    body_w = width - len(_INDENT)

    def row(path: str, kind: str, span: str, default: str) -> str:
        return gap.join((path.ljust(path_w), kind.ljust(kind_w), span.ljust(range_w), default)).rstrip()

    lines = [row("path", "kind", "range", "default"), "-" * width]
    for p in params:
        span = " ".join(part for part in (_range(p), p.unit) if part)
        below: list[str] = []
        if len(span) > range_w:
            if p.kind is Kind.ENUM:  # the list goes under the row, wrapped; the column says how many
                below.append(f"choices: {_choices(p)}")
                span = f"{len(p.choices)} choices" + (f" {p.unit}" if p.unit else "")
            span = _fit(span, range_w)
        default = _default(p)
        if len(default) > default_w:
            below.append(f"default: {default}")
        cells = (p.kind.value, span, _fit(default, default_w))
        if len(p.path) > path_w:
            lines.append(p.path)
            lines.append(row("", *cells))
        else:
            lines.append(row(p.path, *cells))
        for text in [_description(p), *below]:
            lines += (
                textwrap.wrap(
                    text, body_w, initial_indent=_INDENT, subsequent_indent=_INDENT + "  ", break_on_hyphens=False
                )
                if text
                else []
            )
    return "\n".join(lines)


# ---- Markdown (the documentation site) -----------------------------------------------------


def _cell(text: str) -> str:
    """A Markdown table cell: '|' escaped, so the row keeps its columns."""
    return text.replace("|", "\\|")


PARAM_COLUMNS = ("path", "kind", "range", "default", "unit", "description")


def _params_table(params: list[Param]) -> list[str]:
    lines = ["| " + " | ".join(PARAM_COLUMNS) + " |", "|" + "---|" * len(PARAM_COLUMNS)]
    for p in params:
        cells = (f"`{p.path}`", p.kind.value, _range(p), _default(p), p.unit, _description(p))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _group(p: Param) -> str:
    return p.path.split("/")[1]


def params_markdown(registry: ParamRegistry, heading: str | None = None) -> str:
    """The parameters as a Markdown table; with ``heading`` (e.g. "##"), one table per top-level
    group (``/fx``, ``/scene`` ...) under a heading of that level."""
    lines = [
        f"Every parameter is at `{OSC_PREFIX}<path>` over OSC, and at "
        f"`{OSC_PREFIX}/norm<path>` with a 0..1 value mapped onto its range.",
        "",
    ]
    params = registry.params()
    if heading is None:
        return "\n".join(lines + _params_table(params))
    for group, members in groupby(params, key=_group):
        lines += [f"{heading} /{group}", "", *_params_table(list(members)), ""]
    return "\n".join(lines).rstrip("\n")


def action_records() -> list[dict[str, Any]]:
    """Every action that keys, OSC, MIDI and the web page can post, as plain records.

    The one place that reads ``engine.control.actions``: every view below follows it.
    """
    from engine.control.actions import ACTIONS

    return [
        {"name": name, "osc": f"{OSC_PREFIX}/{name}", "arguments": spec.signature, "description": spec.description}
        for name, spec in ACTIONS.items()
    ]


ACTION_COLUMNS = ("action", "OSC address", "arguments", "description")


def actions_markdown() -> str:
    lines = ["| " + " | ".join(ACTION_COLUMNS) + " |", "|" + "---|" * len(ACTION_COLUMNS)]
    for record in action_records():
        cells = (f"`{record['name']}`", f"`{record['osc']}`", f"`{record['arguments']}`", record["description"])
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)
