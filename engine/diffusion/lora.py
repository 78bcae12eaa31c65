"""LoRA slots on the real-time UNet: load, hot-swap and blend adapters live, never the base model.

``AdapterBank(unet)`` owns a fixed number of slots; slot ``n`` is the peft adapter named
``slot{n}`` on the UNet. All LoRA work goes through diffusers and peft:

- a file is read by ``StableDiffusionPipeline.lora_state_dict`` (diffusers and kohya formats,
  kohya keys converted there), on a background thread, and checked against the UNet there;
- between two frames the worker swaps it in with ``UNet2DConditionModel.load_lora_adapter``:
  with ``hotswap=True`` into the slot's existing adapter (the weights are copied into the
  same tensors, so a compiled graph stays valid), or, for a slot's first file (or a file
  that targets other layers or a higher rank than ``target_rank``), as a new adapter;
- a new adapter goes through peft's ``prepare_model_for_compiled_hotswap``: its ranks are
  padded to ``target_rank`` and its scalings become tensors, so later files hot-swap in
  whatever their rank, and a weight change is a tensor write that torch.compile does not
  guard on.

Weights: peft's ``set_adapters`` / ``set_scale`` rebind each layer's scaling to a Python
float, which a compiled graph guards on (one recompile per weight change). So the bank
writes ``weight * alpha / rank`` into those scaling tensors in place instead. A new adapter
changes the UNet's layers: ``apply`` says so (``restructured``), and the stream rebuilds
its compiled frame in the background while frames run eager.

Text-encoder LoRA weights are skipped with a log line: prompt embeddings are encoded once
per prompt change, and diffusers cannot hot-swap text-encoder adapters.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from engine.diffusion.loading import HUB_ID, offline
from engine.diffusion.options import LORA_SLOTS

log = logging.getLogger(__name__)

TARGET_RANK = 64  # files up to this rank hot-swap; smaller ranks are zero-padded to it


class LoraError(ValueError):
    """A LoRA file that cannot play (one line: which slot, which file, why)."""


@dataclass
class LoraFile:
    """A LoRA read from disk or a hub, its UNet weights ready to swap in."""

    source: str
    state_dict: dict[str, torch.Tensor]  # UNet keys only, prefixed "unet." (diffusers' layout)
    network_alphas: dict[str, float] | None  # kohya alphas, as lora_state_dict gives them
    rank: int
    skipped_text_encoder: int  # text-encoder tensors left out
    read_ms: float


@dataclass
class SwapTiming:
    """What the last file swap cost: read (background thread) and swap (between two frames)."""

    slot: int
    source: str
    read_ms: float
    swap_ms: float
    hotswapped: bool  # False: loaded as a new adapter (a compiled graph is rebuilt)


@dataclass
class BankChange:
    changed: bool = False  # the output will differ: the stream must not skip the next frame
    restructured: bool = False  # adapter layers were added or removed: compiled graphs are stale
    files: bool = False  # a file was swapped in or a slot cleared
    error: str | None = None  # files that cannot play, in one line (their slots keep their old files)


def split_source(source: str) -> tuple[str, str | None]:
    """``source`` -> (folder or hub id, weight name or None).

    A local file; a local folder; a hub id ``org/name``; or a file in a hub repository,
    ``org/name/weights.safetensors`` (anything after the second slash is the weight name).
    """
    path = Path(source).expanduser()
    if path.is_file():
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    parts = source.split("/", 2)
    if source.startswith((".", "/", "~")) or len(parts) < 2 or not HUB_ID.match("/".join(parts[:2])):
        raise LoraError(f"{source}: no such file or folder, and not a hub id like org/name[/weights.safetensors]")
    return "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)


def read_lora(
    source: str,
    unet: Any,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | None = None,
) -> LoraFile:
    """Read and check a LoRA file (any thread; the UNet is only looked at). Raises LoraError."""
    from diffusers import StableDiffusionPipeline

    started = time.perf_counter()
    where, weight_name = split_source(source)
    # 1. the file, with kohya (and older diffusers) keys converted by diffusers
    try:
        state_dict, alphas = StableDiffusionPipeline.lora_state_dict(
            where, weight_name=weight_name, local_files_only=offline(), cache_dir=cache_dir
        )
    except (OSError, ValueError, KeyError) as exc:  # missing, not safetensors, or not a LoRA diffusers knows
        raise LoraError(f"{source}: cannot be read as a LoRA ({type(exc).__name__}: {_first_line(exc)})") from exc
    # 2. the UNet part only (see the module docstring for the text encoder)
    unet_part = {k: v for k, v in state_dict.items() if k.startswith("unet.")}
    skipped = sum(1 for k in state_dict if k.startswith("text_encoder"))
    if not unet_part:
        raise LoraError(f"{source}: has no UNet LoRA weights (keys like {next(iter(state_dict), 'none')})")
    # 3. it must fit this UNet: every target layer exists, with the right input size
    rank = _check_targets(source, unet_part, unet)
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in unet_part.items()}
    unet_alphas = {k: v for k, v in alphas.items() if k.startswith("unet.")} if alphas else None
    return LoraFile(source, tensors, unet_alphas or None, rank, skipped, (time.perf_counter() - started) * 1000)


def _check_targets(source: str, state_dict: dict[str, torch.Tensor], unet: Any) -> int:
    """The LoRA's rank; raises LoraError when it targets a layer this UNet lacks or sizes differently."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    peft_keys = {k.removeprefix("unet."): v for k, v in state_dict.items()}
    if not any("lora_A" in k for k in peft_keys):
        peft_keys = convert_unet_state_dict_to_peft(peft_keys)
    rank = 0
    for key, value in peft_keys.items():
        if not key.endswith("lora_A.weight"):
            continue
        name = key.removesuffix(".lora_A.weight")
        try:
            layer = unet.get_submodule(name)
        except AttributeError:
            raise LoraError(
                f"{source}: targets {name}, which this UNet does not have (another architecture?)"
            ) from None
        layer = getattr(layer, "base_layer", layer)  # a layer that already carries adapters
        fan_in = getattr(layer, "in_features", None) or getattr(layer, "in_channels", None)
        if value.ndim < 2 or value.shape[1] != fan_in:
            raise LoraError(f"{source}: {name} takes {fan_in} inputs here, the LoRA has {tuple(value.shape)}")
        rank = max(rank, value.shape[0])
    if rank == 0:
        raise LoraError(f"{source}: no LoRA down/A weights found in it")
    return rank


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


