"""Named engine actions (next scene, recall preset, tap...): declared once, posted from any thread.

An action is declared as data, like a parameter: a name, typed arguments (with names,
defaults and descriptions) and a description. Every view reads that one declaration:
OSC turns a message's arguments into the action's, MIDI checks its mapping file, the web
page builds its controls from ``/api/actions`` and OSCQuery writes each node's TYPE and
DESCRIPTION. ``ActionSpec.bind`` checks and converts arguments the same way for all of
them, so a call with the wrong arguments is refused, from any view, with one line that
names the signature::

    scene/select(ref: str|int): got 2 arguments ('a', 'b')

Controls run on their own threads; the engine's state belongs to the render thread. So a
control ``post``s an action and the render thread runs it at the next frame boundary,
in order. A handler that refuses its arguments (a scene that does not exist) raises
ActionError: one log line and a HUD error, and the show goes on.
"""

from __future__ import annotations

import inspect
import logging
import math
import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

log = logging.getLogger(__name__)

# str: one word or name; text: words (OSC joins a message's trailing words into it, as Max
# sends `a red cat` as three symbols); path: a parameter path (/fx/kaleido/segments).
ArgType = Literal["str", "text", "path", "int", "float", "str|int"]
ARG_TYPES: tuple[str, ...] = ("str", "text", "path", "int", "float", "str|int")
MAX_TEXT = 10_000  # characters: a prompt, not a file
_REQUIRED = object()


class ActionError(ValueError):
    """An action whose arguments are wrong; the message says why."""


@dataclass(frozen=True)
class Arg:
    """One argument of an action. ``default``: the value when the caller leaves it out."""

    name: str
    type: ArgType
    default: Any = _REQUIRED
    description: str = ""

    def __post_init__(self) -> None:
        if self.type not in ARG_TYPES:
            raise ValueError(f"argument {self.name}: type {self.type!r} is not one of {', '.join(ARG_TYPES)}")

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def __str__(self) -> str:
        return f"{self.name}: {self.type}" + ("" if self.required else f" = {self.default!r}")

    def convert(self, value: Any) -> Any:
        """``value`` as this argument's type; ActionError (the reason, without the signature) if it is not one."""
        kind = self.type
        if isinstance(value, bool):  # True is an int in Python, never a name, number or text here
            raise ActionError(f"{self.name} takes {_WANTED[kind]}, got {value!r}")
        if kind in ("int", "str|int") and isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)  # OSC clients and JSON often send whole numbers as floats
        if kind == "float" and isinstance(value, int) and abs(value) < 2**1023:  # beyond that, no float holds it
            value = float(value)
        ok = {
            "int": isinstance(value, int),
            "float": isinstance(value, float) and math.isfinite(value),
            "str|int": isinstance(value, (str, int)),
        }.get(kind, isinstance(value, str))
        if not ok:
            raise ActionError(f"{self.name} takes {_WANTED[kind]}, got {_short(value)}")
        if isinstance(value, str):
            if len(value) > MAX_TEXT:
                raise ActionError(f"{self.name}: text longer than {MAX_TEXT} characters")
            if not value.strip() and self.required:
                raise ActionError(f"{self.name} must not be empty")
            if kind == "path" and not value.startswith("/"):
                raise ActionError(f"{self.name} takes a parameter path like /fx/kaleido/segments, got {_short(value)}")
        return value


_WANTED = {
    "str": "a name",
    "text": "text",
    "path": "a parameter path",
    "int": "a whole number",
    "float": "a number",
    "str|int": "a name or a whole number",
}


