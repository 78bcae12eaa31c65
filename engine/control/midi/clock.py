"""MIDI clock in: 24 pulses per quarter note -> tempo, beat position, running."""

from __future__ import annotations

from collections import deque

CLOCK_TYPES = frozenset({"clock", "start", "stop", "continue", "songpos"})  # the messages MidiClock reads


class MidiClock:
    """MIDI clock in: 24 pulses per quarter note -> tempo, beat position, running.

    The tempo is the median length of the one-beat spans (pulse i to pulse i + 24) in the
    last bar of pulses. A whole beat hides the jitter of pulses that arrive in bursts (a
    JACK period, a USB frame); the median ignores the spans that a stall (a busy machine,
    a late thread) bunched up; and a tempo change shows within a bar. Until a beat has
    arrived, the average interval stands in. A pause longer than ``GAP`` starts afresh.
    """

    PPQN = 24
    WINDOW = 4 * PPQN
    MIN_PULSES = 12
    GAP = 0.5  # seconds between pulses: slower than 5 bpm is a stopped clock
    STALE = 1.0  # seconds without a pulse after which there is no tempo

    def __init__(self) -> None:
        self._times: deque[float] = deque(maxlen=self.WINDOW)  # the MIDI thread's alone
        self._last: float | None = None
        self._bpm: float | None = None
        self._next = 0  # the position, in pulses, of the next pulse (MIDI: Start means the next one is 0)
        self.position = 0  # of the latest pulse, in pulses since the start of the song
        self.running = False

    def pulse(self, t: float) -> None:
        if self._last is not None and t - self._last > self.GAP:
            self._times.clear()
            self._bpm = None
        self._times.append(t)
        self._last = t
        if self.running:
            self.position, self._next = self._next, self._next + 1
        times, beat = self._times, self.PPQN
        if len(times) > beat:
            spans = sorted(times[i + beat] - times[i] for i in range(len(times) - beat))
            seconds_per_beat = spans[len(spans) // 2]
        elif len(times) >= self.MIN_PULSES:
            seconds_per_beat = (times[-1] - times[0]) / (len(times) - 1) * beat
        else:
            return
        if seconds_per_beat > 0:
            self._bpm = 60.0 / seconds_per_beat

    def start(self) -> None:
        self.running, self.position, self._next = True, 0, 0

    def resume(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False

    def song_position(self, sixteenths: int) -> None:
        self.position = self._next = sixteenths * self.PPQN // 4

    def bpm(self, now: float) -> float | None:
        """The tempo, or None before enough pulses or once they stop (any thread)."""
        last, bpm = self._last, self._bpm
        if last is None or now - last > self.STALE:
            return None
        return bpm

    @property
    def beat_position(self) -> float:
        """Where the latest pulse is, in quarter notes from the start of the song."""
        return self.position / self.PPQN
