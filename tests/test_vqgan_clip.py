"""VQGAN+CLIP: the taming checkpoint loader, the optimisation loop and the scene, on tiny models.

The reference VQGAN is taming-transformers' own Encoder/Decoder (``taming-transformers-rom1504``,
installed with --no-deps: that module needs only torch), saved as a real Lightning-style
``.ckpt`` + ``.yaml``; CLIP is a tiny random ``CLIPModel`` saved with ``save_pretrained`` and
the byte-level tokenizer. Losses are measured with fixed cutouts, so they compare across steps.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="the diffusion extra is not installed")

from diffusion_fixtures import StillFeed, offline, one_torch_thread, set_params, wait_for  # noqa: E402,F401  (fixtures)
from engine.diffusion.configs import byte_level_clip_tokenizer  # noqa: E402
from engine.diffusion.errors import ModelNotFound  # noqa: E402
from engine.params import ParamRegistry  # noqa: E402
from engine.prompt_syntax import WeightedPrompt, parse_prompts  # noqa: E402
from engine.scenes import SceneCatalog, SceneWorker  # noqa: E402
from engine.scenes.vqgan_clip import VqganClipScene  # noqa: E402
from engine.vqclip.clip import load_clip  # noqa: E402
from engine.vqclip.configs import TINY_CLIP, TINY_VQGAN, build_random_clip_model, taming_yaml  # noqa: E402
from engine.vqclip.optimise import Cutouts, VqganClip, frame_to_tensor  # noqa: E402
from engine.vqclip.vqgan import load_vqgan  # noqa: E402

P = "/scene/vqgan_clip"
FOX, SEA = [WeightedPrompt("a red fox in the snow", 1.0)], [WeightedPrompt("the deep blue sea", 1.0)]


class _LightningCallbackState:
    """Stands for the training state a real Lightning checkpoint pickles (a class not installed at load)."""

    def __init__(self) -> None:
        self.best_model_score = 0.5


def taming_reference(seed: int = 0):
    """taming's own VQGAN network (the modules of taming.models.vqgan.VQModel, same attribute names)."""
    taming_model = pytest.importorskip(
        "taming.modules.diffusionmodules.model", reason="pip install --no-deps taming-transformers-rom1504"
    )
    nn = torch.nn
    dd, embed = TINY_VQGAN["ddconfig"], TINY_VQGAN["embed_dim"]
    torch.manual_seed(seed)
    ref = nn.Module()
    ref.encoder, ref.decoder = taming_model.Encoder(**dd), taming_model.Decoder(**dd)
    ref.quantize = nn.Module()
    ref.quantize.embedding = nn.Embedding(TINY_VQGAN["n_embed"], embed)
    ref.quant_conv, ref.post_quant_conv = nn.Conv2d(dd["z_channels"], embed, 1), nn.Conv2d(embed, dd["z_channels"], 1)
    with torch.no_grad():  # norms start at 1 / 0: move every weight so a misplaced one shows
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path, object]:
    """(vqgan folder with model.ckpt + model.yaml, CLIP folder, the taming reference)."""
    root = tmp_path_factory.mktemp("vqclip")
    ref = taming_reference()
    (root / "vqgan").mkdir()
    state = {**ref.state_dict(), "loss.discriminator.main.0.weight": torch.zeros(4)}
    torch.save(
        {"state_dict": state, "epoch": 7, "callbacks": {"ModelCheckpoint": _LightningCallbackState()}},
        root / "vqgan" / "model.ckpt",
    )
    (root / "vqgan" / "model.yaml").write_text(taming_yaml(TINY_VQGAN))
    build_random_clip_model(TINY_CLIP).save_pretrained(root / "clip")
    byte_level_clip_tokenizer().save_pretrained(root / "clip")
    return root / "vqgan", root / "clip", ref


@pytest.fixture(scope="module")
def loaded(models):
    vqgan_dir, clip_dir, _ = models
    return load_vqgan(vqgan_dir), load_clip(str(clip_dir))


def optimiser(loaded, prompts, **kwargs) -> VqganClip:
    vqgan, clip = loaded
    kwargs = {"size": 32, "lr": 0.1, "cutouts": Cutouts(count=8), "seed": 0, **kwargs}
    return VqganClip(vqgan, clip, prompts, **kwargs)


