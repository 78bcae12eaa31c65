"""MIDI ports: the rtmidi APIs, port names, and one API's clients (listing, opening, closing).

Ports are opened by name (any part of it, any case; ``*`` is every port) on the ALSA or
JACK API of python-rtmidi ("auto" tries ALSA first, then JACK).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import rtmidi

from engine.control.midimap import ANY_PORT

CLIENT_NAME = "dreamdeck"
# libjack (1.9.21 and the 1.9.22 in python-rtmidi's wheel) can crash in a client's notification
# thread (JackClient::HandleLatencyCallback) when clients close in quick succession: measured,
# one crash in ~1000 back-to-back closes, none in 4800 with this pause after each
JACK_CLOSE_PAUSE = 0.05

# "*" must not connect dreamdeck to itself, to the ALSA loopback, or to the ports other
# rtmidi programs make to connect somewhere ("RtMidi input" / "RtMidi output").
_NEVER_ANY = ("rtmidi input", "rtmidi output", "midi through")
_API_ALIASES = {"alsa": "LINUX_ALSA", "jack": "UNIX_JACK", "coremidi": "MACOSX_CORE", "windows": "WINDOWS_MM"}
_ALSA_ADDRESS = re.compile(r"\s+\d+:\d+$")
PORT_ERRORS = (OSError, ValueError, rtmidi.RtMidiError)  # rtmidi.SystemError is an OSError too


def resolve_apis(api: str) -> list[str]:
    """The rtmidi APIs to try, in order: "auto" is every compiled one (ALSA before JACK).

    Accepts "auto", "alsa", "jack", "coremidi", "windows" or an rtmidi name ("UNIX_JACK").
    Raises ValueError for an API this python-rtmidi was not built with.
    """
    names = {getattr(rtmidi, n): n[len("API_") :] for n in dir(rtmidi) if n.startswith("API_")}
    compiled = [names[a] for a in rtmidi.get_compiled_api() if names[a] not in ("RTMIDI_DUMMY", "UNSPECIFIED")]
    if api.lower() == "auto":
        return compiled
    wanted = _API_ALIASES.get(api.lower(), api.upper())
    if wanted not in compiled:
        choices = ", ".join(["auto", *(k for k, v in _API_ALIASES.items() if v in compiled)])
        raise ValueError(f"MIDI API {api!r} is not available here (use {choices})")
    return [wanted]


def stable_name(name: str) -> str:
    """A port name without ALSA's client:port numbers, which change when a device is replugged."""
    return _ALSA_ADDRESS.sub("", name)


def port_matches(pattern: str, name: str) -> bool:
    if pattern == ANY_PORT:
        folded = name.casefold()
        return not folded.startswith(CLIENT_NAME) and not any(word in folded for word in _NEVER_ANY)
    return pattern.casefold() in name.casefold()


class PortSystem:
    """One rtmidi API: two clients kept to list ports, and a factory for port clients.

    Listing through a kept client costs microseconds; making a JACK client costs ~50 ms
    with the GIL held (a dropped frame), so clients are only made again after a failure.
    """

    def __init__(self, api: str) -> None:
        self.api = api
        self.close_pause = JACK_CLOSE_PAUSE if api == "UNIX_JACK" else 0.0
        self._rtapi = getattr(rtmidi, f"API_{api}")
        self._lister_in = rtmidi.MidiIn(rtapi=self._rtapi, name=CLIENT_NAME)
        try:
            self._lister_out = rtmidi.MidiOut(rtapi=self._rtapi, name=CLIENT_NAME)
        except PORT_ERRORS:
            self.release(self._lister_in)
            raise

    def names(self) -> tuple[list[str], list[str]]:
        """(ports we can read from, ports we can send to)."""
        return self._lister_in.get_ports(), self._lister_out.get_ports()

    def open_input(self, name: str) -> rtmidi.MidiIn:
        port = rtmidi.MidiIn(rtapi=self._rtapi, name=CLIENT_NAME, queue_size_limit=4096)
        port.ignore_types(sysex=True, timing=False, active_sense=True)  # set before the first pulse can arrive
        return self._connect(port, name, "in")

    def open_output(self, name: str) -> rtmidi.MidiOut:
        return self._connect(rtmidi.MidiOut(rtapi=self._rtapi, name=CLIENT_NAME), name, "out")

    def _connect(self, port: Any, name: str, own_name: str) -> Any:
        try:  # the port's own listing, just before opening: an index from an older one may have moved
            port.open_port(port.get_ports().index(name), name=own_name)
        except BaseException:
            self.release(port)
            raise
        return port

    def release(self, port: Any) -> None:
        """Close a port's client (rtmidi.MidiIn or MidiOut); on JACK, pause after (see JACK_CLOSE_PAUSE)."""
        try:
            port.close_port()
            port.delete()
        finally:
            time.sleep(self.close_pause)

    def close(self) -> None:
        self.release(self._lister_in)
        self.release(self._lister_out)


@dataclass
class Port:
    name: str
    port: Any  # rtmidi.MidiIn or rtmidi.MidiOut
    system: PortSystem
    serial: int  # distinguishes a reopened port from the old one (feedback resends everything)
    ready: float = 0.0  # time.monotonic() from which it may be sent to


def arrival_times(batch: list[tuple[list[int], float]], now: float) -> list[float]:
    """When each message of a batch arrived: rtmidi's deltas (stamped on its own thread, at
    arrival) space them, and the last is stamped ``now``; a late poll then shifts a batch of
    clock pulses but does not bunch them up."""
    times = [now] * len(batch)
    for k in range(len(batch) - 1, 0, -1):
        times[k - 1] = times[k] - max(0.0, batch[k][1])
    return times
