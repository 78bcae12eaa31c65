"""Flow-matching scenes: SANA-Sprint on the camera every frame, FLUX.1-schnell and SD3.5 as a slow scene.

- ``sana_sprint`` (realtime): the flow hot path (``engine.diffusion.flow_stream``) on the newest
  source frame, one or two steps, like the ``realtime`` scene plays SD-turbo.
- ``flow`` (slow, like ``ddpm`` and ``vqgan_clip``): one image at a time of FLUX.1-schnell or
  SD3.5 (Large Turbo, Medium), from the camera or from pure noise; the compositor morphs from
  the last image to the next while it computes. ``show = trajectory`` shows the flow itself:
  each step's point on the way from noise to the image (``x0``: each step's predicted end).
  ``evolve`` gives every image the next seed, so the show drifts from image to image.

Both declare their memory. Before a model loads, its published footprint is checked against
``/scene/memory_budget`` and the GPU's free memory: a model that does not fit is refused in one
line with the figures (``DoesNotFit``), and the previous scene plays on. So are a missing or
gated model, a missing text encoder and an unsupported scheduler (``ModelNotFound``,
``MissingTextEncoder``, ``UnsupportedScheduler``). Prompt, strength, seed and guidance are live;
steps and resolution rebuild the stream around the loaded model; model, ``text_offload``,
device, dtype and accel load again in the background while the current model plays.

Importing this module needs no torch (the catalog lists scenes without it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.diffusion.options import ACCEL_CHOICES, DEVICE_CHOICES, DTYPE_CHOICES, TorchDefaults, accel_label
from engine.params import Param, bool_param, enum_param, float_param, int_param, string_param
from engine.scenes.base import (
    BackgroundLoad,
    LastGood,
    Scene,
    SceneNeeds,
    free_accelerator_memory,
    require_diffusion_extra,
    reserve_render_core,
)
from engine.scenes.worker import BUDGET_PARAM, is_out_of_memory

log = logging.getLogger(__name__)

SANA_SPRINT = "Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers"
FLUX_SCHNELL = "black-forest-labs/FLUX.1-schnell"
_IMPORTS = ("torch", "diffusers:FlowMatchEulerDiscreteScheduler", "diffusers:SCMScheduler", "transformers")


@dataclass(frozen=True)
class _LoadKey:
    model: str
    config: str
    offload: bool
    device: str
    dtype: str
    accel: str


def _parse_prompts(text: tuple[str, str]) -> tuple[list, list]:
    from engine.prompt_syntax import parse_prompts

    parsed = parse_prompts(text[0]), parse_prompts(text[1])
    negative = next((p for p in (*parsed[0], *parsed[1]) if p.weight < 0), None)
    if negative is not None:
        raise ValueError(f"{negative.text!r} has a negative weight: this scene blends prompts and cannot push away")
    return parsed


def _common_params(model: str, steps: int, max_steps: int, strength: float, guidance: float) -> tuple[Param, ...]:
    return (
        string_param(
            "prompt",
            "a watercolour painting, vivid colours, soft light",
            description="What the image becomes; several as 'a forest:1|fog:0.5', blended by slerp",
        ),
        string_param("prompt_b", "", description="A second prompt, blended in by prompt_mix (empty: none)"),
        float_param("prompt_mix", 0.0, 0.0, 1.0, smoothing=0.3, description="0 = prompt, 1 = prompt_b"),
        float_param(
            "strength",
            strength,
            0.05,
            1.0,
            description="How far from the source: the first point on the flow's line (1 = pure noise)",
        ),
        int_param("steps", steps, 1, max_steps, description="Transformer steps per image (a stream batch)"),
        int_param("seed", 0, 0, 2**31 - 1, description="The fixed noise; a new seed is a new look"),
        float_param(
            "guidance",
            guidance,
            0.0,
            20.0,
            description="SANA-Sprint's and FLUX-dev's guidance embedding; SD3 / SD3.5: classifier-free guidance "
            "while above 1 (SD3.5 Medium: 4.5; Large Turbo: 0); FLUX-schnell ignores it",
        ),
        int_param("resolution", 512, 32, 1536, unit="px", description="Square output size, rounded to the model's"),
        string_param(
            "model",
            model,
            description="Hub id, local diffusers folder or .safetensors file (FLUX, SD3 / SD3.5, SANA-Sprint)",
        ),
        string_param(
            "config",
            "",
            description="A single file's other parts (text encoders, VAE): diffusers folder or hub id; "
            "empty = the official model's",
        ),
        bool_param(
            "text_offload",
            False,
            description="Keep the text encoders on the CPU between prompt changes (T5-XXL: 9.5 GB less on the GPU; "
            "a new prompt then takes a second or two)",
        ),
        enum_param(
            "device", "auto", DEVICE_CHOICES, description="Where it runs (auto: CUDA, MPS, CPU)", in_presets=False
        ),
        enum_param(
            "dtype",
            "auto",
            DTYPE_CHOICES,
            description="Precision (auto: bfloat16 on CUDA, the precision these models ship in; float32 on CPU)",
            in_presets=False,
        ),
        enum_param(
            "accel",
            "auto",
            ACCEL_CHOICES,
            description="eager or compile (torch.compile, built in the background); auto: compile on CUDA",
            in_presets=False,
        ),
    )


class _FlowScene(Scene):
    """What both flow scenes share: loading with the memory check, the stream, live parameters."""

    DEFAULT_MODEL = FLUX_SCHNELL

    def __init__(self, params: Any, torch: TorchDefaults | None = None) -> None:
        super().__init__(params, torch)
        self._pipe: Any = None
        self._stream: Any = None
        self._load_key: _LoadKey | None = None
        self._active_key: _LoadKey | None = None
        self._stream_key: tuple[int, int, bool] | None = None
        self._reload: BackgroundLoad | None = None
        self.declared_mb = 0  # what the loaded model declared (the HUD, tests)
        self._prompts = LastGood(f"{self.name}: prompt refused, the last one plays on", _parse_prompts)
        self._stream_shape = LastGood(f"{self.name}: stream refused, the last one plays on", self._rebuild_stream)
        self._strength = LastGood(f"{self.name}: strength refused, the last one plays on", self._set_strength)

    # -- loader thread -------------------------------------------------------------------------
    def load(self) -> None:
        require_diffusion_extra(self.name)
        key = self._wanted_load_key()
        self._pipe, self._stream = self._build(key)
        self._load_key = self._active_key = key

    def unload(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._pipe = self._stream = None
        free_accelerator_memory()

    # -- internals -------------------------------------------------------------------------------
    def _wanted_load_key(self) -> _LoadKey:
        return _LoadKey(
            model=self.param("model").strip() or self.DEFAULT_MODEL,
            config=self.param("config").strip(),
            offload=bool(self.param("text_offload")),
            device=self.param("device"),
            dtype=self.param("dtype"),
            accel=self.param("accel"),
        )

    def _wanted_stream_key(self, kind: str | None = None) -> tuple[int, int, bool]:
        """(steps, resolution, classifier-free guidance): what a new stream is built for. CFG is
        SD3's (SD3.5 Medium), on while ``guidance`` is above 1 (its pipeline's rule)."""
        kind = kind or (self._stream.kind if self._stream is not None else None)
        cfg = kind == "sd3" and float(self.param("guidance")) > 1.0
        return int(self.param("steps")), int(self.param("resolution")), cfg

    def _choice(self, key: _LoadKey) -> tuple[Any, str]:
        from engine.diffusion.device import choose_device

        chosen = self.torch.pick(key.device, key.dtype, key.accel)
        dtype = chosen.dtype
        if dtype == "auto" and (chosen.device.startswith("cuda") or chosen.device == "auto"):
            import torch

            if chosen.device != "auto" or torch.cuda.is_available():
                dtype = "bfloat16"  # FLUX, SD3.5 and SANA ship in bf16 (float16 overflows in FLUX)
        return choose_device(chosen.device, dtype), chosen.accel

    def _build(self, key: _LoadKey, pipe: Any = None, bank: Any = None) -> tuple[Any, Any]:
        from engine.diffusion.accel import choose_accelerator
        from engine.diffusion.flow_loading import FlowSpec, check_fits, load_flow
        from engine.diffusion.flow_stream import FlowSettings, FlowStream, FlowStreamConfig

        choice, accel = self._choice(key)
        if choice.device.type == "cpu":
            reserve_render_core()
        spec = FlowSpec(model=key.model, config=key.config, offload_text=key.offload)
        try:
            if pipe is None:
                budget = int(self.params.get(BUDGET_PARAM)) if BUDGET_PARAM in self.params else 0
                self.declared_mb = check_fits(spec, budget, choice)  # DoesNotFit: one line, the old scene plays
                started = time.monotonic()
                pipe = load_flow(spec, choice)
                log.info("%s: %s loaded in %.1f s", self.name, key.model, time.monotonic() - started)
            from engine.diffusion.flow import flow_kind

            steps, resolution, cfg = self._wanted_stream_key(flow_kind(pipe))
            if bank is None:
                from engine.diffusion.flow_prompts import FlowPromptBank, check_text_encoders

                check_text_encoders(flow_kind(pipe), pipe, key.model)
                bank = FlowPromptBank(flow_kind(pipe), pipe, choice, offload=key.offload)
            stream = FlowStream(
                pipe,
                choice,
                FlowStreamConfig(size=(resolution, resolution), steps=steps, cfg=cfg),
                FlowSettings(
                    strength=float(self.param("strength")),
                    seed=int(self.param("seed")),
                    guidance_scale=float(self.param("guidance")),
                    similarity_threshold=self._similarity(),
                ),
                prompts=self._weighted_prompts() or [("", 1.0)],
                accelerator=choose_accelerator(accel, choice.device) if self.realtime else None,
                bank=bank,
                source=key.model,
            )
            stream.prompts.wait()
        except Exception as exc:
            if is_out_of_memory(exc):
                free_accelerator_memory()
            raise
        self._stream_key = (steps, resolution, cfg)
        log.info(
            "%s: %s (%s) on %s, %dx%d, %d step(s)",
            self.name,
            key.model,
            stream.kind,
            stream.where,
            stream.size[1],
            stream.size[0],
            steps,
        )
        return pipe, stream

    def _similarity(self) -> float:
        return 0.0

    def _weighted_prompts(self) -> list[tuple[str, float]] | None:
        parsed = self._prompts.update((self.param("prompt"), self.param("prompt_b")))
        if parsed is None:
            return None
        first, second = parsed
        if not second:
            return [(p.text, p.weight) for p in first]
        mix = float(self.param("prompt_mix"))
        return [(p.text, p.weight * (1.0 - mix)) for p in first] + [(p.text, p.weight * mix) for p in second]

    def _apply_params(self) -> None:
        key = self._wanted_load_key()
        if key != self._load_key and self._reload is None:
            self._start_reload(key)
        self._stream_shape.update((self._wanted_stream_key(), self.param("strength"), self._stream_key))
        stream = self._stream
        prompts = self._weighted_prompts()
        if prompts is not None:
            stream.set_prompts(prompts)
        stream.set_seed(self._seed())
        stream.set_guidance_scale(float(self.param("guidance")))
        stream.set_similarity_threshold(self._similarity())
        self._strength.update((id(stream), self._strength_now()))

    def _seed(self) -> int:
        return int(self.param("seed"))

    def _strength_now(self) -> float:
        return float(self.param("strength"))

    def _rebuild_stream(self, attempt: tuple[tuple[int, int, bool], float, tuple[int, int, bool] | None]) -> None:
        wanted, _, playing = attempt
        if wanted == playing:
            return
        old = self._stream
        try:
            self._pipe, self._stream = self._build(self._active_key, pipe=self._pipe, bank=old.prompts)
        except ValueError as exc:
            raise ValueError(f"steps {wanted[0]}, resolution {wanted[1]}: {exc}") from exc

    def _set_strength(self, attempt: tuple[int, float]) -> None:
        stream, strength = self._stream, attempt[1]
        try:
            stream.set_strength(strength)
        except ValueError as exc:
            raise ValueError(f"{exc}; keeping {stream.settings.strength:.3g}") from exc

    def _start_reload(self, key: _LoadKey) -> None:
        self._load_key = key
        self._reload = BackgroundLoad(f"{self.name} {key.model}", lambda: (key, *self._build(key)))

    def _take_reloaded_model(self) -> bool:
        if self._reload is None or not self._reload.done:
            return False
        reload, self._reload = self._reload, None
        reloaded = reload.take()  # a failed load raises here: the worker reports it, the old model plays on
        old = self._stream
        self._active_key, self._pipe, self._stream = reloaded
        old.close()
        free_accelerator_memory()
        return True

    def _report(self) -> None:
        stream = self._stream
        self.status = f"{stream.where} {stream.kind} {accel_label(stream.accel_state)}"
        self.backend = stream.accel
        self.warning = (
            stream.accel_error
            or stream.prompts.error
            or self._prompts.refusal
            or self._stream_shape.refusal
            or self._strength.refusal
        )


class SanaSprintScene(_FlowScene):
    name = "sana_sprint"
    order = 60  # after the older built-ins: their F-keys and scene/select indices do not move
    description = "SANA-Sprint flow-matching img2img of the source, every frame (one or two steps)"
    realtime = True
    uses_input = True
    max_fps = 240.0
    fallback = "ddpm"
    DEFAULT_MODEL = SANA_SPRINT
    needs = SceneNeeds(accelerator_mb=8650, models=(SANA_SPRINT,), imports=_IMPORTS)
    PARAMS = (
        *_common_params(SANA_SPRINT, steps=1, max_steps=4, strength=0.6, guidance=4.5),
        float_param(
            "similarity_threshold",
            0.98,
            0.0,
            1.0,
            description="Skip frames at least this similar to the last one processed; 0 = off",
        ),
    )

    def process(self, frame: np.ndarray | None, t: float) -> np.ndarray | None:
        if frame is None:
            return None
        self._take_reloaded_model()
        self._apply_params()
        try:
            image: np.ndarray | None = self._stream(frame)
        except Exception as exc:
            if is_out_of_memory(exc):
                free_accelerator_memory()
            raise
        self._report()
        return image

    def _similarity(self) -> float:
        return float(self.param("similarity_threshold"))


class FlowScene(_FlowScene):
    name = "flow"
    order = 70
    description = "FLUX.1-schnell / SD3.5 flow matching, one image at a time, morphing (or the flow itself shown)"
    realtime = False
    uses_input = False  # it computes every time; the camera matters only with source = camera
    max_fps = 12.0
    fallback = "ddpm"
    needs = SceneNeeds(accelerator_mb=35800, models=(FLUX_SCHNELL,), imports=_IMPORTS)
    PARAMS = (
        *_common_params(FLUX_SCHNELL, steps=4, max_steps=8, strength=0.8, guidance=3.5),
        enum_param(
            "source",
            "camera",
            ("camera", "noise"),
            description="camera: img2img of the source frame; noise: text to image from pure noise (strength 1)",
        ),
        enum_param(
            "show",
            "image",
            ("image", "trajectory", "x0"),
            description="image: each finished image (morphed); trajectory: every step's point from noise to "
            "image; x0: every step's predicted image",
        ),
        float_param(
            "step_rate",
            4.0,
            0.5,
            60.0,
            unit="steps/s",
            description="trajectory / x0: steps shown per second (at most: a slow machine shows fewer)",
        ),
        float_param("hold", 2.0, 0.0, 60.0, unit="s", description="How long a finished image stays"),
        bool_param("evolve", True, description="Each image takes the next seed: the show drifts from image to image"),
    )

    def __init__(self, params: Any, torch: TorchDefaults | None = None) -> None:
        super().__init__(params, torch)
        self.max_fps = float(self.param("step_rate"))
        self._trajectory: Iterator[Any] | None = None
        self._hold_until = 0.0
        self.images = 0  # images finished (each the next seed when evolving)
        self._no_frame_told = False

    def process(self, frame: np.ndarray | None, t: float) -> np.ndarray | None:
        """The next image (show = image) or the next step of the one on its way; None while one holds."""
        self.max_fps = float(self.param("step_rate"))
        if self._take_reloaded_model():
            self._trajectory = None
        show = self.param("show")
        if self._trajectory is None:
            if t < self._hold_until:
                return None
            self._apply_params()
            self._trajectory = self._stream.trajectory(self._source(frame))
        try:
            if show == "image":
                for point in self._trajectory:  # the whole flow now; the compositor morphs to its end
                    last = point
                return self._finish(last, t)
            point = next(self._trajectory)
        except Exception as exc:
            self._trajectory = None
            if is_out_of_memory(exc):
                free_accelerator_memory()
            raise
        finally:
            self._report()
        step, x_t, x0 = point
        if step.step >= step.total:
            return self._finish(point, t)
        return x0 if show == "x0" else x_t

    def _finish(self, point: Any, t: float) -> np.ndarray:
        """The flow's end: x_t for flow matching, the predicted x0 for SCM (its last step re-noises by sin 0)."""
        self._trajectory = None
        self._hold_until = t + float(self.param("hold"))
        self.images += 1
        step, x_t, x0 = point
        image: np.ndarray = x0 if self._stream.kind == "sana_sprint" else x_t
        return image

    def _seed(self) -> int:
        return (int(self.param("seed")) + (self.images if self.param("evolve") else 0)) % 2**31

    def _strength_now(self) -> float:
        return 1.0 if self.param("source") == "noise" else float(self.param("strength"))

    def _source(self, frame: np.ndarray | None) -> np.ndarray:
        if self.param("source") == "camera" and frame is not None:
            self._no_frame_told = False
            return frame
        if self.param("source") == "camera" and not self._no_frame_told:  # named policy: no camera -> from noise
            self._no_frame_told = True
            log.warning("flow: source camera has no frame yet; starting from grey")
        size = self._stream.size
        return np.full((*size, 3), 127, dtype=np.uint8)
