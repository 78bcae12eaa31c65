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

    [[map]]                        # a lighting desk's channel (engine.control.dmx), in the same file:
    type = "dmx"
    protocol = "artnet"            # optional: artnet | sacn | "*" (default: either)
    universe = 0                   # artnet 0..32767, sacn 1..63999
    channel = 10                   # 1..512
    fine = 11                      # optional: the fine channel of a 16-bit pair (channel is the coarse one)
    param = "/mix/crossfade"
    mode = "absolute"              # absolute (default) | trigger (rises through half) | preset
    takeover = "pickup"            # absolute only: pickup (default) | jump

    [[map]]                        # a channel whose value picks a preset (a "macro" channel):
    type = "dmx"
    universe = 0
    channel = 20
    mode = "preset"                # 0..width-1 recalls nothing, then each band of width values one preset
    width = 10                     # optional, default 10: 10-19 = preset 1, 20-29 = preset 2...
    presets = ["intro", "drop"]    # optional: the presets in band order (default: numbers 1, 2, ...)

MIDI and DMX share the file: each control reads the entries of its own kind, and keeps
the other kind's as they are on disk when it saves (so a MIDI learn never drops a DMX
mapping learned in the same session, nor the other way round).

This module is pure: no ports, no threads. It parses and validates entries (a file is
untrusted input: each bad entry is skipped with a reason, the rest still load), writes
the file atomically, decodes relative encoders and guesses a mapping from the messages
a performer sends while MIDI learn is armed.
"""

from __future__ import annotations

import logging
import os
import threading
import tomllib
from dataclasses import dataclass, field
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
    "# dreamdeck MIDI and DMX mappings, written by learn; edit freely while dreamdeck is stopped.\n"
    "# Keys of each [[map]]: port, channel (1-16), type (cc, cc14, note, pitchbend, program),\n"
    "# number, param (or action and args), mode, takeover (pickup, jump), step.\n"
    "# DMX entries (type = dmx): protocol, universe, channel (1-512), fine, param, mode\n"
    "# (absolute, trigger, preset), takeover, width, presets.\n"
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
PICKUP_TOLERANCE = 2 / 127  # a fader this close to the value (0..1 units) has reached it


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


# -- DMX ------------------------------------------------------------------------------------

DMX = "dmx"  # the type of a DMX entry
DMX_PROTOCOLS = ("artnet", "sacn")
DMX_UNIVERSES = {"artnet": (0, 32767), "sacn": (1, 63999)}  # Art-Net's 15-bit port-address; E1.31's range
DMX_CHANNELS = 512
DEFAULT_PRESET_WIDTH = 10
_DMX_KEYS = frozenset(
    {"type", "protocol", "universe", "channel", "fine", "param", "mode", "takeover", "width", "presets"}
)


class DmxMode(str, Enum):
    ABSOLUTE = "absolute"  # the level (8 bits, or 16 with a fine channel) sets the value over its range
    TRIGGER = "trigger"  # the level rising through half fires a trigger parameter
    PRESET = "preset"  # bands of levels recall presets (no param)


@dataclass(frozen=True)
class DmxMapping:
    """One desk channel (or coarse/fine pair) driving one parameter, or recalling presets.

    ``channel`` and ``fine`` count from 1, as a lighting desk's patch does; ``protocol``
    "*" takes the universe from either protocol.
    """

    universe: int
    channel: int
    param: str  # "" in preset mode
    mode: DmxMode = DmxMode.ABSOLUTE
    fine: int | None = None
    takeover: Takeover = Takeover.PICKUP
    protocol: str = ANY_PORT
    width: int = DEFAULT_PRESET_WIDTH  # preset mode: levels per preset
    presets: tuple[str | int, ...] = ()  # preset mode: band 1, 2... recall these (empty: numbers 1, 2...)

    @property
    def control(self) -> tuple[str, int, int]:
        """What identifies the desk channel: learn replaces a mapping of the same one."""
        return self.protocol, self.universe, self.channel

    @property
    def full(self) -> int:
        """The highest level: 255, or 65535 for a coarse/fine pair."""
        return 255 if self.fine is None else 65535

    def matches(self, protocol: str) -> bool:
        return self.protocol in (ANY_PORT, protocol)

    def level(self, data: bytes) -> int | None:
        """This mapping's level in one universe's channel data, None if the packet is too short for it."""
        if len(data) < max(self.channel, self.fine or 0):
            return None
        coarse = data[self.channel - 1]
        return coarse if self.fine is None else coarse << 8 | data[self.fine - 1]

    def preset(self, level: int) -> str | int | None:
        """The preset a level picks in preset mode (None: the band below the first, or past the list)."""
        band = level // self.width
        if band < 1:
            return None
        if not self.presets:
            return band
        return self.presets[band - 1] if band <= len(self.presets) else None

    def describe(self) -> str:
        where = f"{'dmx' if self.protocol == ANY_PORT else self.protocol} u{self.universe} ch{self.channel}"
        if self.fine is not None:
            where += f"+{self.fine}"
        target = "presets" if self.mode is DmxMode.PRESET else self.param
        return f"{where} -> {target} [{self.mode.value}]"

    def to_toml(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": DMX}
        if self.protocol != ANY_PORT:
            entry["protocol"] = self.protocol
        entry.update(universe=self.universe, channel=self.channel)
        if self.fine is not None:
            entry["fine"] = self.fine
        if self.mode is DmxMode.PRESET:
            entry["mode"] = self.mode.value
            if self.width != DEFAULT_PRESET_WIDTH:
                entry["width"] = self.width
            if self.presets:
                entry["presets"] = list(self.presets)
            return entry
        entry["param"] = self.param
        entry["mode"] = self.mode.value
        if self.mode is DmxMode.ABSOLUTE:
            entry["takeover"] = self.takeover.value
        return entry


def is_dmx_entry(entry: Any) -> bool:
    return isinstance(entry, dict) and entry.get("type") == DMX


def parse_dmx_mapping(entry: Any, registry: ParamRegistry) -> DmxMapping:
    """Validate one DMX ``[[map]]`` table against the schema and the registry; raise MappingError."""
    if not is_dmx_entry(entry):
        raise MappingError('expected a table with type = "dmx"')
    unknown = sorted(set(entry) - _DMX_KEYS)
    if unknown:
        raise MappingError(f"unknown key {unknown[0]!r} for a dmx mapping (known: {', '.join(sorted(_DMX_KEYS))})")
    protocol = entry.get("protocol", ANY_PORT)
    if protocol not in (*DMX_PROTOCOLS, ANY_PORT):
        raise MappingError(f"protocol: {protocol!r:.40} is not one of artnet, sacn, *")
    universe = _require(entry, "universe", int)
    low = min(lo for lo, _ in DMX_UNIVERSES.values()) if protocol == ANY_PORT else DMX_UNIVERSES[protocol][0]
    high = max(hi for _, hi in DMX_UNIVERSES.values()) if protocol == ANY_PORT else DMX_UNIVERSES[protocol][1]
    if not low <= universe <= high:
        raise MappingError(f"universe: {universe} is out of range {low}..{high} for {protocol}")
    channel = _dmx_channel(entry, "channel")
    fine = _dmx_channel(entry, "fine") if "fine" in entry else None
    if fine == channel:
        raise MappingError("fine: the fine channel must differ from the coarse one")
    mode = _choice(entry, "mode", DmxMode, None) if "mode" in entry else None

    if mode is DmxMode.PRESET:
        for key in ("param", "takeover", "fine"):
            if key in entry:
                raise MappingError(f"{key}: a preset mapping has no {key} (its level picks a preset)")
        width = entry.get("width", DEFAULT_PRESET_WIDTH)
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= 128:
            raise MappingError(f"width: expected levels per preset, 1..128, got {width!r:.40}")
        presets = entry.get("presets", [])
        if not isinstance(presets, list) or not all(
            isinstance(p, (str, int)) and not isinstance(p, bool) and str(p).strip() for p in presets
        ):
            raise MappingError(f"presets: expected a list of preset names or numbers, got {presets!r:.60}")
        if len(presets) > 255 // width:
            raise MappingError(f"presets: {len(presets)} presets do not fit in 255 levels of width {width}")
        return DmxMapping(universe, channel, "", mode, protocol=protocol, width=width, presets=tuple(presets))

    for key in ("width", "presets"):
        if key in entry:
            raise MappingError(f"{key}: only a preset mapping takes {key}")
    path = _require(entry, "param", str)
    if path not in registry:
        raise MappingError(f"param: unknown parameter {path!r}")
    param = registry.param(path)
    if param.kind not in MAPPABLE_KINDS:
        raise MappingError(f"param: {path} is a {param.kind.value} parameter; DMX cannot drive it")
    mode = mode or default_dmx_mode(param)
    if (param.kind is Kind.TRIGGER) != (mode is DmxMode.TRIGGER):
        raise MappingError(
            f"mode: {path} is a trigger; use mode trigger"
            if param.kind is Kind.TRIGGER
            else f"mode: trigger only fires trigger parameters, {path} is {param.kind.value}"
        )
    takeover = _choice(entry, "takeover", Takeover, Takeover.PICKUP)
    if "takeover" in entry and mode is not DmxMode.ABSOLUTE:
        raise MappingError("takeover: only an absolute mapping takes over")
    return DmxMapping(universe, channel, path, mode, fine, takeover, protocol)


def default_dmx_mode(param: Param) -> DmxMode:
    return DmxMode.TRIGGER if param.kind is Kind.TRIGGER else DmxMode.ABSOLUTE


def _dmx_channel(entry: dict[str, Any], key: str) -> int:
    channel: int = _require(entry, key, int)
    if not 1 <= channel <= DMX_CHANNELS:
        raise MappingError(f"{key}: {channel} is out of range 1..{DMX_CHANNELS}")
    return channel


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
    mappings: list[Any]  # Mapping for the MIDI kind, DmxMapping for the DMX kind
    kept: list[Any]
    writable: bool = True
    kind: str = "midi"  # "midi" or "dmx": the entries this file object owns
    others: list[Any] = field(default_factory=list)  # the other kind's entries, verbatim (see save_mappings)


def load_mappings(
    path: Path, registry: ParamRegistry, actions: dict[str, ActionSpec] | None = None, kind: str = "midi"
) -> MappingFile:
    """Read and validate the ``kind`` entries of a mapping file ("midi" or "dmx"); one warning
    per entry that is skipped. The other kind's entries are kept aside, unread."""
    what = "DMX" if kind == DMX else "MIDI"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return MappingFile(path, [], [], kind=kind)
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("%s: cannot read %s mappings (%s); learn will not overwrite it", path, what, exc)
        return MappingFile(path, [], [], writable=False, kind=kind)
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        log.warning("%s: TOML syntax error, no %s mappings loaded (%s); learn will not overwrite it", path, what, exc)
        return MappingFile(path, [], [], writable=False, kind=kind)

    for key in sorted(set(document) - {"version", "map"}):
        log.warning("%s: unknown top-level key %r ignored", path, key)
    if document.get("version", FILE_VERSION) != FILE_VERSION:
        log.warning("%s: version %r; reading it as version %d", path, document["version"], FILE_VERSION)
    entries = document.get("map", [])
    if not isinstance(entries, list):
        log.warning("%s: map must be an array of tables ([[map]]); no %s mappings loaded", path, what)
        return MappingFile(path, [], [], writable=False, kind=kind)

    result = MappingFile(path, [], [], kind=kind)
    seen: set[Any] = set()
    for index, entry in enumerate(entries, start=1):
        if is_dmx_entry(entry) != (kind == DMX):
            result.others.append(entry)
            continue
        try:
            mapping = parse_dmx_mapping(entry, registry) if kind == DMX else parse_mapping(entry, registry, actions)
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


