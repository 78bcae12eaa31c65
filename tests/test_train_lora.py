"""``dreamdeck train-lora`` (``engine.diffusion.train_lora``) on diffusers' tiny random model saved
in a local folder and 8 generated drawings of mixed sizes: the loss falls; the file loads with
diffusers' ``load_lora_weights``, in a LoRA slot and as a kohya copy, and there lowers the
model's denoising error on the drawings; a resumed run takes exactly the steps the
uninterrupted one took; bad input is one line and leaves no half-written file.
"""

from __future__ import annotations

import copy
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft", reason="the diffusion extra is not installed")

from diffusion_fixtures import offline, one_torch_thread  # noqa: E402,F401  (fixtures)
from engine.cli import main  # noqa: E402
from engine.diffusion.configs import ARCHITECTURES, build_random_model  # noqa: E402
from engine.diffusion.device import choose_device  # noqa: E402
from engine.diffusion.loading import ModelSpec, load_pipeline  # noqa: E402
from engine.diffusion.lora import AdapterBank  # noqa: E402
from engine.diffusion.train_lora import (  # noqa: E402
    TrainConfig,
    TrainError,
    checkpoint_path,
    needs_gpu,
    read_pictures,
    sample_path,
    train,
)

ROOT = Path(__file__).resolve().parent.parent
CPU = choose_device("cpu", "float32")
SIZE = 32
STEPS = 60
SIZES = [(48, 40), (64, 64), (40, 56), (80, 48)]  # (width, height): mixed sizes and shapes


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny"
    build_random_model("tiny", seed=0).save_pretrained(folder)
    return folder


def draw(folder: Path, count: int = 8) -> Path:
    """``count`` striped drawings in two colours, of four sizes; two carry their own caption."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        y, x = np.mgrid[0:height, 0:width]
        stripes = ((x + y * (i % 3)) // 6) % 2
        Image.fromarray(np.array([[230, 40, 40], [30, 30, 200]], dtype=np.uint8)[stripes]).save(folder / f"d{i}.png")
    (folder / "d0.txt").write_text("red and blue stripes, sks style\n")
    (folder / "d1.txt").write_text("  ")  # empty: the --caption applies
    return folder


@pytest.fixture(scope="module")
def drawings(tmp_path_factory) -> Path:
    return draw(tmp_path_factory.mktemp("drawings"))


def config(drawings: Path, out: Path, **changes) -> TrainConfig:
    settings = dict(
        images=drawings,
        out=out,
        steps=STEPS,
        rank=4,
        size=SIZE,
        caption="a drawing in sks style",
        lr=1e-2,
        batch=4,
        checkpoint_every=30,
        sample_every=30,
        sample_steps=2,
    )
    settings.update(changes)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def trained(base, drawings, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "sks.safetensors"
    return train(config(drawings, out, base=str(base), kohya=True), CPU, progress=False)


class DenoisingError:
    """The UNet's noise-prediction error on the drawings at fixed noise and timesteps."""

    def __init__(self, base: Path, drawings: Path) -> None:
        pipe = load_pipeline(ModelSpec(model=str(base)), torch.float32)
        pictures = read_pictures(drawings, SIZE, "a drawing in sks style")
        with torch.no_grad():
            pixels = torch.stack([p.pixels for p in pictures])
            latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
            ids = pipe.tokenizer(
                [p.caption for p in pictures], padding="max_length", max_length=77, return_tensors="pt"
            ).input_ids
            self.text = pipe.text_encoder(ids)[0]
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        generator = torch.Generator().manual_seed(123)
        self.cases = []
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.full((len(latents),), t)
            self.cases.append((scheduler.add_noise(latents, noise, timesteps), timesteps, noise))

    @torch.no_grad()
    def __call__(self, unet) -> float:
        errors = [
            torch.nn.functional.mse_loss(unet(noisy, t, encoder_hidden_states=self.text).sample, noise).item()
            for noisy, t, noise in self.cases
        ]
        return float(np.mean(errors))


@pytest.fixture(scope="module")
def error(base, drawings) -> DenoisingError:
    return DenoisingError(base, drawings)


def test_mixed_sizes_are_resized_and_center_cropped_with_their_captions(drawings):
    pictures = read_pictures(drawings, SIZE, "a drawing in sks style")
    assert len(pictures) == 8
    assert {tuple(p.pixels.shape) for p in pictures} == {(3, SIZE, SIZE)}
    assert {p.original_size for p in pictures} == {(h, w) for w, h in SIZES}
    assert all(p.pixels.min() >= -1.0 and p.pixels.max() <= 1.0 for p in pictures)
    assert pictures[0].caption == "red and blue stripes, sks style"  # the sidecar wins
    assert {p.caption for p in pictures[1:]} == {"a drawing in sks style"}  # an empty sidecar: --caption


def test_the_training_loss_falls(trained):
    losses = trained.losses
    assert len(losses) == STEPS and trained.start_step == 0 and trained.steps == STEPS
    first, last = np.mean(losses[:15]), np.mean(losses[-15:])
    assert last < 0.97 * first, (first, last)


