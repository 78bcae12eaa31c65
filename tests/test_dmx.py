"""DMX control with real packets: the sacn library's sACNsender and stupidArtnet's sender, over loopback.

Each test plays a lighting desk: a library sender aimed at 127.0.0.1 and the port the
DmxControl bound (port 0: a free one). ``Rig.step`` is one frame boundary as the App runs
it (the control's frame, then the registry lands what it set, then posted actions run).
Waits are bounded polling loops; nothing asserts on wall-clock speed.
"""

from __future__ import annotations

import socket
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from engine.control.actions import ActionError, Actions
from engine.control.dmx import DmxControl, parse_artdmx, parse_inputs
from engine.control.dmx.receive import MalformedPacket
from engine.control.midimap import (
    DmxMapping,
    DmxMode,
    MappingError,
    guess_dmx_mapping,
    load_mappings,
    parse_dmx_mapping,
    save_mappings,
)
from engine.params import ParamRegistry, bool_param, float_param, int_param, string_param, trigger_param

sacn = pytest.importorskip("sacn", reason="pip install 'dreamdeck[dmx]'")
stupidArtnet = pytest.importorskip("stupidArtnet", reason="the tests' Art-Net sender: pip install stupidartnet")

TIMEOUT = 10.0  # generous: the machine may be shared; nothing here measures speed
LEVEL = "/test/level"


def make_registry() -> ParamRegistry:
    registry = ParamRegistry()
    registry.declare_all(
        [
            float_param(LEVEL, 0.0, 0.0, 1.0, smoothing=0.0),
            float_param("/test/fine", 0.0, 0.0, 1.0, smoothing=0.0),
            int_param("/test/segments", 4, 1, 16),
            bool_param("/test/on", False),
            trigger_param("/test/flash"),
            string_param("/test/text"),
        ]
    )
    return registry


def write_map(path: Path, *entries: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps({"version": 1, "map": list(entries)}), encoding="utf-8")
    return path


def wait_until(condition: Callable[[], bool], step: Callable[[], None] | None = None, what: str = "") -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or condition}")
        if step is not None:
            step()
        time.sleep(0.005)


class Rig:
    """A DmxControl on free loopback ports, a registry, and the App's frame order."""

    def __init__(self, tmp_path: Path, *entries: dict[str, Any], inputs=("artnet:0", "sacn:1"), **kwargs: Any) -> None:
        self.registry = make_registry()
        self._senders: list[Any] = []
        self.actions = Actions()
        self.recalled: list[Any] = []
        self.actions.register("preset/recall", self.recalled.append)
        self.map_path = write_map(tmp_path / "midi.toml", *entries)
        self.dmx = DmxControl(
            self.registry,
            self.actions,
            list(inputs),
            mappings_path=self.map_path,
            ports={"artnet": 0, "sacn": 0},
            **kwargs,
        )
        self.dmx.start()

    def step(self) -> None:
        self.dmx.frame(0.0)
        self.registry.apply_pending(1 / 60)
        self.actions.run_pending()

    def until(self, condition: Callable[[], bool], what: str = "") -> None:
        wait_until(condition, self.step, what)

    def artnet(self, universe: int = 0) -> Any:
        sender = stupidArtnet.StupidArtnet("127.0.0.1", universe, 512, port=self.dmx.port("artnet"))
        self._senders.append(sender)
        return sender

    def raw(self, protocol: str, data: bytes) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(data, ("127.0.0.1", self.dmx.port(protocol)))

    def close(self) -> None:
        self.dmx.stop()
        for sender in self._senders:
            sender.close()


@pytest.fixture
def rig_factory(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(*entries: dict[str, Any], **kwargs: Any) -> Rig:
        rig = Rig(tmp_path, *entries, **kwargs)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


@pytest.fixture
def sacn_sender(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int, int], Any]]:
    """The sacn library's own sender, unicast to 127.0.0.1 (no universe discovery: it broadcasts).

    The library sends to E1.31's port 5568 always; its module constant is pointed at the
    test receiver's free port instead, so the tests never need (or collide on) 5568.
    """
    import sacn.sending.sender_socket_udp as udp

    senders: list[Any] = []

    def make(port: int, universe: int = 1) -> Any:
        monkeypatch.setattr(udp, "DEFAULT_PORT", port)
        sender = sacn.sACNsender(bind_address="127.0.0.1", bind_port=0, fps=200, universeDiscovery=False)
        sender.activate_output(universe)
        sender[universe].destination = "127.0.0.1"
        sender.start()
        senders.append(sender)
        return sender

    yield make
    for sender in senders:
        sender.stop()