_SAVE_LOCK = threading.Lock()  # MIDI and DMX save from their own threads: one read-merge-write at a time


def save_mappings(file: MappingFile) -> None:
    """Write the file atomically (temp file, fsync, rename): a crash leaves the old one whole.

    The other kind's entries are taken from the file as it is on disk now, not as it was
    when ``file`` was loaded: MIDI and DMX learn in one session both land. A file that no
    longer parses (edited by hand meanwhile) is not overwritten.
    """
    if not file.writable:
        raise OSError(f"{file.path} could not be read at start; not overwriting it")
    with _SAVE_LOCK:
        others = _other_entries_on_disk(file)
        document = {
            "version": FILE_VERSION,
            "map": [m.to_toml() for m in file.mappings] + list(file.kept) + others,
        }
        file.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(file.path, (FILE_HEADER + tomli_w.dumps(document)).encode("utf-8"))
        file.others = others


def _other_entries_on_disk(file: MappingFile) -> list[Any]:
    try:
        document = tomllib.loads(file.path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return list(file.others)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise OSError(f"{file.path} changed on disk and cannot be read now ({exc}); not overwriting it") from None
    entries = document.get("map", [])
    if not isinstance(entries, list):
        raise OSError(f"{file.path} changed on disk: map is not an array of tables; not overwriting it")
    return [e for e in entries if is_dmx_entry(e) != (file.kind == DMX)]


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


def picks_up(before: float | None, x: float, target: float, param: Param) -> bool:
    """Soft takeover: whether a fader now at ``x`` (0..1; ``before`` where it was last, None if
    unknown) has reached the parameter's value ``target`` (0..1) and may take it over: close
    enough, or it crossed the value between two messages (a fast move jumps over it)."""
    crossed = before is not None and (before - target) * (x - target) < 0
    return crossed or abs(x - target) <= max(PICKUP_TOLERANCE, half_step(param))


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


DMX_LEARN_MODES = ("", "absolute", "16bit", "trigger", "preset")  # preset: dmx/learn_presets


def guess_dmx_mapping(protocol: str, universe: int, changed: list[int], param: Param, mode: str = "") -> DmxMapping:
    """The mapping a desk fader moved during DMX learn most likely wants.

    ``changed``: the channels whose level changed while learn looked, in the order they
    first changed. Two neighbouring channels changing together are a 16-bit pair, coarse
    first (how desks patch a 16-bit attribute); else the first channel that changed is an
    8-bit one. ``mode`` forces a reading: "16bit" pairs the lowest channel with the next,
    "absolute" takes one channel, "preset" makes a preset channel (``param`` is then unused).
    """
    if mode not in DMX_LEARN_MODES:
        raise MappingError(f"mode: {mode!r:.40} is not one of {', '.join(m or '(guess)' for m in DMX_LEARN_MODES)}")
    channels = sorted(set(changed))
    if mode == "preset":
        return DmxMapping(universe, changed[0], "", DmxMode.PRESET, protocol=protocol)
    first = changed[0]
    pairs = [c for c in channels if c + 1 in channels]
    fine: int | None = None
    if mode == "16bit" or (mode == "" and pairs and param.kind is not Kind.TRIGGER):
        coarse = pairs[0] if pairs else channels[0]
        first, fine = coarse, coarse + 1
        if fine > DMX_CHANNELS:
            raise MappingError(f"channel {coarse} is the last of the universe: it has no fine channel after it")
    dmx_mode = DmxMode.TRIGGER if mode == "trigger" else default_dmx_mode(param)
    return DmxMapping(universe, first, param.path, dmx_mode, fine, protocol=protocol)
