"""The choices the scene and the CLI offer, as plain strings (importing this needs no torch)."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")
DTYPE_CHOICES = ("auto", "float16", "bfloat16", "float32")
ACCEL_CHOICES = ("auto", "eager", "compile", "tensorrt")
# backends written but not yet proven by a run on a GPU: every place that offers or shows one
# says so (drop the entry once a GPU run has proven it)
EXPERIMENTAL_ACCELS = {"tensorrt": "experimental, never run on a GPU yet"}
ACCEL_HELP = "eager | compile (torch.compile) | tensorrt (experimental, never run on a GPU yet)"
_DEVICE_SPEC = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device_spec(text: str) -> str:
    """``auto`` | ``cuda`` | ``cuda:N`` | ``mps`` | ``cpu``, or ValueError (whether it exists only torch knows)."""
    if not _DEVICE_SPEC.fullmatch(text.strip()):
        raise ValueError(f"device {text!r} is not one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
    return text.strip()


@dataclass(frozen=True)
class TorchDefaults:
    """What "auto" means for the torch scenes of one show (``dreamdeck run --device/--dtype/--accel``).

    Given to each scene when it is made; a scene's own parameter (``/scene/realtime/device``...)
    other than "auto" wins. "auto" here too: the machine's best (``choose_device``).
    """

    device: str = "auto"
    dtype: str = "auto"
    accel: str = "auto"

    def __post_init__(self) -> None:
        check_device_spec(self.device)
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
        if self.accel not in ACCEL_CHOICES:
            raise ValueError(f"accel {self.accel!r} is not one of {', '.join(ACCEL_CHOICES)}")

    def pick(self, device: str = "auto", dtype: str = "auto", accel: str = "auto") -> TorchDefaults:
        """A scene's own choices, with these defaults where it says "auto"."""
        return TorchDefaults(
            self.device if device == "auto" else device,
            self.dtype if dtype == "auto" else dtype,
            self.accel if accel == "auto" else accel,
        )


LORA_SLOTS = 4  # live LoRA slots on the realtime scene (engine/diffusion/lora.py)
CONTROLNET_SLOTS = 3  # live ControlNet slots on the realtime scene (engine/diffusion/controlnet.py)
CONTROL_TYPES = ("canny", "depth", "tile", "source", "none")
DEFAULT_DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"


def accel_label(state: str) -> str:
    """A backend state for the HUD and status views, experimental backends marked as such:
    "tensorrt" -> "tensorrt (experimental)", "eager, tensorrt building 12 s" -> "eager, tensorrt
    (experimental) building 12 s"."""
    for name in EXPERIMENTAL_ACCELS:
        state = re.sub(rf"\b{name}\b", f"{name} (experimental)", state)
    return state