def levels(**channels: int) -> tuple[int, ...]:
    """512 levels, zero but for ``ch7=200`` style keywords."""
    data = [0] * 512
    for name, value in channels.items():
        data[int(name[2:]) - 1] = value
    return tuple(data)


def send_artnet(sender: Any, **channels: int) -> None:
    sender.clear()
    for name, value in channels.items():
        sender.set_single_value(int(name[2:]), value)
    sender.show()


# -- packets move mapped parameters -------------------------------------------------------------


def test_artnet_packets_from_a_sender_move_mapped_parameters(rig_factory) -> None:
    rig = rig_factory(
        {"type": "dmx", "protocol": "artnet", "universe": 0, "channel": 1, "param": LEVEL, "takeover": "jump"},
        {"type": "dmx", "universe": 0, "channel": 2, "param": "/test/segments", "takeover": "jump"},
        {"type": "dmx", "universe": 0, "channel": 3, "param": "/test/on", "takeover": "jump"},
    )
    desk = rig.artnet()
    send_artnet(desk, ch1=255, ch2=0, ch3=255)
    rig.until(lambda: rig.registry.get(LEVEL) == 1.0, "channel 1 at full")
    assert rig.registry.get("/test/segments") == 1 and rig.registry.get("/test/on") is True
    send_artnet(desk, ch1=51, ch2=255, ch3=0)
    rig.until(lambda: rig.registry.get(LEVEL) == pytest.approx(51 / 255), "channel 1 at 20%")
    assert rig.registry.get("/test/segments") == 16 and rig.registry.get("/test/on") is False
    assert rig.registry.last_change.origin == "dmx"
    status = rig.dmx.status
    assert status.startswith("dmx in: artnet:0, sacn:1 on 127.0.0.1") and "last: artnet u0 ch" in status


def test_sacn_packets_from_the_library_sender_move_mapped_parameters(rig_factory, sacn_sender) -> None:
    rig = rig_factory(
        {"type": "dmx", "protocol": "sacn", "universe": 1, "channel": 10, "param": LEVEL, "takeover": "jump"}
    )
    sender = sacn_sender(rig.dmx.port("sacn"))
    sender[1].dmx_data = levels(ch10=128)
    rig.until(lambda: rig.registry.get(LEVEL) == pytest.approx(128 / 255), "sACN channel 10")
    sender[1].dmx_data = levels(ch10=255)
    rig.until(lambda: rig.registry.get(LEVEL) == 1.0, "sACN channel 10 at full")
    assert rig.dmx.receivers["sacn"].counters.levels >= 2


def test_sacn_the_higher_priority_source_wins(rig_factory, sacn_sender) -> None:
    rig = rig_factory(
        {"type": "dmx", "universe": 1, "channel": 1, "param": LEVEL, "takeover": "jump"}, inputs=("sacn",)
    )
    main, backup = sacn_sender(rig.dmx.port("sacn")), sacn_sender(rig.dmx.port("sacn"))
    main[1].priority = 150
    main[1].dmx_data = levels(ch1=200)
    rig.until(lambda: rig.registry.get(LEVEL) == pytest.approx(200 / 255), "the main desk")
    backup[1].dmx_data = levels(ch1=60)  # priority 100: a backup desk, not listened to while the main one sends
    received = rig.dmx.receivers["sacn"].counters.packets
    rig.until(lambda: rig.dmx.receivers["sacn"].counters.packets >= received + 3, "the backup's packets")
    for _ in range(3):
        rig.step()
    assert rig.registry.get(LEVEL) == pytest.approx(200 / 255)


def test_a_mapping_of_one_protocol_ignores_the_other(rig_factory, sacn_sender) -> None:
    rig = rig_factory(
        {"type": "dmx", "protocol": "artnet", "universe": 1, "channel": 1, "param": LEVEL, "takeover": "jump"},
        inputs=("artnet:1", "sacn:1"),
    )
    sender = sacn_sender(rig.dmx.port("sacn"))
    sender[1].dmx_data = levels(ch1=255)
    rig.until(lambda: rig.dmx.receivers["sacn"].counters.levels >= 1, "the sACN levels")
    for _ in range(5):
        rig.step()
    assert rig.registry.get(LEVEL) == 0.0, "an artnet mapping does not follow sACN universe 1"
    send_artnet(rig.artnet(1), ch1=255)
    rig.until(lambda: rig.registry.get(LEVEL) == 1.0, "the Art-Net levels")


# -- 16 bits ----------------------------------------------------------------------------------------


