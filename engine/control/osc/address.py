"""The OSC address space: which address means what, and what its arguments say.

    /dreamdeck/fx/kaleido/segments 8          a parameter (i, f, d, T, F; text for enums)
    /dreamdeck/norm/layer/scene/opacity 0.5   the same through its 0..1 form (CHOP channels)
    /dreamdeck/fx/*/enabled 1                 OSC 1.0 wildcards (* ? [a-z] [!x] {a,b}) fan out
    /dreamdeck/scene/next                     an action (declared in engine.control.actions.ACTIONS)
    /dreamdeck/get /fx/kaleido/segments       reply /dreamdeck/fx/kaleido/segments 8 to the sender

Pure functions, no sockets: patterns, argument shapes, encoding and a fast parser.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from pythonosc import osc_bundle, osc_message
from pythonosc.osc_message_builder import OscMessageBuilder

from engine.control.actions import ACTIONS, ActionError, ActionSpec
from engine.params import Kind, Param, ParamError, ParamRegistry

PREFIX = "/dreamdeck"
_PATTERN_CHARS = frozenset("*?[]{}")
# What python-osc (and the bytes it decodes) raise for a packet that is not OSC.
MALFORMED = (
    osc_message.ParseError,
    osc_bundle.ParseError,
    UnicodeDecodeError,
    RecursionError,
    struct.error,
    IndexError,
    TypeError,
)


def has_pattern(address: str) -> bool:
    return not _PATTERN_CHARS.isdisjoint(address)


@lru_cache(maxsize=512)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """An OSC 1.0 address pattern as a regex for ``fullmatch``; ValueError if malformed.

    ``*`` and ``?`` never cross a ``/``; ``[a-c]``, ``[!x]`` and ``{foo,bar}`` as in the spec.
    python-osc's dispatcher recompiles its regex for every message and tries every handler;
    here a pattern is compiled once and its matches are cached by the server.
    """
    out: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                raise ValueError("'[' without ']'")
            out.append(_char_class(pattern[i + 1 : end]))
            i = end
        elif char == "{":
            end = pattern.find("}", i + 1)
            if end < 0:
                raise ValueError("'{' without '}'")
            out.append("(?:" + "|".join(re.escape(alt) for alt in pattern[i + 1 : end].split(",")) + ")")
            i = end
        elif char in "]}":
            raise ValueError(f"{char!r} without its opening bracket")
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out))


def _char_class(body: str) -> str:
    negate = body.startswith("!")
    if negate:
        body = body[1:]
    if not body:
        raise ValueError("empty '[]'")
    parts: list[str] = []
    j = 0
    while j < len(body):
        if j + 2 < len(body) and body[j + 1] == "-":  # a range; a '-' first or last is itself
            low, high = body[j], body[j + 2]
            if low > high:
                raise ValueError(f"range {low}-{high} runs backwards")
            parts.append(f"{re.escape(low)}-{re.escape(high)}")
            j += 3
        else:
            parts.append(re.escape(body[j]))
            j += 1
    return f"[^/{''.join(parts)}]" if negate else f"[{''.join(parts)}]"


def address_collisions(registry: ParamRegistry) -> list[str]:
    """Parameter paths that would hide an action or a reserved address (``/get``, ``/norm``).

    Parameters are resolved first, so such a parameter makes the action unreachable by OSC.
    """
    reserved = ["get", "norm", *ACTIONS]
    found = []
    for param in registry.params():
        for name in reserved:
            if param.path == f"/{name}" or param.path.startswith(f"/{name}/"):
                found.append(f"{param.path} hides {PREFIX}/{name}")
    return found


# -- values ---------------------------------------------------------------------------------

SKIP = object()  # a trigger's release (0 or F, as a button sends it): accepted, nothing to do


def _fires(where: str, args: Sequence[Any]) -> bool:
    """Trigger semantics: no argument, nil or a non-zero number fires; 0 or F is a release."""
    if not args:
        return True
    if len(args) == 1:
        value = args[0]
        if value is None:
            return True
        if isinstance(value, (bool, int, float)):
            return bool(value)
    raise ParamError(f"{where}: a trigger takes no argument or one number, got {_describe(args)}")


def _describe(args: Sequence[Any]) -> str:
    text = " ".join(repr(a) for a in args)
    return text if len(text) <= 60 else text[:59] + "…"


def _unpack_rgba(packed: int) -> tuple[float, ...]:
    """An OSC 'r' argument (rgba32, red in the high byte) as four floats in 0..1."""
    return tuple(((packed >> shift) & 0xFF) / 255.0 for shift in (24, 16, 8, 0))


def param_value(param: Param, args: Sequence[Any]) -> Any:
    """What an OSC message's arguments say for ``param``; ``SKIP`` for a trigger's release.

    Only the shape is checked here (how many arguments, which OSC types): the registry
    checks type and range, so OSC refuses exactly what a preset would.
    """
    kind = param.kind
    if kind is Kind.TRIGGER:
        return True if _fires(param.path, args) else SKIP
    if kind is Kind.COLOUR:
        if len(args) == 1 and isinstance(args[0], int) and not isinstance(args[0], bool):
            return _unpack_rgba(args[0])
        if len(args) in (3, 4):
            return tuple(args)
        if len(args) == 1:
            return args[0]  # '#rrggbb' text; the registry says what is wrong with anything else
        raise ParamError(f"{param.path}: a colour is 3 or 4 floats, one rgba, or '#rrggbb'; got {len(args)} arguments")
    if kind is Kind.STRING and len(args) > 1 and all(isinstance(a, str) for a in args):
        return " ".join(args)  # Max sends `a red cat` as three symbols
    if len(args) != 1:
        raise ParamError(f"{param.path}: expected one value, got {len(args)} ({_describe(args)})")
    value = args[0]
    if value is None or isinstance(value, (bytes, list, tuple)):
        raise ParamError(f"{param.path}: {_describe(args)} is not a value for a {kind.value} parameter")
    return value


def normalised_value(param: Param, args: Sequence[Any]) -> Any:
    """The value for ``param`` that one 0..1 number stands for (clamped, as a fader is)."""
    if len(args) != 1 or not isinstance(args[0], (bool, int, float)):
        raise ParamError(f"{param.path}: the 0..1 form takes one number, got {_describe(args)}")
    return param.denormalise(float(args[0]))


def action_args(spec: ActionSpec, args: Sequence[Any]) -> tuple[Any, ...] | None:
    """A message's arguments as the action's, checked by its declaration; None for a button's release.

    An action without arguments fires like a trigger (a button's 0 or F is its release).
    A trailing text argument takes the rest of the message's words: Max sends ``a red cat``
    as three symbols, and a number in a prompt is a word too.
    """
    if spec.trigger:
        try:
            return () if _fires(spec.name, args) else None
        except ParamError:
            raise ActionError(
                f"{spec.signature}: a button sends no argument or one number, got {_describe(args)}"
            ) from None
    values = list(args)
    last = len(spec.args) - 1
    if spec.args[last].type == "text" and len(values) > last and all(_is_word(v) for v in values[last:]):
        values[last:] = [" ".join(v if isinstance(v, str) else f"{v:g}" for v in values[last:])]
    return spec.bind(values)


def _is_word(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def encode_message(address: str, param: Param, value: Any) -> bytes:
    """``address value`` as an OSC datagram, typed by the parameter, not guessed from Python.

    Bools go out as int 0/1: Pd's [oscparse], Max and TouchDesigner CHOPs all read ints,
    while T/F carry no data and some receivers drop them.
    """
    builder = OscMessageBuilder(address=address)
    kind = param.kind
    if kind is Kind.FLOAT:
        builder.add_arg(float(value), OscMessageBuilder.ARG_TYPE_FLOAT)
    elif kind in (Kind.INT, Kind.BOOL):
        builder.add_arg(int(value), OscMessageBuilder.ARG_TYPE_INT)
    elif kind in (Kind.ENUM, Kind.STRING):
        builder.add_arg(str(value), OscMessageBuilder.ARG_TYPE_STRING)
    elif kind is Kind.COLOUR:
        for channel in value:
            builder.add_arg(float(channel), OscMessageBuilder.ARG_TYPE_FLOAT)
    return builder.build().dgram  # a trigger: the bare address, as the message that fires it


Parsed = tuple[str, list[Any]]  # (address, arguments)
_FIXED = {
    ord("i"): struct.Struct(">i"),
    ord("f"): struct.Struct(">f"),
    ord("d"): struct.Struct(">d"),
    ord("h"): struct.Struct(">q"),
}
_CONSTANTS = {ord("T"): True, ord("F"): False, ord("N"): None}


def messages_in(packet: bytes) -> tuple[list[Parsed], bool]:
    """Every message of a packet, nested bundles flattened; and whether it was a bundle."""
    if osc_bundle.OscBundle.dgram_is_bundle(packet):
        out: list[Parsed] = []
        _flatten(osc_bundle.OscBundle(packet), out)
        return out, True
    if osc_message.OscMessage.dgram_is_message(packet):
        parsed = parse_plain_message(packet)
        if parsed is None:  # a type or a layout the fast path leaves to python-osc
            message = osc_message.OscMessage(packet)
            parsed = (message.address, message.params)
        return [parsed], False
    raise osc_message.ParseError("neither an OSC message nor a bundle")


def _flatten(bundle: osc_bundle.OscBundle, out: list[Parsed]) -> None:
    for content in bundle:
        if isinstance(content, osc_bundle.OscBundle):
            _flatten(content, out)
        else:
            out.append((content.address, content.params))


def parse_plain_message(packet: bytes) -> Parsed | None:
    """A well-formed message with i, f, d, h, s, T, F or N arguments, parsed in one pass.

    python-osc reads strings a byte at a time; this costs a third as much, which is most of
    the per-message time. Anything else (blobs, arrays, odd padding) returns None and goes
    to python-osc, so the answers and the errors are python-osc's either way.
    """
    end = packet.find(b"\0")
    if end <= 0:
        return None
    address = packet[:end].decode("utf-8")
    i = (end + 4) & ~3
    if i >= len(packet):
        return (address, []) if i == len(packet) else None
    tags_end = packet.find(b"\0", i)
    if packet[i] != 0x2C or tags_end < 0:  # the type tag string starts with ','
        return None
    tags = packet[i + 1 : tags_end]
    i = (tags_end + 4) & ~3
    args: list[Any] = []
    for tag in tags:
        fixed = _FIXED.get(tag)
        if fixed is not None:
            if i + fixed.size > len(packet):
                return None
            args.append(fixed.unpack_from(packet, i)[0])
            i += fixed.size
        elif tag == 0x73:  # 's'
            end = packet.find(b"\0", i)
            if end < 0:
                return None
            args.append(packet[i:end].decode("utf-8"))
            i = (end + 4) & ~3
        elif tag in _CONSTANTS:
            args.append(_CONSTANTS[tag])
        else:
            return None
    return (address, args) if i <= len(packet) else None
