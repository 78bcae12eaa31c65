"""Audio input and analysis: levels, bands, onsets, beats and BPM, for modulation and tempo.

    capture (PortAudio callback, or a WAV file paced in real time, looped)
        ──►  analysis thread: one ``Analyser.process`` per hop of 512 samples
        ──►  the newest ``AudioFeatures`` snapshot  ──►  ``features()`` (any thread, never waits)

The ``Analyser`` is pure numpy and knows nothing about devices or threads, so the same
code runs live and offline (``analyse_wav``, the tests). Every feature is 0..1: each
one has its own automatic gain (a slow peak follower), so a quiet room and a club PA both
fill the range, and ``/audio/gain`` trims on top.

A missing sound card, PortAudio or WAV file is one clear message in ``status`` and
``error``; ``start`` never raises for it, and every feature then reads 0.
"""

from __future__ import annotations

import logging
import math
import queue
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.params import Param, ParamRegistry, float_param
from engine.sources.pacing import Pacer

log = logging.getLogger(__name__)

FRAME = 1024  # FFT size: 23 ms at 44.1 kHz, enough for bass bands
HOP = 512  # analysis step: 11.6 ms at 44.1 kHz, finer than a video frame
BANDS = 8  # fixed, so that a preset's route to audio/band3 means the same band on every machine
BAND_RANGE_HZ = (40.0, 16000.0)  # log-spaced bands cover this range
BASS_HZ, MID_HZ, HIGH_HZ = (20.0, 250.0), (250.0, 4000.0), (4000.0, 16000.0)

AGC_RELEASE_S = 10.0  # the peak followers forget a loud moment over this time
LEVEL_FLOOR = 1e-3  # -60 dBFS: quieter than this is silence, never amplified to full scale
BAND_FLOOR = 0.02  # a band is measured against at least 2 % (-34 dB) of the loudest level seen
FLUX_BANDS = 48  # onset detection reads log-spaced bands, not bins: noise averages out in a band
FLUX_RANGE_HZ = (30.0, 16000.0)
FLUX_FLOOR = 0.05  # flux below this (log units, relative to the level) is noise, not onsets
LOG_COMPRESSION = 100.0  # log(1 + C |X|): onsets of quiet notes count as well as loud ones

ONSET_LOOKAHEAD = 2  # frames after a candidate peak before it is confirmed (23 ms latency)
ONSET_PRE_MAX = 3  # a peak must be the largest over the 3 frames before it
ONSET_AVERAGE = 9  # the adaptive threshold follows the mean of the ~100 ms before a peak
ONSET_WAIT = 3  # frames (35 ms) between two onsets at least

TEMPO_WINDOW_S = 8.0  # the onset envelope that the BPM is estimated from
TEMPO_MIN_S = 3.0  # no estimate before this much audio
TEMPO_UPDATE_S = 0.25  # how often the estimate is refreshed
BPM_RANGE = (60.0, 180.0)  # estimates land in this range: it settles octave errors
BPM_STEP = 0.05  # resolution of the candidate grid
TEMPO_PRIOR_OCTAVES = 1.0  # log-normal preference around 120 BPM (as librosa's default)
TEMPO_COMB = 4  # the ACF is read at 1..4 periods: far lags pin the period precisely
TEMPO_CONFIDENCE = 0.1  # below this the envelope has no steady pulse: keep the last BPM
TEMPO_MEDIAN = 5  # the reported BPM is the median of the last estimates
PHASE_MEMORY_S = 3.0  # the beat phase weighs recent onsets most

STALE_S = 1.0  # a device that delivered nothing for this long reads as silence

