"""The parameter registry: coercion, the frame boundary, smoothing, triggers, threads.

No GL and no clock here: time is the ``dt`` handed to ``apply_pending``.
"""

from __future__ import annotations

import math
import threading

import pytest

from engine.params import (
    MAX_STRING,
    Change,
    Kind,
    Param,
    ParamError,
    ParamRegistry,
    bool_param,
    colour_param,
    enum_param,
    float_param,
    int_param,
    string_param,
    trigger_param,
)


def make_registry() -> ParamRegistry:
    registry = ParamRegistry()
    registry.declare_all(
        [
            float_param("/t/level", 0.5, 0.0, 1.0, description="a plain float"),
            float_param("/t/smooth", 0.0, 0.0, 10.0, smoothing=0.5, description="a smoothed float"),
            int_param("/t/count", 6, 1, 32, description="an int"),
            bool_param("/t/on", False, description="a bool"),
            enum_param("/t/mode", "normal", ("normal", "add", "multiply"), description="an enum"),
            string_param("/t/prompt", "a cat", description="text"),
            trigger_param("/t/go", description="a trigger"),
            colour_param("/t/tint", "#ffffff", description="a colour"),
        ]
    )
    return registry


# -- coercion --------------------------------------------------------------------------

GOOD = [
    ("/t/level", 0.25, 0.25),
    ("/t/level", 1, 1.0),
    ("/t/level", True, 1.0),
    ("/t/count", 7, 7),
    ("/t/count", 7.4, 7),
    ("/t/count", 32, 32),
    ("/t/on", True, True),
    ("/t/on", 0, False),
    ("/t/on", 1.0, True),
    ("/t/on", "On", True),
    ("/t/on", "no", False),
    ("/t/mode", "add", "add"),
    ("/t/mode", 2, "multiply"),
    ("/t/mode", 1.0, "add"),
    ("/t/prompt", "a dog", "a dog"),
    ("/t/prompt", "", ""),
    ("/t/tint", "#ff0000", (1.0, 0.0, 0.0, 1.0)),
    ("/t/tint", "00FF0080", (0.0, 1.0, 0.0, 128 / 255)),
    ("/t/tint", (0.0, 0.5, 1.0), (0.0, 0.5, 1.0, 1.0)),
    ("/t/tint", [1, 0, 0, 0.5], (1.0, 0.0, 0.0, 0.5)),
]


@pytest.mark.parametrize("path, value, expected", GOOD, ids=lambda v: str(v)[:24])
def test_good_values_are_coerced(path, value, expected):
    registry = make_registry()
    assert registry.set(path, value) == expected
    registry.apply_pending(0.0)
    got = registry.get(path)
    assert got == pytest.approx(expected) if isinstance(expected, tuple) else got == expected
    assert type(got) is type(expected)


BAD = [
    ("/t/level", "loud", "expected a number"),
    ("/t/level", None, "expected a number"),
    ("/t/level", [0.5], "expected a number"),
    ("/t/level", 1.5, "out of range"),
    ("/t/level", -0.1, "out of range"),
    ("/t/level", math.nan, "not a finite number"),
    ("/t/level", math.inf, "not a finite number"),
    ("/t/level", 10**400, "not a finite number"),  # JSON allows ints no float can hold
    ("/t/count", 0, "out of range"),
    ("/t/count", 32.6, "out of range"),
    ("/t/count", math.nan, "not a finite number"),
    ("/t/count", "six", "expected a number"),
    ("/t/on", "maybe", "true/false"),
    ("/t/on", 2, "true/false"),
    ("/t/on", None, "true/false"),
    ("/t/mode", "overlay", "not one of normal, add, multiply"),
    ("/t/mode", 3, "not one of"),
    ("/t/mode", -1, "not one of"),
    ("/t/mode", 1.5, "not one of"),
    ("/t/mode", math.nan, "not one of"),
    ("/t/mode", 10**400, "not one of"),
    ("/t/mode", True, "not one of"),
    ("/t/prompt", 42, "expected text"),
    ("/t/prompt", "x" * (MAX_STRING + 1), "longer than"),
    ("/t/tint", "#ff00", "#rrggbb"),
    ("/t/tint", "#gg0000", "#rrggbb"),
    ("/t/tint", "#-10000", "#rrggbb"),  # int("-1", 16) is -1: not a colour channel
    ("/t/tint", "#+1ff00", "#rrggbb"),
    ("/t/tint", (1.0, 0.0), "3 or 4 numbers"),
    ("/t/tint", (1.5, 0.0, 0.0), "3 or 4 numbers"),
    ("/t/tint", (math.nan, 0.0, 0.0), "3 or 4 numbers"),
    ("/t/tint", (10**400, 0.0, 0.0), "3 or 4 numbers"),
    ("/t/tint", (True, 0.0, 0.0), "3 or 4 numbers"),
    ("/t/tint", 0xFF0000, "3 or 4 numbers"),
]


