"""Opening hours: parsing, the weekly schedule, and the fade control on a real registry and App.

The wall clock is a ``FakeWallClock`` the test moves; the fades run on the app's
ManualClock. 2024-01-01 was a Monday.
"""

from __future__ import annotations

import logging
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from engine.app import App, AppConfig
from engine.clock import ManualClock
from engine.params import ParamError, ParamRegistry, float_param
from engine.render.surface import HeadlessSurface
from engine.schedule import MASTER_PATH, OpeningHours, ScheduleError, WeeklyHours, parse_hours

ROOT = Path(__file__).resolve().parents[1]
MONDAY = datetime(2024, 1, 1)


def at(day: int, hh: int, mm: int = 0, ss: int = 0) -> datetime:
    """Day 0 is Monday 1 January 2024."""
    return MONDAY + timedelta(days=day, hours=hh, minutes=mm, seconds=ss)


def open_hours(hours: WeeklyHours, day: int) -> list[int]:
    """The hours of ``day`` at which it is open (checked at half past)."""
    return [h for h in range(24) if hours.is_open(at(day, h, 30))]


# -- parsing ----------------------------------------------------------------------------------


def test_weekdays_and_saturday() -> None:
    hours = parse_hours("Mon-Fri 10:00-18:00, Sat 12:00-20:00")
    for day in range(5):
        assert open_hours(hours, day) == list(range(10, 18))
    assert open_hours(hours, 5) == list(range(12, 20))
    assert open_hours(hours, 6) == []
    assert hours.is_open(at(0, 10, 0, 0)) and not hours.is_open(at(0, 18, 0, 0)), "opens at 10:00, closed at 18:00"
    assert hours.is_open(at(0, 17, 59, 59))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Tue-Sun 10-13 14-18", {1: [10, 11, 12, 14, 15, 16, 17], 0: []}),
        ("Sat, Sun 12:00-20:00", {5: list(range(12, 20)), 6: list(range(12, 20)), 4: []}),
        ("daily 9-21", {d: list(range(9, 21)) for d in range(7)}),
        ("weekdays 8-9; weekends 20-22", {0: [8], 4: [8], 5: [20, 21], 6: [20, 21]}),
        ("Fri-Mon 10-11", {4: [10], 5: [10], 6: [10], 0: [10], 1: []}),  # a day range across the weekend
        ("monday 00:00-24:00, Tue closed", {0: list(range(24)), 1: []}),
        ("MON 10:00-12:00", {0: [10, 11]}),
    ],
)
def test_forms(text: str, expected: dict[int, list[int]]) -> None:
    hours = parse_hours(text)
    for day, hour_list in expected.items():
        assert open_hours(hours, day) == hour_list, (text, day)


def test_hours_past_midnight_run_into_the_next_day() -> None:
    hours = parse_hours("Fri 20:00-02:00, Sun 22:00-01:00")
    assert open_hours(hours, 4) == [20, 21, 22, 23]
    assert open_hours(hours, 5) == [0, 1]
    assert open_hours(hours, 6) == [22, 23]
    assert open_hours(hours, 0) == [0], "Sunday night runs into Monday morning"


def test_always() -> None:
    for text in ("always", "24/7", "daily 00:00-24:00"):
        hours = parse_hours(text)
        assert all(open_hours(hours, d) == list(range(24)) for d in range(7))
        assert hours.next_change(at(3, 12)) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("Mon-Fri", "which hours"),
        ("Funday 10-18", "'Funday' is not a day"),
        ("Mon 25:00-26:00", "not a time of day"),
        ("Mon 10:60-11", "not a time of day"),
        ("Mon 24:00-02:00", "cannot start at 24:00"),
        ("Mon 10:00-10:00", "opens and closes at the same time"),
        ("Mon 10am-6pm", "not a time like"),
        ("Mon 10:00", "not a time range"),
        ("Mon 10-18,, Tue 10-18", "empty entry"),
        ("Mon-Xyz 10-18", "not a day or day range"),
    ],
)
def test_bad_text_is_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        parse_hours(text)


def test_next_change() -> None:
    hours = parse_hours("Mon-Fri 10:00-18:00, Sat 12:00-20:00")
    assert hours.next_change(at(0, 9)) == at(0, 10)
    assert hours.next_change(at(0, 10)) == at(0, 18)
    assert hours.next_change(at(4, 19)) == at(5, 12)
    assert hours.next_change(at(5, 21)) == at(7, 10), "Saturday night: opens next Monday"
    overnight = parse_hours("Sun 22:00-02:00")
    assert overnight.next_change(at(6, 23)) == at(7, 2), "closes Monday 02:00, across the week's seam"
    assert overnight.next_change(at(0, 1)) == at(0, 2)


# -- the control ----------------------------------------------------------------------------


class FakeWallClock:
    def __init__(self, when: datetime) -> None:
        self.when = when

    def __call__(self) -> datetime:
        return self.when


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")


def registry_with_master() -> ParamRegistry:
    registry = ParamRegistry()
    registry.declare(float_param(MASTER_PATH, 1.0, 0.0, 1.0, description="output brightness"))
    return registry


