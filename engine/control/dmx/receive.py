"""DMX over the network in: the sockets, the two packet formats, and what is refused.

One ``Receiver`` per protocol owns one UDP socket and one thread. For every datagram it
decides, in this order, and counts each refusal (``Counters``):

    flood          over the rate limit (a token bucket): dropped before it is even parsed
    not allowed    a sender outside the allowlist (a listener opened to the network)
    malformed      not a packet of the protocol, or one that breaks its own rules
    wrong universe a universe dreamdeck was not asked to listen to
    ignored        valid but not levels: Art-Net opcodes other than ArtDmx, sACN preview
                   data and non-zero start codes (per-address priority)

An ArtPoll (a desk looking for nodes) is answered with ArtPollReply, once a second per
desk at most, so that desks that send only to the nodes they found send here.

What is left is one universe's channel levels, which ``on_levels`` takes (the control
keeps only the newest per universe, for the render thread).

Art-Net's ArtDmx is parsed here (an 18-byte header, Art-Net 4): the Python Art-Net
receivers (stupidArtnet, python-artnet) bind every interface, cannot count what they drop,
and die or start a thread per packet on bad input. sACN (E1.31) is parsed by the ``sacn``
library, whose ``ReceiverHandler`` keeps the protocol's rules between packets (the
highest-priority source wins, out-of-order sequence numbers are dropped, a stream that
terminates or times out is let go). Its socket is ours: the library's binds every
interface on Linux, drops bad packets without a count, and lets a ValueError from a bad
field end its thread. Both are IPv4, as the protocols are.
"""

from __future__ import annotations

import importlib.util
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.control.access import Access, is_loopback
from engine.control.midimap import DMX_PROTOCOLS, DMX_UNIVERSES

log = logging.getLogger(__name__)

ARTNET_PORT = 6454
SACN_PORT = 5568
DEFAULT_PORTS = {"artnet": ARTNET_PORT, "sacn": SACN_PORT}
MAX_PACKET = 2048  # bytes read per datagram: the longest of either protocol is 638
# packets per second per protocol (DMX refreshes 44 times a second per universe). Art-Net is
# often broadcast, every universe to every node, and costs ~2 us to parse; an sACN packet ~130 us
# in the sacn library, and arrives only for the universes joined or sent to this machine.
RATE_LIMITS = {"artnet": 10000.0, "sacn": 1000.0}
BURST = 400  # packets let through at once before the limit bites (a desk sends its universes together)
POLL = 0.1  # seconds a receiver blocks before it looks whether it should stop
WARN_EVERY = 10.0  # seconds between two log lines about the same kind of refused packet

SACN_NEEDS = "sACN needs the sacn package: pip install 'dreamdeck[dmx]'"

ARTNET_ID = b"Art-Net\x00"
OP_DMX = 0x5000
OP_POLL = 0x2000
OP_POLL_REPLY = 0x2100
POLL_REPLY_EVERY = 1.0  # seconds: at most one ArtPollReply per poller this often (desks poll every 2.5-3 s)
NODE_NAME = "dreamdeck"
ARTNET_MIN_VERSION = 14
SEQUENCE_WINDOW = 20  # a sequence number this far behind the last is a late packet; further, a restarted desk

LevelsCallback = Callable[[str, int, bytes], None]


class MalformedPacket(ValueError):
    """A datagram that is not a valid packet of its protocol; the message says why."""


@dataclass(frozen=True)
class DmxInput:
    """One universe to listen to: ``artnet:0``, ``sacn:1``."""

    protocol: str
    universe: int

    def __str__(self) -> str:
        return f"{self.protocol}:{self.universe}"


