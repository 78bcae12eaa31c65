"""The parameter registry: the single source of truth for every live value.

Every live value has one path (``/fx/kaleido/segments``) with a kind, range, default,
unit, smoothing time and description. Presets, OSC, MIDI, the HUD and the web page are
all views of this registry.

Threading model: ``set`` may be called from any thread; it validates at once (so the
caller can report a bad value) and queues the change. The render thread calls
``apply_pending(dt)`` once per frame, at the frame boundary: queued changes land, smoothed
values advance, listeners fire. ``get`` returns the values as of the last frame boundary,
so everything drawn in one frame sees one consistent state.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, cast

log = logging.getLogger(__name__)


class Kind(str, Enum):
    FLOAT = "float"
    INT = "int"
    BOOL = "bool"
    ENUM = "enum"
    STRING = "string"
    TRIGGER = "trigger"
    COLOUR = "colour"


class ParamError(ValueError):
    """A value or path that the registry refuses; the message says which and why."""


_TRUE_WORDS = {"true", "on", "yes", "1"}
_FALSE_WORDS = {"false", "off", "no", "0"}
MAX_STRING = 10_000
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float (JSON allows any size)
        return False


@dataclass(frozen=True)
class Param:
    """One live value's declaration. Immutable: the live value lives in the registry."""

    path: str
    kind: Kind
    default: Any
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    unit: str = ""
    smoothing: float = 0.0  # time constant in seconds (floats only)
    description: str = ""
    in_presets: bool = True  # False for engine-room values (HUD visibility) a preset must not touch

    def __post_init__(self) -> None:
        # a path without the leading "/" is relative to a group it is placed under later
        # (``under``): a scene declares ``strength``, the registry holds /scene/<name>/strength
        if not self.path.strip("/") or self.path.endswith("/") or "//" in self.path:
            raise ParamError(f"bad parameter path {self.path!r}: must look like /group/name (or name, relative)")
        if self.kind in (Kind.FLOAT, Kind.INT) and (self.min is None or self.max is None):
            raise ParamError(f"{self.path}: numeric parameters need min and max")
        if self.kind is Kind.ENUM and not self.choices:
            raise ParamError(f"{self.path}: enum parameters need choices")
        if self.kind is not Kind.TRIGGER:
            object.__setattr__(self, "default", self.coerce(self.default))

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def relative(self) -> bool:
        return not self.path.startswith("/")

    def under(self, group: str) -> Param:
        """This relative declaration placed under ``group``: ``strength`` under /scene/x is /scene/x/strength."""
        if not self.relative:
            raise ParamError(f"{self.path} is already a full path; only a relative name goes under {group}")
        return replace(self, path=f"{group.rstrip('/')}/{self.path}")

    @property
    def _bounds(self) -> tuple[float, float]:
        """``(min, max)`` of a number parameter, typed as set: ``__post_init__`` refuses a FLOAT or INT without both."""
        return cast(float, self.min), cast(float, self.max)

    def coerce(self, value: Any) -> Any:
        """Return ``value`` converted to this parameter's type, or raise ParamError."""
        kind = self.kind
        if kind is Kind.TRIGGER:
            return True
        if kind is Kind.FLOAT or kind is Kind.INT:
            if isinstance(value, bool):
                value = float(value)
            if not _is_number(value):
                raise ParamError(f"{self.path}: expected a number, got {type(value).__name__} {value!r:.40}")
            if not _is_finite(value):
                raise ParamError(f"{self.path}: {value!r:.40} is not a finite number")
            if kind is Kind.INT:
                value = int(round(value))
            else:
                value = float(value)
            if not (self.min <= value <= self.max):
                raise ParamError(f"{self.path}: {value:g} is out of range [{self.min:g}, {self.max:g}]")
            return value
        if kind is Kind.BOOL:
            if isinstance(value, bool):
                return value
            if _is_number(value) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.lower() in _TRUE_WORDS | _FALSE_WORDS:
                return value.lower() in _TRUE_WORDS
            raise ParamError(f"{self.path}: expected true/false, got {value!r:.40}")
        if kind is Kind.ENUM:
            if isinstance(value, str) and value in self.choices:
                return value
            if _is_number(value) and _is_finite(value) and float(value).is_integer() and 0 <= value < len(self.choices):
                return self.choices[int(value)]
            raise ParamError(f"{self.path}: {value!r:.40} is not one of {', '.join(self.choices)}")
        if kind is Kind.STRING:
            if not isinstance(value, str):
                raise ParamError(f"{self.path}: expected text, got {type(value).__name__}")
            if len(value) > MAX_STRING:
                raise ParamError(f"{self.path}: text longer than {MAX_STRING} characters")
            return value
        if kind is Kind.COLOUR:
            return _coerce_colour(self.path, value)
        raise AssertionError(kind)

    def normalise(self, value: Any) -> float:
        """Map a value of this parameter onto 0..1 (numbers, enums and bools)."""
        if self.kind in (Kind.FLOAT, Kind.INT):
            lo, hi = self._bounds
            span = hi - lo
            return 0.0 if span == 0 else (value - lo) / span
        if self.kind is Kind.ENUM:
            return self.choices.index(value) / max(1, len(self.choices) - 1)
        if self.kind is Kind.BOOL:
            return 1.0 if value else 0.0
        raise ParamError(f"{self.path}: a {self.kind.value} parameter has no 0..1 form")

    def denormalise(self, x: float) -> Any:
        """Map 0..1 onto this parameter's range (for CHOP channels, MIDI faders)."""
        if not _is_number(x) or not _is_finite(x):
            raise ParamError(f"{self.path}: normalised value must be a number, got {x!r:.40}")
        x = min(1.0, max(0.0, float(x)))
        if self.kind is Kind.FLOAT:
            lo, hi = self._bounds
            return lo + x * (hi - lo)
        if self.kind is Kind.INT:
            lo, hi = self._bounds
            return int(round(lo + x * (hi - lo)))
        if self.kind is Kind.ENUM:
            return self.choices[int(round(x * (len(self.choices) - 1)))]
        if self.kind is Kind.BOOL:
            return x >= 0.5
        raise ParamError(f"{self.path}: a {self.kind.value} parameter has no 0..1 form")


