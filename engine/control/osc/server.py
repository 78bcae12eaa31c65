"""The OSC server: UDP (and TCP) listeners that parse, check and queue; never more.

One thread reads the UDP socket (and, optionally, one per TCP connection) and does no more
than parse, validate and queue: values land at the next frame boundary through the registry,
actions run there through ``Actions``. Whatever that thread has not got to by a frame
boundary (it starves while moderngl holds the GIL) the render thread takes, within a small
budget, in arrival order. A packet is all or nothing: a bundle (nested bundles too) is
validated whole and lands in one frame, or not at all. Timetags are ignored: a performance
wants a value now, and sleeping until a timetag would stall every later message.

Live input is untrusted: a wrong address, type or range is refused with one log line (at
most one a second, with a count of what was held back) and counted for the HUD; the server
never stops answering. Who may send is ``engine.control.access``'s rule.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.control.access import Access
from engine.control.actions import ActionError, Actions
from engine.control.osc.address import (
    MALFORMED,
    PREFIX,
    SKIP,
    action_args,
    address_collisions,
    compile_pattern,
    encode_message,
    has_pattern,
    messages_in,
    normalised_value,
    param_value,
)
from engine.control.osc.feedback import Feedback
from engine.control.osc.tcp import OscTcpServer
from engine.logsetup import RateLimitedLog
from engine.params import Change, Kind, Param, ParamError, ParamRegistry

log = logging.getLogger(__name__)

# Not the defaults of Resolume (7000), TouchOSC (8000/9000), MadMapper (8010) or QLab (53000).
DEFAULT_OSC_PORT = 9321
ORIGIN = "osc"
RECEIVE_BUFFER = 8 * 1024 * 1024  # bytes; holds a 10,000-message burst while Python catches up
MAX_DATAGRAM = 65535
POLL_INTERVAL = 0.05  # seconds a server loop waits before checking whether to stop
FRAME_BUDGET = 0.004  # seconds of a frame the render thread may spend on packets the thread fell behind on
LOCK_WAIT = 0.001  # seconds the render thread waits for the receive thread to finish its packet
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33 if sys.platform.startswith("linux") else None)

Reply = Callable[[bytes], None]


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

    def __init__(
        self,
        registry: ParamRegistry,
        actions: Actions,
        host: str = "127.0.0.1",
        port: int = DEFAULT_OSC_PORT,
        allow: list[str] | None = None,
        feedback: tuple[str, int] | None = None,
        prefix: str = PREFIX,
        tcp: bool = False,
    ) -> None:
        if not prefix.startswith("/") or prefix.endswith("/"):
            raise ValueError(f"OSC prefix {prefix!r} must look like /name")
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
        self.access = Access.for_binding(host, allow, "OSC")
        self._refusals = RateLimitedLog(log)
        self._strangers = RateLimitedLog(log)
        self._send_errors = RateLimitedLog(log)
        self._feedback = None if feedback is None else Feedback(feedback[0], feedback[1], self._send_errors)
        self._count_lock = threading.Lock()
        self._receive_lock = threading.Lock()  # one reader at a time: packets stay in order
        self._stop = threading.Event()
        self._udp: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._tcp_server: OscTcpServer | None = None
        self._tcp_thread: threading.Thread | None = None
        self._paths: tuple[str, ...] = ()
        self._expansions: dict[str, tuple[str, ...]] = {}
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
            if self._feedback is not None:
                self._feedback.open(self.host, self.port)
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
            raise OSError(
                exc.errno,
                f"OSC cannot listen on {self.host}:{self.port}: {exc.strerror or exc} "
                "(is another program using this port?)",
            ) from exc
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
        log.info("OSC listening on udp%s %s:%d under %s", "+tcp" if self.tcp else "", self.host, self.port, self.prefix)

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
        if self._feedback is not None:
            sent, failed = self._feedback.send(self.prefix, self.registry)
            self._count(sent=sent, send_failed=failed)

    def _on_change(self, change: Change) -> None:
        """Registry listener (render thread, frame boundary): keep the newest value per path."""
        if self._feedback is not None:
            self._feedback.note(change)

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
        if self.access.admits(sender_ip):
            return True
        self._count(dropped=1)
        self._strangers.warning(f"OSC from {sender_ip} dropped: not on the allowlist")
        return False

    def handle_packet(self, packet: bytes, sender: tuple[Any, ...], reply: Reply) -> None:
        """Everything one packet asks for, all or nothing: a bundle lands in one frame or not at all."""
        if not self.admits(sender[0]):
            return
        try:
            messages, bundled = messages_in(packet)
        except MALFORMED as exc:
            self.refuse(1, f"OSC from {sender[0]}: malformed packet ({exc})")
            return
        plan = _Plan()
        address = "(empty bundle)"
        try:
            for address, args in messages:
                self._resolve(address, args, plan)
            address = "(bundle)" if bundled else address
            if plan.values:
                self.registry.set_many(plan.values, origin=ORIGIN)
        except (ParamError, ActionError) as exc:
            what = f"bundle of {len(messages)} refused, nothing applied" if bundled else "refused"
            self.refuse(len(messages), f"OSC {what}: {address}: {exc}")
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
        rest = address[len(self.prefix) :]
        if rest in self.registry:
            self._plan_value(self.registry.param(rest), args, plan)
        elif rest == "/get":
            plan.gets.extend(self._get_paths(args))
        elif rest.startswith("/norm/"):
            for path in self._params_at(rest[len("/norm") :]):
                plan.values[path] = normalised_value(self.registry.param(path), args)
        elif rest[1:] in self.actions.specs:
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
        if value is not SKIP:
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
        return path[len(self.prefix) :] if path.startswith(self.prefix + "/") else path

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
        """The arguments to post, checked by the action's declaration; None for a button's release.

        A path argument may carry the OSC prefix (``/dreamdeck/fx/...``, as TouchDesigner
        copies an address) and must name a parameter.
        """
        spec = self.actions.spec(name)  # ActionError if this engine lacks it
        bound = action_args(spec, args)
        if bound is None:
            return None
        paths = [i for i, arg in enumerate(spec.args) if arg.type == "path"]
        if not paths:
            return bound
        out = list(bound)
        for i in paths:
            out[i] = self._strip_prefix(out[i])
            if out[i] not in self.registry:
                raise ActionError(f"{spec.signature}: unknown parameter {out[i]!r:.60}")
        return tuple(out)

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

    def refuse(self, messages: int, message: str) -> None:
        """Count and log (rate-limited) messages refused; the last one shows in the HUD."""
        self.last_error = message
        self._count(received=messages, rejected=messages)
        self._refusals.warning(message)

    def _count(self, **increments: int) -> None:
        with self._count_lock:
            for name, n in increments.items():
                setattr(self.counts, name, getattr(self.counts, name) + n)

    # -- sockets ---------------------------------------------------------------------------
    def _close_feedback(self) -> None:
        if self._feedback is not None:
            self._feedback.close()

    def _start_tcp(self, family: socket.AddressFamily) -> None:
        server = OscTcpServer((self.host, self.port), family, self)
        self._tcp_server = server
        self._tcp_thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": POLL_INTERVAL}, name="osc tcp", daemon=True
        )
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
        log.info(
            "OSC receive buffer is %d KiB (capped by net.core.rmem_max): a large burst may lose "
            "messages; `sysctl -w net.core.rmem_max=%d` raises the cap",
            granted // 1024,
            RECEIVE_BUFFER,
        )
    return granted
