"""The compositor on a real GL context, pixel by pixel, on a small output.

Layers are uploaded at exactly the output size where a test needs texel-exact sampling:
then every output pixel samples one texel's centre and a neutral stage must give the
input back bit for bit (we allow 1 LSB for the driver's float -> unorm rounding).
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.catalog import SHADERS_DIR, build_registry
from engine.params import ParamRegistry
from engine.render.compositor import BLEND_MODES, Compositor, cover_fit, letterbox
from engine.render.effects import EFFECTS, hue_matrix
from engine.render.shaders import ShaderLibrary

W, H = 64, 36
A = (200, 40, 90)
B = (60, 180, 250)
SETTLED = 10.0  # seconds handed to apply_pending: every smoothed value reaches its target


@pytest.fixture
def comp(gl_ctx):
    registry = build_registry()
    shaders = ShaderLibrary(gl_ctx, SHADERS_DIR)
    compositor = Compositor(gl_ctx, shaders, registry, size=(W, H))
    yield compositor
    compositor.release()
    shaders.release()


def settle(registry: ParamRegistry, values: dict[str, object]) -> None:
    registry.set_many(values, origin="test")
    registry.apply_pending(SETTLED)


def solid(colour: tuple[int, ...], size: tuple[int, int] = (W, H)) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (size[1], size[0], len(colour))).copy()


def noise(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def render(comp: Compositor, now: float = 0.0) -> np.ndarray:
    comp.render(now)
    return comp.read_output().astype(int)


def assert_close(out: np.ndarray, expected: np.ndarray, lsb: float = 1.0) -> None:
    diff = np.abs(out.astype(float) - np.broadcast_to(expected, out.shape))
    assert diff.max() <= lsb, f"off by up to {diff.max():.1f} (allowed {lsb}); first pixel {out.reshape(-1, 3)[0]}"


def blend_reference(base: np.ndarray, top: np.ndarray, mode: str) -> np.ndarray:
    """shaders/composite.glsl's blend(), in numpy, on 0..1 floats."""
    return {
        "normal": top,
        "add": np.minimum(base + top, 1.0),
        "multiply": base * top,
        "screen": 1.0 - (1.0 - base) * (1.0 - top),
        "difference": np.abs(base - top),
    }[mode]


# -- layers and blend modes ---------------------------------------------------------------


@pytest.mark.parametrize("opacity", [1.0, 0.5])
@pytest.mark.parametrize("mode", BLEND_MODES)
def test_blend_modes_match_their_formula(comp, mode, opacity):
    comp.set_layer("source", solid(A), "a")
    comp.set_layer("scene", solid(B), "b")
    settle(comp.params, {"/layer/scene/blend": mode, "/layer/scene/opacity": opacity})
    base, top = np.array(A) / 255, np.array(B) / 255
    expected = (base + (blend_reference(base, top, mode) - base) * opacity) * 255
    assert_close(render(comp), expected)


def test_normal_at_half_opacity_is_the_mean(comp):
    comp.set_layer("source", solid(A), "a")
    comp.set_layer("scene", solid(B), "b")
    settle(comp.params, {"/layer/scene/opacity": 0.5})
    assert_close(render(comp), (np.array(A) + np.array(B)) / 2)


def test_layers_stack_over_black_and_respect_alpha(comp):
    assert_close(render(comp), np.zeros(3), lsb=0)  # no layers yet: black, not garbage
    comp.set_layer("source", solid(A), "a")
    assert_close(render(comp), np.array(A), lsb=0)
    comp.set_layer("scene", solid((*B, 64)), "b")  # RGBA: a quarter covers
    assert_close(render(comp), np.array(A) + (np.array(B) - np.array(A)) * 64 / 255)
    settle(comp.params, {"/layer/source/opacity": 0.0, "/layer/scene/opacity": 0.0})
    assert_close(render(comp), np.zeros(3), lsb=0)


def test_set_layer_uploads_only_a_new_key(comp):
    comp.set_layer("source", solid(A), "k1")
    assert_close(render(comp), np.array(A), lsb=0)
    comp.set_layer("source", solid(B), "k1")  # same key: the same frame again, not re-uploaded
    assert_close(render(comp), np.array(A), lsb=0)
    comp.set_layer("source", solid(B), "k2")
    assert_close(render(comp), np.array(B), lsb=0)
    comp.set_layer("source", solid(A, (16, 16)), "k3")  # a new size replaces the texture
    assert_close(render(comp), np.array(A), lsb=0)
    comp.set_layer("source", None, "gone")
    assert_close(render(comp), np.zeros(3), lsb=0)