class Show:
    """A registry and an opening-hours control, stepped frame by frame as the App steps them."""

    def __init__(self, text: str, when: datetime, fade_s: float = 1.0) -> None:
        self.params = registry_with_master()
        self.wall = FakeWallClock(when)
        self.hooks = Recorder()
        self.control = OpeningHours(
            self.params,
            parse_hours(text),
            wallclock=self.wall,
            fade_s=fade_s,
            on_pause=self.hooks.pause,
            on_resume=self.hooks.resume,
        )
        self.now = 0.0
        self.control.start()

    def frames(self, n: int, dt: float = 0.1) -> list[float]:
        """Step n frames; the master's value after each."""
        values = []
        for _ in range(n):
            self.now += dt
            self.control.frame(self.now)
            self.params.apply_pending(dt)  # what it set lands at the next frame boundary
            values.append(self.params.target(MASTER_PATH))
        return values


def test_fades_to_black_at_closing_and_back_at_opening() -> None:
    show = Show("Mon-Fri 10:00-18:00", at(0, 17, 59), fade_s=1.0)
    assert show.frames(5) == [1.0] * 5 and show.control.open_now and show.hooks.calls == []
    assert show.control.status == "open until Mon 18:00"

    show.wall.when = at(0, 18, 0)
    values = show.frames(12)
    assert all(a > b for a, b in zip(values[:9], values[1:10])), f"a fade, not a cut: {values}"
    assert values[0] > 0.5 and values[-1] == 0.0
    assert show.hooks.calls == ["pause"], "paused once the screen is black"
    assert not show.control.open_now and show.control.status == "closed, opens Tue 10:00"

    show.params.set(MASTER_PATH, 0.7, origin="preset")  # something brings it up while closed
    assert show.frames(3)[-1] == 0.0, "the screen stays black outside the hours"

    show.wall.when = at(1, 10, 0)
    values = show.frames(12)
    assert show.hooks.calls == ["pause", "resume"]
    assert all(a < b for a, b in zip(values[:9], values[1:10])), values
    assert values[-1] == pytest.approx(0.7), "it comes back to the value set while closed"
    show.frames(5)
    assert show.params.target(MASTER_PATH) == pytest.approx(0.7) and show.hooks.calls == ["pause", "resume"]


def test_the_operators_master_is_respected_while_open() -> None:
    show = Show("daily 10-18", at(2, 12))
    show.frames(2)
    show.params.set(MASTER_PATH, 0.4, origin="midi")
    assert show.frames(10)[-1] == 0.4, "open: the control leaves the master alone"
    show.wall.when = at(2, 18)
    show.frames(20)
    show.wall.when = at(3, 10)
    assert show.frames(20)[-1] == pytest.approx(0.4), "closing and opening comes back to the operator's 0.4"


def test_starting_while_closed_goes_black_at_once() -> None:
    show = Show("Mon-Fri 10:00-18:00", at(5, 3))  # Saturday, 3 am: a restart at night
    assert show.frames(1) == [0.0], "no fade when nobody watched the start"
    assert show.hooks.calls == ["pause"] and not show.control.open_now


def test_a_failing_callback_is_logged_and_the_fade_goes_on(caplog) -> None:
    params = registry_with_master()
    wall = FakeWallClock(at(0, 12))

    def broken() -> None:
        raise RuntimeError("worker gone")

    control = OpeningHours(params, parse_hours("Mon 10-13"), wallclock=wall, fade_s=0.0, on_pause=broken)
    control.frame(0.0)
    wall.when = at(0, 13)
    with caplog.at_level(logging.ERROR, logger="engine.schedule"):
        control.frame(0.1)
    params.apply_pending(0.1)
    assert params.target(MASTER_PATH) == 0.0 and control.paused
    assert any("pause callback failed" in r.getMessage() for r in caplog.records)


def test_the_master_parameter_is_required() -> None:
    with pytest.raises(ParamError, match="/output/master"):
        OpeningHours(ParamRegistry(), parse_hours("always"))


def test_in_the_app_as_a_control(tmp_path: Path) -> None:
    presets = tmp_path / "presets"
    presets.mkdir()
    shutil.copy(ROOT / "presets" / "default.toml", presets)
    surface = HeadlessSurface()
    app = App(
        AppConfig(source="pattern", presets_dir=presets, output_size=(160, 90), hot_reload=False),
        surface,
        ManualClock(60.0),
    )
    try:
        if MASTER_PATH not in app.params:  # declared by the output stage once it is wired in
            app.params.declare(float_param(MASTER_PATH, 1.0, 0.0, 1.0))
        wall = FakeWallClock(at(0, 17, 59, 59))
        hooks = Recorder()
        schedule = app.add_control(
            OpeningHours(
                app.params,
                parse_hours("Mon-Fri 10:00-18:00"),
                wallclock=wall,
                fade_s=0.5,
                on_pause=hooks.pause,
                on_resume=hooks.resume,
            )
        )
        app.start()
        for _ in range(5):
            app.step()
        assert app.params.target(MASTER_PATH) == 1.0
        wall.when = at(0, 18)
        for _ in range(40):  # 0.67 s of frames: longer than the 0.5 s fade
            app.step()
        assert app.params.target(MASTER_PATH) == 0.0 and hooks.calls == ["pause"]
        assert schedule.status == "closed, opens Tue 10:00" and not schedule.open_now
    finally:
        app.close()
        surface.close()
