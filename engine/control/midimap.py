"""MIDI mappings: which control drives which parameter, and the file they live in.

A mapping file is TOML, written by MIDI learn and meant to be read and edited by hand::

    version = 1

    [[map]]
    port = "nanoKONTROL"           # part of the port name (any case), or "*" for every port
    channel = 1                    # 1..16
    type = "cc"                    # cc | cc14 | note | pitchbend | program
    number = 16                    # 0..127; cc14: the MSB controller 0..31 (its LSB is number + 32);
                                   # pitchbend and program have no number
    param = "/fx/kaleido/segments"
    mode = "absolute"              # absolute | relative-signed | relative-binary-offset |
                                   # relative-twos-complement | trigger | toggle | momentary
    takeover = "pickup"            # absolute only: pickup (default) | jump
    step = 0.01                    # relative only, optional: 0..1 units per encoder tick
    value = "ddpm"                 # trigger only, optional: the value a press sets (a pad per
                                   # scene: param = "/scene/active", value = "ddpm")

    [[map]]                        # a button (note or cc) that posts an action instead:
    port = "nanoKONTROL"
    channel = 1
    type = "note"
    number = 41
    action = "preset/recall"       # an action of engine.control.actions.ACTIONS, instead of param
    args = [3]                     # its arguments, checked against its declaration when the file loads

This module is pure: no ports, no threads. It parses and validates entries (a file is
untrusted input: each bad entry is skipped with a reason, the rest still load), writes
the file atomically, decodes relative encoders and guesses a mapping from the messages
a performer sends while MIDI learn is armed.
"""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import tomli_w

from engine.control.actions import ACTIONS, ActionError, ActionSpec
from engine.files import write_atomic
from engine.params import Kind, Param, ParamError, ParamRegistry

log = logging.getLogger(__name__)

FILE_VERSION = 1
ANY_PORT = "*"
FILE_HEADER = (
    "# dreamdeck MIDI mappings, written by MIDI learn; edit freely while dreamdeck is stopped.\n"
    "# Keys of each [[map]]: port, channel (1-16), type (cc, cc14, note, pitchbend, program),\n"
    "# number, param (or action and args), mode, takeover (pickup, jump), step.\n"
    "# See engine/control/midimap.py.\n\n"
)


class MapType(str, Enum):
    CC = "cc"
    CC14 = "cc14"  # MSB on controller n (0..31), LSB on n + 32
    NOTE = "note"
    PITCHBEND = "pitchbend"  # 14-bit, one per channel: motor faders on Mackie-style surfaces
    PROGRAM = "program"  # the program number picks an enum choice or an int value


class Mode(str, Enum):
    ABSOLUTE = "absolute"
    RELATIVE_SIGNED = "relative-signed"  # bit 6 is the sign: 1 = +1, 65 = -1
    RELATIVE_BINARY_OFFSET = "relative-binary-offset"  # 64 is zero: 65 = +1, 63 = -1
    RELATIVE_TWOS_COMPLEMENT = "relative-twos-complement"  # 7-bit two's complement: 1 = +1, 127 = -1
    TRIGGER = "trigger"  # a press fires a trigger, sets a bool, or sets a number from the velocity
    TOGGLE = "toggle"  # each press flips a bool (a number flips between its minimum and the velocity)
    MOMENTARY = "momentary"  # press = true / velocity, release = false / minimum

    @property
    def is_relative(self) -> bool:
        return self.value.startswith("relative-")

    @property
    def is_button(self) -> bool:
        return self in (Mode.TRIGGER, Mode.TOGGLE, Mode.MOMENTARY)


class Takeover(str, Enum):
    PICKUP = "pickup"  # ignore a fader until it reaches the value (no jumps after OSC or a preset)
    JUMP = "jump"  # the fader always wins


_MODES_FOR_TYPE = {
    MapType.CC: frozenset(Mode),
    MapType.CC14: frozenset({Mode.ABSOLUTE}),
    MapType.PITCHBEND: frozenset({Mode.ABSOLUTE}),
    MapType.PROGRAM: frozenset({Mode.ABSOLUTE}),
    MapType.NOTE: frozenset({Mode.TRIGGER, Mode.TOGGLE, Mode.MOMENTARY}),
}
_NUMBERED = frozenset({MapType.CC, MapType.CC14, MapType.NOTE})
_KEYS = frozenset({"port", "channel", "type", "number", "param", "mode", "takeover", "step", "value", "action", "args"})
MAPPABLE_KINDS = frozenset({Kind.FLOAT, Kind.INT, Kind.BOOL, Kind.ENUM, Kind.TRIGGER})


