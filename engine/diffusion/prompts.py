"""Prompt embeddings: encoded once per text, off the frame path, blended by slerp, swapped whole.

The text encoder costs milliseconds on a GPU and tens on a CPU: far too much to pay per
frame, and too much to stall a frame for when a performer types. ``PromptBank.request``
returns at once; a single background thread encodes the texts it has not seen (on its own
CUDA stream), blends them and publishes the result with one reference assignment. Until
then the frames keep the previous embeddings. A blend of texts already encoded (moving
``prompt_mix``) is computed on the spot: one small elementwise operation.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any

import torch

from engine.diffusion.device import DeviceChoice

log = logging.getLogger(__name__)

WeightedPrompts = tuple[tuple[str, float], ...]


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of each token vector (last axis); linear where a and b are parallel.

    Linear blends of text embeddings shrink towards the middle and wash the image out;
    slerp keeps the norm, so a half-way blend looks like both prompts, not like neither.
    """
    a32, b32 = a.float(), b.float()
    cos = (a32 * b32).sum(-1, keepdim=True) / (a32.norm(dim=-1, keepdim=True) * b32.norm(dim=-1, keepdim=True))
    theta = torch.acos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(theta)
    parallel = sin < 1e-4
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    w_a = torch.where(parallel, torch.full_like(sin, 1.0 - t), torch.sin((1.0 - t) * theta) / safe)
    w_b = torch.where(parallel, torch.full_like(sin, t), torch.sin(t * theta) / safe)
    return (w_a * a32 + w_b * b32).to(a.dtype)