# -- loading -----------------------------------------------------------------------------------------
def test_loader_reproduces_the_taming_network(models, loaded):
    _, _, ref = models
    vqgan, _ = loaded
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = vqgan.encode(image)
        assert torch.allclose(z, ref.quant_conv(ref.encoder(image)), atol=1e-4)
        z_q = vqgan.quantize(z)
        codebook = ref.quantize.embedding.weight  # taming's quantiser: the nearest code by L2
        flat = z.movedim(1, -1).reshape(-1, codebook.shape[1])
        nearest = codebook[torch.cdist(flat, codebook).argmin(1)].view(2, 8, 8, -1).movedim(-1, 1)
        assert torch.allclose(z_q, nearest, atol=1e-6)
        decoded = vqgan.decode(z_q)
        expected = ref.decoder(ref.post_quant_conv(z_q))
    assert decoded.shape == (2, 3, 32, 32)
    assert torch.allclose(decoded, expected, atol=1e-4), (decoded - expected).abs().max()


def test_a_checkpoint_file_finds_its_yaml_by_stem(models, loaded, tmp_path, caplog):
    vqgan_dir, _, _ = models
    (tmp_path / "f4.ckpt").write_bytes((vqgan_dir / "model.ckpt").read_bytes())
    with pytest.raises(ModelNotFound, match="no .yaml config"):
        load_vqgan(tmp_path / "f4.ckpt")
    (tmp_path / "f4.yaml").write_text((vqgan_dir / "model.yaml").read_text())
    with caplog.at_level(logging.INFO, logger="engine.vqclip.vqgan"):
        vqgan = load_vqgan(tmp_path / "f4.ckpt")
    assert "reading its tensors only" in caplog.text  # the pickled training state was not unpickled
    assert torch.equal(vqgan.codebook, loaded[0].codebook)


def test_missing_models_raise_one_line_model_not_found(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFound) as vq:
        load_vqgan(tmp_path / "nothing-here")
    assert "heibox.uni-heidelberg.de" in str(vq.value) and "model.yaml" in str(vq.value)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotFound) as clip:
        load_clip("openai/clip-vit-base-patch32")
    assert "hf download openai/clip-vit-base-patch32" in str(clip.value)
    with pytest.raises(ModelNotFound):
        load_clip(str(tmp_path / "no-such-folder"))
    for exc in (vq.value, clip.value):
        assert "\n" not in str(exc)


# -- prompts -----------------------------------------------------------------------------------------
def test_prompt_weights_parse_and_bad_ones_are_refused():
    assert parse_prompts("a forest:2| fog :-0.5|mist|") == [
        WeightedPrompt("a forest", 2.0),
        WeightedPrompt("fog", -0.5),
        WeightedPrompt("mist", 1.0),
    ]
    assert parse_prompts("blurry:0.5|text", negative=True) == [
        WeightedPrompt("blurry", -0.5),
        WeightedPrompt("text", -1.0),
    ]
    for bad in ("a forest:lots", "fog:nan", "x:inf"):
        with pytest.raises(ValueError, match="weight"):
            parse_prompts(bad)


# -- the loop ----------------------------------------------------------------------------------------
def test_clip_loss_falls_and_the_image_changes(loaded):
    run = optimiser(loaded, FOX)
    before_loss, before_image = run.loss(), run.image()
    for _ in range(15):
        frame = run.step()
        assert frame.shape == (32, 32, 3) and frame.dtype == np.uint8
    assert run.loss() < before_loss - 0.01
    assert np.abs(run.image().astype(int) - before_image).mean() > 1.0


def test_a_live_prompt_change_steers_without_a_restart(loaded):
    run = optimiser(loaded, FOX)
    for _ in range(5):
        run.step()
    z = run.z.detach().clone()
    adam = run.optimizer.state[run.z]
    moments = adam["exp_avg"].clone()
    run.set_prompts(SEA)
    assert run.z is run.optimizer.param_groups[0]["params"][0]  # the same latent, the same optimiser
    assert torch.equal(run.z, z) and torch.equal(run.optimizer.state[run.z]["exp_avg"], moments)
    sea_before = run.loss()
    for _ in range(10):
        run.step()
    assert int(run.optimizer.state[run.z]["step"]) == 15  # Adam's state carried on through the change
    assert run.loss() < sea_before - 0.01