@pytest.mark.parametrize("path, value, why", BAD, ids=lambda v: str(v)[:24])
def test_bad_values_are_refused_naming_the_path(path, value, why):
    registry = make_registry()
    before = registry.get(path)
    with pytest.raises(ParamError) as info:
        registry.set(path, value)
    assert path in str(info.value)
    assert why in str(info.value)
    registry.apply_pending(0.0)
    assert registry.get(path) == before


def test_unknown_path_is_refused_by_name():
    registry = make_registry()
    for call in (
        lambda: registry.set("/t/nope", 1),
        lambda: registry.get("/t/nope"),
        lambda: registry.param("/t/nope"),
        lambda: registry.set_normalised("/t/nope", 0.5),
    ):
        with pytest.raises(ParamError, match="/t/nope"):
            call()


def test_declarations_are_checked():
    for bad in ("/a//b", "/a/", "/", ""):
        with pytest.raises(ParamError, match="bad parameter path"):
            float_param(bad, 0.0, 0.0, 1.0)
    relative = float_param("no/slash", 0.0, 0.0, 1.0)  # a scene's own name for it: placed under a group later
    assert relative.under("/scene/x").path == "/scene/x/no/slash"
    with pytest.raises(ParamError, match="relative name"):
        ParamRegistry().declare(relative)
    with pytest.raises(ParamError, match="/a/b"):
        Param("/a/b", Kind.FLOAT, 0.0)  # no range
    with pytest.raises(ParamError, match="/a/e"):
        Param("/a/e", Kind.ENUM, "x")  # no choices
    with pytest.raises(ParamError, match="/a/f"):
        float_param("/a/f", 2.0, 0.0, 1.0)  # default out of range

    registry = make_registry()
    registry.declare(float_param("/t/level", 0.5, 0.0, 1.0, description="a plain float"))  # same: fine
    with pytest.raises(ParamError, match="already declared differently"):
        registry.declare(float_param("/t/level", 0.5, 0.0, 2.0, description="a plain float"))
    with pytest.raises(ParamError, match="clashes"):
        registry.declare(float_param("/t/level/sub", 0.0, 0.0, 1.0))
    with pytest.raises(ParamError, match="clashes"):
        registry.declare(float_param("/t", 0.0, 0.0, 1.0))


# -- the frame boundary ----------------------------------------------------------------


def test_values_land_only_at_apply_pending():
    registry = make_registry()
    registry.set("/t/level", 0.9)
    registry.set("/t/mode", "add")
    assert registry.get("/t/level") == 0.5
    assert registry.get("/t/mode") == "normal"
    assert registry.snapshot("/t/")["/t/level"] == 0.5
    landed = registry.apply_pending(1 / 60)
    assert [c.path for c in landed] == ["/t/level", "/t/mode"]
    assert registry.get("/t/level") == 0.9
    assert registry.get("/t/mode") == "add"


def test_last_set_in_a_frame_wins():
    registry = make_registry()
    registry.set("/t/count", 3)
    registry.set("/t/count", 9)
    registry.apply_pending(0.0)
    assert registry.get("/t/count") == 9


def test_set_many_is_all_or_nothing():
    registry = make_registry()
    with pytest.raises(ParamError, match="/t/count"):
        registry.set_many({"/t/level": 0.1, "/t/count": 99, "/t/mode": "add"})
    with pytest.raises(ParamError, match="/t/nope"):
        registry.set_many({"/t/level": 0.1, "/t/nope": 1})
    assert registry.apply_pending(0.0) == []
    assert registry.get("/t/level") == 0.5
    assert registry.get("/t/mode") == "normal"

    assert registry.set_many({"/t/level": 0.1, "/t/count": 9.0}) == {"/t/level": 0.1, "/t/count": 9}
    registry.apply_pending(0.0)
    assert (registry.get("/t/level"), registry.get("/t/count")) == (0.1, 9)


