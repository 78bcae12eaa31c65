"""Tempo, beat phase and LFOs, advancing with the render clock.

One ``Tempo`` keeps the beat count for the whole show. Each frame it advances by the
frame's time at the current BPM, and ``/tempo/source`` picks what steers it:

    internal   ``/tempo/bpm``, which tap tempo sets
    midi       a MIDI clock (the MIDI control calls ``on_midi_clock``)
    audio      the BPM and beat phase the audio analysis finds
    link       the Ableton Link session (tempo and beat, exactly)

MIDI and audio references glide the beat phase into line (a jump would jolt every synced
LFO); a reference more than half a beat away is jumped to. A source that has nothing to
say (no audio BPM yet, MIDI clock lost, Link off) leaves the tempo where it was, running,
and ``status`` says why.

The LFOs run here too, so that a synced LFO is locked to the same beat the tempo shows.

Scenes run on their own thread and never hold the Tempo: each frame it publishes its beat on
the registry's ``BeatClock`` (``beat_clock(params)``), which a scene reads, extrapolated to its
own moment (a prompt timeline counting beats).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.params import Param, ParamRegistry, bool_param, enum_param, float_param, int_param

if TYPE_CHECKING:
    from engine.control.actions import Actions
    from engine.control.audio import AudioInput
    from engine.control.link import LinkSession

log = logging.getLogger(__name__)

SOURCES = ("internal", "midi", "audio", "link")
LFO_COUNT = 4
LFO_SHAPES = ("sine", "triangle", "saw", "square", "random")

TAP_RESET_S = 2.0  # a pause this long starts a new run of taps
TAP_MEMORY = 8  # the BPM is the average over at most this many taps
MIDI_TIMEOUT_S = 2.0  # no clock for this long: the clock is lost, the tempo runs on
PHASE_LOCK_S = 0.25  # time constant of the glide onto a MIDI or audio beat
SNAP_BEATS = 0.5  # a reference further than this is jumped to (a restart, a new song position)
PULSE_SHARPNESS = 8.0  # tempo/beat: exp(-8 * phase) is gone within a quarter of a beat

BPM_RANGE = (20.0, 300.0)
EXTRAPOLATE_S = 0.5  # a reader is at most this far ahead of the last published beat (a stalled frame)

TEMPO_PARAMS: tuple[Param, ...] = (
    float_param(
        "/tempo/bpm",
        120.0,
        *BPM_RANGE,
        unit="BPM",
        description="The internal tempo (tap tempo sets it); used when the source is internal",
    ),
    enum_param(
        "/tempo/source",
        "internal",
        SOURCES,
        description="What drives the tempo and beat: internal/tap, MIDI clock, audio analysis, Link",
    ),
    int_param("/tempo/beats_per_bar", 4, 1, 16, description="Beats in a bar (the bar phase, Link's quantum)"),
)
LFO_PARAMS: tuple[Param, ...] = tuple(
    p
    for n in range(1, LFO_COUNT + 1)
    for p in (
        enum_param(f"/lfo/{n}/shape", "sine", LFO_SHAPES, description=f"LFO {n} wave shape (random: sample and hold)"),
        float_param(
            f"/lfo/{n}/rate",
            1.0,
            0.0,
            16.0,
            unit="cycles/beat or Hz",
            description=f"LFO {n} speed: cycles per beat when synced, cycles per second when free",
        ),
        bool_param(f"/lfo/{n}/sync", True, description=f"LFO {n} follows the beat (else it runs free in Hz)"),
        float_param(f"/lfo/{n}/phase", 0.0, 0.0, 1.0, description=f"LFO {n} phase offset, in cycles"),
    )
)
ALL_TEMPO_PARAMS = TEMPO_PARAMS + LFO_PARAMS


def lfo_shape(shape: str, phase: float, cycle: int = 0, seed: int = 0) -> float:
    """The value 0..1 of one LFO wave at ``phase`` (0..1) of cycle number ``cycle``.

    sine starts at its middle and rises (peak at 1/4); triangle rises from 0 to 1 at 1/2;
    saw ramps 0 to 1; square is 1 in the first half; random holds one value per cycle,
    the same for the same cycle and seed (a replay gives the same show).
    """
    if shape == "sine":
        return 0.5 + 0.5 * math.sin(2.0 * math.pi * phase)
    if shape == "triangle":
        return 1.0 - abs(2.0 * phase - 1.0)
    if shape == "saw":
        return phase
    if shape == "square":
        return 1.0 if phase < 0.5 else 0.0
    if shape == "random":
        return random.Random(seed * 1_000_003 + cycle).random()
    raise ValueError(f"unknown LFO shape {shape!r}; shapes: {', '.join(LFO_SHAPES)}")


class BeatClock:
    """The tempo's beat for other threads: the last frame's (beat, BPM), stamped with
    ``time.monotonic`` (the scene worker's clock), read ahead to the reader's moment."""

    def __init__(self) -> None:
        self._reading: tuple[float, float, float] | None = None  # (beat, bpm, monotonic stamp)

    def publish(self, beat: float, bpm: float) -> None:
        self._reading = (beat, bpm, time.monotonic())  # one assignment: readers see old or new

    def beat_at(self, now: float) -> float | None:
        """The beat at ``now`` (``time.monotonic`` seconds); None while no tempo has published one."""
        reading = self._reading
        if reading is None:
            return None
        beat, bpm, stamp = reading
        return beat + min(max(now - stamp, 0.0), EXTRAPOLATE_S) * bpm / 60.0


_BEAT_CLOCKS: weakref.WeakKeyDictionary[ParamRegistry, BeatClock] = weakref.WeakKeyDictionary()
_BEAT_CLOCKS_LOCK = threading.Lock()


def beat_clock(params: ParamRegistry) -> BeatClock:
    """The beat clock of the show that ``params`` belongs to (made on first ask)."""
    with _BEAT_CLOCKS_LOCK:
        clock = _BEAT_CLOCKS.get(params)
        if clock is None:
            clock = _BEAT_CLOCKS[params] = BeatClock()
        return clock


@dataclass(frozen=True)
class _MidiClock:
    bpm: float | None
    beat: float | None
    running: bool
    serial: int


class Tempo:
    """The tempo Control; see the module docstring. Add it before the modulation matrix."""

    name = "tempo"

    def __init__(self, params: ParamRegistry, audio: AudioInput | None = None, link: LinkSession | None = None) -> None:
        self.params = params
        params.declare_all(ALL_TEMPO_PARAMS)
        self.audio = audio
        self.link = link
        self.bpm = float(params.get("/tempo/bpm"))
        self.beat = 0.0  # beats since the show started (or the session's timeline, with Link)
        self.bar_phase = 0.0
        self.driver = "internal"  # what drives the tempo now, for the status line
        self.lfo_values = [0.0] * LFO_COUNT
        self._lfo_cycles = [0.0] * LFO_COUNT  # free-running LFOs integrate their rate
        self._now: float | None = None
        self._lock = threading.Lock()  # guards the two inboxes, filled from other threads
        self._taps_pending: list[float | None] = []
        self._taps: list[float] = []
        self._midi: _MidiClock | None = None
        self._midi_seen: tuple[int, float] = (0, 0.0)  # (serial, render time it arrived)
        self._held: tuple[str, float] | None = None  # (source, its last BPM): held while it is silent
        self.clock = beat_clock(params)  # the beat as scenes read it

    # -- the Control protocol ----------------------------------------------------------------
    @property
    def status(self) -> str:
        return f"tempo {self.bpm:.1f} BPM ({self.driver}), beat {self.beat:.1f}"

    def start(self) -> None:
        """Nothing to open: the tempo lives on the render thread."""

    def stop(self) -> None:
        """Nothing to close."""

    def register_actions(self, actions: Actions) -> None:
        actions.register("tap", self.tap)

    # -- inputs from other threads --------------------------------------------------------------
    def tap(self, at: float | None = None) -> None:
        """One tap (any thread). ``at`` is its render-clock time; None means the next frame's."""
        with self._lock:
            self._taps_pending.append(at)

    def on_midi_clock(self, bpm: float | None, beat_position: float | None, running: bool) -> None:
        """The MIDI control's report (any thread): tempo from the clock, position in beats.

        ``beat_position`` is the beat count at the moment of the call (song position plus
        clocks since); None if unknown. While ``running`` is false only the tempo is used.
        """
        with self._lock:
            serial = self._midi.serial + 1 if self._midi else 1
            self._midi = _MidiClock(bpm if bpm and bpm > 0 else None, beat_position, running, serial)

    # -- the frame ------------------------------------------------------------------------------
    @property
    def beat_phase(self) -> float:
        return self.beat % 1.0

    @property
    def beat_pulse(self) -> float:
        """1 on each beat, fading within a quarter beat: a flash on the beat."""
        return math.exp(-PULSE_SHARPNESS * self.beat_phase)

    def frame(self, now: float) -> None:
        """Render thread: advance the beat to ``now``, steered by the source; update the LFOs."""
        dt = 0.0 if self._now is None else max(0.0, now - self._now)
        self._now = now
        beats_per_bar = int(self.params.get("/tempo/beats_per_bar"))

        # 1. the source sets the BPM and, maybe, where the beat should be
        reference, exact = self._steer(self.params.get("/tempo/source"), now, beats_per_bar)
        if exact and reference is not None:
            self.beat = reference  # Link: the session's timeline, as it is
        else:
            self.beat += dt * self.bpm / 60.0
            if reference is not None:
                error = reference - self.beat
                if abs(error) > SNAP_BEATS:
                    self.beat = reference
                else:
                    self.beat += error * min(1.0, dt / PHASE_LOCK_S)

        # 2. taps: a tempo for the internal source, and each tap is a beat
        with self._lock:
            taps, self._taps_pending = self._taps_pending, []
        for at in taps:
            self._tap_at(now if at is None else at, now, beats_per_bar)

        if not exact:
            self.bar_phase = (self.beat % beats_per_bar) / beats_per_bar
        self._update_lfos(dt)
        self.clock.publish(self.beat, self.bpm)

    def _steer(self, source: str, now: float, beats_per_bar: int) -> tuple[float | None, bool]:
        """Set ``bpm`` and ``driver`` from the source; return the beat the source says it is
        now (if it knows) and whether that beat is exact (Link) rather than one to glide to."""
        bpm, reference, exact, why = self._ask(source, now, beats_per_bar)
        if bpm is not None:
            self.bpm, self._held = bpm, (source, bpm)
            self.driver = why
        else:  # nothing to say: the source's last tempo, or the internal one if it never had one
            held = self._held if self._held is not None and self._held[0] == source else None
            self.bpm = held[1] if held else float(self.params.get("/tempo/bpm"))
            self.driver = f"{why}, holding {self.bpm:.1f}" if held else f"internal: {why}"
        return reference, exact

    def _ask(self, source: str, now: float, beats_per_bar: int) -> tuple[float | None, float | None, bool, str]:
        """(bpm or None, beat reference or None, exact, what drives) from one source."""
        if source == "link":
            state = self.link.state() if self.link is not None else None
            if state is None:
                return None, None, False, "link is off"
            self.link.quantum = beats_per_bar
            self.bar_phase = (state.phase % beats_per_bar) / beats_per_bar
            return state.tempo, state.beat, True, f"link, {state.peers} peer{'s' if state.peers != 1 else ''}"
        if source == "audio":
            if self.audio is None:
                return None, None, False, "no audio input"
            features = self.audio.features()
            if not features.bpm:
                return None, None, False, "audio has no BPM yet"
            # the audio knows the phase, not which beat: the nearest beat with that phase
            phase = self.beat + _wrap(features.beat_phase - self.beat_phase) if features.beats else None
            return features.bpm, phase, False, "audio"
        if source == "midi":
            with self._lock:
                clock = self._midi
            if clock is None:
                return None, None, False, "no MIDI clock yet"
            if clock.serial != self._midi_seen[0]:
                self._midi_seen = (clock.serial, now)
            age = now - self._midi_seen[1]
            if age > MIDI_TIMEOUT_S or clock.bpm is None:
                return None, None, False, "MIDI clock lost" if age > MIDI_TIMEOUT_S else "MIDI clock has no tempo"
            if not clock.running or clock.beat is None:
                return clock.bpm, None, False, "MIDI clock (stopped)"
            return clock.bpm, clock.beat + age * clock.bpm / 60.0, False, "MIDI clock"
        return float(self.params.get("/tempo/bpm")), None, False, "internal"

    def _tap_at(self, at: float, now: float, beats_per_bar: int) -> None:
        """A tap at render time ``at``: average the run's intervals, put a beat on the tap."""
        if self._taps and not 0.0 < at - self._taps[-1] <= TAP_RESET_S:
            self._taps.clear()
        first = not self._taps
        self._taps = (self._taps + [at])[-TAP_MEMORY:]
        if len(self._taps) >= 2:
            bpm = 60.0 * (len(self._taps) - 1) / (self._taps[-1] - self._taps[0])
            bpm = min(BPM_RANGE[1], max(BPM_RANGE[0], bpm))
            self.params.set("/tempo/bpm", bpm, origin="tap")
            source = self.params.get("/tempo/source")
            if source == "internal":
                self.bpm = bpm
            elif source == "link" and self.link is not None and self.link.state() is not None:
                self.link.set_tempo(bpm)  # tapping steers the whole session; its phase stays
        # the first tap of a run marks a bar, the others a beat
        beat_at_tap = self.beat - (now - at) * self.bpm / 60.0
        grid = beats_per_bar if first else 1
        self.beat += round(beat_at_tap / grid) * grid - beat_at_tap

    def _update_lfos(self, dt: float) -> None:
        get = self.params.get
        for i in range(LFO_COUNT):
            n = i + 1
            rate = float(get(f"/lfo/{n}/rate"))
            if get(f"/lfo/{n}/sync"):
                cycles = self.beat * rate  # locked to the beat, even if that jumps on a rate change
            else:
                self._lfo_cycles[i] += dt * rate  # continuous when the rate moves
                cycles = self._lfo_cycles[i]
            cycles += float(get(f"/lfo/{n}/phase"))
            self.lfo_values[i] = lfo_shape(get(f"/lfo/{n}/shape"), cycles % 1.0, math.floor(cycles), seed=n)


def _wrap(x: float) -> float:
    """``x`` folded into [-0.5, 0.5): the shortest way round a cycle."""
    return (x + 0.5) % 1.0 - 0.5
