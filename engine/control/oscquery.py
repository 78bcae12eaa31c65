"""OSCQuery: the OSC address space as JSON over HTTP, so VDMX, MadMapper, Chataigne or a
TouchDesigner OSCQuery component can list every parameter with its type, range and value.

Follows the Vidvox OSCQuery proposal (github.com/Vidvox/OSCQueryProposal):

    GET /                                  the whole tree
    GET /dreamdeck/fx/kaleido/segments     one node
    GET /dreamdeck/fx/kaleido/segments?VALUE   {"VALUE": [6]}   (any attribute alone)
    GET /?HOST_INFO                        name, OSC port and transport, supported attributes

A node has FULL_PATH and DESCRIPTION; a container has CONTENTS; a parameter has TYPE (OSC
type tags: f, i, T for bools, s for text and enums, r for colours, N for triggers), ACCESS
(3 read/write; 2 write-only for triggers and actions), VALUE (as set, before smoothing and
modulation), RANGE ([{MIN, MAX}] or [{VALS}]) and UNIT. An unknown path is 404; an attribute
this server does not know is 400; one it knows that the node lacks is 204 (the spec's rules).

The server runs on its own threads (stdlib ThreadingHTTPServer) and only reads the
registry. No streaming (LISTEN over WebSocket): controllers get changes from OSC feedback.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from engine.control.access import Access
from engine.control.actions import ACTIONS, Actions, ActionSpec
from engine.control.osc import POLL_INTERVAL, PREFIX
from engine.logsetup import RateLimitedLog
from engine.params import Kind, Param, ParamRegistry

log = logging.getLogger(__name__)

DEFAULT_OSCQUERY_PORT = 9322  # next to DEFAULT_OSC_PORT (9321)
REQUEST_TIMEOUT = 10.0  # seconds a connection may sit idle before its thread lets it go

# What this server answers; HOST_INFO advertises it so clients do not ask for more.
EXTENSIONS = {
    "ACCESS": True,
    "VALUE": True,
    "RANGE": True,
    "DESCRIPTION": True,
    "TYPE": True,
    "UNIT": True,
    "CLIPMODE": True,
    "TAGS": False,
    "EXTENDED_TYPE": False,
    "CRITICAL": False,
    "OVERLOADS": False,
    "HTML": False,
    "LISTEN": False,
    "PATH_CHANGED": False,
    "PATH_RENAMED": False,
    "PATH_ADDED": False,
    "PATH_REMOVED": False,
}
ATTRIBUTES = frozenset({"FULL_PATH", "CONTENTS"} | {name for name, on in EXTENSIONS.items() if on})

_TYPE_TAGS = {
    Kind.FLOAT: "f",
    Kind.INT: "i",
    Kind.BOOL: "T",
    Kind.ENUM: "s",
    Kind.STRING: "s",
    Kind.COLOUR: "r",
    Kind.TRIGGER: "N",
}
# An action argument's OSC type; "str|int" is a name or a number, and a name always works.
_ARG_TAGS = {"str": "s", "text": "s", "path": "s", "int": "i", "float": "f", "str|int": "s"}


# -- the tree -------------------------------------------------------------------------------


def json_value(param: Param, value: Any) -> Any:
    """A registry value as the spec's JSON form of its OSC type (colours are '#rrggbbaa')."""
    if param.kind is Kind.COLOUR:
        return "#" + "".join(f"{round(channel * 255):02x}" for channel in value)
    return value


def param_node(full_path: str, param: Param, value: Any) -> dict[str, Any]:
    node: dict[str, Any] = {
        "FULL_PATH": full_path,
        "DESCRIPTION": param.description or param.path,
        "TYPE": _TYPE_TAGS[param.kind],
    }
    if param.kind is Kind.TRIGGER:
        node["ACCESS"] = 2
        return node
    node["ACCESS"] = 3
    node["VALUE"] = [json_value(param, value)]
    if param.kind in (Kind.FLOAT, Kind.INT):
        node["RANGE"] = [{"MIN": param.min, "MAX": param.max}]
    elif param.kind is Kind.ENUM:
        node["RANGE"] = [{"VALS": list(param.choices)}]
    if param.unit:
        node["UNIT"] = [param.unit]
    return node


