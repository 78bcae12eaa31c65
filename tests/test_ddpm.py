"""The DDPM scene and its parts, offline, with real diffusers models.

Tiny random-weight DDPMs (diffusers' own test sizes) check loading and the shape of the
reverse process; the shipped texture model checks what only a trained model can show:
SDEdit keeps a lightly noised frame and departs from a heavily noised one, and samples look
like the textures it was trained on, not like noise (and an untrained model's do not).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="the diffusion extra is not installed")

from diffusion_fixtures import offline, one_torch_thread, set_params, wait_for  # noqa: E402,F401  (fixtures)
from engine.ddpm.model import SHIPPED_MODEL, TEXTURE_SCHEDULE, build_unet, load_ddpm  # noqa: E402
from engine.ddpm.reverse import ReverseConfig, ReverseProcess, image_to_tensor, sample, tensor_to_images  # noqa: E402
from engine.ddpm.textures import KINDS, texture, texture_set  # noqa: E402
from engine.diffusion.errors import ModelNotFound  # noqa: E402
from engine.params import ParamRegistry  # noqa: E402
from engine.scenes import SceneCatalog, SceneWorker  # noqa: E402
from engine.scenes.ddpm import DdpmScene  # noqa: E402
from engine.scenes.passthrough import Passthrough  # noqa: E402

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"
P = "/scene/ddpm"
TINY_UNET = {  # diffusers' own DDPM test architecture
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
}


def save_ddpm(unet, folder: Path) -> Path:
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**TEXTURE_SCHEDULE)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_ddpm(build_unet(TINY_UNET), tmp_path_factory.mktemp("models") / "tiny-ddpm")


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return load_ddpm(str(tiny_folder))


@pytest.fixture(scope="module")
def shipped():
    return load_ddpm("")


def same_weights(a, b) -> bool:
    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


# -- loading -------------------------------------------------------------------------------------
def test_local_folder_in_the_pipeline_layout(tiny_folder, tiny):
    from diffusers import UNet2DModel

    assert tiny.size == 16 and tiny.schedule["beta_schedule"] == "squaredcos_cap_v2"
    assert same_weights(tiny.unet, UNet2DModel.from_pretrained(tiny_folder, subfolder="unet"))


def test_flat_layout_of_the_early_google_repos(tiny_folder, tmp_path):
    """google/ddpm-* keep config.json, the weights and scheduler_config.json at the top."""
    flat = tmp_path / "flat"
    shutil.copytree(tiny_folder / "unet", flat)
    shutil.copy(tiny_folder / "scheduler" / "scheduler_config.json", flat)
    assert same_weights(load_ddpm(str(flat)).unet, load_ddpm(str(tiny_folder)).unet)


def test_hub_id_from_a_local_cache_offline(tiny_folder, tiny, tmp_path):
    repo = tmp_path / "hub" / "models--dreamdeck-test--tiny-ddpm"  # the layout huggingface_hub writes
    shutil.copytree(tiny_folder, repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    loaded = load_ddpm("dreamdeck-test/tiny-ddpm", cache_dir=str(tmp_path / "hub"))
    assert same_weights(loaded.unet, tiny.unet) and loaded.schedule == tiny.schedule


def test_missing_hub_model_offline_is_one_clear_message(tmp_path):
    with pytest.raises(ModelNotFound) as caught:
        load_ddpm("google/ddpm-church-256", cache_dir=str(tmp_path))
    message = str(caught.value)
    assert "\n" not in message
    assert "'google/ddpm-church-256'" in message and "hf download google/ddpm-church-256" in message
    assert "HF_HUB_OFFLINE=1" in message and str(tmp_path) in message


def test_missing_or_wrong_local_paths_are_model_not_found(tmp_path):
    (tmp_path / "empty").mkdir()
    for name in (str(tmp_path / "nothing-here"), str(tmp_path / "empty"), "not a hub id"):
        with pytest.raises(ModelNotFound, match="not available") as caught:
            load_ddpm(name)
        assert name in str(caught.value) and "\n" not in str(caught.value)


def test_the_shipped_model_is_small_float16_and_loads(shipped):
    weights = SHIPPED_MODEL / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (a safetensors handle is not iterable)
        assert dtypes == {"F16"}
    assert shipped.size == 32 and shipped.dtype == torch.float32  # float32 on the CPU


# -- the reverse process -------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_each_reverse_step_is_a_frame(tiny, scheduler):
    process = ReverseProcess(tiny, ReverseConfig(scheduler=scheduler, steps=8, seed=1))
    start = process.x.clone()
    frames = [tensor_to_images(step.x_t)[0] for step in process]
    assert len(process) == 8 and len(frames) == 8
    assert all(f.shape == (16, 16, 3) and f.dtype == np.uint8 for f in frames)
    assert all(not np.array_equal(a, b) for a, b in zip(frames, frames[1:]))  # every step moves
    assert not torch.equal(start, process.x)
    again = [
        tensor_to_images(s.x_t)[0] for s in ReverseProcess(tiny, ReverseConfig(scheduler=scheduler, steps=8, seed=1))
    ]
    assert np.array_equal(frames[-1], again[-1])  # the seed fixes the image


def test_the_reverse_process_goes_from_noise_to_a_texture(shipped):
    steps = list(ReverseProcess(shipped, ReverseConfig(steps=20, seed=3)))
    first, last = tensor_to_images(steps[0].x_t)[0], tensor_to_images(steps[-1].x_t)[0]
    assert gradient_energy(first[None]) > 3 * gradient_energy(last[None])  # noise is rough, textures smooth
    assert [s.index for s in steps] == list(range(1, 21)) and steps[0].timestep > steps[-1].timestep


def test_sdedit_stays_close_at_small_t_and_departs_at_large_t(shipped):
    frame = texture(np.random.default_rng(7), 96, "marble")  # any size: resized to 32x32
    init = image_to_tensor(frame, shipped.size, shipped.device, shipped.dtype)
    target = tensor_to_images(init)[0].astype(np.float32)

    def distance(strength: float) -> float:
        process = ReverseProcess(shipped, ReverseConfig(steps=20, strength=strength, seed=0), init=init)
        *_, step = process
        assert len(process) == max(1, round(20 * strength))
        return float(np.abs(tensor_to_images(step.x_t)[0].astype(np.float32) - target).mean())

    near, far = distance(0.1), distance(0.9)
    assert near < 12.0  # of 255: the same picture
    assert far > 2 * near


def test_image_to_tensor_takes_any_size_grey_and_rgba(tiny):
    for image in (np.zeros((7, 300, 3), np.uint8), np.full((50, 40), 255, np.uint8), np.zeros((33, 33, 4), np.uint8)):
        x = image_to_tensor(image, 32, tiny.device, tiny.dtype)
        assert x.shape == (1, 3, 32, 32) and -1.0 <= float(x.min()) <= float(x.max()) <= 1.0


# -- samples look like textures, not like noise ----------------------------------------------------
def gradient_energy(images: np.ndarray) -> float:
    """Mean squared difference of neighbouring pixels: high for noise, low for smooth textures."""
    x = images.astype(np.float32) / 255.0
    return float(((x[:, 1:] - x[:, :-1]) ** 2).mean() + ((x[:, :, 1:] - x[:, :, :-1]) ** 2).mean())


def log_spectrum(images: np.ndarray, bins: int = 8) -> np.ndarray:
    """Radially averaged log power spectrum of the grey images (mean over the set)."""
    grey = images.astype(np.float32).mean(axis=3) / 255.0
    power = np.abs(np.fft.fftshift(np.fft.fft2(grey - grey.mean(axis=(1, 2), keepdims=True)), axes=(1, 2))) ** 2
    n = grey.shape[1]
    yy, xx = np.mgrid[0:n, 0:n] - n // 2
    ring = np.minimum((np.hypot(yy, xx) / (n / 2) * bins).astype(int), bins)
    return np.array([np.log(power[:, ring == r].mean() + 1e-8) for r in range(1, bins)])


def statistic_distances(images: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    return (
        abs(np.log(gradient_energy(images) / gradient_energy(reference))),
        float(np.abs(log_spectrum(images) - log_spectrum(reference)).mean()),
    )


def looks_like_textures(images: np.ndarray) -> bool:
    """Closer to fresh training textures than noise is, by both statistics, with a wide margin."""
    reference = texture_set(64, 32, seed=999)  # not the training images (seed 0)
    noise = tensor_to_images(torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    ours, noise_d = statistic_distances(images, reference), statistic_distances(noise, reference)
    return all(d < 0.25 * n for d, n in zip(ours, noise_d))


def test_samples_are_closer_to_textures_than_noise_is(shipped):
    samples = sample(shipped, ReverseConfig(steps=25, seed=5), batch=32)
    assert looks_like_textures(samples)
    assert looks_like_textures(texture_set(32, 32, seed=4))  # the statistic accepts the real thing


def test_the_statistic_rejects_an_untrained_model():
    """The check can fail: the same architecture with random weights does not pass it."""
    from engine.ddpm.model import DdpmModel

    torch.manual_seed(0)
    untrained = DdpmModel(unet=build_unet().eval(), schedule=dict(TEXTURE_SCHEDULE))
    assert not looks_like_textures(sample(untrained, ReverseConfig(steps=25, seed=5), batch=32))


def test_textures_are_reproducible_and_varied():
    a, b = texture_set(10, 32, seed=1), texture_set(10, 32, seed=1)
    assert np.array_equal(a, b) and not np.array_equal(a, texture_set(10, 32, seed=2))
    assert a.shape == (10, 32, 32, 3) and a.dtype == np.uint8 and len(KINDS) == 5
    assert all(img.std() > 10 for img in a)  # no blank tiles


# -- the scene, driven by a real worker ----------------------------------------------------------
class Camera:
    """A feed of the same odd-sized picture, a new frame (key) every call; None until ``on``."""

    def __init__(self) -> None:
        self.image = texture(np.random.default_rng(1), 48, "stripes")[:, :40]
        self.on = False
        self._lock = threading.Lock()
        self.key = 0

    def __call__(self):
        with self._lock:
            self.key += 1
            return (self.image if self.on else None), self.key


def frames_after(worker: SceneWorker, after: int, count: int) -> list:
    seen: dict[int, object] = {}

    def enough() -> bool:
        frame, _ = worker.output.latest()
        if frame is not None and frame.scene == "ddpm" and frame.index > after:
            seen[frame.index] = frame
        return len(seen) >= count

    assert wait_for(enough), f"only {len(seen)} ddpm images; last error: {worker.last_error}"
    return [seen[i] for i in sorted(seen)]


def test_importing_the_scene_needs_no_torch():
    import subprocess
    import sys

    code = "import sys, engine.scenes.ddpm; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip() == "False False", done.stderr


def test_the_scene_plays_through_a_worker_and_takes_live_changes(tmp_path):
    params = ParamRegistry()
    params.declare_all(DdpmScene.PARAMS)
    set_params(params, {f"{P}/steps": 4, f"{P}/step_rate": 120.0, f"{P}/hold": 0.0})
    camera = Camera()
    worker = SceneWorker(SceneCatalog((Passthrough, DdpmScene)), params, camera, error_backoff=0.05)
    worker.start()
    try:
        worker.request("ddpm")
        frames = frames_after(worker, 0, 6)
        assert all(f.image.shape == (32, 32, 3) and f.image.dtype == np.uint8 for f in frames)
        assert len({f.image.tobytes() for f in frames}) >= 5  # it denoises: the frames change
        assert worker.active.max_fps == 120.0
        # a missing model: reported once, the shipped one plays on
        set_params(params, {f"{P}/model": str(tmp_path / "no-such-model")})
        assert wait_for(lambda: worker.last_error is not None and "no-such-model" in worker.last_error)
        assert "ModelNotFound" in worker.last_error
        after = frames_after(worker, frames[-1].index, 4)[-1].index
        # sdedit: no camera frame yet -> noise; then the camera, any size
        set_params(params, {f"{P}/mode": "sdedit", f"{P}/sdedit_strength": 0.1, f"{P}/show": "x0"})
        camera.on = True
        late = frames_after(worker, after + 8, 4)  # past any image started before the change
        target = image_to_tensor(camera.image, 32, torch.device("cpu"), torch.float32)
        closest = min(np.abs(f.image.astype(np.float32) - tensor_to_images(target)[0]).mean() for f in late)
        assert closest < 20.0  # at strength 0.1 the scene shows the camera, lightly redrawn
    finally:
        worker.stop()
