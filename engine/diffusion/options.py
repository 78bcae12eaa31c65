"""The choices the scene and the CLI offer, as plain strings (importing this needs no torch)."""

from __future__ import annotations

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")
DTYPE_CHOICES = ("auto", "float16", "bfloat16", "float32")
ACCEL_CHOICES = ("auto", "eager", "compile", "tensorrt")
LORA_SLOTS = 4  # live LoRA slots on the realtime scene (engine/diffusion/lora.py)
