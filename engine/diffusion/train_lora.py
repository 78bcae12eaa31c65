"""``dreamdeck train-lora``: a LoRA trained on a folder of the performer's own pictures.

The recipe is diffusers' (``examples/text_to_image/train_text_to_image_lora.py`` and its
SDXL sibling), without accelerate or datasets:

- the base model's UNet gets a peft LoRA on its attention projections (``to_q``, ``to_k``,
  ``to_v``, ``to_out.0``, alpha = rank); the VAE, the text encoder(s) and the UNet's own
  weights stay frozen;
- each step noises the latents of a random batch of pictures to random timesteps with
  ``DDPMScheduler`` (built from the base model's scheduler config, so its betas and
  prediction type: epsilon, v-prediction or sample) and takes the MSE of the UNet's
  prediction against the matching target;
- since the VAE and text encoder are frozen and the pictures are only resized and
  center-cropped, their latent distributions and caption embeddings are computed once; each
  step samples a latent from its distribution, as the diffusers script does;
- all the randomness (batches, latents, noise, timesteps) comes from one seeded generator
  whose state the checkpoint keeps: a resumed run takes exactly the steps the uninterrupted
  one would have.

Every file is written atomically (``engine.files.write_atomic``, or a temporary folder
renamed over): a full disk or a crash leaves the previous file or none, never half of one.
The LoRA is saved by ``StableDiffusionPipeline.save_lora_weights`` (diffusers' layout, which
diffusers, the LoRA slots, ComfyUI and A1111 read), optionally also as a kohya file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from engine.diffusion.device import DeviceChoice
from engine.diffusion.loading import ModelSpec, load_pipeline
from engine.diffusion.lora import ATTENTION_TARGETS
from engine.files import fsync_directory, write_atomic

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CHECKPOINT_FORMAT = 1
GPU_SIZED_UNET = 200_000_000  # parameters: SD 1.5's UNet has 860 M; anything this big wants a GPU


class TrainError(ValueError):
    """Input that cannot train (one line: which file or folder, and why)."""


@dataclass(frozen=True)
class TrainConfig:
    images: Path
    base: str
    out: Path
    steps: int = 500
    rank: int = 16
    size: int = 512
    caption: str | None = None  # one caption for every picture without a sidecar .txt
    lr: float = 1e-4
    batch: int = 1
    checkpoint_every: int = 100  # 0: only at the end
    sample_every: int = 100  # 0: no samples
    sample_steps: int | None = None  # None: 4 for turbo / LCM models, else 25
    resume: bool = False
    seed: int = 0
    kohya: bool = False  # also write FILE.kohya.safetensors


@dataclass
class TrainReport:
    start_step: int  # 0, or the checkpoint's step when resumed
    steps: int  # the last step reached
    losses: list[float]  # one per step of this run
    seconds: float
    out: Path
    checkpoint: Path
    samples: list[Path] = field(default_factory=list)
    kohya: Path | None = None

    @property
    def steps_per_second(self) -> float:
        return len(self.losses) / self.seconds if self.seconds > 0 else 0.0


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.stem + ".checkpoint.pt")


def sample_path(out: Path, step: int) -> Path:
    return out.with_name(f"{out.stem}.sample-{step:06d}.png")


# -- the pictures ---------------------------------------------------------------------------------
@dataclass
class Picture:
    path: Path
    pixels: torch.Tensor  # 3 x size x size in [-1, 1]
    caption: str
    original_size: tuple[int, int]  # (height, width) before the resize: SDXL's time ids
    crop_top_left: tuple[int, int]


def read_pictures(folder: Path, size: int, caption: str | None) -> list[Picture]:
    """Every picture in ``folder``, resized (shorter side = ``size``) and center-cropped to a square:
    pictures of any size and shape mix. Unreadable files are skipped with a log line; none at all
    readable raises TrainError."""
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise TrainError(f"{folder}: no such folder of pictures")
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except OSError as exc:
        raise TrainError(f"{folder}: cannot be read ({exc.strerror or exc})") from exc
    if not files:
        raise TrainError(f"{folder}: no pictures in it ({', '.join(IMAGE_SUFFIXES)})")
    pictures, skipped = [], []
    for path in files:
        try:
            with Image.open(path) as image:
                image.load()
                rgb = image.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            skipped.append(f"{path.name} ({type(exc).__name__})")
            continue
        text = _caption_for(path, caption)
        pixels, top_left = _square(rgb, size)
        pictures.append(Picture(path, pixels, text, (rgb.height, rgb.width), top_left))
    if not pictures:
        raise TrainError(f"{folder}: none of its {len(files)} pictures could be read ({', '.join(skipped)})")
    if skipped:
        log.warning("train-lora: skipped %d unreadable pictures: %s", len(skipped), ", ".join(skipped))
    return pictures


def _caption_for(path: Path, caption: str | None) -> str:
    """The sidecar ``name.txt`` wins (one picture's own words), then the one ``--caption``."""
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            return " ".join(text.split())
    if caption is None:
        raise TrainError(f"{path}: has no caption: write {sidecar.name} beside it or give --caption")
    return caption


def _square(image: Any, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    from PIL import Image

    scale = size / min(image.width, image.height)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    resized = image.resize((width, height), Image.Resampling.LANCZOS)
    left, top = (width - size) // 2, (height - size) // 2
    square = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32)
    return torch.from_numpy(square).permute(2, 0, 1) / 127.5 - 1.0, (top, left)


# -- the model --------------------------------------------------------------------------------------
@dataclass
class Trainee:
    """The frozen base model and the training set in the form each step needs."""

    sampler: Any  # the text-to-image pipeline over the base's parts (samples); None in the benchmark
    unet: Any
    noise_scheduler: Any
    sdxl: bool
    scaling_factor: float  # the VAE's latent scale
    latent_mean: torch.Tensor  # N x 4 x h x w (CPU, float32)
    latent_std: torch.Tensor
    text: torch.Tensor  # N x 77 x D caption embeddings (on the device)
    pooled: torch.Tensor | None  # SDXL: N x 1280 pooled embeddings
    time_ids: torch.Tensor | None  # SDXL: N x 6 (original size, crop top-left, target size)


def load_base(config: TrainConfig, choice: DeviceChoice) -> Any:
    """The base pipeline on the device, frozen. Raises ModelNotFound or TrainError."""
    pipe = load_pipeline(ModelSpec(model=config.base), choice.dtype)
    missing = [p for p in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if getattr(pipe, p, None) is None]
    if missing or not hasattr(pipe.unet, "add_adapter"):
        raise TrainError(f"{config.base}: is not a Stable Diffusion model (it has no {', '.join(missing) or 'UNet'})")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval()
    pipe.to(choice.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def needs_gpu(unet: Any, choice: DeviceChoice) -> str | None:
    """One line when a real-size model is asked to train on a CPU, else None."""
    count = sum(p.numel() for p in unet.parameters())
    if choice.device.type != "cpu" or count < GPU_SIZED_UNET:
        return None
    return (
        f"a real model needs a GPU: this one's UNet has {count / 1e6:.0f} M parameters, and a step "
        "at 512x512 takes tens of seconds on a CPU (hours for 500 steps); the CPU trains tiny test models"
    )


def prepare(pipe: Any, pictures: list[Picture], config: TrainConfig, choice: DeviceChoice) -> Trainee:
    """Add the LoRA to the UNet; encode the pictures and captions once (frozen VAE and text encoders)."""
    from diffusers import AutoPipelineForText2Image, DDPMScheduler

    unet = pipe.unet
    add_lora(unet, config.rank, config.seed)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(pictures), 4):
            pixels = torch.stack([p.pixels for p in pictures[start : start + 4]])
            dist = pipe.vae.encode(pixels.to(choice.device, pipe.vae.dtype)).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
        captions = [p.caption for p in pictures]
        pooled = time_ids = None
        if sdxl:
            text, pooled = _sdxl_embeddings(pipe, captions, choice)
            time_ids = torch.tensor(
                [[*p.original_size, *p.crop_top_left, config.size, config.size] for p in pictures],
                device=choice.device,
                dtype=choice.dtype,
            )
        else:
            text = torch.cat([_sd_embeddings(pipe, captions[i : i + 16], choice) for i in range(0, len(captions), 16)])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    sampler = AutoPipelineForText2Image.from_pipe(pipe)  # a base saved as img2img samples from text too
    sampler.set_progress_bar_config(disable=True)
    scale = float(pipe.vae.config.scaling_factor)
    mean, std = torch.cat(means), torch.cat(stds)
    return Trainee(sampler, unet, scheduler, sdxl, scale, mean, std, text, pooled, time_ids)


def add_lora(unet: Any, rank: int, seed: int) -> None:
    """diffusers' LoRA: peft on the attention projections, alpha = rank, Gaussian A and zero B
    (the LoRA starts as the base model), trained in float32 whatever the base's precision."""
    from peft import LoraConfig

    torch.manual_seed(seed)  # peft draws A from torch's global generator
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(ATTENTION_TARGETS))
    )
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def _tokens(tokenizer: Any, captions: list[str], device: torch.device) -> torch.Tensor:
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return cast(torch.Tensor, ids).to(device)