def _coerce_colour(path: str, value: Any) -> tuple[float, float, float, float]:
    if isinstance(value, str):
        text = value.lstrip("#")
        # int(..., 16) alone would also take "-1", "+f" and " f": only hex digits are a colour
        if len(text) in (6, 8) and all(ch in _HEX_DIGITS for ch in text):
            channels = [int(text[i : i + 2], 16) / 255.0 for i in range(0, len(text), 2)]
            return tuple(channels + [1.0] * (4 - len(channels)))  # type: ignore[return-value]
        raise ParamError(f"{path}: colour text must be #rrggbb or #rrggbbaa, got {value!r:.40}")
    if (
        isinstance(value, (list, tuple))
        and len(value) in (3, 4)
        and all(_is_number(c) and _is_finite(c) and 0.0 <= c <= 1.0 for c in value)
    ):
        return tuple(float(c) for c in value) + ((1.0,) if len(value) == 3 else ())  # type: ignore[return-value]
    raise ParamError(f"{path}: colour must be 3 or 4 numbers in [0, 1] or #rrggbb, got {value!r:.40}")


def float_param(
    path: str, default: float, lo: float, hi: float, *, unit: str = "", smoothing: float = 0.0, description: str = ""
) -> Param:
    return Param(path, Kind.FLOAT, default, lo, hi, unit=unit, smoothing=smoothing, description=description)


def int_param(
    path: str, default: int, lo: int, hi: int, *, unit: str = "", description: str = "", in_presets: bool = True
) -> Param:
    return Param(path, Kind.INT, default, lo, hi, unit=unit, description=description, in_presets=in_presets)


def bool_param(path: str, default: bool, *, description: str = "", in_presets: bool = True) -> Param:
    return Param(path, Kind.BOOL, default, description=description, in_presets=in_presets)


def enum_param(
    path: str, default: str, choices: Iterable[str], *, description: str = "", in_presets: bool = True
) -> Param:
    return Param(path, Kind.ENUM, default, choices=tuple(choices), description=description, in_presets=in_presets)