AUDIO_PARAMS: tuple[Param, ...] = (
    float_param(
        "/audio/gain",
        1.0,
        0.0,
        4.0,
        unit="x",
        description="Trim after the automatic gain: above 1 pushes features to full scale sooner",
    ),
    float_param(
        "/audio/attack", 10.0, 0.0, 1000.0, unit="ms", description="How fast the level and band envelopes rise"
    ),
    float_param(
        "/audio/release", 250.0, 0.0, 5000.0, unit="ms", description="How fast the level and band envelopes fall"
    ),
    float_param(
        "/audio/onset_sensitivity",
        0.5,
        0.0,
        1.0,
        description="Onset detection: 1 catches soft notes, 0 only the hardest hits",
    ),
    float_param(
        "/audio/pulse_decay",
        150.0,
        10.0,
        2000.0,
        unit="ms",
        description="How long the onset and beat pulses take to fade",
    ),
)


# -- data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnalysisSettings:
    """The live knobs of the analysis; the render thread swaps in a new one, never edits."""

    gain: float = 1.0
    attack_ms: float = 10.0
    release_ms: float = 250.0
    onset_sensitivity: float = 0.5
    pulse_decay_ms: float = 150.0


@dataclass(frozen=True)
class AudioFeatures:
    """One snapshot of the analysis. Levels and pulses are 0..1; ``bpm`` is 0 until known.

    ``time`` is seconds of audio analysed; ``onsets`` and ``beats`` count events so far,
    so a reader can tell a new event from the tail of an old pulse.
    """

    time: float = 0.0
    rms: float = 0.0
    bass: float = 0.0
    mid: float = 0.0
    high: float = 0.0
    bands: tuple[float, ...] = (0.0,) * BANDS
    onset: float = 0.0
    beat: float = 0.0
    bpm: float = 0.0
    beat_phase: float = 0.0
    onsets: int = 0
    beats: int = 0


SILENCE = AudioFeatures()


@dataclass(frozen=True)
class Event:
    kind: str  # "onset" or "beat"
    time: float  # seconds of audio since the analyser started


@dataclass
class _Follower:
    """A level that rises at once and falls with a time constant: the automatic gain's reference."""

    floor: float
    peak: float = 0.0

    def update(self, value: float, decay: float) -> float:
        self.peak = max(value, self.peak * decay)
        return max(self.peak, self.floor)


# -- analysis ----------------------------------------------------------------------------------