def test_a_coarse_fine_pair_gives_16_bit_resolution(rig_factory, sacn_sender) -> None:
    rig = rig_factory(
        {"type": "dmx", "universe": 1, "channel": 5, "fine": 6, "param": LEVEL, "takeover": "jump"},
        inputs=("sacn:1",),
    )
    sender = sacn_sender(rig.dmx.port("sacn"))
    seen = []
    for level in (0x8000, 0x8001, 0x8002, 0xFFFF):
        sender[1].dmx_data = levels(ch5=level >> 8, ch6=level & 0xFF)
        rig.until(lambda level=level: rig.registry.get(LEVEL) == pytest.approx(level / 65535, abs=1e-12), f"{level}")
        seen.append(rig.registry.get(LEVEL))
    assert len(set(seen)) == 4, "neighbouring 16-bit levels are distinct values"
    assert seen[1] - seen[0] == pytest.approx(1 / 65535)


def test_every_one_of_the_65536_levels_of_a_pair_is_a_distinct_value() -> None:
    registry = make_registry()
    mapping = parse_dmx_mapping({"type": "dmx", "universe": 1, "channel": 511, "fine": 512, "param": LEVEL}, registry)
    param = registry.param(LEVEL)
    data = bytearray(512)
    values = set()
    for level in range(65536):
        data[510], data[511] = level >> 8, level & 0xFF
        values.add(param.denormalise(mapping.level(bytes(data)) / mapping.full))
    assert len(values) == 65536 and min(values) == 0.0 and max(values) == 1.0


def test_artnet_16_bit_pair_from_the_library_sender(rig_factory) -> None:
    rig = rig_factory({"type": "dmx", "universe": 0, "channel": 1, "fine": 2, "param": LEVEL, "takeover": "jump"})
    desk = rig.artnet()
    desk.set_16bit(1, 40000, high_first=True)
    desk.show()
    rig.until(lambda: rig.registry.get(LEVEL) == pytest.approx(40000 / 65535, abs=1e-12), "40000 of 65535")


# -- soft takeover, triggers, presets ---------------------------------------------------------------


def test_soft_takeover_waits_for_the_fader_to_reach_the_value(rig_factory) -> None:
    rig = rig_factory({"type": "dmx", "universe": 0, "channel": 1, "param": LEVEL})  # takeover: pickup by default
    desk = rig.artnet()
    rig.registry.set(LEVEL, 0.8, origin="osc")
    rig.step()
    for level in (51, 128):  # 20%, 50%: below the value, not picked up
        send_artnet(desk, ch1=level)
        rig.until(lambda: "pick up" in rig.dmx.status, "the pick-up note")
        assert rig.registry.get(LEVEL) == 0.8
        rig.dmx._last = "-"
    send_artnet(desk, ch1=230)  # 90%: crossed 80% since 50%: it takes over
    rig.until(lambda: rig.registry.get(LEVEL) == pytest.approx(230 / 255), "the pick-up")
    send_artnet(desk, ch1=26)  # held now: it follows
    rig.until(lambda: rig.registry.get(LEVEL) == pytest.approx(26 / 255), "following")


def test_a_trigger_fires_when_the_level_rises_through_half(rig_factory) -> None:
    rig = rig_factory({"type": "dmx", "universe": 0, "channel": 9, "param": "/test/flash"})
    fired = []
    rig.registry.add_listener(lambda change: fired.append(change.path) if change.path == "/test/flash" else None)
    desk = rig.artnet()
    send_artnet(desk, ch9=0)
    rig.until(lambda: rig.dmx.applied >= 1, "the first levels")
    for n, level in enumerate((100, 200, 255, 10, 140), start=2):  # rises through 128 twice
        send_artnet(desk, ch9=level)
        rig.until(lambda n=n: rig.dmx.applied == n, f"level {level}")
    rig.step()
    assert fired == ["/test/flash", "/test/flash"]


def test_a_preset_channel_recalls_a_preset_per_band_of_levels(rig_factory) -> None:
    rig = rig_factory(
        {"type": "dmx", "universe": 0, "channel": 20, "mode": "preset", "presets": ["intro", "drop"]},
        {"type": "dmx", "universe": 0, "channel": 21, "mode": "preset", "width": 50},
    )
    desk = rig.artnet()
    for n, (ch20, ch21) in enumerate(((5, 0), (15, 0), (17, 0), (25, 0), (35, 0), (25, 160)), start=1):
        send_artnet(desk, ch20=ch20, ch21=ch21)
        rig.until(lambda n=n: rig.dmx.applied == n, f"packet {n}")
    rig.step()
    # 5: below the first band; 15: intro; 17: the same band; 25: drop; 35: past the list; 160 on ch21: preset 3
    assert rig.recalled == ["intro", "drop", "drop", 3]


