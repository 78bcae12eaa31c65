"""OSC feedback: every change that lands, sent to one host and port, newest value per path.

From OSC too: a TouchDesigner panel wants to see what it set. The registry's listener
keeps the newest value per path (render thread, frame boundary); ``send`` sends them once
per frame from the render thread on a non-blocking socket, so a full buffer is a message
kept for the next frame, never a wait.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from typing import Any

from engine.control.osc.address import encode_message
from engine.logsetup import RateLimitedLog
from engine.params import Change, ParamRegistry


class Feedback:
    """Values for one (host, port); ``open`` before the first ``send``."""

    def __init__(self, host: str, port: int, errors: RateLimitedLog) -> None:
        if not (isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536):
            raise ValueError(f"OSC feedback port {port!r} is not a port number")
        self.host = host
        self.port = port
        self._errors = errors
        self._sock: socket.socket | None = None
        self._to: tuple[Any, ...] | None = None
        self._pending: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    def open(self, own_host: str, own_port: int) -> None:
        """Resolve the target and make the socket; ValueError if it does not resolve or is the server itself."""
        try:
            info = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0]
        except socket.gaierror as exc:
            raise ValueError(f"OSC feedback host {self.host!r} does not resolve: {exc.strerror}") from None
        target_ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if self.port == own_port and (
            target_ip.is_loopback or own_host in ("", "0.0.0.0", "::") or info[4][0] == own_host
        ):
            raise ValueError(f"OSC feedback to {self.host}:{self.port} would come back in: that is this server")
        sock = socket.socket(info[0], socket.SOCK_DGRAM)
        sock.setblocking(False)  # the render thread sends: a full buffer is a skipped message, not a wait
        self._sock, self._to = sock, info[4]

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        with self._lock:
            self._pending = {}

    def note(self, change: Change) -> None:
        """Registry listener (render thread, frame boundary): keep the newest value per path."""
        if self._sock is None:
            return
        with self._lock:
            self._pending[change.path] = change.value

    def send(self, prefix: str, registry: ParamRegistry) -> tuple[int, int]:
        """Send what changed since the last frame (render thread); returns (sent, failed)."""
        sock, target = self._sock, self._to
        if sock is None or target is None:
            return 0, 0
        with self._lock:
            pending, self._pending = self._pending, {}
        items = list(pending.items())
        sent = failed = 0
        for i, (path, value) in enumerate(items):
            try:
                sock.sendto(encode_message(prefix + path, registry.param(path), value), target)
            except BlockingIOError:  # the send buffer is full: keep the rest for the next frame
                with self._lock:
                    for later_path, later_value in items[i:]:
                        self._pending.setdefault(later_path, later_value)
                failed += len(items) - i
                break
            except OSError as exc:
                failed += 1
                self._errors.warning(f"OSC feedback to {self.host}:{self.port} failed: {exc}")
                continue
            sent += 1
        return sent, failed
