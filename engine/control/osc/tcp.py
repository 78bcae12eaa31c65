"""OSC over TCP: OSC 1.0 (an int32 size before each packet) and OSC 1.1 (SLIP frames), one
thread per connection, each packet handed to the OscServer as a datagram would be."""

from __future__ import annotations

import logging
import socket
import socketserver
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.control.osc.server import OscServer

log = logging.getLogger(__name__)

MAX_TCP_PACKET = 1 << 20  # a TCP peer announcing more than this is not speaking OSC
_SLIP_END, _SLIP_ESC = b"\xc0", b"\xdb"


class OscTcpServer(socketserver.ThreadingTCPServer):
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

    server: OscTcpServer

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
            osc.refuse(1, f"OSC tcp from {self.client_address[0]}: {exc}; connection closed")
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