def string_param(path: str, default: str = "", *, description: str = "") -> Param:
    return Param(path, Kind.STRING, default, description=description)


def trigger_param(path: str, *, description: str = "") -> Param:
    return Param(path, Kind.TRIGGER, False, description=description)


def colour_param(path: str, default: Any, *, description: str = "") -> Param:
    return Param(path, Kind.COLOUR, default, description=description)


@dataclass(frozen=True)
class Change:
    """A value that landed at a frame boundary. ``origin`` names who sent it (osc, midi, preset...)."""

    path: str
    value: Any
    origin: str


Listener = Callable[[Change], None]


@dataclass
class _Slot:
    param: Param
    current: Any
    target: Any
    fired: bool = False  # triggers: true for the one frame after they fire
    modulation: float = 0.0  # offset in 0..1 units of the range, from the modulation matrix

    def effective(self) -> Any:
        """The value everything reads: the (smoothed) value plus modulation, kept in range."""
        p = self.param
        if p.kind is Kind.TRIGGER:
            return self.fired
        if not self.modulation or p.kind not in (Kind.FLOAT, Kind.INT):
            return self.current
        lo, hi = p._bounds
        value = min(hi, max(lo, self.current + self.modulation * (hi - lo)))
        return int(round(value)) if p.kind is Kind.INT else value


