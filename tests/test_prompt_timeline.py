"""Prompt timelines without a model: the syntax, the files, where a timeline is at a time, and
how a scene's timeline follows its parameters, the clock and the tempo's beat.

The embeddings' blends (a tiny CLIP, a tiny diffusers text encoder) and the two scenes playing
a timeline are in test_prompt_timeline_scenes.py.
"""

from __future__ import annotations

import logging
import os

import pytest

from engine.control.tempo import Tempo, beat_clock
from engine.params import ParamRegistry
from engine.prompt_syntax import WeightedPrompt
from engine.prompt_timeline import (
    MAX_LINES,
    ScenePromptTimeline,
    Timeline,
    TimelineLine,
    parse_timeline,
    read_timeline_file,
    refuse_negative_weights,
    timeline_params,
    weighted_mix,
)

GROUP = "/scene/probe"


def line(text: str, duration: float) -> TimelineLine:
    return TimelineLine((WeightedPrompt(text, 1.0),), duration, text)


# -- the syntax --------------------------------------------------------------------------------------
def test_lines_take_the_weighted_prompt_syntax_and_a_duration_after_the_last_at() -> None:
    timeline = parse_timeline("a forest :1 | fog :0.5 @4; a city at night @ 8\n  the sea  ", default_duration=2.5)
    assert [ln.duration for ln in timeline.lines] == [4.0, 8.0, 2.5]
    assert timeline.lines[0].prompts == (WeightedPrompt("a forest", 1.0), WeightedPrompt("fog", 0.5))
    assert timeline.lines[1].prompts == (WeightedPrompt("a city at night", 1.0),)
    assert timeline.lines[2].prompts == (WeightedPrompt("the sea", 1.0),)
    assert timeline.length == 14.5 and timeline.starts == (0.0, 4.0, 12.0)
    assert timeline.texts() == ["a forest", "fog", "a city at night", "the sea"]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("a forest @soon", "duration 'soon' is not a number"),
        ("a forest @-1", "must be a positive number"),
        ("a forest @0", "must be a positive number"),
        ("a forest @inf", "must be a positive number"),
        ("@4", "no prompt before the duration"),
        ("a forest:lots @4", "prompt weight 'lots'"),
        ("   ;  # only a comment", "has no prompt lines"),
    ],
)
def test_a_bad_line_is_refused_with_its_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_timeline(text)


def test_a_bad_line_of_several_is_named_by_its_number() -> None:
    with pytest.raises(ValueError) as caught:
        parse_timeline("# my set\na forest @4\na city @ten\n", source="set.txt")
    message = str(caught.value)
    assert message.startswith("set.txt line 3 'a city @ten': duration 'ten' is not a number")
    assert "\n" not in message  # one line, for the log and the HUD
    with pytest.raises(ValueError, match=f"at most {MAX_LINES}"):
        parse_timeline("; ".join(f"look {i}" for i in range(MAX_LINES + 1)))


# -- where a timeline is ----------------------------------------------------------------------------
def test_each_line_holds_at_its_start_and_morphs_into_the_next_over_its_time() -> None:
    timeline = Timeline((line("a", 4.0), line("b", 8.0), line("c", 2.0)))
    assert timeline.at(0.0) == (0, 1, 0.0)
    assert timeline.at(2.0) == (0, 1, 0.5)
    assert timeline.at(4.0) == (1, 2, 0.0)  # lands on b exactly at its start
    assert timeline.at(10.0) == (1, 2, 0.75)
    a, b, blend = timeline.at(12.0 - 1e-9)
    assert (a, b) == (1, 2) and blend == pytest.approx(1.0)  # just before c: all but c
    assert timeline.at(12.0) == (2, 0, 0.0)
    assert timeline.at(13.0) == (2, 0, 0.5)  # the last line morphs back to the first
    assert timeline.at(14.0) == (0, 1, 0.0)  # looping
    assert timeline.at(14.0 * 3 + 2.0) == (0, 1, 0.5)
    assert timeline.at(-1.0) == (2, 0, 0.5)  # (a seek before the start wraps too)


def test_not_looping_holds_the_last_line_and_morph_holds_before_morphing() -> None:
    timeline = Timeline((line("a", 4.0), line("b", 4.0)))
    assert timeline.at(6.0, loop=False) == (1, 1, 0.0)
    assert timeline.at(100.0, loop=False) == (1, 1, 0.0)
    assert timeline.at(1.0, morph=0.5) == (0, 1, 0.0)  # the first half holds a
    assert timeline.at(3.0, morph=0.5) == (0, 1, 0.5)  # the second half morphs
    assert timeline.at(3.9, morph=0.0) == (0, 1, 0.0)  # morph 0: cuts
    assert Timeline((line("only", 3.0),)).at(1.0) == (0, 0, 0.0)


