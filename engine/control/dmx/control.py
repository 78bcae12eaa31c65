"""DmxControl: a lighting desk's channels drive parameters and recall presets, with learn.

The mapping half of DMX: the receivers (receive.py) hand over each universe's levels;
the newest per universe waits in one slot; at each frame the render thread takes what is
there and turns the channels that changed into registry sets and preset recalls, through
the mappings of the shared MIDI/DMX mapping file (engine.control.midimap).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.control.access import Access
from engine.control.actions import ActionError, Actions
from engine.control.dmx.receive import BURST, SACN_NEEDS, DmxInput, Receiver, parse_inputs
from engine.control.midimap import (
    DMX,
    DMX_LEARN_MODES,
    DmxMapping,
    DmxMode,
    MappingError,
    MappingFile,
    Takeover,
    default_mappings_path,
    guess_dmx_mapping,
    load_mappings,
    parse_dmx_mapping,
    picks_up,
    save_mappings,
)
from engine.params import Kind, ParamError, ParamRegistry

log = logging.getLogger(__name__)

ORIGIN = "dmx"
LEARN_WINDOW = 0.5  # seconds of changes after the first one that learn looks at (a 16-bit fine channel moves first)
_MISSING = object()


@dataclass
class _ChannelState:
    """What one mapping remembers between frames (render thread only)."""

    level: int | None = None  # the level it last saw: a desk resends every channel, only changes count
    hardware: float | None = None  # ...as 0..1, to see a fader cross the value (pick-up)
    value: Any = _MISSING  # the value it last set: while the registry still holds it, no pick-up
    band: int | None = None  # preset mode: the band of levels last seen


@dataclass
class _Learn:
    path: str
    mode: str
    key: tuple[str, int] | None = None  # the (protocol, universe) of the first change
    changed: list[int] = field(default_factory=list)  # channels in the order they first changed
    deadline: float = math.inf


class DmxControl:
    """A Control (see engine.control.actions): Art-Net and sACN in, DMX learn."""

    name = "dmx"

    def __init__(
        self,
        registry: ParamRegistry,
        actions: Actions,
        inputs: str | Iterable[str | DmxInput],
        host: str = "127.0.0.1",
        allow: Iterable[str] | None = None,
        mappings_path: Path | None = None,
        ports: dict[str, int] | None = None,
        rate: float | None = None,  # packets/s per protocol; None: receive.RATE_LIMITS
        burst: int = BURST,
    ) -> None:
        given = [inputs] if isinstance(inputs, str) else list(inputs)
        self.inputs = parse_inputs([str(i) for i in given])
        self.access = Access.for_binding(host, allow, what="DMX")  # ValueError: opened without an allowlist
        self.registry = registry
        self.actions = actions
        self.mappings_path = Path(mappings_path) if mappings_path else default_mappings_path()
        self.receivers: dict[str, Receiver] = {}
        for protocol in dict.fromkeys(i.protocol for i in self.inputs):
            universes = frozenset(i.universe for i in self.inputs if i.protocol == protocol)
            port = (ports or {}).get(protocol)
            self.receivers[protocol] = Receiver(protocol, universes, self.access, self._take, port, rate, burst)
        self.coalesced = 0  # universes' levels replaced by newer ones before a frame took them
        self.applied = 0  # universes' levels the render thread took

        self._slot_lock = threading.Lock()
        self._fresh: dict[tuple[str, int], bytes] = {}  # the newest levels per universe, not yet taken
        self._levels: dict[tuple[str, int], bytes] = {}  # render thread: the levels taken last
        self._file = MappingFile(self.mappings_path, [], [], kind=DMX)
        self._mappings: tuple[DmxMapping, ...] = ()
        self._index: dict[int, list[DmxMapping]] = {}
        self._states: dict[DmxMapping, _ChannelState] = {}
        self._learning: _Learn | None = None
        self._last = "-"
        self.last_error: str | None = None
        actions.register("dmx/learn", self.learn)
        actions.register("dmx/learn_presets", self.learn_presets)

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Load the DMX mappings and bind the receivers (OSError if a port is taken)."""
        self._file = load_mappings(self.mappings_path, self.registry, kind=DMX)
        self._publish()
        started: list[Receiver] = []
        try:
            for receiver in self.receivers.values():
                receiver.start()
                started.append(receiver)
        except BaseException as exc:
            for receiver in started:
                receiver.stop()
            if isinstance(exc, ImportError):  # sACN without the sacn package: one line, the show goes on
                raise RuntimeError(f"{SACN_NEEDS}: {exc}") from None
            raise
        log.info(
            "DMX: %d mappings from %s; listening to %s on %s",
            len(self._mappings),
            self.mappings_path,
            ", ".join(map(str, self.inputs)),
            ", ".join(r.address for r in self.receivers.values()),
        )

    def stop(self) -> None:
        for receiver in self.receivers.values():
            receiver.stop()

    # -- status --------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        """One HUD line: what it listens to, packets and refusals, the last channel, learn."""
        parts = [f"dmx in: {', '.join(map(str, self.inputs))} on {self.access.host}"]
        packets = sum(r.counters.packets for r in self.receivers.values())
        parts.append(f"{packets} packets")
        refused: dict[str, int] = {}
        for receiver in self.receivers.values():
            for what, count in receiver.counters.refusals().items():
                refused[what] = refused.get(what, 0) + count
        if refused:
            parts.append("refused " + ", ".join(f"{count} {what}" for what, count in refused.items()))
        if self.coalesced:
            parts.append(f"{self.coalesced} coalesced")
        parts.append(f"last: {self._last}")
        learning = self._learning
        if learning is not None:
            parts.append(f"learn armed: {learning.path or 'presets'}")
        problem = next((r.last_problem for r in self.receivers.values() if r.last_problem), None)
        if problem:
            parts.append(problem)
        return " | ".join(parts)

    @property
    def mappings(self) -> tuple[DmxMapping, ...]:
        return self._mappings

    @property
    def learning(self) -> str | None:
        """The parameter DMX learn is armed for ("presets" for a preset channel), if any."""
        learning = self._learning
        return None if learning is None else learning.path or "presets"

    def port(self, protocol: str) -> int:
        """The port a protocol's receiver is bound to (after start)."""
        return self.receivers[protocol].port

    # -- learn (any thread) ----------------------------------------------------------------------
    def learn(self, path: str, mode: str = "") -> None:
        """Arm DMX learn (the action "dmx/learn"): the next desk channel moved drives ``path``.

        ``mode``: "16bit" for a coarse/fine pair whose coarse channel may not move in the
        window, "absolute" for one 8-bit channel, "trigger"; empty: guess from the channels
        that changed (see guess_dmx_mapping). ("preset": see learn_presets.)
        """
        if mode not in DMX_LEARN_MODES:
            modes = ", ".join(m for m in DMX_LEARN_MODES if m)
            raise ActionError(f"unknown DMX learn mode {mode!r:.40}; modes: {modes}")
        if mode != "preset":
            if not isinstance(path, str) or path not in self.registry:
                raise ActionError(f"unknown parameter {path!r:.60}")
            kind = self.registry.param(path).kind
            if kind in (Kind.STRING, Kind.COLOUR):
                raise ActionError(f"{path} is a {kind.value} parameter; DMX cannot drive it")
        self._learning = _Learn(path, mode)
        log.info("DMX learn armed for %s: move a fader on the desk", path or "a preset channel")

    def learn_presets(self) -> None:
        """Arm DMX learn for a preset channel (the action "dmx/learn_presets"): the next channel
        moved recalls presets by bands of its level (see DmxMapping.preset)."""
        self.learn("", "preset")

    def cancel_learn(self) -> None:
        self._learning = None

    # -- the receivers' threads ------------------------------------------------------------------
    def _take(self, protocol: str, universe: int, levels: bytes) -> None:
        """A receiver's levels: kept until the next frame, replacing older ones not yet taken."""
        with self._slot_lock:
            if (protocol, universe) in self._fresh:
                self.coalesced += 1
            self._fresh[(protocol, universe)] = levels

    # -- the render thread ---------------------------------------------------------------------
    def frame(self, now: float) -> None:
        """Apply the newest levels of each universe: at most one value per channel per frame.

        Never waits: if a receiver is storing levels this very moment, they are taken next frame.
        """
        if not self._slot_lock.acquire(blocking=False):
            return
        try:
            fresh, self._fresh = self._fresh, {}
        finally:
            self._slot_lock.release()
        for (protocol, universe), levels in fresh.items():
            self.applied += 1
            self._levels_in(protocol, universe, levels)
        learning = self._learning
        if learning is not None and time.monotonic() >= learning.deadline:
            self._commit_learn(learning)

    def _levels_in(self, protocol: str, universe: int, levels: bytes) -> None:
        key = (protocol, universe)
        previous = self._levels.get(key)
        self._levels[key] = levels
        learning = self._learning
        if learning is not None:
            self._learn_levels(learning, key, previous, levels)
            return
        for mapping in self._index.get(universe, ()):
            if not mapping.matches(protocol):
                continue
            level = mapping.level(levels)
            state = self._states.get(mapping)
            if level is None or state is None or level == state.level:
                continue
            before, state.level = state.level, level
            where = f"{protocol} u{universe} ch{mapping.channel}"
            self._last = f"{where}={level}"
            try:
                if mapping.mode is DmxMode.PRESET:
                    self._preset(mapping, state, level)
                elif mapping.mode is DmxMode.TRIGGER:
                    half = (mapping.full + 1) // 2
                    if before is not None and before < half <= level:
                        self.registry.set(mapping.param, True, origin=ORIGIN)
                else:
                    self._absolute(mapping, state, level)
            except (ParamError, ActionError) as exc:
                self._error(f"DMX {where}: {exc}")

    def _absolute(self, mapping: DmxMapping, state: _ChannelState, level: int) -> None:
        """A fader's level; with pick-up it only takes over once it reaches the value."""
        param = self.registry.param(mapping.param)
        x = level / mapping.full
        before, state.hardware = state.hardware, x
        if mapping.takeover is Takeover.PICKUP:
            current = self.registry.target(mapping.param)  # this frame's: what DMX set last frame has landed
            held = state.value is not _MISSING and state.value == current
            target = param.normalise(current)
            if not held and not picks_up(before, x, target, param):
                self._last += f" (pick up {mapping.param} at {target:.0%})"
                return
        state.value = self.registry.set(mapping.param, param.denormalise(x), origin=ORIGIN)

    def _preset(self, mapping: DmxMapping, state: _ChannelState, level: int) -> None:
        """A band of levels recalls its preset once, when the channel enters it (the desk is the
        truth: the band it shows when dreamdeck starts is recalled too)."""
        band = level // mapping.width
        if band == state.band:
            return
        state.band = band
        ref = mapping.preset(level)
        if ref is not None:
            self.actions.post("preset/recall", ref, origin=ORIGIN)
            self._last += f" (preset {ref})"

    # -- learn (render thread) -------------------------------------------------------------------
    def _learn_levels(self, learning: _Learn, key: tuple[str, int], previous: bytes | None, levels: bytes) -> None:
        if previous is None or previous == levels:
            return  # the first levels of a universe are the baseline to see a fader move against
        if learning.key is None:
            learning.key = key
            learning.deadline = time.monotonic() + LEARN_WINDOW
        elif key != learning.key:
            return  # another universe moved while learn was looking at the first one
        for channel, (old, new) in enumerate(zip(previous, levels), start=1):
            if old != new and channel not in learning.changed:
                learning.changed.append(channel)

    def _commit_learn(self, learning: _Learn) -> None:
        self._learning = None
        if learning.key is None or not learning.changed:
            return
        protocol, universe = learning.key
        try:
            param = self.registry.param(learning.path) if learning.mode != "preset" else None
            if param is None:
                guessed = DmxMapping(universe, learning.changed[0], "", DmxMode.PRESET, protocol=protocol)
            else:
                guessed = guess_dmx_mapping(protocol, universe, learning.changed, param, learning.mode)
            mapping = parse_dmx_mapping(guessed.to_toml(), self.registry)  # the file's rules
        except (MappingError, ParamError) as exc:
            self._error(f"DMX learn for {learning.path}: {exc}")
            return
        self._file.mappings = [m for m in self._file.mappings if m.control != mapping.control] + [mapping]
        self._publish()
        self._last = f"learned {mapping.describe()}"
        log.info("DMX learn: %s", mapping.describe())
        file = dataclasses.replace(self._file, mappings=list(self._file.mappings), kept=list(self._file.kept))
        threading.Thread(target=self._save, args=(file,), name="dmx-save", daemon=True).start()  # fsync: off the frame

    # -- mappings ----------------------------------------------------------------------------
    def _publish(self) -> None:
        """Swap in the file's mappings (index and per-channel state); render thread or before start."""
        index: dict[int, list[DmxMapping]] = {}
        for m in self._file.mappings:
            index.setdefault(m.universe, []).append(m)
        self._states = {m: self._states.get(m) or _ChannelState() for m in self._file.mappings}
        self._index = index
        self._mappings = tuple(self._file.mappings)

    def _save(self, file: MappingFile) -> None:
        try:
            save_mappings(file)
        except OSError as exc:
            self._error(f"DMX mappings not saved: {exc}")

    def _error(self, message: str) -> None:
        self.last_error = message
        self._last = message
        log.warning("%s", message)