class ParamRegistry:
    """Thread-safe store of every live value; see the module docstring for the model."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        self._pending: list[Change] = []
        self._listeners: list[Listener] = []
        self.last_change: Change | None = None  # latest change from outside (for the HUD)
        # Bumped whenever a declaration comes, goes or changes: views that list the parameters
        # (OSCQuery's PATH_* notices) compare a number per frame instead of every declaration.
        self.generation = 0

    # -- declaration ---------------------------------------------------------------
    def declare(self, param: Param) -> Param:
        """Add a parameter. Declaring the same definition twice is allowed (scenes reload)."""
        if param.relative:
            raise ParamError(f"{param.path!r} is a relative name: place it under a group first (Param.under)")
        with self._lock:
            existing = self._slots.get(param.path)
            if existing is not None:
                if existing.param != param:
                    raise ParamError(f"{param.path} is already declared differently")
                return existing.param
            for path in self._slots:
                if path.startswith(param.path + "/") or param.path.startswith(path + "/"):
                    raise ParamError(f"{param.path} clashes with {path}: a path is a value or a group")
            value = False if param.kind is Kind.TRIGGER else param.default
            self._slots[param.path] = _Slot(param, value, value)
            self.generation += 1
        return param

    def declare_all(self, params: Iterable[Param]) -> None:
        for p in params:
            self.declare(p)

    def remove(self, paths: Iterable[str]) -> None:
        """Forget parameters (a plugin scene unloading its own); unknown paths are ignored.

        Their queued changes go with them. The views see them go at the next frame boundary
        (OSC stops resolving them; OSCQuery's WebSocket clients get PATH_REMOVED).
        """
        with self._lock:
            gone = {path for path in paths if path in self._slots}
            for path in gone:
                del self._slots[path]
            if gone:
                self.generation += 1
                self._pending = [change for change in self._pending if change.path not in gone]

    def replace_choices(self, path: str, choices: Iterable[str]) -> None:
        """Update an enum's choices (the scene list grows when plugins register)."""
        with self._lock:
            slot = self._require(path)
            old = slot.param
            choices = tuple(choices)
            default = old.default if old.default in choices else choices[0]
            slot.param = Param(
                old.path, old.kind, default, choices=choices, description=old.description, in_presets=old.in_presets
            )
            if slot.target not in choices:
                slot.target = slot.current = default
            self.generation += 1

    # -- reading -------------------------------------------------------------------
    def __contains__(self, path: str) -> bool:
        return path in self._slots

    def param(self, path: str) -> Param:
        with self._lock:
            return self._require(path).param

    def params(self, prefix: str = "/") -> list[Param]:
        with self._lock:
            return [s.param for p, s in sorted(self._slots.items()) if p.startswith(prefix)]

    def get(self, path: str) -> Any:
        """The value as of the last frame boundary (smoothed for floats, plus modulation)."""
        with self._lock:
            return self._require(path).effective()

    def target(self, path: str) -> Any:
        """The value a smoothed parameter is heading to (what a preset would save)."""
        with self._lock:
            slot = self._require(path)
            return slot.fired if slot.param.kind is Kind.TRIGGER else slot.target

    def snapshot(self, prefix: str = "/") -> dict[str, Any]:
        with self._lock:
            return {
                p: s.effective()
                for p, s in sorted(self._slots.items())
                if p.startswith(prefix) and s.param.kind is not Kind.TRIGGER
            }

    # -- modulation (render thread, frame boundary) ---------------------------------
    def set_modulation(self, offsets: dict[str, float]) -> None:
        """Replace every modulation offset (0..1 units of each range); paths not named get 0.

        Modulation never changes what a preset saves or what a control set: it rides on top.
        """
        with self._lock:
            for path in offsets:
                slot = self._require(path)
                if slot.param.kind not in (Kind.FLOAT, Kind.INT):
                    raise ParamError(f"{path}: only numbers can be modulated")
            for path, slot in self._slots.items():
                slot.modulation = float(offsets.get(path, 0.0))

    def modulation(self, path: str) -> float:
        with self._lock:
            return self._require(path).modulation

    # -- writing (any thread) --------------------------------------------------------
    def set(self, path: str, value: Any, origin: str = "api") -> Any:
        """Validate and queue a change; returns the coerced value. Raises ParamError."""
        return self.set_many({path: value}, origin)[path]

    def set_normalised(self, path: str, x: float, origin: str = "api") -> Any:
        return self.set(path, self.param(path).denormalise(x), origin)

    def set_many(self, values: dict[str, Any], origin: str = "api") -> dict[str, Any]:
        """All or nothing: every value is validated before any is queued."""
        with self._lock:
            coerced = {path: self._require(path).param.coerce(v) for path, v in values.items()}
            self._pending.extend(Change(p, v, origin) for p, v in coerced.items())
        return coerced

    def add_listener(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener`` (a scene that unloads); unknown listeners are ignored."""
        with self._lock:
            self._listeners = [known for known in self._listeners if known != listener]

    # -- the frame boundary (render thread) -----------------------------------------
    def apply_pending(self, dt: float) -> list[Change]:
        """Land queued changes, advance smoothing by ``dt`` seconds, fire listeners."""
        with self._lock:
            pending, self._pending = self._pending, []
            for slot in self._slots.values():
                slot.fired = False
            landed: list[Change] = []
            for change in pending:
                slot = self._slots[change.path]
                if slot.param.kind is Kind.TRIGGER:
                    slot.fired = True
                elif slot.target == change.value:
                    continue
                else:
                    slot.target = change.value
                    if slot.param.kind is not Kind.FLOAT or slot.param.smoothing <= 0:
                        slot.current = change.value
                landed.append(change)
            for slot in self._slots.values():
                p = slot.param
                if p.kind is Kind.FLOAT and p.smoothing > 0 and slot.current != slot.target:
                    step = 1.0 - math.exp(-max(dt, 0.0) / p.smoothing)
                    slot.current += (slot.target - slot.current) * step
                    lo, hi = p._bounds
                    if abs(slot.target - slot.current) <= 1e-4 * (hi - lo):
                        slot.current = slot.target
            listeners = list(self._listeners)
            outside = [c for c in landed if c.origin not in ("engine", "preset")]
            if outside:
                self.last_change = outside[-1]
        for change in landed:
            for listener in listeners:
                try:
                    listener(change)
                except Exception:  # a broken view must not stop the frame; it is logged loudly
                    log.exception("parameter listener failed on %s", change.path)
        return landed

    def _require(self, path: str) -> _Slot:
        slot = self._slots.get(path)
        if slot is None:
            raise ParamError(f"unknown parameter {path!r}")
        return slot


@dataclass
class ParamGroup:
    """A read view of the parameters under one prefix: ``group["feed"]`` is ``/scene/rd/feed``."""

    registry: ParamRegistry
    prefix: str

    def __getitem__(self, name: str) -> Any:
        return self.registry.get(f"{self.prefix}/{name}")
