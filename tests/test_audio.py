"""Audio analysis on synthesised WAV files whose tempo and onsets are known exactly.

Drum sounds are numpy-made (a kick is a falling sine sweep, a hat and a snare are noise
bursts) over a noise floor, so every test knows where each hit is to the sample.
"""

from __future__ import annotations

import logging
import struct
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from engine.control.audio import (
    BANDS,
    HOP,
    SILENCE,
    Analyser,
    AnalysisSettings,
    AudioInput,
    WavError,
    analyse_wav,
    read_wav,
)
from engine.params import ParamRegistry

RATE = 44100
TOLERANCE_S = 0.030


# -- synthesis ----------------------------------------------------------------------------------


def kick(rate: int = RATE) -> np.ndarray:
    t = np.arange(int(rate * 0.25)) / rate
    freq = 50 + 100 * np.exp(-t / 0.03)
    return np.sin(2 * np.pi * np.cumsum(freq) / rate) * np.exp(-t / 0.08)


def hat(rng: np.random.Generator, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(rate * 0.05)) / rate
    return 0.3 * np.diff(rng.standard_normal(t.size), prepend=0.0) * np.exp(-t / 0.012)


def snare(rng: np.random.Generator, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(rate * 0.2)) / rate
    return (0.5 * rng.standard_normal(t.size) + 0.4 * np.sin(2 * np.pi * 190 * t)) * np.exp(-t / 0.05)


def place(out: np.ndarray, sound: np.ndarray, at: float, gain: float, rate: int = RATE) -> None:
    i = int(round(at * rate))
    n = min(sound.size, out.size - i)
    out[i : i + n] += gain * sound[:n]


def drum_track(bpm: float, seconds: float = 16.0, seed: int = 0, rate: int = RATE) -> tuple[np.ndarray, list[float]]:
    """Kick on every beat, snare on 2 and 4, hat on every off-beat, noise at -40 dB."""
    rng = np.random.default_rng(seed)
    out = np.zeros(int(rate * seconds))
    period, onsets = 60.0 / bpm, []
    for i, at in enumerate(np.arange(0.25, seconds - 0.3, period)):
        place(out, kick(rate), at, 0.8, rate)
        if i % 2:
            place(out, snare(rng, rate), at, 0.5, rate)
        place(out, hat(rng, rate), at + period / 2, 1.0, rate)
        onsets += [at, at + period / 2]
    out += 0.01 * rng.standard_normal(out.size)
    return out, sorted(t for t in onsets if t < seconds - 0.1)


def irregular_track(seconds: float = 12.0, seed: int = 1) -> tuple[np.ndarray, list[float]]:
    """Kicks, snares and hats at random gaps (150-700 ms) and random levels: no tempo."""
    rng = np.random.default_rng(seed)
    out = np.zeros(int(RATE * seconds))
    sounds = [kick(), snare(rng), hat(rng)]
    onsets, at = [], 0.3
    while at < seconds - 0.3:
        place(out, sounds[rng.integers(3)], at, rng.uniform(0.3, 1.0))
        onsets.append(at)
        at += rng.uniform(0.15, 0.7)
    out += 0.01 * rng.standard_normal(out.size)
    return out, onsets


def sine(freq: float, seconds: float, amplitude: float = 0.5, rate: int = RATE) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE) -> Path:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def match(found: list[float], truth: list[float], tolerance: float = TOLERANCE_S) -> tuple[float, float]:
    """(recall, precision) of detected onset times against the true ones."""
    found_a, truth_a = np.asarray(found), np.asarray(truth)
    if not found_a.size:
        return 0.0, 0.0
    recall = np.mean([np.abs(found_a - t).min() <= tolerance for t in truth_a])
    precision = np.mean([np.abs(truth_a - f).min() <= tolerance for f in found_a])
    return float(recall), float(precision)