def norm_node(full_path: str, param: Param, value: Any) -> dict[str, Any]:
    """The 0..1 form of a number, enum or bool: out-of-range values are clamped ("both")."""
    return {
        "FULL_PATH": full_path,
        "DESCRIPTION": f"{param.path} as 0..1 (for CHOP channels and faders)",
        "TYPE": "f",
        "ACCESS": 3,
        "VALUE": [param.normalise(value)],
        "RANGE": [{"MIN": 0.0, "MAX": 1.0}],
        "CLIPMODE": ["both"],
    }


def action_node(full_path: str, spec: ActionSpec) -> dict[str, Any]:
    """An action as a write-only method: TYPE is its required arguments' tags ("N", an impulse,
    for none); DESCRIPTION says what it does and its whole signature, optional arguments too."""
    tags = "".join(_ARG_TAGS[arg.type] for arg in spec.args if arg.required)
    return {
        "FULL_PATH": full_path,
        "DESCRIPTION": f"{spec.description}: {spec.signature}",
        "TYPE": tags or "N",
        "ACCESS": 2,
    }


def build_tree(registry: ParamRegistry, actions: Iterable[ActionSpec], prefix: str = PREFIX) -> dict[str, Any]:
    """The whole address space as one OSCQuery node (the answer to ``GET /``)."""
    root: dict[str, Any] = {"FULL_PATH": "/", "DESCRIPTION": "dreamdeck", "CONTENTS": {}}
    for param in registry.params():
        value = None if param.kind is Kind.TRIGGER else registry.target(param.path)
        _insert(root, prefix + param.path, param_node(prefix + param.path, param, value))
        if param.kind in (Kind.FLOAT, Kind.INT, Kind.ENUM, Kind.BOOL):
            full_path = f"{prefix}/norm{param.path}"
            _insert(root, full_path, norm_node(full_path, param, value))
    for spec in actions:
        full_path = f"{prefix}/{spec.name}"
        _insert(root, full_path, action_node(full_path, spec))
    _insert(
        root,
        f"{prefix}/get",
        {
            "FULL_PATH": f"{prefix}/get",
            "TYPE": "s",
            "ACCESS": 2,
            "DESCRIPTION": f"Reply {prefix}<path> <value> to the sender for each path or pattern; "
            "no argument: every value",
        },
    )
    _describe_containers(root)
    return root


def _insert(root: dict[str, Any], full_path: str, method: dict[str, Any]) -> None:
    node = root
    walked = ""
    for part in full_path.strip("/").split("/"):
        walked += "/" + part
        contents = node.setdefault("CONTENTS", {})
        node = contents.setdefault(part, {"FULL_PATH": walked})
    node.update(method)  # a node may be a method and a container at once (the spec allows it)


def _describe_containers(node: dict[str, Any]) -> None:
    for child in node.get("CONTENTS", {}).values():
        _describe_containers(child)
        if "CONTENTS" in child:
            child.setdefault("DESCRIPTION", child["FULL_PATH"])
            child.setdefault("ACCESS", 0)


def find_node(tree: dict[str, Any], path: str) -> dict[str, Any] | None:
    node = tree
    for part in path.strip("/").split("/") if path.strip("/") else ():
        node = node.get("CONTENTS", {}).get(part)
        if node is None:
            return None
    return node


# -- the server -----------------------------------------------------------------------------


