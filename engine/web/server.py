"""The status page and phone remote: a small HTTP server on the standard library.

Why the standard library (``ThreadingHTTPServer``): the page needs a handful of JSON
routes, one JPEG and one static file, no websockets; a framework would add a
dependency and an event loop for nothing. Requests are served on their own threads and
never touch the engine's state directly: parameter changes go through the thread-safe
registry (``set`` validates at once, so a bad value is a 400 with the reason), actions
are posted to the render thread's queue, and reads come from ``StatusFeed`` snapshots.

Security (the rule of engine.control.access): bound to 127.0.0.1 by default. Bound to
any other address, a token is required (given, or generated and shown once); every
request must carry it as ``?token=`` or ``Authorization: Bearer``, compared in constant
time; an allowlist (``StatusConfig.allow``) also refuses other senders. Without a token
(loopback only) the Host header must name the loopback, which stops DNS-rebinding
pages. POSTs must be ``application/json`` with a matching Origin when one is sent,
which no cross-site form can forge.

Routes::

    GET  /                 the page (engine/web/static/index.html)
    GET  /health           JSON: the show's status (engine/status.py ShowStatus): fps, frame times,
                           scene, preset, uptime, drops, memory, source, parts, errors
    GET  /thumbnail.jpg    the output, downscaled, ~2 Hz (read back without stalling the frame)
    GET  /api/params       JSON: every parameter's record (paramdoc) and current value
    GET  /api/presets      JSON: presets (number, name, ok/error) and the current one
    GET  /api/actions      JSON: the actions this engine has, as declared (name, args, signature)
    POST /api/param        {"path": "/fx/kaleido/segments", "value": 6}
    POST /api/action       {"name": "scene/select", "args": ["passthrough"]}
    GET  /camera           the page that sends the browser's camera (--source webrtc)
    POST /api/webrtc/offer {"type": "offer", "sdp": "..."} -> the answer (engine/sources/webrtc.py)

HTTPS (``StatusConfig.cert``/``key``, or a self-signed pair from engine.web.tls): browsers
give the camera only to https pages or http://localhost, so the camera page off the
loopback needs it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from engine.control.access import Access, bearer, names_loopback
from engine.control.access import is_loopback as binds_loopback
from engine.control.actions import ActionError
from engine.logsetup import RateLimitedLog
from engine.paramdoc import param_record
from engine.params import Kind, ParamError
from engine.presets import PresetError
from engine.web.feed import StatusFeed

log = logging.getLogger(__name__)

DEFAULT_PORT = 9330
MAX_ACTION_ARGS = 8
MAX_ARG_TEXT = 10_000
SAFE_INTEGER = 2**53  # numbers beyond this are not exact in JavaScript or as floats
LINGER_S = 0.5
LINGER_BYTES = 1024 * 1024


@dataclass(frozen=True)
class StatusConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0: any free port (tests)
    token: str | None = None  # required off the loopback: None there generates one
    allow: tuple[str, ...] | None = None  # sender addresses or networks let in (None: anyone with the token)
    max_body: int = 64 * 1024
    max_connections: int = 32  # more at once are closed unanswered: a phone needs two or three
    request_timeout_s: float = 10.0  # a client that stops sending mid-request is dropped
    cert: str | None = None  # a PEM certificate (and ``key``): serve HTTPS
    key: str | None = None


class RemoteApp(Protocol):
    """What the server uses of the App (a Protocol so tests may stand in a smaller one)."""

    params: Any
    actions: Any
    presets: Any
    preset_name: str | None


class _Reply(Exception):
    """Ends a request early with a JSON error (the handler's one way to refuse)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


is_loopback = names_loopback  # engine.web's name for it: a host that names this machine, DNS not asked


class StatusServer:
    """A Control: the web page and JSON API. The socket is bound on construction.

    Binding early means a port in use is an OSError the CLI reports before the show
    starts; ``start()`` (called by the App with its controls) begins serving.
    """

    name = "web"

    def __init__(self, app: RemoteApp, feed: StatusFeed, config: StatusConfig = StatusConfig()) -> None:
        self.app = app
        self.feed = feed
        self.config = config
        token = config.token
        if token is not None and not token.strip():
            raise ValueError("the status page token must not be empty")
        self.open_to_network = not binds_loopback(config.host)
        self.token_generated = token is None and self.open_to_network
        self.token = secrets.token_urlsafe(18) if self.token_generated else token
        allow = None if config.allow is None else list(config.allow)
        self.access = Access.for_binding(config.host, allow, "the status page", token=self.token)
        static = resources.files("engine.web") / "static"
        self.page = (static / "index.html").read_bytes()
        self.camera_page = (static / "camera.html").read_bytes()
        self.webrtc: Any = None  # the show's WebRtcSource, when its source is ``webrtc``
        self.scheme = "https" if config.cert else "http"
        self._httpd = _HTTPServer(self, (config.host, config.port))
        if config.cert:
            self._httpd.socket = _tls_context(config.cert, config.key).wrap_socket(self._httpd.socket, server_side=True)
        self._thread: threading.Thread | None = None

    # -- Control ----------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The page's address; with the token in it when one is needed (say it once, to the operator)."""
        host = self.config.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        if ":" in host:
            host = f"[{host}]"
        query = f"?token={self.token}" if self.token else ""
        return f"{self.scheme}://{host}:{self.port}/{query}"

    @property
    def status(self) -> str:
        where = "network, token required" if self.token else "this machine only"
        return f"port {self.port} ({where})"

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="status page", daemon=True
            )
            self._thread.start()
            log.info("status page on port %d (%s)", self.port, "token required" if self.token else "this machine only")

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5.0)
            self._thread = None
        self._httpd.server_close()

    def frame(self, now: float) -> None:
        """Nothing per frame: the page is served from the snapshots the feed takes."""

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the routes (server threads) -------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self.feed.health()

    def params_json(self) -> list[dict[str, Any]]:
        registry = self.app.params
        out = []
        for param in registry.params():
            record = param_record(param)
            record["value"] = None if param.kind is Kind.TRIGGER else registry.target(param.path)
            out.append(record)
        return out

    def presets_json(self) -> dict[str, Any]:
        entries = self.app.presets.entries()
        return {
            "current": self.app.preset_name,
            "presets": [
                {"number": n, "name": e.name, "ok": e.error is None, "error": e.error} for n, e in enumerate(entries, 1)
            ],
        }

    def set_param(self, body: dict[str, Any]) -> dict[str, Any]:
        path, value = body.get("path"), body.get("value")
        if not isinstance(path, str) or "value" not in body:
            raise _Reply(400, 'expected {"path": "/group/name", "value": ...}')
        try:
            coerced = self.app.params.set(path, value, origin="web")
        except ParamError as exc:
            raise _Reply(400, str(exc)) from None
        return {"path": path, "value": coerced}

    def actions_json(self) -> list[dict[str, Any]]:
        """The actions this engine has, each as declared: the page builds its action controls from it."""
        return [spec.record() for spec in self.app.actions.available()]

    def post_action(self, body: dict[str, Any]) -> dict[str, Any]:
        """Queue an action; its declaration checks the arguments (a 400 names the signature)."""
        name, args = body.get("name"), body.get("args", [])
        if not isinstance(name, str) or not isinstance(args, list):
            raise _Reply(400, 'expected {"name": "scene/next", "args": [...]}')
        if len(args) > MAX_ACTION_ARGS or not all(_plain_arg(a) for a in args):
            raise _Reply(
                400,
                f"action arguments must be at most {MAX_ACTION_ARGS} numbers, "
                "texts or true/false (finite, and whole numbers below 2**53)",
            )
        try:
            bound = self.app.actions.post(name, *args, origin="web")
        except ActionError as exc:
            raise _Reply(400, str(exc)) from None
        return {"queued": name, "args": list(bound)}

    def webrtc_offer(self, body: dict[str, Any]) -> dict[str, Any]:
        """The camera page's offer, answered by the show's webrtc source (400: one line why not)."""
        if self.webrtc is None:
            raise _Reply(404, "this show's source is not webrtc (start it with --source webrtc)")
        from engine.sources.webrtc import OfferRefused

        try:
            return dict(self.webrtc.answer(body))
        except OfferRefused as exc:
            log.warning("webrtc offer refused: %s (the show plays on)", exc)
            raise _Reply(400, str(exc)) from None

    def authorised(self, query: dict[str, list[str]], authorization: str | None) -> bool:
        given = (query.get("token") or [""])[0] or bearer(authorization)
        return self.access.token_ok(given)