@dataclass(frozen=True)
class ActionSpec:
    """An action's declaration: what every view shows and checks."""

    name: str
    description: str
    args: tuple[Arg, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or self.name.startswith("/") or self.name.endswith("/"):
            raise ValueError(f"bad action name {self.name!r}: must look like group/name")
        seen_optional = False
        for i, arg in enumerate(self.args):
            if arg.required and seen_optional:
                raise ValueError(f"{self.name}: required argument {arg.name} after an optional one")
            seen_optional = seen_optional or not arg.required
            if arg.type == "text" and i != len(self.args) - 1:
                raise ValueError(f"{self.name}: a text argument ({arg.name}) must come last")

    @property
    def signature(self) -> str:
        return f"{self.name}({', '.join(map(str, self.args))})"

    @property
    def min_args(self) -> int:
        return sum(arg.required for arg in self.args)

    @property
    def trigger(self) -> bool:
        """An action with no arguments is fired like a button (OSC: a release's 0 does nothing)."""
        return not self.args

    def bind(self, args: Sequence[Any]) -> tuple[Any, ...]:
        """Check and convert ``args``; returns every argument, defaults filled in. Raises ActionError."""
        if not self.min_args <= len(args) <= len(self.args):
            count = f"{len(args)} argument{'' if len(args) == 1 else 's'}"
            raise ActionError(
                f"{self.signature}: got {count}" + (f" ({', '.join(_short(a) for a in args[:4])})" if args else "")
            )
        try:
            given = tuple(arg.convert(value) for arg, value in zip(self.args, args))
        except ActionError as exc:
            raise ActionError(f"{self.signature}: {exc}") from None
        return given + tuple(arg.default for arg in self.args[len(args) :])

    def record(self) -> dict[str, Any]:
        """The declaration as JSON (the web page's ``/api/actions``)."""
        return {
            "name": self.name,
            "description": self.description,
            "signature": self.signature,
            "args": [
                {
                    "name": a.name,
                    "type": a.type,
                    "required": a.required,
                    "default": None if a.required else a.default,
                    "description": a.description,
                }
                for a in self.args
            ],
        }


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def declare(*specs: ActionSpec) -> dict[str, ActionSpec]:
    out: dict[str, ActionSpec] = {}
    for spec in specs:
        if spec.name in out:
            raise ValueError(f"action {spec.name} declared twice")
        out[spec.name] = spec
    return out


# The actions every view (keys, OSC, MIDI, web) can use; whoever owns one registers its handler
# (the app: scenes, presets, prompt; the tempo: tap; MIDI and DMX: learn).
ACTIONS: dict[str, ActionSpec] = declare(
    ActionSpec("scene/next", "Switch to the next scene"),
    ActionSpec(
        "scene/select",
        "Switch to a scene by name or 0-based index",
        (Arg("ref", "str|int", description="a scene name, or its 0-based index in the scene list"),),
    ),
    ActionSpec(
        "scene/preload",
        "Load a scene in the background (name) so that cutting to it is instant",
        (Arg("name", "str", description="a scene name"),),
    ),
    ActionSpec(
        "preset/recall",
        "Recall a preset by name or 1-based number",
        (Arg("ref", "str|int", description="a preset name, or its 1-based number"),),
    ),
    ActionSpec(
        "preset/save",
        "Save the current state as a preset (name)",
        (Arg("name", "text", description="the preset's name"),),
    ),
    ActionSpec("prompt", "Set the active scene's prompt (text)", (Arg("text", "text", description="the prompt"),)),
    ActionSpec("tap", "Tap tempo"),
    ActionSpec(
        "midi/learn",
        "Arm MIDI learn for a parameter path (the next control moved is mapped)",
        (
            Arg("path", "path", description="the parameter the next control moved drives"),
            Arg(
                "mode",
                "str",
                "",
                description="force a mapping mode (e.g. relative-signed); empty: guess from the messages",
            ),
        ),
    ),
    ActionSpec(
        "dmx/learn",
        "Arm DMX learn for a parameter path (the next desk channel moved is mapped)",
        (
            Arg("path", "path", description="the parameter the next DMX channel moved drives"),
            Arg(
                "mode",
                "str",
                "",
                description="absolute (8-bit), 16bit (a coarse/fine pair) or trigger; empty: guess",
            ),
        ),
    ),
    ActionSpec("dmx/learn_presets", "Arm DMX learn for a preset channel (bands of its levels recall presets)"),
)


Handler = Callable[..., None]


class Control(Protocol):
    name: str
    status: str

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def frame(self, now: float) -> None: ...


class Actions:
    """The engine's action queue: handlers registered against the declarations in ``specs``."""

    def __init__(self, specs: dict[str, ActionSpec] | None = None) -> None:
        self.specs = ACTIONS if specs is None else specs
        self._handlers: dict[str, Handler] = {}
        self._queue: queue.SimpleQueue[tuple[str, tuple[Any, ...], str]] = queue.SimpleQueue()
        self.last_error: str | None = None
        self.last_action: str | None = None

    def register(self, name: str, handler: Handler) -> None:
        """Attach ``handler`` to a declared action; it is called with every declared argument."""
        spec = self.specs.get(name)
        if spec is None:
            raise ValueError(f"unknown action {name!r}; declare it in engine.control.actions.ACTIONS")
        try:
            inspect.signature(handler).bind(*range(len(spec.args)))
        except TypeError as exc:
            raise ValueError(f"the handler for {spec.signature} cannot take its arguments: {exc}") from None
        except ValueError:  # a builtin without a signature: trusted as it is
            pass
        self._handlers[name] = handler

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def available(self) -> list[ActionSpec]:
        """The declarations of the actions this engine has handlers for, by name."""
        return [self.specs[name] for name in self.names()]

    def spec(self, name: str) -> ActionSpec:
        """The declaration of an available action; ActionError if there is none here."""
        if name not in self._handlers:
            raise ActionError(
                f"unknown action {name!r}" if name not in self.specs else f"{name} is not available in this engine"
            )
        return self.specs[name]

    def post(self, name: str, *args: Any, origin: str = "api") -> tuple[Any, ...]:
        """Queue an action for the next frame boundary (any thread); returns the bound arguments.

        Wrong arguments, or an action without a handler here, raise ActionError now: the
        sender's mistake is said to the sender, not found later on the render thread.
        """
        bound = self.spec(name).bind(args)
        self._queue.put((name, bound, origin))
        return bound

    def run_pending(self) -> int:
        """Render thread, frame boundary: run queued actions in order; returns how many ran."""
        count = 0
        while True:
            try:
                name, args, origin = self._queue.get_nowait()
            except queue.Empty:
                return count
            count += 1
            self.last_action = f"{name} {' '.join(map(str, args))} ({origin})".strip()
            try:
                self._handlers[name](*args)
            except ActionError as exc:
                self.last_error = f"{name}: {exc}"
                log.warning("action %s refused: %s", name, exc)
            except Exception as exc:  # a handler's bug must not end the show: loud, and the next frame comes
                self.last_error = f"{name} failed: {type(exc).__name__}: {exc}"
                log.exception("action %s failed", name)