class OscQueryServer:
    """Serves the OSCQuery tree over HTTP; a Control (start, stop, frame, status).

    ``actions``: list only the actions that engine registered (an App has no tap yet);
    None lists every known action. ``advertise``: announce ``_oscjson._tcp`` and
    ``_osc._udp`` by zeroconf (needs the zeroconf package) so clients find it by name.
    """

    name = "oscquery"

    def __init__(
        self,
        registry: ParamRegistry,
        osc_port: int | Callable[[], int],
        host: str = "127.0.0.1",
        port: int = DEFAULT_OSCQUERY_PORT,
        name: str = "dreamdeck",
        advertise: bool = False,
        allow: list[str] | None = None,
        actions: Actions | None = None,
        prefix: str = PREFIX,
    ) -> None:
        self.registry = registry
        # a callable reads the OSC server's bound port when asked (port 0 binds a free one at start)
        self._osc_port = osc_port
        self.host = host
        self.port = port  # the bound port once started (port=0 picks a free one)
        self.service_name = name
        self.advertise = advertise
        self.prefix = prefix
        self.last_error: str | None = None
        self._actions = actions
        self.access = Access.for_binding(host, allow, "OSCQuery")
        self._strangers = RateLimitedLog(log)
        self._http: _QueryHttpServer | None = None
        self._thread: threading.Thread | None = None
        self._advertiser: threading.Thread | None = None
        self._zeroconf: Any = None  # zeroconf.Zeroconf while advertised
        self._zeroconf_lock = threading.Lock()
        self.advertised = False

    # -- life cycle ------------------------------------------------------------------------
    @property
    def osc_port(self) -> int:
        """The UDP port OSC messages go to, as HOST_INFO and zeroconf advertise it."""
        return self._osc_port() if callable(self._osc_port) else self._osc_port

    def start(self) -> None:
        if self._http is not None:
            return
        try:
            self._http = _QueryHttpServer((self.host, self.port), self)
        except OSError as exc:
            raise OSError(
                exc.errno, f"OSCQuery cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": POLL_INTERVAL}, name="oscquery http", daemon=True
        )
        self._thread.start()
        if self.advertise:  # mDNS probing takes a second or two: not on the caller's thread
            self._advertiser = threading.Thread(target=self._register, name="oscquery zeroconf", daemon=True)
            self._advertiser.start()
        log.info("OSCQuery on http://%s:%d/ (OSC port %d)", self.host, self.port, self.osc_port)

    def stop(self) -> None:
        if self._advertiser is not None:
            self._advertiser.join(timeout=10.0)
            self._advertiser = None
        with self._zeroconf_lock:
            zc, self._zeroconf = self._zeroconf, None
            self.advertised = False
        if zc is not None:
            zc.unregister_all_services()
            zc.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None

    def frame(self, now: float) -> None:
        """Nothing to do at the frame boundary: every request reads the registry as it is."""

    @property
    def status(self) -> str:
        if self._http is None:
            return "oscquery off"
        return f"oscquery :{self.port}" + (" advertised" if self.advertised else "")

    # -- answering (HTTP threads) ----------------------------------------------------------
    def admits(self, client_ip: str) -> bool:
        if self.access.admits(client_ip):
            return True
        self._strangers.warning(f"OSCQuery request from {client_ip} refused: not on the allowlist")
        return False

    def host_info(self, osc_ip: str) -> dict[str, Any]:
        """``osc_ip``: the address the client reached us on (OSC listens on the same host)."""
        return {
            "NAME": self.service_name,
            "OSC_IP": osc_ip,
            "OSC_PORT": self.osc_port,
            "OSC_TRANSPORT": "UDP",
            "EXTENSIONS": dict(EXTENSIONS),
        }

    def action_specs(self) -> list[ActionSpec]:
        if self._actions is None:
            return [ACTIONS[name] for name in sorted(ACTIONS)]
        return self._actions.available()

    def answer(self, target: str, local_ip: str) -> tuple[int, dict[str, Any] | None]:
        """(HTTP status, JSON body) for a request target such as ``/dreamdeck/fx?VALUE``."""
        parts = urlsplit(target)
        path = unquote(parts.path) or "/"
        query = unquote(parts.query)
        if query == "HOST_INFO":
            return 200, self.host_info(local_ip)
        node = find_node(build_tree(self.registry, self.action_specs(), self.prefix), path)
        if node is None:
            return 404, {"ERROR": f"no OSC node at {path}"}
        if not query:
            return 200, node
        if query not in ATTRIBUTES:
            return 400, {"ERROR": f"unsupported attribute {query[:60]!r}"}
        if query not in node:
            return 204, None  # a known attribute this node has not got (VALUE of a container)
        return 200, {query: node[query]}

    # -- zeroconf --------------------------------------------------------------------------
    def _register(self) -> None:
        """Announce the services; a failure is logged and the server keeps serving unannounced."""
        try:
            import zeroconf
        except ImportError:
            log.warning("OSCQuery is not advertised: the zeroconf package is not installed")
            return
        hostname = socket.gethostname().split(".")[0] or "dreamdeck"
        try:
            addresses = _advertised_addresses(self.host, zeroconf.get_all_addresses)
            services = [
                zeroconf.ServiceInfo(
                    kind,
                    f"{self.service_name}.{kind}",
                    port=port,
                    parsed_addresses=addresses,
                    server=f"{hostname}.local.",
                )
                for kind, port in (("_oscjson._tcp.local.", self.port), ("_osc._udp.local.", self.osc_port))
            ]
            # bound to one address: announce on that interface only (loopback stays on this machine)
            wildcard = self.host in ("", "0.0.0.0")
            zc = zeroconf.Zeroconf(
                interfaces=zeroconf.InterfaceChoice.All if wildcard else addresses, ip_version=zeroconf.IPVersion.V4Only
            )
        except (OSError, zeroconf.Error) as exc:
            self.last_error = f"OSCQuery not advertised: {exc}"
            log.warning("%s", self.last_error)
            return
        with self._zeroconf_lock:
            self._zeroconf = zc
        try:
            for info in services:
                zc.register_service(info, allow_name_change=True)
        except (OSError, zeroconf.Error) as exc:
            self.last_error = f"OSCQuery not advertised: {exc}"
            log.warning("%s", self.last_error)
            return
        with self._zeroconf_lock:
            self.advertised = self._zeroconf is zc
        log.info("OSCQuery advertised as %s on %s", self.service_name, ", ".join(addresses))


