"""OSC control: every parameter at ``/dreamdeck<path>``, the named actions, feedback.

    /dreamdeck/fx/kaleido/segments 8          a parameter (i, f, d, T, F; text for enums)
    /dreamdeck/norm/layer/scene/opacity 0.5   the same through its 0..1 form (CHOP channels)
    /dreamdeck/fx/*/enabled 1                 OSC 1.0 wildcards (* ? [a-z] [!x] {a,b}) fan out
    /dreamdeck/scene/next                     an action (see engine.control.actions.ACTIONS)
    /dreamdeck/get /fx/kaleido/segments       reply /dreamdeck/fx/kaleido/segments 8 to the sender

One thread reads the UDP socket (and, optionally, one per TCP connection) and does no more
than parse, validate and queue: values land at the next frame boundary through the registry,
actions run there through ``Actions``. Whatever that thread has not got to by a frame
boundary (it starves while moderngl holds the GIL) the render thread takes, within a small
budget, in arrival order. A packet is all or nothing: a bundle (nested bundles too) is
validated whole and lands in one frame, or not at all. Timetags are ignored: a performance
wants a value now, and sleeping until a timetag would stall every later message.

Live input is untrusted: a wrong address, type or range is refused with one log line (at
most one a second, with a count of what was held back) and counted for the HUD; the server
never stops answering. Binding anything but loopback needs an allowlist of senders.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
import select
import socket
import socketserver
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

from pythonosc import osc_bundle, osc_message
from pythonosc.osc_message_builder import OscMessageBuilder

from engine.control.actions import ACTIONS, ActionError, Actions
from engine.params import Change, Kind, Param, ParamError, ParamRegistry

log = logging.getLogger(__name__)

# Not the defaults of Resolume (7000), TouchOSC (8000/9000), MadMapper (8010) or QLab (53000).
DEFAULT_OSC_PORT = 9321
PREFIX = "/dreamdeck"
ORIGIN = "osc"
RECEIVE_BUFFER = 8 * 1024 * 1024  # bytes; holds a 10,000-message burst while Python catches up
MAX_DATAGRAM = 65535
MAX_TCP_PACKET = 1 << 20  # a TCP peer announcing more than this is not speaking OSC
POLL_INTERVAL = 0.05  # seconds a server loop waits before checking whether to stop
FRAME_BUDGET = 0.004  # seconds of a frame the render thread may spend on packets the thread fell behind on
LOCK_WAIT = 0.001  # seconds the render thread waits for the receive thread to finish its packet
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33 if sys.platform.startswith("linux") else None)
_PATTERN_CHARS = frozenset("*?[]{}")
_TRIGGER_ACTIONS = frozenset({"scene/next", "tap"})
_SLIP_END, _SLIP_ESC = b"\xc0", b"\xdb"
# What python-osc (and the bytes it decodes) raise for a packet that is not OSC.
_MALFORMED = (osc_message.ParseError, osc_bundle.ParseError, UnicodeDecodeError, RecursionError,
              struct.error, IndexError, TypeError)

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Reply = Callable[[bytes], None]


# -- who may talk to us ---------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """True if ``host`` resolves only to loopback addresses: reachable from this machine only."""
    if host in ("", "0.0.0.0", "::"):
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    return all(ipaddress.ip_address(info[4][0].split("%", 1)[0]).is_loopback for info in infos)


def check_binding(host: str, allow: Iterable[str] | None, what: str) -> tuple[Network, ...] | None:
    """Parse the allowlist; refuse a network-reachable binding without one (ValueError).

    A show network is shared with lighting desks, phones and guests: an open port that
    anyone can drive is how a projector ends up showing something it should not.
    """
    if allow is None:
        if not is_loopback(host):
            raise ValueError(f"{what} on {host!r} is reachable from the network: give an allowlist of "
                             "sender addresses or networks (e.g. allow=['192.168.1.20', '10.0.0.0/24'])")
        return None
    networks: list[Network] = []
    for entry in allow:
        try:
            networks.append(ipaddress.ip_network(str(entry).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{what}: allowlist entry {entry!r} is not an IP address or network") from None
    if not networks:
        raise ValueError(f"{what}: an empty allowlist refuses everyone; pass None to accept local senders")
    return tuple(networks)


class SenderFilter:
    """Decides, per sender address, whether a packet or connection is let in."""

    MAX_REMEMBERED = 4096  # spoofed source addresses must not grow memory without bound

    def __init__(self, networks: tuple[Network, ...] | None) -> None:
        self._networks = networks
        self._seen: dict[str, bool] = {}

    def allows(self, ip: str) -> bool:
        if self._networks is None:
            return True
        known = self._seen.get(ip)
        if known is None:
            known = self._match(ip)
            if len(self._seen) >= self.MAX_REMEMBERED:
                self._seen.clear()
            self._seen[ip] = known
        return known

    def _match(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # a dual-stack socket shows IPv4 senders as ::ffff:a.b.c.d
        return any(addr.version == net.version and addr in net for net in self._networks or ())


class RateLimitedLog:
    """At most one warning per ``interval`` seconds; the next one says how many were held back.

    A sender that floods bad messages must neither flood the log nor slow the server down
    writing it.
    """

    def __init__(self, logger: logging.Logger, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._next = float("-inf")
        self._held = 0
        self._lock = threading.Lock()

    def warning(self, message: str) -> bool:
        """Log ``message`` unless a line went out less than ``interval`` ago; True if logged."""
        with self._lock:
            now = self._clock()
            if now < self._next:
                self._held += 1
                return False
            held, self._held = self._held, 0
            self._next = now + self._interval
        self._log.warning("%s%s", message, f" ({held} more since the last line)" if held else "")
        return True


# -- addresses ------------------------------------------------------------------------------

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

_SKIP = object()  # a trigger's release (0 or F, as a button sends it): accepted, nothing to do


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
    """What an OSC message's arguments say for ``param``; ``_SKIP`` for a trigger's release.

    Only the shape is checked here (how many arguments, which OSC types): the registry
    checks type and range, so OSC refuses exactly what a preset would.
    """
    kind = param.kind
    if kind is Kind.TRIGGER:
        return True if _fires(param.path, args) else _SKIP
    if kind is Kind.COLOUR:
        if len(args) == 1 and isinstance(args[0], int) and not isinstance(args[0], bool):
            return _unpack_rgba(args[0])
        if len(args) in (3, 4):
            return tuple(args)
        if len(args) == 1:
            return args[0]  # '#rrggbb' text; the registry says what is wrong with anything else
        raise ParamError(f"{param.path}: a colour is 3 or 4 floats, one rgba, or '#rrggbb'; "
                         f"got {len(args)} arguments")
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
_FIXED = {ord("i"): struct.Struct(">i"), ord("f"): struct.Struct(">f"), ord("d"): struct.Struct(">d"),
          ord("h"): struct.Struct(">q")}
_CONSTANTS = {ord("T"): True, ord("F"): False, ord("N"): None}


def _messages_in(packet: bytes) -> tuple[list[Parsed], bool]:
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


# -- the server -----------------------------------------------------------------------------

@dataclass
class OscCounts:
    """What the HUD shows. Messages, not packets: a bundle of ten counts ten."""

    received: int = 0
    applied: int = 0  # accepted: queued for the next frame, posted as an action, or answered
    rejected: int = 0  # refused: unknown address, wrong type, out of range, malformed
    dropped: int = 0  # packets and connections from senders not on the allowlist
    sent: int = 0  # feedback messages and /get replies sent
    send_failed: int = 0  # feedback the network did not take (full buffer, no route)


@dataclass
class _Plan:
    """What one packet asks for, gathered before anything happens (all or nothing)."""

    values: dict[str, Any] = field(default_factory=dict)
    actions: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    gets: list[str] = field(default_factory=list)


class OscServer:
    """The OSC view of the registry and the actions; a Control (start, stop, frame, status).

    ``feedback=(host, port)``: every change that lands (from OSC too: a TouchDesigner panel
    wants to see what it set) is sent there, newest value per path, once per frame, from the
    render thread, never blocking it. ``tcp=True`` also listens on TCP, same port, for
    OSC 1.0 (size-prefixed) or OSC 1.1 (SLIP) streams.
    """

    name = "osc"

    def __init__(self, registry: ParamRegistry, actions: Actions, host: str = "127.0.0.1",
                 port: int = DEFAULT_OSC_PORT, allow: list[str] | None = None,
                 feedback: tuple[str, int] | None = None, prefix: str = PREFIX, tcp: bool = False) -> None:
        if not prefix.startswith("/") or prefix.endswith("/"):
            raise ValueError(f"OSC prefix {prefix!r} must look like /name")
        if feedback is not None and not (isinstance(feedback[1], int) and 0 < feedback[1] < 65536):
            raise ValueError(f"OSC feedback port {feedback[1]!r} is not a port number")
        self.registry = registry
        self.actions = actions
        self.host = host
        self.port = port  # the bound port once started (port=0 picks a free one)
        self.prefix = prefix
        self.feedback = feedback
        self.tcp = tcp
        self.counts = OscCounts()
        self.last_error: str | None = None
        self.receive_buffer = 0  # bytes the kernel granted (Linux reports twice what it holds)
        self._senders = SenderFilter(check_binding(host, allow, "OSC"))
        self._refusals = RateLimitedLog(log)
        self._strangers = RateLimitedLog(log)
        self._send_errors = RateLimitedLog(log)
        self._count_lock = threading.Lock()
        self._receive_lock = threading.Lock()  # one reader at a time: packets stay in order
        self._stop = threading.Event()
        self._udp: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._tcp_server: _OscTcpServer | None = None
        self._tcp_thread: threading.Thread | None = None
        self._paths: tuple[str, ...] = ()
        self._expansions: dict[str, tuple[str, ...]] = {}
        self._feedback_sock: socket.socket | None = None
        self._feedback_to: tuple[Any, ...] | None = None
        self._feedback_pending: dict[str, Any] = {}
        self._feedback_lock = threading.Lock()
        self._listening = False

    # -- life cycle ------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Bind and start receiving; OSError (port taken) or ValueError (feedback loop) if not."""
        if self.running:
            return
        self._stop.clear()
        self._refresh_paths()
        for collision in address_collisions(self.registry):
            log.warning("OSC: %s (parameters are resolved first)", collision)
        family = _family(self.host)
        any_port = self.port == 0
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.receive_buffer = _grow_receive_buffer(sock)
            sock.bind((self.host, self.port))
            sock.setblocking(False)  # the thread waits in select(); the frame drain must never wait
            self.port = sock.getsockname()[1]
            if self.feedback is not None:
                self._open_feedback()
            if self.tcp:
                for attempt in range(8):
                    try:
                        self._start_tcp(family)
                        break
                    except OSError as exc:
                        # port 0 = any free port: the UDP one may be taken for TCP (an outgoing
                        # connection's ephemeral port); take another pair rather than fail
                        if not any_port or exc.errno != errno.EADDRINUSE or attempt == 7:
                            raise
                        sock.close()
                        sock = socket.socket(family, socket.SOCK_DGRAM)
                        self.receive_buffer = _grow_receive_buffer(sock)
                        sock.bind((self.host, 0))
                        sock.setblocking(False)
                        self.port = sock.getsockname()[1]
        except OSError as exc:
            sock.close()
            self._close_feedback()
            raise OSError(exc.errno, f"OSC cannot listen on {self.host}:{self.port}: {exc.strerror or exc} "
                                     "(is another program using this port?)") from exc
        except ValueError:
            sock.close()
            self._close_feedback()
            raise
        self._udp = sock
        if not self._listening:  # the registry has no remove_listener: add once, gate on the socket
            self.registry.add_listener(self._on_change)
            self._listening = True
        self._thread = threading.Thread(target=self._serve_udp, args=(sock,), name="osc udp", daemon=True)
        self._thread.start()
        log.info("OSC listening on udp%s %s:%d under %s", "+tcp" if self.tcp else "", self.host, self.port,
                 self.prefix)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._wake_receiver()
            self._thread.join(timeout=2.0)
            self._thread = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp_server is not None:
            self._tcp_server.shutdown()
            self._tcp_server.close_connections()
            self._tcp_server.server_close()
            self._tcp_server = None
            if self._tcp_thread is not None:
                self._tcp_thread.join(timeout=2.0)
                self._tcp_thread = None
        self._close_feedback()

    def _wake_receiver(self) -> None:
        """An empty datagram to ourselves: the receive loop sees the stop flag now, not after a poll."""
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        try:
            with socket.socket(_family(host), socket.SOCK_DGRAM) as waker:
                waker.sendto(b"", (host, self.port))
        except (OSError, ValueError) as exc:  # the poll timeout ends the loop a little later instead
            log.debug("OSC: could not wake the receiver: %s", exc)

    @property
    def status(self) -> str:
        """One line for the HUD."""
        if not self.running:
            return "osc off"
        c = self.counts
        line = f"osc :{self.port} in {c.received} ok {c.applied} refused {c.rejected}"
        if c.dropped:
            line += f" dropped {c.dropped}"
        if self.feedback is not None:
            line += f" fb {c.sent}" + (f" (failed {c.send_failed})" if c.send_failed else "")
        return line

    # -- the render thread -----------------------------------------------------------------
    def frame(self, now: float) -> None:
        """Frame boundary: new parameters, the packets the thread fell behind on, feedback."""
        self._refresh_paths()
        self._drain_behind()
        sock, target = self._feedback_sock, self._feedback_to
        if sock is None or target is None:
            return
        with self._feedback_lock:
            pending, self._feedback_pending = self._feedback_pending, {}
        items = list(pending.items())
        sent = 0
        for i, (path, value) in enumerate(items):
            try:
                sock.sendto(encode_message(self.prefix + path, self.registry.param(path), value), target)
            except BlockingIOError:  # the send buffer is full: keep the rest for the next frame
                with self._feedback_lock:
                    for later_path, later_value in items[i:]:
                        self._feedback_pending.setdefault(later_path, later_value)
                self._count(send_failed=len(items) - i)
                break
            except OSError as exc:
                self._count(send_failed=1)
                self._send_errors.warning(f"OSC feedback to {self.feedback[0]}:{self.feedback[1]} failed: {exc}")
                continue
            sent += 1
        self._count(sent=sent)

    def _on_change(self, change: Change) -> None:
        """Registry listener (render thread, frame boundary): keep the newest value per path."""
        if self._feedback_sock is None:
            return
        with self._feedback_lock:
            self._feedback_pending[change.path] = change.value

    # -- receiving (network threads) -------------------------------------------------------
    def _serve_udp(self, sock: socket.socket) -> None:
        """The receive thread: wait for a datagram, then take it and handle it under the lock."""
        while not self._stop.is_set():
            try:
                readable, _, _ = select.select([sock], [], [], POLL_INTERVAL)
            except (OSError, ValueError):  # closed under us by stop()
                break
            if readable and not self._stop.is_set():
                with self._receive_lock:
                    self._receive_one(sock)

    def _drain_behind(self) -> None:
        """Handle, on the render thread, what the receive thread has not got to yet.

        moderngl holds the GIL through every GL call, so with a software rasteriser the
        receive thread can starve for most of a frame while datagrams pile up in the
        kernel. Draining them here, within FRAME_BUDGET, keeps throughput up; the lock
        keeps packets in arrival order; the values land at the next frame boundary.
        """
        sock = self._udp
        if sock is None or not self._receive_lock.acquire(timeout=LOCK_WAIT):
            return
        try:
            deadline = time.perf_counter() + FRAME_BUDGET
            while time.perf_counter() < deadline and self._receive_one(sock):
                pass
        finally:
            self._receive_lock.release()

    def _receive_one(self, sock: socket.socket) -> bool:
        """Receive and handle one datagram if one is waiting (caller holds the lock)."""
        try:
            packet, sender = sock.recvfrom(MAX_DATAGRAM)
        except BlockingIOError:
            return False
        except OSError as exc:
            if not self._stop.is_set() and exc.errno != errno.EBADF:
                self._send_errors.warning(f"OSC receive failed: {exc}")
            return False
        if self._stop.is_set():  # stop()'s wake-up datagram, or a packet that came too late
            return False
        try:
            self.handle_packet(packet, sender, lambda dgram, to=sender: sock.sendto(dgram, to))
        except Exception:  # a bug must not silence OSC for the rest of the show: loud, then go on
            log.exception("OSC: a packet from %s broke the handler", sender[0])
        return True

    def admits(self, sender_ip: str) -> bool:
        """Whether the allowlist lets ``sender_ip`` in; a refusal is counted and logged (rate-limited)."""
        if self._senders.allows(sender_ip):
            return True
        self._count(dropped=1)
        self._strangers.warning(f"OSC from {sender_ip} dropped: not on the allowlist")
        return False

    def handle_packet(self, packet: bytes, sender: tuple[Any, ...], reply: Reply) -> None:
        """Everything one packet asks for, all or nothing: a bundle lands in one frame or not at all."""
        if not self.admits(sender[0]):
            return
        try:
            messages, bundled = _messages_in(packet)
        except _MALFORMED as exc:
            self._refuse(1, f"OSC from {sender[0]}: malformed packet ({exc})")
            return
        plan = _Plan()
        address = "(empty bundle)"
        try:
            for address, args in messages:
                self._resolve(address, args, plan)
            address = "(bundle)" if bundled else address
            self._check_actions(plan)
            if plan.values:
                self.registry.set_many(plan.values, origin=ORIGIN)
        except (ParamError, ActionError) as exc:
            what = f"bundle of {len(messages)} refused, nothing applied" if bundled else "refused"
            self._refuse(len(messages), f"OSC {what}: {address}: {exc}")
            return
        for name, args in plan.actions:
            self.actions.post(name, *args, origin=ORIGIN)
        for path in plan.gets:
            self._reply_value(path, reply)
        with self._count_lock:
            self.counts.received += len(messages)
            self.counts.applied += len(messages)

    def _resolve(self, address: str, args: Sequence[Any], plan: _Plan) -> None:
        """Parameters first, then the reserved addresses, actions, and wildcard patterns."""
        if not address.startswith(self.prefix + "/"):
            raise ParamError(f"not under {self.prefix}/")
        rest = address[len(self.prefix):]
        if rest in self.registry:
            self._plan_value(self.registry.param(rest), args, plan)
        elif rest == "/get":
            plan.gets.extend(self._get_paths(args))
        elif rest.startswith("/norm/"):
            for path in self._params_at(rest[len("/norm"):]):
                plan.values[path] = normalised_value(self.registry.param(path), args)
        elif rest[1:] in ACTIONS:
            action_args = self._action_args(rest[1:], args)
            if action_args is not None:
                plan.actions.append((rest[1:], action_args))
        elif has_pattern(rest):
            for path in self._expand(rest):
                self._plan_value(self.registry.param(path), args, plan)
        else:
            raise ParamError("unknown address")

    def _plan_value(self, param: Param, args: Sequence[Any], plan: _Plan) -> None:
        value = param_value(param, args)
        if value is not _SKIP:
            plan.values[param.path] = value

    def _params_at(self, path: str) -> tuple[str, ...]:
        if path in self.registry:
            return (path,)
        if has_pattern(path):
            return self._expand(path)
        raise ParamError(f"unknown parameter {path!r}")

    def _expand(self, pattern: str) -> tuple[str, ...]:
        paths, cache = self._paths, self._expansions
        found = cache.get(pattern)
        if found is None:
            try:
                regex = compile_pattern(pattern)
            except ValueError as exc:
                raise ParamError(f"bad address pattern: {exc}") from None
            found = tuple(path for path in paths if regex.fullmatch(path))
            if len(cache) >= 1024:  # a flood of distinct patterns must not grow memory
                cache.clear()
            cache[pattern] = found
        if not found:
            raise ParamError("the pattern matches no parameter")
        return found

    def _refresh_paths(self) -> None:
        """Scenes declare parameters as they register; wildcards must see them."""
        paths = tuple(p.path for p in self.registry.params())
        if paths != self._paths:
            self._paths = paths
            self._expansions = {}

    def _strip_prefix(self, path: str) -> str:
        return path[len(self.prefix):] if path.startswith(self.prefix + "/") else path

    def _get_paths(self, args: Sequence[Any]) -> list[str]:
        """/get with no argument: every value; else each argument is a path or a pattern."""
        if not args:
            return [p for p in self._paths if self.registry.param(p).kind is not Kind.TRIGGER]
        paths: list[str] = []
        for arg in args:
            if not isinstance(arg, str):
                raise ParamError(f"/get takes parameter paths, got {arg!r}")
            paths.extend(self._params_at(self._strip_prefix(arg)))
        return paths

    def _action_args(self, name: str, args: Sequence[Any]) -> tuple[Any, ...] | None:
        """The arguments to post for an action; None for a trigger's release (a button's 0)."""
        where = f"{self.prefix}/{name}"
        if name in _TRIGGER_ACTIONS:
            return () if _fires(where, args) else None
        if name in ("scene/select", "preset/recall"):
            if len(args) != 1 or isinstance(args[0], bool) or not isinstance(args[0], (str, int, float)):
                raise ActionError(f"{where} takes one name or number, got {_describe(args)}")
            ref = args[0]
            return (int(ref),) if isinstance(ref, float) and ref.is_integer() else (ref,)
        if name in ("prompt", "preset/save"):
            text = " ".join(a if isinstance(a, str) else f"{a:g}" if isinstance(a, float) else str(a) for a in args)
            if not text.strip():
                raise ActionError(f"{where} needs text")
            return (text,)
        if name == "midi/learn":
            if len(args) != 1 or not isinstance(args[0], str):
                raise ActionError(f"{where} takes one parameter path, got {_describe(args)}")
            path = self._strip_prefix(args[0])
            if path not in self.registry:
                raise ActionError(f"{where}: unknown parameter {path!r}")
            return (path,)
        return tuple(args)

    def _check_actions(self, plan: _Plan) -> None:
        if plan.actions:
            available = set(self.actions.names())
            for name, _ in plan.actions:
                if name not in available:
                    raise ActionError(f"{self.prefix}/{name} is not available in this engine")

    def _reply_value(self, path: str, reply: Reply) -> None:
        """Answer /get with the value as set (before smoothing and modulation, as presets save it)."""
        param = self.registry.param(path)
        try:
            reply(encode_message(self.prefix + path, param, self.registry.target(path)))
        except OSError as exc:
            self._count(send_failed=1)
            self._send_errors.warning(f"OSC reply for {path} failed: {exc}")
            return
        self._count(sent=1)

    def _refuse(self, messages: int, message: str) -> None:
        self.last_error = message
        self._count(received=messages, rejected=messages)
        self._refusals.warning(message)

    def _count(self, **increments: int) -> None:
        with self._count_lock:
            for name, n in increments.items():
                setattr(self.counts, name, getattr(self.counts, name) + n)

    # -- sockets ---------------------------------------------------------------------------
    def _open_feedback(self) -> None:
        host, port = self.feedback  # type: ignore[misc]
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        except socket.gaierror as exc:
            raise ValueError(f"OSC feedback host {host!r} does not resolve: {exc.strerror}") from None
        target_ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if port == self.port and (target_ip.is_loopback or self.host in ("", "0.0.0.0", "::")
                                  or info[4][0] == self.host):
            raise ValueError(f"OSC feedback to {host}:{port} would come back in: that is this server")
        sock = socket.socket(info[0], socket.SOCK_DGRAM)
        sock.setblocking(False)  # the render thread sends: a full buffer is a skipped message, not a wait
        self._feedback_sock, self._feedback_to = sock, info[4]

    def _close_feedback(self) -> None:
        sock, self._feedback_sock = self._feedback_sock, None
        if sock is not None:
            sock.close()
        with self._feedback_lock:
            self._feedback_pending = {}

    def _start_tcp(self, family: socket.AddressFamily) -> None:
        server = _OscTcpServer((self.host, self.port), family, self)
        self._tcp_server = server
        self._tcp_thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": POLL_INTERVAL},
                                            name="osc tcp", daemon=True)
        self._tcp_thread.start()