def blend(embeddings: Sequence[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """Several weighted embeddings as one: slerp folded left, each step weighted by its share so far."""
    result, total = embeddings[0][0], embeddings[0][1]
    for emb, weight in embeddings[1:]:
        total += weight
        result = slerp(result, emb, weight / total)
    return result


def normalise(prompts: Sequence[tuple[str, float]]) -> WeightedPrompts:
    """Drop empty texts and zero weights; nothing left means the empty prompt."""
    kept = tuple((text, float(weight)) for text, weight in prompts if text.strip() and weight > 0)
    return kept or (("", 1.0),)


class PromptBank:
    def __init__(self, tokenizer: Any, text_encoder: Any, choice: DeviceChoice, cache_size: int = 64) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.choice = choice
        self.error: str | None = None  # the last encoding failure, for the scene to report
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prompt encoder")
        self._requested: WeightedPrompts | None = None
        self._pending: Future[None] | None = None
        self._published: tuple[torch.Tensor, int, WeightedPrompts] | None = None  # (embeds, version, prompts)

    # -- any thread -----------------------------------------------------------------------
    @property
    def current(self) -> torch.Tensor:
        published = self._published
        if published is None:
            raise RuntimeError("no prompt has been encoded yet: call request() and wait() first")
        return published[0]

    @property
    def version(self) -> int:
        """Increases each time new embeddings are published (the stream redoes a skipped frame)."""
        published = self._published
        return 0 if published is None else published[1]

    def request(self, prompts: Sequence[tuple[str, float]]) -> None:
        """Ask for these weighted prompts; returns at once."""
        wanted = normalise(prompts)
        with self._lock:
            if wanted == self._requested:
                return
            self._requested = wanted
            ready = all(text in self._cache for text, _ in wanted)
        if ready:
            self._publish(wanted, self._blend_cached(wanted))
        else:
            self._pending = self._executor.submit(self._encode_and_publish, wanted)

    def prefetch(self, texts: Sequence[str]) -> None:
        """Encode these texts in the background, into the cache, publishing nothing (a prompt
        timeline's next lines): a later request of them blends on the spot. Returns at once."""
        with self._lock:
            missing = [text for text in dict.fromkeys(texts) if text not in self._cache]
            for text in texts:  # the ones already here are the most recently wanted
                if text in self._cache:
                    self._cache.move_to_end(text)
        if missing:
            self._executor.submit(self._encode_ahead, missing)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the latest request is published (start-up, tests); False on timeout.

        Raises what the encoder raised, if it failed.
        """
        pending = self._pending
        if pending is not None:
            try:
                pending.result(timeout)
            except TimeoutError:
                return False
        published = self._published
        return published is not None and published[2] == self._requested

    def encode(self, text: str) -> torch.Tensor:
        """(1, 77, D) embeddings of one text, as diffusers' ``encode_prompt`` computes them (cached)."""
        with self._lock:
            if text in self._cache:
                self._cache.move_to_end(text)
                return self._cache[text]
        embeds = self._run_encoder(text)
        self._remember(text, embeds)
        return embeds

    def _run_encoder(self, text: str) -> torch.Tensor:
        tokens = self.tokenizer(
            text, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        device = self.choice.device
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        with torch.inference_mode():
            embeds: torch.Tensor = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return embeds.to(self.choice.dtype)

    def _remember(self, text: str, embeds: torch.Tensor) -> None:
        with self._lock:
            self._cache[text] = embeds
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- internals ----------------------------------------------------------------------------
    def _blend_cached(self, prompts: WeightedPrompts) -> torch.Tensor:
        with self._lock:
            parts = [(self._cache[text], weight) for text, weight in prompts]
        with torch.inference_mode():
            return blend(parts)

    def _encode_and_publish(self, prompts: WeightedPrompts) -> None:
        """Background thread: encode on a side stream, wait for it, publish if still wanted."""
        try:
            stream = torch.cuda.Stream(self.choice.device) if self.choice.is_cuda else None
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                parts = [(self.encode(text), weight) for text, weight in prompts]
                with torch.inference_mode():
                    embeds = blend(parts)
            if stream is not None:
                stream.synchronize()  # the frame stream must never read half-written embeddings
        except Exception as exc:  # a broken input must not end the show: report, keep the old prompt
            self.error = f"prompt encoding failed: {type(exc).__name__}: {exc}"
            log.exception("prompt encoding failed for %r", prompts)
            with self._lock:
                if self._requested == prompts:
                    self._requested = None  # the next request of the same prompts tries again
            raise
        self.error = None
        if prompts == self._requested:
            self._publish(prompts, embeds)

    def _encode_ahead(self, texts: list[str]) -> None:
        """Background thread: into the cache only; a failure is reported like a request's."""
        try:
            stream = torch.cuda.Stream(self.choice.device) if self.choice.is_cuda else None
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                encoded = [(text, self._run_encoder(text)) for text in texts]
            if stream is not None:
                stream.synchronize()  # in the cache, the frame's stream may read them at once
            for text, embeds in encoded:
                self._remember(text, embeds)
        except Exception as exc:  # the request that needs the text tries again and says so
            self.error = f"prompt encoding failed: {type(exc).__name__}: {exc}"
            log.exception("prompt encoding failed for %r", texts)

    def _publish(self, prompts: WeightedPrompts, embeds: torch.Tensor) -> None:
        with self._lock:
            version = self.version + 1
            self._published = (embeds, version, prompts)  # one assignment: readers see old or new, never half
        log.debug("prompt embeddings v%d: %r", version, prompts)


class XLPromptBank(PromptBank):
    """SDXL's prompts: both text encoders' penultimate hidden states side by side, and the
    second encoder's pooled embedding, as diffusers' ``StableDiffusionXLPipeline.encode_prompt``
    computes them, packed in one tensor (so they are cached, blended and swapped as one):

        (1, 78, D1 + D2): tokens 0..76 the hidden states; token 77 the pooled embedding (P <= D1 + D2
        values, zero-padded; slerp over a zero-padded row is the slerp of the pooled vector)
    """

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Any,
        tokenizer_2: Any,
        text_encoder_2: Any,
        choice: DeviceChoice,
        cache_size: int = 64,
    ) -> None:
        super().__init__(tokenizer, text_encoder, choice, cache_size)
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2

    @property
    def pooled_dim(self) -> int:
        return int(self.text_encoder_2.config.projection_dim)

    def encode(self, text: str) -> torch.Tensor:
        with self._lock:
            if text in self._cache:
                self._cache.move_to_end(text)
                return self._cache[text]
        device = self.choice.device
        hidden, pooled = [], None
        with torch.inference_mode():
            for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
                length = tokenizer.model_max_length
                tokens = tokenizer(text, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
                out = encoder(tokens.input_ids.to(device), output_hidden_states=True)
                if pooled is None and out[0].ndim == 2:  # the projecting encoder's text_embeds
                    pooled = out[0]
                hidden.append(out.hidden_states[-2])
            assert pooled is not None  # text_encoder_2 is a CLIPTextModelWithProjection
            states = torch.cat(hidden, dim=-1)
            row = torch.zeros((1, 1, states.shape[-1]), dtype=states.dtype, device=states.device)
            row[0, 0, : pooled.shape[-1]] = pooled[0].to(states.dtype)
            embeds = torch.cat([states, row], dim=1).to(self.choice.dtype)
        with self._lock:
            self._cache[text] = embeds
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return embeds
