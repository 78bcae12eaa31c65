"""StreamImg2Img: a host frame in, a diffused host image out, one UNet call per frame.

StreamDiffusion's ideas in one small class:

- prompt embeddings are computed once per prompt change, off the frame path (``PromptBank``);
- the frame is fitted to the model's size on the host, into one pinned buffer, and goes to
  the device with one non-blocking copy; the image comes back the same way, and waiting for
  it is the frame's only host synchronisation; everything between stays on the device;
- every tensor a frame reads is fixed for the stream's life (``FrameInputs``): a prompt, a
  strength, a seed or a guidance change writes into it, so a compiled graph sees one shape
  per stream, whatever the camera's size, and never compiles again on the frame path;
- the noise is fixed per seed, so a still camera gives a still image (``noise_drift`` lets
  it wander); ``strength`` only changes a few coefficients;
- multi-step models run as a stream batch: ``k`` stages in one UNet call, each frame
  entering at stage 0 and leaving ``k - 1`` calls later, so every call finishes one frame;
- a similarity filter skips frames that show nothing new, without sleeping;
- the frame runs eager at once, while a compiled or TensorRT build of it is made in the
  background; the switch is one reference assignment between two frames. A compiled frame
  that would need a recompile falls back to eager instead, and ``accel_state`` says so;
- LoRA slots (``lora.py``) swap files in and write weights between two frames; when a
  slot's adapter layers are new, the compiled frame is rebuilt in the background. (While a cold
  torch.compile traces, torch.fx patches every module's ``__call__`` process-wide: frames
  that meet it are dropped and counted, never failed.)

Threading: ``__call__`` and the setters run on one thread (the scene worker).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch

from engine.diffusion.accel import (
    Accelerator,
    Backend,
    EagerAccelerator,
    RecompileRefused,
    compile_counts,
    eager_backend,
)
from engine.diffusion.controlnet import ControlUnit, stage_scales
from engine.diffusion.device import DeviceChoice
from engine.diffusion.hotpath import ControlInputs, DiffusersUNet, FrameInputs, HotPath
from engine.diffusion.ip_adapter import StyleBank
from engine.diffusion.loading import DiffusionModel
from engine.diffusion.lora import AdapterBank
from engine.diffusion.prompts import PromptBank, XLPromptBank
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
    config: Any = vae.config  # a diffusers FrozenDict; torch types a Module attribute as Tensor | Module
    channels = getattr(config, "block_out_channels", None) or config.encoder_block_out_channels
    return int(2 ** (len(channels) - 1))


def fixed_noise(seed: int, steps: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """One noise image per stage: the first ``steps`` draws of a CPU generator seeded ``seed``.

    The same draws, in the same order, as diffusers' pipelines make from
    ``generator=torch.Generator().manual_seed(seed)``, on any device.
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.cat([torch.randn((1, *shape), generator=generator) for _ in range(steps)])


