"""OSCQuery: the OSC address space as JSON over HTTP, so VDMX, MadMapper, Chataigne or a
TouchDesigner OSCQuery component can list every parameter with its type, range and value.

Follows the Vidvox OSCQuery proposal (github.com/Vidvox/OSCQueryProposal):

    GET /                                  the whole tree
    GET /dreamdeck/fx/kaleido/segments     one node
    GET /dreamdeck/fx/kaleido/segments?VALUE   {"VALUE": [6]}   (any attribute alone)
    GET /?HOST_INFO                        name, OSC port and transport, supported attributes

A node has FULL_PATH and DESCRIPTION; a container has CONTENTS and ACCESS 0; a parameter
has TYPE (OSC type tags: f, i, T for bools, s for text and enums, r for colours, N for
triggers), ACCESS (3 read/write; 2 write-only for triggers and actions), VALUE (as set,
before smoothing and modulation; a null per tag for write-only methods), RANGE ([{MIN, MAX}]
or [{VALS}]) and UNIT. An unknown path is 404; an attribute this server does not know is 400;
one it knows that the node lacks, or the VALUE of a write-only method, is 204 (the spec's rules).

The same port serves the WebSocket streams (LISTEN / IGNORE, PATH_ADDED / PATH_REMOVED /
PATH_CHANGED, OSC in): engine.control.oscquery_ws, on its own thread. The render thread only
hands it what changed, from ``frame``, without waiting.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote, urlsplit

from engine.control.access import Access, check_binding
from engine.control.actions import ACTIONS, Actions, ActionSpec
from engine.control.osc import PREFIX, OscServer
from engine.control.oscquery_ws import NORM_PARAM, StreamCounts, StreamHub
from engine.logsetup import RateLimitedLog
from engine.params import Kind, Param, ParamError, ParamRegistry

log = logging.getLogger(__name__)

DEFAULT_OSCQUERY_PORT = 9322  # next to DEFAULT_OSC_PORT (9321)

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
    "LISTEN": True,  # and IGNORE, which LISTEN implies (the spec)
    "PATH_CHANGED": True,
    "PATH_RENAMED": False,
    "PATH_ADDED": True,
    "PATH_REMOVED": True,
}
# What a node can be asked for (``?VALUE``): the attributes served, not the streaming commands.
STREAMING = frozenset({"LISTEN", "PATH_CHANGED", "PATH_RENAMED", "PATH_ADDED", "PATH_REMOVED"})
ATTRIBUTES = frozenset({"FULL_PATH", "CONTENTS"} | {name for name, on in EXTENSIONS.items() if on} - STREAMING)
_NORMALISED = (Kind.FLOAT, Kind.INT, Kind.ENUM, Kind.BOOL)  # the kinds with a /norm form

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
        node["VALUE"] = write_only_value(node["TYPE"])
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


def write_only_value(tags: str) -> list[None]:
    """VALUE of a write-only method (an action, a trigger): one JSON null per type tag.

    Why not leave VALUE out: the spec describes VALUE as one item per TYPE tag, with null as
    the placeholder for an item that has no value (the N and I tags are nothing but nulls),
    and ACCESS 2 already tells a client not to read it (``?VALUE`` answers 204). Strict
    readers need it: python-oscquery takes a method without VALUE for a container, and a
    container with ACCESS other than 0 is an error to it ("No value(s) given, access must
    be NO_VALUE for container nodes"). Loose readers go by TYPE and ACCESS and never read
    the VALUE of a node they may not read, so the nulls cost them nothing.
    """
    return [None] * len(tags)


def action_node(full_path: str, spec: ActionSpec) -> dict[str, Any]:
    """An action as a write-only method: TYPE is its required arguments' tags ("N", an impulse,
    for none); DESCRIPTION says what it does and its whole signature, optional arguments too."""
    tags = "".join(_ARG_TAGS[arg.type] for arg in spec.args if arg.required) or "N"
    return {
        "FULL_PATH": full_path,
        "DESCRIPTION": f"{spec.description}: {spec.signature}",
        "TYPE": tags,
        "ACCESS": 2,
        "VALUE": write_only_value(tags),
    }


def build_tree(registry: ParamRegistry, actions: Iterable[ActionSpec], prefix: str = PREFIX) -> dict[str, Any]:
    """The whole address space as one OSCQuery node (the answer to ``GET /``)."""
    root: dict[str, Any] = {"FULL_PATH": "/", "DESCRIPTION": "dreamdeck", "ACCESS": 0, "CONTENTS": {}}
    for param in registry.params():
        value = None if param.kind is Kind.TRIGGER else registry.target(param.path)
        _insert(root, prefix + param.path, param_node(prefix + param.path, param, value))
        if param.kind in _NORMALISED:
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
            "VALUE": write_only_value("s"),
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
    """Serves the OSCQuery tree over HTTP and streams values over WebSocket, on one port; a
    Control (start, stop, frame, status).

    ``actions``: list only the actions that engine registered (an App has no tap yet);
    None lists every known action. ``advertise``: announce ``_oscjson._tcp`` and
    ``_osc._udp`` by zeroconf (needs the zeroconf package) so clients find it by name.
    ``osc``: the OSC server that applies OSC packets a WebSocket client sends (None: they are
    refused). ``token``: when given, a WebSocket client must bring it (``?token=`` in its URL
    or ``Authorization: Bearer``) for its OSC to be applied; reading and LISTEN need only the
    allowlist, as the HTTP tree does.
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
        osc: OscServer | None = None,
        token: str | None = None,
    ) -> None:
        self.registry = registry
        # a callable reads the OSC server's bound port when asked (port 0 binds a free one at start)
        self._osc_port = osc_port
        self.host = host
        self.port = port  # the bound port once started (port=0 picks a free one)
        self.service_name = name
        self.advertise = advertise
        self.prefix = prefix
        self.osc = osc
        self.last_error: str | None = None
        self._actions = actions
        if token is not None and not token.strip():
            raise ValueError("OSCQuery: the token must not be empty")
        # The token gates writes only; the binding still needs an allowlist off the loopback.
        self.access = Access(host, check_binding(host, allow, "OSCQuery"), token)
        self._strangers = RateLimitedLog(log)
        self.counts = StreamCounts()  # the WebSocket side's (kept across stop, for the HUD and tests)
        self._hub: StreamHub | None = None
        self._advertiser: threading.Thread | None = None
        self._zeroconf: Any = None  # zeroconf.Zeroconf while advertised
        self._zeroconf_lock = threading.Lock()
        self.advertised = False
        # render thread only: what the clients were last sent, and the parameters they were told of
        self._params: dict[str, Param] | None = None
        self._generation = -1
        self._listened: frozenset[str] = frozenset()
        self._targets: dict[str, tuple[Param, Param, bool]] = {}
        self._last: dict[str, Any] = {}

    # -- life cycle ------------------------------------------------------------------------
    @property
    def osc_port(self) -> int:
        """The UDP port OSC messages go to, as HOST_INFO and zeroconf advertise it."""
        return self._osc_port() if callable(self._osc_port) else self._osc_port

    def start(self) -> None:
        if self._hub is not None:
            return
        hub = StreamHub(self, self.counts)
        try:
            self.port = hub.start(self.host, self.port)
        except OSError as exc:
            raise OSError(
                exc.errno, f"OSCQuery cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        self._hub = hub
        if self.advertise:  # mDNS probing takes a second or two: not on the caller's thread
            self._advertiser = threading.Thread(target=self._register, name="oscquery zeroconf", daemon=True)
            self._advertiser.start()
        log.info("OSCQuery on http://%s:%d/ and ws:// (OSC port %d)", self.host, self.port, self.osc_port)

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
        if self._hub is not None:
            self._hub.stop()
            self._hub = None
        self._params = None

    def frame(self, now: float) -> None:
        """Render thread, frame boundary: tell the WebSocket clients what changed; never waits.

        Values are the ones that play (smoothing and modulation in: a modulated fader moves), one
        per listened path when it differs from what was last sent; the tree's VALUE stays the
        value as set. Parameters declared or removed since the last frame become PATH_ADDED /
        PATH_REMOVED, a changed declaration (an enum's choices) PATH_CHANGED.
        """
        hub = self._hub
        if hub is None or not hub.has_clients:
            self._params = None  # no one to tell: take the next client's frame as the baseline
            return
        self._check_paths(hub)
        listened = hub.listened
        if listened:
            self._send_values(hub, listened)

    def _check_paths(self, hub: StreamHub) -> None:
        generation = self.registry.generation
        if self._params is not None and generation == self._generation:
            return  # nothing declared, removed or changed: the common case, one comparison
        self._generation = generation
        params = {param.path: param for param in self.registry.params()}
        old, self._params = self._params, params
        if old is None or old == params:
            return
        notes: list[tuple[str, str]] = []
        removed: set[str] = set()
        for path in sorted(params.keys() | old.keys()):
            if path not in old:
                notes += [("PATH_ADDED", full) for full in self._full_paths(params[path])]
            elif path not in params:
                gone = self._full_paths(old[path])
                notes += [("PATH_REMOVED", full) for full in gone]
                removed.update(gone)
            elif old[path] != params[path]:
                notes += [("PATH_CHANGED", full) for full in self._full_paths(params[path])]
        self._listened = frozenset()  # the targets are looked up again
        hub.post("paths", (notes, frozenset(removed)))

    def _full_paths(self, param: Param) -> list[str]:
        paths = [self.prefix + param.path]
        if param.kind in _NORMALISED:
            paths.append(f"{self.prefix}/norm{param.path}")
        return paths

    def _send_values(self, hub: StreamHub, listened: frozenset[str]) -> None:
        if listened is not self._listened:
            self._listened = listened
            self._targets = {path: target for path in listened if (target := self.listen_target(path)) is not None}
            self._last = {path: value for path, value in self._last.items() if path in self._targets}
        changed: dict[str, tuple[Param, Any]] = {}
        get, last = self.registry.get, self._last
        for path, (param, encoding, norm) in self._targets.items():
            try:
                value = get(param.path)
            except ParamError:  # removed since: the next frame's path check says so
                continue
            if norm:
                value = param.normalise(value)
            if path not in last or last[path] != value:
                last[path] = value
                changed[path] = (encoding, value)
        if changed:
            hub.post("values", changed)

    def listen_target(self, full_path: str) -> tuple[Param, Param, bool] | None:
        """(parameter, how to encode it, 0..1 form?) for a path a client may LISTEN to; None if
        nothing readable is there (a container, an action, a trigger). Any thread."""
        if not full_path.startswith(self.prefix + "/"):
            return None
        path = full_path[len(self.prefix) :]
        norm = path.startswith("/norm/")
        if norm:
            path = path[len("/norm") :]
        if path not in self.registry:
            return None
        try:
            param = self.registry.param(path)
        except ParamError:
            return None
        if norm:
            return (param, NORM_PARAM, True) if param.kind in _NORMALISED else None
        return None if param.kind is Kind.TRIGGER else (param, param, False)

    @property
    def status(self) -> str:
        if self._hub is None:
            return "oscquery off"
        line = f"oscquery :{self.port}" + (" advertised" if self.advertised else "")
        counts = self.counts
        if counts.clients:
            line += f" ws {counts.clients} pushed {counts.pushed}"
        if counts.refused:
            line += f" refused {counts.refused}"
        return line

    # -- answering (the server thread and its workers) -------------------------------------
    def admits(self, client_ip: str) -> bool:
        if self.access.admits(client_ip):
            return True
        self._strangers.warning(f"OSCQuery request from {client_ip} refused: not on the allowlist")
        return False

    def host_info(self, osc_ip: str) -> dict[str, Any]:
        """``osc_ip``: the address the client reached us on (OSC listens on the same host).
        No WS_IP / WS_PORT: the WebSocket is on this port, which the spec takes when they are absent."""
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
        if query not in node or (query == "VALUE" and not node.get("ACCESS", 0) & 1):
            return 204, None  # a known attribute this node has not got, or a value it does not show
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