def test_checkpoints_and_samples_are_written_beside_the_output(trained):
    from PIL import Image

    assert trained.samples == [sample_path(trained.out, 30), sample_path(trained.out, 60)]
    for sample in trained.samples:
        with Image.open(sample) as image:
            assert image.size == (SIZE, SIZE)
    first, second = (np.asarray(Image.open(s)) for s in trained.samples)
    assert not np.array_equal(first, second)  # the same seed: what changed is the LoRA
    state = torch.load(checkpoint_path(trained.out), weights_only=True)
    assert state["step"] == STEPS and len(state["losses"]) == STEPS
    leftovers = [p.name for p in trained.out.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary file or folder stays behind


def test_the_lora_loads_with_diffusers_and_lowers_the_denoising_error(base, trained, error):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None, requires_safety_checker=False)
    without = error(pipe.unet)
    pipe.load_lora_weights(str(trained.out.parent), weight_name=trained.out.name, adapter_name="sks")
    assert "sks" in pipe.unet.peft_config and pipe.unet.peft_config["sks"].r == 4
    with_lora = error(pipe.unet)
    assert with_lora < 0.97 * without, (with_lora, without)


@pytest.mark.parametrize("kohya", [False, True], ids=["diffusers", "kohya"])
def test_the_lora_plays_in_a_slot_at_weight_one_and_lowers_the_denoising_error(base, trained, error, kohya):
    unet = copy.deepcopy(load_pipeline(ModelSpec(model=str(base)), torch.float32).unet)
    without = error(unet)
    bank = AdapterBank(unet, target_rank=8)
    bank.request(1, str(trained.kohya if kohya else trained.out))
    bank.wait(60)
    change = bank.apply()
    assert change.error is None and change.files, change.error
    assert bank.sources[1].endswith(".kohya.safetensors" if kohya else "sks.safetensors")
    with_lora = error(unet)
    assert with_lora < 0.97 * without, (with_lora, without)
    bank.set_weight(1, 0.0)
    bank.apply()
    assert error(unet) == pytest.approx(without, abs=1e-6)  # weight 0: the base model again
    bank.close()


def test_a_resumed_run_continues_from_its_checkpoint_step(base, drawings, trained, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "resumed.safetensors"
    first = train(config(drawings, out, base=str(base), steps=30, sample_every=0), CPU, progress=False)
    assert first.steps == 30 and torch.load(checkpoint_path(out), weights_only=True)["step"] == 30
    resumed = train(config(drawings, out, base=str(base), sample_every=0, resume=True), CPU, progress=False)
    assert resumed.start_step == 30 and resumed.steps == STEPS and len(resumed.losses) == STEPS - 30
    # the same steps as the uninterrupted run: batches, noise, timesteps and optimizer state restored
    np.testing.assert_allclose(first.losses + resumed.losses, trained.losses, rtol=1e-4)
    ours, theirs = load_file(out), load_file(trained.out)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-3, atol=1e-5)
    assert len(torch.load(checkpoint_path(out), weights_only=True)["losses"]) == STEPS


def test_a_checkpoint_of_other_settings_is_refused(base, drawings, trained, tmp_path):
    import shutil

    out = tmp_path / "other.safetensors"
    shutil.copy(checkpoint_path(trained.out), checkpoint_path(out))
    with pytest.raises(TrainError, match="rank 4 .now 8"):
        train(config(drawings, out, base=str(base), rank=8, resume=True), CPU, progress=False)


def cli(*args: str) -> list[str]:
    return ["train-lora", *args, "--no-progress", "--device", "cpu", "--size", str(SIZE), "--steps", "2"]