def test_smoothing_is_exponential_and_reaches_the_target():
    registry = make_registry()
    tau = registry.param("/t/smooth").smoothing
    registry.set("/t/smooth", 10.0)
    assert registry.target("/t/smooth") == 0.0  # not landed yet

    registry.apply_pending(tau)
    first = registry.get("/t/smooth")
    assert first == pytest.approx(10.0 * (1 - math.exp(-1)), rel=1e-9)
    assert registry.target("/t/smooth") == 10.0

    registry.apply_pending(tau)
    assert registry.get("/t/smooth") == pytest.approx(10.0 * (1 - math.exp(-2)), rel=1e-9)

    registry.apply_pending(0.0)  # no time, no movement
    assert registry.get("/t/smooth") == pytest.approx(10.0 * (1 - math.exp(-2)), rel=1e-9)

    values = [registry.get("/t/smooth")]
    for _ in range(600):  # 10 s, 20 time constants
        registry.apply_pending(1 / 60)
        values.append(registry.get("/t/smooth"))
    assert all(b >= a for a, b in zip(values, values[1:]))  # never overshoots or turns back
    assert registry.get("/t/smooth") == 10.0  # lands exactly, not forever 1e-12 short

    registry.set("/t/smooth", 0.0)
    registry.apply_pending(tau)
    assert registry.get("/t/smooth") == pytest.approx(10.0 * math.exp(-1), rel=1e-9)


def test_unsmoothed_values_jump():
    registry = make_registry()
    registry.set("/t/level", 0.75)
    registry.apply_pending(1e-6)
    assert registry.get("/t/level") == 0.75


def test_triggers_fire_for_exactly_one_frame():
    registry = make_registry()
    assert registry.get("/t/go") is False
    registry.apply_pending(0.0)
    assert registry.get("/t/go") is False

    registry.set("/t/go", 1)
    registry.set("/t/go", None)  # two presses in one frame are one firing
    assert registry.get("/t/go") is False
    registry.apply_pending(0.0)
    assert registry.get("/t/go") is True
    registry.apply_pending(0.0)
    assert registry.get("/t/go") is False
    registry.apply_pending(0.0)
    assert registry.get("/t/go") is False

    registry.set("/t/go", True)
    registry.apply_pending(0.0)
    assert registry.get("/t/go") is True
    assert "/t/go" not in registry.snapshot()


def test_a_removed_listener_hears_nothing_more():
    registry = make_registry()
    kept: list[Change] = []
    removed: list[Change] = []
    registry.add_listener(kept.append)
    registry.add_listener(removed.append)
    registry.set("/t/level", 0.2, origin="osc")
    registry.apply_pending(0.0)
    registry.remove_listener(removed.append)  # an equal bound method: how a scene removes itself
    registry.remove_listener(print)  # never added: ignored
    registry.set("/t/level", 0.3, origin="osc")
    registry.apply_pending(0.0)
    assert [c.value for c in kept] == [0.2, 0.3] and [c.value for c in removed] == [0.2]


def test_listeners_get_each_change_with_its_origin():
    registry = make_registry()
    seen: list[Change] = []
    registry.add_listener(seen.append)
    registry.set("/t/level", 0.2, origin="osc")
    registry.set("/t/mode", "add", origin="midi")
    registry.set("/t/go", True, origin="web")
    assert seen == []  # nothing before the frame boundary
    registry.apply_pending(0.0)
    assert seen == [Change("/t/level", 0.2, "osc"), Change("/t/mode", "add", "midi"), Change("/t/go", True, "web")]
    assert registry.last_change == Change("/t/go", True, "web")

    seen.clear()
    registry.set("/t/level", 0.2, origin="osc")  # no change: nobody is told
    registry.set("/t/count", 12, origin="preset")
    registry.apply_pending(0.0)
    assert seen == [Change("/t/count", 12, "preset")]
    assert registry.last_change == Change("/t/go", True, "web")  # presets and the engine are not "outside"


def test_a_broken_listener_does_not_stop_the_others():
    registry = make_registry()
    seen: list[str] = []

    def broken(change: Change) -> None:
        raise RuntimeError("view failed")

    registry.add_listener(broken)
    registry.add_listener(lambda c: seen.append(c.path))
    registry.set("/t/level", 0.3)
    registry.apply_pending(0.0)
    assert seen == ["/t/level"]
    assert registry.get("/t/level") == 0.3


