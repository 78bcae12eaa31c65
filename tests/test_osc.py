"""OSC control with real parts: real UDP and TCP sockets on loopback, python-osc, liblo's
oscsend and Pure Data as independent clients, and the app's frame loop.

Every wait polls a condition (a counter, a socket) with a bound; nothing asserts on speed.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pythonosc import osc_bundle_builder, osc_message
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.tcp_client import SimpleTCPClient
from pythonosc.udp_client import SimpleUDPClient

from engine.catalog import build_registry
from engine.control.actions import ACTIONS, Actions
from engine.control.osc import (
    DEFAULT_OSC_PORT,
    RECEIVE_BUFFER,
    OscServer,
    RateLimitedLog,
    SenderFilter,
    address_collisions,
    check_binding,
    compile_pattern,
    parse_plain_message,
)
from engine.params import ParamRegistry, float_param

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 10.0


# -- helpers ----------------------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], what: str | Callable[[], str], timeout: float = TIMEOUT) -> None:
    """Poll ``condition`` until it holds; ``what`` (text, or a callable for the state at the end) says why not."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.002)


def received(server: OscServer, n: int) -> None:
    """Wait until the server has handled ``n`` messages in all (accepted or refused)."""
    wait_for(lambda: server.counts.received >= n, lambda: f"{n} messages handled; counts {server.counts}")


def message(address: str, *args: Any, types: str | None = None) -> osc_message.OscMessage:
    builder = OscMessageBuilder(address=address)
    for i, arg in enumerate(args):
        builder.add_arg(arg, types[i] if types else None)
    return builder.build()


def bundle(*contents: Any, timestamp: float = osc_bundle_builder.IMMEDIATELY) -> Any:
    builder = osc_bundle_builder.OscBundleBuilder(timestamp)
    for content in contents:
        builder.add_content(content)
    return builder.build()


class python_osc:
    """A python-osc UDP client as a context manager (closes its socket)."""

    def __init__(self, port: int) -> None:
        self.client = SimpleUDPClient("127.0.0.1", port)

    def __enter__(self) -> SimpleUDPClient:
        return self.client

    def __exit__(self, *exc: Any) -> None:
        self.client._sock.close()


class Recorder:
    """Actions whose handlers record their calls (as the app's would run them)."""

    def __init__(self, names: Any = ACTIONS) -> None:
        self.actions = Actions()
        self.calls: list[tuple[str, tuple]] = []
        for name in names:
            self.actions.register(name, lambda *args, name=name: self.calls.append((name, args)))

    def run(self) -> list[tuple[str, tuple]]:
        self.actions.run_pending()
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture
def registry() -> ParamRegistry:
    return build_registry()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def make_server(registry: ParamRegistry, recorder: Recorder) -> Iterator[Callable[..., OscServer]]:
    made: list[OscServer] = []

    def make(**options: Any) -> OscServer:
        options.setdefault("port", 0)
        server = OscServer(options.pop("registry", registry), options.pop("actions", recorder.actions), **options)
        made.append(server)
        server.start()
        return server

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def server(make_server: Callable[..., OscServer]) -> OscServer:
    return make_server()


