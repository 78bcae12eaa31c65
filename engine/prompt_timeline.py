"""Prompt timelines: a scripted sequence of looks, each line's prompt morphing into the next.

One line per look, ``PROMPT [@ DURATION]``:

- ``PROMPT`` is the weighted syntax of ``engine.prompt_syntax`` (``a forest :1 | fog :0.5``);
- ``DURATION`` is seconds, or beats when the timeline is synced to the tempo (``sync``);
  a line without one lasts ``line_length``.

As a parameter (one string, so that OSC can send it) the lines are separated by ``;`` or
newlines: ``"a forest @4; a city at night @8"``. As a ``.txt`` file, one line per look,
``#`` starts a comment line and blank lines are skipped: Aphantasia's text files (one
prompt per line, the video's length shared out between them) read as they are.

A line is its prompt exactly at its start and morphs toward the next line over its time
(``morph`` < 1 holds it first, then morphs in the rest), so the blend is continuous and
lands on each line at its time; after the last line it loops to the first (or holds the
last one). Scenes blend the *text embeddings* (slerp): each line's text is encoded once,
a blend is a few elementwise operations. ``ScenePromptTimeline`` is what a scene holds:
its parameters, the file, the position, the beat. No torch is imported here until a blend
is asked for.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.params import Param, ParamError, ParamRegistry, bool_param, float_param, string_param, trigger_param
from engine.prompt_syntax import WeightedPrompt, parse_prompts

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MAX_LINES = 1000
MAX_FILE_BYTES = 1_000_000
FILE_CHECK_S = 1.0  # how often a playing timeline file is checked for changes (a performer saves it)
DEFAULT_BPM = 120.0  # beats without a tempo in the show (no /tempo/bpm)


@dataclass(frozen=True)
class TimelineLine:
    prompts: tuple[WeightedPrompt, ...]
    duration: float  # seconds, or beats when synced; > 0
    text: str = ""  # as written, for messages


@dataclass(frozen=True)
class Moment:
    """Where a timeline is: line ``a`` morphing toward line ``b``, ``blend`` of the way (0..1)."""

    a: int
    b: int
    blend: float


@dataclass(frozen=True)
class Timeline:
    lines: tuple[TimelineLine, ...]

    def __post_init__(self) -> None:
        if not self.lines:
            raise ValueError("a timeline needs at least one line")

    @property
    def starts(self) -> tuple[float, ...]:
        return tuple(itertools.accumulate((line.duration for line in self.lines[:-1]), initial=0.0))

    @property
    def length(self) -> float:
        return math.fsum(line.duration for line in self.lines)

    def at(self, t: float, *, loop: bool = True, morph: float = 1.0) -> tuple[int, int, float]:
        """(index_a, index_b, blend) at time ``t`` (seconds or beats from the start).

        Line ``a`` plays from its start, morphing toward ``b`` (the next line) over its last
        ``morph`` of its time; blend is 0 at its start, 1 at the next line's start. Looping,
        the last line morphs back to the first; not looping, it holds once reached.
        """
        count, length = len(self.lines), self.length
        if loop:
            t %= length
        elif t >= length:
            return count - 1, count - 1, 0.0
        t = max(t, 0.0)
        starts = self.starts
        a = bisect.bisect_right(starts, t) - 1
        b = (a + 1) % count if loop or a + 1 < count else a
        if b == a:
            return a, a, 0.0
        into = (t - starts[a]) / self.lines[a].duration
        if morph <= 0.0:
            return a, b, 0.0  # cuts: each line holds its whole time
        return a, b, min(1.0, max(0.0, (into - (1.0 - morph)) / morph))

    def moment(self, t: float, *, loop: bool = True, morph: float = 1.0) -> Moment:
        return Moment(*self.at(t, loop=loop, morph=morph))

    def texts(self) -> list[str]:
        """Every prompt text the timeline uses, once each, in order."""
        return list(dict.fromkeys(p.text for line in self.lines for p in line.prompts))


# -- parsing -----------------------------------------------------------------------------------------
def parse_line(text: str, default_duration: float) -> TimelineLine:
    """``"a forest :1 | fog :0.5 @ 4"`` -> a line; ValueError with the reason."""
    body, duration = text.strip(), default_duration
    if "@" in body:
        body, _, number = body.rpartition("@")
        try:
            duration = float(number)
        except ValueError:
            raise ValueError(
                f"duration {number.strip()!r} is not a number (write 'prompt @ seconds', e.g. 'a forest @ 4')"
            ) from None
        if not math.isfinite(duration) or duration <= 0:
            raise ValueError(f"duration {number.strip()!r} must be a positive number")
    prompts = parse_prompts(body)
    if not prompts:
        raise ValueError("no prompt before the duration")
    return TimelineLine(tuple(prompts), duration, text.strip())


def parse_timeline(text: str, default_duration: float = 8.0, *, source: str = "timeline") -> Timeline:
    """Lines separated by newlines or ';' -> a Timeline; ValueError naming the bad line.

    Blank lines and lines (or ';' parts) starting with '#' are skipped: comments, as in
    Aphantasia's files, or a look left out for now.
    """
    lines = []
    for number, row in enumerate(text.splitlines(), start=1):
        if row.strip().startswith("#"):
            continue
        for part in row.split(";"):
            stripped = part.strip()
            if not stripped or stripped.startswith("#"):
                continue
            try:
                lines.append(parse_line(stripped, default_duration))
            except ValueError as exc:
                where = f"{source} line {number}" if "\n" in text.strip() else source
                raise ValueError(f"{where} {stripped!r}: {exc}") from None
    if not lines:
        raise ValueError(f"{source} has no prompt lines")
    if len(lines) > MAX_LINES:
        raise ValueError(f"{source}: {len(lines)} lines, at most {MAX_LINES}")
    return Timeline(tuple(lines))


def read_timeline_file(path: str | os.PathLike[str], default_duration: float = 8.0) -> Timeline:
    """A ``.txt`` timeline; ValueError (one line) for a file that is missing, unreadable or bad."""
    path = Path(path).expanduser()
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"{path} is over {MAX_FILE_BYTES // 1000} kB: not a timeline")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    return parse_timeline(text, default_duration, source=path.name)


# -- blending embeddings (torch, imported when first used) -----------------------------------------
def weighted_mix(a: Sequence[WeightedPrompt], b: Sequence[WeightedPrompt], blend: float) -> list[tuple[str, float]]:
    """Line a's prompts faded out and b's faded in, as (text, weight): the realtime scene's blend.

    ``engine.diffusion.prompts.blend`` folds them by slerp and drops zero weights, so at 0 it
    is exactly a, at 1 exactly b, and continuous in between.
    """
    if blend <= 0.0:
        return [(p.text, p.weight) for p in a]
    if blend >= 1.0:
        return [(p.text, p.weight) for p in b]
    return [(p.text, p.weight * (1.0 - blend)) for p in a] + [(p.text, p.weight * blend) for p in b]


def blend_targets(
    a: Sequence[tuple[torch.Tensor, float]], b: Sequence[tuple[torch.Tensor, float]], blend: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP targets between two lines: ((N, D) unit embeddings, (N,) weights) for the loss.

    Each line is (embedding (D,), weight) per prompt. Positive prompts are paired, every one of
    a with every one of b, and each pair's embedding slerps from a's to b's (one prompt a line:
    one target gliding along the great circle); each pair weighs a's share of it at 0 and b's
    at 1, so at 0 the loss is exactly line a's and at 1 line b's. Negative prompts (pushes
    away) fade out and in by weight.
    """
    import torch
    import torch.nn.functional as F

    from engine.diffusion.prompts import slerp

    def side(line: Sequence[tuple[torch.Tensor, float]], scale: float, positive: bool) -> list[tuple[Any, float]]:
        return [(F.normalize(e.float(), dim=-1), w * scale) for e, w in line if (w > 0) == positive and w * scale]

    if blend <= 0.0 or blend >= 1.0:
        chosen = side(a if blend <= 0.0 else b, 1.0, True) + side(a if blend <= 0.0 else b, 1.0, False)
    else:
        pos_a, pos_b = side(a, 1.0, True), side(b, 1.0, True)
        if pos_a and pos_b:
            total_a, total_b = sum(w for _, w in pos_a), sum(w for _, w in pos_b)
            chosen = [
                (slerp(ea, eb, blend), (1.0 - blend) * wa * wb / total_b + blend * wb * wa / total_a)
                for ea, wa in pos_a
                for eb, wb in pos_b
            ]
        else:  # one side pulls toward nothing: fade by weight
            chosen = side(a, 1.0 - blend, True) + side(b, blend, True)
        chosen += side(a, 1.0 - blend, False) + side(b, blend, False)
    if not chosen:
        empty = a[0][0] if a else b[0][0]
        return empty.new_zeros((0, empty.shape[-1])).float(), empty.new_zeros(0).float()
    targets = torch.stack([F.normalize(e, dim=-1) for e, _ in chosen])
    weights = torch.tensor([w for _, w in chosen], dtype=torch.float32, device=targets.device)
    return targets, weights


