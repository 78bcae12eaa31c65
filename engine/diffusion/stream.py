"""StreamImg2Img: a host frame in, a diffused host image out, one UNet call per frame.

StreamDiffusion's ideas in one small class:

- prompt embeddings are computed once per prompt change, off the frame path (``PromptBank``);
- the frame goes to the device once, through a pinned host buffer and a non-blocking copy,
  and the image comes back the same way; everything between stays on the device;
- the noise is fixed per seed, so a still camera gives a still image (``noise_drift`` lets
  it wander); ``strength`` only changes a few coefficients;
- multi-step models run as a stream batch: ``k`` stages in one UNet call, each frame
  entering at stage 0 and leaving ``k - 1`` calls later, so every call finishes one frame;
- a similarity filter skips frames that show nothing new, without sleeping;
- the stages run eager at once, while a compiled or TensorRT build of them is made in the
  background; the switch is one reference assignment between two frames;
- LoRA slots (``lora.py``) swap files in and write weights between two frames; when a
  slot's adapter layers are new, the compiled stages are rebuilt in the background. (While a cold
  torch.compile traces, torch.fx patches every module's ``__call__`` process-wide: frames
  that meet it are dropped and counted, never failed.)

Threading: ``__call__`` and the setters run on one thread (the scene worker).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from engine.diffusion.accel import Accelerator, EagerAccelerator, StageExample, Stages, eager_stages
from engine.diffusion.device import DeviceChoice
from engine.diffusion.hotpath import DiffusersUNet, HotPath
from engine.diffusion.loading import DiffusionModel
from engine.diffusion.lora import AdapterBank
from engine.diffusion.prompts import PromptBank
from engine.diffusion.schedule import StageCoefficients, build_schedule, guidance_embedding
from engine.diffusion.similarity import SimilarityFilter
from engine.diffusion.timing import StageTimer

log = logging.getLogger(__name__)

_MODULE_CALL = torch.nn.Module.__call__


def fx_is_tracing() -> bool:
    """True while torch.fx (a cold torch.compile) has replaced ``nn.Module.__call__`` process-wide."""
    return torch.nn.Module.__call__ is not _MODULE_CALL


@dataclass(frozen=True)
class StreamConfig:
    """Fixed for a stream's life (a change builds a new stream; the model stays loaded)."""

    size: tuple[int, int] | None = None  # (height, width); None: the model's native size
    steps: int = 1  # stream batch: 1 for SD-turbo, 2-4 for LCM


@dataclass
class LiveSettings:
    """Changeable between any two frames."""

    strength: float = 0.5
    seed: int = 0
    noise_drift: float = 0.0  # 0: the same noise every frame; 1: fresh noise every frame
    guidance_scale: float = 8.5  # only for UNets with a guidance embedding (LCM_Dreamshaper)
    similarity_threshold: float = 0.98  # 0: off


def vae_scale_factor(vae: torch.nn.Module) -> int:
    channels = getattr(vae.config, "block_out_channels", None) or vae.config.encoder_block_out_channels
    return 2 ** (len(channels) - 1)