def run(analyser: Analyser, samples: np.ndarray, block: int = HOP) -> list:
    """Feed ``samples`` block by block; return the features after each block and all events."""
    trace = []
    for start in range(0, samples.size - block + 1, block):
        events = analyser.process(samples[start : start + block])
        trace.append((analyser.time, analyser.features, events))
    return trace


# -- tempo and onsets -----------------------------------------------------------------------------


@pytest.mark.parametrize("bpm", [100, 120, 128])
def test_bpm_and_onsets_of_drum_tracks(tmp_path: Path, bpm: int) -> None:
    samples, truth = drum_track(bpm)
    onsets, found_bpm = analyse_wav(write_wav(tmp_path / f"{bpm}.wav", samples))
    assert found_bpm is not None and abs(found_bpm - bpm) <= 1.0, found_bpm
    recall, precision = match(onsets, truth)
    assert recall >= 0.9 and precision >= 0.9, (recall, precision)


def test_bpm_at_48k_and_from_a_kick_only_track(tmp_path: Path) -> None:
    samples, _ = drum_track(128, rate=48000)
    assert abs(analyse_wav(write_wav(tmp_path / "48k.wav", samples, 48000))[1] - 128) <= 1.0
    # kicks alone, with a louder kick every other beat: still 128, not the half-time 64
    rng = np.random.default_rng(3)
    track = np.zeros(RATE * 12)
    for i, at in enumerate(np.arange(0.25, 11.7, 60 / 128)):
        place(track, kick(), at, 0.9 if i % 2 else 0.5)
    track += 0.01 * rng.standard_normal(track.size)
    assert abs(analyse_wav(write_wav(tmp_path / "kicks.wav", track))[1] - 128) <= 1.0


def test_irregular_onsets_are_found_and_give_no_tempo(tmp_path: Path) -> None:
    samples, truth = irregular_track()
    onsets, bpm = analyse_wav(write_wav(tmp_path / "irregular.wav", samples))
    recall, precision = match(onsets, truth)
    assert recall >= 0.9 and precision >= 0.9, (recall, precision, len(onsets), len(truth))
    assert bpm is None, "random gaps have no steady pulse"


def test_quiet_input_gives_the_same_onsets_as_loud(tmp_path: Path) -> None:
    samples, truth = irregular_track(seed=5)
    loud, _ = analyse_wav(write_wav(tmp_path / "loud.wav", samples))
    quiet, _ = analyse_wav(write_wav(tmp_path / "quiet.wav", samples * 0.05))  # -26 dB
    assert match(quiet, truth) >= (0.9, 0.9)
    assert match(quiet, loud, tolerance=HOP / RATE + 0.001) == (1.0, 1.0), "the same onsets, to a hop"


def test_sensitivity_trades_soft_onsets_for_noise() -> None:
    samples, truth = irregular_track(seed=2)
    counts = []
    for sensitivity in (0.0, 0.5, 1.0):
        analyser = Analyser(RATE, AnalysisSettings(onset_sensitivity=sensitivity))
        counts.append(sum(e.kind == "onset" for _, _, events in run(analyser, samples) for e in events))
    assert counts[0] < counts[1] <= counts[2], counts
    assert counts[1] >= 0.9 * len(truth)


def test_beats_land_on_the_kicks_and_pulse() -> None:
    bpm = 120
    samples, _ = drum_track(bpm)
    trace = run(Analyser(RATE), samples)
    beats = [e.time for _, _, events in trace for e in events if e.kind == "beat"]
    kicks = 0.25 + np.arange(40) * 60 / bpm
    settled = [b for b in beats if b > 5.0]
    assert len(settled) >= 20
    assert max(np.abs(kicks - b).min() for b in settled) <= TOLERANCE_S
    assert np.allclose(np.diff(settled), 60 / bpm, atol=0.02), "one beat per kick, none doubled or skipped"
    # the features: a pulse right after each beat, the phase wrapping once per beat
    last = trace[-1][1]
    assert last.bpm == pytest.approx(bpm, abs=1.0) and last.beats == len(beats) and last.onsets > 50
    after_beat = [f for t, f, events in trace if any(e.kind == "beat" for e in events) and t > 5.0]
    assert all(f.beat > 0.8 and f.beat_phase < 0.1 for f in after_beat)


