"""Actions declared as data: the declaration checks itself, its handlers and every call.
(The views' own tests send wrong calls over real UDP, HTTP and JACK MIDI; this is the one
place they all go through.)"""

from __future__ import annotations

import pytest

from engine.control.actions import ACTIONS, ActionError, Actions, ActionSpec, Arg


def test_a_declaration_refuses_shapes_no_view_could_call() -> None:
    with pytest.raises(ValueError, match="required argument b after an optional one"):
        ActionSpec("x/y", "", (Arg("a", "int", 0), Arg("b", "int")))
    with pytest.raises(ValueError, match="a text argument .t. must come last"):
        ActionSpec("x/y", "", (Arg("t", "text"), Arg("n", "int")))
    with pytest.raises(ValueError, match="type 'list' is not one of"):
        Arg("a", "list")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bad action name"):
        ActionSpec("/x/y", "")


def test_bind_converts_as_every_view_needs_and_fills_defaults() -> None:
    spec = ActionSpec("fx/burst", "", (Arg("count", "int"), Arg("speed", "float", 1.0), Arg("label", "str|int", "a")))
    assert spec.signature == "fx/burst(count: int, speed: float = 1.0, label: str|int = 'a')"
    assert spec.bind([3]) == (3, 1.0, "a")
    assert spec.bind([3.0, 2, 7.0]) == (3, 2.0, 7), "whole floats are whole numbers; ints are floats"
    refusals = {
        (): "fx/burst(count: int, speed: float = 1.0, label: str|int = 'a'): got 0 arguments",
        (1, 2, 3, 4): "got 4 arguments (1, 2, 3, 4)",
        (True,): "count takes a whole number, got True",
        ("3",): "count takes a whole number, got '3'",
        (1, float("inf")): "speed takes a number, got inf",
        (1, 1.0, None): "label takes a name or a whole number, got None",
    }
    for args, message in refusals.items():
        with pytest.raises(ActionError) as caught:
            spec.bind(list(args))
        assert str(caught.value).startswith(spec.signature) and message in str(caught.value)
        assert "\n" not in str(caught.value)


def test_register_checks_the_handler_takes_the_declared_arguments() -> None:
    actions = Actions()
    with pytest.raises(ValueError, match="unknown action 'self/destruct'"):
        actions.register("self/destruct", lambda: None)
    with pytest.raises(ValueError, match=r"the handler for scene/select\(ref: str\|int\) cannot take"):
        actions.register("scene/select", lambda: None)
    with pytest.raises(ValueError, match="cannot take its arguments"):
        actions.register("midi/learn", lambda path: None)  # mode is declared: the handler must take it
    calls = []
    actions.register("midi/learn", lambda path, mode: calls.append((path, mode)))
    assert actions.post("midi/learn", "/fx/kaleido/segments") == ("/fx/kaleido/segments", "")
    assert actions.run_pending() == 1 and calls == [("/fx/kaleido/segments", "")]


def test_post_refuses_what_this_engine_lacks_or_the_declaration_refuses() -> None:
    actions = Actions()
    actions.register("scene/next", lambda: None)
    with pytest.raises(ActionError, match="^unknown action 'nope'$"):
        actions.post("nope")
    with pytest.raises(ActionError, match="^tap is not available in this engine$"):
        actions.post("tap")
    with pytest.raises(ActionError, match=r"^scene/next\(\): got 1 argument \(1\)$"):
        actions.post("scene/next", 1)
    assert [spec.name for spec in actions.available()] == ["scene/next"]
    assert actions.available()[0] is ACTIONS["scene/next"]