# -- learn ----------------------------------------------------------------------------------------------


def test_learn_maps_the_fader_moved_and_saves_it_next_to_the_midi_mappings(rig_factory) -> None:
    midi_entry = {"port": "nanoKONTROL", "channel": 1, "type": "cc", "number": 16, "param": LEVEL}
    rig = rig_factory(midi_entry)
    desk = rig.artnet()
    send_artnet(desk)  # the baseline learn compares against
    rig.until(lambda: rig.dmx.applied >= 1, "the baseline")
    rig.actions.post("dmx/learn", "/test/segments")
    rig.step()
    assert "learn armed: /test/segments" in rig.dmx.status
    for level in (10, 40, 90):  # the performer moves channel 7
        send_artnet(desk, ch7=level)
        time.sleep(0.02)
    rig.until(lambda: rig.dmx.mappings, "the learned mapping")
    (mapping,) = rig.dmx.mappings
    assert (mapping.protocol, mapping.universe, mapping.channel, mapping.fine) == ("artnet", 0, 7, None)
    assert mapping.param == "/test/segments" and rig.dmx.learning is None
    wait_until(lambda: "dmx" in rig.map_path.read_text(), what="the saved file")
    saved = tomllib.loads(rig.map_path.read_text())["map"]
    assert midi_entry in saved, "the MIDI mapping is kept"
    assert {"type": "dmx", "protocol": "artnet", "universe": 0, "channel": 7, "param": "/test/segments"}.items() <= [
        e for e in saved if e.get("type") == "dmx"
    ][0].items()
    assert not list(rig.map_path.parent.glob(".*.tmp")), "written atomically: no temp file left"
    # the learned fader drives the parameter (picked up where it is: 4 of 1..16 is 20%)
    applied = rig.dmx.applied
    send_artnet(desk, ch7=51)
    rig.until(lambda: rig.dmx.applied > applied and "ch7=51" in rig.dmx.status, "the learned channel")
    assert "pick up" not in rig.dmx.status
    send_artnet(desk, ch7=255)
    rig.until(lambda: rig.registry.get("/test/segments") == 16, "the learned channel at full")


def test_learn_recognises_a_coarse_fine_pair(rig_factory, sacn_sender) -> None:
    rig = rig_factory(inputs=("sacn:1",))
    sender = sacn_sender(rig.dmx.port("sacn"))
    sender[1].dmx_data = levels()
    rig.until(lambda: rig.dmx.applied >= 1, "the baseline")
    rig.dmx.learn(LEVEL)
    for level in (1000, 9000, 30000):
        sender[1].dmx_data = levels(ch3=level >> 8, ch4=level & 0xFF)
        time.sleep(0.03)
    rig.until(lambda: rig.dmx.mappings, "the learned pair")
    (mapping,) = rig.dmx.mappings
    assert (mapping.protocol, mapping.universe, mapping.channel, mapping.fine) == ("sacn", 1, 3, 4)


def test_learn_presets_and_what_learn_refuses(rig_factory) -> None:
    rig = rig_factory()
    with pytest.raises(ActionError, match="DMX cannot drive"):
        rig.dmx.learn("/test/text")
    with pytest.raises(ActionError, match="unknown parameter"):
        rig.dmx.learn("/nope")
    with pytest.raises(ActionError, match="unknown DMX learn mode"):
        rig.dmx.learn(LEVEL, "sideways")
    desk = rig.artnet()
    send_artnet(desk)
    rig.until(lambda: rig.dmx.applied >= 1, "the baseline")
    rig.actions.post("dmx/learn_presets")
    rig.step()
    send_artnet(desk, ch30=20)
    rig.until(lambda: rig.dmx.mappings, "the preset channel")
    assert rig.dmx.mappings[0].mode is DmxMode.PRESET and rig.dmx.mappings[0].channel == 30


def test_guessing_a_learned_mapping() -> None:
    registry = make_registry()
    level = registry.param(LEVEL)
    assert guess_dmx_mapping("artnet", 0, [7], level).fine is None
    pair = guess_dmx_mapping("artnet", 0, [4, 3], level)  # the fine channel moves first
    assert (pair.channel, pair.fine) == (3, 4)
    forced = guess_dmx_mapping("sacn", 2, [9], level, "16bit")
    assert (forced.channel, forced.fine) == (9, 10)
    assert guess_dmx_mapping("sacn", 2, [3, 4], level, "absolute").fine is None
    assert guess_dmx_mapping("sacn", 2, [3, 4], registry.param("/test/flash")).mode is DmxMode.TRIGGER
    with pytest.raises(MappingError, match="no fine channel"):
        guess_dmx_mapping("sacn", 2, [512], level, "16bit")