def test_a_negative_prompt_pushes_away(loaded):
    run = optimiser(loaded, [WeightedPrompt("a red fox in the snow", -1.0)])
    toward_fox = run.loss(FOX)  # the distance to the fox, measured as a positive prompt
    for _ in range(10):
        run.step()
    assert run.loss(FOX) > toward_fox + 0.01


def test_camera_init_starts_from_the_frame(loaded):
    vqgan, _ = loaded
    rng = np.random.default_rng(1)
    frame_a = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    frame_b = 255 - frame_a
    run = optimiser(loaded, FOX, init=frame_a)
    with torch.no_grad():
        expected = vqgan.encode(frame_to_tensor(frame_a, (32, 32), torch.device("cpu")) * 2 - 1)
    assert torch.allclose(run.z, expected)
    first_a = run.step()
    first_b = optimiser(loaded, FOX, init=frame_b).step()
    from_noise = optimiser(loaded, FOX).step()
    assert not np.array_equal(first_a, first_b) and not np.array_equal(first_a, from_noise)


def test_resize_carries_the_latent_on(loaded):
    run = optimiser(loaded, FOX)
    run.step()
    run.resize(64)
    assert run.z.shape[-2:] == (16, 16) and run.step().shape == (64, 64, 3)


# -- the scene ---------------------------------------------------------------------------------------
def test_importing_the_scene_needs_no_torch():
    code = "import sys, engine.scenes.vqgan_clip; print('torch' in sys.modules, 'transformers' in sys.modules)"
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False False", done.stderr


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


def test_the_scene_plays_through_the_worker(models, caplog):
    vqgan_dir, clip_dir, _ = models
    params = ParamRegistry()
    params.declare_all(VqganClipScene.PARAMS)
    set_params(
        params,
        {
            f"{P}/vqgan": str(vqgan_dir),
            f"{P}/clip": str(clip_dir),
            f"{P}/size": 32,
            f"{P}/cutouts": 4,
            f"{P}/prompt": "a red fox:1|snow:0.5",
            f"{P}/init": "camera",
        },
    )
    worker = SceneWorker(SceneCatalog((VqganClipScene,)), params, StillFeed(), error_backoff=0.05)
    worker.start()
    try:
        worker.request("vqgan_clip")
        first = newest(worker)
        assert first.image.shape == (32, 32, 3) and first.image.dtype == np.uint8
        later = newest(worker, first.index + 3)
        assert not np.array_equal(later.image, first.image)  # it keeps optimising
        scene = worker.active
        assert scene.max_fps == 30.0
        with caplog.at_level(logging.WARNING, logger="engine.scenes.vqgan_clip"):
            set_params(params, {f"{P}/prompt": "a red fox:lots", f"{P}/step_rate": 50.0})
            after_bad = newest(worker, later.index + 2)
        assert "not a number" in caplog.text and worker.last_error is None
        assert [p.text for p in scene._run.prompts] == ["a red fox", "snow"]  # the last good prompts
        assert scene.max_fps == 50.0
        steps = scene._run.steps
        set_params(params, {f"{P}/restart": True})
        newest(worker, after_bad.index + 1)
        assert wait_for(lambda: scene._run.steps < steps)  # a fresh run
    finally:
        worker.stop()


def test_the_scene_reports_missing_weights(tmp_path):
    params = ParamRegistry()
    params.declare_all(VqganClipScene.PARAMS)
    set_params(params, {f"{P}/vqgan": str(tmp_path / "missing.ckpt")})
    worker = SceneWorker(SceneCatalog((VqganClipScene,)), params, StillFeed(), error_backoff=0.05)
    worker.start()
    try:
        worker.request("vqgan_clip")
        assert wait_for(lambda: worker.failed == "vqgan_clip")
        assert "ModelNotFound" in worker.last_error and "heibox" in worker.last_error
        assert VqganClipScene.fallback == "ddpm"
    finally:
        worker.stop()
