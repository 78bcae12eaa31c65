"""MIDI control: controllers drive parameters, LEDs and motor faders follow, clock drives tempo.

    MidiControl(registry, actions, inputs=["nanoKONTROL"], outputs=["nanoKONTROL"])

Ports are opened by name (any part of it, any case; ``*`` is every port) on the ALSA or
JACK API of python-rtmidi ("auto" tries ALSA first, then JACK); mido parses and builds the
messages. Threads:

    rtmidi's thread   queues incoming bytes inside rtmidi (C++ only, no Python)
    "midi" thread     owns the ports: every millisecond drains the inputs and handles each
                      message in order (registry.set and actions.post only), sends queued
                      feedback, and every ``poll_interval`` s lists the ports to open new
                      ones and notice unplugged ones; it also runs MIDI learn
    render thread     ``frame(now)``: works out which feedback values changed and queues them

Why poll instead of a callback (mido's ports always install one): under JACK the callback
runs in JACK's process thread and must take the GIL; whenever Python is busy it misses
the period, JACK reports an xrun for the whole graph (audio too) and MIDI is lost. Measured
on a JACK dummy server with busy Python threads: 2000 CCs, 266 lost and 1129 xruns with a
callback, 8 lost and 43 xruns polling. Inputs are opened with ``ignore_types(sysex=True,
timing=False, active_sense=True)``: rtmidi drops clock by default, and dreamdeck needs it.

Mappings live in a TOML file (see ``engine.control.midimap``) that MIDI learn rewrites
atomically. A MIDI byte is untrusted input: anything malformed or unmapped is ignored, and
a port that vanishes is closed, reported once and reopened when it comes back.

    ports.py     rtmidi APIs, port names, one API's clients (listing, opening, closing)
    control.py   MidiControl: messages -> mappings -> parameters and actions, feedback, learn
    clock.py     MidiClock: pulses -> tempo and beat position
    (engine.control.midimap: the mapping file, its schema, and learn's guesses)
"""

from engine.control.midi.clock import MidiClock
from engine.control.midi.control import ORIGIN, MidiControl
from engine.control.midi.ports import CLIENT_NAME, JACK_CLOSE_PAUSE, port_matches, resolve_apis, stable_name

__all__ = [
    "CLIENT_NAME",
    "JACK_CLOSE_PAUSE",
    "ORIGIN",
    "MidiClock",
    "MidiControl",
    "port_matches",
    "resolve_apis",
    "stable_name",
]
