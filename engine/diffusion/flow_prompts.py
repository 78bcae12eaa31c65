"""Prompt embeddings of a flow model (T5 + CLIP, Gemma), encoded off the frame path by its own pipeline.

What each model's transformer reads is what its pipeline's ``encode_prompt`` computes (FLUX:
T5 tokens and pooled CLIP; SD3: CLIP-L + CLIP-G + T5 tokens and pooled CLIPs; SANA-Sprint:
Gemma tokens with its mask and "complex human instruction"), so that is what is called: on
the ``PromptBank``'s one background thread, once per text, cached, blended by slerp and
published with one assignment, as for the UNet models (``prompts.py``).

The big text encoders (T5-XXL is 9.5 GB in bf16) need not stay on the GPU: with
``offload=True`` they live on the CPU and come to the GPU only while a new text encodes.
A model without a text encoder it needs raises ``MissingTextEncoder`` naming it.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any

import torch

from engine.diffusion.device import DeviceChoice
from engine.diffusion.flow import FlowKind, FlowText
from engine.diffusion.prompts import WeightedPrompts, normalise, slerp

log = logging.getLogger(__name__)

# the text encoders each family needs (SD3's T5 may be left out: its pipeline pads with zeros)
NEEDED_ENCODERS: dict[FlowKind, tuple[str, ...]] = {
    "flux": ("text_encoder", "text_encoder_2"),
    "sd3": ("text_encoder", "text_encoder_2"),
    "sana_sprint": ("text_encoder",),
}
MAX_SEQUENCE_LENGTH: dict[FlowKind, int] = {"flux": 256, "sd3": 256, "sana_sprint": 300}  # FLUX-schnell: 256


class MissingTextEncoder(LookupError):
    """The model was loaded without a text encoder its prompts need."""


def text_encoders(pipe: Any) -> list[Any]:
    return [
        module
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
        if (module := getattr(pipe, name, None)) is not None
    ]


def check_text_encoders(kind: FlowKind, pipe: Any, source: str) -> None:
    missing = [name for name in NEEDED_ENCODERS[kind] if getattr(pipe, name, None) is None]
    if missing:
        raise MissingTextEncoder(
            f"{source} has no {', '.join(missing)}: its prompts cannot be encoded. Load the full diffusers "
            "folder or hub id (a single-file checkpoint takes its text encoders from its config folder)"
        )


def sana_instruction() -> list[str]:
    """SANA-Sprint's default "complex human instruction", as its pipeline's ``__call__`` has it."""
    from diffusers import SanaSprintImg2ImgPipeline

    default = inspect.signature(SanaSprintImg2ImgPipeline.__call__).parameters["complex_human_instruction"].default
    return list(default)


def encode_with_pipeline(
    kind: FlowKind, pipe: Any, text: str, device: torch.device, max_sequence_length: int
) -> FlowText:
    """One text as the pipeline encodes it (batch 1, no negative prompt: distilled, guidance-free models)."""
    with torch.inference_mode():
        if kind == "flux":
            embeds, pooled, _ = pipe.encode_prompt(
                text, prompt_2=None, device=device, max_sequence_length=max_sequence_length
            )
            return FlowText(embeds, pooled, None)
        if kind == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(
                text,
                prompt_2=None,
                prompt_3=None,
                device=device,
                do_classifier_free_guidance=False,
                max_sequence_length=max_sequence_length,
            )
            return FlowText(embeds, pooled, None)
        embeds, mask = pipe.encode_prompt(
            text,
            device=device,
            complex_human_instruction=sana_instruction(),
            max_sequence_length=max_sequence_length,
        )
        return FlowText(embeds, None, mask)


def blend_texts(parts: Sequence[tuple[FlowText, float]]) -> FlowText:
    """Weighted texts as one: each part slerped as ``prompts.blend`` does; masks united."""
    result, total = parts[0][0], parts[0][1]
    for text, weight in parts[1:]:
        total += weight
        share = weight / total
        pooled = None if result.pooled is None or text.pooled is None else slerp(result.pooled, text.pooled, share)
        mask = None if result.mask is None or text.mask is None else torch.maximum(result.mask, text.mask)
        result = FlowText(slerp(result.embeds, text.embeds, share), pooled, mask)
    return result


class FlowPromptBank:
    """``request`` returns at once; ``current`` is the newest published FlowText, ``version`` counts them."""

    def __init__(
        self,
        kind: FlowKind,
        pipe: Any,
        choice: DeviceChoice,
        *,
        offload: bool = False,
        max_sequence_length: int | None = None,
        cache_size: int = 64,
    ) -> None:
        self.kind = kind
        self.pipe = pipe
        self.choice = choice
        self.offload = offload  # text encoders on the CPU between prompt changes
        self.max_sequence_length = max_sequence_length or MAX_SEQUENCE_LENGTH[kind]
        self.error: str | None = None
        self.encodes = 0  # texts encoded (tests: a cached text is not encoded again)
        self._cache: OrderedDict[str, FlowText] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flow prompt encoder")
        self._requested: WeightedPrompts | None = None
        self._pending: Future[None] | None = None
        self._published: tuple[FlowText, int, WeightedPrompts] | None = None
        if offload:
            self._move_encoders(torch.device("cpu"))

    @property
    def current(self) -> FlowText:
        published = self._published
        if published is None:
            raise RuntimeError("no prompt has been encoded yet: call request() and wait() first")
        return published[0]

    @property
    def version(self) -> int:
        published = self._published
        return 0 if published is None else published[1]

    def request(self, prompts: Sequence[tuple[str, float]]) -> None:
        wanted = normalise(prompts)
        with self._lock:
            if wanted == self._requested:
                return
            self._requested = wanted
            ready = all(text in self._cache for text, _ in wanted)
            parts = [(self._cache[text], w) for text, w in wanted] if ready else []
        if ready:
            with torch.inference_mode():
                self._publish(wanted, blend_texts(parts))
        else:
            self._pending = self._executor.submit(self._encode_and_publish, wanted)

    def publish_embeddings(self, prompts: Sequence[tuple[str, float]], text: FlowText) -> None:
        """Embeddings made elsewhere, as these prompts' (the benchmark's random ones, for a model
        built without text encoders): a later ``request`` of the same prompts keeps them."""
        wanted = normalise(prompts)
        with self._lock:
            self._requested = wanted
        self._publish(wanted, text)

    def wait(self, timeout: float | None = None) -> bool:
        pending = self._pending
        if pending is not None:
            try:
                pending.result(timeout)
            except TimeoutError:
                return False
        published = self._published
        return published is not None and published[2] == self._requested

    def encode(self, text: str) -> FlowText:
        """One text's FlowText (cached). Call it on the encoder thread, or while nothing else encodes."""
        with self._lock:
            if text in self._cache:
                self._cache.move_to_end(text)
                return self._cache[text]
        device = self.choice.device
        if self.offload:
            self._move_encoders(device)
        try:
            encoded = encode_with_pipeline(self.kind, self.pipe, text, device, self.max_sequence_length)
        finally:
            if self.offload:
                self._move_encoders(torch.device("cpu"))
        dtype = self.choice.dtype
        encoded = FlowText(
            encoded.embeds.to(device, dtype),
            None if encoded.pooled is None else encoded.pooled.to(device, dtype),
            None if encoded.mask is None else encoded.mask.to(device),
        )
        self.encodes += 1
        with self._lock:
            self._cache[text] = encoded
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return encoded

    def encode_on_encoder_thread(self, text: str) -> FlowText:
        """``encode``, on the bank's one encoder thread, waited for: the tokenizers are not
        thread-safe (a fast tokenizer's padding settings change per call)."""
        return self._executor.submit(self.encode, text).result()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _move_encoders(self, device: torch.device) -> None:
        for module in text_encoders(self.pipe):
            module.to(device)
        if device.type == "cpu" and self.choice.is_cuda:
            torch.cuda.empty_cache()

    def _encode_and_publish(self, prompts: WeightedPrompts) -> None:
        try:
            stream = torch.cuda.Stream(self.choice.device) if self.choice.is_cuda else None
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                parts = [(self.encode(text), weight) for text, weight in prompts]
                with torch.inference_mode():
                    blended = blend_texts(parts)
            if stream is not None:
                stream.synchronize()
        except Exception as exc:  # a broken input must not end the show: report, keep the old prompt
            self.error = f"prompt encoding failed: {type(exc).__name__}: {exc}"
            log.exception("flow prompt encoding failed for %r", prompts)
            with self._lock:
                if self._requested == prompts:
                    self._requested = None
            raise
        self.error = None
        if prompts == self._requested:
            self._publish(prompts, blended)

    def _publish(self, prompts: WeightedPrompts, text: FlowText) -> None:
        with self._lock:
            version = self.version + 1
            self._published = (text, version, prompts)
        log.debug("flow prompt embeddings v%d: %r", version, prompts)
