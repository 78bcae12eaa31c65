"""The CLIP scene's drawers (engine.vqclip.drawers): VQGAN latent, pixel grid, Fourier spectrum.

CLIP is a tiny random ``CLIPModel`` (and, for the scene, saved with ``save_pretrained``), the
VQGAN a tiny random ``VQModel``; losses are measured with fixed cutouts, so they compare across
steps. The pixel and FFT drawers run with no VQGAN checkpoint anywhere.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="the diffusion extra is not installed")

from diffusion_fixtures import StillFeed, offline, one_torch_thread, set_params, wait_for  # noqa: E402,F401  (fixtures)
from engine.catalog import build_registry  # noqa: E402
from engine.control.actions import Actions  # noqa: E402
from engine.control.osc import OscServer  # noqa: E402
from engine.diffusion.configs import byte_level_clip_tokenizer  # noqa: E402
from engine.params import ParamError, ParamRegistry  # noqa: E402
from engine.prompt_syntax import WeightedPrompt  # noqa: E402
from engine.scenes import SceneCatalog, SceneWorker  # noqa: E402
from engine.scenes.vqgan_clip import VqganClipScene  # noqa: E402
from engine.vqclip.configs import TINY_CLIP, TINY_VQGAN, build_random_clip, build_random_vqgan  # noqa: E402
from engine.vqclip.drawers import FftDrawer, PixelDrawer, VqganDrawer, kmeans  # noqa: E402
from engine.vqclip.optimise import Cutouts, VqganClip  # noqa: E402

P = "/scene/vqgan_clip"
FOX = [WeightedPrompt("a red fox in the snow", 1.0)]


@pytest.fixture(scope="module")
def clip():
    return build_random_clip(TINY_CLIP)


@pytest.fixture(scope="module")
def vqgan():
    return build_random_vqgan(TINY_VQGAN)


def make_drawer(name: str, vqgan=None, **kwargs):
    if name == "pixel":
        return PixelDrawer(**{"cells_x": 8, "cells_y": 6, "palette": 6, "size": 64, **kwargs})
    if name == "fft":
        return FftDrawer(**{"size": (48, 64), **kwargs})
    return VqganDrawer(vqgan, **{"size": 32, **kwargs})


def run_with(drawer, clip, prompts=FOX) -> VqganClip:
    return VqganClip(drawer, clip, prompts, lr=0.1, cutouts=Cutouts(count=8), seed=0)


# -- every drawer ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vqgan", "pixel", "fft"])
def test_each_drawer_lowers_the_clip_loss_and_changes_the_image(name, clip, vqgan):
    run = run_with(make_drawer(name, vqgan), clip)
    before_loss, before_image = run.loss(), run.image()
    for _ in range(15):
        frame = run.step()
        assert frame.dtype == np.uint8 and frame.shape == (*run.drawer.shape, 3)
    assert run.loss() < before_loss - 0.05
    assert np.abs(run.image().astype(int) - before_image).mean() > 2.0


@pytest.mark.parametrize("name", ["vqgan", "pixel", "fft"])
def test_a_drawer_starts_from_a_picture(name, vqgan):
    """from_image: the FFT drawer inverts exactly, the pixel drawer averages each cell's area,
    the VQGAN drawer encodes (a random VQGAN reconstructs badly, but a different picture starts
    it elsewhere)."""
    rng = np.random.default_rng(3)
    picture = torch.from_numpy(rng.random((1, 3, 48, 64), dtype=np.float32))
    drawer = make_drawer(name, vqgan)
    drawer.from_image(picture)
    with torch.no_grad():
        image = drawer.image()
    if name == "fft":
        assert torch.allclose(image, picture.clamp(0.005, 0.995), atol=1e-4)
    elif name == "pixel":
        other = PixelDrawer(8, 6, palette=0, size=64)
        other.from_image(picture)
        cells = torch.nn.functional.adaptive_avg_pool2d(picture, (6, 8))
        assert torch.allclose(other.colours(), cells, atol=1e-6)
        assert torch.allclose(image[:, :, ::8, ::8], drawer.colours())  # the palette version shows its colours
    else:
        second = make_drawer(name, vqgan)
        second.from_image(1 - picture)
        with torch.no_grad():
            assert not torch.allclose(second.image(), image)
            resized = torch.nn.functional.interpolate(picture, (32, 32), mode="bilinear", antialias=True)
            assert torch.allclose(drawer.z, vqgan.encode(resized.clamp(0, 1) * 2 - 1), atol=1e-5)


# -- pixel -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cells, size, palette", [((8, 6), 64, 5), ((13, 7), 100, 0), ((32, 32), 256, 16)])
def test_the_pixel_drawer_shows_exactly_its_cells_as_flat_blocks(cells, size, palette, clip):
    cells_x, cells_y = cells
    run = run_with(PixelDrawer(cells_x, cells_y, palette, size=size), clip)
    for _ in range(3):
        run.step()
    image = run.image().astype(int)
    h, w, _ = image.shape
    block = size // max(cells_x, cells_y)
    assert (h, w) == (cells_y * block, cells_x * block)
    blocks = image.reshape(cells_y, block, cells_x, block, 3)
    first = blocks[:, :1, :, :1]
    assert (blocks == first).all(), "a cell's block is not one flat colour"
    # and the grid is no coarser than it says: neighbouring cells differ somewhere along each axis
    assert (np.diff(first[:, 0, :, 0], axis=1) != 0).any() and (np.diff(first[:, 0, :, 0], axis=0) != 0).any()
    assert blocks.shape[0] * blocks.shape[2] == cells_x * cells_y
    colours = {tuple(c) for c in first.reshape(-1, 3)}
    assert len(colours) <= (palette or cells_x * cells_y)
    if palette:
        assert len(colours) > 1


def test_the_pixel_palette_is_learnt_through_the_straight_through_estimator(clip):
    drawer = PixelDrawer(8, 8, palette=4, size=32)
    palette, cells = drawer.palette.detach().clone(), drawer.cells.detach().clone()
    run = run_with(drawer, clip)
    for _ in range(3):
        run.step()
    assert not torch.equal(drawer.palette, palette) and not torch.equal(drawer.cells, cells)  # both got gradients
    assert drawer.cells.min() >= 0 and drawer.cells.max() <= 1


def test_the_palette_starts_at_the_pictures_own_colours():
    """k-means: three tight clusters of colours give back their three means."""
    means = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.2, 0.2, 0.9]])
    generator = torch.Generator().manual_seed(0)
    points = (means.repeat_interleave(50, 0) + 0.01 * torch.randn(150, 3, generator=generator)).clamp(0, 1)
    centres = kmeans(points[torch.randperm(150, generator=generator)], 3, generator)
    found = sorted(centres.tolist())
    assert torch.allclose(torch.tensor(found), torch.tensor(sorted(means.tolist())), atol=0.01)


def test_resizing_the_pixel_drawer_keeps_its_cells(clip):
    run = run_with(PixelDrawer(8, 4, palette=0, size=64), clip)
    run.step()
    before = run.drawer.colours().detach().clone()
    run.resize(128)
    assert run.drawer.shape == (64, 128) and torch.equal(run.drawer.colours(), before)
    assert run.step().shape == (64, 128, 3)


# -- fft ---------------------------------------------------------------------------------------------
def spectrum_slope(image: np.ndarray) -> float:
    """The slope of log power against log frequency, radially averaged over log-spaced rings
    (from just above one cycle per image to Nyquist), of a (C, H, W) image, its mean removed."""
    _, h, w = image.shape
    image = image - image.mean(axis=(1, 2), keepdims=True)
    power = (np.abs(np.fft.fft2(image)) ** 2).mean(0)
    f = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])
    edges = np.geomspace(1.5 / max(h, w), 0.5, 16)
    xs, ys = [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        ring = (f >= lo) & (f < hi)
        if ring.any():
            xs.append(np.log(f[ring].mean()))
            ys.append(np.log(power[ring].mean()))
    return float(np.polyfit(xs, ys, 1)[0])


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_fft_drawer_starts_with_the_spectrum_it_claims(decay, seed):
    """Amplitude 1/f^decay is power 1/f^(2 decay): in the decorrelated channels before the
    colour mix, and (the mix is linear, the sigmoid near-linear at the start) in the picture."""
    drawer = FftDrawer((96, 128), decay=decay, seed=seed)
    with torch.no_grad():
        spatial, image = drawer.spatial()[0].numpy(), drawer.image()[0].numpy()
    assert spectrum_slope(spatial) == pytest.approx(-2 * decay, abs=0.2)
    assert spectrum_slope(image) == pytest.approx(-2 * decay, abs=0.25)
    assert 0.02 < image.std() < 0.3  # a visible start, not saturated


def test_the_fft_drawer_draws_at_any_size(clip):
    run = run_with(FftDrawer((37, 91)), clip)
    assert run.step().shape == (37, 91, 3)
    before = run.image()
    run.resize(50)
    after = run.image()
    assert after.shape == (50, 50, 3)
    small = torch.nn.functional.interpolate(torch.from_numpy(before).permute(2, 0, 1)[None].float(), (50, 50))
    assert np.abs(after.astype(float) - small[0].permute(1, 2, 0).numpy()).mean() < 12  # the picture carried on


# -- switching drawers in a run ----------------------------------------------------------------------
@pytest.mark.parametrize("to", ["pixel", "fft", "vqgan"])
def test_a_drawer_switch_carries_the_picture_and_the_prompts(to, clip, vqgan):
    run = run_with(FftDrawer(32, seed=1), clip, FOX)
    for _ in range(3):
        run.step()
    picture = run.image().astype(float)
    with torch.no_grad():
        previous = run.drawer.image()
    steps = run.steps
    fresh = make_drawer(to, vqgan, size=32) if to != "pixel" else PixelDrawer(8, 8, palette=0, size=32)
    run.set_drawer(fresh)
    carried = run.image().astype(float)
    assert run.drawer is fresh and run.prompts == FOX and run.steps == steps
    assert run.optimizer.param_groups[0]["params"][0] is next(fresh.parameters())  # Adam moves the new drawer
    if to == "pixel":
        cells = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(picture).permute(2, 0, 1)[None], 8)
        assert np.allclose(carried[::4, ::4], cells[0].permute(1, 2, 0).numpy(), atol=1.0)
    elif to == "fft":
        assert np.abs(carried - picture).max() <= 2.0
    else:  # a random VQGAN decodes every latent to much the same: the carry shows in z, the picture's encoding
        with torch.no_grad():
            assert torch.allclose(fresh.z, vqgan.encode(previous * 2 - 1), atol=1e-5)
    run.step()


# -- the scene ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("drawers") / "clip"
    build_random_clip(TINY_CLIP).model.save_pretrained(folder)
    byte_level_clip_tokenizer().save_pretrained(folder)
    return folder


def newest(worker: SceneWorker, after: int = 0):
    found = []

    def ready() -> bool:
        frame, _ = worker.output.latest()
        if frame is not None and frame.index > after:
            found.append(frame)
            return True
        return False

    assert wait_for(ready), f"no new image; last error: {worker.last_error}"
    return found[-1]


def test_the_scene_draws_pixels_and_fourier_with_no_vqgan_and_switches_live(clip_dir, tmp_path, caplog):
    params = ParamRegistry()
    params.declare_all(VqganClipScene.PARAMS)
    set_params(
        params,
        {
            f"{P}/vqgan": str(tmp_path / "no-vqgan-here"),
            f"{P}/clip": str(clip_dir),
            f"{P}/drawer": "pixel",
            f"{P}/cells_x": 8,
            f"{P}/cells_y": 4,
            f"{P}/palette": 4,
            f"{P}/size": 64,
            f"{P}/cutouts": 4,
            f"{P}/step_rate": 10.0,
            f"{P}/prompt": "a red fox:1|snow:0.5",
        },
    )
    worker = SceneWorker(SceneCatalog((VqganClipScene,)), params, StillFeed(), error_backoff=0.05)
    worker.start()
    try:
        worker.request("vqgan_clip")
        first = newest(worker)
        assert first.image.shape == (32, 64, 3) and worker.last_error is None
        assert len(np.unique(first.image.reshape(-1, 3), axis=0)) <= 4
        scene = worker.active
        assert scene._vqgan is None  # never loaded
        later = newest(worker, first.index + 2)
        set_params(params, {f"{P}/drawer": "fft"})
        assert wait_for(lambda: scene._run.drawer.name == "fft")
        switched = newest(worker, newest(worker).index)
        assert switched.image.shape == (64, 64, 3)
        assert [p.text for p in scene._run.prompts] == ["a red fox", "snow"]
        # the FFT drawer started from the pixel picture: its first image is blocky, near the last pixel one
        assert np.abs(switched.image.astype(int) - np.repeat(later.image, 2, axis=0)).mean() < 40
        with caplog.at_level(logging.WARNING, logger="engine.scenes.base"):
            set_params(params, {f"{P}/drawer": "vqgan"})  # no checkpoint: said once, fft plays on
            after = newest(worker, newest(worker).index + 3)
        assert scene._run.drawer.name == "fft" and worker.last_error is None
        refusals = [r for r in caplog.records if "drawer refused" in r.getMessage()]
        assert len(refusals) == 1 and "heibox" in refusals[0].getMessage() and "\n" not in refusals[0].getMessage()
        assert "drawer refused" in scene.warning
        steps = scene._run.steps
        set_params(params, {f"{P}/restart": True})
        assert wait_for(lambda: scene._run.steps < steps)  # a restart keeps the last drawer that worked
        assert scene._run.drawer.name == "fft"
        set_params(params, {f"{P}/drawer": "pixel", f"{P}/cells_x": 16})
        assert wait_for(lambda: scene._run.drawer.name == "pixel" and scene._run.drawer.cells_x == 16)
        assert newest(worker, after.index).image.shape[1] == 64 and scene.warning is None
    finally:
        worker.stop()


def test_the_scene_offers_every_drawer():
    from engine.scenes import vqgan_clip
    from engine.vqclip import drawers

    assert vqgan_clip.DRAWERS == drawers.DRAWERS  # the scene's copy (its module imports no torch)


def test_absurd_drawer_values_are_refused_by_their_ranges():
    params = ParamRegistry()
    params.declare_all(VqganClipScene.PARAMS)
    for path, value in (("cells_x", 100_000), ("cells_y", 0), ("palette", -3), ("decay", float("nan"))):
        with pytest.raises(ParamError):
            params.set(f"{P}/{path}", value)
    with pytest.raises(ParamError):
        params.set(f"{P}/drawer", "crayon")
    assert params.get(f"{P}/cells_x") == 32 and params.get(f"{P}/drawer") == "vqgan"


def test_the_drawer_params_reach_osc_over_a_real_socket():
    from pythonosc.udp_client import SimpleUDPClient

    registry = build_registry()
    server = OscServer(registry, Actions(), port=0)
    server.start()
    client = SimpleUDPClient("127.0.0.1", server.port)
    try:
        client.send_message(f"/dreamdeck{P}/drawer", "pixel")
        client.send_message(f"/dreamdeck{P}/cells_x", 48)
        client.send_message(f"/dreamdeck{P}/cells_y", 99_999)  # out of range: refused
        deadline = time.monotonic() + 30
        while server.counts.received < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.frame(0.0)
        registry.apply_pending(0.0)
        assert registry.get(f"{P}/drawer") == "pixel" and registry.get(f"{P}/cells_x") == 48
        assert registry.get(f"{P}/cells_y") == 32
    finally:
        client._sock.close()
        server.stop()


def test_the_pixel_art_preset_draws_its_grid(clip_dir):
    """presets/pixel-art.toml's scene settings, with the tiny CLIP in place of the hub one."""
    import tomllib

    from engine.catalog import PRESETS_DIR

    settings = tomllib.loads((PRESETS_DIR / "pixel-art.toml").read_text())["scene"]["vqgan_clip"]
    params = ParamRegistry()
    params.declare_all(VqganClipScene.PARAMS)
    set_params(params, {**{f"{P}/{k}": v for k, v in settings.items()}, f"{P}/clip": str(clip_dir)})
    worker = SceneWorker(SceneCatalog((VqganClipScene,)), params, StillFeed(), error_backoff=0.05)
    worker.start()
    try:
        worker.request("vqgan_clip")
        image = newest(worker, 1).image.astype(int)
    finally:
        worker.stop()
    cells_x, cells_y = settings["cells_x"], settings["cells_y"]
    block = settings["size"] // max(cells_x, cells_y)
    assert image.shape == (cells_y * block, cells_x * block, 3)
    blocks = image.reshape(cells_y, block, cells_x, block, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()
    assert 1 < len(np.unique(image.reshape(-1, 3), axis=0)) <= settings["palette"]


def test_the_fourier_dream_preset_draws_its_timeline_with_the_fft_drawer(clip_dir):
    """presets/fourier-dream.toml's scene settings (the timeline included), with the tiny CLIP."""
    import tomllib

    from engine.catalog import PRESETS_DIR

    settings = tomllib.loads((PRESETS_DIR / "fourier-dream.toml").read_text())["scene"]["vqgan_clip"]
    timeline = settings.pop("timeline")
    values = {f"{P}/{k}": v for k, v in settings.items()} | {f"{P}/timeline/{k}": v for k, v in timeline.items()}
    params = ParamRegistry()
    params.declare_all(VqganClipScene.PARAMS)
    set_params(params, {**values, f"{P}/clip": str(clip_dir), f"{P}/cutouts": 4})
    worker = SceneWorker(SceneCatalog((VqganClipScene,)), params, StillFeed(), error_backoff=0.05)
    worker.start()
    try:
        worker.request("vqgan_clip")
        first = newest(worker)
        later = newest(worker, first.index + 2)
        scene = worker.active
        assert scene._run.drawer.name == "fft" and scene._vqgan is None
        assert scene._steering == "timeline" and scene.warning is None, scene.warning
        assert later.image.shape == (settings["size"], settings["size"], 3)
        assert not np.array_equal(later.image, first.image)
    finally:
        worker.stop()