def test_silence_reads_zero_and_beats_stop() -> None:
    samples, _ = drum_track(120, seconds=6.0)
    analyser = Analyser(RATE)
    run(analyser, samples)
    assert analyser.features.bpm
    trace = run(analyser, np.zeros(RATE * 10))
    quiet = trace[-1][1]
    assert quiet.rms < 1e-3 and quiet.bass < 1e-3 and max(quiet.bands) < 1e-3 and quiet.onset < 1e-3
    late_events = [e for t, _, events in trace if t > analyser.time - 1.0 for e in events]
    assert not late_events, "ten seconds of silence: no onsets, and the beat has stopped"
    assert quiet.bpm == pytest.approx(120, abs=1), "the last tempo is remembered"


# -- levels and bands ----------------------------------------------------------------------------


def test_bands_follow_a_low_and_a_high_sine() -> None:
    analyser = Analyser(RATE)
    low = run(analyser, sine(60, 1.0))[-1][1]
    high = run(analyser, sine(6000, 1.0))[-1][1]
    assert len(low.bands) == BANDS and low.rms > 0.9 and high.rms > 0.9
    # 60 Hz lies between the first two FFT bins (43 and 86 Hz), so the window spreads it over
    # the two lowest bands; its leakage fades fast above them (the mid sees ~-50 dB of it)
    assert low.bass > 0.9 and low.mid < 0.2 and low.high < 0.01
    assert min(low.bands[:2]) > 0.9 and max(low.bands[4:]) < 0.01
    assert list(low.bands[1:]) == sorted(low.bands[1:], reverse=True)
    # log-spaced over 40 Hz..16 kHz: 6 kHz is in the next-to-last of 8 bands
    assert high.high > 0.9 and high.bass < 0.05 and high.mid < 0.05
    assert int(np.argmax(high.bands)) == BANDS - 2 and high.bands[BANDS - 2] > 0.9
    assert max(b for i, b in enumerate(high.bands) if i != BANDS - 2) < 0.05


