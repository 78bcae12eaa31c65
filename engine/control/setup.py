"""Plug the live controls into an app from one config, in the order they must run.

Order matters at the frame boundary: the tempo advances before the modulation matrix
reads its LFOs, MIDI clock feeds the tempo, and the opening hours come last so that a
closed gallery stays black whatever the controls did in the same frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.control.audio import AudioInput
from engine.control.dmx import DmxControl
from engine.control.link import LinkSession
from engine.control.midi import MidiControl
from engine.control.modulation import ModulationMatrix, build_sources
from engine.control.osc import DEFAULT_OSC_PORT, OscServer
from engine.control.oscquery import DEFAULT_OSCQUERY_PORT, OscQueryServer
from engine.control.tempo import Tempo
from engine.schedule import OpeningHours, WeeklyHours


@dataclass(frozen=True)
class ControlConfig:
    osc_host: str = "127.0.0.1"
    osc_port: int | None = DEFAULT_OSC_PORT  # None: no OSC
    osc_allow: tuple[str, ...] = ()
    osc_feedback: tuple[str, int] | None = None
    osc_tcp: bool = False
    oscquery_port: int | None = DEFAULT_OSCQUERY_PORT  # None: no OSCQuery
    oscquery_token: str | None = None  # needed for OSC over OSCQuery's WebSocket (None: the allowlist decides)
    advertise: bool = False
    midi_inputs: tuple[str, ...] = ()
    midi_outputs: tuple[str, ...] = ()
    midi_map: Path | None = None
    midi_api: str = "auto"
    midi: bool = False  # on: MIDI in and out on the ports above (it waits for ports that are not there yet)
    dmx_inputs: tuple[str, ...] = ()  # "artnet:0", "sacn:1"...; empty: no DMX (its mappings share midi_map's file)
    dmx_host: str = "127.0.0.1"  # any other needs dmx_allow; sACN joins multicast only then
    dmx_allow: tuple[str, ...] = ()
    dmx_ports: tuple[tuple[str, int], ...] = ()  # ("artnet", port) to move a protocol off its own port (tests)
    audio: str | None = None  # None: no audio input; "" the default device; "file:PATH"; a device name
    tempo: bool = True  # the tempo, Ableton Link and the modulation matrix (their parameters come with them)
    hours: WeeklyHours | None = None  # opening hours: black and the scenes paused outside them; None: always open


def install_controls(app, config: ControlConfig) -> dict[str, object]:
    """Add every configured control to ``app``; returns them by name."""
    made: dict[str, object] = {}
    audio = AudioInput(config.audio, app.params) if config.audio is not None else None
    if audio is not None:
        made["audio"] = app.add_control(audio)
    tempo = None
    if config.tempo:
        link = made["link"] = app.add_control(LinkSession(app.params))
        tempo = Tempo(app.params, audio=audio, link=link)
        tempo.register_actions(app.actions)
        made["tempo"] = app.add_control(tempo)
        made["modulation"] = app.add_control(ModulationMatrix(app.params, build_sources(audio, tempo)))
    if config.midi:
        made["midi"] = app.add_control(
            MidiControl(
                app.params,
                app.actions,
                inputs=config.midi_inputs,
                outputs=config.midi_outputs,
                mappings_path=config.midi_map,
                api=config.midi_api,
                clock_callback=None if tempo is None else tempo.on_midi_clock,
            )
        )
    if config.dmx_inputs:
        made["dmx"] = app.add_control(
            DmxControl(
                app.params,
                app.actions,
                config.dmx_inputs,
                host=config.dmx_host,
                allow=list(config.dmx_allow) or None,
                mappings_path=config.midi_map,
                ports=dict(config.dmx_ports),
            )
        )
    if config.osc_port is not None:
        osc = OscServer(
            app.params,
            app.actions,
            host=config.osc_host,
            port=config.osc_port,
            allow=list(config.osc_allow) or None,
            feedback=config.osc_feedback,
            tcp=config.osc_tcp,
        )
        made["osc"] = app.add_control(osc)
        if config.oscquery_port is not None:
            made["oscquery"] = app.add_control(
                OscQueryServer(
                    app.params,
                    lambda: osc.port,  # the bound port: with osc_port 0 it is known only once OSC started
                    host=config.osc_host,
                    port=config.oscquery_port,
                    advertise=config.advertise,
                    allow=list(config.osc_allow) or None,
                    actions=app.actions,
                    osc=osc,  # OSC sent over its WebSocket is applied by the OSC server, by its rules
                    token=config.oscquery_token,
                )
            )
    if config.hours is not None:
        made["hours"] = app.add_control(
            OpeningHours(app.params, config.hours, on_pause=app.worker.pause, on_resume=app.worker.resume)
        )
    return made