def fit_into(frame: np.ndarray, out: np.ndarray) -> None:
    """Centre-crop an RGB uint8 frame to ``out``'s aspect and resize it into ``out``: never stretched.

    Area averaging when shrinking (no aliasing), bilinear when growing. On the host, before
    the graph: a camera of any size, or the 640x360 fallback pattern, is one shape to it.
    """
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"a frame is RGB uint8 (H, W, 3), got {frame.dtype} {frame.shape}")
    h, w = frame.shape[:2]
    height, width = out.shape[:2]
    if (h, w) == (height, width):
        np.copyto(out, frame)
        return
    if h * width > w * height:  # too tall
        crop = round(w * height / width)
        frame = frame[(h - crop) // 2 : (h - crop) // 2 + crop]
    elif h * width < w * height:  # too wide
        crop = round(h * width / height)
        frame = frame[:, (w - crop) // 2 : (w - crop) // 2 + crop]
    shrinking = frame.shape[0] >= height and frame.shape[1] >= width
    cv2.resize(frame, (width, height), dst=out, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


@dataclass(frozen=True)
class FrameReport:
    """One frame checked (``StreamImg2Img.check_frame``), for the benchmark to print."""

    image: np.ndarray | None = field(repr=False)
    graphs: int  # dynamo graphs captured during the frame: 0 once compiled (no recompile)
    graph_breaks: int  # graph breaks dynamo met during the frame
    syncs_checked: bool  # CUDA only: run under torch.cuda.set_sync_debug_mode("error") up to the download
    sync_error: str | None  # the host synchronisation met before the download, if any


class StreamImg2Img:
    """``stream(frame)`` -> image or None. Build one per (model, size, steps); change the rest live."""

    def __init__(
        self,
        model: DiffusionModel,
        choice: DeviceChoice,
        config: StreamConfig = StreamConfig(),
        settings: LiveSettings | None = None,
        prompts: Sequence[tuple[str, float]] = (("", 1.0),),
        accelerator: Accelerator | None = None,
        bank: PromptBank | None = None,
        adapters: AdapterBank | None = None,
        timing: bool = False,
        controls: Sequence[ControlUnit] = (),
        style: StyleBank | None = None,
    ) -> None:
        """``bank``: a PromptBank of the same model to share (a rebuilt stream keeps its embeddings).
        ``adapters``: the LoRA slots on this model's UNet (applied between frames).
        ``controls``: the ControlNets playing (``set_controls`` changes them).
        ``style``: the IP-Adapter's image embeddings (the UNet holds the adapter); the frame waits
        for none: until the first is published the style input is zeros.
        ``timing``: time each stage (``timer``; the benchmark turns it on, a show runs without)."""
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
            log.info(
                "size %dx%d rounded to %dx%d, a multiple of %d for this model",
                asked[1],
                asked[0],
                width,
                height,
                multiple,
            )
        self.size = (height, width)
        self.latent_shape = (unet_config.in_channels, height // scale, width // scale)
        xl_time_ids = None
        if model.xl:  # SDXL-turbo's added time ids: original size, crop (0, 0), target size (no aesthetic score)
            with torch.inference_mode(False):
                xl_time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=choice.dtype).to(choice.device)
        self.hot = HotPath(
            DiffusersUNet(model.unet),
            model.vae,
            prediction_type=model.scheduler.config.prediction_type,
            size=self.size,
            dtype=choice.dtype,
            controlnets=[unit.controlnet for unit in controls],
            xl_time_ids=xl_time_ids,
            pooled_dim=int(model.text_encoder_2.config.projection_dim) if model.xl else 0,
        )
        self.controls = list(controls)
        self.control_error: str | None = None  # a control image that could not be made (that ControlNet rests)
        self.style = style
        self._style_version = 0
        if bank is None and model.xl:
            bank = XLPromptBank(model.tokenizer, model.text_encoder, model.tokenizer_2, model.text_encoder_2, choice)
        self.prompts = bank or PromptBank(model.tokenizer, model.text_encoder, choice)
        self.adapters = adapters
        self.filter = SimilarityFilter(self.settings.similarity_threshold)
        self.timer = StageTimer(choice.device, enabled=timing)
        self.frames_in = 0  # frames that went through the UNet
        self.frames_out = 0
        self.accel_error: str | None = None
        self.accel_fallback: str | None = None  # why a compiled frame went back to eager, if it did
        self.adapter_error: str | None = None  # a LoRA file that could not play (the previous one plays on)
        self.accel_ready_s: float | None = None
        self._backend: Backend = eager_backend(self.hot)
        self._cuda_stream = torch.cuda.Stream(choice.device) if choice.is_cuda else None
        self._done = torch.cuda.Event() if choice.is_cuda else None
        self._drift_generator = torch.Generator(choice.device)
        self._checking_syncs = False
        self._image: torch.Tensor | None = None  # the frame's image on the host, once its download is done
        # the frame's inputs: made once, outside inference mode whatever the caller's (a compiled
        # graph guards on that), on the frame's CUDA stream (see set_strength); live changes write into them
        with self._on_frame_stream(), torch.inference_mode(False):
            device_in = torch.empty((height, width, 3), dtype=torch.uint8, device=choice.device)
            self._inputs = FrameInputs(
                pixels=device_in,
                buffer=torch.zeros((config.steps - 1, *self.latent_shape), device=choice.device, dtype=choice.dtype),
                text=torch.empty(0),  # sized by the first embeddings (see _take_new_prompt)
                noise=self._build_noise(self.settings.seed),
                coefficients=self._build_coefficients(self.settings.strength),
                timestep_cond=self._build_timestep_cond(self.settings.guidance_scale),
                control=self._build_control(),
                style=self._build_style(),
            )
            self.prompts.request(prompts)
        # the host's side of the two copies: pinned (page-locked) on CUDA, so that they do not block
        self._host_out: torch.Tensor | None = None
        if choice.is_cuda:
            self._host_in = torch.empty((height, width, 3), dtype=torch.uint8, pin_memory=True)
            self._host_out = torch.empty((height, width, 3), dtype=torch.uint8, pin_memory=True)
        elif choice.device.type == "cpu":
            self._host_in = device_in  # the CPU's upload is the fit itself
        else:
            self._host_in = torch.empty((height, width, 3), dtype=torch.uint8)
        self._text_version = 0  # the prompt embeddings version now in the text input
        self._changed = True
        self._seen_prompts = 0
        self._flush_left = 0
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
        # built with the first frame (the prompt embeddings' size is known only then)
        self._accelerator: Accelerator | None = accelerator if accelerator.name != "eager" else None

    # -- live settings (worker thread) -------------------------------------------------------
    def set_prompts(self, prompts: Sequence[tuple[str, float]]) -> None:
        """Weighted prompts, blended by slerp; encoded in the background if new."""
        with self._on_frame_stream():  # a blend of cached prompts is computed here (see set_strength)
            self.prompts.request(prompts)

    def set_strength(self, strength: float) -> None:
        """Raises ValueError (and keeps the old strength) when the schedule cannot be built.

        Like every setter, it writes its tensors on the frame's CUDA stream: frames read them in
        stream order, with no synchronisation (the worker's default stream is not ordered with it).
        """
        if strength != self.settings.strength:
            with self._on_frame_stream():
                for fixed, new in zip(self._inputs.coefficients, self._build_coefficients(strength)):
                    fixed.copy_(new)
            self.settings.strength = strength
            self._changed = True

    def set_seed(self, seed: int) -> None:
        if seed != self.settings.seed:
            with self._on_frame_stream():
                self._inputs.noise.copy_(self._build_noise(seed))
            self.settings.seed = seed
            self._changed = True

    def set_noise_drift(self, drift: float) -> None:
        self.settings.noise_drift = min(1.0, max(0.0, drift))

    def set_guidance_scale(self, scale: float) -> None:
        if scale != self.settings.guidance_scale:
            if self._inputs.timestep_cond is not None:
                with self._on_frame_stream():
                    cond = self._build_timestep_cond(scale)
                    assert cond is not None  # the input exists: the UNet has a guidance embedding
                    self._inputs.timestep_cond.copy_(cond)
            self.settings.guidance_scale = scale
            self._changed = True

    def set_controls(self, controls: Sequence[ControlUnit]) -> None:
        """Other ControlNets (one added or removed): frames go eager at once with them, and the
        compiled frame is rebuilt in the background (its graph holds the ControlNets' calls)."""
        self.controls = list(controls)
        self.hot = self.hot.with_controlnets([unit.controlnet for unit in self.controls])
        with self._on_frame_stream(), torch.inference_mode(False):
            self._inputs = self._inputs._replace(control=self._build_control())
        with self._accel_lock:
            self._backend = eager_backend(self.hot)
        self.rebuild_accelerated()
        self.control_error = None
        self._changed = True

    def set_control_scale(self, slot: int, scale: float, start: float = 0.0, end: float = 1.0) -> None:
        """A ControlNet's scale and its [start, end] share of the steps: one tensor write, no recompile."""
        for i, unit in enumerate(self.controls):
            if unit.slot == slot and (unit.scale, unit.start, unit.end) != (scale, start, end):
                unit.scale, unit.start, unit.end = scale, start, end
                assert self._inputs.control is not None  # there are controls
                with self._on_frame_stream():
                    self._inputs.control.scales[i].copy_(self._control_scales(unit).to(self.choice.device))
                self._changed = True

    def set_similarity_threshold(self, threshold: float) -> None:
        self.settings.similarity_threshold = self.filter.threshold = threshold

    @property
    def inputs(self) -> FrameInputs:
        """The frame function's fixed inputs, as the last frame left them (tests, benchmarks)."""
        return self._inputs

    @property
    def accel(self) -> str:
        """The backend the frames run on now (eager until a background build is ready)."""
        return self._backend.name

    @property
    def accel_state(self) -> str:
        """For the HUD: "compile", "eager, compile building 12 s", "eager, compile failed" or
        "compile (fell back to eager: a frame needed a recompile)"."""
        now, wanted = self.accel, self.accel_requested
        if self.accel_fallback is not None:
            return f"{wanted} (fell back to eager: a frame needed a recompile)"
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
        """RGB uint8 (H, W, 3), any size -> RGB uint8 (h, w, 3) at the stream's size, or None
        (nothing new, the batch still filling, or a frame dropped while torch.fx traces)."""
        # 0-6. everything up to the download, without waiting for the device (check_frame proves it)
        with self._sync_check():
            if not self._launch(frame):
                return None
        # 7. wait for the download: the frame's one host synchronisation
        if self._done is not None:
            self._done.synchronize()
        self.timer.finish()
        assert self._image is not None  # set by a _launch that returned True
        result = self._image.numpy().copy()  # the buffer is reused by the next frame
        self.frames_in += 1
        if self.frames_in < self.config.steps:  # the stream batch is still filling
            return None
        self.frames_out += 1
        if self.first_image_s is None:
            self.first_image_s = time.monotonic() - self.started
        return result

    def _launch(self, frame: np.ndarray) -> bool:
        """Everything of a frame up to its download, without waiting for the device; False: no frame."""
        # 0. LoRA slots: files swapped in, weights written, between two frames
        if self.adapters is not None:
            self._apply_adapters()
        # 1. similarity filter: a frame that shows nothing new costs nothing
        if self.prompts.version == 0 or self._skip(frame):  # (version 0: the first prompt is still encoding)
            return False
        self._take_new_prompt()
        if self.style is not None:
            self._take_new_style()
        if self._accelerator is not None:
            self._start_accelerated_build()
        building = self._building
        if building and fx_is_tracing():
            self.frames_dropped += 1  # modules cannot run while torch.fx traces (see CompileAccelerator)
            return False
        try:
            self._run(frame)
        except Exception:
            self.timer.discard()
            if building and fx_is_tracing():
                self.frames_dropped += 1
                return False
            raise
        return True

    def _run(self, frame: np.ndarray) -> None:
        backend = self._backend  # read once: a backend switch lands between frames, never inside one
        inputs = self._inputs
        if self.settings.noise_drift > 0:
            self._drift_noise(self.settings.noise_drift)
        with torch.inference_mode(), self._on_frame_stream():
            # 2. upload: fitted to the model's size into the pinned buffer, then one non-blocking copy
            with self.timer.stage("upload"):
                fit_into(frame, self._host_in.numpy())
                if inputs.pixels is not self._host_in:
                    inputs.pixels.copy_(self._host_in, non_blocking=self.choice.is_cuda)
            # 2b. the ControlNets' control images, made on the device from the uploaded frame
            if inputs.control is not None:
                with self.timer.stage("control"):
                    self._write_control(inputs.pixels, inputs.control)
            # 3-5. the frame function: encode, every stage in one UNet call, decode to uint8
            with self.timer.stage("diffuse"):
                image, handed_on = self._diffuse(backend, inputs)
                if handed_on.shape[0]:
                    inputs.buffer.copy_(handed_on)  # a copy: a compiled graph reuses its output memory
            # 6. download: one non-blocking copy into pinned memory (waited for in __call__)
            with self.timer.stage("download"):
                if self._host_out is not None:
                    self._host_out.copy_(image, non_blocking=True)
                    self._image = self._host_out
                else:
                    self._image = image.cpu()
            if self._done is not None:
                self._done.record()

    def _diffuse(self, backend: Backend, inputs: FrameInputs) -> tuple[torch.Tensor, torch.Tensor]:
        if backend.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            return backend.frame(*inputs)
        except RecompileRefused as exc:  # the named fallback: eager for this stream's life, said in the HUD
            self._fall_back_to_eager(backend, str(exc))
            return self.hot.frame(*inputs)

    def check_frame(self, frame: np.ndarray) -> FrameReport:
        """Run one frame and report what a benchmark checks: dynamo graphs captured and graph breaks
        met during it, and on CUDA whether anything before its download synchronised the host
        (``torch.cuda.set_sync_debug_mode("error")`` around it). A sync found fails that frame only.

        The debug mode is process-wide: run it while nothing else in the process uses CUDA.
        """
        before = compile_counts()
        self._checking_syncs = self.choice.is_cuda
        image, sync_error = None, None
        try:
            image = self(frame)
        except RuntimeError as exc:
            if not self._checking_syncs or "synchronizing" not in str(exc):
                raise
            sync_error = str(exc).strip().splitlines()[0]
            self.timer.discard()
        finally:
            checked, self._checking_syncs = self._checking_syncs, False
        counts = compile_counts() - before
        return FrameReport(image, counts.graphs, counts.graph_breaks, checked, sync_error)

    def rebuild_accelerated(self) -> None:
        """The UNet's layers changed (a LoRA adapter was added): compiled graphs no longer fit it.

        Frames go back to eager at once, and the backend is built again in the background
        (starting with the next frame, or when a build in progress ends, since it is stale).
        """
        if self.accel_requested == "eager":
            return
        with self._accel_lock:
            self._layers_version += 1
            self._backend = eager_backend(self.hot)
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

    def _take_new_prompt(self) -> None:
        """Newly published prompt embeddings: copied into the text input (on the frame's stream)."""
        version = self.prompts.version  # read before the embeddings: a newer pair is taken next frame
        if version == self._text_version:
            return
        embeds = self.prompts.current
        with self._on_frame_stream():
            if self._inputs.text.shape != embeds.shape:  # the first embeddings: the input's size
                with torch.inference_mode(False):  # (as the other inputs are made)
                    text = torch.empty(embeds.shape, dtype=embeds.dtype, device=embeds.device)
                self._inputs = self._inputs._replace(text=text)
            with torch.inference_mode():
                self._inputs.text.copy_(embeds)
        self._text_version = version

    def _apply_adapters(self) -> None:
        # on the frame's CUDA stream: the next frame reads the weights after these writes
        assert self.adapters is not None  # only called when there are adapters
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

    def _on_frame_stream(self) -> AbstractContextManager[object]:
        return torch.cuda.stream(self._cuda_stream) if self._cuda_stream is not None else nullcontext()

    @contextmanager
    def _sync_check(self) -> Iterator[None]:
        if not self._checking_syncs:
            yield
            return
        before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(before)

    def _build_coefficients(self, strength: float) -> StageCoefficients:
        schedule = build_schedule(self.model.scheduler, self.config.steps, strength)
        log.debug("stream schedule: %s timesteps %s", schedule.kind, schedule.timesteps)
        return schedule.tensors(self.choice.device, self.choice.dtype)

    def _build_timestep_cond(self, guidance_scale: float) -> torch.Tensor | None:
        dim = self.model.unet.config.time_cond_proj_dim
        if dim is None:
            return None
        return guidance_embedding(guidance_scale - 1.0, dim, self.config.steps).to(
            self.choice.device, self.choice.dtype
        )

    def _control_scales(self, unit: ControlUnit) -> torch.Tensor:
        scales = stage_scales(unit.scale, unit.start, unit.end, self.config.steps)
        return torch.tensor(scales, dtype=self.choice.dtype).view(-1, 1, 1, 1)

    def _build_control(self) -> ControlInputs | None:
        if not self.controls:
            return None
        steps, (height, width) = self.config.steps, self.size
        images = torch.zeros((len(self.controls), steps, 3, height, width), dtype=self.choice.dtype)
        scales = torch.stack([self._control_scales(unit) for unit in self.controls])
        return ControlInputs(images.to(self.choice.device), scales.to(self.choice.device))

    def _write_control(self, pixels: torch.Tensor, control: ControlInputs) -> None:
        """The newest frame's control images into stage 0; older frames' move one stage on.

        A preprocessor that fails rests its ControlNet (scale 0, a tensor write) and says why
        once (``control_error``); the frame plays on without that condition.
        """
        images = control.images
        if images.shape[1] > 1:
            images[:, 1:].copy_(images[:, :-1].clone())
        for i, unit in enumerate(self.controls):
            try:
                images[i, 0].copy_(unit.preprocess(pixels))
            except Exception as exc:  # named fallback: that ControlNet rests, the show goes on
                if unit.scale != 0.0:
                    self.control_error = f"ControlNet {unit.slot}: its control image failed, resting: {exc}"
                    log.warning("%s", self.control_error)
                    unit.scale = 0.0
                    control.scales[i].zero_()

    def _build_style(self) -> torch.Tensor | None:
        if self.style is None:
            return None
        dim = int(self.model.unet.encoder_hid_proj.image_projection_layers[0].image_embeds.in_features)
        return torch.zeros((1, 1, dim), dtype=self.choice.dtype, device=self.choice.device)

    def _take_new_style(self) -> None:
        """A newly published style embedding: copied into the style input (no recompile)."""
        assert self.style is not None and self._inputs.style is not None
        version = self.style.version
        current = self.style.current
        if version == self._style_version or current is None:
            return
        with self._on_frame_stream(), torch.inference_mode():
            self._inputs.style.copy_(current)
        self._style_version = version
        self._changed = True

    def _build_noise(self, seed: int) -> torch.Tensor:
        self._drift_generator.manual_seed(seed + 1)
        return fixed_noise(seed, self.config.steps, self.latent_shape).to(self.choice.device, self.choice.dtype)

    def _drift_noise(self, drift: float) -> None:
        """Rotate the noise towards fresh noise by ``drift`` of a quarter turn (unit variance kept), in place."""
        angle = drift * math.pi / 2
        noise = self._inputs.noise
        with self._on_frame_stream():
            fresh = torch.randn(
                noise.shape, generator=self._drift_generator, device=self.choice.device, dtype=noise.dtype
            )
            noise.mul_(math.cos(angle)).add_(fresh, alpha=math.sin(angle))

    def _fall_back_to_eager(self, backend: Backend, reason: str) -> None:
        with self._accel_lock:
            if self._backend is backend:
                self._backend = eager_backend(self.hot)
        self.accel_fallback = reason
        self.accel_error = f"{backend.name} fell back to eager: {reason}"
        log.warning("%s", self.accel_error)

    def _start_accelerated_build(self) -> None:
        accelerator, self._accelerator = self._accelerator, None
        assert accelerator is not None  # only called when one is waiting to be built
        with self._on_frame_stream(), torch.inference_mode(False):  # copies made as the inputs were
            example = self._example()
        self._accel_started = time.monotonic()
        self.builds_started += 1
        with self._accel_lock:
            self._building = True
            version = self._layers_version  # the layers this build is for
        self._accel_thread = threading.Thread(
            target=self._build_accelerated,
            args=(accelerator, example, version),
            name=f"{accelerator.name} build",
            daemon=True,
        )
        self._accel_thread.start()

    def _example(self) -> FrameInputs:
        """The frame's inputs for a background build to trace and warm up with: copies of them
        (the frames keep writing theirs), made as they were (outside inference mode)."""
        inputs = self._inputs
        return FrameInputs(
            inputs.pixels.clone(),
            inputs.buffer.clone(),
            inputs.text.clone(),
            inputs.noise.clone(),
            StageCoefficients(*(t.clone() for t in inputs.coefficients)),
            None if inputs.timestep_cond is None else inputs.timestep_cond.clone(),
            None if inputs.control is None else ControlInputs(*(t.clone() for t in inputs.control)),
            None if inputs.style is None else inputs.style.clone(),
        )

    def _build_accelerated(self, accelerator: Accelerator, example: FrameInputs, version: int) -> None:
        """Background thread: build and warm up, then switch with one assignment (under the lock,
        so a LoRA rebuild lands either before the switch, making this build stale, or after it)."""
        started = time.monotonic()
        error: str | None = None
        if self._cuda_stream is not None:  # the example was copied on the frame's stream
            torch.cuda.current_stream(self.choice.device).wait_stream(self._cuda_stream)
        try:
            backend = accelerator.build(self.hot, example)
        except Exception as exc:  # named fallback policy: the show stays on eager, the error is reported
            backend, error = None, f"{accelerator.name} failed, staying on eager: {type(exc).__name__}: {exc}"
            log.exception("accelerator %s failed", accelerator.name)
        with self._accel_lock:
            self._building = False
            if version != self._layers_version:  # the layers changed under the build: again, from the next frame
                self._accelerator = accelerator
                return
            if backend is None:
                self.accel_error = error
                return
            self.accel_ready_s = time.monotonic() - started
            self._backend = backend
        log.info("frames now run on %s (built in %.1f s)", backend.name, self.accel_ready_s)