# -- refused and counted; the show plays on ---------------------------------------------------------------


def artdmx(universe: int = 0, data: bytes = bytes(512), version: int = 14, length: int | None = None) -> bytes:
    size = len(data) if length is None else length
    return (
        b"Art-Net\x00"
        + (0x5000).to_bytes(2, "little")
        + version.to_bytes(2, "big")
        + b"\x00\x00"
        + universe.to_bytes(2, "little")
        + size.to_bytes(2, "big")
        + data
    )


def test_malformed_packets_are_refused_counted_and_the_next_good_one_applies(rig_factory) -> None:
    rig = rig_factory({"type": "dmx", "universe": 0, "channel": 1, "param": LEVEL, "takeover": "jump"})
    good_sacn = bytes(sacn.DataPacket(cid=tuple(range(16)), sourceName="desk", universe=1).getBytes())
    bad = {
        "artnet": [
            b"hello",  # not Art-Net
            b"Art-Net\x00\x00\x50\x00",  # ArtDmx cut inside its header
            artdmx(version=9),  # too old
            artdmx(length=600),  # longer than DMX
            artdmx(data=bytes(10), length=20),  # says more than it carries
            artdmx(universe=0x8000),  # bit 15 of the port-address
        ],
        "sacn": [
            b"\x00" * 40,  # too short
            good_sacn[:18] + b"\x00\x00\x00\x00" + good_sacn[22:],  # a wrong root vector
            good_sacn[:113] + b"\x00\x00" + good_sacn[115:],  # universe 0
            good_sacn[:44] + b"\xff\xfe" + good_sacn[46:],  # a source name that is not UTF-8
            good_sacn[:108] + b"\xff" + good_sacn[109:],  # priority 255 (0..200)
        ],
    }
    for protocol, packets in bad.items():
        for packet in packets:
            rig.raw(protocol, packet)
    rig.raw("artnet", ARTPOLL)  # valid, not levels: answered
    counters = {p: rig.dmx.receivers[p].counters for p in bad}
    wait_until(lambda: sum(c.packets for c in counters.values()) == 12, what="every packet read")
    assert counters["artnet"].malformed == 6 and counters["sacn"].malformed == 5
    assert counters["artnet"].polls == 1 and counters["artnet"].levels == counters["sacn"].levels == 0
    assert "refused 11 malformed" in rig.dmx.status
    assert "malformed packet from 127.0.0.1 refused" in rig.dmx.status
    rig.raw("artnet", artdmx(data=bytes([255]) + bytes(511)))
    rig.until(lambda: rig.registry.get(LEVEL) == 1.0, "a good packet after the bad ones")
    assert all(r._thread is not None and r._thread.is_alive() for r in rig.dmx.receivers.values())


def test_a_wrong_universe_is_refused_and_counted(rig_factory, sacn_sender) -> None:
    rig = rig_factory({"type": "dmx", "universe": 0, "channel": 1, "param": LEVEL, "takeover": "jump"})
    send_artnet(rig.artnet(universe=5), ch1=255)
    sender = sacn_sender(rig.dmx.port("sacn"), universe=2)
    sender[2].dmx_data = levels(ch1=255)
    wait_until(lambda: rig.dmx.receivers["sacn"].counters.wrong_universe >= 1, what="sACN universe 2 refused")
    wait_until(lambda: rig.dmx.receivers["artnet"].counters.wrong_universe == 1, what="Art-Net universe 5 refused")
    for _ in range(3):
        rig.step()
    assert rig.registry.get(LEVEL) == 0.0 and rig.dmx.applied == 0
    assert "wrong universe" in rig.dmx.status


def test_a_flood_is_rate_limited_coalesced_to_one_value_per_frame_and_counted(rig_factory) -> None:
    rig = rig_factory(
        {"type": "dmx", "universe": 0, "channel": 1, "param": LEVEL, "takeover": "jump"}, rate=200, burst=50
    )
    sets = []
    rig.registry.add_listener(lambda change: sets.append(change.value) if change.path == LEVEL else None)
    flood = 3000
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        for i in range(flood):
            sock.sendto(artdmx(data=bytes([i % 256]) + bytes(511)), ("127.0.0.1", rig.dmx.port("artnet")))
    counters = rig.dmx.receivers["artnet"].counters
    previous = -1
    while counters.packets != previous:  # until the receiver has read what the kernel kept
        previous = counters.packets
        time.sleep(0.2)
    assert counters.flood > 0 and counters.flood + counters.levels == counters.packets
    assert rig.dmx.coalesced == counters.levels - 1, "no frame ran: every level but the newest was replaced"
    with rig.dmx._slot_lock:  # a receiver storing levels this instant: the frame does not wait for it
        rig.dmx.frame(0.0)
    assert rig.dmx.applied == 0
    rig.step()
    rig.step()
    assert len(sets) == 1, "one value per channel per frame"
    assert "flood" in rig.dmx.status
    # once the flood is over, the desk's next packet applies
    value = 77
    rig.until(
        lambda: rig.raw("artnet", artdmx(data=bytes([value]) + bytes(511))) or rig.registry.get(LEVEL) == value / 255,
        "a packet after the flood",
    )