# -- transitions ---------------------------------------------------------------------------


def test_crossfade_runs_from_the_frozen_frame_to_the_live_picture(comp):
    comp.set_layer("source", solid(A), "a")
    assert_close(render(comp, 0.0), np.array(A), lsb=0)
    comp.set_layer("source", solid(B), "b")
    comp.begin_transition(now=0.0, duration=1.0)

    assert_close(render(comp, 0.25), np.array(A) * 0.75 + np.array(B) * 0.25)
    assert comp.transition_progress == pytest.approx(0.25)
    assert_close(render(comp, 0.5), (np.array(A) + np.array(B)) / 2)
    assert comp.transition_progress == pytest.approx(0.5)
    assert_close(render(comp, 1.0), np.array(B), lsb=0)
    assert comp.transition_progress is None
    assert_close(render(comp, 5.0), np.array(B), lsb=0)


def test_transition_time_comes_from_the_registry_and_zero_is_a_cut(comp):
    comp.set_layer("source", solid(A), "a")
    render(comp, 0.0)
    comp.set_layer("source", solid(B), "b")
    settle(comp.params, {"/mix/transition": 2.0})
    comp.begin_transition(now=10.0)
    assert_close(render(comp, 11.0), (np.array(A) + np.array(B)) / 2)

    comp.set_layer("source", solid(A), "a2")
    comp.begin_transition(now=20.0, duration=0.0)
    assert comp.transition_progress is None
    assert_close(render(comp, 20.0), np.array(A), lsb=0)


