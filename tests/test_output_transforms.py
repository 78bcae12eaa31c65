"""The room's corrections (flip, rotate, fit, keystone, master) on a real GL context.

An offscreen framebuffer stands in for the window: the Presenter draws into it exactly
as it draws into a glfw window's default framebuffer, and we read it back. Images are
quadrants (or corner blocks) of distinct colours, so each check names where a known
colour must land; pixels are probed away from edges, where filtering blends colours.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.catalog import SHADERS_DIR, build_registry
from engine.params import ParamRegistry
from engine.render.compositor import Compositor, letterbox
from engine.render.output import (
    CORNERS,
    OUTPUT_PARAMS,
    UNIT_SQUARE,
    KeystoneError,
    OutputTransform,
    Presenter,
    homography,
    keystone_quad,
)
from engine.render.shaders import ShaderLibrary

RED, GREEN, BLUE, YELLOW = (230, 30, 30), (30, 210, 40), (40, 50, 220), (240, 220, 20)
QUADRANT_COLOURS = {"tl": RED, "tr": GREEN, "br": BLUE, "bl": YELLOW}
GREY = (128, 128, 128)
BLACK = (0, 0, 0)


@pytest.fixture
def shaders(gl_ctx):
    library = ShaderLibrary(gl_ctx, SHADERS_DIR)
    yield library
    library.release()


@pytest.fixture
def presenter(shaders) -> Presenter:
    return Presenter(shaders)


def quadrants(size: tuple[int, int]) -> np.ndarray:
    w, h = size
    image = np.zeros((h, w, 3), np.uint8)
    image[: h // 2, : w // 2] = RED
    image[: h // 2, w // 2 :] = GREEN
    image[h // 2 :, w // 2 :] = BLUE
    image[h // 2 :, : w // 2] = YELLOW
    return image


def corner_blocks(size: tuple[int, int], block: int = 8) -> np.ndarray:
    """Grey with a coloured block in each corner (tl red, tr green, br blue, bl yellow)."""
    w, h = size
    image = np.full((h, w, 3), GREY, np.uint8)
    image[:block, :block] = RED
    image[:block, -block:] = GREEN
    image[-block:, -block:] = BLUE
    image[-block:, :block] = YELLOW
    return image


def show(
    gl_ctx, presenter: Presenter, image: np.ndarray, window: tuple[int, int], transform: OutputTransform | None = None
) -> np.ndarray:
    """Present ``image`` into a ``window``-sized framebuffer; the result as RGB, row 0 at the top."""
    texture = gl_ctx.texture((image.shape[1], image.shape[0]), 3, np.ascontiguousarray(image).tobytes(), alignment=1)
    target = gl_ctx.framebuffer(color_attachments=[gl_ctx.texture(window, 4)])
    try:
        target.clear(0.5, 0.5, 0.5, 1.0)  # not black: a pixel left undrawn would pass as a black bar
        assert presenter.present(texture, window, transform, target)
        data = target.read(components=3, alignment=1)
    finally:
        target.color_attachments[0].release()
        target.release()
        texture.release()
    return np.frombuffer(data, np.uint8).reshape(window[1], window[0], 3)[::-1].astype(int)


def quadrant_centres(window: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """(row, column) of the middle of each window quadrant."""
    w, h = window
    return {
        "tl": (h // 4, w // 4),
        "tr": (h // 4, 3 * w // 4),
        "br": (3 * h // 4, 3 * w // 4),
        "bl": (3 * h // 4, w // 4),
    }


def assert_colour(image: np.ndarray, row: int, col: int, colour: tuple[int, int, int], what: str) -> None:
    got = tuple(image[row, col])
    assert np.abs(np.array(got) - colour).max() <= 2, f"{what}: pixel ({row}, {col}) is {got}, expected {colour}"


# -- plain present -------------------------------------------------------------------------------


def test_identity_at_the_same_size_is_the_image_pixel_for_pixel(gl_ctx, presenter):
    image = np.random.default_rng(1).integers(0, 256, (36, 64, 3), dtype=np.uint8)
    out = show(gl_ctx, presenter, image, (64, 36))
    assert np.abs(out - image).max() <= 1


def test_letterbox_keeps_the_aspect_with_black_bars(gl_ctx, presenter):
    image, window = quadrants((64, 36)), (64, 64)
    out = show(gl_ctx, presenter, image, window)
    x, y, w, h = letterbox((64, 36), window)  # the viewport the old present used, y from the bottom
    top = window[1] - y - h
    assert (x, w) == (0, 64) and h == 36
    assert out[:top].max() == 0 and out[top + h :].max() == 0, "the bars are not black"
    for name, (row, col) in {
        "tl": (top + 5, 5),
        "tr": (top + 5, 58),
        "br": (top + h - 6, 58),
        "bl": (top + h - 6, 5),
    }.items():
        assert_colour(out, row, col, QUADRANT_COLOURS[name], f"letterboxed {name}")


def test_pillarbox_for_a_narrow_window_side(gl_ctx, presenter):
    out = show(gl_ctx, presenter, quadrants((32, 32)), (96, 48))
    assert out[:, :24].max() == 0 and out[:, 72:].max() == 0, "pillar bars are not black"
    assert_colour(out, 10, 30, RED, "left half of the picture")
    assert_colour(out, 40, 66, BLUE, "right bottom of the picture")


def test_stretch_fills_the_window(gl_ctx, presenter):
    window = (64, 64)
    out = show(gl_ctx, presenter, quadrants((64, 36)), window, OutputTransform(fit="stretch"))
    assert out.min(axis=2).max() > 0 and (out.sum(axis=2) > 0).all(), "stretch left black pixels"
    for name, (row, col) in quadrant_centres(window).items():
        assert_colour(out, row, col, QUADRANT_COLOURS[name], f"stretched {name}")


# -- flips and rotations --------------------------------------------------------------------------

# which image quadrant each window quadrant shows (rotation is clockwise as seen in the window;
# mirrors act on the window's axes, after the rotation)
EXPECTED = {
    (False, False, 0): {"tl": "tl", "tr": "tr", "br": "br", "bl": "bl"},
    (True, False, 0): {"tl": "tr", "tr": "tl", "br": "bl", "bl": "br"},
    (False, True, 0): {"tl": "bl", "tr": "br", "br": "tr", "bl": "tl"},
    (True, True, 0): {"tl": "br", "tr": "bl", "br": "tl", "bl": "tr"},
    (False, False, 90): {"tl": "bl", "tr": "tl", "br": "tr", "bl": "br"},
    (False, False, 180): {"tl": "br", "tr": "bl", "br": "tl", "bl": "tr"},
    (False, False, 270): {"tl": "tr", "tr": "br", "br": "bl", "bl": "tl"},
    (True, False, 90): {"tl": "tl", "tr": "bl", "br": "br", "bl": "tr"},  # a transpose
}


@pytest.mark.parametrize(("flip_x", "flip_y", "rotate"), list(EXPECTED))
def test_flips_and_rotations_move_each_quadrant(gl_ctx, presenter, flip_x, flip_y, rotate):
    window = (60, 40)
    transform = OutputTransform(flip_x=flip_x, flip_y=flip_y, rotate=rotate, fit="stretch")
    out = show(gl_ctx, presenter, quadrants((48, 32)), window, transform)
    for where, shows in EXPECTED[(flip_x, flip_y, rotate)].items():
        row, col = quadrant_centres(window)[where]
        assert_colour(out, row, col, QUADRANT_COLOURS[shows], f"window {where} should show image {shows}")


def test_a_quarter_turn_letterboxes_the_turned_picture(gl_ctx, presenter):
    """A 16:9 picture turned 90 degrees is 9:16: in a 16:9 window it gets side bars."""
    window = (64, 36)
    out = show(gl_ctx, presenter, quadrants((64, 36)), window, OutputTransform(rotate=90))
    width = 36 * 36 / 64  # 20.25 px wide, centred
    left, right = int(np.floor((64 - width) / 2)), int(np.ceil((64 + width) / 2))
    assert out[:, :left].max() == 0 and out[:, right:].max() == 0
    assert_colour(out, 4, 30, YELLOW, "turned picture, top left (the image's bottom-left)")
    assert_colour(out, 31, 33, GREEN, "turned picture, bottom right (the image's top-right)")


# -- keystone -------------------------------------------------------------------------------------


def test_homography_maps_the_unit_square_onto_the_quad():
    quad = keystone_quad(((0.1, 0.05), (-0.2, 0.1), (-0.05, -0.15), (0.15, -0.1)))
    h = homography(UNIT_SQUARE, quad)
    for (x, y), (u, v) in zip(UNIT_SQUARE, quad, strict=True):
        p = h @ (x, y, 1.0)
        assert p[:2] / p[2] == pytest.approx((u, v), abs=1e-12)
    np.testing.assert_allclose(homography(UNIT_SQUARE, UNIT_SQUARE), np.eye(3), atol=1e-12)


def test_keystone_identity_is_the_plain_present(gl_ctx, presenter):
    image = np.random.default_rng(2).integers(0, 256, (36, 64, 3), dtype=np.uint8)
    plain = show(gl_ctx, presenter, image, (80, 60))
    tiny = OutputTransform(keystone=((1e-9, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)))
    assert tiny.has_keystone  # the homography path runs
    assert np.abs(show(gl_ctx, presenter, image, (80, 60), tiny) - plain).max() <= 1


def test_keystone_puts_the_image_corners_on_the_moved_corners_and_black_outside(gl_ctx, presenter):
    window = (160, 120)
    offsets = ((0.1, 0.05), (-0.2, 0.1), (-0.05, -0.15), (0.15, -0.1))
    out = show(gl_ctx, presenter, corner_blocks((64, 64)), window, OutputTransform(fit="stretch", keystone=offsets))
    quad = np.array(keystone_quad(offsets)) * window  # corner positions in window pixels (x, y)
    centre = quad.mean(axis=0)
    for corner, (x, y) in zip(CORNERS, quad, strict=True):
        inward = (centre - (x, y)) / np.linalg.norm(centre - (x, y))
        ix, iy = np.array((x, y)) + 3 * inward  # just inside the quad at this corner
        assert_colour(out, int(iy), int(ix), QUADRANT_COLOURS[corner], f"keystone corner {corner}")
        ox, oy = np.array((x, y)) - 3 * inward  # just outside
        if 0 <= ox < window[0] and 0 <= oy < window[1]:
            assert tuple(out[int(oy), int(ox)]) == BLACK, f"outside the quad at {corner} is not black"
    assert_colour(out, int(centre[1]), int(centre[0]), GREY, "the middle of the picture")
    for row, col in [
        (0, 0),
        (0, window[0] - 1),
        (window[1] - 1, window[0] - 1),
        (window[1] - 1, 0),
        (2, window[0] // 2),
        (window[1] // 2, window[0] - 3),
    ]:
        assert tuple(out[row, col]) == BLACK, f"window pixel ({row}, {col}) is outside the quad but not black"


def test_a_folded_keystone_is_refused_and_the_last_good_one_stays(gl_ctx, presenter):
    window = (80, 60)
    image = corner_blocks((64, 64))
    good = OutputTransform(fit="stretch", keystone=((0.1, 0.1), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)))
    folded = OutputTransform(fit="stretch", keystone=((0.5, 0.0), (-0.5, 0.0), (0.0, 0.0), (0.0, 0.0)))
    with pytest.raises(KeystoneError, match="convex"):
        folded.window_to_image((64, 64), window)
    before = show(gl_ctx, presenter, image, window, good)
    assert presenter.error is None
    during = show(gl_ctx, presenter, image, window, folded)
    assert presenter.error is not None and "keystone" in presenter.error
    np.testing.assert_array_equal(during, before)
    show(gl_ctx, presenter, image, window, good)
    assert presenter.error is None


# -- master and parameters ----------------------------------------------------------------------


def test_master_fades_to_black(gl_ctx, presenter):
    image = quadrants((32, 32))
    half = show(gl_ctx, presenter, image, (32, 32), OutputTransform(master=0.5))
    assert np.abs(half - image * 0.5).max() <= 1.5
    assert show(gl_ctx, presenter, image, (32, 32), OutputTransform(master=0.0)).max() == 0


def test_parameters_declare_and_feed_the_transform():
    registry = build_registry()
    registry.declare_all(OUTPUT_PARAMS)  # the lead adds this line to engine/catalog.py
    assert OutputTransform.from_params(registry.get) == OutputTransform()
    registry.set_many(
        {
            "/output/flip_x": True,
            "/output/rotate": "270",
            "/output/fit": "stretch",
            "/output/keystone/br_y": -0.25,
            "/output/master": 0.0,
        },
        origin="test",
    )
    registry.apply_pending(10.0)
    t = OutputTransform.from_params(registry.get)
    assert (t.flip_x, t.flip_y, t.rotate, t.fit, t.master) == (True, False, 270, "stretch", 0.0)
    assert t.keystone[2] == (0.0, -0.25)
    stored = {p.path for p in OUTPUT_PARAMS if p.in_presets}
    assert {p.path for p in OUTPUT_PARAMS} - stored == {"/output/master"}
    assert len([p for p in OUTPUT_PARAMS if "/keystone/" in p.path]) == 8


def test_compositor_present_transforms_the_window_never_the_output(gl_ctx, shaders):
    registry: ParamRegistry = build_registry()
    compositor = Compositor(gl_ctx, shaders, registry, size=(48, 32))
    target = gl_ctx.framebuffer(color_attachments=[gl_ctx.texture((48, 32), 4)])
    try:
        compositor.set_layer("source", quadrants((48, 32)), "q")
        compositor.render(0.0)
        output = compositor.read_output()
        compositor.present((48, 32), OutputTransform(rotate=180, fit="stretch"), target)
        window = np.frombuffer(target.read(components=3, alignment=1), np.uint8).reshape(32, 48, 3)[::-1]
        assert_colour(window.astype(int), 8, 12, BLUE, "the window turned")
        np.testing.assert_array_equal(compositor.read_output(), output)  # recordings see it upright
        assert_colour(output.astype(int), 8, 12, RED, "the output upright")
        assert "present" not in compositor.errors
    finally:
        target.color_attachments[0].release()
        target.release()
        compositor.release()
