"""The UNet as ONNX, with a dynamic batch axis (one file serves every stream-batch size).

The export is what a TensorRT engine is built from, and the part of the TensorRT path
that can be checked without TensorRT: the tests run the exported file with onnxruntime
against torch. torch's dynamo exporter (needs ``onnxscript``) is used when present; the
older TorchScript exporter otherwise, as a logged fallback.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

INPUT_NAMES = ("sample", "timestep", "encoder_hidden_states", "timestep_cond")
OUTPUT_NAME = "model_output"


def unet_input_names(has_timestep_cond: bool) -> list[str]:
    return list(INPUT_NAMES if has_timestep_cond else INPUT_NAMES[:3])


def export_unet_onnx(
    unet: torch.nn.Module,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    path: Path,
    max_batch: int = 8,
) -> Path:
    """Write ``unet`` (a ``DiffusersUNet``) to ``path``; the batch axis of every input is dynamic.

    ``inputs``: (sample, timestep (B,) float32, encoder_hidden_states, timestep_cond or None).
    """
    args = tuple(t for t in inputs if t is not None)
    names = unet_input_names(inputs[3] is not None)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if importlib.util.find_spec("onnxscript") is not None:
            batch = torch.export.Dim("batch", min=1, max=max_batch)
            torch.onnx.export(
                unet,
                args,
                str(path),
                dynamo=True,
                input_names=names,
                output_names=[OUTPUT_NAME],
                dynamic_shapes=tuple({0: batch} for _ in args),
                external_data=True,
            )
        else:
            log.warning("onnxscript is not installed: exporting with the TorchScript exporter instead")
            torch.onnx.export(
                unet,
                args,
                str(path),
                dynamo=False,
                input_names=names,
                output_names=[OUTPUT_NAME],
                dynamic_axes={name: {0: "batch"} for name in names},
                opset_version=17,
            )
    return path