def test_the_blend_is_continuous_across_every_boundary() -> None:
    """Sampled densely over two loops: the mixed weights move by small steps only, and each
    line's start is exactly that line (what the realtime scene asks of its prompt bank)."""
    timeline = parse_timeline("a @3; b @1; c @2")
    step = 0.001
    previous = None
    for i in range(int(2 * timeline.length / step)):
        moment = timeline.moment(i * step)
        mix = dict.fromkeys("abc", 0.0)
        for text, weight in weighted_mix(
            timeline.lines[moment.a].prompts, timeline.lines[moment.b].prompts, moment.blend
        ):
            mix[text] += weight
        if previous is not None:
            assert max(abs(mix[k] - previous[k]) for k in mix) < 0.01, (i * step, mix, previous)
        previous = mix
    for start, name in zip(timeline.starts, "abc"):
        moment = timeline.moment(start)
        assert weighted_mix(timeline.lines[moment.a].prompts, timeline.lines[moment.b].prompts, moment.blend) == [
            (name, 1.0)
        ]


# -- files --------------------------------------------------------------------------------------------
def test_an_aphantasia_text_file_reads_as_it_is(tmp_path) -> None:
    """Aphantasia's files: one prompt per line, weights with ':' and '|', '#' comments, no
    durations (the video's length is shared out): here each line lasts the default length."""
    path = tmp_path / "mysong.txt"
    path.write_text(
        "\ufeff# verse\nlonely lighthouse :1 | storm :0.5\n\nships in the night\n"
        "# chorus, longer\ndawn over the sea @ 16\n",
        encoding="utf-8",
    )
    timeline = read_timeline_file(path, default_duration=6.0)
    assert [ln.duration for ln in timeline.lines] == [6.0, 6.0, 16.0]
    assert timeline.lines[0].prompts == (WeightedPrompt("lonely lighthouse", 1.0), WeightedPrompt("storm", 0.5))


def test_an_unreadable_file_is_one_clear_line(tmp_path) -> None:
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 @4\n".encode("latin-1"))
    (tmp_path / "huge.txt").write_bytes(b"a\n" * 600_000)
    (tmp_path / "bad.txt").write_text("a forest @4\na city @@\n")
    for name, reason in (
        ("missing.txt", "cannot read"),
        ("", "cannot read"),  # the folder itself
        ("latin1.txt", "is not UTF-8 text"),
        ("huge.txt", "not a timeline"),
        ("bad.txt", "bad.txt line 2 'a city @@': duration '' is not a number"),
    ):
        with pytest.raises(ValueError, match=reason) as caught:
            read_timeline_file(tmp_path / name)
        assert "\n" not in str(caught.value)


# -- a scene's timeline ------------------------------------------------------------------------------
@pytest.fixture
def params() -> ParamRegistry:
    registry = ParamRegistry()
    registry.declare_all(p.under(GROUP) for p in timeline_params())
    return registry


def make(params: ParamRegistry, **kwargs) -> ScenePromptTimeline:
    played = ScenePromptTimeline("probe", params, lambda name: f"{GROUP}/{name}", **kwargs)
    played.attach()
    return played


def land(params: ParamRegistry, **values) -> None:
    params.set_many({f"{GROUP}/timeline/{name}": value for name, value in values.items()})
    params.apply_pending(10.0)


def test_off_or_never_good_plays_the_prompt(params) -> None:
    played = make(params)
    land(params, prompts="a forest @4; a city @4")
    assert played.playing(0.0) is None  # not enabled
    land(params, enabled=True, prompts="")
    assert played.playing(1.0) is None and "empty" in played.refusal
    land(params, prompts="a forest @4; a city @4")
    assert played.playing(2.0).moment.a == 0 and played.refusal is None


def test_it_plays_in_seconds_at_its_speed_seeks_and_restarts(params) -> None:
    played = make(params)
    land(params, enabled=True, prompts="a forest @4; a city @4")
    assert played.playing(100.0).position == 0.0
    assert played.playing(101.0).moment.blend == pytest.approx(0.25)
    land(params, speed=2.0)
    now = played.playing(102.0)
    assert now.position == pytest.approx(3.0) and now.moment.blend == pytest.approx(0.75)
    land(params, speed=0.0)
    assert played.playing(150.0).position == pytest.approx(3.0)  # held still
    land(params, seek=0.75)
    now = played.playing(151.0)
    assert now.position == pytest.approx(6.0) and (now.moment.a, now.moment.b) == (1, 0)
    assert now.status == "timeline 2/2"
    land(params, restart=True)
    assert played.playing(152.0).position == 0.0


def test_synced_it_counts_the_tempos_beats(params) -> None:
    """A real Tempo publishes its beat on the frame; the timeline counts beats, whatever the seconds."""
    tempo = Tempo(params)  # internal source, 120 BPM
    played = make(params)
    land(params, enabled=True, sync=True, prompts="a forest @4; a city @4")
    tempo.frame(0.0)
    tempo.frame(1.25)  # 2.5 beats
    clock = beat_clock(params)
    assert clock.beat_at(-1.0) == pytest.approx(2.5)  # (a moment before the stamp: no extrapolation)
    start = played.playing(-1.0)
    assert start.position == pytest.approx(0.5)  # it starts on the beat's phase: lines turn on the beat
    tempo.frame(2.25)  # two more beats
    assert played.playing(-1.0).position == pytest.approx(2.5)
    params.set("/tempo/bpm", 60.0)
    params.apply_pending(0.0)
    tempo.frame(4.25)  # two seconds at 60 BPM: two beats
    now = played.playing(-1.0)
    assert now.position == pytest.approx(4.5) and now.moment.a == 1  # the next line, on its beat
    land(params, sync=False)  # seconds again, from where it is: one second after the last step
    assert played.playing(0.0).position == pytest.approx(5.5)


