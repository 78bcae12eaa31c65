"""The CLIP-guided scene: a picture that keeps optimising itself toward the prompts, a frame per step.

Slow and generative: every ``process`` call is one Adam step of ``engine.vqclip`` (the source
frame is used only to start from, with ``init`` = camera). Everything heavy is imported in
``load``: importing this module (to list scenes, print parameters) needs no torch.

What is optimised is the ``drawer`` (``engine.vqclip.drawers``): ``vqgan`` (a VQGAN latent,
the classic loop), ``pixel`` (a grid of flat colours: pixel art) or ``fft`` (a Fourier
spectrum: Aphantasia). Only ``vqgan`` needs a checkpoint; the others play with CLIP alone.

- ``load`` (loader thread) loads CLIP, and the VQGAN checkpoint when the drawer is ``vqgan``;
  a missing one raises ``ModelNotFound`` in one line, and the app plays the ``fallback``
  scene (ddpm) instead.
- ``process`` (worker thread) applies the live parameters, then steps. Prompts, ``lr`` and
  ``step_rate`` steer the running optimisation; ``size`` resizes the picture and carries on;
  a drawer change (or a change of its own parameters) builds the new drawer from the current
  picture and carries on with the same prompts; a drawer that cannot be had (``vqgan`` without
  its checkpoint) is said once and the last one plays on. ``restart``, ``seed``, ``init`` and
  ``cutouts`` start over from noise or the newest frame. A prompt string that does not parse
  is logged once and the last good prompts stay.
- ``timeline/*`` plays a prompt timeline (``engine.prompt_timeline``) in place of ``prompt``:
  each line's text is encoded once, and every step the targets are the slerp of the two
  lines' embeddings at that moment (``VqganClip.set_targets``), so the image morphs from
  look to look; ``negative_prompt`` still pushes away throughout.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from engine.diffusion.options import TorchDefaults
from engine.params import enum_param, float_param, int_param, string_param, trigger_param
from engine.prompt_syntax import WeightedPrompt
from engine.prompt_timeline import Playing, ScenePromptTimeline, blend_targets, timeline_params
from engine.scenes.base import (
    LastGood,
    Scene,
    SceneNeeds,
    free_accelerator_memory,
    require_diffusion_extra,
    reserve_render_core,
)

log = logging.getLogger(__name__)

DRAWERS = ("vqgan", "pixel", "fft")  # engine.vqclip.drawers.DRAWERS (not imported: it needs torch)
DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # engine.vqclip.clip.DEFAULT_CLIP (not imported: it needs torch)
MAX_EMBEDDINGS = 4096  # text embeddings kept for the timeline (a few kB each)


class VqganClipScene(Scene):
    name = "vqgan_clip"
    order = 50
    description = "CLIP-guided drawing (VQGAN, pixel grid or Fourier spectrum) toward text prompts, a frame a step"
    realtime = False
    uses_input = False
    fallback = "ddpm"
    needs = SceneNeeds(
        accelerator_mb=4000,
        models=("vqgan_imagenet_f16_16384", DEFAULT_CLIP),
        imports=("torch", "diffusers:VQModel", "transformers:CLIPModel", "transformers:CLIPTokenizer"),
    )
    PARAMS = (
        string_param(
            "prompt",
            "a lighthouse in a storm, oil painting:1|trending on artstation:0.3",
            description="What the image moves toward: text[:weight] parts separated by '|'",
        ),
        string_param(
            "negative_prompt", "", description="What it moves away from, same syntax; weights count as negative"
        ),
        string_param(
            "vqgan",
            "",
            description="taming VQGAN: a .ckpt with its .yaml beside it, or a folder with "
            "model.ckpt + model.yaml (empty: ~/.cache/dreamdeck/"
            "vqgan_imagenet_f16_16384)",
        ),
        string_param("clip", DEFAULT_CLIP, description="CLIP in transformers format: hub id or local folder"),
        enum_param(
            "drawer",
            "vqgan",
            DRAWERS,
            description="What CLIP steers: a VQGAN latent, a grid of flat pixels (pixel art) or a "
            "Fourier spectrum (fft, Aphantasia); pixel and fft need no VQGAN. A change keeps the picture",
        ),
        int_param("cells_x", 32, 2, 256, description="pixel drawer: cells across"),
        int_param("cells_y", 32, 2, 256, description="pixel drawer: cells down"),
        int_param("palette", 16, 0, 256, description="pixel drawer: colours it may use (0: any colour per cell)"),
        float_param(
            "decay",
            1.0,
            0.0,
            3.0,
            description="fft drawer: the spectrum falls as 1/f^decay (1: natural-image statistics; more: smoother)",
        ),
        int_param(
            "size",
            256,
            16,
            1024,
            unit="px",
            description="Square image size (vqgan: a multiple of 16 for f16 VQGANs; pixel: a multiple of the "
            "cells); a change resizes the picture",
        ),
        enum_param(
            "init",
            "noise",
            ("noise", "camera"),
            description="Start from random codes or from the newest source frame (at restart)",
        ),
        trigger_param("restart", description="Start over from init"),
        float_param("lr", 0.1, 0.001, 1.0, description="Adam step size: how fast the image changes"),
        int_param(
            "cutouts", 32, 1, 128, description="Random crops CLIP sees per step: more = steadier, slower (restarts)"
        ),
        int_param("seed", 0, 0, 2**31 - 1, description="Noise init and crop randomness (restarts)"),
        float_param(
            "step_rate",
            30.0,
            0.1,
            60.0,
            unit="steps/s",
            description="At most this many optimisation steps (frames) a second",
        ),
        *timeline_params(),
    )

    def __init__(self, params: Any, torch: TorchDefaults | None = None) -> None:
        super().__init__(params, torch)
        self._vqgan: Any = None
        self._clip: Any = None
        self._run: Any = None  # engine.vqclip.optimise.VqganClip
        # (prompt, negative_prompt) parsed once per change; a bad one is said once, the last good ones stay
        self._prompts = LastGood(
            "vqgan_clip: prompt refused, the last good prompts stay", self._parse_prompts, initial=([], [])
        )
        self._timeline = ScenePromptTimeline(self.name, params, self.path)
        self._embeddings: dict[str, Any] = {}  # text -> its CLIP embedding (D,), for the timeline's blends
        self._encoded_for: Any = None  # the timeline whose texts are all in _embeddings
        self._steering: Any = None  # what the run's targets are now: prompts (a list) or "timeline"
        self._restart_key: tuple[Any, ...] | None = None
        # the drawer's key (name and its own params) applied when it changes; one that fails is said once
        self._drawer = LastGood("vqgan_clip: drawer refused, the last one plays on", self._switch_drawer)
        self._drawer_now: tuple[Any, ...] | None = None  # the key of the running drawer
        self._device: Any = None
        self._autocast: Any = None
        self._restart = threading.Event()  # set by the render thread when the restart trigger fires

    # -- loader thread -------------------------------------------------------------------------
    def load(self) -> None:
        require_diffusion_extra(self.name)
        import torch

        from engine.diffusion.device import choose_device
        from engine.vqclip.clip import load_clip

        choice = choose_device(self.torch.device, self.torch.dtype)
        self._device = choice.device
        if self.param("drawer") == "vqgan":  # the others need no checkpoint: a missing one does not stop them
            self._load_vqgan()
        clip = load_clip(self.param("clip"))
        if choice.device.type == "cpu":
            reserve_render_core()
        else:  # half-precision forward passes; the drawer's parameters and Adam stay float32
            self._autocast = torch.bfloat16 if choice.is_cuda and torch.cuda.is_bf16_supported() else torch.float16
        self._clip = clip.to(choice.device)
        self._update_prompts()
        # a trigger is true for one render frame only, shorter than a step: catch it as it lands
        self.params.add_listener(self._on_change)
        self._timeline.attach()

    def unload(self) -> None:
        self.params.remove_listener(self._on_change)
        self._timeline.detach()
        self._vqgan = self._clip = self._run = self._drawer_now = None
        self._drawer = LastGood("vqgan_clip: drawer refused, the last one plays on", self._switch_drawer)
        self._embeddings.clear()
        self._encoded_for = None
        free_accelerator_memory()

    def _on_change(self, change: Any) -> None:
        """Registry listener (render thread): the restart trigger sets a flag the worker reads."""
        if change.path == self.path("restart"):
            self._restart.set()

    # -- worker thread ---------------------------------------------------------------------------
    def process(self, frame: np.ndarray | None, t: float) -> np.ndarray | None:
        self.max_fps = self.param("step_rate")  # the worker paces by it
        self._update_prompts()
        playing = self._timeline.playing(t)
        restart_key = (self.param("init"), self.param("cutouts"), self.param("seed"))
        if self._run is None or self._restart.is_set() or restart_key != self._restart_key:
            self._restart.clear()
            self._start(frame, restart_key)
        self._drawer.update(self._drawer_key())
        self.warning = self._prompts.refusal or self._timeline.refusal or self._drawer.refusal
        run = self._run
        self._steer(run, playing)
        if self.param("size") != run.size:
            run.resize(self.param("size"))
        run.set_lr(self.param("lr"))
        return run.step()

    # -- internals ---------------------------------------------------------------------------------
    def _start(self, frame: np.ndarray | None, key: tuple[Any, ...]) -> None:
        from engine.vqclip.optimise import Cutouts, VqganClip

        init, cutouts, seed = key
        if init == "camera" and frame is None:
            log.info("vqgan_clip: init camera but no source frame yet; starting from noise")
        drawer_key = self._drawer.value or self._drawer_key()  # a refused drawer stays refused at a restart
        self._run = VqganClip(
            self._build_drawer(drawer_key),
            self._clip,
            self._plain_prompts(),
            size=self.param("size"),
            init=frame if init == "camera" else None,
            lr=self.param("lr"),
            cutouts=Cutouts(count=cutouts),
            seed=seed,
            autocast=self._autocast,
        )
        self._restart_key = key
        self._drawer_now = drawer_key
        self._steering = self._run.prompts

    def _drawer_key(self) -> tuple[Any, ...]:
        """The drawer and the parameters it is built from (the others it ignores)."""
        name = self.param("drawer")
        if name == "pixel":
            return (name, self.param("cells_x"), self.param("cells_y"), self.param("palette"))
        if name == "fft":
            return (name, self.param("decay"))
        return (name,)

    def _build_drawer(self, key: tuple[Any, ...]) -> Any:
        from engine.vqclip.drawers import FftDrawer, PixelDrawer, VqganDrawer

        size, seed = self.param("size"), self.param("seed")
        if key[0] == "pixel":
            return PixelDrawer(*key[1:], size=size, seed=seed, device=self._device)
        if key[0] == "fft":
            return FftDrawer(size, decay=key[1], seed=seed, device=self._device)
        return VqganDrawer(self._load_vqgan(), size, seed)

    def _switch_drawer(self, key: tuple[Any, ...]) -> tuple[Any, ...]:
        """LastGood's apply: a new drawer, started from the current picture. One that cannot be
        built (the VQGAN checkpoint missing or broken) is refused: the running one plays on."""
        if key != self._drawer_now:
            try:
                drawer = self._build_drawer(key)
            except (LookupError, OSError, ValueError) as exc:  # ModelNotFound is a LookupError
                raise ValueError(str(exc)) from exc
            self._run.set_drawer(drawer)
            self._drawer_now = key
            log.info("vqgan_clip: drawing with %s now, from the picture so far", key[0])
        return key

    def _load_vqgan(self) -> Any:
        """The VQGAN, loaded the first time a drawer needs it (at load, or at a switch to ``vqgan``)."""
        if self._vqgan is None:
            from engine.vqclip.vqgan import default_vqgan_path, load_vqgan

            self._vqgan = load_vqgan(self.param("vqgan").strip() or default_vqgan_path()).to(self._device)
        return self._vqgan

    def _update_prompts(self) -> None:
        """Parse the prompt params when they change; a bad one is logged once, the last good ones stay."""
        self._prompts.update((self.param("prompt"), self.param("negative_prompt")))
        self.warning = self._prompts.refusal or self._drawer.refusal

    def _parse_prompts(self, text: tuple[str, str]) -> tuple[list[WeightedPrompt], list[WeightedPrompt]]:
        from engine.prompt_syntax import parse_prompts

        return parse_prompts(text[0]), parse_prompts(text[1], negative=True)

    def _plain_prompts(self) -> list[WeightedPrompt]:
        prompts, negative = self._prompts.value
        return prompts + negative

    def _steer(self, run: Any, playing: Playing | None) -> None:
        """The run's targets for this step: the prompts (encoded when they change) or the timeline's blend."""
        if playing is None:
            self.status = ""
            prompts = self._plain_prompts()
            if self._steering != prompts:
                run.set_prompts(prompts)
                self._steering = prompts
            return
        self.status = playing.status
        negative = self._prompts.value[1]
        targets, weights = self.timeline_targets(playing, negative)
        run.set_targets([*playing.line_a.prompts, *playing.line_b.prompts, *negative], targets, weights)
        self._steering = "timeline"

    def timeline_targets(self, playing: Playing, negative: list[WeightedPrompt]) -> tuple[Any, Any]:
        """((N, D) text embeddings, (N,) weights) at the timeline's moment: the two lines blended."""
        lines = (list(playing.line_a.prompts) + negative, list(playing.line_b.prompts) + negative)
        if playing.timeline is not self._encoded_for:  # a new timeline: all its lines at once
            self._encoded_for = playing.timeline
            self._encode(playing.timeline.texts())
        self._encode([p.text for line in lines for p in line])  # a new negative prompt (or a huge timeline)
        a, b = ([(self._embeddings[p.text], p.weight) for p in line] for line in lines)
        return blend_targets(a, b, playing.moment.blend)

    def _encode(self, texts: list[str]) -> None:
        """The texts not encoded yet, in batches (the tokenizer pads every text to the same length)."""
        texts = [text for text in dict.fromkeys(texts) if text not in self._embeddings][:MAX_EMBEDDINGS]
        if len(self._embeddings) + len(texts) > MAX_EMBEDDINGS:
            self._embeddings.clear()
        for start in range(0, len(texts), 64):
            batch = texts[start : start + 64]
            self._embeddings.update(zip(batch, self._clip.encode_text(batch)))