def _tls_context(cert: str, key: str | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"HTTPS certificate {cert}: {exc}") from None
    return context


def _plain_arg(value: Any) -> bool:
    """Action handlers expect text or numbers as OSC would send them, nothing nested."""
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return abs(value) < SAFE_INTEGER
    if isinstance(value, float):
        return math.isfinite(value) and abs(value) < SAFE_INTEGER
    return isinstance(value, str) and len(value) <= MAX_ARG_TEXT


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for a phone's slow request

    def __init__(self, owner: StatusServer, address: tuple[str, int]) -> None:
        self.owner = owner
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._slots = threading.BoundedSemaphore(owner.config.max_connections)
        self._strangers = RateLimitedLog(log)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.owner.access.admits(client_address[0]):
            self._strangers.warning(f"status page: connection from {client_address[0]} refused: not on the allowlist")
            self.close_request(request)  # at once, as below: the accepting thread must not linger on it
            return
        if not self._slots.acquire(blocking=False):
            log.warning("status page: too many connections; closing one from %s", client_address[0])
            self.close_request(request)  # at once: the accepting thread must not linger on it
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown_request(self, request: Any) -> None:
        """Close gently: read what the client still sends (a refused body) before closing.

        Closing a socket with unread data makes the kernel send a reset, and the client
        may lose the response that was already on its way: a 413 or 404 would arrive as
        "connection reset". So: stop writing, drain up to ``LINGER_BYTES`` for up to
        ``LINGER_S``, then close.
        """
        try:
            request.shutdown(socket.SHUT_WR)
            request.settimeout(LINGER_S)
            drained = 0
            while drained < LINGER_BYTES:
                chunk = request.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError as exc:  # the client has gone already: nothing left to be gentle with
            log.debug("status page: closing: %s", exc)
        self.close_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("status page: connection from %s failed", client_address[0])


