"""The modulation matrix: routes are parameters, offsets ride on top of values, presets
keep routes but never modulated values, and audio drives a layer in a headless show."""

from __future__ import annotations

import logging
import shutil
import time
import tomllib
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from engine.catalog import build_registry
from engine.clock import ManualClock
from engine.control.audio import AudioInput
from engine.control.modulation import MOD_SLOTS, MOD_SOURCES, ModulationMatrix, build_sources
from engine.control.tempo import Tempo
from engine.params import ParamRegistry
from engine.presets import load_preset, recall_values, save_preset

ROOT = Path(__file__).resolve().parents[1]


def frame(params: ParamRegistry, controls: list, now: float, dt: float = 1 / 60) -> None:
    """App.step's order: land changes, then each control's frame."""
    params.apply_pending(dt)
    for control in controls:
        control.frame(now)


def settle(params: ParamRegistry) -> None:
    """Land queued values and finish every glide (smoothed params), before any modulation."""
    params.apply_pending(100.0)


def route(params: ParamRegistry, slot: int, source: str, target: str, amount: float) -> None:
    params.set_many({f"/mod/{slot}/source": source, f"/mod/{slot}/target": target, f"/mod/{slot}/amount": amount})


@pytest.fixture
def rig() -> tuple[ParamRegistry, Tempo, ModulationMatrix]:
    params = build_registry()
    tempo = Tempo(params)
    return params, tempo, ModulationMatrix(params, build_sources(tempo=tempo))


def test_an_lfo_moves_the_effective_value_not_the_set_one(rig) -> None:
    params, tempo, matrix = rig
    params.set_many({"/lfo/1/shape": "saw", "/lfo/1/rate": 1.0, "/tempo/bpm": 60.0, "/fx/grade/hue": 10.0})
    route(params, 1, "lfo/1", "/fx/grade/hue", 0.5)
    settle(params)
    frame(params, [tempo, matrix], 0.0)
    assert params.get("/fx/grade/hue") == 10.0  # saw at phase 0
    frame(params, [tempo, matrix], 0.25)  # a quarter beat at 60 BPM: saw 0.25
    # 0.5 of the range (360 degrees) times 0.25, on top of the 10 degrees that were set
    assert params.get("/fx/grade/hue") == pytest.approx(10.0 + 0.5 * 360 * 0.25)
    assert params.target("/fx/grade/hue") == 10.0
    assert params.modulation("/fx/grade/hue") == pytest.approx(0.125)
    assert matrix.routes == 1 and matrix.status == "modulation: 1 route"

    params.set("/mod/1/amount", -1.0)  # a negative amount pulls down, clamped to the range
    frame(params, [tempo, matrix], 0.75)
    assert params.get("/fx/grade/hue") == pytest.approx(-180.0)
    params.set("/mod/1/source", "none")
    frame(params, [tempo, matrix], 0.8)
    assert params.get("/fx/grade/hue") == 10.0 and params.modulation("/fx/grade/hue") == 0.0


def test_routes_to_one_target_add_up_and_ints_round(rig) -> None:
    params, tempo, matrix = rig
    params.set_many(
        {
            "/lfo/1/shape": "square",
            "/lfo/2/shape": "square",
            "/lfo/2/phase": 0.5,
            "/layer/scene/opacity": 0.2,
            "/fx/kaleido/segments": 1,
        }
    )
    route(params, 1, "lfo/1", "/layer/scene/opacity", 0.3)  # square: 1 in the first half-cycle
    route(params, 2, "lfo/2", "/layer/scene/opacity", 0.5)  # half a cycle later: 0 then
    route(params, 3, "lfo/1", "/layer/scene/opacity", 0.1)
    route(params, 4, "tempo/phase", "/fx/kaleido/segments", 1.0)
    settle(params)
    frame(params, [tempo, matrix], 0.0)
    assert params.get("/layer/scene/opacity") == pytest.approx(0.2 + 0.3 + 0.1)
    frame(params, [tempo, matrix], 0.375)  # 120 BPM: 0.75 beat, the squares have swapped
    assert params.get("/layer/scene/opacity") == pytest.approx(0.2 + 0.5)
    assert params.get("/fx/kaleido/segments") == 1 + round(0.75 * 31)
    assert matrix.routes == 4


def test_presets_keep_routes_but_never_modulated_values(rig, tmp_path: Path) -> None:
    params, tempo, matrix = rig
    params.set_many({"/lfo/1/shape": "square", "/fx/grade/hue": 10.0})
    route(params, 2, "lfo/1", "/fx/grade/hue", 0.25)
    settle(params)
    frame(params, [tempo, matrix], 0.0)
    assert params.get("/fx/grade/hue") == pytest.approx(100.0)

    path = save_preset(tmp_path / "routed.toml", params)
    saved = tomllib.loads(path.read_text(encoding="utf-8"))
    assert saved["fx"]["grade"]["hue"] == 10.0, "the preset holds the set value, not the modulated one"
    assert saved["mod"]["2"] == {"source": "lfo/1", "target": "/fx/grade/hue", "amount": 0.25}
    assert saved["lfo"]["1"]["shape"] == "square"

    fresh = build_registry()
    fresh_tempo = Tempo(fresh)
    fresh_matrix = ModulationMatrix(fresh, build_sources(tempo=fresh_tempo))
    fresh.set_many(recall_values(load_preset(path, fresh), fresh), origin="preset")
    settle(fresh)
    frame(fresh, [fresh_tempo, fresh_matrix], 0.0)
    assert fresh.target("/fx/grade/hue") == 10.0 and fresh.get("/fx/grade/hue") == pytest.approx(100.0)