class AdapterBank:
    """Fixed LoRA slots on one UNet. ``request`` and ``set_weight`` from the worker, ``apply`` between frames.

    Threading: one background thread reads files; everything that touches the UNet's
    weights runs in ``apply`` on the worker, between two frames.
    """

    def __init__(
        self, unet: Any, *, slots: int = LORA_SLOTS, target_rank: int = TARGET_RANK, cache_dir: str | None = None
    ) -> None:
        self.unet = unet
        self.slots = slots
        self.target_rank = target_rank
        self.cache_dir = cache_dir
        self.last_swap: SwapTiming | None = None
        self.last_weights_ms = 0.0
        self.sources: dict[int, str] = {}  # what each slot plays ("" or absent: muted / empty)
        self._weights = {slot: 1.0 for slot in range(1, slots + 1)}
        self._written: dict[int, float] = {}  # the weight now in each adapter's scaling tensors
        self._base: dict[int, list[tuple[Any, float]]] = {}  # (LoRA layer, alpha / rank) per slot
        self._pending: dict[int, Future[LoraFile] | None] = {}  # None: clear the slot
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora read")

    @staticmethod
    def adapter_name(slot: int) -> str:
        return f"slot{slot}"

    # -- worker thread ---------------------------------------------------------------------
    def request(self, slot: int, source: str) -> None:
        """Play ``source`` in ``slot`` once read (the old file plays until then); "" mutes the slot."""
        self._check_slot(slot)
        source = source.strip()
        if not source:
            self._pending[slot] = None
            return
        param = next(self.unet.parameters())
        self._pending[slot] = self._reader.submit(
            read_lora, source, self.unet, device=param.device, dtype=param.dtype, cache_dir=self.cache_dir
        )

    def set_weight(self, slot: int, weight: float) -> None:
        """Takes effect at the next ``apply`` (a tensor write: no reload, no recompile)."""
        self._check_slot(slot)
        self._weights[slot] = float(weight)

    def layer_count(self, slot: int) -> int:
        """How many UNet layers the slot's adapter reaches (0: empty)."""
        return len(self._base.get(slot, ()))

    def loading(self) -> bool:
        return any(f is not None and not f.done() for f in self._pending.values())

    def wait(self, timeout: float | None = None) -> None:
        """Block until every requested file is read (tests, benchmarks); ``apply`` then swaps them in."""
        for future in list(self._pending.values()):
            if future is not None:
                with contextlib.suppress(LoraError):  # apply() reports it
                    future.result(timeout)

    @torch.no_grad()
    def apply(self) -> BankChange:
        """Swap in the files that are read and write changed weights. A file that cannot play is
        named in ``error`` (one line) and its slot keeps its old file; everything else applies."""
        change = BankChange()
        errors: list[str] = []
        # 1. files read in the background, or slots cleared
        for slot, future in list(self._pending.items()):
            if future is not None and not future.done():
                continue
            del self._pending[slot]
            if future is None:
                if self.sources.pop(slot, None):
                    log.info("LoRA slot %d: cleared", slot)
                    change.changed = change.files = True
                    self._written.pop(slot, None)  # rewritten below, as 0
                continue
            try:
                lora = future.result()
                change.restructured |= self._swap_in(slot, lora)
            except LoraError as exc:
                errors.append(f"LoRA slot {slot}: {exc}")
                continue
            self._written.pop(slot, None)  # a swap resets the scalings to the file's alpha / rank
            change.changed = change.files = True
        # 2. weights: in place into the scaling tensors
        started = time.perf_counter()
        for slot, layers in self._base.items():
            weight = self._weights[slot] if self.sources.get(slot) else 0.0
            if self._written.get(slot) != weight:
                for layer, base in layers:
                    layer.scaling[self.adapter_name(slot)].fill_(weight * base)
                self._written[slot] = weight
                change.changed = True
        if change.changed:
            self.last_weights_ms = (time.perf_counter() - started) * 1000
        if errors:
            change.error = "; ".join(errors) + " (the previous LoRA plays on)"
        return change

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)

    # -- internals -------------------------------------------------------------------------------
    def _check_slot(self, slot: int) -> None:
        if not 1 <= slot <= self.slots:
            raise LoraError(f"there is no LoRA slot {slot} (1..{self.slots})")

    def _swap_in(self, slot: int, lora: LoraFile) -> bool:
        """Into the slot's adapter if possible; else as a new adapter. True when layers changed."""
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        unet, name = self.unet, self.adapter_name(slot)
        started = time.perf_counter()
        loaded = name in getattr(unet, "peft_config", {})
        hotswapped = False
        if loaded and lora.rank <= self.target_rank:
            try:
                unet.load_lora_adapter(
                    lora.state_dict, prefix="unet", network_alphas=lora.network_alphas, adapter_name=name, hotswap=True
                )
                hotswapped = True
            except (RuntimeError, ValueError) as exc:  # other target layers, or other dropout / alpha pattern
                log.info(
                    "LoRA slot %d: %s cannot hot-swap (%s); loading it as a new adapter",
                    slot,
                    lora.source,
                    _first_line(exc),
                )
        if not hotswapped:
            # the named fallback: a new adapter (diffusers already removed a failed hot-swap's)
            if name in getattr(unet, "peft_config", {}):
                unet.delete_adapters(name)
            try:
                unet.load_lora_adapter(
                    lora.state_dict, prefix="unet", network_alphas=lora.network_alphas, adapter_name=name
                )
            except (RuntimeError, ValueError) as exc:
                self._forget(slot)
                raise LoraError(f"{lora.source}: cannot be loaded ({_first_line(exc)}); the slot is empty now") from exc
            unet.set_adapter(list(unet.peft_config))  # every slot plays, each at its own weight
            prepare_model_for_compiled_hotswap(
                unet, target_rank=self.target_rank, config=unet.peft_config, check_compiled="ignore"
            )
        self._base[slot] = [
            (layer, float(layer.scaling[name]))
            for layer in unet.modules()
            if isinstance(getattr(layer, "scaling", None), dict) and name in layer.scaling
        ]
        self.sources[slot] = lora.source
        self.last_swap = SwapTiming(slot, lora.source, lora.read_ms, (time.perf_counter() - started) * 1000, hotswapped)
        log.info(
            "LoRA slot %d: %s %s (rank %d; read %.0f ms, swap %.0f ms)%s",
            slot,
            lora.source,
            "hot-swapped in" if hotswapped else "loaded as a new adapter",
            lora.rank,
            lora.read_ms,
            self.last_swap.swap_ms,
            f"; {lora.skipped_text_encoder} text-encoder tensors skipped (prompts are encoded once)"
            if lora.skipped_text_encoder
            else "",
        )
        return not hotswapped

    def _forget(self, slot: int) -> None:
        self.sources.pop(slot, None)
        self._base.pop(slot, None)
        self._written.pop(slot, None)