_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",  # the token may be in the page's address
    "Cache-Control": "no-store",
}
_PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "dreamdeck"
    sys_version = ""

    def setup(self) -> None:
        self.timeout = self.server.owner.config.request_timeout_s
        super().setup()

    def parse_request(self) -> bool:
        """Only HTTP/1.x: http.server would answer HTTP/0.9 and HTTP/2 requests without a
        status line (the 0.9 form), which no client or monitor can read as an error."""
        self.requestline = self.raw_requestline.decode("iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        version = words[2] if len(words) == 3 else ""
        if not version.startswith("HTTP/1."):
            self.command, self.request_version, self.close_connection = "", "HTTP/1.0", True
            newer = re.fullmatch(r"HTTP/[2-9](\.\d)?", version) is not None
            self.send_error(505 if newer else 400, "HTTP/1.0 or HTTP/1.1 only" if newer else "bad request line")
            return False
        return super().parse_request()

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def do_POST(self) -> None:
        self._serve(send_body=True)

    def __getattr__(self, name: str) -> Callable[[], None]:
        # http.server answers a method it has no do_X for with 501 (a server error);
        # any other method is the client's mistake here: 405
        if name.startswith("do_"):
            return lambda: self._serve(send_body=True)
        raise AttributeError(name)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("status page: %s %s", self.address_string(), format % args)

    # -- one request ------------------------------------------------------------------------
    def _serve(self, send_body: bool) -> None:
        owner = self.server.owner
        self._send_body = send_body
        self._responded = False
        try:
            self._route(owner)
        except _Reply as reply:
            self._json(reply.status, {"error": reply.message}, reply.headers)
        except (ConnectionError, TimeoutError) as exc:
            log.debug("status page: client went away: %s", exc)
            self.close_connection = True
        except Exception:  # a bug in a route must cost one request, never the server thread
            log.exception("status page: %s %.200s failed", self.command, self.path)
            if not self._responded:
                self._json(500, {"error": "internal error (logged)"})

    def _route(self, owner: StatusServer) -> None:
        if not self.path.startswith("/"):
            raise _Reply(400, "the request target must be a path")
        try:
            parts = urlsplit(self.path)
        except ValueError:
            raise _Reply(400, "malformed request target") from None
        try:
            query = parse_qs(parts.query, max_num_fields=20)
        except ValueError:  # more fields than that is not a request of ours
            raise _Reply(400, "too many query fields") from None
        if not owner.authorised(query, self.headers.get("Authorization")):
            raise _Reply(
                401,
                "token required: add ?token=... or an Authorization: Bearer header",
                {"WWW-Authenticate": 'Bearer realm="dreamdeck"'},
            )
        if owner.token is None and not self._host_is_loopback():
            raise _Reply(403, "this server answers to localhost only (start it with a token to open it)")

        route = (self.command, parts.path)
        gets = {
            "/": self._page,
            "/index.html": self._page,
            "/health": lambda: self._json(200, owner.health()),
            "/thumbnail.jpg": self._thumbnail,
            "/api/params": lambda: self._json(200, owner.params_json()),
            "/api/presets": self._presets,
            "/api/actions": lambda: self._json(200, owner.actions_json()),
            "/camera": self._camera_page,
        }
        posts = {
            "/api/param": owner.set_param,
            "/api/action": owner.post_action,
            "/api/webrtc/offer": owner.webrtc_offer,
        }
        if route[0] in ("GET", "HEAD") and route[1] in gets:
            gets[route[1]]()
        elif route[0] == "POST" and route[1] in posts:
            self._json(202 if route[1] == "/api/action" else 200, posts[route[1]](self._read_json(owner)))
        elif route[1] in gets or route[1] in posts:
            allow = "GET, HEAD" if route[1] in gets else "POST"
            raise _Reply(405, f"{self.command} is not allowed here; use {allow}", {"Allow": allow})
        else:
            raise _Reply(404, f"nothing at {parts.path[:200]!r}")

    def _host_is_loopback(self) -> bool:
        host = self.headers.get("Host")
        if host is None:
            return True  # HTTP/1.0 clients may leave it out; a browser never does
        try:
            name = urlsplit("//" + host).hostname
        except ValueError:
            return False
        return name is not None and names_loopback(name)

    def _read_json(self, owner: StatusServer) -> dict[str, Any]:
        origin = self.headers.get("Origin")
        if origin is not None and origin != f"{owner.scheme}://{self.headers.get('Host', '')}":
            raise _Reply(403, "cross-site requests are not accepted")
        if (self.headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
            raise _Reply(415, "send JSON with Content-Type: application/json")
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            raise _Reply(411, "Content-Length required")
        if not length_text.strip().isdigit():
            raise _Reply(400, "bad Content-Length")
        length = int(length_text)
        if length > owner.config.max_body:
            self.close_connection = True
            raise _Reply(413, f"body larger than {owner.config.max_body} bytes")
        body = self.rfile.read(length)
        if len(body) < length:
            raise _Reply(400, "body shorter than its Content-Length")
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: [[[[...]]]]
            raise _Reply(400, f"body is not JSON: {str(exc)[:200]}") from None
        if not isinstance(data, dict):
            raise _Reply(400, "body must be a JSON object")
        return data

    def _page(self) -> None:
        self._send(200, self.server.owner.page, "text/html; charset=utf-8", {"Content-Security-Policy": _PAGE_CSP})

    def _camera_page(self) -> None:
        csp = _PAGE_CSP.replace("img-src", "media-src 'self' blob: mediastream:; img-src")
        self._send(200, self.server.owner.camera_page, "text/html; charset=utf-8", {"Content-Security-Policy": csp})

    def _thumbnail(self) -> None:
        jpeg = self.server.owner.feed.latest_jpeg()
        if jpeg is None:
            raise _Reply(503, "no frame yet", {"Retry-After": "1"})
        self._send(200, jpeg, "image/jpeg")

    def _presets(self) -> None:
        try:
            self._json(200, self.server.owner.presets_json())
        except (PresetError, OSError) as exc:
            raise _Reply(400 if isinstance(exc, PresetError) else 503, f"presets cannot be listed: {exc}") from None

    # -- responses ----------------------------------------------------------------------
    def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(data, default=_json_default, allow_nan=False).encode("utf-8")
        self._send(status, body, "application/json", headers)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self._responded = True
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**_SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self._send_body:
            self.wfile.write(body)