# -- a scene's timeline ---------------------------------------------------------------------------
def timeline_params() -> tuple[Param, ...]:
    """The ``timeline/*`` parameters a scene adds to its PARAMS (relative names)."""
    return (
        bool_param("timeline/enabled", False, description="Play the prompt timeline in place of prompt"),
        string_param(
            "timeline/prompts",
            "",
            description="Lines 'prompt @ duration' separated by ';' (prompt in the weighted syntax), e.g. "
            "'a forest @4; a city at night @8'; each line morphs into the next over its duration",
        ),
        string_param(
            "timeline/file",
            "",
            description="A .txt timeline, one 'prompt @ duration' line per look ('#' comments; Aphantasia's "
            "files read as they are); re-read when saved; wins over timeline/prompts",
        ),
        bool_param("timeline/sync", False, description="Durations count beats of the tempo instead of seconds"),
        float_param(
            "timeline/line_length",
            8.0,
            0.1,
            3600.0,
            description="How long a line without '@ duration' lasts: seconds, or beats when synced",
        ),
        float_param(
            "timeline/morph",
            1.0,
            0.0,
            1.0,
            description="The part of each line's time spent morphing into the next: 1 = always moving, "
            "0.25 = hold, then morph in the last quarter, 0 = cuts",
        ),
        bool_param("timeline/loop", True, description="After the last line, morph back to the first (off: hold it)"),
        float_param(
            "timeline/speed", 1.0, 0.0, 8.0, description="How fast the timeline plays: 1 = as written, 0 = hold still"
        ),
        float_param(
            "timeline/seek",
            0.0,
            0.0,
            1.0,
            description="Moving it jumps to that point of the timeline (0 = its start, 0.5 = half way)",
        ),
        trigger_param("timeline/restart", description="Back to the timeline's first line"),
    )


