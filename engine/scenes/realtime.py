"""The real-time diffusion scene: the newest source frame -> SD-turbo / LCM img2img -> the scene layer.

Everything heavy lives in ``engine.diffusion`` and is imported inside ``load``: importing
this module (to list scenes, validate presets, print parameters) needs no torch.

- ``load`` (loader thread) loads the model, builds the stream and encodes the first prompt.
  A missing model raises ``ModelNotFound`` with its one-line message: the worker reports it
  and the previous scene keeps playing. So does an out-of-memory error.
- ``process`` (worker thread) applies the live parameters, then runs the hot path on the
  newest frame. Prompts encode in the background; ``steps`` or ``resolution`` rebuild the
  stream around the loaded model; ``model``, ``lora``, ``vae``, ``device``, ``dtype`` and
  ``accel`` load a new model on a background thread while the current one keeps playing.
- LoRA slots ``loras/<n>/file`` and ``loras/<n>/weight`` (n = 1..4) play adapters on the loaded
  UNet (``engine.diffusion.lora``): a file is read in the background and swapped in between
  two frames (the old one plays until then, a bad one is reported and the last good one
  plays on); a weight change lands at the next frame. A new model starts with the slots
  loaded again. They do not reach a TensorRT engine (its weights are built in).
- ControlNet slots ``controlnets/<n>/model|type|scale|start|end|image`` (n = 1..3) hold the
  camera's structure (``engine.diffusion.controlnet``): a model loads in the background and
  joins between two frames (the compiled frame is rebuilt in the background while frames play
  eager); scale, start and end are tensor writes. A ControlNet that cannot play (another base
  model's, missing, over ``controlnets/memory_mb``) is one HUD line; the scene plays without it.
- IP-Adapter: ``style/adapter`` (loaded with the model, in the background) takes a style from
  ``style/image`` (a file; its embedding is computed off the frame path when it changes) at
  ``style/scale`` (a weight write: no recompile). A missing image is one HUD line; the last
  style plays on.
- ``timeline/*`` plays a prompt timeline (``engine.prompt_timeline``) in place of ``prompt``:
  the lines around the playing one are encoded ahead in the background, and each frame asks
  for the two lines' prompts weighted by the blend, which the prompt bank slerps on the spot
  (a small elementwise operation, copied into the frame's fixed text input: no recompile).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.diffusion.options import (
    ACCEL_CHOICES,
    CONTROL_TYPES,
    CONTROLNET_SLOTS,
    DEFAULT_DEPTH_MODEL,
    DEVICE_CHOICES,
    DTYPE_CHOICES,
    LORA_SLOTS,
    TorchDefaults,
    accel_label,
)
from engine.params import enum_param, float_param, int_param, string_param
from engine.prompt_timeline import (
    Playing,
    ScenePromptTimeline,
    refuse_negative_weights,
    timeline_params,
    weighted_mix,
)
from engine.scenes.base import (
    BackgroundLoad,
    LastGood,
    Scene,
    SceneNeeds,
    free_accelerator_memory,
    require_diffusion_extra,
    reserve_render_core,
)
from engine.scenes.worker import is_out_of_memory

log = logging.getLogger(__name__)

DEFAULT_MODEL = "stabilityai/sd-turbo"
DEFAULT_TINY_VAE = "madebyollin/taesd"


@dataclass(frozen=True)
class _LoadKey:
    """The parameters that need a new model (seconds); anything else is live."""

    model: str
    lora: str
    vae: str
    device: str
    dtype: str
    accel: str
    style_adapter: str = ""


def _parse_prompt_pair(text: tuple[str, str]) -> tuple[list, list]:
    """``prompt`` and ``prompt_b`` as weighted prompts; ValueError for text that cannot be read."""
    from engine.prompt_syntax import parse_prompts

    parsed = parse_prompts(text[0]), parse_prompts(text[1])
    negative = next((p for p in (*parsed[0], *parsed[1]) if p.weight < 0), None)
    if negative is not None:
        raise ValueError(
            f"{negative.text!r} has a negative weight: this scene blends prompts and "
            "cannot push away from one (vqgan_clip can)"
        )
    return parsed


def _lora_slot_params(slot: int) -> tuple:
    return (
        string_param(
            f"loras/{slot}/file",
            "",
            description=f"LoRA slot {slot}: .safetensors file, folder, hub id or hub id/weights.safetensors "
            "(diffusers or kohya); swapped in live, without reloading the model; empty = off",
        ),
        float_param(
            f"loras/{slot}/weight",
            1.0,
            -1.0,
            2.0,
            smoothing=0.05,
            description=f"LoRA slot {slot}'s strength: 0 = off, 1 = as trained, negative = the opposite",
        ),
    )


def _controlnet_slot_params(slot: int) -> tuple:
    return (
        string_param(
            f"controlnets/{slot}/model",
            "",
            description=f"ControlNet slot {slot}: hub id, local folder or .safetensors file, for the model's "
            "base (SD 1.5 ControlNets on SD 1.5, SD 2.1 ones on SD-turbo); loaded live; empty = off",
        ),
        enum_param(
            f"controlnets/{slot}/type",
            "canny",
            CONTROL_TYPES,
            description=f"ControlNet slot {slot}'s control image: canny edges, depth (controlnets/depth_model), "
            "tile / source (the frame itself) or none (the still image controlnets/<n>/image)",
        ),
        float_param(f"controlnets/{slot}/scale", 1.0, 0.0, 2.0, description=f"ControlNet slot {slot}'s strength"),
        float_param(
            f"controlnets/{slot}/start",
            0.0,
            0.0,
            1.0,
            description=f"ControlNet slot {slot} acts from this share of the steps on",
        ),
        float_param(
            f"controlnets/{slot}/end", 1.0, 0.0, 1.0, description=f"ControlNet slot {slot} acts up to this share"
        ),
        string_param(
            f"controlnets/{slot}/image",
            "",
            description=f"ControlNet slot {slot}'s still control image (type none): an image file",
        ),
    )


class RealtimeScene(Scene):
    name = "realtime"
    order = 30
    description = "Diffusion img2img of the source, every frame (SD-turbo, SDXL-turbo, LCM)"
    realtime = True
    uses_input = True
    # as fast as the GPU allows: the worker never redoes a source frame, so the camera's rate is
    # the real limit; the cap only keeps a 240 Hz source from spinning a fast GPU for nothing
    max_fps = 240.0
    fallback = "ddpm"  # a missing model at the start of a show: the shipped DDPM plays instead
    needs = SceneNeeds(
        accelerator_mb=6000,
        models=(DEFAULT_MODEL, DEFAULT_TINY_VAE),
        imports=(
            "torch",
            "diffusers:UNet2DConditionModel",
            "diffusers:AutoencoderKL",
            "diffusers:AutoencoderTiny",
            "diffusers:StableDiffusionImg2ImgPipeline",
            "transformers:CLIPTextModel",
            "peft",
        ),
    )
    PARAMS = (
        string_param(
            "prompt",
            "a watercolour painting, vivid colours, soft light",
            description="What the image becomes; several as 'a forest:1|fog:0.5', blended by slerp",
        ),
        string_param(
            "prompt_b", "", description="A second prompt (same syntax), blended in by prompt_mix (empty: none)"
        ),
        float_param(
            "prompt_mix",
            0.0,
            0.0,
            1.0,
            smoothing=0.3,
            description="0 = prompt, 1 = prompt_b; in between a slerp of the two",
        ),
        float_param(
            "strength", 0.5, 0.05, 1.0, description="How far the image departs from the source (the noise level)"
        ),
        int_param("steps", 1, 1, 4, description="Denoising steps as one stream batch: 1 for SD-turbo, 2-4 for LCM"),
        int_param("seed", 0, 0, 2**31 - 1, description="The fixed noise; a new seed is a new look"),
        float_param(
            "noise_drift",
            0.0,
            0.0,
            1.0,
            description="0 = the same noise every frame (stable); 1 = fresh noise every frame",
        ),
        float_param(
            "guidance",
            8.5,
            1.0,
            20.0,
            description="Guidance of LCM models with a guidance embedding (LCM_Dreamshaper); others ignore it",
        ),
        float_param(
            "similarity_threshold",
            0.98,
            0.0,
            1.0,
            description="Skip frames at least this similar to the last one processed; 0 = off",
        ),
        int_param(
            "resolution",
            0,
            0,
            1024,
            unit="px",
            description="Square output size, rounded to what the model takes (SD: a multiple of 64, at least 128); "
            "0 = the model's native size",
        ),
        string_param(
            "model",
            DEFAULT_MODEL,
            description="Hub id, local diffusers folder or .safetensors file (SD 1.5 / 2.1 / SDXL; "
            "an SDXL single file needs an SDXL config folder)",
        ),
        string_param("lora", "", description="LoRA fused into the model, e.g. latent-consistency/lcm-lora-sdv1-5"),
        string_param(
            "vae",
            DEFAULT_TINY_VAE,
            description="TAESD (AutoencoderTiny) id or folder in place of the model's VAE; empty = the model's",
        ),
        enum_param(
            "device",
            "auto",
            DEVICE_CHOICES,
            description="Where it runs (auto: what dreamdeck run --device chose, else CUDA, then MPS, then CPU)",
            in_presets=False,
        ),
        enum_param(
            "dtype",
            "auto",
            DTYPE_CHOICES,
            description="Precision (auto: what --dtype chose, else float16 on GPUs, float32 on CPU)",
            in_presets=False,
        ),
        enum_param(
            "accel",
            "auto",
            ACCEL_CHOICES,
            description="eager, compile (torch.compile, built in the background) or tensorrt (experimental, "
            "never run on a GPU yet); auto: what --accel chose, else compile on CUDA",
            in_presets=False,
        ),
        *(param for slot in range(1, LORA_SLOTS + 1) for param in _lora_slot_params(slot)),
        *(param for slot in range(1, CONTROLNET_SLOTS + 1) for param in _controlnet_slot_params(slot)),
        float_param("controlnets/canny_low", 100.0, 0.0, 1000.0, description="Canny edges' low threshold"),
        float_param("controlnets/canny_high", 200.0, 0.0, 1000.0, description="Canny edges' high threshold"),
        string_param(
            "controlnets/depth_model",
            DEFAULT_DEPTH_MODEL,
            description="The depth model of depth ControlNets (a transformers depth-estimation hub id or folder)",
        ),
        string_param(
            "style/adapter",
            "",
            description="IP-Adapter weights as hub-id/subfolder/file.safetensors, e.g. "
            "h94/IP-Adapter/models/ip-adapter_sd15.safetensors (its image encoder next to it); loaded with the "
            "model; empty = off",
        ),
        string_param("style/image", "", description="The style picture of the IP-Adapter: an image file"),
        float_param("style/scale", 0.6, 0.0, 2.0, description="How much of the style picture: 0 = none"),
        int_param(
            "controlnets/memory_mb",
            4000,
            0,
            100000,
            unit="MB",
            description="Memory the ControlNets and depth models may take together; a load past it is refused",
            in_presets=False,
        ),
        *timeline_params(),
    )

    def __init__(self, params: Any, torch: TorchDefaults | None = None) -> None:
        super().__init__(params, torch)
        self._model: Any = None
        self._stream: Any = None
        self._load_key: _LoadKey | None = None  # the last one asked for (loaded, loading or failed)
        self._active_key: _LoadKey | None = None  # the one playing
        self._stream_key: tuple[int, int] | None = None
        self._reload: BackgroundLoad | None = None  # a new (key, model, stream) on its way
        # live values that can be refused: each tried once per change, the last good one plays on
        # (parsed once per text, not per frame)
        self._prompts = LastGood("realtime: prompt refused, the last one plays on", _parse_prompt_pair)
        self._stream_shape = LastGood("realtime: stream refused, the last one plays on", self._rebuild_stream)
        self._strength = LastGood("realtime: strength refused, the last one plays on", self._set_strength)
        self._lora_files = LastGood("realtime: LoRA slots refused", self._request_lora_files)
        self._lora_bank: int | None = None  # id of the AdapterBank the files below were asked of
        self._lora_requested: dict[int, str] = {}
        self._first_frame_told: Any = None  # the stream whose first image has been logged
        self._controls: Any = None  # the ControlBank of the loaded model's UNet
        self._timeline = ScenePromptTimeline(self.name, params, self.path, check=refuse_negative_weights)
        self._prefetched: tuple[Any, ...] | None = None  # (bank, timeline, line): its window is encoding

    @property
    def first_frame_s(self) -> float | None:
        """The playing stream's time from loaded weights to its first diffused frame."""
        return self._stream.first_image_s if self._stream is not None else None

    # -- loader thread -------------------------------------------------------------------------
    def load(self) -> None:
        require_diffusion_extra(self.name)
        key = self._wanted_load_key()
        self._model, self._stream = self._build(key)
        self._load_key = self._active_key = key
        self._timeline.attach()

    def unload(self) -> None:
        self._timeline.detach()
        if self._stream is not None:
            self._stream.close()
            self._stream.adapters.close()
        if self._controls is not None:
            self._controls.close()
        self._model = self._stream = self._controls = None
        free_accelerator_memory()

    # -- worker thread ---------------------------------------------------------------------------
    def process(self, frame: np.ndarray | None, t: float) -> np.ndarray | None:
        if frame is None:
            return None
        self._take_reloaded_model()
        playing = self._timeline.playing(t)
        self._apply_params(playing)
        try:
            image = self._stream(frame)
        except Exception as exc:
            if is_out_of_memory(exc):  # give the memory back before the worker reports it
                free_accelerator_memory()
            raise
        stream = self._stream
        if image is not None and self._first_frame_told is not stream:
            self._tell_first_frame(stream)
        self.status = f"{stream.where} {accel_label(stream.accel_state)}" + (f", {playing.status}" if playing else "")
        self.backend = stream.accel
        self.warning = (
            stream.accel_error
            or stream.adapter_error
            or stream.control_error
            or (self._controls.error if self._controls is not None else None)
            or (stream.style.error if stream.style is not None else None)
            or self._lora_files.refusal
            or stream.prompts.error
            or self._prompts.refusal
            or self._timeline.refusal
            or self._stream_shape.refusal
            or self._strength.refusal
        )
        return image

    # -- internals ---------------------------------------------------------------------------------
    def _tell_first_frame(self, stream: Any) -> None:
        """One log line per stream: how long from loaded weights to the first diffused frame."""
        self._first_frame_told = stream
        log.info(
            "realtime: first diffused frame %.2f s after the weights loaded (%s, accel %s%s)",
            stream.first_image_s,
            stream.where,
            stream.accel,
            f", {stream.accel_requested} building in the background" if stream.accel != stream.accel_requested else "",
        )

    def _wanted_load_key(self) -> _LoadKey:
        return _LoadKey(
            model=self.param("model").strip() or DEFAULT_MODEL,
            lora=self.param("lora").strip(),
            vae=self.param("vae").strip(),
            device=self.param("device"),
            dtype=self.param("dtype"),
            accel=self.param("accel"),
            style_adapter=self.param("style/adapter").strip(),
        )

    def _wanted_stream_key(self) -> tuple[int, int]:
        return self.param("steps"), self.param("resolution")

    def _build(self, key: _LoadKey, bank: Any = None, model: Any = None, adapters: Any = None) -> tuple[Any, Any]:
        """(model, stream): loads the model unless given; raises ModelNotFound, OutOfMemoryError, ValueError.

        ``adapters``: the LoRA slots of the given model (a new model gets empty ones)."""
        from engine.diffusion.accel import choose_accelerator
        from engine.diffusion.device import choose_device
        from engine.diffusion.loading import ModelSpec, load_model
        from engine.diffusion.lora import AdapterBank
        from engine.diffusion.stream import LiveSettings, StreamConfig, StreamImg2Img

        chosen = self.torch.pick(key.device, key.dtype, key.accel)  # the scene's own choice wins over the show's
        choice = choose_device(chosen.device, chosen.dtype)
        if choice.device.type == "cpu":
            reserve_render_core()  # a CPU UNet would otherwise take the core the render loop needs
        try:
            if model is None:
                started = time.monotonic()
                model = load_model(ModelSpec(model=key.model, lora=key.lora, tiny_vae=key.vae), choice)
                log.info("realtime: %s loaded in %.1f s", key.model, time.monotonic() - started)
            style = self._style_of(model, key, choice)
            adapters = adapters if adapters is not None else AdapterBank(model.unet)
            steps, resolution = self._wanted_stream_key()
            stream = StreamImg2Img(
                model,
                choice,
                StreamConfig(size=(resolution, resolution) if resolution else None, steps=steps),
                LiveSettings(
                    strength=self.param("strength"),
                    seed=self.param("seed"),
                    noise_drift=self.param("noise_drift"),
                    guidance_scale=self.param("guidance"),
                    similarity_threshold=self.param("similarity_threshold"),
                ),
                prompts=self._weighted_prompts() or [("", 1.0)],
                accelerator=choose_accelerator(chosen.accel, choice.device),
                bank=bank,
                adapters=adapters,
                controls=self._controls.units() if self._controls is not None and model is self._model else (),
                style=style,
            )
            stream.prompts.wait()
        except Exception as exc:
            if is_out_of_memory(exc):
                model = None
                free_accelerator_memory()
            raise
        self._stream_key = (steps, resolution)
        log.info(
            "realtime: %s on %s, %dx%d, %d step(s), accel %s",
            key.model,
            stream.where,
            stream.size[1],
            stream.size[0],
            steps,
            stream.accel_requested,
        )
        return model, stream

    def _weighted_prompts(self, playing: Playing | None = None) -> list[tuple[str, float]] | None:
        """``prompt`` (or the timeline's two lines, blended) and ``prompt_b``, each in the weighted
        syntax (``a forest:1|fog:0.5``), mixed by ``prompt_mix``; text that cannot be read is
        refused (said once, and in the HUD) and the last good text plays on; None while no text
        has been good yet."""
        parsed = self._prompts.update((self.param("prompt"), self.param("prompt_b")))
        if parsed is None and playing is None:
            return None
        first, second = parsed if parsed is not None else ([], [])
        if playing is not None:
            prompts = weighted_mix(playing.line_a.prompts, playing.line_b.prompts, playing.moment.blend)
        else:
            prompts = [(p.text, p.weight) for p in first]
        if not second:
            return prompts
        mix = self.param("prompt_mix")
        return [(text, weight * (1.0 - mix)) for text, weight in prompts] + [(p.text, p.weight * mix) for p in second]

    def _prefetch(self, stream: Any, playing: Playing | None) -> None:
        """The playing line, the next and the one after encoded ahead, in the background: the
        frame that first needs one blends it on the spot."""
        if playing is None:
            return
        key = (id(stream.prompts), playing.timeline, playing.moment.a)
        if key == self._prefetched:
            return
        self._prefetched = key
        lines = playing.timeline.lines
        window = [lines[(playing.moment.a + step) % len(lines)] for step in range(3)]
        stream.prompts.prefetch([p.text for line in window for p in line.prompts])

    def _apply_params(self, playing: Playing | None = None) -> None:
        key = self._wanted_load_key()
        if key != self._load_key and self._reload is None:
            self._start_reload(key)
        # a refused stream is tried again when the steps, the resolution, the strength or the
        # playing stream change
        self._stream_shape.update((self._wanted_stream_key(), self.param("strength"), self._stream_key))
        stream = self._stream
        self._apply_lora_slots(stream)
        self._apply_controlnet_slots(stream)
        self._apply_style(stream)
        self._prefetch(stream, playing)
        prompts = self._weighted_prompts(playing)
        if prompts is not None:
            stream.set_prompts(prompts)
        stream.set_seed(self.param("seed"))
        stream.set_noise_drift(self.param("noise_drift"))
        stream.set_guidance_scale(self.param("guidance"))
        stream.set_similarity_threshold(self.param("similarity_threshold"))
        # id: a new stream is tried afresh, without holding the old one (and its memory) here
        self._strength.update((id(stream), self.param("strength")))

    def _rebuild_stream(self, attempt: tuple[tuple[int, int], float, tuple[int, int] | None]) -> None:
        """A stream of the wanted steps and resolution around the loaded model, unless it plays already;
        ValueError (e.g. a strength too low for that many steps) leaves the old stream playing."""
        wanted, _, playing = attempt
        if wanted == playing:
            return
        old = self._stream
        try:
            self._model, self._stream = self._build(
                self._active_key, bank=old.prompts, model=self._model, adapters=old.adapters
            )
        except ValueError as exc:
            raise ValueError(f"steps {wanted[0]}, resolution {wanted[1]}: {exc}") from exc

    def _set_strength(self, attempt: tuple[int, float]) -> None:
        stream, strength = self._stream, attempt[1]
        try:
            stream.set_strength(strength)
        except ValueError as exc:
            raise ValueError(f"{exc}; keeping {stream.settings.strength:.3g}") from exc

    def _apply_lora_slots(self, stream: Any) -> None:
        """Ask for changed slot files (read in the background) and pass the weights on; the stream
        applies both before its next frame."""
        files = tuple(self.param(f"loras/{slot}/file").strip() for slot in range(1, LORA_SLOTS + 1))
        # a new model (a new AdapterBank) starts with empty slots: its files are asked for again
        self._lora_files.update((id(stream.adapters), stream.accel_requested, files))
        if stream.accel_requested == "tensorrt":
            return
        for slot in range(1, LORA_SLOTS + 1):
            stream.adapters.set_weight(slot, self.param(f"loras/{slot}/weight"))

    def _style_of(self, model: Any, key: _LoadKey, choice: Any) -> Any:
        """The model's StyleBank: the IP-Adapter loaded into it the first time (raises ModelNotFound)."""
        if not key.style_adapter:
            return None
        bank = getattr(model, "style_bank", None)
        if bank is None:
            from engine.diffusion.ip_adapter import load_ip_adapter

            bank = model.style_bank = load_ip_adapter(model, key.style_adapter, choice)
        return bank

    def _apply_style(self, stream: Any) -> None:
        bank = stream.style
        if bank is None:
            return
        image = self.param("style/image").strip()
        if image:
            bank.request(image)
        bank.scale.set(self.param("style/scale") if image else 0.0)

    def _apply_controlnet_slots(self, stream: Any) -> None:
        """Ask for changed ControlNet slots (loaded in the background) and pass the scales on; a new
        model gets a new bank (its slots asked for again)."""
        from engine.diffusion.controlnet import ControlBank, ControlSpec

        if self._controls is None or self._controls.unet is not self._model.unet:
            if self._controls is not None:
                self._controls.close()
            self._controls = ControlBank(
                self._model.unet, stream.choice.device, stream.choice.dtype, self.param("controlnets/memory_mb")
            )
        bank = self._controls
        bank.budget_mb = self.param("controlnets/memory_mb")
        bank.canny.low, bank.canny.high = self.param("controlnets/canny_low"), self.param("controlnets/canny_high")
        scales = {}
        for slot in range(1, CONTROLNET_SLOTS + 1):
            prefix = f"controlnets/{slot}/"
            bank.request(
                slot,
                ControlSpec(
                    self.param(prefix + "model").strip(),
                    self.param(prefix + "type"),
                    self.param(prefix + "image").strip(),
                    self.param("controlnets/depth_model").strip() or DEFAULT_DEPTH_MODEL,
                ),
            )
            scales[slot] = (self.param(prefix + "scale"), self.param(prefix + "start"), self.param(prefix + "end"))
        bank.apply(stream, scales)

    def _request_lora_files(self, attempt: tuple[int, str, tuple[str, ...]]) -> None:
        bank, accel, files = attempt
        stream = self._stream
        if bank != self._lora_bank:  # a new model: its slots start empty
            self._lora_bank, self._lora_requested = bank, {}
        if accel == "tensorrt":
            if any(files):
                raise ValueError(
                    "they do not reach a TensorRT engine (its weights are built in); use accel compile or eager"
                )
            return
        for slot, source in enumerate(files, start=1):
            if source != self._lora_requested.get(slot, ""):
                self._lora_requested[slot] = source
                stream.adapters.request(slot, source)

    def _start_reload(self, key: _LoadKey) -> None:
        """A new model on a background thread; the current one plays until it is ready."""
        self._load_key = key  # a failed key is not retried until the parameters change again
        self._reload = BackgroundLoad(f"realtime {key.model}", lambda: (key, *self._build(key)))

    def _take_reloaded_model(self) -> None:
        if self._reload is None or not self._reload.done:
            return
        reload, self._reload = self._reload, None
        reloaded = reload.take()  # a failed load raises here: the worker reports it, the old model plays on
        if reloaded is not None:
            old = self._stream
            self._active_key, self._model, self._stream = reloaded  # (a new bank of ControlNets follows)
            old.close()
            old.adapters.close()
            free_accelerator_memory()
