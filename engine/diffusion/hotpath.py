"""The three per-frame stages, tensors in and tensors out, as one torch module.

``HotPath`` holds no per-frame state: the stream (``stream.py``) owns the noise, the stage
buffer and the prompt embeddings and passes them in. That keeps each stage a pure function
of its inputs, which is what ``torch.compile`` (CUDA graphs) and TensorRT need, and lets
a prompt or strength change swap a tensor instead of rebuilding anything.

    encode   uint8 frame (H, W, 3) -> latents noised to the first stage's timestep
    denoise  all stages in one UNet call (the stream batch) -> finished latents + next buffer
    decode   finished latents -> float image (h, w, 3) in [0, 1]
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from engine.diffusion.schedule import StageCoefficients

UNetCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class DiffusersUNet(torch.nn.Module):
    """A diffusers UNet as a plain tensor function: (sample, timestep, text, timestep_cond) -> output.

    The same signature is what gets exported to ONNX and what a TensorRT engine runs.
    """

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         timestep_cond=timestep_cond, return_dict=False)[0]


def split_prediction(kind: str, output: torch.Tensor, x: torch.Tensor, sqrt_alpha: torch.Tensor,
                     sqrt_one_minus_alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted clean latents, predicted noise) from any of the three parameterisations."""
    if kind == "epsilon":
        eps = output
        x0 = (x - sqrt_one_minus_alpha * eps) / sqrt_alpha
    elif kind == "v_prediction":
        x0 = sqrt_alpha * x - sqrt_one_minus_alpha * output
        eps = sqrt_one_minus_alpha * x + sqrt_alpha * output
    else:  # "sample"
        x0 = output
        eps = (x - sqrt_alpha * x0) / sqrt_one_minus_alpha
    return x0, eps


def fit_to(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centre-crop (N, C, H, W) to the target aspect, then resize: a camera frame never stretches."""
    h, w = image.shape[-2:]
    if (h, w) == (height, width):
        return image
    if h * width > w * height:  # too tall
        crop = round(w * height / width)
        image = image[..., (h - crop) // 2:(h - crop) // 2 + crop, :]
    elif h * width < w * height:  # too wide
        crop = round(h * width / height)
        image = image[..., :, (w - crop) // 2:(w - crop) // 2 + crop]
    return F.interpolate(image, size=(height, width), mode="bilinear", antialias=True, align_corners=False)


class HotPath(torch.nn.Module):
    def __init__(self, unet: UNetCall, vae: torch.nn.Module, *, prediction_type: str, size: tuple[int, int],
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.prediction_type = prediction_type
        self.height, self.width = size
        self.dtype = dtype
        self.scaling_factor = float(vae.config.scaling_factor)
        self.tiny_vae = type(vae).__name__ == "AutoencoderTiny"

    def with_unet(self, unet: UNetCall) -> "HotPath":
        """The same stages around another UNet runner (a TensorRT engine)."""
        return HotPath(unet, self.vae, prediction_type=self.prediction_type, size=(self.height, self.width),
                       dtype=self.dtype)

    def encode(self, frame: torch.Tensor, noise: torch.Tensor, sqrt_alpha: torch.Tensor,
               sqrt_one_minus_alpha: torch.Tensor) -> torch.Tensor:
        """uint8 (H, W, 3) on the device -> latents at the first stage's noise level (1, 4, h, w)."""
        # 1. uint8 HWC -> float NCHW in [-1, 1], at the model's size (resized in float32: the
        #    antialiased resize has no bfloat16 kernel on CPUs, and it is a sliver of the frame's work)
        image = frame.permute(2, 0, 1).unsqueeze(0).to(torch.float32, memory_format=torch.contiguous_format)
        image = image / 127.5 - 1.0
        image = fit_to(image, self.height, self.width).to(self.dtype)
        # 2. VAE encode: the posterior mean (deterministic: the same frame gives the same latents)
        if self.tiny_vae:
            latents = self.vae.encode(image).latents
        else:
            latents = self.vae.encode(image).latent_dist.mode()
        latents = latents * self.scaling_factor
        # 3. forward-diffuse to the first stage with the fixed noise
        return sqrt_alpha * latents + sqrt_one_minus_alpha * noise

    def denoise(self, first: torch.Tensor, buffer: torch.Tensor, text: torch.Tensor, noise: torch.Tensor,
                c: StageCoefficients, timestep_cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One UNet call over every stage -> (finished latents (1, 4, h, w), next buffer (k-1, 4, h, w))."""
        # 4. the stream batch: the newest frame at stage 0, older frames further along
        x = torch.cat([first, buffer]) if buffer.shape[0] else first
        steps = x.shape[0]
        # 5. one UNet call for all stages
        output = self.unet(x, c.timesteps, text.expand(steps, -1, -1), timestep_cond)
        # 6. the scheduler's update, all stages at once
        x0, eps = split_prediction(self.prediction_type, output, x, c.sqrt_alpha, c.sqrt_one_minus_alpha)
        denoised = c.c_out * x0 + c.c_skip * x
        # 7. hand stages 0..k-2 on to the next timestep; the last stage is finished
        handed_on = (c.next_signal[:-1] * denoised[:-1] + c.next_eps[:-1] * eps[:-1]
                     + c.next_noise[:-1] * noise[1:])
        return denoised[-1:], handed_on

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Finished latents -> float image (h, w, 3) in [0, 1]."""
        # 8. VAE decode and denormalise
        image = self.vae.decode(latents / self.scaling_factor, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0)
