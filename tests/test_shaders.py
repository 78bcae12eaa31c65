"""Shader files: #include, variants, hot reload and broken edits, on a real GL context.

Every test edits its own copy of shaders/ (the ``shader_root`` fixture). Hot reload is
driven by hand, as the watcher thread and the frame loop would: ``check_files()`` then
``poll()``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from engine.catalog import build_registry
from engine.render.compositor import Compositor
from engine.render.shaders import ShaderError, ShaderLibrary

W, H = 32, 18
COLOUR = (100, 150, 200)


def edit(path: Path, old: str, new: str) -> int:
    """Replace text in a shader file; returns the 1-based line of the edit.

    The mtime is moved on explicitly: two saves within one filesystem clock tick would
    otherwise look like no change at all.
    """
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} not found once in {path.name}"
    line = text[: text.index(old)].count("\n") + 1
    before = path.stat().st_mtime_ns
    path.write_text(text.replace(old, new))
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))
    return line


@pytest.fixture
def library(gl_ctx, shader_root):
    shaders = ShaderLibrary(gl_ctx, shader_root)
    yield shaders
    shaders.release()


@pytest.fixture
def comp(gl_ctx, library):
    compositor = Compositor(gl_ctx, library, build_registry(), size=(W, H))
    compositor.set_layer("source", np.full((H, W, 3), COLOUR, np.uint8), "colour")
    yield compositor
    compositor.release()


def settle(comp: Compositor, values: dict[str, object]) -> None:
    comp.params.set_many(values, origin="test")
    comp.params.apply_pending(10.0)


def render(comp: Compositor) -> np.ndarray:
    comp.render(0.0)
    return comp.read_output().astype(int)


def reload(library: ShaderLibrary) -> list[str]:
    library.check_files()
    return library.poll()


# -- #include ------------------------------------------------------------------------------


def test_expand_pastes_includes_and_remembers_where_each_line_came_from(library, shader_root):
    expanded = library.expand("frame.frag")
    lines = expanded.source.splitlines()
    assert len(lines) == len(expanded.origins)
    assert not any(line.lstrip().startswith("#include") for line in lines)
    assert {"frame.frag", "composite.glsl", "feedback.glsl", "fx/grade.glsl", "fx/kaleido.glsl"} <= expanded.files

    for file in ("frame.frag", "fx/grade.glsl", "composite.glsl"):
        own = (shader_root / file).read_text().splitlines()
        for n, (origin, line) in enumerate(expanded.origins):
            if origin == file:
                assert lines[n] == own[line - 1], (file, line)
    grade = (shader_root / "fx/grade.glsl").read_text().splitlines()
    brightness_line = next(i for i, ln in enumerate(grade, 1) if "uniform float u_grade_brightness" in ln)
    n = lines.index(grade[brightness_line - 1])
    assert expanded.origins[n] == ("fx/grade.glsl", brightness_line)
    assert expanded.origins[0] == ("frame.frag", 1)


def test_nested_includes_and_locate(library, shader_root):
    (shader_root / "lib").mkdir()
    (shader_root / "lib/inner.glsl").write_text("float inner() {\n    return 1.0;\n}\n")
    (shader_root / "lib/outer.glsl").write_text(
        '// outer\n#include "lib/inner.glsl"\nfloat outer() { return inner(); }\n'
    )
    (shader_root / "top.frag").write_text(
        '#version 330\n#include "lib/outer.glsl"\nout vec4 frag;\nvoid main() { frag = vec4(outer()); }\n'
    )
    expanded = library.expand("top.frag")
    assert expanded.origins == (
        ("top.frag", 1),
        ("lib/outer.glsl", 1),
        ("lib/inner.glsl", 1),
        ("lib/inner.glsl", 2),
        ("lib/inner.glsl", 3),
        ("lib/outer.glsl", 3),
        ("top.frag", 3),
        ("top.frag", 4),
    )
    assert expanded.locate("0:4(5): error: oops") == "lib/inner.glsl:2: error: oops"
    assert expanded.locate("0:99(1): error: past the end") == "0:99(1): error: past the end"
    library.get("top.frag")  # and it compiles

    variant = library.expand_variant(("top.frag", ("A", "B")))
    assert variant.source.splitlines()[:3] == ["#version 330", "#define A 1", "#define B 1"]
    assert variant.locate("0:6(1): error: x") == "lib/inner.glsl:2: error: x"


def test_a_missing_include_names_the_file(library, shader_root):
    (shader_root / "broken.frag").write_text('#version 330\n#include "fx/nope.glsl"\nvoid main() {}\n')
    with pytest.raises(ShaderError, match=r"fx/nope\.glsl"):
        library.expand("broken.frag")
    with pytest.raises(ShaderError, match=r"fx/nope\.glsl"):
        library.get("broken.frag")
    with pytest.raises(ShaderError, match=r"nothing\.frag"):
        library.get("nothing.frag")


def test_an_include_loop_is_an_error_not_a_hang(library, shader_root):
    (shader_root / "loop.glsl").write_text('#include "loop.glsl"\n')
    with pytest.raises(ShaderError, match="nested deeper"):
        library.expand("loop.glsl")


def test_a_compile_error_names_file_and_line(library, shader_root):
    line = edit(shader_root / "fx/vignette.glsl", "return c * mix(", "return c * mix((")
    with pytest.raises(ShaderError) as info:
        library.get("frame.frag", ("VIGNETTE",))
    assert f"fx/vignette.glsl:{line}:" in str(info.value)
    assert "error" in str(info.value)
    assert "\n" not in str(info.value)  # one line, for the HUD


# -- hot reload ----------------------------------------------------------------------------


def test_an_edit_reloads_and_shows_next_frame(comp, library, shader_root):
    settle(comp, {"/fx/grade/enabled": True})
    assert np.abs(render(comp) - COLOUR).max() <= 1
    assert reload(library) == []  # nothing changed yet

    edit(shader_root / "fx/grade.glsl", "+ 0.5 + u_grade_brightness;", "+ 0.5 + u_grade_brightness + 0.25;")
    assert np.abs(render(comp) - COLOUR).max() <= 1  # nothing changes before the frame boundary
    assert reload(library) == ["frame.frag"]
    assert library.reloads == 1
    out = render(comp)
    assert np.abs(out - np.clip(np.array(COLOUR) + 0.25 * 255, 0, 255)).max() <= 1
    assert library.errors == {} and comp.errors == {}


def test_a_broken_edit_keeps_the_last_good_program_until_fixed(comp, library, shader_root):
    settle(comp, {"/fx/grade/enabled": True, "/fx/grade/brightness": 0.1})
    good = render(comp)
    assert np.abs(good - (np.array(COLOUR) + 0.1 * 255)).max() <= 1

    path = shader_root / "fx/grade.glsl"
    line = edit(path, "return clamp(c, 0.0, 1.0);", "return clamp(c, 0.0, 1.0)")  # no semicolon
    assert reload(library) == []
    message = library.errors["frame.frag"]
    assert re.search(r"fx/grade\.glsl:\d+:", message), message
    assert f"fx/grade.glsl:{line + 1}:" in message or f"fx/grade.glsl:{line}:" in message
    assert library.last_error == message
    assert (render(comp) == good).all()  # the show goes on with the last good program
    assert (render(comp) == good).all()

    edit(path, "return clamp(c, 0.0, 1.0)", "return clamp(c * 0.5, 0.0, 1.0);")
    assert reload(library) == ["frame.frag"]
    assert "frame.frag" not in library.errors
    out = render(comp)
    assert np.abs(out - (np.array(COLOUR) + 0.1 * 255) * 0.5).max() <= 1
    assert comp.errors == {}


def test_a_file_that_vanishes_mid_save_is_tried_again(comp, library, shader_root):
    good = render(comp)
    path = shader_root / "composite.glsl"
    text = path.read_text()
    path.unlink()
    assert reload(library) == []  # a missing file is not a change yet
    assert (render(comp) == good).all()
    path.write_text(text.replace("return top;", "return top * 0.5;"))
    os.utime(path, ns=(1, 1))
    assert reload(library) == ["frame.frag"]
    assert np.abs(render(comp) - np.array(COLOUR) * 0.5).max() <= 1


def test_a_variant_that_never_compiled_falls_back_to_the_last_good_program(comp, library, shader_root):
    good = render(comp)
    path = shader_root / "fx/pixelate.glsl"
    line = edit(path, "return (floor(", "return ((floor(")  # broken before PIXELATE was ever compiled
    settle(comp, {"/fx/pixelate/enabled": True, "/fx/pixelate/size": 4.0})
    assert comp.variant() == ("PIXELATE",)

    assert (render(comp) == good).all()
    message = comp.errors["frame.frag"]
    assert f"fx/pixelate.glsl:{line}:" in message
    assert not library.has("frame.frag", ("PIXELATE",))
    assert (render(comp) == good).all()  # and again next frame

    edit(path, "return ((floor(", "return (floor(")
    reload(library)
    out = render(comp)
    assert comp.errors == {} and library.errors == {}
    assert library.has("frame.frag", ("PIXELATE",))
    assert np.abs(out - COLOUR).max() <= 1  # a solid colour pixelates to itself


def test_fallback_survives_a_reload_of_the_last_good_program(comp, library, shader_root):
    """The last good program may itself have been hot-reloaded (and the old one released)."""
    good = render(comp)
    # an error only the PIXELATE variant sees: the plain variant reloads fine
    line = edit(shader_root / "frame.frag", "p = fx_pixelate(p);", "p = fx_pixelate(p)")
    assert reload(library) == ["frame.frag"]
    settle(comp, {"/fx/pixelate/enabled": True})
    assert (render(comp) == good).all()
    found = re.search(r"frame\.frag:(\d+):", comp.errors["frame.frag"])
    assert found and int(found.group(1)) >= line  # the parser stops at the first token that cannot follow


def test_an_error_in_one_variant_is_not_hidden_by_another_that_reloads(comp, library, shader_root):
    settle(comp, {"/fx/pixelate/enabled": True})
    pixelated = render(comp)
    settle(comp, {"/fx/pixelate/enabled": False})
    plain = render(comp)
    assert library.has("frame.frag", ("PIXELATE",)) and library.has("frame.frag", ())

    edit(shader_root / "frame.frag", "p = fx_pixelate(p);", "p = fx_pixelate(p)")
    assert reload(library) == ["frame.frag"]  # the plain one reloaded, the PIXELATE one did not
    assert "frame.frag" in library.errors
    assert (render(comp) == plain).all()
    settle(comp, {"/fx/pixelate/enabled": True})
    assert (render(comp) == pixelated).all()  # its last good version

    edit(shader_root / "frame.frag", "p = fx_pixelate(p)", "p = fx_pixelate(p);")
    assert sorted(reload(library)) == ["frame.frag", "frame.frag"]
    assert library.errors == {}


def test_a_broken_transition_shows_the_live_picture_and_recovers(comp, library, shader_root):
    render(comp)
    path = shader_root / "transitions" / "fade.frag"
    line = edit(path, "u_progress), 1.0);", "u_progress), 1.0)")
    comp.set_layer("source", np.zeros((H, W, 3), np.uint8), "black")
    comp.begin_transition(now=0.0, duration=1.0)
    comp.render(0.5)
    assert (comp.read_output() == 0).all()  # no crossfade program: cut to the live picture, never garbage
    assert re.search(rf"fade\.frag:({line}|{line + 1}):", comp.errors["transitions/fade.frag"])

    edit(path, "u_progress), 1.0)", "u_progress), 1.0);")
    reload(library)
    comp.render(0.5)
    assert "transitions/fade.frag" not in comp.errors  # the HUD stops showing a fixed error
    assert np.abs(comp.read_output().astype(int) - np.array(COLOUR) / 2).max() <= 1
