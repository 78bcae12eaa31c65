"""Presets: TOML files that hold a look, as values of the parameter registry.

A preset file mirrors parameter paths as nested tables, so that a performer can read
and edit it by hand::

    [preset]
    description = "slow purple tunnel"

    [fx.kaleido]
    segments = 6            # /fx/kaleido/segments

    [mix]
    tint = [0.5, 0.2, 0.9, 1.0]

A preset file is untrusted input: it is validated completely against the registry
before anything is applied, every mistake in it is reported at once (file, key and
reason), and a refused preset changes nothing. Recall is deterministic: a parameter that
a preset does not mention goes back to its default, so recalling a preset always gives
the same picture whatever was playing before. Saving is atomic, so a crash or power
cut mid-save never leaves a half-written preset where a good one was.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from engine.files import write_atomic
from engine.params import Kind, Param, ParamError, ParamRegistry

log = logging.getLogger(__name__)

META_TABLE = "preset"  # the reserved top-level table for the preset's own fields
META_FIELDS = {"description": str}
SUFFIX = ".toml"
_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
_TOML_POSITION_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)")


class PresetError(ValueError):
    """A preset that cannot be loaded, saved or found.

    ``errors`` holds one line per problem (``file: key: reason``); the message is the
    first of them, so a HUD can show one line and a log can show them all.
    """

    def __init__(self, errors: list[str] | str) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        message = self.errors[0]
        if len(self.errors) > 1:
            message += f" (and {len(self.errors) - 1} more)"
        super().__init__(message)


@dataclass(frozen=True)
class Preset:
    """A validated preset: ``values`` maps parameter paths to coerced values."""

    name: str
    path: Path
    description: str
    values: dict[str, Any]


@dataclass(frozen=True)
class PresetEntry:
    """One file of a library; ``error`` is why it cannot be loaded (None when it can)."""

    name: str
    path: Path
    error: str | None


def is_presettable(param: Param) -> bool:
    """Triggers are moments, not state, and engine-room values opt out with in_presets."""
    return param.kind is not Kind.TRIGGER and getattr(param, "in_presets", True)


# -- loading -------------------------------------------------------------------------


def load_preset(path: str | os.PathLike[str], registry: ParamRegistry) -> Preset:
    """Read and validate a preset file; raise PresetError listing every problem in it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PresetError(f"{path}: cannot read: {exc}") from exc
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(_syntax_error(path, exc)) from exc

    errors: list[str] = []
    description = _read_meta(path, document.pop(META_TABLE, {}), errors)
    values: dict[str, Any] = {}
    params = {p.path: p for p in registry.params()}
    groups = {p.path[:i] for p in params.values() for i in _slash_positions(p.path)}
    _walk(path, document, [], params, groups, values, errors)
    if errors:
        raise PresetError(errors)
    return Preset(path.stem, path, description, values)


def _syntax_error(path: Path, exc: tomllib.TOMLDecodeError) -> str:
    """``file:line:column: TOML syntax error: reason`` - the form editors jump to."""
    message = str(exc)
    match = _TOML_POSITION_RE.search(message)
    if match is None:
        return f"{path}: TOML syntax error: {message}"
    reason = _TOML_POSITION_RE.sub("", message)
    return f"{path}:{match[1]}:{match[2]}: TOML syntax error: {reason}"


def _slash_positions(path: str) -> list[int]:
    return [i for i, ch in enumerate(path) if ch == "/" and i > 0]


def _read_meta(path: Path, meta: Any, errors: list[str]) -> str:
    if not isinstance(meta, dict):
        errors.append(f"{path}: {META_TABLE}: must be a table ([{META_TABLE}]), got {_toml_type(meta)}")
        return ""
    for key, value in meta.items():
        expected = META_FIELDS.get(key)
        if expected is None:
            known = ", ".join(META_FIELDS)
            errors.append(f"{path}: {META_TABLE}.{key}: unknown [{META_TABLE}] field (known: {known})")
        elif not isinstance(value, expected):
            errors.append(f"{path}: {META_TABLE}.{key}: expected text, got {_toml_type(value)}")
    description = meta.get("description", "")
    return description if isinstance(description, str) else ""


def _walk(
    path: Path,
    table: dict[str, Any],
    parts: list[str],
    params: dict[str, Param],
    groups: set[str],
    values: dict[str, Any],
    errors: list[str],
) -> None:
    """Match one TOML table against the registry's tree, collecting values and errors."""
    for key, value in table.items():
        keys = [*parts, key]
        dotted = ".".join(keys)
        # a key holding "/" would otherwise pass for a deeper path than its table says
        param_path = "/" + "/".join(keys) if key and "/" not in key else None
        param = params.get(param_path) if param_path else None
        if param is not None:
            if isinstance(value, dict):
                reason: str | None = f"is a value ({param.kind.value}), not a table"
            elif not is_presettable(param):
                reason = f"is a {param.kind.value} parameter; presets do not hold it"
            else:
                coerced, reason = _coerce(param, value)
                if reason is None:
                    values[param.path] = coerced
                    continue
        elif param_path in groups:
            if isinstance(value, dict):
                _walk(path, value, keys, params, groups, values, errors)
                continue
            reason = f"is a group of parameters (a table like [{dotted}]), not a value"
        else:
            reason = "unknown parameter" + _suggestion(dotted, params)
        errors.append(f"{path}: {dotted}: {reason}")