ARTPOLL = b"Art-Net\x00" + (0x2000).to_bytes(2, "little") + (14).to_bytes(2, "big") + b"\x00\x00"


def test_a_desk_polling_for_nodes_is_told_the_universes(rig_factory) -> None:
    rig = rig_factory(inputs=("artnet:0", "artnet:1", "artnet:17"))  # Sub-Net 0 (0, 1) and Sub-Net 1 (17)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as desk:
        desk.bind(("127.0.0.1", 0))
        desk.settimeout(TIMEOUT)
        desk.sendto(ARTPOLL, ("127.0.0.1", rig.dmx.port("artnet")))
        replies = sorted((desk.recv(1024) for _ in range(2)), key=lambda r: r[211])
        desk.sendto(ARTPOLL, ("127.0.0.1", rig.dmx.port("artnet")))  # polled again at once: not answered twice
        wait_until(lambda: rig.dmx.receivers["artnet"].counters.packets == 2, what="the second poll")
    for reply in replies:
        assert len(reply) == 239 and reply[:8] == b"Art-Net\x00"
        assert int.from_bytes(reply[8:10], "little") == 0x2100, "OpPollReply"
        assert socket.inet_ntoa(reply[10:14]) == "127.0.0.1" and int.from_bytes(reply[14:16], "little") == 6454
        assert reply[26:36] == b"dreamdeck\x00"
    first, second = replies
    assert (first[18], first[19], int.from_bytes(first[172:174], "big"), list(first[190:192])) == (0, 0, 2, [0, 1])
    assert (second[19], int.from_bytes(second[172:174], "big"), second[190], second[211]) == (1, 1, 1, 2)
    counters = rig.dmx.receivers["artnet"].counters
    assert counters.polls == 1 and counters.malformed == 0


def test_listeners_bind_to_loopback_unless_opened_with_an_allowlist(rig_factory, tmp_path: Path) -> None:
    rig = rig_factory()
    for receiver in rig.dmx.receivers.values():
        assert receiver._sock.getsockname()[0] == "127.0.0.1"
        assert receiver.multicast == [], "no multicast on the loopback"
    with pytest.raises(ValueError, match="reachable from the network"):
        DmxControl(make_registry(), Actions(), "artnet", host="0.0.0.0")
    # opened, with an allowlist that leaves this machine out: its packets are refused and counted
    opened = DmxControl(
        make_registry(), Actions(), "artnet", host="0.0.0.0", allow=["10.99.0.0/24"], ports={"artnet": 0}
    )
    opened.start()
    try:
        assert opened.receivers["artnet"]._sock.getsockname()[0] == "0.0.0.0"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(artdmx(), ("127.0.0.1", opened.port("artnet")))
        wait_until(lambda: opened.receivers["artnet"].counters.refused == 1, what="the refusal")
        assert "1 not allowed" in opened.status
    finally:
        opened.stop()


# -- the mapping file and the inputs -----------------------------------------------------------------------


def test_input_specs() -> None:
    assert [str(i) for i in parse_inputs(["artnet", "sacn", "artnet:3,sacn:7", "artnet:3"])] == [
        "artnet:0",
        "sacn:1",
        "artnet:3",
        "sacn:7",
    ]
    for bad, why in (("dmx:1", "artnet or sacn"), ("sacn:0", "1..63999"), ("artnet:x", "whole number"), ("", "no DMX")):
        with pytest.raises(ValueError, match=why):
            parse_inputs([bad])


def test_artdmx_parsing() -> None:
    assert parse_artdmx(artdmx(universe=0x123, data=bytes([1, 2]))) == (0x123, 0, bytes([1, 2]))
    assert parse_artdmx(b"Art-Net\x00\x00\x20\x00\x0e\x00\x00") is None  # ArtPoll
    with pytest.raises(MalformedPacket, match="length"):
        parse_artdmx(artdmx(data=bytes(1)))  # 1 channel: DMX sends at least 2


