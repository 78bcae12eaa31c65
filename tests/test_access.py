"""engine.control.access: the one rule for every listener, checked on its own and through
real sockets (OSC over UDP, OSCQuery and the status page over HTTP) on loopback.

127.0.0.2 is a second "machine": the whole 127/8 is loopback on Linux, so a socket bound
there sends from an address that an allowlist of 127.0.0.1 does not hold.
"""

from __future__ import annotations

import http.client
import socket
import time
import types

import pytest
from pythonosc.osc_message_builder import OscMessageBuilder

from engine.catalog import build_registry
from engine.control.access import (
    Access,
    address_in,
    bearer,
    check_binding,
    is_loopback,
    names_loopback,
    parse_allowlist,
    token_matches,
)
from engine.control.actions import Actions
from engine.control.osc import OscServer
from engine.control.oscquery import OscQueryServer
from engine.web import StatusConfig, StatusFeed, StatusServer

TIMEOUT = 10.0


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


# -- the rule --------------------------------------------------------------------------------


def test_loopback_is_the_default_and_needs_nothing() -> None:
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert is_loopback(host), host
        assert check_binding(host, None, "x") is None
    for host in ("0.0.0.0", "::", ""):
        assert not is_loopback(host)
    access = Access.for_binding("127.0.0.1")
    assert access.networks is None and access.token is None and access.admits("10.1.2.3")


def test_a_network_binding_needs_an_allowlist_or_a_token() -> None:
    for host in ("0.0.0.0", "::", ""):
        with pytest.raises(ValueError, match="reachable from the network: give an allowlist"):
            check_binding(host, None, "OSC")
        assert check_binding(host, None, "status page", token="s3cret") is None
        assert check_binding(host, ["10.0.0.0/24"], "OSC") == parse_allowlist(["10.0.0.0/24"], "OSC")
    with pytest.raises(ValueError, match="empty allowlist"):
        check_binding("0.0.0.0", [], "OSC")
    with pytest.raises(ValueError, match="'stage-pc' is not an IP address or network"):
        check_binding("0.0.0.0", ["stage-pc"], "OSC")
    with pytest.raises(ValueError, match="token must not be empty"):
        Access.for_binding("0.0.0.0", token="  ", what="status page")
    with pytest.raises(ValueError, match="cannot resolve"):
        is_loopback("no-such-host.invalid")


def test_allowlist_matches_addresses_and_networks_of_both_families() -> None:
    access = Access.for_binding("0.0.0.0", ["10.0.0.0/24", "192.168.1.20", "fd00:1::/32"], "OSC")
    for ip in ("10.0.0.1", "10.0.0.255", "192.168.1.20", "::ffff:10.0.0.5", "fd00:1:2::9"):
        assert access.admits(ip), ip
    for ip in ("10.0.1.1", "192.168.1.21", "fd00:2::1", "::1", "junk", ""):
        assert not access.admits(ip), ip
    assert address_in("fe80::1%eth0", parse_allowlist(["fe80::/10"], "x")), "a scoped address matches its network"
    assert not address_in("10.0.0.1", parse_allowlist(["::/0"], "x")), "IPv4 is not in an IPv6 network"


def test_tokens_and_host_names() -> None:
    assert token_matches(None, None) and token_matches("anything", None)
    assert token_matches("s3cret", "s3cret") and not token_matches("s3cre", "s3cret") and not token_matches("", "s")
    assert bearer("Bearer abc ") == "abc" and bearer("bearer abc") == "abc"
    assert bearer("Basic abc") == "" and bearer(None) == ""
    assert names_loopback("localhost") and names_loopback("::1") and names_loopback("127.9.9.9")
    assert not names_loopback("evil.example") and not names_loopback("0.0.0.0")


# -- through the listeners -----------------------------------------------------------------------


def _osc(address: str, *args) -> bytes:
    builder = OscMessageBuilder(address=address)
    for arg in args:
        builder.add_arg(arg)
    return builder.build().dgram


@needs_ipv6
def test_osc_on_the_ipv6_loopback_takes_local_senders() -> None:
    registry = build_registry()
    server = OscServer(registry, Actions(), host="::1", port=0)
    server.start()
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as client:
            client.sendto(_osc("/dreamdeck/fx/kaleido/segments", 5), ("::1", server.port))
            wait_for(lambda: server.counts.applied == 1, f"the message; counts {server.counts}")
    finally:
        server.stop()
    registry.apply_pending(0.0)
    assert registry.target("/fx/kaleido/segments") == 5


@needs_ipv6
def test_osc_on_every_ipv6_address_needs_an_allowlist_and_keeps_to_it() -> None:
    registry = build_registry()
    with pytest.raises(ValueError, match="allowlist"):
        OscServer(registry, Actions(), host="::", port=0)
    server = OscServer(registry, Actions(), host="::", port=0, allow=["127.0.0.1"])
    server.start()
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as stranger:
            stranger.sendto(_osc("/dreamdeck/fx/kaleido/segments", 3), ("::1", server.port))
            wait_for(lambda: server.counts.dropped == 1, f"the stranger dropped; counts {server.counts}")
    finally:
        server.stop()
    assert server.counts.applied == 0


def _get_from(source_ip: str, port: int, path: str = "/") -> int | None:
    """GET from a socket bound to ``source_ip``; the status, or None when the server hung up unanswered."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT, source_address=(source_ip, 0))
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except (ConnectionError, http.client.RemoteDisconnected):
        return None
    finally:
        conn.close()


def test_oscquery_keeps_to_its_allowlist() -> None:
    query = OscQueryServer(build_registry(), 9321, host="0.0.0.0", port=0, allow=["127.0.0.1"])
    query.start()
    try:
        assert _get_from("127.0.0.1", query.port, "/?HOST_INFO") == 200
        assert _get_from("127.0.0.2", query.port, "/?HOST_INFO") is None
    finally:
        query.stop()


def test_the_status_page_keeps_to_its_allowlist_as_well_as_its_token() -> None:
    fake = types.SimpleNamespace(params=None, actions=Actions(), presets=None, preset_name=None)
    feed = StatusFeed()
    server = StatusServer(fake, feed, StatusConfig(host="0.0.0.0", port=0, token="s3cret", allow=("127.0.0.1",)))
    server.start()
    try:
        assert _get_from("127.0.0.1", server.port, "/api/actions?token=s3cret") == 200
        assert _get_from("127.0.0.1", server.port, "/api/actions") == 401
        assert _get_from("127.0.0.2", server.port, "/api/actions?token=s3cret") is None
    finally:
        server.stop()
    with pytest.raises(ValueError, match="not an IP address"):
        StatusServer(fake, feed, StatusConfig(host="0.0.0.0", port=0, allow=("phone",)))
