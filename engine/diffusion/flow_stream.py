"""FlowStream: a host frame in, a flow-matching img2img image out, one transformer call per frame.

The flow models' ``StreamImg2Img`` (``stream.py``), with the same promises:

- prompt embeddings encoded once per prompt change, off the frame path (``FlowPromptBank``),
  and copied into fixed tensors; the big text encoders can wait on the CPU meanwhile;
- every tensor a frame reads is fixed for the stream's life (``FlowInputs``): a prompt, a
  strength (within a step count), a seed or a guidance change writes into it, so a compiled
  frame never compiles again;
- the noise is fixed per seed (the first ``steps`` draws of a CPU generator, as the pipelines
  draw theirs), so a still camera gives a still image;
- multi-step models run as a stream batch (``k`` stages in one transformer call);
- the frame runs eager at once while ``torch.compile`` builds it in the background
  (``accel.py``), and a frame that would need a recompile falls back to eager, said once.

Threading: ``__call__`` and the setters run on one thread (the scene worker).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from engine.diffusion.accel import Accelerator, Backend, EagerAccelerator, RecompileRefused
from engine.diffusion.device import DeviceChoice
from engine.diffusion.flow import (
    FlowCoefficients,
    FlowHotPath,
    FlowInputs,
    FlowKind,
    FlowSchedule,
    FlowStep,
    FlowText,
    flow_kind,
    flow_schedule,
    guidance_tensor,
    image_seq_len,
)
from engine.diffusion.flow_prompts import FlowPromptBank, check_text_encoders
from engine.diffusion.similarity import SimilarityFilter
from engine.diffusion.stream import fit_into, fixed_noise, fx_is_tracing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlowStreamConfig:
    """Fixed for a stream's life (a change builds a new stream; the model stays loaded)."""

    size: tuple[int, int] = (512, 512)  # (height, width), rounded to what the model takes
    steps: int = 1  # transformer calls per image: the stream batch
    cfg: bool = False  # SD3: classifier-free guidance against the empty prompt (doubles the batch)


@dataclass
class FlowSettings:
    """Changeable between any two frames."""

    strength: float = 0.6
    seed: int = 0
    guidance_scale: float = 4.5  # only for transformers with a guidance embedding (SANA-Sprint, FLUX-dev)
    similarity_threshold: float = 0.98  # 0: off