def _sd_embeddings(pipe: Any, captions: list[str], choice: DeviceChoice) -> torch.Tensor:
    return cast(torch.Tensor, pipe.text_encoder(_tokens(pipe.tokenizer, captions, choice.device))[0])


def _sdxl_embeddings(pipe: Any, captions: list[str], choice: DeviceChoice) -> tuple[torch.Tensor, torch.Tensor]:
    """Both encoders' penultimate hidden states side by side, and the second one's pooled output
    (diffusers' SDXL ``encode_prompt``)."""
    hidden, pooled = [], torch.empty(0)
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        out = encoder(_tokens(tokenizer, captions, choice.device), output_hidden_states=True)
        pooled = out[0]
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled.reshape(len(captions), -1)


# -- one step -----------------------------------------------------------------------------------
def denoising_loss(
    trainee: Trainee, index: torch.Tensor, generator: torch.Generator, choice: DeviceChoice
) -> torch.Tensor:
    """The diffusion loss on the pictures ``index``: latents sampled from their distributions,
    noised to random timesteps, the UNet's prediction against noise / velocity / latents."""
    scheduler = trainee.noise_scheduler
    mean, std = trainee.latent_mean[index], trainee.latent_std[index]
    latents = (mean + std * torch.randn(mean.shape, generator=generator)) * trainee.scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
    latents, noise, timesteps = latents.to(choice.device), noise.to(choice.device), timesteps.to(choice.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    elif kind == "sample":
        target = latents
    else:
        raise TrainError(f"the base model's scheduler predicts {kind!r}, which this trainer does not know")
    on_device = index.to(trainee.text.device)
    added = None
    if trainee.sdxl:
        assert trainee.pooled is not None and trainee.time_ids is not None
        added = {"text_embeds": trainee.pooled[on_device], "time_ids": trainee.time_ids[on_device]}
    with _autocast(choice):
        pred = trainee.unet(
            noisy.to(trainee.text.dtype),
            timesteps,
            encoder_hidden_states=trainee.text[on_device],
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
    return torch.nn.functional.mse_loss(pred.float(), target.float())


def _autocast(choice: DeviceChoice) -> contextlib.AbstractContextManager[Any]:
    if choice.device.type == "cuda" and choice.dtype != torch.float32:
        return torch.autocast("cuda", dtype=choice.dtype)
    return contextlib.nullcontext()


def lora_parameters(unet: Any) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


def make_optimizer(unet: Any, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(lora_parameters(unet), lr=lr, weight_decay=1e-2)


def train_step(
    trainee: Trainee, optimizer: torch.optim.Optimizer, generator: torch.Generator, batch: int, choice: DeviceChoice
) -> torch.Tensor:
    """One optimiser step on a random batch; the loss, still on the device (reading it syncs)."""
    index = torch.randint(0, len(trainee.text), (batch,), generator=generator)
    loss = denoising_loss(trainee, index, generator, choice)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
    optimizer.step()
    return loss.detach()


# -- files --------------------------------------------------------------------------------------------
def peft_state(unet: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def save_lora_file(unet: Any, out: Path, *, sdxl: bool) -> None:
    """diffusers' layout through ``save_lora_weights``, into a temporary folder beside ``out`` that
    is renamed over it: the file appears whole or not at all."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers

    layers = convert_state_dict_to_diffusers(peft_state(unet))
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        saver = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
        saver.save_lora_weights(folder, unet_lora_layers=layers, weight_name=out.name, safe_serialization=True)
        with open(folder / out.name, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(folder / out.name, 0o644)
        os.replace(folder / out.name, out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    fsync_directory(out.parent)


def save_kohya_file(unet: Any, path: Path) -> None:
    """kohya's layout (``lora_unet_..._to_q.lora_down.weight``, ``.lora_up.weight``, ``.alpha``),
    as ``engine.diffusion.lora.save_lora`` writes it, atomically."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save

    tensors = {f"lora_unet_{k}": v.contiguous() for k, v in convert_state_dict_to_kohya(peft_state(unet)).items()}
    write_atomic(path, save(tensors, metadata={"format": "pt"}))


def save_checkpoint(
    path: Path,
    step: int,
    trainee: Trainee,
    optimizer: Any,
    generator: torch.Generator,
    losses: list[float],
    config: TrainConfig,
) -> None:
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "lora": peft_state(trainee.unet),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "losses": losses,
        "config": _identity(config),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getvalue())


def _identity(config: TrainConfig) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it."""
    return {"base": config.base, "rank": config.rank, "size": config.size, "batch": config.batch}


def load_checkpoint(path: Path, config: TrainConfig) -> dict[str, Any]:
    if not path.is_file():
        raise TrainError(f"--resume: there is no checkpoint {path} (it is written every --checkpoint-every steps)")
    try:
        state = cast(dict[str, Any], torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:  # a foreign or damaged file: torch raises many kinds
        raise TrainError(f"{path}: is not a train-lora checkpoint ({type(exc).__name__})") from exc
    if state.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path}: is not a train-lora checkpoint of this version")
    theirs, ours = state["config"], _identity(config)
    differ = [f"{k} {theirs.get(k)!r} (now {ours[k]!r})" for k in ours if theirs.get(k) != ours[k]]
    if differ:
        raise TrainError(f"{path}: was trained with other settings: {', '.join(differ)}")
    return state


def write_sample(trainee: Trainee, config: TrainConfig, caption: str, step: int, choice: DeviceChoice) -> Path:
    """One picture from the caption with the LoRA as it is now, fixed seed (the same noise every
    time, so the samples side by side show what training changed)."""
    pipe, unet = trainee.sampler, trainee.unet
    steps = config.sample_steps or (4 if _few_step(config.base) else 25)
    guidance = 0.0 if _few_step(config.base) else 7.5
    unet.eval()
    try:
        with torch.no_grad(), _autocast(choice):
            image = pipe(
                caption,
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=config.size,
                width=config.size,
                generator=torch.Generator("cpu").manual_seed(config.seed),
            ).images[0]
    finally:
        unet.train()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path = sample_path(config.out, step)
    write_atomic(path, buffer.getvalue())
    return path


def _few_step(base: str) -> bool:
    return any(word in base.lower() for word in ("turbo", "lcm", "lightning", "hyper"))


# -- the loop ------------------------------------------------------------------------------------------
def train(
    config: TrainConfig,
    choice: DeviceChoice,
    *,
    progress: bool = True,
    check: Callable[[Any], str | None] | None = None,
) -> TrainReport:
    """Train, checkpoint, sample, save. Raises TrainError / ModelNotFound for input that cannot
    train, OSError for a file that cannot be written (the previous file stays whole).
    ``check(unet)``: a reason not to train this model here (the CLI's "needs a GPU"), or None."""
    resumed = load_checkpoint(checkpoint_path(config.out), config) if config.resume else None  # before the slow parts
    pictures = read_pictures(config.images, config.size, config.caption)
    pipe = load_base(config, choice)
    reason = check(pipe.unet) if check is not None else None
    if reason:
        raise TrainError(reason)
    if config.kohya and getattr(pipe, "text_encoder_2", None) is not None:
        # kohya names SDXL's layers after the original checkpoint's (input_blocks_...), not diffusers'
        raise TrainError("--kohya: SD 1.5 / 2.1 bases only; diffusers and ComfyUI read the SDXL file as it is")
    trainee = prepare(pipe, pictures, config, choice)
    return run_loop(trainee, config, choice, pictures[0].caption, resumed, progress=progress)


def run_loop(
    trainee: Trainee,
    config: TrainConfig,
    choice: DeviceChoice,
    sample_caption: str,
    resumed: dict[str, Any] | None = None,
    *,
    progress: bool = True,
) -> TrainReport:
    from tqdm.auto import tqdm

    optimizer = make_optimizer(trainee.unet, config.lr)
    generator = torch.Generator("cpu").manual_seed(config.seed)
    start, history, losses = 0, list[float](), list[float]()  # history: the losses of the runs before a resume
    checkpoint = checkpoint_path(config.out)
    if config.resume:
        state = resumed or load_checkpoint(checkpoint, config)
        _restore(trainee.unet, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start, history = int(state["step"]), list(state["losses"])
        log.info("train-lora: resumed from %s at step %d", checkpoint, start)
        if start >= config.steps:
            log.info("train-lora: the checkpoint is at step %d already; --steps %d asks no more", start, config.steps)
    report = TrainReport(start, start, losses, 0.0, config.out, checkpoint)
    trainee.unet.train()
    started = time.perf_counter()
    bar = tqdm(total=config.steps, initial=start, desc="train-lora", unit="step", disable=not progress, mininterval=1.0)
    with bar:
        for step in range(start + 1, config.steps + 1):
            value = float(train_step(trainee, optimizer, generator, config.batch, choice))
            if not math.isfinite(value):
                raise TrainError(f"step {step}: the loss is {value}; try a smaller --lr (now {config.lr:g})")
            losses.append(value)
            report.steps = step
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}", refresh=False)
            last = step == config.steps
            if (config.checkpoint_every and step % config.checkpoint_every == 0) or last:
                save_checkpoint(checkpoint, step, trainee, optimizer, generator, history + losses, config)
            if config.sample_every and (step % config.sample_every == 0 or last):
                report.samples.append(write_sample(trainee, config, sample_caption, step, choice))
    report.seconds = time.perf_counter() - started
    save_lora_file(trainee.unet, config.out, sdxl=trainee.sdxl)
    if config.kohya:
        report.kohya = config.out.with_name(config.out.stem + ".kohya.safetensors")
        save_kohya_file(trainee.unet, report.kohya)
    return report


def _restore(unet: Any, lora: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, lora)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise TrainError(f"the checkpoint's LoRA does not fit this model ({unexpected[0]} ...)")
