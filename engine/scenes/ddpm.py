"""The DDPM scene: an unconditional diffusion model dreams on stage, one reverse step per frame.

Every frame is the next x_t of the reverse process (Ho et al. 2020), so the audience sees
noise settle into an image; then the image holds, and the next one starts from fresh noise
(a new seed each time). In ``sdedit`` mode the camera frame is noised part of the way and
denoised from there (Meng et al. 2022): the model redraws the camera in its own style.

The default model is the texture DDPM the project trains itself (``scripts/train_ddpm.py``,
shipped in ``engine/models/ddpm-textures``), so the scene plays offline on a fresh machine;
any diffusers ``UNet2DModel`` DDPM works too (``google/ddpm-church-256``...). A model change
loads on a background thread while the current one plays; a missing model is reported once
(``ModelNotFound``) and the current one plays on. Everything else applies at the next image,
except ``step_rate`` and ``show``, which apply at once.

Importing this module needs no torch (the catalog lists scenes without it).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from engine.diffusion.options import TorchDefaults
from engine.params import enum_param, float_param, int_param, string_param
from engine.scenes.base import (
    BackgroundLoad,
    Scene,
    SceneNeeds,
    free_accelerator_memory,
    require_diffusion_extra,
    reserve_render_core,
)

log = logging.getLogger(__name__)


class DdpmScene(Scene):
    name = "ddpm"
    order = 40
    description = "An unconditional DDPM denoising live, noise to image, one step per frame (or SDEdit of the camera)"
    realtime = False  # slower than the display: the compositor holds and morphs its last image
    uses_input = False  # it steps every time; the camera frame only matters in sdedit mode
    # a 256x256 google/ddpm-* UNet in float16 with its activations
    needs = SceneNeeds(
        accelerator_mb=600,
        imports=("torch", "diffusers:UNet2DModel", "diffusers:DDPMScheduler", "diffusers:DDIMScheduler"),
    )
    PARAMS = (
        string_param(
            "model",
            "",
            description="Hub id (google/ddpm-church-256) or local diffusers folder (unet/ + scheduler/); "
            "empty = the shipped texture model",
        ),
        enum_param(
            "scheduler",
            "ddim",
            ("ddim", "ddpm"),
            description="ddim: deterministic, crisp and colourful; ddpm: stochastic (fresh noise every step), softer",
        ),
        int_param("steps", 50, 2, 1000, description="Reverse steps per image (noise to image)"),
        float_param(
            "step_rate",
            12.0,
            0.5,
            120.0,
            unit="steps/s",
            description="Reverse steps shown per second (at most: a slow machine shows fewer)",
        ),
        enum_param(
            "mode",
            "noise",
            ("noise", "sdedit"),
            description="noise: each image from pure noise; sdedit: from the camera frame, noised part way",
        ),
        float_param(
            "sdedit_strength",
            0.5,
            0.02,
            1.0,
            description="sdedit: how far into the noise the camera frame goes (0 = kept, 1 = pure noise)",
        ),
        int_param("seed", 0, 0, 2**31 - 1, description="The noise of the first image; image n uses seed + n"),
        float_param("hold", 2.0, 0.0, 60.0, unit="s", description="How long a finished image stays"),
        enum_param(
            "show",
            "x_t",
            ("x_t", "x0"),
            description="x_t: the noisy state itself; x0: the model's current guess of the finished image",
        ),
    )

    def __init__(self, params: Any, torch: TorchDefaults | None = None) -> None:
        super().__init__(params, torch)
        self.max_fps = float(self.param("step_rate"))  # the worker paces this scene by it
        self._model: Any = None
        self._device: Any = None
        self._dtype: Any = None
        self._model_name: str | None = None  # the one asked for last (playing, loading or failed)
        self._reload: BackgroundLoad | None = None  # a new model on its way
        self._reverse: Any = None  # the ReverseProcess of the image on its way
        self._images = 0  # images started, for the seed
        self._hold_until = 0.0
        self._sdedit_without_frame = False  # said once

    # -- loader thread -----------------------------------------------------------------------
    def load(self) -> None:
        require_diffusion_extra(self.name)
        from engine.diffusion.device import choose_device

        choice = choose_device(self.torch.device, self.torch.dtype)  # --device / --dtype, else the machine's best
        self._device, self._dtype = choice.device, choice.dtype
        if choice.device.type == "cpu":
            reserve_render_core()
        self._model_name = self._wanted_model()
        self._model = self._load(self._model_name)

    def unload(self) -> None:
        self._model = self._reverse = self._reload = None
        free_accelerator_memory()

    # -- worker thread -------------------------------------------------------------------------
    def process(self, frame: np.ndarray | None, t: float) -> np.ndarray | None:
        """One reverse step of the image on its way -> RGB uint8; None while a finished image holds."""
        from engine.ddpm.reverse import tensor_to_images

        self.max_fps = float(self.param("step_rate"))
        self._take_reloaded_model()
        self._start_reload_if_changed()
        # 1. a finished image holds; then the next one starts with the parameters as they are now
        if self._reverse is None:
            if t < self._hold_until:
                return None
            self._reverse = self._start_image(frame)
        # 2. exactly one denoising step
        step = next(self._reverse)
        if step.index >= step.total:
            self._reverse = None
            self._hold_until = t + float(self.param("hold"))
        shown = step.x0 if self.param("show") == "x0" else step.x_t
        return tensor_to_images(shown)[0]

    # -- internals ---------------------------------------------------------------------------------
    def _wanted_model(self) -> str:
        return self.param("model").strip()

    def _load(self, name: str) -> Any:
        from engine.ddpm.model import load_ddpm

        return load_ddpm(name, device=self._device, dtype=self._dtype)

    def _start_image(self, frame: np.ndarray | None) -> Any:
        from engine.ddpm.reverse import ReverseConfig, ReverseProcess, image_to_tensor

        model = self._model
        init, strength = None, 1.0
        if self.param("mode") == "sdedit":
            if frame is not None:
                init = image_to_tensor(frame, model.size, model.device, model.dtype)
                strength = float(self.param("sdedit_strength"))
                self._sdedit_without_frame = False
            elif not self._sdedit_without_frame:  # named policy: no camera yet -> dream from noise
                self._sdedit_without_frame = True
                log.warning("ddpm: sdedit has no source frame yet; starting from pure noise")
        # a schedule of fewer training timesteps than asked-for steps: as many as it has
        steps = min(int(self.param("steps")), int(model.schedule.get("num_train_timesteps", 1000)))
        config = ReverseConfig(
            scheduler=self.param("scheduler"),
            steps=steps,
            strength=strength,
            seed=(int(self.param("seed")) + self._images) % 2**31,
        )
        self._images += 1
        return ReverseProcess(model, config, init=init)

    def _start_reload_if_changed(self) -> None:
        """A new model on a background thread; the current one plays until it is ready."""
        name = self._wanted_model()
        if name == self._model_name or self._reload is not None:
            return
        self._model_name = name  # a failed name is not retried until the parameter changes again
        self._reload = BackgroundLoad(f"ddpm {name or 'textures'}", lambda: self._load(name))

    def _take_reloaded_model(self) -> None:
        if self._reload is None or not self._reload.done:
            return
        reload, self._reload = self._reload, None
        self._model = reload.take()  # a failed load raises here: the worker reports it, the old model plays on
        self._reverse = None  # the next image starts at once, from the new model
        self._hold_until = 0.0