class MappingError(ValueError):
    """A mapping entry that cannot be used; the message says which key and why."""


@dataclass(frozen=True)
class Mapping:
    """One control driving one parameter. ``channel`` is 1..16, as a performer counts."""

    port: str
    channel: int
    type: MapType
    number: int  # 0 for pitchbend and program
    param: str
    mode: Mode
    takeover: Takeover = Takeover.PICKUP
    step: float | None = None  # relative modes: 0..1 units per tick; None: one step of the parameter
    value: Any = None  # trigger mode: the value a press sets; None: the velocity's value
    action: str | None = None  # a button that posts this action (``param`` is then "")
    args: tuple[Any, ...] = ()  # ...with these arguments, as its declaration bound them

    @property
    def control(self) -> tuple[str, int, MapType, int]:
        """What identifies the physical control: learn replaces a mapping with the same one."""
        return self.port.casefold(), self.channel, self.type, self.number

    def matches_port(self, port_name: str) -> bool:
        return self.port == ANY_PORT or self.port.casefold() in port_name.casefold()

    def describe(self) -> str:
        number = f" {self.number}" if self.type in _NUMBERED else ""
        target = self.param if self.action is None else " ".join(["action", self.action, *map(str, self.args)])
        return f"{self.type.value}{number} ch{self.channel} ({self.port}) -> {target} [{self.mode.value}]"

    def to_toml(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"port": self.port, "channel": self.channel, "type": self.type.value}
        if self.type in _NUMBERED:
            entry["number"] = self.number
        if self.action is not None:
            entry["action"] = self.action
            if self.args:
                entry["args"] = list(self.args)
            return entry
        entry["param"] = self.param
        entry["mode"] = self.mode.value
        if self.mode is Mode.ABSOLUTE and self.type is not MapType.PROGRAM:
            entry["takeover"] = self.takeover.value
        if self.step is not None:
            entry["step"] = self.step
        if self.value is not None:
            entry["value"] = self.value
        return entry


def default_mode(type_: MapType, param: Param) -> Mode:
    """The mode a mapping gets when its entry (or MIDI learn) does not name one."""
    if param.kind is Kind.TRIGGER:
        return Mode.TRIGGER
    if type_ is MapType.NOTE:
        return Mode.TOGGLE if param.kind is Kind.BOOL else Mode.MOMENTARY
    return Mode.ABSOLUTE


def parse_mapping(entry: Any, registry: ParamRegistry, actions: dict[str, ActionSpec] | None = None) -> Mapping:
    """Validate one ``[[map]]`` table against the schema and the registry (or, for an action,
    against its declaration in ``actions``, by default ACTIONS); raise MappingError."""
    if not isinstance(entry, dict):
        raise MappingError(f"expected a table, got {type(entry).__name__}")
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise MappingError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")

    port = _require(entry, "port", str)
    if not port.strip():
        raise MappingError('port: must name part of a port, or be "*"')
    channel = _require(entry, "channel", int)
    if not 1 <= channel <= 16:
        raise MappingError(f"channel: {channel} is out of range 1..16")
    type_ = _choice(entry, "type", MapType, None)

    if type_ in _NUMBERED:
        number = _require(entry, "number", int)
        highest = 31 if type_ is MapType.CC14 else 127
        if not 0 <= number <= highest:
            raise MappingError(f"number: {number} is out of range 0..{highest} for {type_.value}")
    elif "number" in entry:
        raise MappingError(f"number: a {type_.value} mapping has no number")
    else:
        number = 0

    if "action" in entry:
        return _action_mapping(entry, port, channel, type_, number, ACTIONS if actions is None else actions)
    if "args" in entry:
        raise MappingError("args: only an action mapping takes args")
    path = _require(entry, "param", str)
    if path not in registry:
        raise MappingError(f"param: unknown parameter {path!r}")
    param = registry.param(path)
    if param.kind not in MAPPABLE_KINDS:
        raise MappingError(f"param: {path} is a {param.kind.value} parameter; MIDI cannot drive it")
    if type_ is MapType.PROGRAM and param.kind not in (Kind.ENUM, Kind.INT):
        raise MappingError(f"param: a program mapping needs an enum or int parameter, {path} is {param.kind.value}")

    mode = _choice(entry, "mode", Mode, default_mode(type_, param))
    if mode not in _MODES_FOR_TYPE[type_]:
        allowed = ", ".join(sorted(m.value for m in _MODES_FOR_TYPE[type_]))
        raise MappingError(f"mode: {mode.value} does not work with {type_.value} (use {allowed})")
    if param.kind is Kind.TRIGGER and not mode.is_button:
        raise MappingError(f"mode: {path} is a trigger; use trigger, toggle or momentary")
    takeover = _choice(entry, "takeover", Takeover, Takeover.PICKUP)

    step = entry.get("step")
    if step is not None:
        if not mode.is_relative:
            raise MappingError("step: only relative modes take a step")
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 1:
            raise MappingError(f"step: expected a number in (0, 1], got {step!r:.40}")
        step = float(step)
    value = entry.get("value")
    if value is not None:
        if mode is not Mode.TRIGGER or param.kind is Kind.TRIGGER:
            raise MappingError("value: only a trigger mapping of a non-trigger parameter takes a value")
        try:
            value = param.coerce(value)
        except (ParamError, TypeError, ValueError) as exc:
            raise MappingError(f"value: {exc}") from None
    return Mapping(port, channel, type_, number, path, mode, takeover, step, value)