def fixed_noise(seed: int, steps: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """One noise image per stage: the first ``steps`` draws of a CPU generator seeded ``seed``.

    The same draws, in the same order, as diffusers' pipelines make from
    ``generator=torch.Generator().manual_seed(seed)``, on any device.
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.cat([torch.randn((1, *shape), generator=generator) for _ in range(steps)])


class StreamImg2Img:
    """``stream(frame)`` -> image or None. Build one per (model, size, steps); change the rest live."""

    def __init__(self, model: DiffusionModel, choice: DeviceChoice, config: StreamConfig = StreamConfig(),
                 settings: LiveSettings | None = None, prompts: Sequence[tuple[str, float]] = (("", 1.0),),
                 accelerator: Accelerator | None = None, bank: PromptBank | None = None,
                 adapters: AdapterBank | None = None) -> None:
        """``bank``: a PromptBank of the same model to share (a rebuilt stream keeps its embeddings).
        ``adapters``: the LoRA slots on this model's UNet (applied between frames)."""
        self.started = time.monotonic()  # the weights are loaded by now: the first image is timed from here
        self.first_image_s: float | None = None  # seconds from ``started`` to the first image out
        self.model = model
        self.choice = choice
        self.where = choice.describe()  # "NVIDIA H200 (float16)": asked of the driver once, not per frame
        self.config = config
        self.settings = settings or LiveSettings()
        unet_config = model.unet.config
        scale = vae_scale_factor(model.vae)
        height, width = config.size or (unet_config.sample_size * scale,) * 2
        multiple = scale * 2 ** (len(unet_config.block_out_channels) - 1)  # the UNet halves the latents per level
        if height % multiple or width % multiple or min(height, width) < 2 * multiple:  # a fader gives any number
            asked = (height, width)  # at least 2x2 at the UNet's deepest level (its norms need more than 1x1)
            height, width = (max(2 * multiple, round(side / multiple) * multiple) for side in asked)
            log.info("size %dx%d rounded to %dx%d, a multiple of %d for this model", asked[1], asked[0], width, height,
                     multiple)
        self.size = (height, width)
        self.latent_shape = (unet_config.in_channels, height // scale, width // scale)
        self.hot = HotPath(DiffusersUNet(model.unet), model.vae, prediction_type=model.scheduler.config.prediction_type,
                           size=self.size, dtype=choice.dtype)
        self.prompts = bank or PromptBank(model.tokenizer, model.text_encoder, choice)
        self.adapters = adapters
        self.filter = SimilarityFilter(self.settings.similarity_threshold)
        self.timer = StageTimer(choice.device)
        self.frames_in = 0  # frames that went through the UNet
        self.frames_out = 0
        self.accel_error: str | None = None
        self.adapter_error: str | None = None  # a LoRA file that could not play (the previous one plays on)
        self.accel_ready_s: float | None = None
        self._stages: Stages = eager_stages(self.hot)
        self._cuda_stream = torch.cuda.Stream(choice.device) if choice.is_cuda else None
        self._host_in: torch.Tensor | None = None
        self._device_in: torch.Tensor | None = None
        self._host_out: torch.Tensor | None = None
        self._done = torch.cuda.Event() if choice.is_cuda else None
        self._uploaded = torch.cuda.Event() if choice.is_cuda else None  # the pinned input was read
        with self._on_frame_stream():  # (see set_strength)
            self._buffer = torch.zeros((config.steps - 1, *self.latent_shape), device=choice.device,
                                       dtype=choice.dtype)
        self._drift_generator = torch.Generator(choice.device)
        self._changed = True
        self._seen_prompts = 0
        self._flush_left = 0
        with self._on_frame_stream():
            self._coefficients = self._build_coefficients(self.settings.strength)
            self._timestep_cond = self._build_timestep_cond(self.settings.guidance_scale)
            self._noise = self._build_noise(self.settings.seed)
            self.prompts.request(prompts)
        self.frames_dropped = 0  # frames that met torch.fx tracing during a background build
        self._accel_thread: threading.Thread | None = None
        self._accel_started: float | None = None  # when the background build in progress began
        self.builds_started = 0  # background builds begun (a LoRA adapter's new layers start another)
        accelerator = accelerator or EagerAccelerator()
        self.accel_requested = accelerator.name
        self._accel_choice = accelerator
        self._layers_version = 0  # bumped when LoRA layers are added: a build of an older version is stale
        self._building = False  # a background build is under way (it ends by switching, or asking again)
        self._accel_lock = threading.Lock()  # a build's switch and a LoRA rebuild never interleave
        # built from the first frame's shape (a camera's size is known only then)
        self._accelerator: Accelerator | None = accelerator if accelerator.name != "eager" else None

    # -- live settings (worker thread) -------------------------------------------------------
    def set_prompts(self, prompts: Sequence[tuple[str, float]]) -> None:
        """Weighted prompts, blended by slerp; encoded in the background if new."""
        with self._on_frame_stream():  # a blend of cached prompts is computed here (see set_strength)
            self.prompts.request(prompts)

    def set_strength(self, strength: float) -> None:
        """Raises ValueError (and keeps the old strength) when the schedule cannot be built.

        Like every setter, it makes its tensors on the frame's CUDA stream: frames read them in
        stream order, with no synchronisation (the worker's default stream is not ordered with it).
        """
        if strength != self.settings.strength:
            with self._on_frame_stream():
                self._coefficients = self._build_coefficients(strength)
            self.settings.strength = strength
            self._changed = True

    def set_seed(self, seed: int) -> None:
        if seed != self.settings.seed:
            with self._on_frame_stream():
                self._noise = self._build_noise(seed)
            self.settings.seed = seed
            self._changed = True

    def set_noise_drift(self, drift: float) -> None:
        self.settings.noise_drift = min(1.0, max(0.0, drift))

    def set_guidance_scale(self, scale: float) -> None:
        if scale != self.settings.guidance_scale:
            with self._on_frame_stream():
                self._timestep_cond = self._build_timestep_cond(scale)
            self.settings.guidance_scale = scale
            self._changed = True

    def set_similarity_threshold(self, threshold: float) -> None:
        self.settings.similarity_threshold = self.filter.threshold = threshold

    @property
    def accel(self) -> str:
        """The backend the frames run on now (eager until a background build is ready)."""
        return self._stages.name

    @property
    def accel_state(self) -> str:
        """For the HUD: "compile", "eager, compile building 12 s" or "eager, compile failed"."""
        now, wanted = self.accel, self.accel_requested
        if now == wanted:
            return now
        if self.accel_error is not None:
            return f"{now}, {wanted} failed"
        if self._accel_started is not None:
            return f"{now}, {wanted} building {time.monotonic() - self._accel_started:.0f} s"
        return f"{now}, {wanted} from the first frame"

    def wait_for_accel(self, timeout: float | None = None) -> bool:
        """Block until the background build finished (benchmarks, tests); True if it is in use.

        The build starts with the first frame; before that this returns False at once.
        """
        if self._accel_thread is not None:
            self._accel_thread.join(timeout)
        return self.accel == self.accel_requested

    # -- the frame (worker thread) -------------------------------------------------------------
    def __call__(self, frame: np.ndarray) -> np.ndarray | None:
        """RGB uint8 (H, W, 3) -> RGB uint8 (h, w, 3), or None (nothing new, or the batch still filling)."""
        # 0. LoRA slots: files swapped in, weights written, between two frames
        if self.adapters is not None:
            self._apply_adapters()
        # 1. similarity filter: a frame that shows nothing new costs nothing
        if self.prompts.version == 0 or self._skip(frame):  # (version 0: the first prompt is still encoding)
            return None
        if self._accelerator is not None:
            self._start_accelerated_build(frame.shape)
        building = self._building
        if building and fx_is_tracing():
            self.frames_dropped += 1  # modules cannot run while torch.fx traces (see CompileAccelerator)
            return None
        try:
            return self._run(frame)
        except Exception:
            if building and fx_is_tracing():
                self.timer.discard()
                self.frames_dropped += 1
                return None
            raise

    def _run(self, frame: np.ndarray) -> np.ndarray | None:
        stages = self._stages  # read once: a backend switch lands between frames, never inside one
        text = self.prompts.current
        c = self._coefficients
        if self.settings.noise_drift > 0:
            self._drift_noise(self.settings.noise_drift)
        with torch.inference_mode(), self._on_frame_stream():
            if stages.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            # 2. upload: once, from a pinned buffer, without blocking the host
            with self.timer.stage("upload"):
                pixels = self._upload(frame)
            # 3. encode: VAE, then noise to the first stage
            with self.timer.stage("encode"):
                first = stages.encode(pixels, self._noise[:1], c.sqrt_alpha[:1], c.sqrt_one_minus_alpha[:1])
            # 4. denoise: every stage in one UNet call
            with self.timer.stage("unet"):
                finished, handed_on = stages.denoise(first, self._buffer, text, self._noise, c, self._timestep_cond)
                self._buffer.copy_(handed_on)  # a copy: compiled graphs reuse their output memory
            self.frames_in += 1
            if self.frames_in < self.config.steps:  # the stream batch is still filling
                self.timer.discard()
                return None
            # 5. decode, to uint8 on the device (a quarter of the bytes to download)
            with self.timer.stage("decode"):
                image = stages.decode(finished).mul(255).round_().to(torch.uint8)
            # 6. download: the one synchronisation of the frame
            with self.timer.stage("download"):
                result = self._download(image)
        self.timer.finish()
        self.frames_out += 1
        if self.first_image_s is None:
            self.first_image_s = time.monotonic() - self.started
        return result

    def rebuild_accelerated(self) -> None:
        """The UNet's layers changed (a LoRA adapter was added): compiled graphs no longer fit it.

        Frames go back to eager at once, and the backend is built again in the background
        (starting with the next frame, or when a build in progress ends, since it is stale).
        """
        if self.accel_requested == "eager":
            return
        with self._accel_lock:
            self._layers_version += 1
            self._stages = eager_stages(self.hot)
            if not self._building:  # (a build under way sees the new version when it ends, and asks again)
                self._accelerator = self._accel_choice

    def close(self) -> None:
        """Stop the prompt encoder thread (not when the bank is shared with a newer stream)."""
        self.prompts.close()

    # -- internals -------------------------------------------------------------------------------
    def _skip(self, frame: np.ndarray) -> bool:
        similar = self.filter.similar(frame)
        version = self.prompts.version
        if self._changed or version != self._seen_prompts or self.settings.noise_drift > 0 or not similar:
            self._changed, self._seen_prompts = False, version
            self._flush_left = self.config.steps - 1  # frames still inside the stream batch must come out
            return False
        if self._flush_left > 0:
            self._flush_left -= 1
            return False
        return True

    def _apply_adapters(self) -> None:
        # on the frame's CUDA stream: the next frame reads the weights after these writes
        with self._on_frame_stream():
            change = self.adapters.apply()
        if change.restructured:
            self.rebuild_accelerated()
        if change.changed:
            self._changed = True
        if change.error is not None:
            self.adapter_error = change.error
            log.warning("%s", change.error)
        elif change.files:  # a later file played: the old complaint is over
            self.adapter_error = None

    def _on_frame_stream(self):
        return torch.cuda.stream(self._cuda_stream) if self._cuda_stream is not None else nullcontext()

    def _upload(self, frame: np.ndarray) -> torch.Tensor:
        if not self.choice.is_cuda:
            return torch.from_numpy(np.ascontiguousarray(frame)).to(self.choice.device)
        if self._host_in is None or tuple(self._host_in.shape) != frame.shape:
            self._host_in = torch.empty(frame.shape, dtype=torch.uint8, pin_memory=True)
            self._device_in = torch.empty(frame.shape, dtype=torch.uint8, device=self.choice.device)
        # the previous copy out of the pinned buffer must be done before it is overwritten: a frame
        # that returned no image (the stream batch filling) never synchronised
        self._uploaded.synchronize()
        np.copyto(self._host_in.numpy(), frame)
        self._device_in.copy_(self._host_in, non_blocking=True)
        self._uploaded.record()
        return self._device_in

    def _download(self, image: torch.Tensor) -> np.ndarray:
        if not self.choice.is_cuda:
            return image.cpu().numpy()
        if self._host_out is None or self._host_out.shape != image.shape:
            self._host_out = torch.empty(image.shape, dtype=torch.uint8, pin_memory=True)
        self._host_out.copy_(image, non_blocking=True)
        self._done.record()
        self._done.synchronize()
        return self._host_out.numpy().copy()  # the pinned buffer is reused by the next frame

    def _build_coefficients(self, strength: float) -> StageCoefficients:
        schedule = build_schedule(self.model.scheduler, self.config.steps, strength)
        log.debug("stream schedule: %s timesteps %s", schedule.kind, schedule.timesteps)
        return schedule.tensors(self.choice.device, self.choice.dtype)

    def _build_timestep_cond(self, guidance_scale: float) -> torch.Tensor | None:
        dim = self.model.unet.config.time_cond_proj_dim
        if dim is None:
            return None
        return guidance_embedding(guidance_scale - 1.0, dim, self.config.steps).to(self.choice.device, self.choice.dtype)

    def _build_noise(self, seed: int) -> torch.Tensor:
        self._drift_generator.manual_seed(seed + 1)
        return fixed_noise(seed, self.config.steps, self.latent_shape).to(self.choice.device, self.choice.dtype)

    def _drift_noise(self, drift: float) -> None:
        """Rotate the noise towards fresh noise by ``drift`` of a quarter turn (unit variance kept)."""
        angle = drift * math.pi / 2
        with self._on_frame_stream():
            fresh = torch.randn(self._noise.shape, generator=self._drift_generator, device=self.choice.device,
                                dtype=self._noise.dtype)
            self._noise = math.cos(angle) * self._noise + math.sin(angle) * fresh

    def _start_accelerated_build(self, frame_shape: tuple[int, ...]) -> None:
        accelerator, self._accelerator = self._accelerator, None
        example = self._example(frame_shape)
        self._accel_started = time.monotonic()
        self.builds_started += 1
        with self._accel_lock:
            self._building = True
            version = self._layers_version  # the layers this build is for
        self._accel_thread = threading.Thread(target=self._build_accelerated, args=(accelerator, example, version),
                                              name=f"{accelerator.name} build", daemon=True)
        self._accel_thread.start()

    def _example(self, frame_shape: tuple[int, ...]) -> StageExample:
        """Inputs of the frames' shapes for a background build to trace and warm up with."""
        pixels = torch.zeros(frame_shape, dtype=torch.uint8, device=self.choice.device)
        c = self._coefficients
        first = torch.zeros((1, *self.latent_shape), device=self.choice.device, dtype=self.choice.dtype)
        return StageExample(
            encode=(pixels, self._noise[:1], c.sqrt_alpha[:1], c.sqrt_one_minus_alpha[:1]),
            denoise=(first, self._buffer.clone(), self.prompts.current, self._noise, c, self._timestep_cond),
            decode=(first,))

    def _build_accelerated(self, accelerator: Accelerator, example: StageExample, version: int) -> None:
        """Background thread: build and warm up, then switch with one assignment (under the lock,
        so a LoRA rebuild lands either before the switch, making this build stale, or after it)."""
        started = time.monotonic()
        error: str | None = None
        try:
            stages = accelerator.build(self.hot, example)
        except Exception as exc:  # named fallback policy: the show stays on eager, the error is reported
            stages, error = None, f"{accelerator.name} failed, staying on eager: {type(exc).__name__}: {exc}"
            log.exception("accelerator %s failed", accelerator.name)
        with self._accel_lock:
            self._building = False
            if version != self._layers_version:  # the layers changed under the build: again, from the next frame
                self._accelerator = accelerator
                return
            if stages is None:
                self.accel_error = error
                return
            self.accel_ready_s = time.monotonic() - started
            self._stages = stages
        log.info("frames now run on %s (built in %.1f s)", stages.name, self.accel_ready_s)

