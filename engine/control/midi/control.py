"""MidiControl: controllers drive parameters and actions, LEDs and motor faders follow, learn.

The mapping half of MIDI: messages in -> mappings (engine.control.midimap) -> registry sets
and posted actions; values out -> feedback messages; MIDI learn. Ports are ports.py's,
the clock clock.py's. See the package docstring for the threads.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mido

from engine.control.actions import ActionError, Actions
from engine.control.midi.clock import CLOCK_TYPES, MidiClock
from engine.control.midi.ports import (
    PORT_ERRORS,
    Port,
    PortSystem,
    arrival_times,
    port_matches,
    resolve_apis,
    stable_name,
)
from engine.control.midimap import (
    ANY_PORT,
    LearnEvent,
    Mapping,
    MappingError,
    MappingFile,
    MapType,
    Mode,
    Takeover,
    default_mappings_path,
    default_step,
    guess_mapping,
    load_mappings,
    parse_mapping,
    picks_up,
    relative_ticks,
    save_mappings,
)
from engine.params import Change, Kind, Param, ParamError, ParamRegistry

log = logging.getLogger(__name__)

ORIGIN = "midi"
LEARN_WINDOW = 0.4  # seconds of messages from the first control moved that learn looks at
LEARN_EVENTS = 4  # ...or this many, whichever comes first
INPUT_POLL = 0.001  # seconds between input polls when nothing is happening
OUTPUT_SETTLE = 0.1  # seconds before a new output gets feedback: JACK connects at a later period
_MISSING = object()

ClockCallback = Callable[[float | None, float, bool], None]


@dataclass
class _ControlState:
    """What one mapping remembers between messages; value and raw are read by frame() too."""

    msb: int = 0  # cc14: the last MSB; an LSB completes it
    hardware: float | None = None  # the control's last position (0..1), to see it cross the value
    value: Any = _MISSING  # the parameter value this control last set: picked up while it holds
    raw: int = 0  # ...and the MIDI value that set it (what the hardware shows)


@dataclass
class _Learn:
    path: str
    mode: Mode | None
    port: str | None = None
    events: list[LearnEvent] = field(default_factory=list)
    deadline: float = math.inf


class MidiControl:
    """A Control (see engine.control.actions): MIDI controllers in, feedback out, MIDI learn."""

    name = "midi"

    def __init__(
        self,
        registry: ParamRegistry,
        actions: Actions,
        inputs: Iterable[str] = (),
        outputs: Iterable[str] = (),
        mappings_path: Path | None = None,
        api: str = "auto",
        poll_interval: float = 2.0,
        clock_callback: ClockCallback | None = None,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self.registry = registry
        self.actions = actions
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.mappings_path = Path(mappings_path) if mappings_path else default_mappings_path()
        self.apis = resolve_apis(api)
        self.poll_interval = poll_interval
        self.clock_callback = clock_callback
        self.clock = MidiClock()
        self.last_error: str | None = None
        self.received = 0  # channel messages handled (clock pulses not counted)

        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()  # for the MIDI thread
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._system: PortSystem | None = None
        self._in_ports: dict[str, Port] = {}
        self._out_ports: dict[str, Port] = {}
        self._lost: set[str] = set()
        self._serial = 0
        self._problems: dict[str, str] = {}
        self._file = MappingFile(self.mappings_path, [], [])
        self._mappings: tuple[Mapping, ...] = ()
        self._index: dict[tuple[MapType, int, int], list[Mapping]] = {}
        self._states: dict[Mapping, _ControlState] = {}
        self._expected: dict[str, Any] = {}  # values MIDI set that have not landed yet
        self._sent: dict[tuple[int, int, MapType, int], int] = {}  # render thread only
        self._learning: _Learn | None = None
        self._last_touched: str | None = None
        self._last_message = "-"
        self._listening = False
        self._clock_failed = False
        actions.register("midi/learn", self.learn)

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Load the mappings and start the MIDI thread (it opens the ports: nothing here waits)."""
        if self._thread is not None and self._thread.is_alive():
            return
        file = load_mappings(self.mappings_path, self.registry, self.actions.specs)
        with self._lock:
            self._file = file
            self._publish_locked()
        if not self._listening:  # the registry has no remove_listener: add it once
            self.registry.add_listener(self._on_change)
            self._listening = True
        log.info(
            "MIDI: %d mappings from %s; inputs %s, outputs %s",
            len(file.mappings),
            self.mappings_path,
            list(self.inputs) or "none",
            list(self.outputs) or "none",
        )
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="midi", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        for ports in (self._in_ports, self._out_ports):
            for name in list(ports):
                self._close(ports, name)
        if self._system is not None:
            self._system.close()
            self._system = None

    # -- status ------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        """One HUD line: ports, clock, the last message, learn."""
        with self._lock:
            ins, outs, lost = sorted(self._in_ports), sorted(self._out_ports), sorted(self._lost)
            learning, last = self._learning, self._last_message
        parts = [f"midi in: {', '.join(ins) or 'none'}", f"out: {', '.join(outs) or 'none'}"]
        if "system" in self._problems:
            parts.append("no MIDI system")
        waiting = [p for p in self.inputs if not any(port_matches(p, n) for n in ins)] + [
            p for p in self.outputs if not any(port_matches(p, n) for n in outs)
        ]
        if waiting:
            parts.append(f"waiting for {', '.join(dict.fromkeys(waiting))}")
        if lost:
            parts.append(f"{', '.join(lost)} disconnected")
        bpm = self.clock_bpm
        if bpm is not None:
            parts.append(f"clock {bpm:.1f} bpm{'' if self.clock.running else ' (stopped)'}")
        parts.append(f"last: {last}")
        if learning is not None:
            parts.append(f"learn armed: {learning.path}")
        return " | ".join(parts)

    @property
    def clock_bpm(self) -> float | None:
        """Tempo of the MIDI clock coming in, or None when none is (or it stopped pulsing)."""
        return self.clock.bpm(time.perf_counter())

    @property
    def mappings(self) -> tuple[Mapping, ...]:
        return self._mappings

    @property
    def open_inputs(self) -> list[str]:
        with self._lock:
            return sorted(self._in_ports)

    @property
    def open_outputs(self) -> list[str]:
        with self._lock:
            return sorted(self._out_ports)

    @property
    def learning(self) -> str | None:
        """The parameter MIDI learn is armed for, if any."""
        learning = self._learning
        return None if learning is None else learning.path

    # -- MIDI learn (any thread) ------------------------------------------------------------------
    def learn(self, path: str, mode: str = "") -> None:
        """Arm MIDI learn: the next control moved drives ``path`` (the action "midi/learn").

        ``mode`` forces a mode (e.g. "relative-signed", which looks like two's complement
        when turned up); empty, learn guesses from the messages (see guess_mapping).
        """
        if not isinstance(path, str) or path not in self.registry:
            raise ActionError(f"unknown parameter {path!r:.60}")
        kind = self.registry.param(path).kind
        if kind in (Kind.STRING, Kind.COLOUR):
            raise ActionError(f"{path} is a {kind.value} parameter; MIDI cannot drive it")
        try:
            forced = Mode(mode) if mode else None
        except ValueError:
            raise ActionError(f"unknown MIDI mode {mode!r:.40}; modes: {', '.join(m.value for m in Mode)}") from None
        with self._lock:
            self._learning = _Learn(path, forced)
        log.info("MIDI learn armed for %s: move a control", path)

    def learn_last_touched(self) -> str:
        """Arm learn for the parameter last changed from outside MIDI (a window key calls this)."""
        path = self._last_touched
        last = self.registry.last_change
        if path is None and last is not None and last.origin != ORIGIN:
            path = last.path
        if path is None:
            raise ActionError("no parameter has been touched yet: change one (OSC, keys, web), then learn")
        self.learn(path)
        return path

    def cancel_learn(self) -> None:
        with self._lock:
            self._learning = None

    def unlearn(self, path: str) -> int:
        """Remove every mapping of ``path``; the file is rewritten on the MIDI thread."""
        with self._lock:
            kept = [m for m in self._file.mappings if m.param != path]
            removed = len(self._file.mappings) - len(kept)
            self._file.mappings = kept
            self._publish_locked()
        if removed:
            self._queue.put(("save",))
        return removed

    # -- the render thread ----------------------------------------------------------------------
    def frame(self, now: float) -> None:
        """Queue feedback (LEDs, motor faders) for mapped values that changed since last sent.

        Nothing is sent for the value an absolute control just set (its hardware shows it
        already, and a motor fader would fight the hand); relative encoders and buttons do
        get their value back, as their LED ring or light is the only place it shows.
        """
        with self._lock:
            outputs = [p for p in self._out_ports.values() if p.ready <= time.monotonic()]
        if not outputs:
            return
        serials = {p.serial for p in outputs}
        if any(key[0] not in serials for key in self._sent):
            self._sent = {k: v for k, v in self._sent.items() if k[0] in serials}
        outgoing: dict[str, list[mido.Message]] = {}
        done: set[tuple[int, int, MapType, int]] = set()
        for mapping in self._mappings:
            if mapping.type is MapType.PROGRAM or mapping.action is not None:
                continue  # nothing to show: a program change is momentary, an action has no value
            param = self.registry.param(mapping.param)
            if param.kind is Kind.TRIGGER:
                continue
            value = self.registry.target(mapping.param)
            raw = _raw_value(mapping, param, value)
            with self._lock:
                state = self._states.get(mapping)
                echo = (
                    state is not None
                    and mapping.mode is Mode.ABSOLUTE
                    and state.value is not _MISSING
                    and state.value == value
                )
                echo_raw = state.raw if echo else raw
            for out in outputs:
                key = (out.serial, mapping.channel, mapping.type, mapping.number)
                if key in done or not mapping.matches_port(out.name):
                    continue
                done.add(key)  # one control mapped to two parameters: the first mapping speaks
                if echo and key in self._sent:  # a port just opened still gets every value once
                    self._sent[key] = echo_raw
                elif self._sent.get(key) != raw:
                    self._sent[key] = raw
                    outgoing.setdefault(out.name, []).extend(_feedback_messages(mapping, raw))
        for name, messages in outgoing.items():
            self._queue.put(("send", name, messages))

    def _on_change(self, change: Change) -> None:
        """Registry listener (render thread): what landed, and what was touched last."""
        if change.origin not in (ORIGIN, "engine", "preset"):
            self._last_touched = change.path
        with self._lock:
            expected = self._expected.get(change.path, _MISSING)
            if expected is not _MISSING and (change.origin != ORIGIN or change.value == expected):
                del self._expected[change.path]

    # -- the MIDI thread ----------------------------------------------------------------------
    def _run(self) -> None:
        next_scan = 0.0
        while not self._stopping.is_set():
            if time.monotonic() >= next_scan:
                self._scan()
                next_scan = time.monotonic() + self.poll_interval
            busy = self._drain_inputs()
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                busy = True
                self._guarded(item[0], self._send if item[0] == "send" else self._save, *item[1:])
            learning = self._learning
            if learning is not None and time.monotonic() >= learning.deadline:
                self._commit_learn()
            if not busy:
                self._stopping.wait(INPUT_POLL)

    def _drain_inputs(self) -> bool:
        """Handle what every input has queued, in arrival order per port; True if anything came."""
        busy = False
        for name, port in list(self._in_ports.items()):
            batch: list[tuple[list[int], float]] = []
            try:
                while (item := port.port.get_message()) is not None:
                    batch.append(item)
            except PORT_ERRORS as exc:
                self._report(f"read {name}", f"MIDI: cannot read {name}: {exc}")
            busy = busy or bool(batch)
            for (data, _), t in zip(batch, arrival_times(batch, time.perf_counter())):
                try:
                    message = mido.Message.from_bytes(data)
                except ValueError:
                    continue  # not MIDI: a glitch on the cable, a broken driver
                self._guarded(message.type, self._on_message, name, message, t)
        return busy

    def _guarded(self, what: str, handler: Callable[..., None], *args: Any) -> None:
        try:
            handler(*args)
        except (ParamError, ActionError, MappingError) as exc:
            self._error(f"MIDI: {exc}")
        except Exception:  # a bug in one message must not silence the controller for the show
            log.exception("MIDI: handling %s failed", what)
            self.last_error = f"MIDI: handling {what} failed (see the log)"

    def _send(self, name: str, messages: list[mido.Message]) -> None:
        port = self._out_ports.get(name)
        if port is None:
            return
        try:
            for message in messages:
                port.port.send_message(message.bytes())
        except PORT_ERRORS as exc:
            self._report(f"send {name}", f"MIDI: cannot send to {name}: {exc}")
        else:
            self._report(f"send {name}", None)

    # -- ports (MIDI thread) -----------------------------------------------------------------------
    def _scan(self) -> None:
        """Open ports that appeared, close ports that vanished; never raise."""
        if self._system is None:
            self._system = self._open_system()
            if self._system is None:
                return
        try:
            in_names, out_names = self._system.names()
        except PORT_ERRORS as exc:
            self._report("list", f"MIDI: cannot list {self._system.api} ports: {exc}")
            self._drop_system()
            return
        self._report("list", None)
        vanished = self._sync(self._in_ports, in_names, self.inputs, self._system.open_input)
        vanished |= self._sync(self._out_ports, out_names, self.outputs, self._system.open_output)
        if vanished:  # a whole MIDI system may have gone (a JACK server restart): list afresh next time
            self._drop_system()

    def _open_system(self) -> PortSystem | None:
        reasons = []
        for api in self.apis:
            try:
                system = PortSystem(api)
            except PORT_ERRORS as exc:
                reasons.append(f"{api}: {exc}")
                continue
            self._report("system", None)
            log.info("MIDI: using the %s API", api)
            return system
        self._report("system", f"MIDI: no MIDI system ({'; '.join(reasons)})")
        return None

    def _drop_system(self) -> None:
        if self._system is not None:
            self._system.close()
            self._system = None

    def _sync(
        self, ports: dict[str, Port], names: list[str], patterns: tuple[str, ...], opener: Callable[..., Any]
    ) -> bool:
        vanished = False
        for name in [n for n in ports if n not in names]:
            self._close(ports, name)
            with self._lock:
                self._lost.add(name)
            log.warning("MIDI: %s disconnected; it reopens when it comes back", name)
            vanished = True
        for name in names:
            if name in ports or not any(port_matches(p, name) for p in patterns):
                continue
            try:
                port = opener(name)
            except PORT_ERRORS as exc:
                self._report(f"open {name}", f"MIDI: cannot open {name}: {exc}")
                continue
            self._report(f"open {name}", None)
            self._serial += 1
            with self._lock:
                ports[name] = Port(name, port, self._system, self._serial, time.monotonic() + OUTPUT_SETTLE)
                self._lost = {n for n in self._lost if stable_name(n) != stable_name(name)}
            log.info("MIDI: opened %s", name)
        return vanished

    def _close(self, ports: dict[str, Port], name: str) -> None:
        with self._lock:
            port = ports.pop(name)
        try:
            port.system.release(port.port)
        except PORT_ERRORS as exc:
            log.warning("MIDI: closing %s: %s", name, exc)

    # -- messages (MIDI thread) ---------------------------------------------------------------------
    def _on_message(self, port: str, message: mido.Message, t: float) -> None:
        kind = message.type
        if kind in CLOCK_TYPES:
            self._on_clock(message, t)
            return
        if kind not in ("control_change", "note_on", "note_off", "pitchwheel", "program_change"):
            return  # sysex, aftertouch, active sensing...: nothing to map
        self.received += 1
        channel = message.channel + 1
        with self._lock:
            self._last_message = _describe(message, port)
        if self._learning is not None:
            self._learn_event(port, message, channel)
        elif kind == "control_change":
            self._on_cc(port, channel, message.control, message.value)
        elif kind in ("note_on", "note_off"):
            pressed = kind == "note_on" and message.velocity > 0
            for mapping in self._mapped(port, MapType.NOTE, channel, message.note):
                self._button(mapping, pressed, message.velocity)
        elif kind == "pitchwheel":
            for mapping in self._mapped(port, MapType.PITCHBEND, channel, 0):
                self._absolute(mapping, message.pitch + 8192, 16383)
        else:
            self._on_program(port, channel, message.program)

    def _on_cc(self, port: str, channel: int, number: int, value: int) -> None:
        for mapping in self._mapped(port, MapType.CC, channel, number):
            if mapping.mode is Mode.ABSOLUTE:
                self._absolute(mapping, value, 127)
            elif mapping.mode.is_relative:
                self._relative(mapping, relative_ticks(value, mapping.mode))
            else:
                self._button(mapping, value >= 64, value)
        # 14-bit pairs: the MSB resets the LSB to 0 (the MIDI spec), the LSB that follows completes it
        if number < 32:
            for mapping in self._mapped(port, MapType.CC14, channel, number):
                self._state(mapping).msb = value
                self._absolute(mapping, value << 7, 16383)
        elif number < 64:
            for mapping in self._mapped(port, MapType.CC14, channel, number - 32):
                self._absolute(mapping, (self._state(mapping).msb << 7) | value, 16383)

    def _on_program(self, port: str, channel: int, program: int) -> None:
        mapped = self._mapped(port, MapType.PROGRAM, channel, 0)
        for mapping in mapped:
            self._set(mapping, program, program)  # an enum takes the index; ParamError if out of range
        if not mapped:
            self.actions.post("preset/recall", program + 1, origin=ORIGIN)  # presets count from 1

    def _mapped(self, port: str, type_: MapType, channel: int, number: int) -> list[Mapping]:
        return [m for m in self._index.get((type_, channel, number), ()) if m.matches_port(port)]

    def _state(self, mapping: Mapping) -> _ControlState:
        state = self._states.get(mapping)
        return _ControlState() if state is None else state  # unlearned while its message was in flight

    def _current(self, path: str) -> Any:
        """The value MIDI last set if it has not landed yet, else the registry's target."""
        with self._lock:
            value = self._expected.get(path, _MISSING)
        return self.registry.target(path) if value is _MISSING else value

    def _absolute(self, mapping: Mapping, raw: int, full: int) -> None:
        """A fader or knob position; with pick-up it only takes over once it reaches the value."""
        param = self.registry.param(mapping.param)
        x = raw / full
        state = self._state(mapping)
        if mapping.takeover is Takeover.PICKUP:
            current = self._current(mapping.param)
            with self._lock:
                held = state.value is not _MISSING and state.value == current
                hardware, state.hardware = state.hardware, x
            if not held:
                target = param.normalise(current)
                if not picks_up(hardware, x, target, param):
                    with self._lock:
                        self._last_message += f" (pick up {mapping.param} at {target:.0%})"
                    return
        else:
            with self._lock:
                state.hardware = x
        self._set(mapping, param.denormalise(x), raw)

    def _relative(self, mapping: Mapping, ticks: int) -> None:
        if ticks == 0:
            return
        param = self.registry.param(mapping.param)
        step = mapping.step or default_step(param)
        x = min(1.0, max(0.0, param.normalise(self._current(mapping.param)) + ticks * step))
        value = param.denormalise(x)
        self._set(mapping, value, _raw_value(mapping, param, value))

    def _button(self, mapping: Mapping, pressed: bool, velocity: int) -> None:
        """Notes and CC buttons: trigger, toggle or momentary; velocity is the value of a number.
        An action mapping posts its action on the press (ActionError if this engine lacks it)."""
        if mapping.action is not None:
            if pressed:
                self.actions.post(mapping.action, *mapping.args, origin=ORIGIN)
            return
        param = self.registry.param(mapping.param)
        mode = mapping.mode
        if param.kind is Kind.TRIGGER:
            if pressed:
                self._set(mapping, True, velocity)
            return
        if not pressed and mode is not Mode.MOMENTARY:
            return  # only a momentary button does something on release
        on = True if param.kind is Kind.BOOL else param.denormalise(velocity / 127)
        if mapping.value is not None:  # a pad that sets one value (a scene, a preset choice)
            on = mapping.value
        off = False if param.kind is Kind.BOOL else param.denormalise(0.0)
        if mode is Mode.TOGGLE:
            current = self._current(mapping.param)
            is_on = current if param.kind is Kind.BOOL else param.normalise(current) > 0
            value = off if is_on else on
        elif mode is Mode.MOMENTARY:
            value = on if pressed else off
        else:
            value = on
        self._set(mapping, value, velocity if pressed else 0)

    def _set(self, mapping: Mapping, value: Any, raw: int) -> None:
        value = self.registry.param(mapping.param).coerce(value)  # as it will land (an enum index -> its name)
        with self._lock:  # recorded before the set, so the landing always finds it
            self._expected[mapping.param] = value
            state = self._state(mapping)
            state.value, state.raw = value, raw
        try:
            self.registry.set(mapping.param, value, origin=ORIGIN)
        except ParamError:
            with self._lock:
                self._expected.pop(mapping.param, None)
                state.value = _MISSING
            raise

    # -- clock (MIDI thread) -----------------------------------------------------------------------
    def _on_clock(self, message: mido.Message, t: float) -> None:
        clock = self.clock
        if message.type == "clock":
            clock.pulse(t)
        elif message.type == "start":
            clock.start()
        elif message.type == "continue":
            clock.resume()
        elif message.type == "stop":
            clock.stop()
        else:
            clock.song_position(message.pos)
        if self.clock_callback is None:
            return
        try:
            self.clock_callback(clock.bpm(t), clock.beat_position, clock.running)
        except Exception:  # the tempo module's bug must not stop MIDI; logged once, loudly
            if not self._clock_failed:
                log.exception("MIDI: the clock callback failed (further failures are not logged)")
                self._clock_failed = True

    # -- learn (MIDI thread) ------------------------------------------------------------------------
    def _learn_event(self, port: str, message: mido.Message, channel: int) -> None:
        learning = self._learning
        if learning is None:
            return  # cancelled from another thread a moment ago
        if message.type == "control_change":
            event = LearnEvent(MapType.CC, channel, message.control, message.value)
        elif message.type == "note_on" and message.velocity > 0:
            event = LearnEvent(MapType.NOTE, channel, message.note, message.velocity)
        elif message.type == "pitchwheel":
            event = LearnEvent(MapType.PITCHBEND, channel, 0, message.pitch + 8192)
        elif message.type == "program_change":
            event = LearnEvent(MapType.PROGRAM, channel, 0, message.program)
        else:
            return  # a note release says nothing new
        if learning.port is None:
            learning.port, learning.events = port, [event]
            learning.deadline = time.monotonic() + LEARN_WINDOW
        elif port == learning.port and event.channel == learning.events[0].channel:
            learning.events.append(event)
        else:
            return  # another control moved while learn was looking at the first one
        if event.type is not MapType.CC or len(learning.events) >= LEARN_EVENTS or _is_cc14_pair(learning.events):
            self._commit_learn()

    def _commit_learn(self) -> None:
        with self._lock:
            learning = self._learning
            if learning is None or learning.port is None:
                return  # nothing moved yet (or learn was armed again meanwhile)
            self._learning = None
        param = self.registry.param(learning.path)
        guessed = guess_mapping(self._port_pattern(learning.port), learning.events, param, learning.mode)
        try:
            mapping = parse_mapping(guessed.to_toml(), self.registry, self.actions.specs)  # the file's rules
        except MappingError as exc:
            self._error(f"MIDI learn for {learning.path}: {exc}")
            return
        with self._lock:
            self._file.mappings = [m for m in self._file.mappings if m.control != mapping.control] + [mapping]
            self._publish_locked()
            self._last_message = f"learned {mapping.describe()}"
        log.info("MIDI learn: %s", mapping.describe())
        self._save()

    def _port_pattern(self, port: str) -> str:
        """What a learned mapping names: the configured name that opened the port, if it was one."""
        for pattern in self.inputs:
            if pattern != ANY_PORT and port_matches(pattern, port):
                return pattern
        return stable_name(port)

    # -- mappings ---------------------------------------------------------------------------------
    def _publish_locked(self) -> None:
        """Swap in the file's mappings (index and per-control state) in one step; hold _lock."""
        mappings = self._file.mappings
        index: dict[tuple[MapType, int, int], list[Mapping]] = {}
        for m in mappings:
            index.setdefault((m.type, m.channel, m.number), []).append(m)
        self._states = {m: self._states.get(m) or _ControlState() for m in mappings}
        self._index = index
        self._mappings = tuple(mappings)

    def _save(self) -> None:
        with self._lock:
            file = dataclasses.replace(self._file, mappings=list(self._file.mappings), kept=list(self._file.kept))
        try:
            save_mappings(file)
        except OSError as exc:
            self._error(f"MIDI mappings not saved: {exc}")

    # -- errors -----------------------------------------------------------------------------------
    def _error(self, message: str) -> None:
        self.last_error = message
        log.warning("%s", message)

    def _report(self, key: str, message: str | None) -> None:
        """One log line per problem: a port that keeps failing is not logged every poll."""
        if message is None:
            self._problems.pop(key, None)
        elif self._problems.get(key) != message:
            self._problems[key] = message
            self._error(message)


