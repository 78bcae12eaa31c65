"""Where the hot path runs and in which precision: chosen once, overridable, never guessed twice.

CUDA and Apple MPS run in float16 (the precision SD-turbo and LCM ship in); the CPU runs in
float32, or bfloat16 on request (float16 convolutions are slow or missing on CPUs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.diffusion.options import DEVICE_CHOICES

DTYPES = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class DeviceChoice:
    device: torch.device
    dtype: torch.dtype

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.is_cuda else self.device.type
        return f"{name} ({str(self.dtype).removeprefix('torch.')})"


def choose_device(device: str = "auto", dtype: str = "auto") -> DeviceChoice:
    """``device``: auto | cuda | cuda:N | mps | cpu; ``dtype``: auto | float16 | bfloat16 | float32.

    "auto" is the best the machine has; what ``dreamdeck run --device`` / ``--dtype`` chose is
    put in place of "auto" before (``TorchDefaults.pick``).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    kind = device.split(":", 1)[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device cuda was asked for, but torch sees no CUDA GPU "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})"
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device mps was asked for, but this torch build or machine has no MPS")
    if kind not in ("cuda", "mps", "cpu"):
        raise ValueError(f"device {device!r} is not one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
    chosen = DTYPES[dtype]
    if chosen is None:
        chosen = torch.float32 if kind == "cpu" else torch.float16
    if kind == "cpu" and chosen is torch.float16:
        raise ValueError("the CPU runs float32 or bfloat16, not float16")
    return DeviceChoice(torch.device(device), chosen)