# -- random LoRAs (tests and the benchmark: no LoRA can be downloaded here) ---------------------------
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def random_lora(
    unet: Any, *, rank: int, seed: int, targets: tuple[str, ...] = ATTENTION_TARGETS, alpha: float | None = None
) -> dict[str, torch.Tensor]:
    """A rank-``rank`` LoRA for ``unet``'s architecture with random A and B, made by peft (peft's keys)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    with torch.device("meta"):  # a weightless copy of the architecture: only the adapter is made for real
        # Any: diffusers' mixins (add_adapter, nn.Module's modules) are not seen through its typing
        host: Any = UNet2DConditionModel(**unet.config)
        lora_alpha = alpha or rank  # peft types it as int; its scale is lora_alpha / r, a float works
        host.add_adapter(
            LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=list(targets)),  # type: ignore[arg-type]
            adapter_name="random",
        )
    torch.manual_seed(seed)
    for layer in host.modules():
        if isinstance(layer, LoraLayer):
            # peft's own A init, and a random B in place of its zeros (a trained LoRA's B is not zero)
            # cast: the adapters are nn.Linear; torch types a Module attribute as Tensor | Module
            a_weight = cast(torch.Tensor, layer.lora_A["random"].to_empty(device="cpu").weight)
            torch.nn.init.kaiming_uniform_(a_weight, a=math.sqrt(5))
            b_weight = cast(torch.Tensor, layer.lora_B["random"].to_empty(device="cpu").weight)
            torch.nn.init.normal_(b_weight, std=0.05)
    return {k: v.contiguous() for k, v in get_peft_model_state_dict(host, adapter_name="random").items()}


def save_lora(
    lora: dict[str, torch.Tensor],
    path: str | Path,
    *,
    kohya: bool = False,
    text_encoder: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a peft-keyed UNet LoRA as one .safetensors file: diffusers' layout (``unet.`` keys)
    or kohya's (``lora_unet_down_blocks_0_..._to_q.lora_down.weight``, ``.lora_up.weight``, ``.alpha``).
    ``text_encoder``: peft-keyed text-encoder LoRA weights to include (``text_encoder.`` / ``lora_te_``)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    path = Path(path)
    if kohya:
        tensors = {f"lora_unet_{k}": v for k, v in convert_state_dict_to_kohya(lora).items()}
        if text_encoder:
            tensors.update({f"lora_te_{k}": v for k, v in convert_state_dict_to_kohya(text_encoder).items()})
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        StableDiffusionPipeline.save_lora_weights(
            path.parent, unet_lora_layers=lora, text_encoder_lora_layers=text_encoder, weight_name=path.name
        )
    return path
