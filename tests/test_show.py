"""build_show: one config in, the whole show out; `dreamdeck run` and the soak build theirs with it.

Real parts: headless EGL, real UDP and HTTP sockets, a real ffmpeg take, a real state file,
a real datagram socket standing in for systemd. Waits are bounded polling loops.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import socket
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from pythonosc.udp_client import SimpleUDPClient

from engine.app import AppConfig
from engine.cli import build_parser, show_config
from engine.control.setup import ControlConfig
from engine.diffusion.options import TorchDefaults
from engine.outputs.recorder import RECORD_PARAM
from engine.scenes import SceneCatalog
from engine.scenes.passthrough import Passthrough
from engine.schedule import parse_hours
from engine.show import OutputConfig, Show, ShowConfig, ShowError, StateConfig, StatusPageConfig, build_show
from engine.web import StatusConfig

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = (320, 180)
TIMEOUT = 20.0


def step_until(show: Show, condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        show.app.step()
        if condition():
            return
        time.sleep(0.002)  # let the part threads run on a small machine
    raise AssertionError(f"{what}: not within {timeout} s; hud: {show.app.hud_lines()}")


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read())


def load_soak() -> ModuleType:
    """scripts/soak.py as a module (scripts/ is not a package); its dataclasses need it in sys.modules."""
    if "soak" not in sys.modules:
        spec = importlib.util.spec_from_file_location("soak", ROOT / "scripts" / "soak.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["soak"] = module
        spec.loader.exec_module(module)
    return sys.modules["soak"]


def full_config(tmp_path: Path) -> ShowConfig:
    return ShowConfig(
        app=AppConfig(source="pattern", output_size=OUTPUT, hot_reload=False),
        clock="manual",
        scenes=("reaction_diffusion", "passthrough"),
        controls=ControlConfig(
            osc_port=0,
            oscquery_port=0,
            midi=True,
            midi_inputs=("no-such-controller",),
            midi_map=tmp_path / "midi.toml",
            hours=parse_hours("always"),
        ),
        outputs=OutputConfig(record_pattern=str(tmp_path / "take-%H%M%S.mp4"), record_at_start=True),
        state=StateConfig(path=tmp_path / "state.toml"),
        status=StatusPageConfig(StatusConfig(port=0), required=True),
    )


def test_build_show_makes_the_whole_show_and_every_part_works(tmp_path: Path, monkeypatch) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:  # the notifier talks to it
        systemd.bind(str(tmp_path / "notify.sock"))
        systemd.settimeout(5.0)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
        with build_show(full_config(tmp_path)) as show:
            assert set(show.parts) == {
                "link",
                "tempo",
                "modulation",
                "midi",
                "osc",
                "oscquery",
                "hours",
                "recorder",
                "state",
                "systemd",
                "status",
            }
            app = show.app
            assert [c.name for c in app.controls][-1] == show.status_page.name  # the page reads what the controls did
            assert app.catalog.names() == ["reaction_diffusion", "passthrough"]
            show.start()
            step_until(show, lambda: app.worker.output.latest()[0] is not None, "the scene's first image")
            assert app.compositor.read_output().std() > 5, "the output looks blank"
            assert systemd.recv(4096).startswith(b"READY=1")

            SimpleUDPClient("127.0.0.1", show.parts["osc"].port).send_message("/dreamdeck/fx/kaleido/segments", 11)
            step_until(show, lambda: app.params.get("/fx/kaleido/segments") == 11, "OSC reaching the registry")
            host_info = get_json(f"http://127.0.0.1:{show.parts['oscquery'].port}/?HOST_INFO")
            assert host_info["OSC_PORT"] == show.parts["osc"].port != 0, "OSCQuery advertises the bound OSC port"
            served = get_json(f"http://127.0.0.1:{show.status_page.port}/api/params")
            assert {"path": "/fx/kaleido/segments", "value": 11}.items() <= next(
                p for p in served if p["path"] == "/fx/kaleido/segments"
            ).items()
            assert app.params.get(RECORD_PARAM) is True  # record_at_start
            step_until(
                show,
                lambda: (
                    app.params.get("/scene/active") == "reaction_diffusion"
                    and show.parts["recorder"].current is not None
                    and show.parts["recorder"].current.written > 3
                ),
                "frames reaching the recorder",
            )
            app.params.set(RECORD_PARAM, False)
            app.recall_preset_now("default")
            step_until(show, lambda: (tmp_path / "state.toml").exists(), "the state file")
        assert "default" in (tmp_path / "state.toml").read_text(encoding="utf-8")
        if shutil.which("ffmpeg"):
            takes = list(tmp_path.glob("take-*.mp4"))
            assert len(takes) == 1 and takes[0].stat().st_size > 0, takes


def test_a_bare_show_is_the_app_alone() -> None:
    with build_show(ShowConfig.bare(AppConfig(source="pattern", output_size=OUTPUT, hot_reload=False))) as show:
        assert show.parts == {} and show.status_page is None
        assert show.app.controls == [] and show.app.outputs == []
        show.start()
        for _ in range(5):
            show.app.step()
        assert show.app.stats.frames == 5


@pytest.mark.parametrize(
    "config, message",
    [
        (ShowConfig(app=AppConfig(source="webcam:0")), "unknown source kind 'webcam'"),
        (ShowConfig(controls=ControlConfig(osc_host="0.0.0.0")), "reachable from the network"),
        (ShowConfig(scenes=("passthrough", "nope")), "no scene named 'nope'"),
        (ShowConfig(fps=0), "must be positive"),
    ],
)
def test_a_config_that_cannot_work_is_one_line_before_anything_opens(config: ShowConfig, message: str) -> None:
    with pytest.raises(ShowError, match=message) as caught:
        build_show(config)
    assert "\n" not in str(caught.value)


def test_a_status_port_asked_for_and_taken_is_an_error_else_the_show_runs_without(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        base = ShowConfig.bare(AppConfig(source="pattern", output_size=OUTPUT, hot_reload=False))
        with pytest.raises(ShowError, match=f"status page on 127.0.0.1:{port}"):
            build_show(dataclasses.replace(base, status=StatusPageConfig(StatusConfig(port=port), required=True)))
        with build_show(dataclasses.replace(base, status=StatusPageConfig(StatusConfig(port=port)))) as show:
            assert show.status_page is None and "status" not in show.parts


class RecordsTorch(Passthrough):
    """Passthrough that keeps the TorchDefaults it was made with."""

    name = "records_torch"
    made_with: list[TorchDefaults] = []

    def __init__(self, params, torch=None) -> None:
        super().__init__(params, torch)
        RecordsTorch.made_with.append(self.torch)


def test_the_torch_defaults_reach_each_scene_as_a_value() -> None:
    chosen = TorchDefaults(device="cpu", dtype="bfloat16", accel="eager")
    config = ShowConfig.bare(
        AppConfig(source="pattern", output_size=OUTPUT, hot_reload=False, preset=None, torch=chosen)
    )
    RecordsTorch.made_with.clear()
    with build_show(config, catalog=SceneCatalog((RecordsTorch,))) as show:
        show.start()
        step_until(show, lambda: show.app.worker.active_name == "records_torch", "the scene loading")
        assert RecordsTorch.made_with == [chosen] and show.app.worker.active.torch is chosen
    assert chosen.pick(device="cuda:1") == TorchDefaults("cuda:1", "bfloat16", "eager")  # a scene's own param wins


def test_dreamdeck_run_flags_become_one_show_config(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [
            "run",
            "--headless",
            "--fresh",
            "--source",
            "pattern",
            "--record",
            str(tmp_path / "r.mp4"),
            "--midi-in",
            "nano",
            "--hours",
            "always",
            "--device",
            "cpu",
            "--dtype",
            "bfloat16",
            "--accel",
            "eager",
            "--osc-port",
            "9400",
            "--no-oscquery",
            "--status-port",
            "9401",
            "--ndi",
            "--output",
            "640x360",
            "--status-allow",
            "192.168.1.0/24",
            "--status-allow",
            "10.0.0.7",
        ]
    )
    config = show_config(args)
    assert config.window is None and config.app.source == "pattern" and config.app.output_size == (640, 360)
    assert config.app.torch == TorchDefaults("cpu", "bfloat16", "eager")
    assert config.controls.midi and config.controls.midi_inputs == ("nano",) and config.controls.hours is not None
    assert config.controls.osc_port == 9400 and config.controls.oscquery_port is None
    assert config.outputs.record_at_start and config.outputs.record_pattern == str(tmp_path / "r.mp4")
    assert config.outputs.ndi == "dreamdeck" and config.outputs.systemd
    assert config.status.server.port == 9401 and config.status.required
    assert config.status.server.allow == ("192.168.1.0/24", "10.0.0.7")
    defaults = show_config(build_parser().parse_args(["run", "--headless", "--fresh"]))
    assert not defaults.controls.midi and defaults.status.required is False and defaults.app.torch == TorchDefaults()
    assert defaults.status.server.allow is None


def test_the_soak_builds_the_show_dreamdeck_run_builds(tmp_path: Path) -> None:
    """Same parts as `dreamdeck run` (plus MIDI and opening hours, which a user turns on with a flag)."""
    soak = load_soak()
    args = soak.parse_args(["--frames", "100"])
    ws = soak.make_workspace(tmp_path / "soak")
    run_args = build_parser().parse_args(
        ["run", "--headless", "--fresh", "--osc-port", "0", "--oscquery-port", "0", "--status-port", "0"]
    )
    with (
        build_show(show_config(run_args)) as users,
        build_show(soak.soak_config(args, ws, "soak-controller")) as soaked,
    ):
        assert {"recorder", "systemd", "tempo", "state", "osc", "oscquery", "status"} <= set(users.parts)
        assert set(users.parts) <= set(soaked.parts)
        assert set(soaked.parts) - set(users.parts) == {"midi", "hours"}
        assert [type(o) for o in users.app.outputs] == [type(o) for o in soaked.app.outputs]


def test_soak_pins_presettable_values_into_its_private_presets(tmp_path: Path) -> None:
    soak = load_soak()
    ws = soak.make_workspace(tmp_path / "soak")
    soak.write_pins_into_presets(ws, {"/scene/active": "passthrough", "/fx/kaleido/segments": 7})
    from engine.catalog import build_registry
    from engine.presets import PresetLibrary

    library = PresetLibrary(ws.presets, build_registry())
    good = [e for e in library.entries() if e.error is None]
    assert len(good) >= 2
    for entry in good:
        values = library.load(entry.name).values
        assert values["/scene/active"] == "passthrough" and values["/fx/kaleido/segments"] == 7, entry.name
    assert {e.name for e in library.entries() if e.error is not None} == set(soak.BROKEN_PRESETS)