# -- 0..1 form -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, values",
    [
        ("/t/level", [0.0, 0.25, 0.5, 1.0]),
        ("/t/smooth", [0.0, 3.3, 10.0]),
        ("/t/count", [1, 2, 16, 31, 32]),
        ("/t/mode", ["normal", "add", "multiply"]),
        ("/t/on", [False, True]),
    ],
)
def test_normalise_round_trip(path, values):
    param = make_registry().param(path)
    for value in values:
        x = param.normalise(value)
        assert 0.0 <= x <= 1.0
        back = param.denormalise(x)
        assert back == pytest.approx(value) if param.kind is Kind.FLOAT else back == value


def test_normalise_ends_and_clamping():
    registry = make_registry()
    count = registry.param("/t/count")
    assert count.normalise(1) == 0.0 and count.normalise(32) == 1.0
    assert count.denormalise(-3.0) == 1 and count.denormalise(7.0) == 32
    assert registry.param("/t/mode").denormalise(0.5) == "add"
    for bad in (math.nan, "0.5", None, 10**400):
        with pytest.raises(ParamError, match="/t/count"):
            count.denormalise(bad)
    for path in ("/t/prompt", "/t/tint"):
        with pytest.raises(ParamError, match=path):
            registry.param(path).normalise(registry.get(path))
    registry.set_normalised("/t/level", 0.25, origin="midi")
    registry.apply_pending(0.0)
    assert registry.get("/t/level") == 0.25
    assert registry.last_change == Change("/t/level", 0.25, "midi")


# -- threads ---------------------------------------------------------------------------


def test_concurrent_sets_land_in_order_per_thread():
    threads_n, sets_n = 8, 1000
    registry = ParamRegistry()
    for t in range(threads_n):
        registry.declare(int_param(f"/thread/{t}", 0, 0, sets_n, description="counter"))
    seen: dict[str, list[int]] = {f"/thread/{t}": [] for t in range(threads_n)}
    origins: dict[str, set[str]] = {path: set() for path in seen}

    def listener(change: Change) -> None:
        seen[change.path].append(change.value)
        origins[change.path].add(change.origin)

    registry.add_listener(listener)
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n + 1)

    def writer(t: int) -> None:
        try:
            start.wait()
            for i in range(1, sets_n + 1):
                registry.set(f"/thread/{t}", i, origin=f"thread{t}")
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(threads_n)]
    for th in threads:
        th.start()
    start.wait()
    frames = 0
    while any(th.is_alive() for th in threads):
        registry.apply_pending(1 / 60)  # the render thread keeps running its frames meanwhile
        frames += 1
    for th in threads:
        th.join()
    registry.apply_pending(1 / 60)

    assert errors == []
    for t in range(threads_n):
        path = f"/thread/{t}"
        assert seen[path] == list(range(1, sets_n + 1)), path  # every set landed, in its thread's order
        assert origins[path] == {f"thread{t}"}
        assert registry.get(path) == sets_n


# -- the engine's own declarations -----------------------------------------------------


def test_build_registry_paths_are_unique_and_described(monkeypatch):
    import engine.catalog

    declared: list[str] = []

    class RecordingRegistry(ParamRegistry):
        def declare(self, param: Param) -> Param:
            declared.append(param.path)
            return super().declare(param)

    monkeypatch.setattr(engine.catalog, "ParamRegistry", RecordingRegistry)
    registry = engine.catalog.build_registry()
    params = registry.params()

    duplicates = sorted({p for p in declared if declared.count(p) > 1})
    assert duplicates == []  # declaring the same param twice is silent in the registry: catch it here
    paths = [p.path for p in params]
    assert sorted(paths) == sorted(declared)
    for a in paths:
        for b in paths:
            assert not b.startswith(a + "/"), f"{a} is both a value and a group ({b})"
    undescribed = [p.path for p in params if not p.description.strip()]
    assert undescribed == []
    for p in params:
        if p.kind is not Kind.TRIGGER:
            assert p.coerce(p.default) == p.default, p.path
            assert registry.get(p.path) == p.default, p.path
    for must in (
        "/scene/active",
        "/mix/transition",
        "/fx/feedback/amount",
        "/fx/kaleido/segments",
        "/layer/source/opacity",
        "/layer/scene/blend",
    ):
        assert must in registry
