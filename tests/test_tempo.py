"""Tempo: tap, beat and bar phase on the render clock, MIDI / audio / Link sources, LFOs."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pytest

from engine.catalog import build_registry
from engine.clock import ManualClock
from engine.control.actions import Actions
from engine.control.audio import AudioFeatures
from engine.control.link import LinkSession
from engine.control.tempo import LFO_SHAPES, MIDI_TIMEOUT_S, Tempo, lfo_shape
from engine.params import ParamRegistry


def make_tempo(**settings: object) -> tuple[ParamRegistry, Tempo]:
    params = ParamRegistry()
    tempo = Tempo(params)
    apply(params, settings)
    return params, tempo


def apply(params: ParamRegistry, settings: dict) -> None:
    params.set_many(settings)
    params.apply_pending(0.0)


def on_cycle_start(phase: float) -> bool:
    """A phase at 0, seen from either side of the wrap (0.0 or 0.99999...)."""
    return min(phase, 1.0 - phase) < 1e-9


def run_frames(params: ParamRegistry, tempo: Tempo, clock: ManualClock, frames: int) -> None:
    """What App.step does for a control: tick, land params, frame(now)."""
    for _ in range(frames):
        params.apply_pending(clock.tick())
        tempo.frame(clock.now())


# -- the beat on the render clock -----------------------------------------------------------------


def test_beat_and_bar_phase_advance_with_the_render_clock() -> None:
    params, tempo = make_tempo(**{"/tempo/bpm": 120.0, "/tempo/beats_per_bar": 4})
    clock = ManualClock(60.0)
    tempo.frame(clock.now())
    assert tempo.beat == 0.0 and tempo.beat_pulse == 1.0

    run_frames(params, tempo, clock, 15)  # 0.25 s at 120 BPM: half a beat
    assert tempo.beat_phase == pytest.approx(0.5)
    assert tempo.bar_phase == pytest.approx(0.125)
    assert tempo.beat_pulse == pytest.approx(math.exp(-4.0))
    run_frames(params, tempo, clock, 45)  # 1 s: two beats, half a bar
    assert tempo.beat == pytest.approx(2.0) and tempo.bar_phase == pytest.approx(0.5)

    apply(params, {"/tempo/bpm": 90.0, "/tempo/beats_per_bar": 3})
    run_frames(params, tempo, clock, 40)  # 2/3 s at 90 BPM: one more beat, a bar of 3
    assert tempo.beat == pytest.approx(3.0) and on_cycle_start(tempo.bar_phase)
    assert tempo.status == "tempo 90.0 BPM (internal), beat 3.0"


def test_tap_tempo_averages_the_taps_and_resets_after_a_pause() -> None:
    params, tempo = make_tempo(**{"/tempo/bpm": 90.0})
    for at in (10.0, 10.5, 11.0, 11.5):
        tempo.tap(at)
    tempo.frame(11.5)
    params.apply_pending(0.0)
    assert params.get("/tempo/bpm") == pytest.approx(120.0)
    assert params.last_change.origin == "tap"
    assert tempo.bpm == pytest.approx(120.0) and tempo.beat_phase == pytest.approx(0.0, abs=1e-9)

    # uneven taps: the average of the intervals (first to last), not the last one
    for at in (12.0, 12.45, 13.0, 13.52, 14.0):
        tempo.tap(at)
    tempo.frame(14.0)
    params.apply_pending(0.0)
    assert params.get("/tempo/bpm") == pytest.approx(120.0)

    # a 2 s pause starts a new run: one tap changes nothing, the next two set the tempo
    tempo.tap(16.5)
    tempo.frame(16.5)
    params.apply_pending(0.0)
    assert params.get("/tempo/bpm") == pytest.approx(120.0)
    tempo.tap(16.9)
    tempo.tap(17.3)
    tempo.frame(17.3)
    params.apply_pending(0.0)
    assert params.get("/tempo/bpm") == pytest.approx(150.0), "only the new run counts"


def test_first_tap_of_a_run_marks_a_bar_and_later_taps_a_beat() -> None:
    params, tempo = make_tempo(**{"/tempo/bpm": 120.0})
    clock = ManualClock(100.0)
    run_frames(params, tempo, clock, 137)  # 1.37 s: beat 2.74
    tempo.tap(clock.now())
    tempo.frame(clock.now())
    assert tempo.beat == pytest.approx(4.0) and tempo.bar_phase == pytest.approx(0.0)

    run_frames(params, tempo, clock, 65)  # 2.02 s: beat 5.3 at 120 BPM
    tempo.tap(1.92)  # dated 0.1 s back, as a MIDI pad's timestamp would be: 0.55 s after the first
    tempo.frame(clock.now())
    bpm = 60.0 / 0.55
    assert tempo.bpm == pytest.approx(bpm)
    # the tap was beat 5; since then 0.1 s at the tapped tempo
    assert tempo.beat == pytest.approx(5.0 + 0.1 * bpm / 60.0)
    params.apply_pending(0.0)
    assert params.get("/tempo/bpm") == pytest.approx(bpm)

    tempo.tap(2.02)
    tempo.tap(2.1)  # 80 ms: faster than the range allows, clamped
    tempo.frame(2.1)
    params.apply_pending(0.0)
    assert params.get("/tempo/bpm") == pytest.approx(60.0 * 3 / (2.1 - 1.37))
    tempo.tap(5.0)
    tempo.tap(5.05)
    tempo.frame(5.05)
    params.apply_pending(0.0)
    assert params.get("/tempo/bpm") == 300.0, "50 ms between taps is clamped to the range"


def test_tap_action_through_the_actions_queue() -> None:
    params, tempo = make_tempo()
    actions = Actions()
    tempo.register_actions(actions)
    clock = ManualClock(60.0)
    for _ in range(4):
        actions.post("tap", origin="midi")
        actions.run_pending()  # App.step: actions run, then controls' frame(now) stamps the tap
        run_frames(params, tempo, clock, 25)  # 25 frames at 60 fps between taps: 144 BPM
    params.apply_pending(0.0)
    assert params.get("/tempo/bpm") == pytest.approx(144.0)


# -- sources ---------------------------------------------------------------------------------------


def test_midi_clock_sets_tempo_and_position_and_is_dropped_when_lost() -> None:
    params, tempo = make_tempo(**{"/tempo/source": "midi", "/tempo/bpm": 120.0})
    clock = ManualClock(100.0)
    run_frames(params, tempo, clock, 10)
    assert tempo.driver == "internal: no MIDI clock yet" and tempo.bpm == 120.0

    tempo.on_midi_clock(100.0, 8.0, True)  # a song position far from where the tempo is: jump
    run_frames(params, tempo, clock, 1)
    assert tempo.beat == pytest.approx(8.0) and tempo.bpm == 100.0 and tempo.driver == "MIDI clock"
    run_frames(params, tempo, clock, 30)  # 0.3 s at 100 BPM, no new clock needed in between
    assert tempo.beat == pytest.approx(8.5)

    # the clock runs a little ahead (0.1 beat): the beat glides onto it instead of jumping
    position = 8.6
    tempo.on_midi_clock(100.0, position, True)
    run_frames(params, tempo, clock, 1)
    assert 8.5 < tempo.beat < 8.6
    for _ in range(20):  # 2 s of clock reports, one every 0.1 s (10 beats of 24 pulses, thinned)
        run_frames(params, tempo, clock, 10)
        position += 0.1 * 100 / 60
        tempo.on_midi_clock(100.0, position, True)
    run_frames(params, tempo, clock, 1)
    assert tempo.beat == pytest.approx(position, abs=1e-3)

    tempo.on_midi_clock(None, position, False)  # stopped, no tempo in the clock: hold 100
    run_frames(params, tempo, clock, 10)
    assert tempo.driver == "MIDI clock has no tempo, holding 100.0" and tempo.bpm == 100.0
    tempo.on_midi_clock(100.0, position, False)  # stopped: the tempo, not the position
    run_frames(params, tempo, clock, 10)
    assert tempo.driver == "MIDI clock (stopped)" and tempo.beat > position + 0.1
    run_frames(params, tempo, clock, int(MIDI_TIMEOUT_S * 100) + 5)
    assert tempo.driver == "MIDI clock lost, holding 100.0" and tempo.bpm == 100.0

    apply(params, {"/tempo/source": "internal"})
    run_frames(params, tempo, clock, 1)
    assert tempo.bpm == 120.0 and tempo.driver == "internal"


@dataclass
class FakeAudio:
    """Stands in for AudioInput: the tempo only calls features()."""

    snapshot: AudioFeatures

    def features(self) -> AudioFeatures:
        return self.snapshot


def test_audio_source_follows_the_analysed_bpm_and_beat_phase() -> None:
    params = ParamRegistry()
    audio = FakeAudio(AudioFeatures())
    tempo = Tempo(params, audio=audio)
    apply(params, {"/tempo/source": "audio", "/tempo/bpm": 100.0})
    clock = ManualClock(100.0)
    run_frames(params, tempo, clock, 5)
    assert tempo.driver == "internal: audio has no BPM yet" and tempo.bpm == 100.0

    # the audio's beats fall a quarter beat later than the tempo's: the phase glides onto them
    audio.snapshot = AudioFeatures(bpm=128.0, beats=3, beat_phase=0.0)
    t0, beat0 = clock.now(), tempo.beat
    for _ in range(200):
        params.apply_pending(clock.tick())
        elapsed_beats = (clock.now() - t0) * 128.0 / 60.0
        audio.snapshot = AudioFeatures(bpm=128.0, beats=3, beat_phase=(elapsed_beats - 0.25) % 1.0)
        tempo.frame(clock.now())
    assert tempo.bpm == 128.0 and tempo.driver == "audio"
    assert tempo.beat_phase == pytest.approx(audio.snapshot.beat_phase, abs=0.01)
    assert tempo.beat > beat0


def test_sources_that_are_absent_fall_back_to_the_internal_tempo() -> None:
    params, tempo = make_tempo(**{"/tempo/source": "audio", "/tempo/bpm": 111.0})
    tempo.frame(0.0)
    assert tempo.bpm == 111.0 and tempo.driver == "internal: no audio input"
    apply(params, {"/tempo/source": "link"})
    tempo.frame(0.1)
    assert tempo.bpm == 111.0 and tempo.driver == "internal: link is off"


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_link_sessions_share_tempo_and_beat_and_drive_the_tempo() -> None:
    """Two Link peers in one process, discovering each other over the local network."""
    pytest.importorskip("aalink")
    ours, theirs = ParamRegistry(), ParamRegistry()
    link = LinkSession(ours, bpm=120.0)
    peer = LinkSession(theirs, bpm=97.0)
    tempo = Tempo(ours, link=link)
    apply(ours, {"/tempo/source": "link", "/link/enabled": True})
    try:
        assert link.status == "link off"
        for session in (link, peer):
            session.start()
        assert peer.state() is None, "/link/enabled is false for the peer: it must not join"
        peer.enable(True)
        if not wait_for(lambda: all(s.state() is not None and s.state().peers >= 1 for s in (link, peer))):
            pytest.skip("Link peers do not discover each other on this machine's network")
        assert link.status.startswith("link on, 1 peer, ")

        peer.set_tempo(133.0)  # any peer may change the session's tempo; everyone follows
        assert wait_for(lambda: abs(link.state().tempo - 133.0) < 0.01), link.state()
        tempo.frame(0.0)
        assert tempo.bpm == pytest.approx(133.0, abs=0.01) and tempo.driver == "link, 1 peer"
        ours_now, theirs_now = link.state(), peer.state()
        # the beat is the session's: peers agree on the phase (read microseconds apart)
        assert tempo.beat == pytest.approx(ours_now.beat, abs=0.05)
        assert (ours_now.beat - theirs_now.beat) % 1.0 == pytest.approx(0.0, abs=0.02) or (
            ours_now.beat - theirs_now.beat
        ) % 1.0 == pytest.approx(1.0, abs=0.02)

        tempo.tap(10.0)  # tapping with Link as the source proposes the tempo to the session
        tempo.tap(10.5)
        tempo.frame(10.5)
        assert wait_for(lambda: abs(peer.state().tempo - 120.0) < 0.01), peer.state()

        apply(ours, {"/link/enabled": False})
        link.frame(11.0)
        tempo.frame(11.0)
        assert link.state() is None and link.status == "link off"
        assert tempo.driver.startswith("link is off, holding "), "the show keeps the session's last tempo"
    finally:
        link.stop()
        peer.stop()


# -- LFOs ------------------------------------------------------------------------------------------


def test_lfo_shapes_at_known_phases() -> None:
    expected = {
        "sine": {0.0: 0.5, 0.25: 1.0, 0.5: 0.5, 0.75: 0.0},
        "triangle": {0.0: 0.0, 0.25: 0.5, 0.5: 1.0, 0.75: 0.5},
        "saw": {0.0: 0.0, 0.25: 0.25, 0.5: 0.5, 0.99: 0.99},
        "square": {0.0: 1.0, 0.49: 1.0, 0.5: 0.0, 0.99: 0.0},
    }
    assert set(expected) | {"random"} == set(LFO_SHAPES)
    for shape, points in expected.items():
        for phase, value in points.items():
            assert lfo_shape(shape, phase) == pytest.approx(value, abs=1e-12), (shape, phase)
    # sample and hold: one value per cycle, the same on replay, different between cycles
    held = [lfo_shape("random", phase, cycle=7, seed=1) for phase in (0.0, 0.3, 0.9)]
    assert len(set(held)) == 1 and 0.0 <= held[0] < 1.0
    values = {lfo_shape("random", 0.0, cycle=c, seed=1) for c in range(50)}
    assert len(values) == 50 and all(0.0 <= v < 1.0 for v in values)
    assert lfo_shape("random", 0.0, cycle=7, seed=2) != held[0], "each LFO has its own sequence"
    with pytest.raises(ValueError, match="unknown LFO shape"):
        lfo_shape("wobble", 0.0)


def test_lfos_run_synced_to_the_beat_or_free_in_hertz() -> None:
    params = build_registry()  # the LFOs' params come with the catalog
    tempo = Tempo(params)
    apply(
        params,
        {
            "/tempo/bpm": 120.0,
            "/lfo/1/shape": "sine",
            "/lfo/1/rate": 1.0,  # a cycle per beat
            "/lfo/2/shape": "saw",
            "/lfo/2/rate": 0.25,
            "/lfo/2/phase": 0.5,  # a cycle per bar, half way in
            "/lfo/3/shape": "square",
            "/lfo/3/rate": 2.0,
            "/lfo/3/sync": False,  # 2 Hz, whatever the tempo
            "/lfo/4/shape": "random",
            "/lfo/4/rate": 1.0,
        },
    )
    clock = ManualClock(100.0)
    tempo.frame(clock.now())
    assert tempo.lfo_values[:3] == [0.5, 0.5, 1.0]
    run_frames(params, tempo, clock, 12)  # 0.12 s: 0.24 beat
    assert tempo.lfo_values[0] == pytest.approx(0.5 + 0.5 * math.sin(2 * math.pi * 0.24))
    assert tempo.lfo_values[1] == pytest.approx(0.5 + 0.24 / 4)
    assert tempo.lfo_values[2] == 1.0
    held = tempo.lfo_values[3]
    run_frames(params, tempo, clock, 13)  # 0.25 s: half a beat, half a 2 Hz cycle
    assert tempo.lfo_values[0] == pytest.approx(0.5, abs=1e-9)
    assert tempo.lfo_values[2] == 0.0
    assert tempo.lfo_values[3] == held, "sample and hold: one value per cycle"
    run_frames(params, tempo, clock, 30)  # 0.55 s: into the second beat
    assert tempo.lfo_values[3] != held

    apply(params, {"/tempo/bpm": 60.0})  # the synced LFOs slow down, the free one does not
    run_frames(params, tempo, clock, 15)  # 0.7 s: beat 1.1 + 0.15
    assert tempo.beat == pytest.approx(1.25)
    assert tempo.lfo_values[0] == pytest.approx(1.0)
    assert tempo.lfo_values[2] == 1.0, "2 Hz: 1.4 cycles at 0.7 s, in the first half again"
