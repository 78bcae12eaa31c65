"""The VQGAN+CLIP scene: an image that keeps optimising itself toward the prompts, a frame per step.

Slow and generative: every ``process`` call is one Adam step of ``engine.vqclip`` (the source
frame is used only to start from, with ``init`` = camera). Everything heavy is imported in
``load``: importing this module (to list scenes, print parameters) needs no torch.

- ``load`` (loader thread) loads the VQGAN checkpoint and CLIP; a missing one raises
  ``ModelNotFound`` in one line, and the app plays the ``fallback`` scene (ddpm) instead.
- ``process`` (worker thread) applies the live parameters, then steps. Prompts, ``lr`` and
  ``step_rate`` steer the running optimisation; ``size`` resizes the latent and carries on;
  ``restart``, ``seed``, ``init`` and ``cutouts`` start over from noise or the newest frame.
  A prompt string that does not parse is logged once and the last good prompts stay.
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

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # engine.vqclip.clip.DEFAULT_CLIP (not imported: it needs torch)
MAX_EMBEDDINGS = 4096  # text embeddings kept for the timeline (a few kB each)


class VqganClipScene(Scene):
    name = "vqgan_clip"
    order = 50
    description = "VQGAN+CLIP: a latent optimised toward weighted text prompts, every step a frame"
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
        int_param(
            "size",
            256,
            16,
            1024,
            unit="px",
            description="Square image size (a multiple of 16 for f16 VQGANs); a change resizes the latent",
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
        self._autocast: Any = None
        self._restart = threading.Event()  # set by the render thread when the restart trigger fires

    # -- loader thread -------------------------------------------------------------------------
    def load(self) -> None:
        require_diffusion_extra(self.name)
        import torch

        from engine.diffusion.device import choose_device
        from engine.vqclip.clip import load_clip
        from engine.vqclip.vqgan import default_vqgan_path, load_vqgan

        choice = choose_device(self.torch.device, self.torch.dtype)
        vqgan = load_vqgan(self.param("vqgan").strip() or default_vqgan_path())
        clip = load_clip(self.param("clip"))
        if choice.device.type == "cpu":
            reserve_render_core()
        else:  # half-precision forward passes; z and Adam stay float32
            self._autocast = torch.bfloat16 if choice.is_cuda and torch.cuda.is_bf16_supported() else torch.float16
        self._vqgan, self._clip = vqgan.to(choice.device), clip.to(choice.device)
        self._update_prompts()
        # a trigger is true for one render frame only, shorter than a step: catch it as it lands
        self.params.add_listener(self._on_change)
        self._timeline.attach()

    def unload(self) -> None:
        self.params.remove_listener(self._on_change)
        self._timeline.detach()
        self._vqgan = self._clip = self._run = None
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
        self.warning = self._prompts.refusal or self._timeline.refusal
        restart_key = (self.param("init"), self.param("cutouts"), self.param("seed"))
        if self._run is None or self._restart.is_set() or restart_key != self._restart_key:
            self._restart.clear()
            self._start(frame, restart_key)
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
        self._run = VqganClip(
            self._vqgan,
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
        self._steering = self._run.prompts

    def _update_prompts(self) -> None:
        """Parse the prompt params when they change; a bad one is logged once, the last good ones stay."""
        self._prompts.update((self.param("prompt"), self.param("negative_prompt")))
        self.warning = self._prompts.refusal

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
