"""The choices the scene and the CLI offer, as plain strings (importing this needs no torch)."""

from __future__ import annotations

import re

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")
DTYPE_CHOICES = ("auto", "float16", "bfloat16", "float32")
ACCEL_CHOICES = ("auto", "eager", "compile", "tensorrt")
# backends written but not yet proven by a run on a GPU: every place that offers or shows one
# says so (drop the entry once a GPU run has proven it)
EXPERIMENTAL_ACCELS = {"tensorrt": "experimental, never run on a GPU yet"}
ACCEL_HELP = "eager | compile (torch.compile) | tensorrt (experimental, never run on a GPU yet)"
# what "auto" means in this process: `dreamdeck run --device/--dtype/--accel` set these, and
# every torch scene (realtime, ddpm, vqgan_clip) and the benchmark read them when asked for "auto"
DEVICE_ENV, DTYPE_ENV, ACCEL_ENV = "DREAMDECK_DEVICE", "DREAMDECK_DTYPE", "DREAMDECK_ACCEL"
_DEVICE_SPEC = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device_spec(text: str) -> str:
    """``auto`` | ``cuda`` | ``cuda:N`` | ``mps`` | ``cpu``, or ValueError (whether it exists is known only to torch)."""
    if not _DEVICE_SPEC.fullmatch(text.strip()):
        raise ValueError(f"device {text!r} is not one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
    return text.strip()


LORA_SLOTS = 4  # live LoRA slots on the realtime scene (engine/diffusion/lora.py)


def accel_label(state: str) -> str:
    """A backend state for the HUD and status views, experimental backends marked as such:
    "tensorrt" -> "tensorrt (experimental)", "eager, tensorrt building 12 s" -> "eager, tensorrt
    (experimental) building 12 s"."""
    for name in EXPERIMENTAL_ACCELS:
        state = re.sub(rf"\b{name}\b", f"{name} (experimental)", state)
    return state