def halves(left: tuple[int, int, int], right: tuple[int, int, int]) -> np.ndarray:
    image = solid(left)
    image[:, W // 2 :] = right
    return image


def test_luma_wipe_shows_the_bright_parts_of_the_new_picture_first(comp):
    comp.set_layer("source", solid(A), "a")
    render(comp, 0.0)
    dark, bright = (40, 40, 40), (220, 220, 220)  # luminance 0.16 and 0.86
    comp.set_layer("source", halves(dark, bright), "b")
    settle(comp.params, {"/mix/wipe_softness": 0.0})
    comp.begin_transition(now=0.0, duration=1.0, kind="luma_wipe")

    out = render(comp, 0.05)  # the edge is above every luminance: all old
    assert_close(out, np.array(A), lsb=0)
    out = render(comp, 0.5)  # edge at 0.5: the bright half is new, the dark half still old
    assert_close(out[:, W // 2 :], np.array(bright), lsb=0)
    assert_close(out[:, : W // 2], np.array(A), lsb=0)
    out = render(comp, 0.95)  # edge at 0.05: both halves new
    assert_close(out, halves(dark, bright), lsb=0)
    render(comp, 1.0)
    assert comp.transition_progress is None


def test_feedback_dissolve_lets_the_new_picture_in_pixel_by_pixel_and_ends_on_it(comp):
    comp.set_layer("source", solid(A), "a")
    render(comp, 0.0)
    comp.set_layer("source", solid(B), "b")
    comp.begin_transition(now=0.0, duration=1.0, kind="feedback_dissolve")

    def share_of_new(out: np.ndarray) -> float:
        return float((np.abs(out - np.array(B)).max(axis=2) <= 1).mean())

    first = render(comp, 0.3)
    old = (np.abs(first - np.array(A)).max(axis=2) <= 1).mean()
    assert 0.2 <= share_of_new(first) <= 0.4, "the first frame: about 30% of the pixels dissolved in"
    assert share_of_new(first) + old == pytest.approx(1.0), "every pixel is the old or the new picture"
    later = render(comp, 0.7)
    assert share_of_new(later) >= 0.6  # dissolved ones stay, and trails of them flow outwards
    assert_close(render(comp, 1.0), np.array(B), lsb=0)


def test_the_transition_keeps_its_kind_when_the_parameter_changes_midway(comp):
    comp.set_layer("source", solid(A), "a")
    render(comp, 0.0)
    comp.set_layer("source", solid(B), "b")
    settle(comp.params, {"/mix/transition_type": "fade"})
    comp.begin_transition(now=0.0, duration=1.0)
    settle(comp.params, {"/mix/transition_type": "luma_wipe"})
    assert_close(render(comp, 0.5), (np.array(A) + np.array(B)) / 2)


# -- a slow scene's images morph into each other ----------------------------------------------

C = (10, 250, 30)


def test_a_slow_scenes_new_image_fades_in_over_the_previous_one(comp):
    comp.set_layer("scene", solid(A), ("scene", 1))
    assert_close(render(comp, 0.0), np.array(A), lsb=0)
    comp.set_layer("scene", solid(B), ("scene", 2), morph=1.0, now=0.0)
    assert_close(render(comp, 0.5), (np.array(A) + np.array(B)) / 2)
    assert comp.morph_progress == pytest.approx(0.5)
    assert_close(render(comp, 1.0), np.array(B), lsb=0)
    assert comp.morph_progress is None

    comp.set_layer("scene", solid(C), ("scene", 3), morph=0.0, now=2.0)  # 0: a cut
    assert_close(render(comp, 2.0), np.array(C), lsb=0)


def test_an_image_that_arrives_mid_morph_starts_from_what_shows_never_jumping(comp):
    comp.set_layer("scene", solid(A), ("scene", 1))
    render(comp, 0.0)
    comp.set_layer("scene", solid(B), ("scene", 2), morph=1.0, now=0.0)
    halfway = (np.array(A) + np.array(B)) / 2
    assert_close(render(comp, 0.5), halfway)
    comp.set_layer("scene", solid(C), ("scene", 3), morph=1.0, now=0.5)
    assert_close(render(comp, 0.5), halfway, lsb=1.5)  # the same picture as a moment ago
    assert_close(render(comp, 1.0), (halfway + np.array(C)) / 2, lsb=1.5)
    assert_close(render(comp, 1.5), np.array(C), lsb=0)


def test_a_new_image_size_cuts_instead_of_morphing(comp):
    comp.set_layer("scene", solid(A), ("scene", 1))
    render(comp, 0.0)
    comp.set_layer("scene", solid(B, (32, 18)), ("scene", 2), morph=1.0, now=0.0)
    assert comp.morph_progress is None
    assert_close(render(comp, 0.1), np.array(B), lsb=0)


# -- effects -------------------------------------------------------------------------------

NEUTRAL = {
    "grade": {
        "/fx/grade/hue": 0.0,
        "/fx/grade/saturation": 1.0,
        "/fx/grade/contrast": 1.0,
        "/fx/grade/brightness": 0.0,
    },
    "kaleido": {"/fx/kaleido/segments": 1, "/fx/kaleido/rotate": 0.0},
    "rgbshift": {"/fx/rgbshift/amount": 0.0, "/fx/rgbshift/angle": 30.0},
    "pixelate": {"/fx/pixelate/size": 1.0},
    "vignette": {"/fx/vignette/amount": 0.0, "/fx/vignette/softness": 0.4},
}


def test_every_effect_has_a_neutral_setting_here():
    assert sorted(NEUTRAL) == sorted(fx.name for fx in EFFECTS)


def enable(comp: Compositor, name: str, values: dict[str, object]) -> None:
    settle(comp.params, {f"/fx/{name}/enabled": True, **values})
    assert name.upper() in comp.variant()  # the stage is compiled in, not skipped


@pytest.mark.parametrize("name", sorted(NEUTRAL))
def test_effect_at_neutral_is_the_identity(comp, name):
    src = noise()
    comp.set_layer("source", src, "noise")
    assert_close(render(comp), src, lsb=0)
    enable(comp, name, NEUTRAL[name])
    out = render(comp)
    assert comp.shaders.has(comp.FRAME_SHADER, comp.variant())
    assert_close(out, src, lsb=1)


def test_all_effects_at_neutral_together_are_the_identity(comp):
    src = noise(1)
    comp.set_layer("source", src, "noise")
    for name, values in NEUTRAL.items():
        enable(comp, name, values)
    assert len(comp.variant()) == len(EFFECTS)
    assert_close(render(comp), src, lsb=1)


def test_grade_changes_colour_by_its_formula(comp):
    src = noise(2)
    comp.set_layer("source", src, "noise")
    enable(comp, "grade", {**NEUTRAL["grade"], "/fx/grade/brightness": 0.2})
    assert_close(render(comp), np.clip(src + 0.2 * 255, 0, 255))

    settle(comp.params, {"/fx/grade/brightness": 0.0, "/fx/grade/contrast": 2.0})
    assert_close(render(comp), np.clip((src / 255 - 0.5) * 2 + 0.5, 0, 1) * 255)

    settle(comp.params, {"/fx/grade/contrast": 1.0, "/fx/grade/saturation": 0.0})
    luma = src @ np.array([0.299, 0.587, 0.114])
    assert_close(render(comp), luma[..., None])

    settle(comp.params, {"/fx/grade/saturation": 1.0, "/fx/grade/hue": 120.0})
    out = render(comp)
    assert np.abs(out - src).max() > 50
    rotation = np.array(hue_matrix(120.0)).reshape(3, 3).T  # GLSL mat3 is column-major
    assert_close(out, np.clip(src / 255 @ rotation.T, 0, 1) * 255, lsb=1.5)
    grey = solid((128, 128, 128))
    comp.set_layer("source", grey, "grey")
    assert_close(render(comp), grey, lsb=1)  # greys have no hue to turn


def test_kaleido_changes_the_image_into_mirrored_wedges(comp):
    src = noise(3)
    comp.set_layer("source", src, "noise")
    enable(comp, "kaleido", {"/fx/kaleido/segments": 6, "/fx/kaleido/rotate": 0.0})
    out = render(comp)
    assert np.mean(np.abs(out - src)) > 20
    assert_close(out, out[::-1], lsb=2)  # wedges mirror about the horizontal axis through the centre


def test_rgbshift_moves_red_and_blue_apart(comp):
    src = noise(4)
    comp.set_layer("source", src, "noise")
    shift = 4  # pixels: amount is a fraction of the width
    enable(comp, "rgbshift", {"/fx/rgbshift/amount": shift / W, "/fx/rgbshift/angle": 0.0})
    out = render(comp)
    assert_close(out[..., 1], src[..., 1], lsb=0)
    assert_close(out[:, :-shift, 0], src[:, shift:, 0], lsb=1)
    assert_close(out[:, shift:, 2], src[:, :-shift, 2], lsb=1)
    assert np.abs(out[..., 0] - src[..., 0]).max() > 100


def test_pixelate_makes_square_cells(comp):
    src = noise(5)
    comp.set_layer("source", src, "noise")
    cell = 8
    enable(comp, "pixelate", {"/fx/pixelate/size": float(cell)})
    out = render(comp)
    assert np.mean(np.abs(out - src)) > 20
    for y in range(0, H, cell):
        for x in range(0, W, cell):
            block = out[y : y + cell, x : x + cell]
            assert (block == block[0, 0]).all(), (x, y)
            # the cell's centre lies between four texels: their bilinear mean
            centre = src[y + cell // 2 - 1 : y + cell // 2 + 1, x + cell // 2 - 1 : x + cell // 2 + 1]
            if centre.shape[:2] == (2, 2):
                assert_close(block[0, 0], centre.reshape(-1, 3).mean(axis=0), lsb=1.5)


def test_vignette_darkens_the_corners_only(comp):
    src = noise(6)
    comp.set_layer("source", src, "noise")
    enable(comp, "vignette", {"/fx/vignette/amount": 1.0, "/fx/vignette/softness": 0.4})
    out = render(comp)
    for y, x in ((0, 0), (0, W - 1), (H - 1, 0), (H - 1, W - 1)):
        assert_close(out[y, x], np.zeros(3), lsb=0)
    assert_close(
        out[H // 2 - 4 : H // 2 + 4, W // 2 - 4 : W // 2 + 4], src[H // 2 - 4 : H // 2 + 4, W // 2 - 4 : W // 2 + 4]
    )
    assert (out <= src.astype(int) + 1).all()


# -- feedback ------------------------------------------------------------------------------


def test_feedback_mixes_in_the_previous_output(comp):
    a, b = np.array(A), np.array(B)
    comp.set_layer("source", solid(A), "a")
    assert_close(render(comp, 0.0), a, lsb=0)
    settle(comp.params, {"/fx/feedback/amount": 0.5})
    assert "FEEDBACK" in comp.variant()
    comp.set_layer("source", solid(B), "b")
    assert_close(render(comp, 1 / 60), b * 0.5 + a * 0.5)
    assert_close(render(comp, 2 / 60), b * 0.75 + a * 0.25, lsb=1.5)
    settle(comp.params, {"/fx/feedback/amount": 0.0})
    assert "FEEDBACK" not in comp.variant()
    assert_close(render(comp, 3 / 60), b, lsb=0)


def test_feedback_zoom_moves_the_trails(comp):
    comp.set_layer("source", noise(7), "noise")
    render(comp)
    settle(comp.params, {"/fx/feedback/amount": 0.9, "/fx/feedback/zoom": 1.0})
    comp.set_layer("source", solid((0, 0, 0)), "black")
    still = render(comp)
    comp.set_layer("source", noise(7), "noise2")
    render(comp)
    settle(comp.params, {"/fx/feedback/zoom": 1.2})
    comp.set_layer("source", solid((0, 0, 0)), "black2")
    zoomed = render(comp)
    assert np.mean(np.abs(zoomed - still)) > 10


# -- geometry ------------------------------------------------------------------------------


def test_cover_fit_and_letterbox_are_pure_geometry():
    assert cover_fit((1920, 1080), (1280, 720)) == (1.0, 1.0)
    assert cover_fit((1000, 1000), (1600, 900)) == pytest.approx((1.0, 0.5625))  # crop top and bottom
    assert cover_fit((4000, 1000), (1600, 900)) == pytest.approx((1600 / 900 / 4, 1.0))  # crop the sides
    for layer in ((640, 480), (480, 640), (1920, 1080), (100, 1000)):
        fx, fy = cover_fit(layer, (1280, 720))
        assert max(fx, fy) == 1.0 and 0 < min(fx, fy) <= 1.0
        # the part shown has the output's aspect ratio: nothing is stretched
        assert (layer[0] * fx) / (layer[1] * fy) == pytest.approx(1280 / 720)

    assert letterbox((1280, 720), (1920, 1080)) == (0, 0, 1920, 1080)
    assert letterbox((1280, 720), (1280, 720)) == (0, 0, 1280, 720)
    for window in ((1000, 1000), (2000, 1000), (800, 601), (3, 3)):
        x, y, w, h = letterbox((1280, 720), window)
        assert w <= window[0] and h <= window[1]
        assert w == window[0] or h == window[1]  # one side fills
        assert abs(x - (window[0] - w - x)) <= 1 and abs(y - (window[1] - h - y)) <= 1  # centred
        assert w / h == pytest.approx(1280 / 720, rel=0.01 + 1 / min(w, h))


def gradient(size: tuple[int, int]) -> np.ndarray:
    """Red grows left to right, green top to bottom: bilinear sampling of it is exact."""
    w, h = size
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = (40 + np.arange(w) * 160 / (w - 1))[None, :].round()
    img[..., 1] = (40 + np.arange(h) * 160 / (h - 1))[:, None].round()
    img[..., 2] = 255
    return img


@pytest.mark.parametrize("layer_size", [(32, 32), (128, 18), (40, 60), (W, H)])
def test_a_layer_of_another_aspect_covers_the_output(comp, layer_size):
    img = gradient(layer_size)
    comp.set_layer("source", img, layer_size)
    out = render(comp)
    assert (out[..., 2] == 255).all()  # no black bars anywhere

    fx, fy = cover_fit(layer_size, (W, H))
    # where each output pixel centre lands in the layer, in texels (clamped at the edges)
    u = ((np.arange(W) + 0.5) / W - 0.5) * fx + 0.5
    v = ((np.arange(H) + 0.5) / H - 0.5) * fy + 0.5
    tu = np.clip(u * layer_size[0] - 0.5, 0, layer_size[0] - 1)
    tv = np.clip(v * layer_size[1] - 0.5, 0, layer_size[1] - 1)
    red = np.interp(tu, np.arange(layer_size[0]), img[0, :, 0].astype(float))
    green = np.interp(tv, np.arange(layer_size[1]), img[:, 0, 1].astype(float))
    assert_close(out[..., 0], red[None, :], lsb=1.5)
    assert_close(out[..., 1], green[:, None], lsb=1.5)


def test_row_zero_is_the_top(comp):
    img = np.zeros((H, W, 3), np.uint8)
    img[: H // 2, : W // 2] = (255, 0, 0)  # top left red
    img[: H // 2, W // 2 :] = (0, 255, 0)  # top right green
    img[H // 2 :, : W // 2] = (0, 0, 255)  # bottom left blue
    img[H // 2 :, W // 2 :] = (255, 255, 255)
    comp.set_layer("source", img, "quadrants")
    out = render(comp)
    assert_close(out, img, lsb=0)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[-1, 0]) == (0, 0, 255)

    # through a transition too (its frozen frame and its pass keep the orientation)
    comp.begin_transition(now=0.0, duration=1.0)
    assert_close(render(comp, 0.5), img, lsb=0)


# -- variants ------------------------------------------------------------------------------


def test_prewarm_compiles_the_variants_a_state_needs(comp):
    assert not comp.shaders.has(comp.FRAME_SHADER, ("KALEIDO", "VIGNETTE"))
    comp.prewarm([{"/fx/kaleido/enabled": True, "/fx/vignette/enabled": True}, {"/fx/feedback/amount": 0.5}])
    assert comp.shaders.has(comp.FRAME_SHADER, ("KALEIDO", "VIGNETTE"))
    assert comp.shaders.has(comp.FRAME_SHADER, ("FEEDBACK",))
    assert comp.variant() == ()  # prewarming changes nothing live
    assert comp.errors == {}