@pytest.fixture
def client(server: OscServer) -> Iterator[socket.socket]:
    """A UDP socket aimed at the server, bound so that replies come back to it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.connect(("127.0.0.1", server.port))
    sock.settimeout(TIMEOUT)
    yield sock
    sock.close()


def send(sock: socket.socket, *packets: Any) -> None:
    for packet in packets:
        sock.send(packet.dgram if hasattr(packet, "dgram") else packet)


def read_messages(sock: socket.socket, n: int) -> list[osc_message.OscMessage]:
    return [osc_message.OscMessage(sock.recv(65536)) for _ in range(n)]


def nothing_more(sock: socket.socket, wait: float = 0.2) -> bool:
    sock.settimeout(wait)
    try:
        sock.recv(65536)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(TIMEOUT)
    return False


# -- receiving values -------------------------------------------------------------------------


def test_python_osc_client_sets_a_parameter_at_the_next_frame(server: OscServer, registry: ParamRegistry) -> None:
    assert registry.target("/fx/kaleido/segments") != 8
    with python_osc(server.port) as osc:
        osc.send_message("/dreamdeck/fx/kaleido/segments", 8)
        received(server, 1)
    assert registry.target("/fx/kaleido/segments") != 8, "a value must wait for the frame boundary"
    landed = registry.apply_pending(1 / 60)
    assert [(c.path, c.value, c.origin) for c in landed] == [("/fx/kaleido/segments", 8, "osc")]
    assert registry.target("/fx/kaleido/segments") == 8
    assert server.counts.applied == 1 and server.counts.rejected == 0
    assert "in 1 ok 1 refused 0" in server.status


VALUES = [
    ("int", "/fx/kaleido/segments", (7,), "i", 7),
    ("float rounds for an int", "/fx/kaleido/segments", (6.6,), "f", 7),
    ("float", "/layer/scene/opacity", (0.25,), "f", 0.25),
    ("double", "/layer/scene/opacity", (0.125,), "d", 0.125),
    ("int for a float", "/fx/grade/contrast", (2,), "i", 2.0),
    ("T", "/fx/grade/enabled", (True,), "T", True),
    ("F", "/fx/vignette/enabled", (False,), "F", False),
    ("float 1 for a bool (CHOP)", "/fx/grade/enabled", (1.0,), "f", True),
    ("T for a number", "/layer/scene/opacity", (True,), "T", 1.0),
    ("enum by name", "/layer/scene/blend", ("screen",), "s", "screen"),
    ("enum by index", "/layer/scene/blend", (2,), "i", "multiply"),
    ("colour as 3 floats", "/scene/reaction_diffusion/colour_a", (1.0, 0.5, 0.0), "fff", (1.0, 0.5, 0.0, 1.0)),
    ("colour as 4 floats", "/scene/reaction_diffusion/colour_a", (0.0, 0.5, 1.0, 0.5), "ffff", (0.0, 0.5, 1.0, 0.5)),
    ("colour as #rrggbb", "/scene/reaction_diffusion/colour_b", ("#ff0000",), "s", (1.0, 0.0, 0.0, 1.0)),
    ("colour as rgba", "/scene/reaction_diffusion/colour_b", (0x00FF00FF,), "r", (0.0, 1.0, 0.0, 1.0)),
    ("text from several symbols (Max)", "/layer/overlay/image", ("my", "file.png"), "ss", "my file.png"),
]


@pytest.mark.parametrize("case", VALUES, ids=[v[0] for v in VALUES])
def test_osc_types_map_onto_parameter_kinds(
    server: OscServer, client: socket.socket, registry: ParamRegistry, case: tuple
) -> None:
    _, path, args, types, expected = case
    send(client, message("/dreamdeck" + path, *args, types=types))
    received(server, 1)
    assert server.counts.applied == 1, server.last_error
    registry.apply_pending(0.0)
    assert registry.target(path) == pytest.approx(expected)


def test_normalised_addresses_map_0_1_onto_the_range(
    server: OscServer, client: socket.socket, registry: ParamRegistry
) -> None:
    send(
        client,
        message("/dreamdeck/norm/fx/kaleido/segments", 1.0),
        message("/dreamdeck/norm/fx/kaleido/rotate", 0.75),
        message("/dreamdeck/norm/layer/scene/blend", 1.0),
        message("/dreamdeck/norm/fx/feedback/zoom", 7.0),  # clamped, as a fader end is
        message("/dreamdeck/norm/fx/grade/enabled", 0.6),
    )
    received(server, 5)
    assert server.counts.applied == 5, server.last_error
    registry.apply_pending(0.0)
    assert registry.target("/fx/kaleido/segments") == 32
    assert registry.target("/fx/kaleido/rotate") == pytest.approx(180.0)  # smoothed: get() lags behind
    assert registry.target("/layer/scene/blend") == "difference"
    assert registry.target("/fx/feedback/zoom") == pytest.approx(registry.param("/fx/feedback/zoom").max)
    assert registry.target("/fx/grade/enabled") is True


def test_liblo_oscsend_is_understood_over_udp_and_tcp(
    make_server: Callable[..., OscServer], registry: ParamRegistry
) -> None:
    oscsend = shutil.which("oscsend")
    if oscsend is None:
        pytest.skip("liblo-tools (oscsend) is not installed")
    server = make_server(tcp=True)
    run = [
        [oscsend, "127.0.0.1", str(server.port), "/dreamdeck/fx/kaleido/segments", "i", "8"],
        [oscsend, "127.0.0.1", str(server.port), "/dreamdeck/fx/grade/enabled", "T"],
        [oscsend, f"osc.tcp://127.0.0.1:{server.port}", "/dreamdeck/layer/scene/blend", "s", "difference"],
    ]
    for command in run:
        subprocess.run(command, check=True, timeout=TIMEOUT, capture_output=True)
    received(server, 3)
    assert server.counts.applied == 3, server.last_error
    registry.apply_pending(0.0)
    assert registry.target("/fx/kaleido/segments") == 8
    assert registry.target("/fx/grade/enabled") is True
    assert registry.target("/layer/scene/blend") == "difference"


@pytest.mark.parametrize("mode", ["1.0", "1.1"])
def test_tcp_streams_size_prefixed_and_slip(
    make_server: Callable[..., OscServer], registry: ParamRegistry, mode: str
) -> None:
    server = make_server(tcp=True)
    with SimpleTCPClient("127.0.0.1", server.port, mode=mode, timeout=TIMEOUT) as tcp:
        tcp.send_message("/dreamdeck/fx/kaleido/segments", 12)
        tcp.send(bundle(message("/dreamdeck/fx/kaleido/rotate", 45.0), message("/dreamdeck/fx/kaleido/enabled", 1)))
        tcp.send_message("/dreamdeck/get", "/fx/kaleido/segments")
        received(server, 4)
        assert server.counts.applied == 4, server.last_error
        registry.apply_pending(0.0)
        assert (registry.target("/fx/kaleido/segments"), registry.target("/fx/kaleido/rotate")) == (12, 45.0)
        reply = next(tcp.get_messages(timeout=TIMEOUT))
        assert reply.address == "/dreamdeck/fx/kaleido/segments"
        assert reply.params == [registry.param("/fx/kaleido/segments").default]  # as of the last frame


# -- Pure Data and Max examples -----------------------------------------------------------------


def test_the_pure_data_example_patch_drives_real_addresses(
    server: OscServer, registry: ParamRegistry, recorder: Recorder
) -> None:
    pd = shutil.which("pd")
    if pd is None:
        pytest.skip("Pure Data (pd) is not installed")
    patch = ROOT / "examples" / "puredata" / "dreamdeck.pd"
    sends = [
        f"dreamdeck-port {server.port}",
        "dreamdeck-crossfade 0.25",
        "dreamdeck-segments 8",
        "dreamdeck-kaleido 1",
        "dreamdeck-next bang",
        "dreamdeck-preset 2",
        "pd quit",
    ]
    command = [pd, "-nogui", "-batch", "-stderr", "-open", str(patch)]
    for text in sends:
        command += ["-send", text]
    done = subprocess.run(command, timeout=30, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "error" not in done.stderr.lower(), done.stderr
    received(server, 6)
    assert server.counts.applied == 6, server.last_error
    registry.apply_pending(0.0)
    assert registry.target("/layer/scene/opacity") == pytest.approx(0.25)
    assert registry.target("/layer/source/opacity") == pytest.approx(0.75)
    assert registry.target("/fx/kaleido/segments") == 8 and registry.target("/fx/kaleido/enabled") is True
    assert recorder.run() == [("scene/next", ()), ("preset/recall", (2,))]


def test_the_max_example_is_a_valid_patcher_that_sends_real_addresses(server: OscServer, client: socket.socket) -> None:
    patcher = json.loads((ROOT / "examples" / "max" / "dreamdeck.maxpat").read_text(encoding="utf-8"))["patcher"]
    boxes = {b["box"]["id"]: b["box"] for b in patcher["boxes"]}
    for line in patcher["lines"]:
        (source, outlet), (destination, inlet) = line["patchline"]["source"], line["patchline"]["destination"]
        assert outlet < boxes[source]["numoutlets"] and inlet < boxes[destination]["numinlets"], line
    texts = [b.get("text", "") for b in boxes.values() if b["maxclass"] in ("newobj", "message")]
    assert f"udpsend 127.0.0.1 {DEFAULT_OSC_PORT}" in texts
    addresses = [t.split(" ", 1)[1] for t in texts if t.startswith("prepend ")]
    addresses += [t for t in texts if t.startswith("/")]
    assert len(addresses) >= 6
    sample = {
        "/dreamdeck/prompt": "a neon jellyfish",
        "/dreamdeck/preset/recall": 1,
        "/dreamdeck/fx/kaleido/segments": 8,
        "/dreamdeck/fx/kaleido/enabled": 1,
    }
    for address in addresses:  # each address, with a value a Max object would send, is accepted
        args = [] if address == "/dreamdeck/scene/next" else [sample.get(address, 0.5)]
        send(client, message(address, *args))
    received(server, len(addresses))
    assert server.counts.rejected == 0, server.last_error


# -- bundles, wildcards, errors -----------------------------------------------------------------


def test_a_bundle_lands_whole_in_one_frame_or_not_at_all(
    server: OscServer, client: socket.socket, registry: ParamRegistry, caplog
) -> None:
    before = registry.snapshot()
    bad = bundle(
        message("/dreamdeck/fx/kaleido/segments", 9),
        message("/dreamdeck/layer/scene/opacity", 0.5),
        bundle(message("/dreamdeck/fx/feedback/rotate", 999.0)),
    )  # out of range, nested
    with caplog.at_level(logging.WARNING, logger="engine.control.osc"):
        send(client, bad)
        received(server, 3)
    assert server.counts.rejected == 3 and server.counts.applied == 0
    registry.apply_pending(0.0)
    assert registry.snapshot() == before, "a refused bundle changed something"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "bundle of 3 refused" in lines[0] and "999" in lines[0], lines

    good = bundle(
        message("/dreamdeck/fx/kaleido/segments", 9),
        bundle(message("/dreamdeck/layer/scene/opacity", 0.5), message("/dreamdeck/scene/next")),
        timestamp=time.time() + 3600,
    )  # a timetag an hour ahead: applied now, never slept on
    send(client, good)
    received(server, 6)
    landed = registry.apply_pending(0.0)
    assert {c.path for c in landed} == {"/fx/kaleido/segments", "/layer/scene/opacity"}
    assert registry.target("/fx/kaleido/segments") == 9 and registry.target("/layer/scene/opacity") == 0.5
    assert server.counts.applied == 3


def test_an_action_in_a_refused_bundle_does_not_run(
    server: OscServer, client: socket.socket, recorder: Recorder
) -> None:
    send(client, bundle(message("/dreamdeck/scene/next"), message("/dreamdeck/fx/kaleido/segments", "eight")))
    received(server, 2)
    assert server.counts.rejected == 2 and recorder.run() == []


def test_wildcards_fan_out_over_parameter_paths(
    server: OscServer, client: socket.socket, registry: ParamRegistry
) -> None:
    enabled = [p.path for p in registry.params("/fx/") if p.path.endswith("/enabled")]
    assert len(enabled) >= 4
    send(client, message("/dreamdeck/fx/*/enabled", 1))
    received(server, 1)
    registry.apply_pending(0.0)
    assert all(registry.target(path) is True for path in enabled)

    send(
        client,
        message("/dreamdeck/fx/{grade,kaleido}/enabled", False),
        message("/dreamdeck/layer/[!o]*/opacity", 0.2),  # source and scene, not overlay
        message("/dreamdeck/norm/fx/*/amount", 0.0),
    )
    received(server, 4)
    assert server.counts.applied == 4, server.last_error
    registry.apply_pending(0.0)
    assert registry.target("/fx/grade/enabled") is False and registry.target("/fx/kaleido/enabled") is False
    assert registry.target("/fx/vignette/enabled") is True
    assert registry.target("/layer/source/opacity") == registry.target("/layer/scene/opacity") == pytest.approx(0.2)
    assert registry.target("/layer/overlay/opacity") != pytest.approx(0.2)
    assert all(registry.target(p.path) == 0.0 for p in registry.params("/fx/") if p.path.endswith("/amount"))


PATTERNS = [
    ("/fx/*/enabled", "/fx/grade/enabled", True),
    ("/fx/*", "/fx/grade/enabled", False),  # * stops at /
    ("/fx/g?ade/hue", "/fx/grade/hue", True),
    ("/fx/[gk]*/enabled", "/fx/kaleido/enabled", True),
    ("/fx/[a-h]*/enabled", "/fx/kaleido/enabled", False),
    ("/fx/[!k]*/enabled", "/fx/kaleido/enabled", False),
    ("/fx/[!k]*/enabled", "/fx/grade/enabled", True),
    ("/fx/{grade,vignette}/amount", "/fx/vignette/amount", True),
    ("/fx/{grade,vignette}/amount", "/fx/kaleido/amount", False),
    ("/fx/grade/hue.x", "/fx/grade/hue", False),  # regex characters are literal
    ("/fx/*/e*d", "/fx/grade/enabled", True),
]


@pytest.mark.parametrize("pattern,path,matches", PATTERNS)
def test_osc_address_patterns(pattern: str, path: str, matches: bool) -> None:
    assert bool(compile_pattern(pattern).fullmatch(path)) is matches


@pytest.mark.parametrize("pattern", ["/fx/[abc", "/fx/{a,b", "/fx/a]", "/fx/[]", "/fx/[z-a]"])
def test_malformed_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError):
        compile_pattern(pattern)


REFUSED = [
    ("unknown address", message("/dreamdeck/fx/nope/segments", 1)),
    ("outside the prefix", message("/other/fx/kaleido/segments", 1)),
    ("text for a number", message("/dreamdeck/fx/kaleido/segments", "eight")),
    ("out of range", message("/dreamdeck/fx/kaleido/segments", 100)),
    ("two values for one", message("/dreamdeck/layer/scene/opacity", 0.1, 0.2)),
    ("no value", message("/dreamdeck/layer/scene/opacity")),
    ("bool that is not 0/1", message("/dreamdeck/fx/grade/enabled", 0.5)),
    ("unknown enum", message("/dreamdeck/layer/scene/blend", "sparkle")),
    ("malformed pattern", message("/dreamdeck/fx/[kal/segments", 1)),
    ("pattern matching nothing", message("/dreamdeck/fx/*/nothing", 1)),
    ("norm of text", message("/dreamdeck/norm/layer/overlay/image", 0.5)),
    ("get of an unknown path", message("/dreamdeck/get", "/fx/nope")),
    ("midi learn of an unknown path", message("/dreamdeck/midi/learn", "/fx/nope")),
    ("scene select without a name", message("/dreamdeck/scene/select")),
    ("trigger with text", message("/dreamdeck/scene/next", "now")),
    ("not OSC", b"hello world"),
    ("truncated message", message("/dreamdeck/fx/kaleido/segments", 8).dgram[:-2]),
    ("bad utf-8 address", b"/dreamdeck/\xff\xfe\x00\x00,i\x00\x00\x00\x00\x00\x08"),
    ("truncated bundle", bundle(message("/dreamdeck/fx/kaleido/segments", 8)).dgram[:-3]),
]


@pytest.mark.parametrize("packet", [r[1] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_bad_input_is_refused_counted_and_the_server_goes_on(
    server: OscServer, client: socket.socket, registry: ParamRegistry, recorder: Recorder, packet: Any
) -> None:
    before = registry.snapshot()
    send(client, packet)
    received(server, 1)
    assert server.counts.rejected == 1 and server.counts.applied == 0
    assert server.last_error
    registry.apply_pending(0.0)
    assert registry.snapshot() == before and recorder.run() == []

    send(client, message("/dreamdeck/fx/kaleido/segments", 3))
    received(server, 2)
    assert server.counts.applied == 1
    registry.apply_pending(0.0)
    assert registry.target("/fx/kaleido/segments") == 3


def test_garbage_and_deep_nesting_never_stop_the_server(
    server: OscServer, client: socket.socket, registry: ParamRegistry, caplog
) -> None:
    import random

    rng = random.Random(0)
    seed = bundle(message("/dreamdeck/fx/kaleido/segments", 8), message("/dreamdeck/prompt", "x")).dgram
    packets = []
    for _ in range(500):
        data = bytearray(seed)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        packets.append(bytes(data[: rng.randint(1, len(data))]))
    deep = message("/dreamdeck/fx/kaleido/segments", 8).dgram
    for _ in range(2000):  # deeper than Python's recursion limit once parsed
        deep = b"#bundle\x00" + b"\x00" * 7 + b"\x01" + len(deep).to_bytes(4, "big") + deep
    packets.append(deep)
    with caplog.at_level(logging.WARNING):
        for packet in packets:
            client.send(packet)
        client.send(message("/dreamdeck/fx/kaleido/segments", 5).dgram)
        wait_for(
            lambda: (
                server.counts.applied
                and registry.apply_pending(0.0) is not None
                and registry.target("/fx/kaleido/segments") == 5
            ),
            "the server to answer after garbage",
        )
    assert server.running and server.counts.rejected > 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "garbage reached an error path"


def test_the_fast_message_parser_agrees_with_python_osc() -> None:
    import random

    rng = random.Random(1)
    seeds = [
        message("/dreamdeck/a", 1, 2.5, "text", True, False, None, types="ifsTFN").dgram,
        message("/dreamdeck/b", 0.25, -7, types="di").dgram,
        message("/dreamdeck/c").dgram,
        message("/dreamdeck/d", 2**40, types="h").dgram,
        message("/dreamdeck/e", b"blob").dgram,
    ]
    parsed = 0
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(0, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        packet = bytes(data[: rng.randint(1, len(data))]) if rng.random() < 0.3 else bytes(data)
        try:
            fast = parse_plain_message(packet)
        except UnicodeDecodeError:
            continue  # python-osc raises the same for bad UTF-8; both count as malformed
        if fast is None:
            continue  # left to python-osc
        reference = osc_message.OscMessage(packet)
        assert repr(fast) == repr((reference.address, reference.params)), packet  # repr: NaN == NaN
        parsed += 1
    assert parsed > 1000
    assert parse_plain_message(seeds[-1]) is None, "blobs are python-osc's job"


def test_refusals_are_logged_at_most_once_a_second_with_a_count(caplog) -> None:
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("test.ratelimit"), interval=1.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.ratelimit"):
        assert limited.warning("first") is True
        for t in (0.1, 0.5, 0.99):
            now[0] = t
            assert limited.warning("held") is False
        now[0] = 1.0
        assert limited.warning("second") is True
    assert [r.getMessage() for r in caplog.records] == ["first", "second (3 more since the last line)"]


def test_a_burst_of_ten_thousand_messages_loses_none(
    server: OscServer, client: socket.socket, registry: ParamRegistry
) -> None:
    if server.receive_buffer < RECEIVE_BUFFER:
        pytest.skip(
            f"the kernel granted a {server.receive_buffer // 1024} KiB receive buffer (net.core.rmem_max); "
            "a 10,000-message burst needs 8 MiB: run as root or raise rmem_max"
        )
    param = registry.param("/fx/feedback/rotate")
    values = [param.min + (param.max - param.min) * i / 10_000 for i in range(1, 10_001)]
    packets = [message("/dreamdeck/fx/feedback/rotate", v).dgram for v in values]  # built first: a real burst
    for packet in packets:
        client.send(packet)
    wait_for(
        lambda: server.counts.received >= 10_000,
        lambda: f"10,000 messages (receive buffer {server.receive_buffer} bytes); counts {server.counts}",
        timeout=30,
    )
    assert (server.counts.received, server.counts.applied, server.counts.rejected) == (10_000, 10_000, 0)
    landed = registry.apply_pending(0.0)
    assert len(landed) == 10_000, "every value lands, in order, at one frame boundary"
    assert registry.target("/fx/feedback/rotate") == pytest.approx(values[-1], abs=1e-5)


def test_the_render_thread_takes_what_the_receive_thread_has_not(registry: ParamRegistry, recorder: Recorder) -> None:
    """moderngl holds the GIL through GL calls; a starved receive thread must not mean lost messages."""
    server = OscServer(registry, recorder.actions, port=0)
    server._serve_udp = lambda sock: server._stop.wait()  # a receive thread that never gets to run
    server.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("127.0.0.1", server.port))
            for n in range(1, 301):
                sock.send(message("/dreamdeck/fx/kaleido/rotate", float(n)).dgram)
            sock.send(message("/dreamdeck/scene/next").dgram)
        frames = 0
        while server.counts.received < 301:
            server.frame(frames / 60)
            frames += 1
            assert frames < 10_000, f"the frame drain made no progress: {server.counts}"
        landed = registry.apply_pending(0.0)
        assert [c.value for c in landed] == [float(n) for n in range(1, 301)], "in arrival order, none lost"
        assert recorder.run() == [("scene/next", ())]
    finally:
        server.stop()


# -- replies and feedback -----------------------------------------------------------------------


def test_get_replies_to_the_sender(server: OscServer, client: socket.socket, registry: ParamRegistry) -> None:
    registry.set("/fx/kaleido/segments", 11)
    registry.set("/fx/grade/enabled", True)
    registry.apply_pending(0.0)
    send(client, message("/dreamdeck/get", "/fx/kaleido/segments", "/dreamdeck/fx/grade/enabled"))
    replies = read_messages(client, 2)
    assert [(m.address, m.params) for m in replies] == [
        ("/dreamdeck/fx/kaleido/segments", [11]),
        ("/dreamdeck/fx/grade/enabled", [1]),
    ]

    send(client, message("/dreamdeck/get", "/scene/reaction_diffusion/colour_*"))
    colours = read_messages(client, 2)
    assert all(
        m.address.startswith("/dreamdeck/scene/reaction_diffusion/colour_") and len(m.params) == 4 for m in colours
    )

    send(client, message("/dreamdeck/get"))
    everything = read_messages(client, len(registry.snapshot()))
    assert {m.address for m in everything} == {"/dreamdeck" + p for p in registry.snapshot()}
    assert nothing_more(client)
    assert server.counts.sent == 2 + 2 + len(registry.snapshot())


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(TIMEOUT)
    yield sock
    sock.close()


def test_feedback_sends_every_change_once_per_frame_newest_value(
    make_server: Callable[..., OscServer], listener: socket.socket, registry: ParamRegistry
) -> None:
    server = make_server(feedback=("127.0.0.1", listener.getsockname()[1]))
    with python_osc(server.port) as osc:
        for n in (5, 6, 7):  # three changes before one frame: one message, the newest value
            osc.send_message("/dreamdeck/fx/kaleido/segments", n)
        received(server, 3)
    registry.set("/layer/scene/blend", "add", origin="preset")
    registry.apply_pending(0.0)
    assert nothing_more(listener, 0.05), "feedback goes out at frame(), on the render thread"
    server.frame(0.0)
    got = {m.address: m.params for m in read_messages(listener, 2)}
    assert got == {"/dreamdeck/fx/kaleido/segments": [7], "/dreamdeck/layer/scene/blend": ["add"]}
    server.frame(1 / 60)
    assert nothing_more(listener), "nothing changed, nothing sent"
    assert server.counts.sent == 2


def test_feedback_to_this_server_itself_is_refused(registry: ParamRegistry, recorder: Recorder) -> None:
    server = OscServer(registry, recorder.actions, port=0, feedback=("127.0.0.1", 1))
    server.start()
    port = server.port
    server.stop()
    looping = OscServer(registry, recorder.actions, port=port, feedback=("localhost", port))
    with pytest.raises(ValueError, match="come back in"):
        looping.start()
    assert not looping.running


# -- who may send -------------------------------------------------------------------------------


def test_binding_beyond_loopback_needs_an_allowlist(registry: ParamRegistry, recorder: Recorder) -> None:
    for host in ("0.0.0.0", ""):
        with pytest.raises(ValueError, match="allowlist"):
            OscServer(registry, recorder.actions, host=host, port=0)
    with pytest.raises(ValueError, match="empty allowlist"):
        OscServer(registry, recorder.actions, host="0.0.0.0", port=0, allow=[])
    with pytest.raises(ValueError, match="not an IP"):
        OscServer(registry, recorder.actions, host="0.0.0.0", port=0, allow=["stage-pc"])
    assert check_binding("127.0.0.1", None, "x") is None and check_binding("localhost", None, "x") is None


def test_senders_off_the_allowlist_are_dropped(
    make_server: Callable[..., OscServer], registry: ParamRegistry, caplog
) -> None:
    server = make_server(host="0.0.0.0", allow=["127.0.0.1"])
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.2", 0))  # the whole 127/8 is loopback on Linux: a second "machine"
    friend = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    friend.bind(("127.0.0.1", 0))
    try:
        with caplog.at_level(logging.WARNING, logger="engine.control.osc"):
            stranger.sendto(message("/dreamdeck/fx/kaleido/segments", 2).dgram, ("127.0.0.1", server.port))
            friend.sendto(message("/dreamdeck/fx/kaleido/rotate", 30.0).dgram, ("127.0.0.1", server.port))
            wait_for(
                lambda: server.counts.dropped == 1 and server.counts.applied == 1, lambda: f"counts {server.counts}"
            )
    finally:
        stranger.close()
        friend.close()
    registry.apply_pending(0.0)
    assert registry.target("/fx/kaleido/rotate") == 30.0
    assert registry.target("/fx/kaleido/segments") != 2
    assert any("127.0.0.2 dropped" in r.getMessage() for r in caplog.records)
    assert "dropped 1" in server.status


def test_sender_filter_takes_networks_and_mapped_ipv6() -> None:
    allowed = SenderFilter(check_binding("0.0.0.0", ["10.0.0.0/24", "192.168.1.20"], "x"))
    assert allowed.allows("10.0.0.99") and allowed.allows("192.168.1.20") and allowed.allows("::ffff:10.0.0.5")
    assert not allowed.allows("10.0.1.1") and not allowed.allows("192.168.1.21") and not allowed.allows("junk")


# -- actions ------------------------------------------------------------------------------------


def test_actions_are_posted_for_the_frame_boundary(
    server: OscServer, client: socket.socket, recorder: Recorder
) -> None:
    send(
        client,
        message("/dreamdeck/scene/next"),
        message("/dreamdeck/scene/next", 0),  # a button's release: nothing
        message("/dreamdeck/scene/next", 1.0),  # a button's press from a CHOP
        message("/dreamdeck/scene/select", "passthrough"),
        message("/dreamdeck/scene/select", 1.0),
        message("/dreamdeck/preset/recall", 2.0),
        message("/dreamdeck/preset/save", "late", "night"),
        message("/dreamdeck/prompt", "a", "red", "cat"),
        message("/dreamdeck/tap"),
        message("/dreamdeck/midi/learn", "/dreamdeck/fx/kaleido/segments"),
    )
    received(server, 10)
    assert server.counts.applied == 10, server.last_error
    assert recorder.run() == [
        ("scene/next", ()),
        ("scene/next", ()),
        ("scene/select", ("passthrough",)),
        ("scene/select", (1,)),
        ("preset/recall", (2,)),
        ("preset/save", ("late night",)),
        ("prompt", ("a red cat",)),
        ("tap", ()),
        ("midi/learn", ("/fx/kaleido/segments", "")),
    ]


# Each action called wrongly over UDP: refused whole, with the declaration's signature in the line.
WRONG_ACTION_CALLS = [
    (message("/dreamdeck/scene/select"), "scene/select(ref: str|int): got 0 arguments"),
    (message("/dreamdeck/scene/select", "a", "b"), "scene/select(ref: str|int): got 2 arguments"),
    (message("/dreamdeck/scene/select", 1.5), "scene/select(ref: str|int): ref takes a name or a whole number"),
    (message("/dreamdeck/preset/recall", True), "preset/recall(ref: str|int): ref takes a name or a whole number"),
    (message("/dreamdeck/scene/preload", 3), "scene/preload(name: str): name takes a name, got 3"),
    (message("/dreamdeck/prompt"), "prompt(text: text): got 0 arguments"),
    (
        message("/dreamdeck/midi/learn", "/fx/kaleido/segments", "relative-signed", "x"),
        "midi/learn(path: path, mode: str = ''): got 3 arguments",
    ),
    (message("/dreamdeck/midi/learn", 5), "midi/learn(path: path, mode: str = ''): path takes a parameter path"),
    (message("/dreamdeck/tap", "now"), "tap(): a button sends no argument or one number"),
]


@pytest.mark.parametrize("packet,expected", WRONG_ACTION_CALLS, ids=[e for _, e in WRONG_ACTION_CALLS])
def test_an_action_with_wrong_arguments_is_refused_naming_its_signature(
    server: OscServer, client: socket.socket, recorder: Recorder, packet: Any, expected: str
) -> None:
    send(client, packet)
    received(server, 1)
    assert server.counts.rejected == 1 and expected in server.last_error, server.last_error
    assert "\n" not in server.last_error and recorder.run() == []


def test_optional_action_arguments_come_from_the_declaration(
    server: OscServer, client: socket.socket, recorder: Recorder
) -> None:
    send(
        client,
        message("/dreamdeck/midi/learn", "/fx/kaleido/segments", "relative-signed"),
        message("/dreamdeck/prompt", "take", 5, "steps"),
    )
    received(server, 2)
    assert recorder.run() == [
        ("midi/learn", ("/fx/kaleido/segments", "relative-signed")),
        ("prompt", ("take 5 steps",)),
    ]


def test_an_action_the_engine_lacks_is_refused_not_fatal(
    make_server: Callable[..., OscServer], registry: ParamRegistry
) -> None:
    partial = Recorder(names=["scene/next"])
    server = make_server(actions=partial.actions)
    with python_osc(server.port) as osc:
        osc.send_message("/dreamdeck/tap", [])
        osc.send_message("/dreamdeck/scene/next", [])
        received(server, 2)
    assert server.counts.rejected == 1 and "/dreamdeck/tap" in server.last_error
    assert partial.run() == [("scene/next", ())]


def test_no_parameter_hides_an_action_or_a_reserved_address(registry: ParamRegistry) -> None:
    assert address_collisions(registry) == []
    registry.declare(float_param("/scene/next/speed", 1.0, 0.0, 2.0))
    assert address_collisions(registry) == ["/scene/next/speed hides /dreamdeck/scene/next"]


def test_new_parameters_are_reached_by_wildcards_after_a_frame(
    server: OscServer, client: socket.socket, registry: ParamRegistry
) -> None:
    registry.declare(float_param("/fx/late/amount", 0.0, 0.0, 1.0))
    server.frame(0.0)
    send(client, message("/dreamdeck/fx/l*/amount", 0.5))
    received(server, 1)
    registry.apply_pending(0.0)
    assert registry.target("/fx/late/amount") == 0.5


def fixed_free_port() -> int:
    """A port free for UDP and TCP below Linux's ephemeral range (32768+), so no outgoing
    connection elsewhere on the machine can take it between two binds of this test."""
    for port in random.Random().sample(range(20000, 32000), 200):
        try:
            with (
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u,
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t,
            ):
                u.bind(("127.0.0.1", port))
                t.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port in 20000-32000")


def test_stop_frees_the_port_and_start_is_idempotent(registry: ParamRegistry, recorder: Recorder) -> None:
    server = OscServer(registry, recorder.actions, port=fixed_free_port(), tcp=True)
    server.start()
    server.start()
    port = server.port
    server.stop()
    assert server.status == "osc off"
    again = OscServer(registry, recorder.actions, port=port, tcp=True)
    again.start()  # the same port binds again at once
    again.stop()


def test_a_taken_port_says_so(server: OscServer, registry: ParamRegistry, recorder: Recorder) -> None:
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{server.port}"):
        OscServer(registry, recorder.actions, port=server.port).start()


# -- the app ------------------------------------------------------------------------------------


def test_osc_reaches_the_running_app(listener: socket.socket) -> None:
    from engine.app import App, AppConfig
    from engine.clock import ManualClock
    from engine.render.surface import HeadlessSurface

    surface = HeadlessSurface()
    app = App(AppConfig(source="pattern", output_size=(160, 90), hot_reload=False), surface, ManualClock(60.0))
    server = OscServer(app.params, app.actions, port=0, feedback=("127.0.0.1", listener.getsockname()[1]))
    app.add_control(server)
    try:
        app.start()
        assert server.running
        scene = app.params.get("/scene/active")
        with python_osc(server.port) as osc:
            osc.send_message("/dreamdeck/fx/kaleido/segments", 13)
            osc.send_message("/dreamdeck/scene/next", [])
            received(server, 2)
        app.step()  # actions run, then values land, then controls send feedback: one frame
        assert app.params.get("/fx/kaleido/segments") == 13
        switched = app.params.get("/scene/active")
        assert switched != scene
        feedback = {m.address: m.params for m in read_messages(listener, 2)}
        assert feedback == {"/dreamdeck/fx/kaleido/segments": [13], "/dreamdeck/scene/active": [switched]}
    finally:
        app.close()
        surface.close()
    assert not server.running
