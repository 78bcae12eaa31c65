"""Opening hours: the piece fades to black when the gallery closes and back when it opens.

``parse_hours("Mon-Fri 10:00-18:00, Sat 12:00-20:00")`` gives a ``WeeklyHours``; the
``OpeningHours`` control reads a wall clock every frame, fades ``/output/master`` down
outside the hours and up inside them, and calls ``on_pause`` once the screen is black
(the lead wires it to the scene worker, so the accelerator rests at night) and
``on_resume`` as the opening fade starts.

Text forms, entries separated by ``,`` or ``;``::

    Mon-Fri 10:00-18:00, Sat 12:00-20:00     day ranges, 24-hour times
    Tue-Sun 10-13 14-18                        several ranges a day; hours without minutes
    Sat, Sun 12:00-20:00                       a list of days shares the next entry's hours
    Fri 20:00-02:00                            ends after midnight: Saturday 02:00
    daily 09:00-21:00 | weekdays ... | weekends ...
    always  (or 24/7)

Times are the wall clock's local time, read from an injectable ``datetime`` provider.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from engine.params import ParamError, ParamRegistry

log = logging.getLogger(__name__)

MASTER_PATH = "/output/master"
FADE_S = 3.0
DAY_S = 24 * 3600
WEEK_S = 7 * DAY_S
DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_DAYS = {name.lower(): i for i, name in enumerate(DAY_NAMES)}
_DAYS.update(
    {full: i for i, full in enumerate(("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"))}
)
_DAY_GROUPS = {"daily": range(7), "everyday": range(7), "weekdays": range(5), "weekends": range(5, 7)}
_TIME_RE = re.compile(r"(\d{1,2})(?::(\d{2}))?$")


class ScheduleError(ValueError):
    """Opening hours that cannot be read; the message quotes the part and says why."""


@dataclass(frozen=True)
class WeeklyHours:
    """Open intervals in seconds from Monday 00:00, sorted, merged, within one week."""

    intervals: tuple[tuple[int, int], ...]
    text: str = ""

    def is_open(self, when: datetime) -> bool:
        t = _week_seconds(when)
        return any(start <= t < end for start, end in self.intervals)

    def next_change(self, when: datetime) -> datetime | None:
        """When it next opens or closes after ``when``; None if it never changes."""
        if not self.intervals or self.intervals == ((0, WEEK_S),):
            return None
        t = _week_seconds(when)
        starts = {start for start, _ in self.intervals}
        ends = {end for _, end in self.intervals}
        edges = {e % WEEK_S for e in starts | ends}
        if 0 in starts and WEEK_S in ends:
            edges.discard(0)  # open over Sunday midnight: the week's seam is not a change
        edges_sorted = sorted(edges)
        for edge in [*edges_sorted, *(e + WEEK_S for e in edges_sorted)]:
            if edge > t:
                return when + timedelta(seconds=edge - t)
        raise AssertionError("a schedule that changes has a next change")


def _week_seconds(when: datetime) -> float:
    return when.weekday() * DAY_S + when.hour * 3600 + when.minute * 60 + when.second + when.microsecond / 1e6


def parse_hours(text: str) -> WeeklyHours:
    """Parse opening hours (see the module docstring); raise ScheduleError naming the bad part."""
    if not isinstance(text, str) or not text.strip():
        raise ScheduleError("opening hours are empty: write e.g. 'Mon-Fri 10:00-18:00, Sat 12:00-20:00'")
    if text.strip().lower() in ("always", "24/7"):
        return WeeklyHours(((0, WEEK_S),), text.strip())
    intervals: list[tuple[int, int]] = []
    waiting_days: list[int] = []  # "Sat, Sun 12-20": Sat waits for Sun's hours
    entries = [e.strip() for e in re.split(r"[,;]", text)]
    for index, entry in enumerate(entries):
        if not entry:
            raise ScheduleError(f"empty entry in {text!r} (two separators in a row?)")
        words = entry.split()
        days = _parse_days(words[0], entry)
        if len(words) == 1:
            if index == len(entries) - 1:
                raise ScheduleError(f"{entry!r}: which hours? e.g. '{words[0]} 10:00-18:00'")
            waiting_days += days
            continue
        days, waiting_days = waiting_days + days, []
        if len(words) == 2 and words[1].lower() == "closed":
            continue
        for word in words[1:]:
            start, end = _parse_range(word, entry)
            for day in days:
                begin = day * DAY_S + start
                finish = day * DAY_S + end if end > start else (day + 1) * DAY_S + end  # past midnight
                intervals += _wrap(begin, finish)
    return WeeklyHours(_merge(intervals), text.strip())


def _parse_days(word: str, entry: str) -> list[int]:
    lowered = word.lower()
    if lowered in _DAY_GROUPS:
        return list(_DAY_GROUPS[lowered])
    first, sep, last = lowered.partition("-")
    if first not in _DAYS or (sep and last not in _DAYS):
        raise ScheduleError(
            f"{entry!r}: {word!r} is not a day or day range "
            f"(days: {' '.join(DAY_NAMES)}; e.g. Mon-Fri; or daily, weekdays, weekends)"
        )
    a = _DAYS[first]
    b = _DAYS[last] if sep else a
    return [(a + i) % 7 for i in range((b - a) % 7 + 1)]  # Fri-Mon wraps over the weekend


def _parse_range(word: str, entry: str) -> tuple[int, int]:
    start_text, sep, end_text = word.partition("-")
    if not sep:
        raise ScheduleError(f"{entry!r}: {word!r} is not a time range like 10:00-18:00")
    start, end = _parse_time(start_text, entry), _parse_time(end_text, entry)
    if start == DAY_S:
        raise ScheduleError(f"{entry!r}: a range cannot start at 24:00")
    if start == end:
        raise ScheduleError(f"{entry!r}: {word!r} opens and closes at the same time")
    return start, end


def _parse_time(text: str, entry: str) -> int:
    match = _TIME_RE.match(text)
    if match is None:
        raise ScheduleError(f"{entry!r}: {text!r} is not a time like 9, 09:30 or 18:00")
    hours, minutes = int(match[1]), int(match[2] or 0)
    if minutes > 59 or hours > 24 or (hours == 24 and minutes):
        raise ScheduleError(f"{entry!r}: {text!r} is not a time of day (00:00 to 24:00)")
    return hours * 3600 + minutes * 60


def _wrap(begin: int, finish: int) -> list[tuple[int, int]]:
    """An interval that runs past Sunday midnight continues on Monday."""
    if finish <= WEEK_S:
        return [(begin, finish)]
    return [(begin, WEEK_S), (0, finish - WEEK_S)]


def _merge(intervals: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return tuple(merged)


def describe(when: datetime | None) -> str:
    return "-" if when is None else f"{DAY_NAMES[when.weekday()]} {when:%H:%M}"


# -- the control --------------------------------------------------------------------------


class OpeningHours:
    """A Control: fades ``/output/master`` to black outside the opening hours and back.

    The master's own value is respected: closing fades from wherever it stands and
    opening fades back to it. While closed, a change that brings the master up (a
    preset recall, a controller) is remembered for the opening and the screen stays
    black. Fades run on the app's clock (``frame(now)``), the hours on the wall clock.
    """

    name = "schedule"

    def __init__(
        self,
        params: ParamRegistry,
        hours: WeeklyHours,
        *,
        wallclock: Callable[[], datetime] = datetime.now,
        fade_s: float = FADE_S,
        on_pause: Callable[[], Any] | None = None,
        on_resume: Callable[[], Any] | None = None,
        master: str = MASTER_PATH,
    ) -> None:
        if master not in params:
            raise ParamError(f"opening hours need the parameter {master} (float 0..1) to fade the output")
        if fade_s < 0:
            raise ValueError("fade_s must not be negative")
        self.params = params
        self.hours = hours
        self.wallclock = wallclock
        self.fade_s = fade_s
        self.on_pause = on_pause
        self.on_resume = on_resume
        self.master = master
        self.open_now = True
        self.paused = False
        self._level = 1.0  # 0 black .. 1 the master's own value
        self._restore = 1.0  # the master's value to come back to
        self._last: float | None = None

    @property
    def status(self) -> str:
        when = self.hours.next_change(self.wallclock())
        if self.open_now:
            return "open" if when is None else f"open until {describe(when)}"
        state = "closed" if self._level == 0.0 else "closing"
        return state if when is None else f"{state}, opens {describe(when)}"

    def start(self) -> None:
        self._last = None

    def stop(self) -> None:
        """Nothing runs in the background; the master stays where it is."""

    def frame(self, now: float) -> None:
        is_open = self.hours.is_open(self.wallclock())
        if self._last is None:  # first frame: take the state at once, no fade (nobody watched the start)
            self._last = now
            self._restore = float(self.params.target(self.master))
            self.open_now = is_open
            self._level = 1.0 if is_open else 0.0
            if not is_open:
                self._set_master(0.0)
                self._pause()
            log.info("opening hours %r: %s", self.hours.text, self.status)
            return
        dt, self._last = max(0.0, now - self._last), now

        if is_open != self.open_now:
            self.open_now = is_open
            log.info("opening hours: %s", "open: fading in" if is_open else "closed: fading to black")
            if is_open:
                self._resume()
            elif self._level == 1.0:
                self._restore = float(self.params.target(self.master))
        target = 1.0 if is_open else 0.0
        if self._level == target:
            if not is_open:
                self._hold_black()
            return
        step = dt / self.fade_s if self.fade_s > 0 else 1.0
        self._level = min(target, self._level + step) if is_open else max(target, self._level - step)
        self._set_master(self._restore * self._level)
        if self._level == 0.0:
            self._pause()

    def _hold_black(self) -> None:
        value = float(self.params.target(self.master))
        if value != 0.0:  # someone brought it up while closed: keep it for the opening, stay black
            self._restore = value
            self._set_master(0.0)

    def _set_master(self, value: float) -> None:
        self.params.set(self.master, value, origin="schedule")

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            self._call(self.on_pause, "pause")

    def _resume(self) -> None:
        if self.paused:
            self.paused = False
            self._call(self.on_resume, "resume")

    @staticmethod
    def _call(callback: Callable[[], Any] | None, what: str) -> None:
        if callback is None:
            return
        try:
            callback()
        except Exception:  # runs in the frame loop: a failing hook is logged, the fade goes on
            log.exception("opening hours: the %s callback failed", what)