def test_bad_dmx_entries_are_skipped_with_a_reason_and_kept(tmp_path: Path, caplog) -> None:
    registry = make_registry()
    good = {"type": "dmx", "universe": 3, "channel": 1, "param": LEVEL}
    bad = [
        {"type": "dmx", "protocol": "artnet", "universe": 40000, "channel": 1, "param": LEVEL},
        {"type": "dmx", "universe": 1, "channel": 513, "param": LEVEL},
        {"type": "dmx", "universe": 1, "channel": 5, "fine": 5, "param": LEVEL},
        {"type": "dmx", "universe": 1, "channel": 5, "mode": "preset", "param": LEVEL},
        {"type": "dmx", "universe": 1, "channel": 5, "param": "/test/flash", "mode": "absolute"},
        {"type": "dmx", "universe": 1, "channel": 5, "param": LEVEL, "colour": "red"},
        {"type": "dmx", "universe": 1, "channel": 5, "mode": "preset", "width": 100, "presets": ["a", "b", "c"]},
    ]
    midi = {"port": "*", "channel": 1, "type": "cc", "number": 1, "param": LEVEL}
    path = write_map(tmp_path / "map.toml", good, *bad, midi)
    file = load_mappings(path, registry, kind="dmx")
    assert file.mappings == [DmxMapping(3, 1, LEVEL)]
    assert file.kept == bad and file.others == [midi]
    for reason in ("out of range 0..32767", "out of range 1..512", "must differ", "has no param", "is a trigger"):
        assert reason in caplog.text
    assert "unknown key 'colour'" in caplog.text and "do not fit" in caplog.text
    midi_file = load_mappings(path, registry)  # the MIDI side reads the MIDI entry only
    assert len(midi_file.mappings) == 1 and midi_file.others == [good, *bad]


def test_midi_and_dmx_saves_in_one_session_keep_each_other(tmp_path: Path) -> None:
    registry = make_registry()
    path = write_map(tmp_path / "map.toml")
    midi = load_mappings(path, registry)
    dmx = load_mappings(path, registry, kind="dmx")
    dmx.mappings.append(parse_dmx_mapping({"type": "dmx", "universe": 1, "channel": 2, "param": LEVEL}, registry))
    save_mappings(dmx)
    midi.mappings.append(
        load_mappings(
            write_map(tmp_path / "m.toml", {"port": "*", "channel": 1, "type": "cc", "number": 7, "param": LEVEL}),
            registry,
        ).mappings[0]
    )
    save_mappings(midi)  # loaded before the DMX save: it must not drop the DMX entry
    entries = tomllib.loads(path.read_text())["map"]
    assert [e["type"] for e in entries] == ["cc", "dmx"]
    path.write_text("map = [ broken", encoding="utf-8")
    with pytest.raises(OSError, match="changed on disk"):
        save_mappings(dmx)
    assert path.read_text() == "map = [ broken", "a file broken meanwhile is not overwritten"


# -- the show ---------------------------------------------------------------------------------------------


def test_dmx_through_build_show_moves_a_parameter_and_the_show_plays_through_a_flood(tmp_path: Path) -> None:
    from engine.app import AppConfig
    from engine.control.setup import ControlConfig
    from engine.show import ShowConfig, ShowError, build_show

    map_path = write_map(
        tmp_path / "midi.toml",
        {"type": "dmx", "universe": 0, "channel": 1, "param": "/output/master", "takeover": "jump"},
    )
    controls = ControlConfig(
        osc_port=None,
        oscquery_port=None,
        tempo=False,
        midi_map=map_path,
        dmx_inputs=("artnet:0",),
        dmx_ports=(("artnet", 0),),
    )
    with pytest.raises(ShowError, match="DMX on '0.0.0.0' is reachable"):
        build_show(ShowConfig.bare(controls=ControlConfig(osc_port=None, dmx_inputs=("artnet",), dmx_host="0.0.0.0")))
    app_config = AppConfig(source="pattern", output_size=(64, 36), hot_reload=False)
    with build_show(ShowConfig.bare(app_config, controls=controls)).start() as show:
        dmx = show.parts["dmx"]
        port = dmx.port("artnet")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(artdmx(data=bytes([51]) + bytes(511)), ("127.0.0.1", port))
            wait_until(
                lambda: show.app.params.get("/output/master") == pytest.approx(0.2),
                lambda: show.run(show.app.stats.frames + 1),
                "20%",
            )
            frames = show.app.stats.frames
            for i in range(2000):  # a flood, with garbage in it, while the show runs
                sock.sendto(b"junk" if i % 10 == 0 else artdmx(data=bytes([i % 256]) + bytes(511)), ("127.0.0.1", port))
                if i % 100 == 0:
                    show.run(show.app.stats.frames + 1)
        show.run(show.app.stats.frames + 5)
        assert show.app.stats.frames >= frames + 25, "the show kept playing"
        show.run(show.app.stats.frames + 2)  # the status samples every 0.25 s of the show's clock
        wait_until(
            lambda: "refused" in dict((p.name, p.status) for p in show.app.status.controls)["dmx"],
            lambda: show.run(show.app.stats.frames + 1),
        )
        assert dmx.receivers["artnet"].counters.malformed > 0
        hud = [line for line in show.app.hud_lines() if line.startswith("dmx in: artnet:0")]
        assert hud and "malformed" in hud[0], "the HUD shows the refusals"


