"""The modulation matrix: audio features, the beat and LFOs move parameters.

Routes are parameters themselves (``/mod/<n>/source``, ``/mod/<n>/target``,
``/mod/<n>/amount``), so presets store them and OSC, MIDI and the web page reach them
like any other value. Each frame, on the render thread, every route adds
``amount x source`` (sources are 0..1, amounts -1..1, in fractions of the target's
range) to its target, and the sums go to the registry in one ``set_modulation`` call:
the frame sees the modulated values, while what a control set and what a preset saves
stay untouched.

A route whose target is not a numeric parameter is skipped, with one log line and a
note in ``status``; the other routes play on.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from engine.control.audio import BANDS
from engine.control.tempo import LFO_COUNT
from engine.params import Kind, Param, ParamRegistry, enum_param, float_param, string_param

if TYPE_CHECKING:
    from engine.control.audio import AudioInput
    from engine.control.tempo import Tempo

log = logging.getLogger(__name__)

MOD_SLOTS = 8
AUDIO_SOURCES = ("rms", "bass", "mid", "high", "onset", "beat", *(f"band{k}" for k in range(1, BANDS + 1)))
MOD_SOURCES = (
    "none",
    *(f"audio/{name}" for name in AUDIO_SOURCES),
    "tempo/beat",
    "tempo/phase",
    "tempo/bar",
    *(f"lfo/{n}" for n in range(1, LFO_COUNT + 1)),
)

MOD_PARAMS: tuple[Param, ...] = tuple(
    p
    for n in range(1, MOD_SLOTS + 1)
    for p in (
        enum_param(
            f"/mod/{n}/source",
            "none",
            MOD_SOURCES,
            description=f"Route {n}: what moves the target (audio feature, beat, LFO)",
        ),
        string_param(f"/mod/{n}/target", "", description=f"Route {n}: the parameter path it moves, e.g. /fx/grade/hue"),
        float_param(
            f"/mod/{n}/amount",
            0.5,
            -1.0,
            1.0,
            description=f"Route {n}: how far, as a fraction of the target's range (negative pulls down)",
        ),
    )
)

Source = Callable[[], float]


def build_sources(audio: AudioInput | None = None, tempo: Tempo | None = None) -> dict[str, Source]:
    """The matrix's sources from the audio input and the tempo; absent ones read as 0."""
    sources: dict[str, Source] = {}
    if audio is not None:
        for name in ("rms", "bass", "mid", "high", "onset", "beat"):
            sources[f"audio/{name}"] = lambda name=name: getattr(audio.features(), name)
        for k in range(BANDS):
            sources[f"audio/band{k + 1}"] = lambda k=k: audio.features().bands[k]
    if tempo is not None:
        sources["tempo/beat"] = lambda: tempo.beat_pulse
        sources["tempo/phase"] = lambda: tempo.beat_phase
        sources["tempo/bar"] = lambda: tempo.bar_phase
        for i in range(LFO_COUNT):
            sources[f"lfo/{i + 1}"] = lambda i=i: tempo.lfo_values[i]
    return sources


class ModulationMatrix:
    """The modulation Control. Add it after the tempo, so LFOs are this frame's."""

    name = "modulation"

    def __init__(self, params: ParamRegistry, sources: Mapping[str, Source]) -> None:
        unknown = set(sources) - set(MOD_SOURCES)
        if unknown:
            raise ValueError(f"unknown modulation sources {sorted(unknown)}; known: {', '.join(MOD_SOURCES)}")
        self.params = params
        params.declare_all(MOD_PARAMS)
        self.sources = dict(sources)
        self.routes = 0  # routes that played in the last frame
        self.problems: dict[int, str] = {}  # slot -> why it is skipped (reported once)
        self._why: dict[str, str] = {}  # bad target -> its message, worked out once

    @property
    def status(self) -> str:
        line = f"modulation: {self.routes} route{'s' if self.routes != 1 else ''}"
        return "; ".join([line, *(f"route {n} skipped: {why}" for n, why in sorted(self.problems.items()))])

    def start(self) -> None:
        """Nothing to open: the matrix runs on the render thread."""

    def stop(self) -> None:
        self.params.set_modulation({})  # the values go back to what the controls set

    def frame(self, now: float) -> None:
        """Render thread, frame boundary: sum every route per target and hand the offsets over."""
        get = self.params.get
        offsets: dict[str, float] = {}
        problems: dict[int, str] = {}
        routes = 0
        for n in range(1, MOD_SLOTS + 1):
            source = get(f"/mod/{n}/source")
            target = get(f"/mod/{n}/target").strip()
            if source == "none" or not target:
                continue
            problem = self._check_target(target)
            if problem:
                problems[n] = problem
                continue
            read = self.sources.get(source)
            value = float(read()) if read is not None else 0.0
            if not math.isfinite(value):
                value = 0.0
            offsets[target] = offsets.get(target, 0.0) + get(f"/mod/{n}/amount") * min(1.0, max(0.0, value))
            routes += 1
        self._report(problems)
        self.routes = routes
        self.params.set_modulation(offsets)

    def _check_target(self, target: str) -> str | None:
        """Why ``target`` cannot be modulated, or None. Checked every frame (a scene may
        declare the parameter later); the message, with its suggestion, is made once."""
        if target in self.params and self.params.param(target).kind in (Kind.FLOAT, Kind.INT):
            return None
        if target not in self._why:
            if target in self.params:
                kind = self.params.param(target).kind.value
                self._why[target] = f"{target} is not numeric ({kind}); only numbers can be modulated"
            else:
                paths = [p.path for p in self.params.params() if p.kind in (Kind.FLOAT, Kind.INT)]
                close = difflib.get_close_matches(target, paths, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                self._why[target] = f"{target} is not a parameter{hint}"
        return self._why[target]

    def _report(self, problems: dict[int, str]) -> None:
        """One log line when a route becomes broken (not one per frame)."""
        for n, why in problems.items():
            if self.problems.get(n) != why:
                log.warning("modulation route %d skipped: %s", n, why)
        self.problems = problems