def _family(host: str) -> socket.AddressFamily:
    if host in ("", "0.0.0.0"):
        return socket.AF_INET
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)[0][0]
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve host {host!r}: {exc.strerror}") from None


def _grow_receive_buffer(sock: socket.socket) -> int:
    """Ask the kernel for RECEIVE_BUFFER bytes of receive buffer; return what it granted.

    A burst arrives faster than Python parses it, and a datagram that does not fit in the
    buffer is lost without a trace. SO_RCVBUFFORCE passes net.core.rmem_max but needs
    CAP_NET_ADMIN (root); otherwise SO_RCVBUF is capped at rmem_max.
    """
    if _SO_RCVBUFFORCE is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, RECEIVE_BUFFER)
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        except OSError:  # not root: the plain option below, capped by rmem_max
            log.debug("SO_RCVBUFFORCE refused; using SO_RCVBUF")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if granted < RECEIVE_BUFFER:
        log.info("OSC receive buffer is %d KiB (capped by net.core.rmem_max): a large burst may lose "
                 "messages; `sysctl -w net.core.rmem_max=%d` raises the cap", granted // 1024, RECEIVE_BUFFER)
    return granted


# -- TCP ------------------------------------------------------------------------------------

class _OscTcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily, osc: OscServer) -> None:
        self.address_family = family
        self.osc = osc
        self.connections: set[socket.socket] = set()
        super().__init__(address, _OscTcpHandler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.osc.admits(client_address[0])

    def close_connections(self) -> None:
        """Wake the connection threads blocked in recv so they end with the server."""
        for conn in list(self.connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:  # the peer closed it already: nothing to wake
                continue


class _OscTcpHandler(socketserver.BaseRequestHandler):
    """One TCP connection: OSC 1.0 (int32 size before each packet) or 1.1 (SLIP frames).

    The first byte tells them apart: a SLIP stream starts with END (0xC0), while a size
    prefix below 16 MiB starts with 0.
    """

    server: _OscTcpServer

    def handle(self) -> None:
        conn: socket.socket = self.request
        osc = self.server.osc
        self.server.connections.add(conn)
        try:
            slip = conn.recv(1, socket.MSG_PEEK) == _SLIP_END
            frames = _slip_frames(conn) if slip else _sized_frames(conn)

            def reply(dgram: bytes) -> None:
                conn.sendall(_slip_encode(dgram) if slip else struct.pack(">i", len(dgram)) + dgram)

            for packet in frames:
                osc.handle_packet(packet, self.client_address, reply)
        except OSError as exc:  # reset by the peer, or woken by stop(): the connection is over
            log.debug("OSC tcp connection from %s ended: %s", self.client_address[0], exc)
        except _TooLarge as exc:
            osc._refuse(1, f"OSC tcp from {self.client_address[0]}: {exc}; connection closed")
        finally:
            self.server.connections.discard(conn)


class _TooLarge(Exception):
    """A TCP peer announced or sent more than MAX_TCP_PACKET bytes without a frame end."""


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 65536))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _sized_frames(conn: socket.socket) -> Iterator[bytes]:
    while (header := _recv_exact(conn, 4)) is not None:
        (size,) = struct.unpack(">i", header)
        if not 0 <= size <= MAX_TCP_PACKET:
            raise _TooLarge(f"packet size {size} out of range")
        packet = _recv_exact(conn, size)
        if packet is None:
            return
        if packet:
            yield packet


def _slip_frames(conn: socket.socket) -> Iterator[bytes]:
    buffer = bytearray()
    while chunk := conn.recv(65536):
        buffer += chunk
        while (end := buffer.find(_SLIP_END)) >= 0:
            frame = bytes(buffer[:end])
            del buffer[: end + 1]
            if frame:  # OSC 1.1 puts END on both sides of a packet: empty frames between them
                yield frame.replace(b"\xdb\xdc", b"\xc0").replace(b"\xdb\xdd", b"\xdb")
        if len(buffer) > MAX_TCP_PACKET:
            raise _TooLarge("SLIP frame without an end")


def _slip_encode(dgram: bytes) -> bytes:
    return _SLIP_END + dgram.replace(_SLIP_ESC, b"\xdb\xdd").replace(_SLIP_END, b"\xdb\xdc") + _SLIP_END