def test_learn_armed_over_osc_maps_a_desk_channel_in_the_show(tmp_path: Path) -> None:
    from pythonosc.udp_client import SimpleUDPClient

    from engine.app import AppConfig
    from engine.control.setup import ControlConfig
    from engine.show import ShowConfig, build_show

    map_path = tmp_path / "midi.toml"
    controls = ControlConfig(
        osc_port=0,
        oscquery_port=None,
        tempo=False,
        midi_map=map_path,
        dmx_inputs=("artnet",),
        dmx_ports=(("artnet", 0),),
    )
    app_config = AppConfig(source="pattern", output_size=(64, 36), hot_reload=False)
    with build_show(ShowConfig.bare(app_config, controls=controls)).start() as show:
        dmx, params = show.parts["dmx"], show.app.params

        def frame() -> None:
            show.run(show.app.stats.frames + 1)

        desk = stupidArtnet.StupidArtnet("127.0.0.1", 0, 512, port=dmx.port("artnet"))
        try:
            send_artnet(desk)
            wait_until(lambda: dmx.applied >= 1, frame, "the baseline")
            SimpleUDPClient("127.0.0.1", show.parts["osc"].port).send_message(
                "/dreamdeck/dmx/learn", "/fx/feedback/amount"
            )
            wait_until(lambda: dmx.learning == "/fx/feedback/amount", frame, "learn armed over OSC")
            for level in (30, 80, 120):
                send_artnet(desk, ch4=level)
                time.sleep(0.02)
            wait_until(lambda: dmx.mappings, frame, "the learned channel")
            assert (dmx.mappings[0].channel, dmx.mappings[0].param) == (4, "/fx/feedback/amount")
            wait_until(lambda: map_path.exists() and "fx/feedback" in map_path.read_text(), what="the saved mapping")
            start = params.target("/fx/feedback/amount")
            applied = dmx.applied
            send_artnet(desk, ch4=round(start / 0.98 * 255))  # where the parameter is: the fader picks it up
            wait_until(lambda: dmx.applied > applied, frame, "the fader at the value")
            send_artnet(desk, ch4=255)
            wait_until(lambda: params.target("/fx/feedback/amount") == 0.98, frame, "the desk drives the feedback")
        finally:
            desk.close()


def test_dmx_flags_reach_the_show_config() -> None:
    from engine.cli import build_parser, show_config

    args = ["run", "--headless", "--fresh", "--dmx", "artnet:0,sacn:2", "--dmx", "sacn"]
    config = show_config(build_parser().parse_args([*args, "--dmx-host", "0.0.0.0", "--dmx-allow", "10.0.0.0/24"]))
    controls = config.controls
    assert controls.dmx_inputs == ("artnet:0,sacn:2", "sacn") and controls.dmx_host == "0.0.0.0"
    assert controls.dmx_allow == ("10.0.0.0/24",)
    config.check()
    defaults = show_config(build_parser().parse_args(["run", "--headless", "--fresh"]))
    assert defaults.controls.dmx_inputs == () and defaults.controls.dmx_host == "127.0.0.1"


def test_without_the_sacn_package_sacn_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from engine.control.dmx import SACN_NEEDS
    from engine.control.setup import ControlConfig
    from engine.show import ShowConfig, ShowError, build_show

    for name in [n for n in sys.modules if n == "sacn" or n.startswith("sacn.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if the dmx extra were not installed
    with pytest.raises(ShowError, match="pip install 'dreamdeck\\[dmx\\]'"):
        build_show(ShowConfig.bare(controls=ControlConfig(osc_port=None, tempo=False, dmx_inputs=("sacn",))))
    control = DmxControl(make_registry(), Actions(), ["artnet", "sacn"], ports={"artnet": 0, "sacn": 0})
    with pytest.raises(RuntimeError, match=SACN_NEEDS.replace("[", "\\[").replace("]", "\\]")):
        control.start()  # (the App reports "dmx not started: ..." and plays on)
    assert control.receivers["artnet"]._sock is None, "the receiver started before it is stopped again"
