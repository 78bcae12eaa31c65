"""OSCQuery's network side: the HTTP answers and the WebSocket streams on one port, one thread.

    GET /dreamdeck/fx?VALUE                 plain HTTP: the tree (``OscQueryServer.answer``)
    GET / with Upgrade: websocket           a WebSocket (the spec's "bi-directional communication")

    client -> server, text    {"COMMAND": "LISTEN", "DATA": "/dreamdeck/fx/kaleido/segments"}
                              {"COMMAND": "IGNORE", "DATA": "/dreamdeck/fx/kaleido/segments"}
    client -> server, binary  an OSC packet, applied as the OSC server applies one over UDP
    server -> client, binary  one OSC message per value that changed, at most one per path a frame
    server -> client, text    {"COMMAND": "PATH_ADDED" | "PATH_REMOVED" | "PATH_CHANGED", "DATA": path}

Both run on the ``websockets`` library's asyncio server, in its own thread: a plain GET is
answered from ``process_request`` (the tree is built on a worker thread, so the loop keeps
streaming), an upgrade becomes a session.

The render thread never waits on this side. ``post`` (called from ``frame``) appends to a
deque and wakes the loop with ``call_soon_threadsafe``, which writes a byte to a non-blocking
socket: no lock the loop holds, no client, no network in the way. The loop fans each batch out
to per-client outboxes that keep the newest message per path, so a client that reads slowly gets
fewer messages, never a growing queue; one that stops reading is dropped by the WebSocket
keepalive (PING_INTERVAL + PING_TIMEOUT), one that vanishes when its connection breaks. The
render thread does not learn about either.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import http
import json
import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from engine.control.access import address_in, bearer, names_loopback
from engine.control.osc.address import encode_message
from engine.logsetup import RateLimitedLog
from engine.params import Param, float_param

if TYPE_CHECKING:
    from engine.control.oscquery import OscQueryServer

log = logging.getLogger(__name__)
# websockets' own log: a line at INFO for every connection, which is every HTTP request here
_protocol_log = logging.getLogger(__name__ + ".protocol")
_protocol_log.setLevel(logging.WARNING)

PING_INTERVAL = 5.0  # seconds between keepalive pings: a client that stops answering is dropped
PING_TIMEOUT = 10.0
CLOSE_TIMEOUT = 1.0  # seconds a closing handshake may take (stop, a client that went away)
MAX_MESSAGE = 65535  # bytes: a WebSocket message as large as a UDP datagram, no larger
MAX_NOTES = 256  # path notices one client may have waiting; past it, one PATH_CHANGED "/" says it all
MAX_REPLIES = 1024  # /get replies one client may have waiting
MAX_INBOX = 600  # frames of values the loop may fall behind by (10 s at 60 fps) before they are skipped
# Bytes that may wait for one client, in our buffer and the kernel's: past them, sending to that
# client waits and its outbox coalesces (newest value per path), so a slow reader gets fresh
# values late rather than stale ones later still.
WRITE_LIMIT = 32 * 1024
SEND_BUFFER = 32 * 1024
# The batched write uses websockets' connection internals (send_context, protocol, send_data;
# websockets 17 tested); without them, every message is sent on its own.
_BATCHED = all(hasattr(ServerConnection, name) for name in ("send_context", "send_data"))
NORM_PARAM = float_param("/norm", 0.0, 0.0, 1.0)  # how a 0..1 value is encoded


@dataclass(eq=False)
class WsClient:
    """One WebSocket session: what it listens to and what waits to be sent to it."""

    conn: ServerConnection
    ip: str
    may_write: bool  # the token, when the server has one, came with the upgrade
    paths: set[str] = field(default_factory=set)
    outbox: dict[str, bytes] = field(default_factory=dict)  # newest value message per path
    notes: list[str] = field(default_factory=list)  # PATH_* notices (JSON text)
    replies: list[bytes] = field(default_factory=list)  # answers to /get over this socket
    wake: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class StreamCounts:
    """For the HUD and the tests (loop thread writes, anyone reads)."""

    clients: int = 0  # connected now
    pushed: int = 0  # value messages sent to clients
    refused: int = 0  # OSC packets over the WebSocket refused before the OSC server saw them (no token)
    commands_refused: int = 0  # text messages that were not a LISTEN or IGNORE of a readable path
    skipped: int = 0  # frames of values not handed over: the server thread was that far behind


class StreamHub:
    """The asyncio server thread: HTTP answers, WebSocket sessions, LISTEN fan-out."""

    def __init__(self, query: OscQueryServer, counts: StreamCounts) -> None:
        self.query = query
        self.counts = counts
        # The union of every client's LISTEN paths, replaced whole (never mutated) by the loop:
        # the render thread reads it without a lock.
        self.listened: frozenset[str] = frozenset()
        self._clients: set[WsClient] = set()
        self._inbox: collections.deque[tuple[str, Any]] = collections.deque()
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._refusals = RateLimitedLog(log)

    # -- life cycle (caller's thread) ------------------------------------------------------
    def start(self, host: str, port: int) -> int:
        """Bind and serve; returns the bound port. OSError if the port cannot be had."""
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(host, port, ready), name="oscquery", daemon=True)
        self._thread.start()
        try:
            return ready.result(timeout=10.0)
        except BaseException:
            self._thread.join(timeout=2.0)
            self._thread = None
            raise

    def stop(self) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        self._loop = None

    @property
    def has_clients(self) -> bool:
        return bool(self._clients)

    # -- the render thread -----------------------------------------------------------------
    def post(self, kind: str, data: Any) -> None:
        """Hand a batch to the loop without waiting: ("values", {full_path: (param, value)}) or
        ("paths", ([(command, full_path)], removed_full_paths))."""
        loop = self._loop
        if loop is None:
            return
        if kind == "values" and len(self._inbox) >= MAX_INBOX:  # the loop is stuck: newer values will follow
            self.counts.skipped += 1
            return
        self._inbox.append((kind, data))
        if not self._scheduled:
            self._scheduled = True
            with contextlib.suppress(RuntimeError):  # closed while we looked: the batch goes with it
                loop.call_soon_threadsafe(self._deliver)

    # -- the loop thread -------------------------------------------------------------------
    def _run(self, host: str, port: int, ready: concurrent.futures.Future[int]) -> None:
        try:
            asyncio.run(self._main(host, port, ready))
        except Exception as exc:  # start() must hear of it rather than wait out its timeout
            if not ready.done():
                ready.set_exception(exc)
            else:
                log.exception("OSCQuery server thread failed")

    async def _main(self, host: str, port: int, ready: concurrent.futures.Future[int]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        try:
            server: Server = await serve(
                self._session,
                host or None,
                port,
                process_request=self._process_request,
                create_connection=self._gated_connection(),
                server_header="dreamdeck-oscquery",
                compression=None,  # permessage-deflate: CPU per message for a few bytes each
                ping_interval=PING_INTERVAL,
                ping_timeout=PING_TIMEOUT,
                close_timeout=CLOSE_TIMEOUT,
                max_size=MAX_MESSAGE,
                max_queue=64,
                write_limit=WRITE_LIMIT,
                logger=_protocol_log,
            )
        except OSError as exc:
            ready.set_exception(exc)
            return
        ready.set_result(server.sockets[0].getsockname()[1])
        await self._stopping.wait()
        server.close()
        await server.wait_closed()

    def _deliver(self) -> None:
        """Take every batch the render thread posted; newest value per path across them."""
        self._scheduled = False  # first: a batch posted while we drain schedules another round
        values: dict[str, tuple[Param, Any]] = {}
        while self._inbox:
            kind, data = self._inbox.popleft()
            if kind == "values":
                values.update(data)
            else:
                self._paths_changed(*data)
        if values:
            self._fan_out(values)

    def _fan_out(self, values: dict[str, tuple[Param, Any]]) -> None:
        encoded: dict[str, bytes] = {}
        for client in self._clients:
            wanted = client.paths.intersection(values)
            if not wanted:
                continue
            for path in wanted:
                message = encoded.get(path)
                if message is None:
                    param, value = values[path]
                    message = encoded[path] = encode_message(path, param, value)
                client.outbox[path] = message
            client.wake.set()

    def _paths_changed(self, notes: list[tuple[str, str]], removed: frozenset[str]) -> None:
        texts = [json.dumps({"COMMAND": command, "DATA": path}) for command, path in notes]
        for client in self._clients:
            client.notes.extend(texts)
            if len(client.notes) > MAX_NOTES:  # the spec lets a server coalesce to a common path
                client.notes = [json.dumps({"COMMAND": "PATH_CHANGED", "DATA": "/"})]
            if removed:  # a method that is gone is no longer streamed (the spec's rule)
                client.paths -= removed
                for path in removed:
                    client.outbox.pop(path, None)
            client.wake.set()
        if removed:
            self._publish_listened()

    def _publish_listened(self) -> None:
        self.listened = frozenset().union(*(client.paths for client in self._clients))

    # -- HTTP and the upgrade --------------------------------------------------------------
    def _gated_connection(self) -> type[ServerConnection]:
        """Connections that check the allowlist as they are accepted: a sender not on it is cut
        off before a byte is read, unanswered, as every dreamdeck listener does."""
        query = self.query

        class Gated(ServerConnection):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                sock = transport.get_extra_info("socket")
                if sock is not None:  # little in flight: a slow client gets fresh values, not a backlog
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
                peer = transport.get_extra_info("peername")
                if not peer or not query.admits(str(peer[0])):
                    transport.abort()

            def send_data(self) -> None:
                """The frames waiting, written as one piece: websockets writes each frame on its own,
                a system call per frame, which at 30,000 messages a second is most of the cost.
                An empty chunk means half-close, as in websockets' own send_data."""
                pending: list[bytes] = []
                for data in self.protocol.data_to_send():
                    if data:
                        pending.append(data)
                        continue
                    if pending:
                        self.transport.write(b"".join(pending))
                        pending = []
                    if self.transport.can_write_eof():
                        with contextlib.suppress(Exception):
                            self.transport.write_eof()
                    else:
                        self.transport.close()
                if pending:
                    self.transport.write(b"".join(pending))

        return Gated

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        """Answer a plain GET with the tree; let an upgrade through unless a foreign page asks."""
        if "websocket" not in request.headers.get("Upgrade", "").lower():
            return await self._answer(conn, request)
        origin = request.headers.get("Origin")
        if origin is not None and not self._origin_ok(origin):
            self._refusals.warning(f"OSCQuery: WebSocket from a page at {origin[:80]!r} refused (not this machine)")
            return conn.respond(http.HTTPStatus.FORBIDDEN, "WebSocket from this page's origin refused\n")
        return None

    async def _answer(self, conn: ServerConnection, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            refused = conn.respond(http.HTTPStatus.METHOD_NOT_ALLOWED, "OSCQuery is read with GET\n")
            refused.headers["Allow"] = "GET, HEAD"
            return refused
        local_ip = str(conn.local_address[0])
        try:  # building the whole tree takes milliseconds: not on the loop, which keeps streaming
            status, body = await asyncio.to_thread(self.query.answer, request.path, local_ip)
        except Exception:  # a bug in one answer must not take the server down; the log has the traceback
            log.exception("OSCQuery: answering %r failed", request.path[:200])
            status, body = 500, {"ERROR": "internal error (see the dreamdeck log)"}
        data = b"" if body is None else json.dumps(body).encode("utf-8")
        headers = Headers()
        if body is not None:
            headers["Content-Type"] = "application/json"
        headers["Content-Length"] = str(len(data))
        headers["Connection"] = "close"
        return Response(status, http.HTTPStatus(status).phrase, headers, b"" if request.method == "HEAD" else data)

    def _origin_ok(self, origin: str) -> bool:
        """A browser page may open a WebSocket only from this machine or an allowlisted address.

        A page from anywhere on the web, open in the operator's browser, could otherwise reach
        ws://localhost and drive the show (cross-site WebSocket hijacking). Native clients send
        no Origin. Names are not resolved: a DNS-rebinding name must not pass for loopback.
        """
        host = urlsplit(origin).hostname or ""
        if names_loopback(host):
            return True
        networks = self.query.access.networks
        return networks is not None and address_in(host, networks)

    def _token_ok(self, request: Request) -> bool:
        given = (parse_qs(urlsplit(request.path).query).get("token") or [""])[0]
        return self.query.access.token_ok(given or bearer(request.headers.get("Authorization")))

    # -- a session -------------------------------------------------------------------------
    async def _session(self, conn: ServerConnection) -> None:
        assert conn.request is not None  # a session starts after the upgrade request
        client = WsClient(conn, str(conn.remote_address[0]), self._token_ok(conn.request))
        self._clients.add(client)
        self.counts.clients = len(self._clients)
        sender = asyncio.create_task(self._send_loop(client))
        try:
            async for message in conn:
                if isinstance(message, str):
                    self._command(client, message)
                else:
                    self._osc_in(client, message)
        except ConnectionClosed:  # gone without a closing handshake: routine
            pass
        finally:
            self._clients.discard(client)
            self.counts.clients = len(self._clients)
            sender.cancel()
            self._publish_listened()

    async def _send_loop(self, client: WsClient) -> None:
        """Send what waits for one client; while a send waits on it, its outbox keeps coalescing."""
        conn = client.conn
        try:
            while True:
                await client.wake.wait()
                client.wake.clear()
                notes, client.notes = client.notes, []
                replies, client.replies = client.replies, []
                outbox, client.outbox = client.outbox, {}
                # One WebSocket message per OSC message (what every client parses), all of them
                # framed in one go and written in one piece (see Gated.send_data).
                if _BATCHED:
                    async with conn.send_context():
                        for text in notes:
                            conn.protocol.send_text(text.encode("utf-8"))
                        for data in (*replies, *outbox.values()):
                            conn.protocol.send_binary(data)
                else:  # a websockets without them: one send each, slower but the same messages
                    for message in (*notes, *replies, *outbox.values()):
                        await conn.send(message)
                self.counts.pushed += len(outbox)
        except ConnectionClosed:
            pass

    def _command(self, client: WsClient, text: str) -> None:
        try:
            message = json.loads(text)
            command, path = message["COMMAND"], message["DATA"]
        except (ValueError, TypeError, KeyError):
            self._refuse_command(client, f"not a {{COMMAND, DATA}} object: {text[:60]!r}")
            return
        if command not in ("LISTEN", "IGNORE") or not isinstance(path, str):
            self._refuse_command(client, f"unknown command {str(command)[:30]!r} (LISTEN and IGNORE are served)")
            return
        if command == "IGNORE":
            client.paths.discard(path)
            client.outbox.pop(path, None)
        elif self.query.listen_target(path) is None:
            self._refuse_command(client, f"LISTEN {path[:80]!r}: no readable value there")
            return
        else:
            client.paths.add(path)
        self._publish_listened()

    def _refuse_command(self, client: WsClient, why: str) -> None:
        self.counts.commands_refused += 1
        self._refusals.warning(f"OSCQuery WebSocket from {client.ip}: {why}")

    def _osc_in(self, client: WsClient, packet: bytes) -> None:
        """An OSC packet from the client: the OSC server's rules (allowlist, checks, all or nothing)."""
        osc = self.query.osc
        if osc is None or not client.may_write:
            self.counts.refused += 1
            why = "no OSC server to apply it" if osc is None else "no token (connect with ?token=...)"
            self._refusals.warning(f"OSCQuery WebSocket from {client.ip}: OSC refused: {why}")
            return

        def reply(data: bytes) -> None:
            if len(client.replies) < MAX_REPLIES:
                client.replies.append(data)
                client.wake.set()

        try:
            osc.handle_packet(packet, client.conn.remote_address, reply)
        except Exception:  # a bug must not end the session: loud, then go on
            log.exception("OSCQuery: a packet over the WebSocket from %s broke the handler", client.ip)