class Analyser:
    """Streaming analysis of mono audio; feed it blocks of any length with ``process``."""

    def __init__(self, sample_rate: int, settings: AnalysisSettings | None = None) -> None:
        if sample_rate < 8000:
            raise ValueError(f"sample rate {sample_rate} Hz is too low for audio analysis")
        self.sample_rate = sample_rate
        self.settings = settings or AnalysisSettings()
        self.features = SILENCE
        self.hop_s = HOP / sample_rate
        self._frame = np.zeros(FRAME, np.float32)
        self._carry = np.zeros(0, np.float32)
        self._samples = 0  # samples analysed so far: the stream clock

        # 1. spectrum layout: the window, and which bins belong to which band
        self._window = np.hanning(FRAME + 1)[:FRAME].astype(np.float32)  # periodic Hann
        # scale so that a band's value is the RMS of the signal in it (Parseval)
        self._power_scale = 2.0 / (FRAME * float(np.sum(self._window**2)))
        self._mag_scale = 2.0 / float(np.sum(self._window))  # a full-scale sine peaks at 1
        freqs = np.fft.rfftfreq(FRAME, 1.0 / sample_rate)
        top = min(BAND_RANGE_HZ[1], sample_rate / 2)
        edges = np.geomspace(BAND_RANGE_HZ[0], top, BANDS + 1)
        self._band_bins = [_bins(freqs, lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]
        self._bass_bins, self._mid_bins, self._high_bins = (
            _bins(freqs, lo, min(hi, sample_rate / 2)) for lo, hi in (BASS_HZ, MID_HZ, HIGH_HZ)
        )
        flux_top = min(FLUX_RANGE_HZ[1], sample_rate / 2)
        flux_edges = np.geomspace(FLUX_RANGE_HZ[0], flux_top, FLUX_BANDS + 1)
        self._flux_bands = np.zeros((FLUX_BANDS, len(freqs)), np.float32)
        for i, (lo, hi) in enumerate(zip(flux_edges[:-1], flux_edges[1:])):
            bins = _bins(freqs, lo, hi)
            self._flux_bands[i, bins] = 1.0 / bins.size  # mean power in the band
        self._prev_bands = np.zeros(FLUX_BANDS)

        # 2. level envelopes (raw, before the automatic gain) and their followers
        self._agc_decay = math.exp(-self.hop_s / AGC_RELEASE_S)
        self._rms_peak = _Follower(LEVEL_FLOOR)
        self._level_peaks = [_Follower(LEVEL_FLOOR) for _ in range(3 + BANDS)]
        self._levels = np.zeros(4 + BANDS)  # rms, bass, mid, high, bands (normalised, enveloped)

        # 3. onsets: normalised flux history, for the adaptive threshold and the tempo window
        self._flux_peak = _Follower(FLUX_FLOOR)
        window_frames = int(TEMPO_WINDOW_S / self.hop_s)
        self._flux: deque[float] = deque(maxlen=ONSET_AVERAGE + ONSET_PRE_MAX + ONSET_LOOKAHEAD + 1)
        self._novelty: deque[float] = deque(maxlen=window_frames)
        self._frames = 0
        self._last_onset_frame = -ONSET_WAIT
        self._last_onset = -math.inf
        self._onsets = 0

        # 4. tempo and beats
        self._update_every = max(1, int(TEMPO_UPDATE_S / self.hop_s))
        self._estimates: deque[float] = deque(maxlen=TEMPO_MEDIAN)
        self.bpm = 0.0
        self._next_beat: float | None = None
        self._last_beat = -math.inf
        self._beats = 0

    @property
    def time(self) -> float:
        """Seconds of audio analysed: the time of the newest sample."""
        return self._samples / self.sample_rate

    def process(self, block: np.ndarray) -> list[Event]:
        """Analyse every whole hop in ``block`` (the rest waits for the next block)."""
        block = np.asarray(block, np.float32).reshape(-1)
        if self._carry.size:
            block = np.concatenate([self._carry, block])
        events: list[Event] = []
        whole = block.size - block.size % HOP
        for start in range(0, whole, HOP):
            events.extend(self._hop(block[start : start + HOP]))
        self._carry = block[whole:].copy()
        return events

    # -- one hop -----------------------------------------------------------------------
    def _hop(self, hop: np.ndarray) -> list[Event]:
        s = self.settings
        self._frame[:-HOP] = self._frame[HOP:]
        self._frame[-HOP:] = hop
        self._samples += HOP
        now = self.time
        events: list[Event] = []

        # 1. spectrum
        spectrum = np.fft.rfft(self._frame * self._window)
        mag = np.abs(spectrum)
        power = mag**2 * self._power_scale

        # 2. levels: raw RMS per band -> automatic gain -> attack/release envelope
        raw = [float(np.sqrt(np.mean(hop.astype(np.float64) ** 2)))]
        raw += [math.sqrt(float(power[b].sum())) for b in (self._bass_bins, self._mid_bins, self._high_bins)]
        raw += [math.sqrt(float(power[b].sum())) for b in self._band_bins]
        rms_ref = self._rms_peak.update(raw[0], self._agc_decay)
        relative_floor = BAND_FLOOR * self._rms_peak.peak
        normalised = np.empty(len(raw))
        normalised[0] = raw[0] / rms_ref
        for i, (value, follower) in enumerate(zip(raw[1:], self._level_peaks), start=1):
            normalised[i] = value / max(follower.update(value, self._agc_decay), relative_floor)
        target = np.clip(normalised * s.gain, 0.0, 1.0)
        rising = target > self._levels
        attack, release = _smoothing(s.attack_ms, self.hop_s), _smoothing(s.release_ms, self.hop_s)
        self._levels += (target - self._levels) * np.where(rising, attack, release)

        # 3. onsets: band-wise log spectral flux, normalised, against an adaptive threshold.
        # Bands are measured against the automatic gain's reference, so a quiet input has
        # the same onsets as a loud one; each band is compared with the previous frame's
        # loudest neighbour (SuperFlux, Boeck & Widmer 2013), so a sliding pitch (a kick's
        # sweep, vibrato) is no onset. Below the level floor it is silence: no flux at all.
        bands = np.sqrt(self._flux_bands @ (mag * self._mag_scale) ** 2)
        scale = LOG_COMPRESSION / rms_ref
        now_log, prev_log = np.log1p(scale * bands), np.log1p(scale * self._prev_bands)
        widened = np.maximum(prev_log, np.maximum(np.roll(prev_log, 1), np.roll(prev_log, -1)))
        flux = float(np.mean(np.maximum(now_log - widened, 0.0))) if raw[0] >= LEVEL_FLOOR else 0.0
        self._prev_bands = bands
        self._flux.append(flux / self._flux_peak.update(flux, self._agc_decay))
        self._frames += 1
        if len(self._flux) == self._flux.maxlen:
            values = np.fromiter(self._flux, float, len(self._flux))
            # the tempo reads the flux above its recent mean: what stands out, not the hum
            self._novelty.append(max(0.0, values[-1] - float(values[-1 - ONSET_AVERAGE : -1].mean())))
            onset_time = self._pick_onset(values, now, s.onset_sensitivity)
            if onset_time is not None:
                self._last_onset = onset_time
                self._onsets += 1
                events.append(Event("onset", onset_time))

        # 4. tempo: refresh the estimate and the beat grid now and then; fire due beats.
        # Through a break the beats keep coming at the last tempo (visuals stay on the
        # grid); after a whole tempo window with no onset at all, they stop.
        if now - self._last_onset > TEMPO_WINDOW_S:
            self._next_beat = None
        elif self._frames % self._update_every == 0:
            self._estimate_tempo(now)
        if self._next_beat is not None and now >= self._next_beat:
            self._last_beat = self._next_beat
            self._next_beat += 60.0 / self.bpm
            self._beats += 1
            events.append(Event("beat", self._last_beat))

        decay_s = max(s.pulse_decay_ms, 1.0) / 1000.0
        period = 60.0 / self.bpm if self.bpm else 0.0
        self.features = AudioFeatures(
            time=now,
            rms=float(self._levels[0]),
            bass=float(self._levels[1]),
            mid=float(self._levels[2]),
            high=float(self._levels[3]),
            bands=tuple(float(v) for v in self._levels[4:]),
            onset=math.exp(-(now - self._last_onset) / decay_s),
            beat=math.exp(-(now - self._last_beat) / decay_s),
            bpm=self.bpm,
            beat_phase=min(1.0, (now - self._last_beat) / period) if period and self._beats else 0.0,
            onsets=self._onsets,
            beats=self._beats,
        )
        return events

    def _pick_onset(self, values: np.ndarray, now: float, sensitivity: float) -> float | None:
        """Peak picking on the normalised flux ``values``, ``ONSET_LOOKAHEAD`` frames back.

        A candidate is an onset when it is the largest value since a few frames before it
        and stands out from the mean of the ~100 ms before it: both a multiple of that
        mean (steady noise fluctuates in proportion to its mean) and a margin above it
        (for near-silence). The sensitivity sets both; the threshold adapts to busy and
        sparse passages alike.
        """
        c = len(values) - 1 - ONSET_LOOKAHEAD
        candidate = values[c]
        local_mean = float(values[c - ONSET_AVERAGE - ONSET_PRE_MAX : c - ONSET_PRE_MAX].mean())
        ratio = 1.0 + 3.0 * (1.0 - sensitivity)  # 4 at 0, 2.5 at 0.5, 1 at 1
        delta = 0.2 * 0.05**sensitivity  # 0.2 at 0, 0.045 at 0.5, 0.01 at 1
        frame = self._frames - 1 - ONSET_LOOKAHEAD
        if (
            candidate >= values[c - ONSET_PRE_MAX :].max()
            and candidate >= local_mean * ratio + delta
            and frame - self._last_onset_frame >= ONSET_WAIT
        ):
            self._last_onset_frame = frame
            # the flux of a frame peaks when an onset enters its newest hop: date it there
            return now - (ONSET_LOOKAHEAD + 1) * self.hop_s
        return None

    def _estimate_tempo(self, now: float) -> None:
        """BPM by autocorrelation of the onset envelope, beat phase by its Fourier phase.

        The ACF is read at 1..4 periods of every candidate on a fine BPM grid (a comb), so
        the far lags pin the period to a fraction of a hop; a log-normal prior around 120
        BPM settles octave doubt between two candidates that both fit.
        """
        novelty = np.fromiter(self._novelty, float, len(self._novelty))
        if len(novelty) * self.hop_s < TEMPO_MIN_S or not novelty.any():
            return
        centred = novelty - novelty.mean()
        n = len(centred)
        spectrum = np.fft.rfft(centred, 2 * n)
        acf = np.fft.irfft(np.abs(spectrum) ** 2)[:n]
        if acf[0] <= 0:
            return
        acf /= acf[0]
        fps = 1.0 / self.hop_s
        bpms = np.arange(BPM_RANGE[0], BPM_RANGE[1] + BPM_STEP / 2, BPM_STEP)
        periods = 60.0 * fps / bpms
        lags = periods[:, None] * np.arange(1, TEMPO_COMB + 1)[None, :]
        comb = np.where(lags < n - 1, np.interp(lags, np.arange(n), acf), 0.0).mean(axis=1)
        prior = np.exp(-0.5 * (np.log2(bpms / 120.0) / TEMPO_PRIOR_OCTAVES) ** 2)
        best = int(np.argmax(comb * prior))
        if comb[best] < TEMPO_CONFIDENCE:
            return
        self._estimates.append(round(float(bpms[best]), 2))
        self.bpm = float(np.median(self._estimates))

        # the beat grid: the phase of the envelope at the beat frequency, recent frames first
        period = 60.0 / self.bpm
        times = now - self.hop_s - self.hop_s * np.arange(n)[::-1]  # dated as onsets are
        weights = novelty * np.exp(-(now - times) / PHASE_MEMORY_S)
        phasor = np.sum(weights * np.exp(2j * np.pi * times / period))
        if abs(phasor) == 0:
            return
        first = (np.angle(phasor) / (2 * np.pi)) * period
        # the grid's next beat after the last one fired (not after now: one may be due)
        after = max(self._last_beat + 0.5 * period, now - self.hop_s)
        self._next_beat = first + math.ceil((after - first) / period) * period


def _bins(freqs: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Indices of the bins in [lo, hi); the nearest bin when the band is narrower than one."""
    inside = np.flatnonzero((freqs >= lo) & (freqs < hi))
    if inside.size:
        return inside
    return np.array([int(np.argmin(np.abs(freqs - math.sqrt(lo * hi))))])


def _smoothing(ms: float, hop_s: float) -> float:
    """The fraction of the way an envelope moves in one hop for a time constant in ms."""
    if ms <= 0:
        return 1.0
    return 1.0 - math.exp(-hop_s / (ms / 1000.0))


# -- files -------------------------------------------------------------------------------------


class WavError(ValueError):
    """A file that is not a WAV this reader understands; the message says why."""


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a WAV file (PCM 8/16/24/32-bit or float 32/64) as mono float32 and its rate.

    A small RIFF reader rather than ``wave`` because ``wave`` refuses float WAVs, which
    audio tools write by default; scipy would do, but it is not worth a dependency.
    """
    data = Path(path).read_bytes()
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise WavError(f"{path}: not a WAV file (no RIFF/WAVE header)")
    fmt: tuple[int, int, int, int] | None = None
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = data[pos + 8 : pos + 8 + size]
        if chunk == b"fmt ":
            if len(body) < 16:
                raise WavError(f"{path}: fmt chunk too short")
            tag, channels, rate = struct.unpack("<HHI", body[:8])
            bits = struct.unpack("<H", body[14:16])[0]
            if tag == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real tag leads the GUID
                tag = struct.unpack("<H", body[24:26])[0]
            fmt = (tag, channels, rate, bits)
        elif chunk == b"data":
            if fmt is None:
                raise WavError(f"{path}: data before the fmt chunk")
            return _decode(path, body, *fmt), fmt[2]
        pos += 8 + size + (size & 1)  # chunks are word-aligned
    raise WavError(f"{path}: no audio data in the file")


def _decode(path: str | Path, body: bytes, tag: int, channels: int, rate: int, bits: int) -> np.ndarray:
    if channels < 1 or rate <= 0:
        raise WavError(f"{path}: {channels} channels at {rate} Hz")
    width = bits // 8
    usable = len(body) - len(body) % (width * channels)
    raw = np.frombuffer(body[:usable], np.uint8)
    if tag == 1 and bits == 8:
        samples = (raw.astype(np.float32) - 128.0) / 128.0
    elif tag == 1 and bits in (16, 32):
        samples = raw.view(f"<i{width}").astype(np.float32) / float(2 ** (bits - 1))
    elif tag == 1 and bits == 24:
        triples = raw.reshape(-1, 3).astype(np.int32)
        ints = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
        samples = ints.astype(np.float32) / float(1 << 23)
    elif tag == 3 and bits in (32, 64):
        samples = raw.view(f"<f{width}").astype(np.float32)
    else:
        raise WavError(
            f"{path}: unsupported WAV encoding (format {tag}, {bits} bits); use PCM 8/16/24/32-bit or float 32/64"
        )
    return samples.reshape(-1, channels).mean(axis=1)


def analyse_wav(path: str | Path, settings: AnalysisSettings | None = None) -> tuple[list[float], float | None]:
    """Run the live analysis over a whole WAV file, as fast as it goes.

    Returns the onset times in seconds and the BPM the analysis holds at the end of the
    file (None when it found no steady pulse). The same ``Analyser`` runs live.
    """
    samples, rate = read_wav(path)
    analyser = Analyser(rate, settings)
    onsets: list[float] = []
    for start in range(0, len(samples), HOP * 64):
        onsets += [e.time for e in analyser.process(samples[start : start + HOP * 64]) if e.kind == "onset"]
    return onsets, analyser.bpm or None


# -- the control -------------------------------------------------------------------------------


@dataclass
class _Feed:
    """Where the analysis thread gets its audio: a playing WAV or a device's callback queue."""

    rate: int
    label: str
    samples: np.ndarray | None = None  # a file, looped
    blocks: queue.SimpleQueue[np.ndarray] = field(default_factory=queue.SimpleQueue)  # a device
    stream: Any = None  # the sounddevice InputStream


class AudioInput:
    """The audio Control: ``AudioInput("file:set.wav", params)`` or a device index / name part.

    ``None`` or ``""`` is the system's default input. The spec is checked and the device
    or file opened in ``start``; a failure there is reported (``status``, ``error``, one
    log line) and the show goes on with silent features.
    """

    name = "audio"

    def __init__(self, spec: str | int | None, params: ParamRegistry) -> None:
        self.spec = "" if spec is None else str(spec).strip()
        self.params = params
        params.declare_all(AUDIO_PARAMS)
        self.error: str | None = None
        self._settings = AnalysisSettings()
        self._features = SILENCE
        self._fed_at = 0.0  # time.monotonic() of the newest analysed block
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._feed: _Feed | None = None

    # -- the Control protocol -----------------------------------------------------------
    @property
    def status(self) -> str:
        if self.error:
            return f"audio unavailable: {self.error}"
        if self._feed is None:
            return "audio off"
        f = self.features()
        if f is SILENCE and self._fed_at:
            return f"audio {self._feed.label}: no sound for {time.monotonic() - self._fed_at:.0f} s"
        tempo = f"{f.bpm:.1f} BPM" if f.bpm else "BPM not yet known"
        return f"audio {self._feed.label} {self._feed.rate} Hz, {tempo}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            return
        self.error = None
        try:
            self._feed = self._open_file() if self.spec.startswith("file:") else self._open_device()
        except (OSError, ValueError) as exc:
            self._feed = None
            self.error = str(exc)
            log.error("audio unavailable: %s (the show goes on without audio)", exc)
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(self._feed,), name="audio analysis", daemon=True)
        self._thread.start()
        log.info("audio: %s", self._feed.label)

    def stop(self) -> None:
        self._stop.set()
        feed = self._feed
        if feed is not None and feed.stream is not None:
            feed.stream.close()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        with self._lock:
            self._features = SILENCE

    def frame(self, now: float) -> None:
        """Render thread: hand the analysis thread the knobs as of this frame boundary."""
        get = self.params.get
        self._settings = AnalysisSettings(
            gain=get("/audio/gain"),
            attack_ms=get("/audio/attack"),
            release_ms=get("/audio/release"),
            onset_sensitivity=get("/audio/onset_sensitivity"),
            pulse_decay_ms=get("/audio/pulse_decay"),
        )

    def features(self) -> AudioFeatures:
        """The newest snapshot (any thread, never waits); silence when nothing plays."""
        with self._lock:
            if not self._fed_at or time.monotonic() - self._fed_at > STALE_S:
                return SILENCE
            return self._features

    # -- opening ----------------------------------------------------------------------------
    def _open_file(self) -> _Feed:
        path = Path(self.spec[len("file:") :]).expanduser()
        samples, rate = read_wav(path)  # OSError or WavError (a ValueError): reported by start
        if samples.size < HOP:
            raise WavError(f"{path}: too short to analyse")
        return _Feed(rate, f"file:{path.name}", samples=samples)

    def _open_device(self) -> _Feed:
        try:
            import sounddevice as sd  # lazily: PortAudio is only needed for live input
        except (ImportError, OSError) as exc:
            raise OSError(f"live audio input needs sounddevice and PortAudio ({exc})") from None
        device: int | str | None = int(self.spec) if self.spec.isdigit() else (self.spec or None)
        try:
            if not any(d["max_input_channels"] > 0 for d in sd.query_devices()):
                raise OSError("no audio input device found (no sound card?)")
            info = sd.query_devices(device, kind="input")
            channels = max(1, min(2, int(info["max_input_channels"])))
            feed = _Feed(int(info["default_samplerate"]), f"input {info['name']!r}")
            feed.stream = sd.InputStream(
                device=device,
                channels=channels,
                samplerate=feed.rate,
                blocksize=HOP,
                dtype="float32",
                callback=lambda data, frames, when, flags: feed.blocks.put(data.mean(axis=1).copy()),
            )
            feed.stream.start()
        except sd.PortAudioError as exc:
            raise OSError(f"audio input {self.spec or 'default'} cannot open: {exc}") from None
        return feed

    # -- the analysis thread ---------------------------------------------------------------------
    def _run(self, feed: _Feed) -> None:
        analyser = Analyser(feed.rate, self._settings)
        for block in self._blocks(feed):
            analyser.settings = self._settings
            analyser.process(block)
            with self._lock:
                self._features = analyser.features
                self._fed_at = time.monotonic()

    def _blocks(self, feed: _Feed):
        """Yield audio as it would arrive live: a file at its own pace, a device as it sends."""
        if feed.samples is not None:
            pacer = Pacer(feed.rate / HOP, self._stop)
            samples, pos = feed.samples, 0
            while pacer.wait():
                block = samples[pos : pos + HOP]
                if block.size < HOP:  # loop: the end of the file runs into its start
                    block = np.concatenate([block, samples[: HOP - block.size]])
                pos = (pos + HOP) % samples.size
                yield block
            return
        while not self._stop.is_set():
            try:
                yield feed.blocks.get(timeout=0.25)
            except queue.Empty:
                continue