def test_a_bad_target_is_reported_once_and_skipped(rig, caplog) -> None:
    params, tempo, matrix = rig
    params.set("/lfo/1/shape", "square")
    route(params, 1, "lfo/1", "/fx/grade/hew", 0.5)
    route(params, 2, "lfo/1", "/scene/active", 0.5)
    route(params, 3, "lfo/1", "/layer/scene/opacity", -0.5)
    settle(params)
    with caplog.at_level(logging.WARNING, logger="engine.control.modulation"):
        for i in range(5):
            frame(params, [tempo, matrix], i / 60)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "modulation route 1 skipped: /fx/grade/hew is not a parameter (did you mean /fx/grade/hue?)",
        "modulation route 2 skipped: /scene/active is not numeric (enum); only numbers can be modulated",
    ]
    assert matrix.status == (
        "modulation: 1 route; route 1 skipped: /fx/grade/hew is not a parameter "
        "(did you mean /fx/grade/hue?); route 2 skipped: /scene/active is not numeric "
        "(enum); only numbers can be modulated"
    )
    assert params.get("/layer/scene/opacity") == pytest.approx(0.5), "the good route plays on"

    params.set("/mod/1/target", " /fx/grade/hue ")  # fixed (spaces around a path are forgiven)
    params.set("/mod/2/source", "none")
    frame(params, [tempo, matrix], 0.1)
    assert matrix.problems == {} and matrix.status == "modulation: 2 routes"
    assert params.get("/fx/grade/hue") == pytest.approx(180.0)


def test_audio_sources_read_zero_when_audio_is_not_running() -> None:
    params = build_registry()
    audio = AudioInput("file:/no/such.wav", params)  # never started
    tempo = Tempo(params, audio=audio)
    sources = build_sources(audio, tempo)
    assert set(sources) == set(MOD_SOURCES) - {"none"}
    assert all(read() == 0.0 for name, read in sources.items() if name.startswith("audio/"))
    matrix = ModulationMatrix(params, sources)
    params.set("/layer/scene/opacity", 0.3)
    route(params, 1, "audio/bass", "/layer/scene/opacity", 1.0)
    settle(params)
    frame(params, [audio, tempo, matrix], 0.0)
    assert params.get("/layer/scene/opacity") == 0.3 and matrix.routes == 1
    with pytest.raises(ValueError, match="unknown modulation sources"):
        ModulationMatrix(params, {"audio/sub": lambda: 0.0})


def test_every_slot_is_a_parameter_with_every_source() -> None:
    params = build_registry()
    for n in range(1, MOD_SLOTS + 1):
        assert params.param(f"/mod/{n}/source").choices == MOD_SOURCES
        assert params.param(f"/mod/{n}/amount").min == -1.0
        assert params.get(f"/mod/{n}/target") == ""


# -- a headless show driven by a WAV file ----------------------------------------------------------

RATE = 44100


def write_bass_then_treble(path: Path) -> Path:
    """1 s of a 60 Hz tone, then 1 s of a 5 kHz tone, looped by the player."""
    t = np.arange(RATE) / RATE
    samples = np.concatenate([0.5 * np.sin(2 * np.pi * 60 * t), 0.5 * np.sin(2 * np.pi * 5000 * t)])
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(RATE)
        f.writeframes((samples * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Callable[..., object]]:
    from engine.app import App, AppConfig
    from engine.render.surface import HeadlessSurface

    presets = tmp_path / "presets"
    presets.mkdir()
    shutil.copy(ROOT / "presets" / "default.toml", presets / "default.toml")
    made = []

    def make() -> App:
        surface = HeadlessSurface()
        app = App(
            AppConfig(source="pattern", presets_dir=presets, output_size=(160, 90), hot_reload=False),
            surface,
            ManualClock(60.0),
        )
        made.append((app, surface))
        return app

    yield make
    for app, surface in made:
        app.close()
        surface.close()


def step_until(app, condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Step the app (manual clock) while the audio thread plays in real time."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s; opacity {app.params.get('/layer/scene/opacity')}")
        app.step()
        time.sleep(0.005)


def test_audio_bass_drives_a_layer_in_a_headless_show(make_app, tmp_path: Path) -> None:
    app = make_app()
    wav = write_bass_then_treble(tmp_path / "bass_treble.wav")
    audio = app.add_control(AudioInput(f"file:{wav}", app.params))
    tempo = app.add_control(Tempo(app.params, audio=audio))
    tempo.register_actions(app.actions)
    matrix = app.add_control(ModulationMatrix(app.params, build_sources(audio, tempo)))
    app.start()

    # a preset holds the route: audio/bass -> /layer/scene/opacity
    preset = tmp_path / "presets" / "pulse.toml"
    preset.write_text(
        "[layer.scene]\nopacity = 0.1\n\n"
        '[mod.1]\nsource = "audio/bass"\ntarget = "/layer/scene/opacity"\namount = 0.9\n',
        encoding="utf-8",
    )
    assert app.recall_preset_now("pulse")
    app.step()
    assert matrix.routes == 1 and app.params.target("/layer/scene/opacity") == 0.1

    for _ in range(2):  # the opacity follows the bass up and down as the file loops
        step_until(app, lambda: app.params.get("/layer/scene/opacity") > 0.85, "opacity up with the bass")
        step_until(app, lambda: app.params.get("/layer/scene/opacity") < 0.2, "opacity down with the treble")
    assert app.params.target("/layer/scene/opacity") == 0.1
    assert audio.status.startswith("audio file:bass_treble.wav 44100 Hz")
    assert not app.errors_now()

    for _ in range(2):  # the tap action reaches the tempo through the app: 20 frames apart, 180 BPM
        app.actions.post("tap", origin="key")
        for _ in range(20):
            app.step()
    assert app.params.get("/tempo/bpm") == pytest.approx(180.0)