def one_line_error(capsys, code: int, expected: int = 2) -> str:
    err = capsys.readouterr().err.strip()
    assert code == expected, err
    assert "\n" not in err and err.startswith("dreamdeck train-lora: "), err
    return err


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable", "no caption"])
def test_a_bad_picture_folder_is_one_line_and_writes_nothing(base, tmp_path, capsys, case):
    folder = tmp_path / "pictures"
    if case != "missing":
        folder.mkdir()
    if case == "unreadable":
        (folder / "a.png").write_bytes(b"not a picture")
        (folder / "b.jpg").write_bytes(b"")
    if case == "no caption":
        draw(folder, 2)
    out = tmp_path / "out" / "x.safetensors"
    code = main(
        cli(str(folder), "--base", str(base), "--out", str(out), *([] if case == "no caption" else ["--caption", "x"]))
    )
    err = one_line_error(capsys, code)
    expected = {
        "missing": "no such folder",
        "empty": "no pictures in it",
        "unreadable": "none of its 2 pictures could be read",
        "no caption": "has no caption",
    }[case]
    assert expected in err
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_an_unreadable_picture_among_good_ones_is_skipped_with_a_log_line(tmp_path, caplog):
    folder = draw(tmp_path / "pictures", 3)
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    pictures = read_pictures(folder, SIZE, "x")
    assert [p.path.name for p in pictures] == ["d0.png", "d1.png", "d2.png"]
    assert any("broken.png" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("model", ["folder", "hub id"])
def test_a_missing_base_model_is_one_line(drawings, tmp_path, capsys, model):
    name = str(tmp_path / "no-such-model") if model == "folder" else "nobody-here/no-such-model"
    out = tmp_path / "x.safetensors"
    code = main(cli(str(drawings), "--base", name, "--out", str(out), "--caption", "x"))
    err = one_line_error(capsys, code)
    assert name in err and ("HF_HUB_OFFLINE" in err if model == "hub id" else "no such folder" in err)
    assert not out.exists()


def test_resume_without_a_checkpoint_is_one_line(base, drawings, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    code = main(cli(str(drawings), "--base", str(base), "--out", str(out), "--caption", "x", "--resume"))
    assert "there is no checkpoint" in one_line_error(capsys, code)
    assert not out.exists()


def test_the_output_must_be_a_safetensors_file(base, drawings, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(cli(str(drawings), "--base", str(base), "--out", str(tmp_path / "x.pt")))
    assert exit_.value.code == 2 and "safetensors" in capsys.readouterr().err


def test_a_full_disk_is_one_line_and_the_previous_file_stays_whole(base, drawings, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) makes every write past 64 KB fail, as a full disk does
    (EFBIG here, ENOSPC there: both an OSError from write)."""
    out = tmp_path / "sks.safetensors"
    out.write_bytes(b"the previous LoRA")
    limit = 64 * 1024

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: write raises

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = cli(str(drawings), "--base", str(base), "--out", str(out), "--caption", "x", "--sample-every", "0")
    done = subprocess.run(
        [sys.executable, "-m", "engine", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_disk,
    )
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1, done.stderr
    assert last.startswith("dreamdeck train-lora: cannot write ") and "disk full" in last, done.stderr
    assert out.read_bytes() == b"the previous LoRA"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sks.safetensors"]  # no partial checkpoint, no temp file


def test_a_real_size_model_on_the_cpu_is_told_it_needs_a_gpu():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**ARCHITECTURES["sd15"].unet)
        tiny = UNet2DConditionModel(**ARCHITECTURES["tiny"].unet)
    message = needs_gpu(sd15, CPU)
    assert message is not None and message.startswith("a real model needs a GPU") and "\n" not in message
    assert needs_gpu(tiny, CPU) is None


def test_an_sdxl_lora_trains_with_both_text_encoders_and_loads_in_diffusers(drawings, tmp_path):
    """diffusers' tiny SDXL: two text encoders side by side, the pooled embedding and the time ids
    (the SDXL UNet refuses a call without them), saved by StableDiffusionXLPipeline."""
    from diffusers import StableDiffusionXLPipeline

    from engine.diffusion.configs import build_random_sdxl

    build_random_sdxl().save_pretrained(tmp_path / "tiny-sdxl")
    out = tmp_path / "xl" / "sks.safetensors"
    report = train(
        config(drawings, out, base=str(tmp_path / "tiny-sdxl"), steps=6, checkpoint_every=0, sample_every=6),
        CPU,
        progress=False,
    )
    assert len(report.losses) == 6 and all(np.isfinite(report.losses))
    assert report.samples == [sample_path(out, 6)]
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "tiny-sdxl"))
    generator = torch.Generator().manual_seed(0)
    sample, text = torch.randn((1, 4, 16, 16), generator=generator), torch.randn((1, 77, 64), generator=generator)
    added = {"text_embeds": torch.randn((1, 32), generator=generator), "time_ids": torch.tensor([[32.0] * 6])}

    @torch.no_grad()
    def output():
        return pipe.unet(sample, 500, encoder_hidden_states=text, added_cond_kwargs=added).sample

    before = output()
    pipe.load_lora_weights(str(out.parent), weight_name=out.name)
    assert (output() - before).abs().max() > 0  # the trained B is not zero any more
    # the realtime scene plays SD 1.5 / 2.1: a slot there refuses the SDXL LoRA in one line
    bank = AdapterBank(build_random_model("tiny").unet, target_rank=8)
    bank.request(1, str(out))
    bank.wait(60)
    change = bank.apply()
    assert change.error is not None and "\n" not in change.error and str(out) in change.error
    assert bank.sources == {}
    bank.close()
    with pytest.raises(TrainError, match="--kohya: SD 1.5 / 2.1 bases only"):
        train(config(drawings, out, base=str(tmp_path / "tiny-sdxl"), kohya=True), CPU, progress=False)


def test_the_command_trains_writes_and_resumes(base, drawings, tmp_path, capsys):
    out = tmp_path / "loras" / "ink.safetensors"
    args = cli(str(drawings), "--base", str(base), "--out", str(out), "--caption", "x", "--rank", "2", "--kohya")
    assert main([*args, "--sample-every", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out} (2 steps") and "kohya copy" in printed and "samples" in printed
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == [
        "ink.checkpoint.pt",
        "ink.kohya.safetensors",
        "ink.safetensors",
        "ink.sample-000001.png",
        "ink.sample-000002.png",
    ]
    assert main([*args, "--sample-every", "0", "--resume", "--steps", "3"]) == 0  # the last --steps wins
    assert capsys.readouterr().out.startswith(f"wrote {out} (3 steps")
    assert torch.load(checkpoint_path(out), weights_only=True)["step"] == 3