def parse_inputs(specs: str | list[str] | tuple[str, ...]) -> tuple[DmxInput, ...]:
    """``artnet[:UNIVERSE]`` and ``sacn[:UNIVERSE]``, repeated or comma-separated; ValueError names a bad one.

    Without a universe: Art-Net's first (0) or sACN's first (1), as desks number them.
    """
    items = [specs] if isinstance(specs, str) else list(specs)
    found: list[DmxInput] = []
    for item in items:
        for spec in str(item).split(","):
            spec = spec.strip().lower()
            if not spec:
                continue
            protocol, _, number = spec.partition(":")
            if protocol not in DMX_PROTOCOLS:
                raise ValueError(f"DMX input {spec!r}: the protocol is artnet or sacn (e.g. artnet:0, sacn:1)")
            low, high = DMX_UNIVERSES[protocol]
            try:
                universe = int(number) if number else low
            except ValueError:
                raise ValueError(f"DMX input {spec!r}: the universe must be a whole number") from None
            if not low <= universe <= high:
                raise ValueError(f"DMX input {spec!r}: a {protocol} universe is {low}..{high}")
            if DmxInput(protocol, universe) not in found:
                found.append(DmxInput(protocol, universe))
    if not found:
        raise ValueError("no DMX input given: use artnet[:UNIVERSE] or sacn[:UNIVERSE]")
    return tuple(found)


def sacn_available() -> bool:
    return importlib.util.find_spec("sacn") is not None


def parse_artdmx(data: bytes) -> tuple[int, int, bytes] | None:
    """An ArtDmx packet's (universe, sequence, levels); None for another Art-Net opcode.

    Raises MalformedPacket for anything that is not Art-Net, or an ArtDmx whose header
    contradicts itself (a length past the end, an old protocol version, bit 15 of the
    port-address set).
    """
    if len(data) < 12 or data[:8] != ARTNET_ID:
        raise MalformedPacket("not an Art-Net packet")
    if int.from_bytes(data[8:10], "little") != OP_DMX:
        return None  # ArtPoll, ArtSync, ArtAddress...: not levels
    if len(data) < 18:
        raise MalformedPacket(f"ArtDmx of {len(data)} bytes is shorter than its header")
    version = int.from_bytes(data[10:12], "big")
    if version < ARTNET_MIN_VERSION:
        raise MalformedPacket(f"Art-Net protocol version {version} (14 or later)")
    address = int.from_bytes(data[14:16], "little")
    if address & 0x8000:
        raise MalformedPacket("ArtDmx port-address with bit 15 set")
    length = int.from_bytes(data[16:18], "big")
    if not 2 <= length <= 512 or len(data) < 18 + length:
        raise MalformedPacket(f"ArtDmx length {length} for {len(data) - 18} bytes of data (2..512)")
    return address, data[12], bytes(data[18 : 18 + length])


def artpoll_replies(ip: str, universes: frozenset[int]) -> list[bytes]:
    """The ArtPollReply packets that tell a desk polling for nodes what dreamdeck listens to.

    One reply describes up to four ports of one Net and Sub-Net (the top 11 bits of the
    15-bit port-address), so universes are grouped, each group a "bind index" from 1. Every
    port is an output port in Art-Net's terms: Art-Net in, DMX (here: parameters) out.
    """
    groups: dict[int, list[int]] = {}
    for universe in sorted(universes):
        groups.setdefault(universe >> 4, []).append(universe)
    chunks = [(high, group[i : i + 4]) for high, group in groups.items() for i in range(0, len(group), 4)]
    replies = []
    for index, (high, chunk) in enumerate(chunks, start=1):
        reply = bytearray(239)  # Art-Net 4's ArtPollReply, offsets as in its table
        reply[0:8] = ARTNET_ID
        reply[8:10] = OP_POLL_REPLY.to_bytes(2, "little")
        reply[10:14] = socket.inet_aton(ip)
        reply[14:16] = ARTNET_PORT.to_bytes(2, "little")
        reply[18], reply[19] = high >> 4, high & 0x0F  # NetSwitch, SubSwitch
        reply[20:22] = (0x00FF).to_bytes(2, "big")  # OEM: unknown
        reply[23] = 0xD0  # Status1: indicators normal, port-address set on this node
        reply[24:26] = (0x7FF0).to_bytes(2, "little")  # ESTA manufacturer: prototyping
        reply[26:43] = NODE_NAME.encode()[:17].ljust(17, b"\x00")
        reply[44:107] = b"dreamdeck: DMX to visuals".ljust(63, b"\x00")
        reply[108:171] = f"#0001 [{index:04}] listening to {len(universes)} universes".encode()[:63].ljust(63, b"\x00")
        reply[172:174] = len(chunk).to_bytes(2, "big")
        for port, universe in enumerate(chunk):
            reply[174 + port] = 0x80  # PortTypes: output (from Art-Net), DMX512
            reply[182 + port] = 0x80  # GoodOutputA: data is being output
            reply[190 + port] = universe & 0x0F  # SwOut
        reply[207:211] = socket.inet_aton(ip)  # BindIp
        reply[211] = index  # BindIndex
        reply[212] = 0x08  # Status2: 15-bit port-addresses
        replies.append(bytes(reply))
    return replies