def _coerce(param: Param, value: Any) -> tuple[Any, str | None]:
    """The registry's coercion, stricter about TOML types.

    The registry is lenient for live input (a fader sends 63.0 to an int, OSC sends 1 for
    true). A file is written with intent, so ``segments = true`` or ``segments = 6.5``
    is a mistake to report, and an enum must be named: an index would silently mean
    another choice when the list grows (the scene list grows with plugins).
    """
    kind = param.kind
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind in (Kind.FLOAT, Kind.INT) and not is_number:
        return None, f"expected a number, got {_toml_type(value)}"
    if kind is Kind.INT and isinstance(value, float) and not value.is_integer():
        return None, f"expected a whole number, got {value!r}"
    if kind is Kind.BOOL and not isinstance(value, bool):
        return None, f"expected true or false, got {_toml_type(value)}"
    if kind is Kind.ENUM and not isinstance(value, str):
        return None, f"expected one of {', '.join(param.choices)} (as text), got {_toml_type(value)}"
    try:
        return param.coerce(value), None
    except ParamError as exc:
        return None, str(exc).removeprefix(f"{param.path}: ")


def _suggestion(dotted: str, params: dict[str, Param]) -> str:
    names = [p.path[1:].replace("/", ".") for p in params.values() if is_presettable(p)]
    close = difflib.get_close_matches(dotted, names, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _toml_type(value: Any) -> str:
    names = {bool: "true/false", int: "an integer", float: "a float", str: "text", list: "an array", dict: "a table"}
    name = names.get(type(value), type(value).__name__)
    return name if isinstance(value, dict) else f"{name} {value!r:.40}"


# -- recalling -------------------------------------------------------------------------


def recall_values(preset: Preset, registry: ParamRegistry) -> dict[str, Any]:
    """Every presettable value to apply: the preset's, and defaults for the rest.

    Apply the result with ``registry.set_many(values, origin="preset")``: it is all or
    nothing, so a preset that no longer fits the registry changes nothing.
    """
    params = [p for p in registry.params() if is_presettable(p)]
    stale = sorted(set(preset.values) - {p.path for p in params})
    if stale:
        raise PresetError(
            [f"{preset.path}: {path[1:].replace('/', '.')}: parameter no longer exists" for path in stale]
        )
    return {p.path: preset.values.get(p.path, p.default) for p in params}


# -- saving ----------------------------------------------------------------------------


def save_preset(path: str | os.PathLike[str], registry: ParamRegistry, description: str = "") -> Path:
    """Write the registry's target values of every presettable parameter, atomically.

    Target, not current: a smoothed fader halfway through a glide is saved where it is
    heading. Colours are written as arrays of floats, which round-trip exactly.
    """
    path = Path(path)
    document: dict[str, Any] = {META_TABLE: {"description": description}}
    for param in registry.params():
        if not is_presettable(param):
            continue
        *groups, name = param.path[1:].split("/")
        if (groups or [name])[0] == META_TABLE:
            raise PresetError(f"{path}: {param.path}: the top-level name {META_TABLE!r} is reserved")
        table = document
        for group in groups:
            table = table.setdefault(group, {})
        value = registry.target(param.path)
        table[name] = list(value) if param.kind is Kind.COLOUR else value
    data = tomli_w.dumps(document).encode("utf-8")
    write_atomic(path, data)
    log.info("saved preset %s", path)
    return path


# -- a folder of presets ----------------------------------------------------------------


class PresetLibrary:
    """The presets in one folder, by name (the file stem) or by 1-based index.

    Indexes follow the sorted names, so keys 1-9 on a controller recall the first nine.
    Files are read on every call: a preset edited by hand during a show is picked up.
    """

    def __init__(self, directory: str | os.PathLike[str], registry: ParamRegistry) -> None:
        self.directory = Path(directory)
        self.registry = registry

    def paths(self) -> list[Path]:
        """Preset files, sorted by name; hidden files (in-progress saves) are skipped."""
        if not self.directory.is_dir():
            return []
        files = [p for p in self.directory.glob(f"*{SUFFIX}") if p.is_file() and not p.name.startswith(".")]
        return sorted(files, key=lambda p: (p.stem.casefold(), p.stem))

    def entries(self) -> list[PresetEntry]:
        entries = []
        for path in self.paths():
            try:
                load_preset(path, self.registry)
                error = None
            except PresetError as exc:
                error = str(exc)
            entries.append(PresetEntry(path.stem, path, error))
        return entries

    def load(self, name_or_index: str | int) -> Preset:
        """Load by name, or by 1-based index into the sorted names; raise PresetError."""
        paths = self.paths()
        if isinstance(name_or_index, int) and not isinstance(name_or_index, bool):
            if not 1 <= name_or_index <= len(paths):
                raise PresetError(
                    f"{self.directory}: no preset number {name_or_index}: there are {len(paths)} (numbered from 1)"
                )
            return load_preset(paths[name_or_index - 1], self.registry)
        name = self._check_name(name_or_index)
        path = self.directory / f"{name}{SUFFIX}"
        if path not in paths:
            have = ", ".join(p.stem for p in paths) or "none"
            raise PresetError(f"{path}: no preset named {name!r} (have: {have})")
        return load_preset(path, self.registry)

    def save(self, name: str, description: str = "") -> Path:
        name = self._check_name(name)
        self.directory.mkdir(parents=True, exist_ok=True)
        return save_preset(self.directory / f"{name}{SUFFIX}", self.registry, description)

    def _check_name(self, name: Any) -> str:
        # the name becomes a file name: no folders, dots or spaces sneak in from OSC or the web page
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise PresetError(f"{self.directory}: bad preset name {name!r:.40}: use letters, digits, - and _ only")
        return name