def round_size(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """Any asked size as the nearest the model takes (at least 2 patches a side)."""
    height, width = (max(2 * multiple, round(side / multiple) * multiple) for side in size)
    return height, width


class FlowStream:
    """``stream(frame)`` -> image or None. One per (model, size, steps); the rest changes live."""

    def __init__(
        self,
        pipe: Any,
        choice: DeviceChoice,
        config: FlowStreamConfig = FlowStreamConfig(),
        settings: FlowSettings | None = None,
        prompts: Sequence[tuple[str, float]] = (("", 1.0),),
        accelerator: Accelerator | None = None,
        bank: FlowPromptBank | None = None,
        source: str = "",
    ) -> None:
        self.pipe = pipe
        self.kind: FlowKind = flow_kind(pipe)
        self.choice = choice
        self.where = choice.describe()  # "NVIDIA H200 (bfloat16)": asked of the driver once, not per frame
        self.config = config
        self.settings = settings or FlowSettings()
        if config.cfg and self.kind != "sd3":
            raise ValueError(f"classifier-free guidance is SD3's here; {self.kind} is guidance-distilled")
        self.cfg = config.cfg
        probe = FlowHotPath(self.kind, pipe, size=(64, 64), dtype=choice.dtype)
        patch = int(pipe.transformer.config.get("patch_size", 1) or 1)
        multiple = probe.scale * (2 if self.kind == "flux" else patch)
        self.size = round_size(config.size, multiple)
        if self.size != tuple(config.size):
            log.info("size %s rounded to %s, a multiple of %d for this model", config.size, self.size, multiple)
        self.hot = FlowHotPath(self.kind, pipe, size=self.size, dtype=choice.dtype)
        self.latent_shape = (int(pipe.transformer.config.in_channels), *self.hot.latent_size)
        if self.kind == "flux":
            self.latent_shape = (self.latent_shape[0] // 4, *self.hot.latent_size)  # packed 2x2 -> 4C
        self.seq_len = image_seq_len(self.kind, self.hot.latent_size, patch)
        if bank is None:
            check_text_encoders(self.kind, pipe, source or type(pipe).__name__)
        self.prompts = bank or FlowPromptBank(self.kind, pipe, choice)
        self.filter = SimilarityFilter(self.settings.similarity_threshold)
        self.schedule = self._build_schedule(self.settings.strength)
        self.frames_in = 0
        self.frames_out = 0
        self.frames_dropped = 0
        self.accel_error: str | None = None
        self.accel_fallback: str | None = None
        self.accel_ready_s: float | None = None
        self._backend = Backend("eager", self.hot.frame)
        self._cuda_stream = torch.cuda.Stream(choice.device) if choice.is_cuda else None
        self._done = torch.cuda.Event() if choice.is_cuda else None
        device = choice.device
        with self._on_frame_stream(), torch.inference_mode(False):
            self._inputs = FlowInputs(
                pixels=torch.empty((*self.size, 3), dtype=torch.uint8, device=device),
                buffer=torch.zeros((config.steps - 1, *self.latent_shape), device=device, dtype=self.hot.latent_dtype),
                noise=self._build_noise(self.settings.seed),
                embeds=torch.empty(0),  # sized by the first embeddings
                pooled=None,
                mask=None,
                negative_embeds=None,
                negative_pooled=None,
                guidance=guidance_tensor(self.settings.guidance_scale, device) if self._has_guidance() else None,
                coefficients=self.schedule.tensors(device),
            )
            self.prompts.request(prompts)
            if self.cfg:
                negative = self.prompts.encode_on_encoder_thread("")  # the pipeline's default negative prompt
                self._inputs = self._inputs._replace(
                    negative_embeds=negative.embeds.clone(), negative_pooled=cast(torch.Tensor, negative.pooled).clone()
                )
        self._host_in = self._inputs.pixels if device.type == "cpu" else torch.empty((*self.size, 3), dtype=torch.uint8)
        self._host_out: torch.Tensor | None = None
        if choice.is_cuda:
            self._host_in = torch.empty((*self.size, 3), dtype=torch.uint8, pin_memory=True)
            self._host_out = torch.empty((*self.size, 3), dtype=torch.uint8, pin_memory=True)
        self._image: torch.Tensor | None = None
        self._text_version = 0
        self._seen_prompts = 0
        self._changed = True
        self._flush_left = 0
        accelerator = accelerator or EagerAccelerator()
        self.accel_requested = accelerator.name
        self._accelerator: Accelerator | None = accelerator if accelerator.name != "eager" else None
        self._accel_thread: threading.Thread | None = None
        self._accel_started: float | None = None

    # -- live settings ---------------------------------------------------------------------------
    def set_prompts(self, prompts: Sequence[tuple[str, float]]) -> None:
        with self._on_frame_stream():
            self.prompts.request(prompts)

    def set_strength(self, strength: float) -> None:
        """A new first sigma within the step count (ValueError keeps the old one)."""
        if strength != self.settings.strength:
            schedule = self._build_schedule(strength)
            with self._on_frame_stream():
                for fixed, new in zip(self._inputs.coefficients, schedule.tensors(self.choice.device)):
                    fixed.copy_(new)
            self.schedule = schedule
            self.settings.strength = strength
            self._changed = True

    def set_seed(self, seed: int) -> None:
        if seed != self.settings.seed:
            with self._on_frame_stream():
                self._inputs.noise.copy_(self._build_noise(seed))
            self.settings.seed = seed
            self._changed = True

    def set_guidance_scale(self, scale: float) -> None:
        if scale != self.settings.guidance_scale:
            if self._inputs.guidance is not None:
                with self._on_frame_stream():
                    self._inputs.guidance.fill_(float(scale))
            self.settings.guidance_scale = scale
            self._changed = True

    def set_similarity_threshold(self, threshold: float) -> None:
        self.settings.similarity_threshold = self.filter.threshold = threshold

    @property
    def inputs(self) -> FlowInputs:
        return self._inputs

    @property
    def accel(self) -> str:
        return self._backend.name

    @property
    def accel_state(self) -> str:
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
        if self._accel_thread is not None:
            self._accel_thread.join(timeout)
        return self.accel == self.accel_requested

    # -- the frame ----------------------------------------------------------------------------------
    def __call__(self, frame: np.ndarray) -> np.ndarray | None:
        """RGB uint8 (H, W, 3), any size -> RGB uint8 at the stream's size, or None (nothing new,
        the stream batch still filling, a frame dropped while torch.fx traces)."""
        if self.prompts.version == 0 or self._skip(frame):
            return None
        self._take_new_prompt()
        if self._accelerator is not None:
            self._start_accelerated_build()
        if self._accel_thread is not None and self._accel_thread.is_alive() and fx_is_tracing():
            self.frames_dropped += 1
            return None
        self._run(frame)
        if self._done is not None:
            self._done.synchronize()  # the frame's one host synchronisation
        assert self._image is not None
        result = self._image.numpy().copy()
        self.frames_in += 1
        if self.frames_in < self.config.steps:
            return None
        self.frames_out += 1
        return result

    def trajectory(self, frame: np.ndarray) -> Iterator[tuple[FlowStep, np.ndarray, np.ndarray]]:
        """One image stage by stage (the flow scene): (step, decoded x_t, decoded predicted x0) each."""
        self._take_new_prompt()
        inputs = self._inputs
        with torch.inference_mode(), self._on_frame_stream():
            fit_into(frame, self._host_in.numpy())
            pixels = self._host_in.to(self.choice.device)
            text = FlowText(inputs.embeds, inputs.pooled, inputs.mask)
            negative = None
            if inputs.negative_embeds is not None:
                negative = FlowText(inputs.negative_embeds, inputs.negative_pooled, None)
            c = inputs.coefficients
            for step in self.hot.trajectory(pixels, inputs.noise, text, inputs.guidance, c, negative):
                images = [self._to_host(self.hot.decode(latents)) for latents in (step.x_t, step.x0)]
                yield step, images[0], images[1]

    def close(self) -> None:
        self.prompts.close()

    # -- internals ----------------------------------------------------------------------------------
    def _run(self, frame: np.ndarray) -> None:
        backend = self._backend
        inputs = self._inputs
        with torch.inference_mode(), self._on_frame_stream():
            fit_into(frame, self._host_in.numpy())
            if inputs.pixels is not self._host_in:
                inputs.pixels.copy_(self._host_in, non_blocking=self.choice.is_cuda)
            if backend.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            try:
                image, handed_on = backend.frame(*inputs)
            except RecompileRefused as exc:
                self._fall_back_to_eager(str(exc))
                image, handed_on = self.hot.frame(*inputs)
            if handed_on.shape[0]:
                inputs.buffer.copy_(handed_on)
            if self._host_out is not None:
                self._host_out.copy_(image, non_blocking=True)
                self._image = self._host_out
            else:
                self._image = image.cpu()
            if self._done is not None:
                self._done.record()

    def _to_host(self, image: torch.Tensor) -> np.ndarray:
        result: np.ndarray = image.mul(255).round().to(torch.uint8).cpu().numpy()
        return result

    def _skip(self, frame: np.ndarray) -> bool:
        similar = self.filter.similar(frame)
        version = self.prompts.version
        if self._changed or version != self._seen_prompts or not similar:
            self._changed, self._seen_prompts = False, version
            self._flush_left = self.config.steps - 1
            return False
        if self._flush_left > 0:
            self._flush_left -= 1
            return False
        return True

    def _take_new_prompt(self) -> None:
        version = self.prompts.version
        if version == self._text_version:
            return
        text = self.prompts.current
        with self._on_frame_stream():
            if self._inputs.embeds.shape != text.embeds.shape:  # the first embeddings: the inputs' sizes
                with torch.inference_mode(False):
                    self._inputs = self._inputs._replace(
                        embeds=torch.empty_like(text.embeds),
                        pooled=None if text.pooled is None else torch.empty_like(text.pooled),
                        mask=None if text.mask is None else torch.empty_like(text.mask),
                    )
            with torch.inference_mode():
                self._inputs.embeds.copy_(text.embeds)
                if self._inputs.pooled is not None and text.pooled is not None:
                    self._inputs.pooled.copy_(text.pooled)
                if self._inputs.mask is not None and text.mask is not None:
                    self._inputs.mask.copy_(text.mask)
        self._text_version = version

    def _has_guidance(self) -> bool:
        return self.cfg or bool(self.pipe.transformer.config.get("guidance_embeds", False))

    def _build_schedule(self, strength: float) -> FlowSchedule:
        schedule = flow_schedule(self.kind, self.pipe.scheduler, self.config.steps, strength, self.seq_len)
        log.debug("flow schedule: sigmas %s", schedule.sigmas)
        return schedule

    def _build_noise(self, seed: int) -> torch.Tensor:
        return fixed_noise(seed, self.config.steps, self.latent_shape).to(self.choice.device, self.hot.latent_dtype)

    def _on_frame_stream(self) -> AbstractContextManager[object]:
        return torch.cuda.stream(self._cuda_stream) if self._cuda_stream is not None else nullcontext()

    def _fall_back_to_eager(self, reason: str) -> None:
        self._backend = Backend("eager", self.hot.frame)
        self.accel_fallback = reason
        self.accel_error = f"{self.accel_requested} fell back to eager: {reason}"
        log.warning("%s", self.accel_error)

    def _start_accelerated_build(self) -> None:
        accelerator, self._accelerator = self._accelerator, None
        assert accelerator is not None
        with self._on_frame_stream(), torch.inference_mode(False):
            example = self._example()
        self._accel_started = time.monotonic()
        self._accel_thread = threading.Thread(
            target=self._build_accelerated, args=(accelerator, example), name=f"{accelerator.name} build", daemon=True
        )
        self._accel_thread.start()

    def _example(self) -> FlowInputs:
        def copy(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.clone()

        i = self._inputs
        return FlowInputs(
            i.pixels.clone(),
            i.buffer.clone(),
            i.noise.clone(),
            i.embeds.clone(),
            copy(i.pooled),
            copy(i.mask),
            copy(i.negative_embeds),
            copy(i.negative_pooled),
            copy(i.guidance),
            FlowCoefficients(*(t.clone() for t in i.coefficients)),
        )

    def _build_accelerated(self, accelerator: Accelerator, example: FlowInputs) -> None:
        started = time.monotonic()
        if self._cuda_stream is not None:
            torch.cuda.current_stream(self.choice.device).wait_stream(self._cuda_stream)
        try:
            # the accelerators take any frame function with NamedTuple inputs (see accel.describe_inputs)
            backend = accelerator.build(cast(Any, self.hot), cast(Any, example))
        except Exception as exc:  # named fallback policy: the show stays on eager, the error is reported
            self.accel_error = f"{accelerator.name} failed, staying on eager: {type(exc).__name__}: {exc}"
            log.exception("accelerator %s failed", accelerator.name)
            return
        self.accel_ready_s = time.monotonic() - started
        self._backend = backend
        log.info("flow frames now run on %s (built in %.1f s)", backend.name, self.accel_ready_s)
