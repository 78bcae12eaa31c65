"""Who may talk to a listener: loopback by default, else an allowlist of senders or a token.

Every socket dreamdeck listens on (OSC over UDP and TCP, OSCQuery, the status page) goes
through this module, so the rule is one rule:

    bound to loopback          anyone on this machine
    bound to anything else     refused at start unless an allowlist (addresses or networks,
                               IPv4 or IPv6) or a token (the status page) says who may come in

A show network is shared with lighting desks, phones and guests: an open port that
anyone can drive is how a projector ends up showing something it should not.

    access = Access.for_binding("0.0.0.0", allow=["192.168.1.20", "10.0.0.0/24"], what="OSC")
    access.admits("10.0.0.7")          # True
    token_matches(given, access.token) # constant time
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    """True if ``host`` resolves only to loopback addresses: a listener there is reachable from this
    machine only. Names are resolved (``localhost``); ValueError if one does not resolve."""
    if host in WILDCARD_HOSTS:
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    return all(ipaddress.ip_address(info[4][0].split("%", 1)[0]).is_loopback for info in infos)


def names_loopback(host: str) -> bool:
    """True if ``host`` is ``localhost`` or a loopback address, without asking DNS.

    For what a client says (an HTTP Host header): resolving it would let a DNS-rebinding
    page, whose name resolves to 127.0.0.1, pass for this machine.
    """
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def parse_allowlist(entries: Iterable[str], what: str) -> tuple[Network, ...]:
    """Addresses and networks (``192.168.1.20``, ``10.0.0.0/24``, ``fd00::/8``); ValueError names a bad one."""
    networks: list[Network] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(str(entry).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{what}: allowlist entry {entry!r} is not an IP address or network") from None
    if not networks:
        raise ValueError(f"{what}: an empty allowlist refuses everyone; pass None to accept local senders")
    return tuple(networks)


def check_binding(
    host: str, allow: Iterable[str] | None, what: str, *, token: str | None = None
) -> tuple[Network, ...] | None:
    """Parse the allowlist, and refuse (ValueError) a network-reachable binding that has neither
    an allowlist nor a token. None: no allowlist, every sender that reaches the socket is let in."""
    if allow is None:
        if token is None and not is_loopback(host):
            raise ValueError(
                f"{what} on {host!r} is reachable from the network: give an allowlist of "
                "sender addresses or networks, e.g. 192.168.1.20 or 10.0.0.0/24 (dreamdeck run: --osc-allow, "
                "--status-allow)"
            )
        return None
    return parse_allowlist(allow, what)


def address_in(ip: str, networks: Iterable[Network]) -> bool:
    """Whether ``ip`` (as a socket reports it: maybe ``fe80::1%eth0``, maybe ``::ffff:10.0.0.5``) is in a network."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # a dual-stack socket shows IPv4 senders as ::ffff:a.b.c.d
    return any(addr.version == net.version and addr in net for net in networks)


class SenderFilter:
    """Decides, per sender address, whether a packet or connection is let in (cached: a UDP
    listener asks for every datagram)."""

    MAX_REMEMBERED = 4096  # spoofed source addresses must not grow memory without bound

    def __init__(self, networks: tuple[Network, ...] | None) -> None:
        self._networks = networks
        self._seen: dict[str, bool] = {}

    @property
    def networks(self) -> tuple[Network, ...] | None:
        return self._networks

    def allows(self, ip: str) -> bool:
        if self._networks is None:
            return True
        known = self._seen.get(ip)
        if known is None:
            known = address_in(ip, self._networks)
            if len(self._seen) >= self.MAX_REMEMBERED:
                self._seen.clear()
            self._seen[ip] = known
        return known


def token_matches(given: str | None, token: str | None) -> bool:
    """A token check in constant time; no token configured lets everyone in."""
    if token is None:
        return True
    return hmac.compare_digest((given or "").encode("utf-8"), token.encode("utf-8"))


def bearer(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header, or ''."""
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return ""


@dataclass(frozen=True)
class Access:
    """One listener's rule: where it is bound, who may send, and the token if it takes one."""

    host: str
    networks: tuple[Network, ...] | None = None
    token: str | None = None
    _filter: SenderFilter = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_filter", SenderFilter(self.networks))

    @classmethod
    def for_binding(
        cls, host: str, allow: Iterable[str] | None = None, what: str = "listener", token: str | None = None
    ) -> Access:
        """Check the binding (see ``check_binding``) and make its rule; ValueError if refused."""
        if token is not None and not token.strip():
            raise ValueError(f"{what}: the token must not be empty")
        return cls(host, check_binding(host, allow, what, token=token), token)

    def admits(self, ip: str) -> bool:
        """Whether the allowlist lets a sender at ``ip`` in (True without an allowlist)."""
        return self._filter.allows(ip)

    def token_ok(self, given: str | None) -> bool:
        return token_matches(given, self.token)