def level_trace(settings: AnalysisSettings) -> list[tuple[float, float]]:
    """(time, rms) through 0.5 s of silence, 1 s of tone, 1.5 s of silence."""
    signal = np.concatenate([np.zeros(RATE // 2), sine(440, 1.0), np.zeros(RATE * 3 // 2)])
    return [(t, f.rms) for t, f, _ in run(Analyser(RATE, settings), signal)]


def rms_at(trace: list[tuple[float, float]], at: float) -> float:
    return min(trace, key=lambda row: abs(row[0] - at))[1]


def test_rms_envelope_attack_and_release() -> None:
    fast = level_trace(AnalysisSettings(attack_ms=10, release_ms=300))
    assert rms_at(fast, 0.45) == 0.0
    assert rms_at(fast, 0.56) > 0.9, "a 10 ms attack is there within 60 ms"
    assert rms_at(fast, 1.45) > 0.99
    # 300 ms release: about 1/e of the level 300 ms after the tone stops, nearly gone at 1.2 s
    assert 0.25 < rms_at(fast, 1.8) < 0.5
    assert rms_at(fast, 2.7) < 0.05
    values = [v for _, v in fast]
    assert all(0.0 <= v <= 1.0 for v in values)

    slow = level_trace(AnalysisSettings(attack_ms=300, release_ms=50))
    assert 0.2 < rms_at(slow, 0.6) < 0.5, "a 300 ms attack is still rising 100 ms in"
    assert rms_at(slow, 1.45) > 0.9
    assert rms_at(slow, 1.7) < 0.05, "a 50 ms release is over 200 ms after the tone"

    trimmed = level_trace(AnalysisSettings(gain=0.5))
    assert rms_at(trimmed, 1.45) == pytest.approx(0.5, abs=0.02), "the gain trims after the automatic gain"


# -- WAV files -------------------------------------------------------------------------------------


def write_raw_wav(path: Path, data: bytes, tag: int, channels: int, bits: int, rate: int = RATE) -> Path:
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def test_wav_reader_formats(tmp_path: Path) -> None:
    stereo = np.stack([np.linspace(-0.5, 0.5, 100), np.full(100, 0.25)], axis=1)
    expected = stereo.mean(axis=1)
    as_float = write_raw_wav(tmp_path / "f32.wav", stereo.astype("<f4").tobytes(), 3, 2, 32)
    ints = np.round(stereo * (2**23 - 1)).astype("<i4")
    packed = b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints.reshape(-1))
    as_24 = write_raw_wav(tmp_path / "i24.wav", packed, 1, 2, 24, rate=48000)
    for path, rate in ((as_float, RATE), (as_24, 48000)):
        samples, got_rate = read_wav(path)
        assert got_rate == rate and samples.dtype == np.float32
        np.testing.assert_allclose(samples, expected, atol=1e-6)
    samples, _ = read_wav(write_wav(tmp_path / "i16.wav", expected))
    np.testing.assert_allclose(samples, expected, atol=1e-4)

    (tmp_path / "song.mp3").write_bytes(b"ID3\x03" + bytes(100))
    with pytest.raises(WavError, match="not a WAV file"):
        read_wav(tmp_path / "song.mp3")
    with pytest.raises(WavError, match="unsupported WAV encoding"):
        read_wav(write_raw_wav(tmp_path / "alaw.wav", bytes(100), 6, 1, 8))


# -- the control -------------------------------------------------------------------------------------


def wait_for(condition, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.01)


def test_audio_input_plays_a_file_in_real_time_and_follows_its_params(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "tone.wav", np.concatenate([sine(60, 0.5), sine(6000, 0.5)]))
    params = ParamRegistry()
    audio = AudioInput(f"file:{path}", params)
    assert audio.status == "audio off" and audio.features() is SILENCE
    audio.start()
    try:
        assert audio.error is None and audio.running
        wait_for(lambda: audio.features().bass > 0.9, "the bass of the first half")
        wait_for(lambda: audio.features().high > 0.9, "the highs of the second half")
        wait_for(lambda: audio.features().bass > 0.9, "the bass again: the file loops")
        assert audio.status.startswith("audio file:tone.wav 44100 Hz")
        start = audio.features().time
        time.sleep(0.3)
        assert audio.features().time - start > 0.1, "the file plays on"

        params.set("/audio/gain", 0.5)  # lands at the frame boundary, then reaches the thread
        params.apply_pending(0.0)
        audio.frame(0.0)
        wait_for(lambda: 0.4 < audio.features().bass < 0.55, "the bass trimmed by /audio/gain")
    finally:
        audio.stop()
    assert not audio.running and audio.features() is SILENCE


@pytest.mark.parametrize("spec", ["file:/no/such/file.wav", "no-such-device-anywhere"])
def test_missing_file_or_device_is_one_message_and_silence(spec: str, caplog) -> None:
    audio = AudioInput(spec, ParamRegistry())
    with caplog.at_level(logging.ERROR, logger="engine.control.audio"):
        audio.start()  # must not raise: the show goes on without audio
    assert audio.error and not audio.running
    assert audio.status == f"audio unavailable: {audio.error}"
    assert len(caplog.records) == 1 and "the show goes on without audio" in caplog.records[0].getMessage()
    assert audio.features() is SILENCE
    audio.frame(0.0)
    audio.stop()


def test_default_input_without_a_sound_card_is_reported() -> None:
    sd = pytest.importorskip("sounddevice", exc_type=OSError)
    if any(d["max_input_channels"] > 0 for d in sd.query_devices()):
        pytest.skip("this machine has an audio input; the no-sound-card path needs none")
    audio = AudioInput(None, ParamRegistry())
    audio.start()
    assert audio.error == "no audio input device found (no sound card?)"
    assert audio.features() is SILENCE
