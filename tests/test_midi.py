"""MIDI control with real ports: python-rtmidi virtual ports on a JACK dummy server.

A module fixture starts ``jackd --no-realtime -d dummy`` under a server name of its own
(JACK_DEFAULT_SERVER), so it never meets another JACK server, and stops it afterwards.
Each test plays a controller: a virtual output port it sends from, which MidiControl
opens by part of its name, and a virtual input port where the feedback arrives. Waits
are bounded polling loops; nothing asserts on wall-clock speed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mido
import pytest
import rtmidi
import tomli_w

from engine.control.actions import ActionError, Actions
from engine.control.midi import JACK_CLOSE_PAUSE, MidiClock, MidiControl, port_matches, resolve_apis
from engine.control.midimap import LearnEvent, Mapping, MapType, Mode, guess_mapping, parse_mapping, relative_ticks
from engine.params import (
    Change,
    ParamRegistry,
    bool_param,
    enum_param,
    float_param,
    int_param,
    string_param,
    trigger_param,
)

TIMEOUT = 5.0
HANDLED = {"control_change", "note_on", "note_off", "pitchwheel", "program_change"}  # what midi.received counts
JACK = mido.Backend("mido.backends.rtmidi/UNIX_JACK")


# -- the JACK server --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jack_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    jackd = shutil.which("jackd")
    if jackd is None:
        pytest.skip("jackd is not installed (apt-get install jackd2)")
    name = f"dreamdeck-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    previous = os.environ.get("JACK_DEFAULT_SERVER")
    os.environ["JACK_DEFAULT_SERVER"] = name
    log_path = tmp_path_factory.mktemp("jack") / "jackd.log"
    with open(log_path, "wb") as log_file:
        # --sync: each period waits for every client, so a busy machine delays MIDI but never drops
        # it (asynchronous mode drops what a late client had); -p 256 at 48 kHz: 5 ms of jitter
        server = subprocess.Popen(
            [jackd, "--no-realtime", "--sync", "-n", name, "-d", "dummy", "-r", "48000", "-p", "256"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 10.0
        while True:
            if server.poll() is not None:
                pytest.fail(f"jackd exited with {server.returncode}: {log_path.read_text(errors='replace')}")
            try:
                rtmidi.MidiIn(rtapi=rtmidi.API_UNIX_JACK).delete()
                time.sleep(JACK_CLOSE_PAUSE)
                break
            except rtmidi.SystemError:
                if time.monotonic() > deadline:
                    pytest.fail(f"jackd did not come up: {log_path.read_text(errors='replace')}")
                time.sleep(0.05)
        yield name
    finally:
        server.terminate()
        try:
            server.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if previous is None:
            os.environ.pop("JACK_DEFAULT_SERVER", None)
        else:
            os.environ["JACK_DEFAULT_SERVER"] = previous


# -- a controller -----------------------------------------------------------------------------


class Controller:
    """A pretend MIDI controller: sends from a virtual output, receives feedback on a virtual input.

    The feedback port is polled through python-rtmidi, not a mido port: mido's ports run a
    Python callback in JACK's process thread, which misses periods whenever Python is busy.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.out: Any = None
        self.feedback: Any = None
        self.plug()

    def plug(self) -> None:
        self.out = JACK.open_output(self.name, client_name=self.name)
        self.feedback = rtmidi.MidiIn(rtapi=rtmidi.API_UNIX_JACK, name=self.name)
        self.feedback.open_virtual_port(self.name)

    def unplug(self) -> None:
        self.out.close()
        time.sleep(JACK_CLOSE_PAUSE)  # libjack can crash when clients close back to back
        self.feedback.delete()
        time.sleep(JACK_CLOSE_PAUSE)

    def send(self, *messages: mido.Message) -> None:
        for message in messages:
            self.out.send(message)

    def cc(self, number: int, *values: int, channel: int = 1) -> None:
        self.send(*(mido.Message("control_change", channel=channel - 1, control=number, value=v) for v in values))

    def note(self, note: int, velocity: int, channel: int = 1) -> None:
        self.send(mido.Message("note_on", channel=channel - 1, note=note, velocity=velocity))

    def received(self) -> list[mido.Message]:
        messages = []
        while (item := self.feedback.get_message()) is not None:
            messages.append(mido.Message.from_bytes(item[0]))
        return messages


def cc(number: int, value: int, channel: int = 1) -> mido.Message:
    return mido.Message("control_change", channel=channel - 1, control=number, value=value)


def make_registry() -> ParamRegistry:
    registry = ParamRegistry()
    registry.declare_all(
        [
            float_param("/fx/amount", 0.5, 0.0, 1.0),
            float_param("/fx/fine", 0.5, 0.0, 1.0),
            int_param("/fx/steps", 50, 0, 100),
            bool_param("/fx/enabled", False),
            bool_param("/fx/hold", False),
            enum_param("/fx/blend", "normal", ["normal", "add", "screen"]),
            trigger_param("/fx/flash"),
            string_param("/scene/prompt", "a forest"),
        ]
    )
    return registry