def _action_mapping(
    entry: dict[str, Any], port: str, channel: int, type_: MapType, number: int, actions: dict[str, ActionSpec]
) -> Mapping:
    """A button that posts an action: its arguments are bound by the action's declaration now, so
    a wrong one is refused with the signature when the file loads, not when the button is hit."""
    for key in ("param", "takeover", "step", "value"):
        if key in entry:
            raise MappingError(f"{key}: an action mapping has no {key}")
    if type_ not in (MapType.NOTE, MapType.CC):
        raise MappingError(f"type: an action is fired by a note or a cc button, not {type_.value}")
    name = _require(entry, "action", str)
    spec = actions.get(name)
    if spec is None:
        raise MappingError(f"action: unknown action {name!r:.60} (actions: {', '.join(sorted(actions))})")
    mode = _choice(entry, "mode", Mode, Mode.TRIGGER)
    if mode is not Mode.TRIGGER:
        raise MappingError("mode: an action mapping fires on a press (trigger)")
    args = entry.get("args", [])
    if not isinstance(args, list):
        raise MappingError(f"args: expected a list of the action's arguments, got {args!r:.40}")
    try:
        bound = spec.bind(args)
    except ActionError as exc:
        raise MappingError(f"args: {exc}") from None
    return Mapping(port, channel, type_, number, "", mode, action=name, args=bound)


def _require(entry: dict[str, Any], key: str, expected: type) -> Any:
    if key not in entry:
        raise MappingError(f"{key}: missing")
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, expected):
        raise MappingError(f"{key}: expected {'an integer' if expected is int else 'text'}, got {value!r:.40}")
    return value


def _choice(entry: dict[str, Any], key: str, enum: type[Enum], default: Any) -> Any:
    if key not in entry:
        if default is None:
            raise MappingError(f"{key}: missing")
        return default
    try:
        return enum(entry[key])
    except ValueError:
        allowed = ", ".join(e.value for e in enum)
        raise MappingError(f"{key}: {entry[key]!r:.40} is not one of {allowed}") from None


# -- the file -----------------------------------------------------------------------------


@dataclass
class MappingFile:
    """What a mapping file holds: the usable mappings and, verbatim, the entries that are not.

    Entries that cannot be used now (a typo, or a parameter of a scene plugin this build
    lacks) are written back unchanged when learn saves, so a learn never destroys what a
    performer wrote by hand. ``writable`` is False when the file exists but cannot be parsed:
    saving over it would throw the whole file away.
    """

    path: Path
    mappings: list[Mapping]
    kept: list[Any]
    writable: bool = True


def load_mappings(path: Path, registry: ParamRegistry, actions: dict[str, ActionSpec] | None = None) -> MappingFile:
    """Read and validate a mapping file; one warning per entry that is skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return MappingFile(path, [], [])
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("%s: cannot read MIDI mappings (%s); learn will not overwrite it", path, exc)
        return MappingFile(path, [], [], writable=False)
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        log.warning("%s: TOML syntax error, no MIDI mappings loaded (%s); learn will not overwrite it", path, exc)
        return MappingFile(path, [], [], writable=False)

    for key in sorted(set(document) - {"version", "map"}):
        log.warning("%s: unknown top-level key %r ignored", path, key)
    if document.get("version", FILE_VERSION) != FILE_VERSION:
        log.warning("%s: version %r; reading it as version %d", path, document["version"], FILE_VERSION)
    entries = document.get("map", [])
    if not isinstance(entries, list):
        log.warning("%s: map must be an array of tables ([[map]]); no MIDI mappings loaded", path)
        return MappingFile(path, [], [], writable=False)

    result = MappingFile(path, [], [])
    seen: set[Mapping] = set()
    for index, entry in enumerate(entries, start=1):
        try:
            mapping = parse_mapping(entry, registry, actions)
            if mapping in seen:
                raise MappingError("the same mapping appears twice")
        except MappingError as exc:
            log.warning("%s: map #%d: %s; skipped", path, index, exc)
            result.kept.append(entry)
            continue
        seen.add(mapping)
        result.mappings.append(mapping)
    return result


def default_mappings_path() -> Path:
    """``$XDG_CONFIG_HOME/dreamdeck/midi.toml``, else ``~/.config/dreamdeck/midi.toml``."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "dreamdeck" / "midi.toml"