def test_synced_without_a_tempo_it_counts_120_bpm(params) -> None:
    played = make(params)
    land(params, enabled=True, sync=True, prompts="a forest @4; a city @4")
    played.playing(1000.0)
    assert played.playing(1001.0).position == pytest.approx(2.0)


def test_a_bad_timeline_is_said_once_and_the_last_good_one_plays_on(params, caplog) -> None:
    played = make(params, check=refuse_negative_weights)
    land(params, enabled=True, prompts="a forest @4; a city @4")
    good = played.playing(0.0).timeline
    with caplog.at_level(logging.WARNING, logger="engine.scenes.base"):
        for text in ("a forest @4; a city @soon", "a forest @4; a city:-1 @4"):
            land(params, prompts=text)
            for t in (1.0, 2.0, 3.0):
                assert played.playing(t).timeline is good
    # one line per bad text, not one per step (only this scene's: other tests' workers may still log)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("probe: timeline refused")]
    assert len(said) == 2, said
    assert "not a number" in said[0]
    assert "negative weight" in played.refusal
    land(params, enabled=False)
    assert played.playing(3.5) is None and played.refusal is None  # off: nothing to warn about
    land(params, enabled=True)
    land(params, prompts="the sea @2")
    assert played.playing(4.0).timeline.lines[0].text == "the sea @2" and played.refusal is None


def test_a_file_plays_is_read_again_when_saved_and_a_broken_one_keeps_the_last(params, tmp_path) -> None:
    path = tmp_path / "set.txt"
    path.write_text("a forest @4\na city @4\n")
    played = make(params)
    land(params, enabled=True, prompts="ignored @1", file=str(path))
    assert played.playing(0.0).timeline.texts() == ["a forest", "a city"]  # the file wins
    path.write_text("the sea @2\n")
    os.utime(path, ns=(1, 10**18))
    assert played.playing(0.5).timeline.texts() == ["a forest", "a city"]  # checked once a second
    assert played.playing(1.5).timeline.texts() == ["the sea"]
    path.write_text("the sea @2\nthe moon @never\n")
    os.utime(path, ns=(1, 2 * 10**18))
    assert played.playing(3.0).timeline.texts() == ["the sea"]
    assert "set.txt line 2" in played.refusal
    path.unlink()
    assert played.playing(5.0).timeline.texts() == ["the sea"]
    assert "cannot read" in played.refusal


# -- the parameters reach every view of the registry ------------------------------------------------
def test_the_timeline_parameters_reach_osc_oscquery_and_presets(tmp_path) -> None:
    """Real UDP and HTTP on loopback, a real preset file: nothing declared twice by hand."""
    import http.client
    import json
    import time

    from pythonosc.udp_client import SimpleUDPClient

    from engine.catalog import build_registry
    from engine.control.actions import Actions
    from engine.control.osc import OscServer
    from engine.control.oscquery import OscQueryServer
    from engine.presets import load_preset

    registry = build_registry()
    osc = OscServer(registry, Actions(), port=0)
    osc.start()
    query = OscQueryServer(registry, osc.port, port=0)
    query.start()
    try:
        address = "/dreamdeck/scene/realtime/timeline/prompts"
        SimpleUDPClient("127.0.0.1", osc.port).send_message(address, "a forest @4; a city @8")
        deadline = time.monotonic() + 10.0
        while registry.get("/scene/realtime/timeline/prompts") != "a forest @4; a city @8":
            assert time.monotonic() < deadline, "the OSC message never landed"
            registry.apply_pending(0.0)
            time.sleep(0.005)
        conn = http.client.HTTPConnection("127.0.0.1", query.port, timeout=10)
        conn.request("GET", "/dreamdeck/scene/vqgan_clip/timeline/sync")
        node = json.loads(conn.getresponse().read())
        conn.close()
        assert node["FULL_PATH"] == "/dreamdeck/scene/vqgan_clip/timeline/sync" and "beats" in node["DESCRIPTION"]
    finally:
        query.stop()
        osc.stop()

    preset = tmp_path / "set.toml"
    preset.write_text(
        '[scene.vqgan_clip.timeline]\nenabled = true\nsync = true\nprompts = """\na forest @4\na city @8\n"""\n'
    )
    values = load_preset(preset, registry).values
    assert values["/scene/vqgan_clip/timeline/enabled"] is True
    assert parse_timeline(values["/scene/vqgan_clip/timeline/prompts"]).length == 12.0