@dataclass
class Counters:
    """What one receiver saw (its thread writes, anyone reads: plain ints)."""

    packets: int = 0  # every datagram read
    levels: int = 0  # packets of levels handed on
    flood: int = 0
    refused: int = 0  # not on the allowlist
    malformed: int = 0
    wrong_universe: int = 0
    ignored: int = 0
    polls: int = 0  # ArtPolls answered

    def refusals(self) -> dict[str, int]:
        """The refusals that happened, in words, for the status line."""
        named = {
            "malformed": self.malformed,
            "wrong universe": self.wrong_universe,
            "flood": self.flood,
            "not allowed": self.refused,
        }
        return {k: v for k, v in named.items() if v}


class TokenBucket:
    """At most ``rate`` per second on average, ``burst`` at once (its thread only)."""

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("the DMX rate limit needs a positive rate and a burst of at least 1")
        self.rate, self.burst = rate, float(burst)
        self._tokens = float(burst)
        self._last = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class Receiver:
    """One protocol's socket and thread: datagrams in, refusals counted, levels out."""

    def __init__(
        self,
        protocol: str,
        universes: frozenset[int],
        access: Access,
        on_levels: LevelsCallback,
        port: int | None = None,
        rate: float | None = None,
        burst: int = BURST,
    ) -> None:
        if protocol not in DMX_PROTOCOLS:
            raise ValueError(f"unknown DMX protocol {protocol!r}")
        self.protocol = protocol
        self.universes = universes
        self.access = access
        self.on_levels = on_levels
        self.requested_port = DEFAULT_PORTS[protocol] if port is None else port
        self.counters = Counters()
        self.last_problem: str | None = None
        self.multicast: list[str] = []  # the groups joined (sACN opened to the network only)
        self._bucket = TokenBucket(RATE_LIMITS[protocol] if rate is None else rate, burst)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._warned: dict[str, float] = {}
        self._artnet_sequence: dict[int, int] = {}
        self._polled: dict[str, float] = {}  # poller address -> when it was last answered
        self._sacn: _SacnRules | None = None  # made at start: it imports the sacn package

    @property
    def port(self) -> int:
        """The bound port (known once started: a requested port 0 picks a free one)."""
        return self._sock.getsockname()[1] if self._sock is not None else self.requested_port

    @property
    def address(self) -> str:
        return f"{self.access.host}:{self.port}"

    def start(self) -> None:
        """Bind (OSError if the port is taken) and start the thread."""
        if self._thread is not None:
            return
        if self.protocol == "sacn" and self._sacn is None:
            self._sacn = _SacnRules(self._sacn_levels)  # ImportError without the dmx extra
        self._sock = self._open()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name=f"dmx-{self.protocol}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _open(self) -> socket.socket:
        """Loopback: bound there, unicast only. Opened: bound there (any interface for the
        wildcard), and for sACN the multicast group of each universe joined on it."""
        host = self.access.host
        loopback = is_loopback(host)
        self.multicast = []
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        try:
            if not loopback:  # desks and other nodes share the DMX ports on a show network
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sacn_multicast = self.protocol == "sacn" and not loopback
            # Linux delivers multicast only to a socket bound to the wildcard (or the group)
            bind_host = "" if sacn_multicast or host in ("", "0.0.0.0") else host
            sock.bind((bind_host, self.requested_port))
            sock.settimeout(POLL)
            if sacn_multicast:
                interface = "0.0.0.0" if host in ("", "0.0.0.0") else host
                for universe in sorted(self.universes):
                    group = f"239.255.{universe >> 8}.{universe & 0xFF}"
                    membership = socket.inet_aton(group) + socket.inet_aton(interface)
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
                    self.multicast.append(group)
        except BaseException:
            sock.close()
            raise
        return sock

    # -- the receiver's thread ----------------------------------------------------------------
    def _run(self) -> None:
        sock = self._sock
        assert sock is not None
        next_tick = 0.0
        while not self._stopping.is_set():
            if self._sacn is not None and time.monotonic() >= next_tick:
                self._sacn.tick()  # sources that stopped sending are let go
                next_tick = time.monotonic() + POLL
            try:
                data, sender = sock.recvfrom(MAX_PACKET)
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    break
                self._problem("socket", f"DMX {self.protocol}: cannot read the socket: {exc}")
                self._stopping.wait(POLL)
                continue
            try:
                self._handle(data, sender)
            except Exception:  # a bug here must not deafen the desk for the rest of the show
                log.exception("DMX %s: handling a packet failed", self.protocol)
                self.last_problem = f"DMX {self.protocol}: handling a packet failed (see the log)"

    def _handle(self, data: bytes, sender: tuple[str, int]) -> None:
        ip = sender[0]
        counters = self.counters
        counters.packets += 1
        if not self._bucket.take():
            counters.flood += 1
            self._problem("flood", f"DMX {self.protocol}: over {self._bucket.rate:.0f} packets/s; dropping the excess")
            return
        if not self.access.admits(ip):
            counters.refused += 1
            self._problem("refused", f"DMX {self.protocol}: packet from {ip} refused (not on the allowlist)")
            return
        if self.protocol == "artnet":
            self._artnet(data, sender)
        else:
            assert self._sacn is not None
            self._sacn.packet(self, data, ip)

    def _artnet(self, data: bytes, sender: tuple[str, int]) -> None:
        ip = sender[0]
        if data[:8] == ARTNET_ID and data[8:10] == OP_POLL.to_bytes(2, "little"):
            self._answer_poll(sender)
            return
        try:
            parsed = parse_artdmx(data)
        except MalformedPacket as exc:
            self._malformed(ip, str(exc))
            return
        if parsed is None:
            self.counters.ignored += 1
            return
        universe, sequence, levels = parsed
        if not self._wanted(universe, ip):
            return
        last = self._artnet_sequence.get(universe)
        if sequence and last and 0 < (last - sequence) % 256 < SEQUENCE_WINDOW:
            self.counters.ignored += 1  # overtaken on the way: an older frame than the one applied
            return
        self._artnet_sequence[universe] = sequence
        self.counters.levels += 1
        self.on_levels("artnet", universe, levels)

    def _answer_poll(self, sender: tuple[str, int]) -> None:
        """Tell a desk that polls for nodes what is listened to (desks that send only to the nodes
        they found need it). Unicast to the poller's address and port (a desk polls from 6454)."""
        now = time.monotonic()
        if now - self._polled.get(sender[0], -POLL_REPLY_EVERY) < POLL_REPLY_EVERY:
            self.counters.ignored += 1
            return
        if len(self._polled) >= 256:  # spoofed pollers must not grow memory without bound
            self._polled.clear()
        self._polled[sender[0]] = now
        sock = self._sock
        if sock is None:
            return
        try:
            for reply in artpoll_replies(self._reply_ip(sender[0]), self.universes):
                sock.sendto(reply, sender)
        except OSError as exc:
            self._problem("poll", f"DMX artnet: cannot answer the ArtPoll of {sender[0]}: {exc}")
            return
        self.counters.polls += 1

    def _reply_ip(self, poller: str) -> str:
        """The address of this node as the poller sees it: the bound one, or for the wildcard
        the one the system routes to the poller from (a UDP connect sends nothing)."""
        bound = self._sock.getsockname()[0] if self._sock is not None else ""
        if bound not in ("", "0.0.0.0"):
            return bound
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((poller, ARTNET_PORT))
            address: str = probe.getsockname()[0]
            return address

    def _sacn_levels(self, universe: int, levels: bytes) -> None:
        self.counters.levels += 1
        self.on_levels("sacn", universe, levels)

    def _wanted(self, universe: int, ip: str) -> bool:
        if universe in self.universes:
            return True
        self.counters.wrong_universe += 1
        wanted = ", ".join(map(str, sorted(self.universes)))
        self._problem("universe", f"DMX {self.protocol}: universe {universe} from {ip} refused (listening to {wanted})")
        return False

    def _malformed(self, ip: str, why: str) -> None:
        self.counters.malformed += 1
        self._problem("malformed", f"DMX {self.protocol}: malformed packet from {ip} refused: {why}")

    def _problem(self, kind: str, message: str) -> None:
        """The status line's last problem; one log line per kind every WARN_EVERY seconds (a
        flood must not flood the log too)."""
        self.last_problem = message
        now = time.monotonic()
        if now - self._warned.get(kind, -WARN_EVERY) >= WARN_EVERY:
            self._warned[kind] = now
            log.warning("%s", message)