@dataclass(frozen=True)
class Playing:
    """What a scene plays at one moment: the timeline, where in it, and the two lines."""

    timeline: Timeline
    moment: Moment
    position: float

    @property
    def line_a(self) -> TimelineLine:
        return self.timeline.lines[self.moment.a]

    @property
    def line_b(self) -> TimelineLine:
        return self.timeline.lines[self.moment.b]

    @property
    def status(self) -> str:
        return f"timeline {self.moment.a + 1}/{len(self.timeline.lines)}"


class ScenePromptTimeline:
    """A scene's timeline: reads its ``timeline/*`` parameters, the file, the clock and the beat.

    The worker calls ``playing(now)`` once per step; it returns None while the timeline is off
    or has never been good (the scene plays its ``prompt``). A timeline (text or file) that
    does not parse is refused in one line (``refusal``, for the HUD) and the last good one plays
    on. ``attach`` / ``detach`` (load / unload) listen for the restart trigger and the seek fader,
    which land on the render thread.
    """

    def __init__(
        self,
        scene: str,
        params: ParamRegistry,
        path: Callable[[str], str],
        check: Callable[[Timeline], None] | None = None,
    ) -> None:
        from engine.scenes.base import LastGood  # (engine.scenes imports scenes, which import this)

        self.scene = scene
        self.params = params
        self._path = path  # the scene's own name -> its registry path
        self._check = check  # a scene's own refusal (the realtime scene takes no negative weights)
        self._timeline = LastGood(f"{scene}: timeline refused, the last good one plays on", self._parse)
        self.position = 0.0
        self._last: tuple[float, float] | None = None  # (seconds, beats) at the last step
        self._jump: float | None = None  # a seek (fraction) or restart (0.0) from the render thread
        self._jump_lock = threading.Lock()
        self._file_key: tuple[str, int, int] | tuple[str, str] | None = None
        self._file_checked = -math.inf
        self._enabled = False

    @property
    def refusal(self) -> str | None:
        """Why the timeline asked for is not playing (while it is enabled), for the HUD."""
        return self._timeline.refusal if self._enabled else None

    def attach(self) -> None:
        self.params.add_listener(self._on_change)

    def detach(self) -> None:
        self.params.remove_listener(self._on_change)

    def _param(self, name: str) -> Any:
        return self.params.get(self._path(name))

    def _on_change(self, change: Any) -> None:
        """Registry listener (render thread): a trigger is true for one frame only; catch it here."""
        if change.path == self._path("timeline/restart"):
            jump: float | None = 0.0
        elif change.path == self._path("timeline/seek"):
            jump = float(change.value)
        else:
            return
        with self._jump_lock:
            self._jump = jump

    # -- worker thread ------------------------------------------------------------------------------
    def playing(self, now: float) -> Playing | None:
        """The timeline at ``now`` (``time.monotonic`` seconds), or None: play the prompt."""
        self._enabled = enabled = bool(self._param("timeline/enabled"))
        timeline = self._timeline.update(self._source(now)) if enabled else None
        if timeline is None:
            self._last = None  # off: it starts again where it was when switched back on
            return None
        self._advance(now, self._beats(now), timeline)
        moment = timeline.moment(self.position, loop=self._param("timeline/loop"), morph=self._param("timeline/morph"))
        return Playing(timeline, moment, self.position)

    def _advance(self, now: float, beats: float, timeline: Timeline) -> None:
        sync, speed = self._param("timeline/sync"), self._param("timeline/speed")
        with self._jump_lock:
            jump, self._jump = self._jump, None
        if jump is not None:
            self.position = jump * timeline.length
            if sync and jump == 0.0:
                self.position = beats % 1.0  # a restart lands in the beat: lines turn on the beat
        elif self._last is None and sync and self.position == 0.0:
            self.position = beats % 1.0
        elif self._last is not None:
            seconds_then, beats_then = self._last
            self.position += speed * ((beats - beats_then) if sync else (now - seconds_then))
        self._last = (now, beats)

    def _beats(self, now: float) -> float:
        """The show's beat count (the Tempo's), else one counted from ``/tempo/bpm`` or 120 BPM."""
        from engine.control.tempo import beat_clock

        beat = beat_clock(self.params).beat_at(now)
        if beat is not None:
            return beat
        try:
            bpm = float(self.params.get("/tempo/bpm"))
        except ParamError:  # no tempo in this show
            bpm = DEFAULT_BPM
        return now * bpm / 60.0

    def _source(self, now: float) -> tuple[Any, ...]:
        """What the timeline is parsed from: the file (with its modification stamp) or the text."""
        length = float(self._param("timeline/line_length"))
        file = str(self._param("timeline/file")).strip()
        if not file:
            self._file_key = None
            return ("text", str(self._param("timeline/prompts")), length)
        if self._file_key is None or self._file_key[0] != file or now - self._file_checked >= FILE_CHECK_S:
            self._file_checked = now
            try:
                stat = Path(file).expanduser().stat()
                self._file_key = (file, stat.st_mtime_ns, stat.st_size)
            except OSError as exc:
                self._file_key = (file, exc.strerror or type(exc).__name__)
        return ("file", self._file_key, length)

    def _parse(self, source: tuple[Any, ...]) -> Timeline:
        kind, what, length = source
        if kind == "file":
            timeline = read_timeline_file(what[0], length)
        else:
            if not what.strip():
                raise ValueError("timeline/prompts is empty and no timeline/file is set")
            timeline = parse_timeline(what, length, source="timeline/prompts")
        if self._check is not None:
            self._check(timeline)
        log.info("%s: timeline of %d lines, %.4g long", self.scene, len(timeline.lines), timeline.length)
        return timeline


def refuse_negative_weights(timeline: Timeline) -> None:
    """For scenes that blend prompts and cannot push away from one (the realtime scene)."""
    for line in timeline.lines:
        for prompt in line.prompts:
            if prompt.weight < 0:
                raise ValueError(
                    f"{prompt.text!r} in {line.text!r} has a negative weight: this scene blends prompts and "
                    "cannot push away from one (vqgan_clip can)"
                )