class Rig:
    """A registry, actions, a started MidiControl and a controller it has opened."""

    def __init__(self, tmp_path: Path, mappings: list[dict[str, Any]] | None = None, **options: Any) -> None:
        self.controller = Controller(f"Test Controller {uuid.uuid4().hex[:6]}")
        self.registry = make_registry()
        self.actions = Actions()
        self.recalled: list[Any] = []
        self.actions.register("preset/recall", self.recalled.append)
        self.path = tmp_path / "midi.toml"
        if mappings is not None:
            write_mappings(self.path, [{"port": self.controller.name, **m} for m in mappings])
        self.midi: MidiControl | None = None
        self.restart(**options)

    def restart(self, **options: Any) -> MidiControl:
        if self.midi is not None:
            self.midi.stop()
        settings = {
            "inputs": [self.controller.name],
            "outputs": [self.controller.name],
            "mappings_path": self.path,
            "api": "jack",
            "poll_interval": 0.1,
            **options,
        }
        self.actions = Actions()
        self.actions.register("preset/recall", self.recalled.append)
        self.midi = MidiControl(self.registry, self.actions, **settings)
        self.midi.start()
        self.until(lambda: self.midi.open_inputs and self.midi.open_outputs, "the controller's ports to open")
        return self.midi

    def frame(self) -> None:
        """What the app does at a frame boundary: actions, parameter changes, then controls."""
        self.actions.run_pending()
        self.registry.apply_pending(1 / 60)
        self.midi.frame(time.perf_counter())

    def until(self, condition: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout} s; midi: {self.midi.status}")
            self.frame()
            time.sleep(0.005)
        self.frame()

    def play(self, *messages: mido.Message) -> None:
        """Send channel messages and wait until MidiControl handled them and they landed."""
        before, count = self.midi.received, sum(m.type in HANDLED for m in messages)
        self.controller.send(*messages)
        self.until(lambda: self.midi.received >= before + count, f"{count} messages handled")

    def feedback(self, count: int, what: str) -> list[mido.Message]:
        got: list[mido.Message] = []
        self.until(lambda: got.extend(self.controller.received()) or len(got) >= count, what)
        return got

    def quiet(self, seconds: float = 0.3) -> list[mido.Message]:
        """Frames for a while; whatever feedback arrives meanwhile (should be nothing)."""
        got: list[mido.Message] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.frame()
            time.sleep(0.01)
            got.extend(self.controller.received())
        return got

    def close(self) -> None:
        if self.midi is not None:
            self.midi.stop()
        self.controller.unplug()


def write_mappings(path: Path, entries: list[Any], **top: Any) -> None:
    path.write_text(tomli_w.dumps({**top, "map": entries}), encoding="utf-8")