def _advertised_addresses(host: str, all_addresses: Any) -> list[str]:
    if host not in ("", "0.0.0.0"):
        return [socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]]
    found = [a for a in all_addresses() if not a.startswith("127.")]
    return found or ["127.0.0.1"]


class _QueryHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], query: OscQueryServer) -> None:
        self.address_family = socket.getaddrinfo(address[0] or "0.0.0.0", None, type=socket.SOCK_STREAM)[0][0]
        self.query = query
        super().__init__(address, _QueryHandler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.query.admits(client_address[0])

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-answer is routine; anything else is a bug worth a traceback."""
        if isinstance(sys.exc_info()[1], OSError):
            log.debug("OSCQuery: connection from %s ended: %s", client_address[0], sys.exc_info()[1])
        else:
            log.exception("OSCQuery: request from %s failed", client_address[0])


class _QueryHandler(BaseHTTPRequestHandler):
    server: _QueryHttpServer
    protocol_version = "HTTP/1.1"  # keep-alive: browsers poll the tree repeatedly
    timeout = REQUEST_TIMEOUT
    server_version = "dreamdeck-oscquery"

    def do_GET(self) -> None:
        try:
            status, body = self.server.query.answer(self.path, self.connection.getsockname()[0])
        except Exception:  # a bug in one answer must not take the server down; the log has the traceback
            log.exception("OSCQuery: answering %r failed", self.path[:200])
            status, body = 500, {"ERROR": "internal error (see the dreamdeck log)"}
        self._send(status, body)

    def _send(self, status: int, body: dict[str, Any] | None) -> None:
        data = b"" if body is None else json.dumps(body).encode("utf-8")
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("OSCQuery %s: " + format, self.client_address[0], *args)