class _SacnRules:
    """sACN's rules between packets, kept by the ``sacn`` library's ReceiverHandler.

    A packet is looked at first here, cheaply (its length, the three E1.31 vectors, its
    universe, preview and start code: what the library would drop without a word, or what
    is not for us), then handed to the handler, which parses it once; a field out of range
    raises there (ValueError), and comes back to us as malformed. The handler's callback
    hands on the levels of the winning source.
    """

    def __init__(self, on_levels: Callable[[int, bytes], None]) -> None:
        from sacn.messages.root_layer import VECTOR_DMP_SET_PROPERTY, VECTOR_E131_DATA_PACKET, VECTOR_ROOT_E131_DATA
        from sacn.receiving.receiver_handler import ReceiverHandler, ReceiverHandlerListener
        from sacn.receiving.receiver_socket_base import ReceiverSocketBase

        outer = self

        class Listener(ReceiverHandlerListener):  # type: ignore[misc]  # (sacn has no type hints)
            def on_availability_change(self, universe: int, changed: str) -> None:
                if changed == "timeout":
                    log.info("DMX sacn: universe %d stopped (terminated or timed out)", universe)

            def on_dmx_data_change(self, packet) -> None:  # type: ignore[no-untyped-def]
                outer.on_levels(packet.universe, bytes(packet.dmxData))

        self.on_levels = on_levels
        self._vectors = (bytes(VECTOR_ROOT_E131_DATA), bytes(VECTOR_E131_DATA_PACKET), VECTOR_DMP_SET_PROPERTY)
        # a socket the handler never starts: ours reads, and feeds the handler
        self._handler = ReceiverHandler("", 0, Listener(), socket=ReceiverSocketBase(None))

    def packet(self, receiver: Receiver, data: bytes, ip: str) -> None:
        root, framing, dmp = self._vectors
        if len(data) < 126:
            receiver._malformed(ip, f"an sACN data packet of {len(data)} bytes (at least 126)")
            return
        if data[18:22] != root or data[40:44] != framing or data[117] != dmp:
            receiver._malformed(ip, "not an E1.31 data packet (its vectors)")
            return
        universe = int.from_bytes(data[113:115], "big")
        if not 1 <= universe <= 63999:
            receiver._malformed(ip, f"sACN universe {universe} (1..63999)")
            return
        if not receiver._wanted(universe, ip):
            return
        if data[112] & 0x80 or data[125] != 0:
            receiver.counters.ignored += 1  # a visualiser's preview, per-address priorities: not live levels
            return
        try:
            self._handler.on_data(data, time.time())
        except (TypeError, ValueError, IndexError) as exc:  # UnicodeDecodeError is a ValueError
            receiver._malformed(ip, str(exc) or type(exc).__name__)

    def tick(self) -> None:
        self._handler.on_periodic_callback(time.time())