@pytest.fixture
def rig(jack_server: str, tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(mappings: list[dict[str, Any]] | None = None, **options: Any) -> Rig:
        made.append(Rig(tmp_path, mappings, **options))
        return made[-1]

    yield make
    for r in made:
        r.close()


# -- values in ----------------------------------------------------------------------------------


def test_cc_7bit_absolute_sets_normalised_values(rig) -> None:
    r = rig(
        [
            {"channel": 1, "type": "cc", "number": 7, "param": "/fx/amount", "takeover": "jump"},
            {"channel": 2, "type": "cc", "number": 7, "param": "/fx/steps", "takeover": "jump"},
            {"channel": 1, "type": "cc", "number": 8, "param": "/fx/blend", "takeover": "jump"},
        ]
    )
    r.play(cc(7, 64))
    assert r.registry.get("/fx/amount") == pytest.approx(64 / 127)
    assert r.registry.last_change == Change("/fx/amount", pytest.approx(64 / 127), "midi")
    r.play(cc(7, 127), cc(7, 2, channel=2), cc(8, 127))
    assert r.registry.get("/fx/amount") == 1.0
    assert r.registry.get("/fx/steps") == round(2 / 127 * 100), "channel 2 drives its own mapping"
    assert r.registry.get("/fx/blend") == "screen"
    r.play(cc(7, 0), cc(7, 0, channel=3))
    assert r.registry.get("/fx/amount") == 0.0 and r.registry.get("/fx/steps") == 2, "channel 3 is unmapped"


def test_cc14_pairs_and_pitchbend_give_14_bit_values(rig) -> None:
    r = rig(
        [
            {"channel": 1, "type": "cc14", "number": 1, "param": "/fx/fine", "takeover": "jump"},
            {"channel": 1, "type": "pitchbend", "param": "/fx/amount", "takeover": "jump"},
        ]
    )
    value = 10_000
    r.play(cc(1, value >> 7), cc(33, value & 127))  # MSB, then LSB
    assert r.registry.get("/fx/fine") == pytest.approx(value / 16383, abs=1e-12)
    r.play(cc(1, 3))  # an MSB alone resets the LSB, as the MIDI spec says
    assert r.registry.get("/fx/fine") == pytest.approx((3 << 7) / 16383, abs=1e-12)
    r.play(mido.Message("pitchwheel", pitch=8191))
    assert r.registry.get("/fx/amount") == 1.0
    r.play(mido.Message("pitchwheel", pitch=-8192 + 4096))
    assert r.registry.get("/fx/amount") == pytest.approx(4096 / 16383)


ENCODINGS = {  # +1, -1 and +5 (an encoder turned fast) in each encoding
    "relative-signed": (1, 65, 5),
    "relative-binary-offset": (65, 63, 69),
    "relative-twos-complement": (1, 127, 5),
}


@pytest.mark.parametrize("mode", sorted(ENCODINGS))
def test_relative_encoders_step_the_value(rig, mode: str) -> None:
    up, down, fast = ENCODINGS[mode]
    r = rig(
        [
            {"channel": 1, "type": "cc", "number": 20, "param": "/fx/steps", "mode": mode},
            {"channel": 1, "type": "cc", "number": 21, "param": "/fx/amount", "mode": mode, "step": 0.25},
        ]
    )
    # sent in one burst, so later ticks arrive before earlier ones land: each must count
    r.play(cc(20, up), cc(20, up), cc(20, up), cc(20, down), cc(20, down), cc(20, fast))
    assert r.registry.get("/fx/steps") == 50 + 3 - 2 + 5, "an int steps one value per tick"
    r.play(*[cc(20, down)] * 60)
    assert r.registry.get("/fx/steps") == 0, "the value stops at the minimum"
    r.play(cc(21, up))
    assert r.registry.get("/fx/amount") == 0.75, "an explicit step"


def test_notes_trigger_toggle_and_momentary(rig) -> None:
    r = rig(
        [
            {"channel": 1, "type": "note", "number": 36, "param": "/fx/flash", "mode": "trigger"},
            {"channel": 1, "type": "note", "number": 37, "param": "/fx/enabled", "mode": "toggle"},
            {"channel": 1, "type": "note", "number": 38, "param": "/fx/amount", "mode": "momentary"},
            {"channel": 1, "type": "note", "number": 39, "param": "/fx/hold", "mode": "momentary"},
            {"channel": 1, "type": "note", "number": 40, "param": "/fx/steps", "mode": "trigger"},
            {"channel": 1, "type": "cc", "number": 64, "param": "/fx/flash", "mode": "trigger"},
        ]
    )
    flashes: list[Change] = []
    r.registry.add_listener(lambda c: flashes.append(c) if c.path == "/fx/flash" else None)

    def note(number: int, velocity: int) -> mido.Message:
        return mido.Message("note_on", note=number, velocity=velocity)

    r.play(note(36, 90))
    assert len(flashes) == 1
    r.play(mido.Message("note_off", note=36), cc(64, 0))
    assert len(flashes) == 1, "a release or a CC under 64 is not a press"
    r.play(cc(64, 127))
    assert len(flashes) == 2

    # three presses before a frame lands any of them: each flips what the one before left
    r.play(note(37, 100), note(37, 0), note(37, 100), note(37, 0), note(37, 100), note(37, 0))
    assert r.registry.get("/fx/enabled") is True
    r.play(note(37, 100), mido.Message("note_off", note=37))
    assert r.registry.get("/fx/enabled") is False

    r.play(note(38, 100))
    assert r.registry.get("/fx/amount") == pytest.approx(100 / 127), "velocity is the value of a number"
    r.play(mido.Message("note_off", note=38, velocity=64))
    assert r.registry.get("/fx/amount") == 0.0, "release goes back to the minimum"
    r.play(note(39, 1))
    assert r.registry.get("/fx/hold") is True
    r.play(note(39, 0))  # note on with velocity 0 is a release
    assert r.registry.get("/fx/hold") is False

    r.play(note(40, 127), note(40, 0))
    assert r.registry.get("/fx/steps") == 100, "trigger sets the velocity's value and keeps it"


def test_a_pad_per_choice_sets_its_value(rig) -> None:
    r = rig(
        [
            {"channel": 1, "type": "note", "number": 36, "param": "/fx/blend", "mode": "trigger", "value": "screen"},
            {"channel": 1, "type": "note", "number": 37, "param": "/fx/blend", "mode": "trigger", "value": "add"},
            {"channel": 1, "type": "note", "number": 38, "param": "/fx/blend", "mode": "trigger", "value": "nope"},
            {"channel": 1, "type": "note", "number": 39, "param": "/fx/blend", "mode": "toggle", "value": "add"},
        ]
    )
    assert len(r.midi.mappings) == 2, "an unknown choice, or a value on a toggle, is refused with a reason"
    r.play(mido.Message("note_on", note=36, velocity=5))
    assert r.registry.get("/fx/blend") == "screen", "the pad's value, whatever the velocity"
    r.play(mido.Message("note_on", note=37, velocity=127), mido.Message("note_off", note=37))
    assert r.registry.get("/fx/blend") == "add"


def test_soft_takeover_waits_for_the_fader_to_reach_the_value(rig) -> None:
    r = rig(
        [
            {"channel": 1, "type": "cc", "number": 7, "param": "/fx/amount"},  # pickup is the default
            {"channel": 1, "type": "cc", "number": 8, "param": "/fx/fine", "takeover": "jump"},
        ]
    )
    r.play(cc(7, 10))
    assert r.registry.get("/fx/amount") == 0.5, "a fader far from the value does not make it jump"
    r.play(cc(7, 64))  # 0.504: close enough to pick up
    assert r.registry.get("/fx/amount") == pytest.approx(64 / 127)
    r.play(cc(7, 70))
    assert r.registry.get("/fx/amount") == pytest.approx(70 / 127), "picked up: the fader drives"

    r.registry.set("/fx/amount", 0.9, origin="osc")  # a preset or OSC moves the value away
    r.frame()
    r.play(cc(7, 80), cc(7, 100))
    assert r.registry.get("/fx/amount") == 0.9, "ignored until the fader reaches the new value"
    r.play(cc(7, 114))  # 0.898
    assert r.registry.get("/fx/amount") == pytest.approx(114 / 127)
    assert "pick up" not in r.midi.status

    r.registry.set("/fx/amount", 0.5, origin="osc")
    r.frame()
    r.play(cc(7, 120))
    assert r.registry.get("/fx/amount") == 0.5 and "pick up /fx/amount at 50%" in r.midi.status
    r.play(cc(7, 30))  # a fast move jumps over the value: crossing it picks up too
    assert r.registry.get("/fx/amount") == pytest.approx(30 / 127)

    r.registry.set("/fx/fine", 0.0, origin="osc")
    r.frame()
    r.play(cc(8, 127))
    assert r.registry.get("/fx/fine") == 1.0, "takeover = jump: the fader always wins"


# -- feedback -------------------------------------------------------------------------------------


def test_feedback_is_sent_once_per_change_and_never_echoed(rig) -> None:
    r = rig(
        [
            {"channel": 1, "type": "cc", "number": 7, "param": "/fx/amount", "takeover": "jump"},
            {"channel": 2, "type": "cc14", "number": 3, "param": "/fx/fine", "takeover": "jump"},
            {"channel": 1, "type": "note", "number": 37, "param": "/fx/enabled", "mode": "toggle"},
            {"channel": 1, "type": "note", "number": 36, "param": "/fx/flash"},
        ]
    )
    synced = r.feedback(4, "the current values when the port opened")  # a trigger has no state to show
    assert sorted(m.bytes() for m in synced) == sorted(
        [
            cc(7, 64).bytes(),
            cc(3, 8192 >> 7, 2).bytes(),
            cc(35, 8192 & 127, 2).bytes(),
            mido.Message("note_on", note=37, velocity=0).bytes(),
        ]
    )
    assert r.quiet() == [], "nothing changed, nothing more is sent"

    r.registry.set("/fx/amount", 0.25, origin="osc")
    assert r.feedback(1, "feedback for the change") == [cc(7, 32)]
    assert r.quiet() == [], "feedback only on change"

    r.play(cc(7, 100))
    assert r.registry.get("/fx/amount") == pytest.approx(100 / 127)
    assert r.quiet() == [], "the fader that moved the value shows it already: no echo"
    r.registry.set("/fx/amount", 0.25, origin="osc")
    assert r.feedback(1, "feedback after the echo") == [cc(7, 32)]

    r.play(mido.Message("note_on", note=37, velocity=127))
    assert r.registry.get("/fx/enabled") is True
    assert r.feedback(1, "the toggle's light") == [mido.Message("note_on", note=37, velocity=127)]
    r.play(mido.Message("note_on", note=36, velocity=127))
    assert r.quiet() == []


# -- actions and clock ------------------------------------------------------------------------------


def test_program_change_recalls_presets_unless_mapped(rig) -> None:
    r = rig([{"channel": 2, "type": "program", "param": "/fx/blend"}])
    r.play(mido.Message("program_change", program=4))
    assert r.recalled == [5], "program 0 is preset 1"
    r.play(mido.Message("program_change", channel=1, program=1))
    assert r.registry.get("/fx/blend") == "add" and r.recalled == [5]
    r.play(mido.Message("program_change", channel=1, program=9))
    assert r.registry.get("/fx/blend") == "add"
    assert "blend" in (r.midi.last_error or ""), "a program with no choice is refused, with a message"


def test_buttons_post_actions_checked_by_their_declaration(rig, caplog) -> None:
    entries = [
        {"channel": 1, "type": "note", "number": 41, "action": "preset/recall", "args": [3]},
        {"channel": 1, "type": "cc", "number": 50, "action": "preset/recall", "args": ["late night"]},
        {"channel": 1, "type": "note", "number": 42, "action": "preset/recall"},  # no ref: refused
        {"channel": 1, "type": "note", "number": 43, "action": "preset/recall", "args": [True]},
        {"channel": 1, "type": "note", "number": 44, "action": "tap"},
    ]  # declared, not in this engine
    with caplog.at_level("WARNING", logger="engine.control.midimap"):
        r = rig(entries)
    warnings = [rec.getMessage() for rec in caplog.records if rec.name == "engine.control.midimap"]
    assert any("map #3: args: preset/recall(ref: str|int): got 0 arguments; skipped" in w for w in warnings), warnings
    assert any(
        "map #4: args: preset/recall(ref: str|int): ref takes a name or a whole number, got True" in w for w in warnings
    ), warnings
    assert sorted(m.describe().split(" -> ")[1] for m in r.midi.mappings) == [
        "action preset/recall 3 [trigger]",
        "action preset/recall late night [trigger]",
        "action tap [trigger]",
    ]

    r.play(
        mido.Message("note_on", note=41, velocity=100),
        mido.Message("note_off", note=41),
        cc(50, 127),
        cc(50, 0),
        mido.Message("note_on", note=42, velocity=100),
    )
    r.frame()
    assert r.recalled == [3, "late night"], "a press posts, a release does not; a refused mapping does nothing"
    r.play(mido.Message("note_on", note=44, velocity=100))
    assert r.midi.last_error == "MIDI: tap is not available in this engine"
    assert r.quiet() == [], "an action mapping sends no feedback"


def send_clock(port: Any, bpm: float, pulses: int) -> None:
    """Clock pulses at ``bpm`` on absolute deadlines, so sleep overshoot never accumulates."""
    interval = 60.0 / (bpm * 24)
    start = time.perf_counter()
    for i in range(pulses):
        delay = start + i * interval - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        port.send(mido.Message("clock"))


def test_midi_clock_gives_tempo_position_and_transport(rig) -> None:
    calls: list[tuple[float | None, float, bool]] = []
    r = rig([], clock_callback=lambda *args: calls.append(args))
    assert r.midi.clock_bpm is None
    r.controller.send(mido.Message("start"))
    sent = 0
    for bpm, pulses in ((100.0, 60), (150.0, 90)):  # two tempos: a stuck estimate cannot pass
        sender = threading.Thread(target=send_clock, args=(r.controller.out, bpm, pulses))
        sender.start()
        sender.join()
        sent += pulses
        r.until(lambda sent=sent: len(calls) >= 1 + sent, f"the {bpm:g} bpm pulses")
        assert r.midi.clock_bpm == pytest.approx(bpm, abs=3.0)
        assert f"clock {r.midi.clock_bpm:.1f} bpm" in r.midi.status
    assert calls[-1][0] == pytest.approx(150.0, abs=3.0)
    assert calls[-1][1:] == (pytest.approx(149 / 24), True), "the first pulse after start is beat 0"
    r.controller.send(mido.Message("stop"))
    r.until(lambda: calls[-1][2] is False, "stop")
    assert r.midi.clock.running is False


def test_clock_estimate_is_smooth_ignores_a_stall_and_restarts_after_a_pause() -> None:
    clock = MidiClock()
    interval = 60 / (120 * 24)
    jitter = [0.004, -0.003, 0.0, 0.005, -0.005, 0.002]
    for i in range(96):  # 120 bpm with +-5 ms of jitter per pulse
        clock.pulse(i * interval + jitter[i % len(jitter)])
    now = 95 * interval
    assert clock.bpm(now) == pytest.approx(120.0, abs=1.0)
    for i in range(96, 192):  # a busy machine holds 8 pulses back, then hands them over at once
        clock.pulse(max(i * interval, 107 * interval) if 100 <= i < 108 else i * interval)
    now = 191 * interval
    assert clock.bpm(now) == pytest.approx(120.0, abs=1.0)
    assert clock.bpm(now + 2.0) is None, "no pulses for a while: no tempo"
    for i in range(12):
        clock.pulse(now + 1.0 + i * 60 / (90 * 24))
    assert clock.bpm(now + 1.5) == pytest.approx(90.0, abs=0.1), "the estimate restarts after a pause"


def test_clock_position_follows_start_song_position_and_stop() -> None:
    clock, t = MidiClock(), 0.0
    clock.start()
    clock.pulse(t)
    assert clock.running and clock.beat_position == 0.0, "the first pulse after start is the downbeat"
    clock.pulse(t)
    assert clock.beat_position == 1 / 24
    clock.stop()
    clock.song_position(8)  # two beats, in sixteenths
    clock.pulse(t)
    assert not clock.running and clock.beat_position == 2.0, "stopped: pulses keep the tempo, not the place"
    clock.resume()
    clock.pulse(t)
    clock.pulse(t)
    assert clock.beat_position == 2 + 1 / 24


# -- ports ----------------------------------------------------------------------------------------


def test_unplugged_controller_is_reopened_and_still_mapped(rig) -> None:
    r = rig([{"channel": 1, "type": "cc", "number": 7, "param": "/fx/amount", "takeover": "jump"}])
    r.play(cc(7, 10))
    assert r.feedback(1, "the first sync") and r.registry.get("/fx/amount") == pytest.approx(10 / 127)
    r.controller.unplug()
    r.until(
        lambda: not r.midi.open_inputs and not r.midi.open_outputs and "disconnected" in r.midi.status,
        "the unplug to be noticed",
    )
    r.frame()  # no ports, no feedback: nothing breaks

    r.controller.plug()
    r.until(
        lambda: r.midi.open_inputs and r.midi.open_outputs and "disconnected" not in r.midi.status,
        "the controller to be reopened",
    )
    assert r.feedback(1, "the values sent again to the replugged controller") == [cc(7, 10)]
    r.play(cc(7, 90))
    assert r.registry.get("/fx/amount") == pytest.approx(90 / 127)


def test_garbage_sysex_and_unmapped_messages_are_ignored(rig) -> None:
    r = rig([{"port": "*", "channel": 1, "type": "cc", "number": 7, "param": "/fx/amount", "takeover": "jump"}])
    junk_name = f"{r.controller.name} junk"  # a second controller whose name also matches
    junk = rtmidi.MidiOut(rtapi=rtmidi.API_UNIX_JACK, name=junk_name)
    junk.open_virtual_port(junk_name)
    try:
        r.until(lambda: len(r.midi.open_inputs) == 2, "the second controller to open")
        for data in ([0xF4], [0xB0, 0x80, 0x90], [0x90], [0x01, 0x02], [0xFE], [0xF7], [0xF0, *range(100), 0xF7]):
            junk.send_message(data)
        r.play(
            mido.Message("sysex", data=[0x7E, 0x7F, 0x06, 0x01]),
            mido.Message("aftertouch", value=3),
            cc(9, 100),
            mido.Message("note_on", note=60, velocity=99),
            mido.Message("pitchwheel", pitch=5),
            mido.Message("polytouch", note=3, value=4),
        )
        junk.send_message(cc(7, 100).bytes())
        r.until(lambda: r.registry.get("/fx/amount") == pytest.approx(100 / 127), "the junk port's valid CC")
        r.play(cc(7, 27))
        assert r.registry.get("/fx/amount") == pytest.approx(27 / 127)
        assert r.midi.last_error is None
    finally:
        junk.delete()
        time.sleep(JACK_CLOSE_PAUSE)


def test_api_names_and_port_patterns() -> None:
    assert resolve_apis("jack") == ["UNIX_JACK"] and resolve_apis("UNIX_JACK") == ["UNIX_JACK"]
    assert resolve_apis("auto")[0] == "LINUX_ALSA" and "UNIX_JACK" in resolve_apis("auto")
    with pytest.raises(ValueError, match="not available"):
        resolve_apis("coremidi")
    assert port_matches("nanokontrol", "nanoKONTROL2:nanoKONTROL2 _CTRL 20:0")
    assert port_matches("*", "nanoKONTROL2:nanoKONTROL2 _CTRL 20:0")
    assert not port_matches("*", "Midi Through:Midi Through Port-0 14:0")
    assert not port_matches("*", "RtMidiOut Client:RtMidi output"), "never dreamdeck's own ports"


# -- learn ------------------------------------------------------------------------------------


def test_learn_maps_the_next_control_and_saves_it_atomically(rig) -> None:
    r = rig()
    assert not r.path.exists()
    r.actions.post("midi/learn", "/fx/amount", origin="osc")
    r.frame()
    assert r.midi.learning == "/fx/amount" and "learn armed: /fx/amount" in r.midi.status
    r.play(cc(12, 40), cc(12, 41), cc(12, 42), cc(12, 43))
    r.until(lambda: r.midi.learning is None and r.path.exists(), "the mapping to be learned")
    assert r.registry.get("/fx/amount") == 0.5, "the control moved for learn does not change the value"
    document = tomllib.loads(r.path.read_text(encoding="utf-8"))
    assert document == {
        "version": 1,
        "map": [
            {
                "port": r.controller.name,
                "channel": 1,
                "type": "cc",
                "number": 12,
                "param": "/fx/amount",
                "mode": "absolute",
                "takeover": "pickup",
            }
        ],
    }
    assert [p.name for p in r.path.parent.iterdir()] == ["midi.toml"], "no temporary file is left behind"
    assert "learned cc 12 ch1" in r.midi.status

    learned = r.midi.mappings
    r.restart()  # a new MidiControl loads what learn saved
    assert r.midi.mappings == learned
    r.play(cc(12, 64), cc(12, 127))
    assert r.registry.get("/fx/amount") == 1.0

    assert r.midi.unlearn("/fx/amount") == 1
    r.until(
        lambda: (
            "map" not in tomllib.loads(r.path.read_text(encoding="utf-8"))
            or not tomllib.loads(r.path.read_text(encoding="utf-8"))["map"]
        ),
        "unlearn to be saved",
    )
    r.play(cc(12, 0))
    assert r.registry.get("/fx/amount") == 1.0


LEARN_CASES = [  # (what the performer does, parameter, mode named or None) -> (type, number, mode)
    ([cc(3, 10), cc(35, 20)], "/fx/fine", None, (MapType.CC14, 3, Mode.ABSOLUTE)),
    ([cc(20, 1), cc(20, 1), cc(20, 2)], "/fx/steps", None, (MapType.CC, 20, Mode.RELATIVE_TWOS_COMPLEMENT)),
    ([cc(21, 65), cc(21, 65)], "/fx/steps", None, (MapType.CC, 21, Mode.RELATIVE_BINARY_OFFSET)),
    ([cc(22, 1)], "/fx/steps", "relative-signed", (MapType.CC, 22, Mode.RELATIVE_SIGNED)),
    ([cc(23, 127)], "/fx/enabled", None, (MapType.CC, 23, Mode.TOGGLE)),
    ([mido.Message("note_on", note=40, velocity=90)], "/fx/enabled", None, (MapType.NOTE, 40, Mode.TOGGLE)),
    (
        [mido.Message("note_on", channel=4, note=41, velocity=90)],
        "/fx/amount",
        None,
        (MapType.NOTE, 41, Mode.MOMENTARY),
    ),
    ([mido.Message("pitchwheel", pitch=100)], "/fx/fine", None, (MapType.PITCHBEND, 0, Mode.ABSOLUTE)),
]


def test_learn_recognises_what_was_moved(rig) -> None:
    r = rig()
    for messages, path, mode, (type_, number, expected_mode) in LEARN_CASES:
        r.midi.learn(path, mode)
        r.play(*messages)
        r.until(lambda: r.midi.learning is None, f"learning {messages}")
        learned = [m for m in r.midi.mappings if m.param == path]
        assert [(m.type, m.number, m.mode) for m in learned][-1:] == [(type_, number, expected_mode)], messages
        assert learned[-1].channel == messages[0].channel + 1
        r.midi.unlearn(path)
    r.midi.learn("/fx/amount")
    r.controller.cc(14, 77)  # one message, then nothing: learn decides when its window closes
    r.until(lambda: r.midi.learning is None, "the learn window to close")
    assert [(m.number, m.mode) for m in r.midi.mappings] == [(14, Mode.ABSOLUTE)]


def test_learn_last_touched_skips_changes_from_midi(rig) -> None:
    r = rig([{"channel": 1, "type": "cc", "number": 7, "param": "/fx/amount", "takeover": "jump"}])
    with pytest.raises(ActionError, match="no parameter has been touched"):
        r.midi.learn_last_touched()
    r.registry.set("/fx/enabled", True, origin="osc")
    r.frame()
    r.play(cc(7, 3))
    assert r.registry.last_change.path == "/fx/amount"
    assert r.midi.learn_last_touched() == "/fx/enabled" and r.midi.learning == "/fx/enabled"
    r.midi.cancel_learn()
    assert r.midi.learning is None


def test_learn_refuses_what_midi_cannot_drive(jack_server: str, tmp_path: Path) -> None:
    actions = Actions()
    midi = MidiControl(make_registry(), actions, mappings_path=tmp_path / "midi.toml", api="jack")
    for args, message in (
        (("/scene/prompt",), "string parameter"),
        (("/nope",), "unknown parameter"),
        (("/fx/amount", "sideways"), "unknown MIDI mode"),
    ):
        with pytest.raises(ActionError, match=message):
            midi.learn(*args)
    actions.post("midi/learn", "/nope")
    actions.run_pending()
    assert "unknown parameter" in actions.last_error and midi.learning is None


def test_bad_entries_are_skipped_with_a_reason_and_kept_in_the_file(rig, tmp_path: Path, caplog) -> None:
    name = "Test Controller"
    bad = [
        {"port": name, "channel": 17, "type": "cc", "number": 1, "param": "/fx/amount"},
        {"port": name, "channel": 1, "type": "cc", "number": 1, "param": "/scene/plugin/gone"},
        {"port": name, "channel": 1, "type": "note", "number": 1, "param": "/fx/amount", "mode": "absolute"},
        {"port": name, "channel": 1, "type": "cc", "number": 1, "param": "/fx/amount", "colour": "red"},
        {"port": name, "channel": 1, "type": "sysex", "number": 1, "param": "/fx/amount"},
        {"port": name, "channel": 1, "type": "cc", "number": 1, "param": "/scene/prompt"},
        {"port": name, "channel": 1, "type": "cc14", "number": 40, "param": "/fx/fine"},
    ]
    good = {"port": name, "channel": 1, "type": "cc", "number": 7, "param": "/fx/amount", "takeover": "jump"}
    write_mappings(tmp_path / "midi.toml", [bad[0], good, *bad[1:]], version=1)
    with caplog.at_level("WARNING", logger="engine.control.midimap"):
        r = rig()
    warnings = [rec.getMessage() for rec in caplog.records if rec.name == "engine.control.midimap"]
    assert len(warnings) == len(bad), warnings
    for text, reason in zip(
        warnings,
        [
            "channel: 17 is out of range",
            "unknown parameter",
            "mode: absolute does not",
            "unknown key 'colour'",
            "type: 'sysex' is not one of",
            "string parameter",
            "number: 40 is out of range 0..31",
        ],
    ):
        assert reason in text and "skipped" in text, (text, reason)
    r.play(cc(7, 127))
    assert r.registry.get("/fx/amount") == 1.0, "the good entry works"

    r.midi.learn("/fx/enabled")
    r.play(mido.Message("note_on", note=50, velocity=1))
    r.until(lambda: r.midi.learning is None, "learn")
    r.until(lambda: len(tomllib.loads(r.path.read_text(encoding="utf-8"))["map"]) == 1 + len(bad) + 1, "the save")
    entries = tomllib.loads(r.path.read_text(encoding="utf-8"))["map"]
    assert entries[0] == {**good, "mode": "absolute"}, "usable entries are written out in full"
    assert entries[1]["type"] == "note" and entries[1]["param"] == "/fx/enabled"
    assert entries[2:] == bad, "a learn keeps what the performer wrote, even what this build cannot use"


def test_unreadable_file_and_failed_save_never_lose_the_old_mappings(
    rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = "[[map]\nport = 'x'\n"
    path = tmp_path / "midi.toml"
    path.write_text(broken, encoding="utf-8")
    r = rig()
    assert r.midi.mappings == ()
    r.midi.learn("/fx/amount")
    r.play(mido.Message("note_on", note=50, velocity=1))
    r.until(lambda: r.midi.learning is None and r.midi.last_error, "learn")
    assert "not saved" in r.midi.last_error and path.read_text(encoding="utf-8") == broken
    assert len(r.midi.mappings) == 1, "the learned mapping works until the show ends"

    write_mappings(path, [{"port": "x", "channel": 1, "type": "cc", "number": 1, "param": "/fx/amount"}])
    before = path.read_bytes()
    r.restart()

    def replace_fails(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", replace_fails)
    r.midi.last_error = None
    r.midi.learn("/fx/hold")
    r.play(mido.Message("note_on", note=51, velocity=1))
    r.until(lambda: r.midi.last_error, "the failed save")
    assert "No space left" in r.midi.last_error and path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["midi.toml"], "the temporary file is cleaned up"


# -- the mapping module alone ------------------------------------------------------------------


def test_relative_decoding_and_guessing_without_ports() -> None:
    assert [relative_ticks(v, Mode.RELATIVE_SIGNED) for v in (1, 63, 65, 127, 0, 64)] == [1, 63, -1, -63, 0, 0]
    assert [relative_ticks(v, Mode.RELATIVE_BINARY_OFFSET) for v in (65, 63, 64, 127, 0)] == [1, -1, 0, 63, -64]
    assert [relative_ticks(v, Mode.RELATIVE_TWOS_COMPLEMENT) for v in (1, 127, 64, 63, 0)] == [1, -1, -64, 63, 0]
    registry = make_registry()
    knob = [LearnEvent(MapType.CC, 1, 5, v) for v in (40, 41, 40)]  # a jittery pot repeats, far from 0 and 64
    assert guess_mapping("x", knob, registry.param("/fx/amount")).mode is Mode.ABSOLUTE
    mapping = Mapping("x", 1, MapType.CC, 5, "/fx/amount", Mode.ABSOLUTE)
    assert parse_mapping(mapping.to_toml(), registry) == mapping


# -- the app ------------------------------------------------------------------------------------


def test_app_steps_midi_values_in_and_learn_through_its_actions(jack_server: str, tmp_path: Path) -> None:
    pytest.importorskip("moderngl")
    from engine.app import App, AppConfig
    from engine.clock import ManualClock
    from engine.render.surface import HeadlessSurface

    presets = tmp_path / "presets"
    presets.mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "presets" / "default.toml", presets / "default.toml")
    controller = Controller(f"Test Controller {uuid.uuid4().hex[:6]}")
    write_mappings(
        tmp_path / "midi.toml",
        [
            {
                "port": controller.name,
                "channel": 1,
                "type": "cc",
                "number": 7,
                "param": "/fx/kaleido/segments",
                "takeover": "jump",
            }
        ],
    )
    surface = HeadlessSurface()
    app = App(
        AppConfig(source="pattern", presets_dir=presets, output_size=(160, 90), hot_reload=False),
        surface,
        ManualClock(60.0),
    )
    midi = MidiControl(
        app.params,
        app.actions,
        inputs=[controller.name],
        outputs=[controller.name],
        mappings_path=tmp_path / "midi.toml",
        api="jack",
        poll_interval=0.1,
    )
    app.add_control(midi)
    app.start()
    try:

        def step_until(condition: Callable[[], Any], what: str) -> None:
            deadline = time.monotonic() + TIMEOUT
            while not condition():
                assert time.monotonic() < deadline, f"{what}; midi: {midi.status}"
                app.step()
                time.sleep(0.005)

        step_until(lambda: midi.open_inputs, "the controller to open")
        controller.cc(7, 127)
        step_until(lambda: app.params.get("/fx/kaleido/segments") == 32, "the CC to land")
        assert app.params.last_change.origin == "midi"
        app.actions.post("midi/learn", "/fx/grade/hue", origin="key")
        step_until(lambda: midi.learning == "/fx/grade/hue", "learn to be armed by the action")
    finally:
        app.close()
        surface.close()
        controller.unplug()
    assert midi.open_inputs == [], "the app stopped its controls"
