"""The choices the scene and the CLI offer, as plain strings (importing this needs no torch)."""

from __future__ import annotations

import re

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")
DTYPE_CHOICES = ("auto", "float16", "bfloat16", "float32")
ACCEL_CHOICES = ("auto", "eager", "compile", "tensorrt")
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