def _raw_value(mapping: Mapping, param: Param, value: Any) -> int:
    """A parameter value as the MIDI value of its control (0..127, or 0..16383 for 14 bits)."""
    full = 16383 if mapping.type in (MapType.CC14, MapType.PITCHBEND) else 127
    return round(param.normalise(value) * full)


def _feedback_messages(mapping: Mapping, raw: int) -> list[mido.Message]:
    channel = mapping.channel - 1
    if mapping.type is MapType.CC:
        return [mido.Message("control_change", channel=channel, control=mapping.number, value=raw)]
    if mapping.type is MapType.CC14:
        return [
            mido.Message("control_change", channel=channel, control=mapping.number, value=raw >> 7),
            mido.Message("control_change", channel=channel, control=mapping.number + 32, value=raw & 127),
        ]
    if mapping.type is MapType.NOTE:  # velocity 0 is "off" to every LED we know of
        return [mido.Message("note_on", channel=channel, note=mapping.number, velocity=raw)]
    return [mido.Message("pitchwheel", channel=channel, pitch=raw - 8192)]


def _is_cc14_pair(events: list[LearnEvent]) -> bool:
    first = events[0]
    return (
        first.type is MapType.CC
        and first.number < 32
        and any(e.type is MapType.CC and e.number == first.number + 32 for e in events[1:])
    )


def _describe(message: mido.Message, port: str) -> str:
    ch = f"ch{message.channel + 1}"
    if message.type == "control_change":
        text = f"cc {message.control}={message.value} {ch}"
    elif message.type in ("note_on", "note_off"):
        text = f"{message.type.replace('_', ' ')} {message.note} vel {message.velocity} {ch}"
    elif message.type == "pitchwheel":
        text = f"pitchbend {message.pitch} {ch}"
    else:
        text = f"program {message.program} {ch}"
    return f"{text} ({port})"