def save_mappings(file: MappingFile) -> None:
    """Write the file atomically (temp file, fsync, rename): a crash leaves the old one whole."""
    if not file.writable:
        raise OSError(f"{file.path} could not be read at start; not overwriting it")
    document = {"version": FILE_VERSION, "map": [m.to_toml() for m in file.mappings] + list(file.kept)}
    file.path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(file.path, (FILE_HEADER + tomli_w.dumps(document)).encode("utf-8"))


# -- decoding -------------------------------------------------------------------------------


def relative_ticks(value: int, mode: Mode) -> int:
    """Encoder ticks (signed) in one relative CC value; an encoder turned fast sends more."""
    if mode is Mode.RELATIVE_SIGNED:
        return -(value & 0x3F) if value & 0x40 else value & 0x3F
    if mode is Mode.RELATIVE_BINARY_OFFSET:
        return value - 64
    if mode is Mode.RELATIVE_TWOS_COMPLEMENT:
        return value - 128 if value >= 64 else value
    raise ValueError(f"{mode.value} is not a relative mode")


def default_step(param: Param) -> float:
    """One encoder tick in 0..1 units: one value of an int (at most 1/127 of a wide range),
    one enum choice, a whole bool, 1/127 of a float's range."""
    if param.kind is Kind.INT and param.max > param.min:
        return max(1.0 / (param.max - param.min), 1.0 / 127)
    if param.kind is Kind.ENUM:
        return 1.0 / max(1, len(param.choices) - 1)
    if param.kind is Kind.BOOL:
        return 1.0
    return 1.0 / 127


def half_step(param: Param) -> float:
    """Half of one distinct value in 0..1 units (0 for a float): pick-up tolerance for coarse values."""
    if param.kind is Kind.INT and param.max > param.min:
        return 0.5 / (param.max - param.min)
    if param.kind is Kind.ENUM:
        return 0.5 / max(1, len(param.choices) - 1)
    if param.kind is Kind.BOOL:
        return 0.5
    return 0.0


# -- learn --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LearnEvent:
    """One message seen while learn is armed (``channel`` 1..16; ``number`` 0 when none)."""

    type: MapType  # CC, NOTE, PITCHBEND or PROGRAM as it arrived (never CC14)
    channel: int
    number: int
    value: int


def guess_mapping(port: str, events: list[LearnEvent], param: Param, mode: Mode | None = None) -> Mapping:
    """The mapping the first control in ``events`` most likely wants.

    A CC n (n < 32) followed by CC n + 32 is a 14-bit pair. A CC that repeats a value is
    an encoder (an absolute knob only ever sends a new position): values around 64 are
    binary offset, values near 0 or 127 two's complement. Signed-bit encoders look like
    two's complement when turned up, so name the mode for those. Only 0 and 127 on a bool
    is a button, and it toggles.
    """
    first = events[0]
    if (
        first.type is MapType.CC
        and first.number < 32
        and any(e.type is MapType.CC and e.channel == first.channel and e.number == first.number + 32 for e in events)
    ):
        return Mapping(port, first.channel, MapType.CC14, first.number, param.path, Mode.ABSOLUTE)
    if mode is None:
        mode = default_mode(first.type, param)
        values = [e.value for e in events if (e.type, e.channel, e.number) == (first.type, first.channel, first.number)]
        if first.type is MapType.CC and param.kind is not Kind.TRIGGER:
            if len(values) > len(set(values)) and all(49 <= v <= 79 and v != 64 for v in values):
                mode = Mode.RELATIVE_BINARY_OFFSET
            elif len(values) > len(set(values)) and all(1 <= v <= 15 or 113 <= v <= 127 for v in values):
                mode = Mode.RELATIVE_TWOS_COMPLEMENT
            elif param.kind is Kind.BOOL and set(values) <= {0, 127}:
                mode = Mode.TOGGLE
    return Mapping(port, first.channel, first.type, first.number, param.path, mode)
