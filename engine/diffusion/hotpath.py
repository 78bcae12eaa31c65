"""One frame of img2img as one pure tensor function: what torch.compile captures as one graph.

``HotPath.frame(*FrameInputs)`` holds no per-frame state: the stream (``stream.py``) owns
the inputs, fixed tensors that live changes write into (a prompt, a strength, a seed is a
tensor write), so a compiled graph sees the same tensors, of the same shapes, every frame.

    encode   uint8 frame (H, W, 3), already at the model's size -> latents noised to the first stage
    denoise  all stages in one UNet call (the stream batch) -> finished latents + next buffer
    decode   finished latents -> image (h, w, 3) in [0, 1]; ``frame`` returns it as uint8

The whole frame is one dynamo graph, whatever the step count; compiled with
mode="reduce-overhead" on CUDA it is one CUDA graph (SD-turbo, SDXS: one UNet call in it).
What a frame does in Python outside that graph (``StreamImg2Img``) is host work and tensor
copies, and, only while noise drifts, one small in-place blend:

    - LoRA weights changed: written into the adapters' scaling tensors (``lora.py``)
    - the similarity filter: a 32x32 copy of the frame on the host
    - new prompt embeddings: copied into the fixed text tensor
    - noise drift (only when > 0): fresh noise blended into the fixed noise tensor in place
    - the frame fitted (centre crop + resize) on the host into the one pinned upload buffer,
      then one non-blocking copy to the device
    - ``HotPath.frame`` (the graph)
    - the stream batch's hand-on copied into the fixed buffer (steps > 1)
    - one non-blocking copy of the image into pinned host memory, and the frame's only
      host synchronisation: waiting for it
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from engine.diffusion.schedule import StageCoefficients

UNetCall = Callable[..., torch.Tensor]  # (sample, timestep, text, timestep_cond[, down residuals, mid residual])


class DiffusersUNet(torch.nn.Module):
    """A diffusers UNet as a plain tensor function: (sample, timestep, text, timestep_cond) -> output.

    The same signature is what gets exported to ONNX and what a TensorRT engine runs.
    """

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
        down_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_residual: torch.Tensor | None = None,
        added_cond: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        output: torch.Tensor = self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            timestep_cond=timestep_cond,
            down_block_additional_residuals=down_residuals,
            mid_block_additional_residual=mid_residual,
            added_cond_kwargs=added_cond,
            return_dict=False,
        )[0]
        return output


def split_prediction(
    kind: str, output: torch.Tensor, x: torch.Tensor, sqrt_alpha: torch.Tensor, sqrt_one_minus_alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
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


class ControlInputs(NamedTuple):
    """The ControlNets' inputs: one control image per ControlNet and stage, and their scales.

    Stage ``j`` of the stream batch holds the frame that entered ``j`` frames ago, so it is
    conditioned on that frame's control image (as diffusers' pipeline would condition it).
    """

    images: torch.Tensor  # (n, k, 3, H, W) in [0, 1]: ControlNet i, stage j
    scales: torch.Tensor  # (n, k, 1, 1, 1): scale * (stage j within [start, end]), one tensor write


class FrameInputs(NamedTuple):
    """Everything a frame reads, as fixed device tensors (live changes write into them)."""

    pixels: torch.Tensor  # (H, W, 3) uint8, the frame fitted to the model's size
    buffer: torch.Tensor  # (k-1, 4, h, w): the stream batch's frames in flight
    text: torch.Tensor  # (1, 77, D) prompt embeddings
    noise: torch.Tensor  # (k, 4, h, w): one fixed noise image per stage
    coefficients: StageCoefficients
    timestep_cond: torch.Tensor | None  # (k, D) guidance embedding, for UNets that take one
    control: ControlInputs | None = None  # with ControlNets only
    style: torch.Tensor | None = None  # (1, 1, D) IP-Adapter image embedding, with an IP-Adapter only


class HotPath(torch.nn.Module):
    def __init__(
        self,
        unet: UNetCall,
        vae: torch.nn.Module,
        *,
        prediction_type: str,
        size: tuple[int, int],
        dtype: torch.dtype,
        controlnets: Sequence[torch.nn.Module] = (),
        xl_time_ids: torch.Tensor | None = None,
        pooled_dim: int = 0,
    ) -> None:
        """``xl_time_ids`` (1, 6) and ``pooled_dim``: an SDXL UNet, its text input packed by
        ``XLPromptBank`` (the pooled embedding as a last token)."""
        super().__init__()
        self.unet = unet
        self.xl_time_ids = xl_time_ids
        self.pooled_dim = pooled_dim
        # diffusers ControlNetModels, summed as MultiControlNetModel sums them
        self.controlnets = torch.nn.ModuleList(controlnets)
        # Any: diffusers' VAE classes (encode, decode, config); torch types a Module attribute as Tensor | Module
        self.vae: Any = vae
        self.prediction_type = prediction_type
        self.height, self.width = size
        self.dtype = dtype
        vae_config: Any = vae.config  # a diffusers FrozenDict
        self.scaling_factor = float(vae_config.scaling_factor)
        self.tiny_vae = type(vae).__name__ == "AutoencoderTiny"

    def with_unet(self, unet: UNetCall) -> HotPath:
        """The same frame around another UNet runner (a TensorRT engine)."""
        return HotPath(
            unet,
            self.vae,
            prediction_type=self.prediction_type,
            size=(self.height, self.width),
            dtype=self.dtype,
            controlnets=list(self.controlnets),
            xl_time_ids=self.xl_time_ids,
            pooled_dim=self.pooled_dim,
        )

    def with_controlnets(self, controlnets: Sequence[torch.nn.Module]) -> HotPath:
        """The same frame with other ControlNets (a slot added or removed: compiled frames are rebuilt)."""
        return HotPath(
            self.unet,
            self.vae,
            prediction_type=self.prediction_type,
            size=(self.height, self.width),
            dtype=self.dtype,
            controlnets=controlnets,
            xl_time_ids=self.xl_time_ids,
            pooled_dim=self.pooled_dim,
        )

    def frame(
        self,
        pixels: torch.Tensor,
        buffer: torch.Tensor,
        text: torch.Tensor,
        noise: torch.Tensor,
        c: StageCoefficients,
        timestep_cond: torch.Tensor | None,
        control: ControlInputs | None = None,
        style: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame: uint8 (H, W, 3) -> (uint8 image (h, w, 3), the next stream-batch buffer).

        While the stream batch fills (its first k - 1 frames) the image is not one yet; the
        stream throws it away.
        """
        first = self.encode(pixels, noise[:1], c.sqrt_alpha[:1], c.sqrt_one_minus_alpha[:1])
        finished, handed_on = self.denoise(first, buffer, text, noise, c, timestep_cond, control, style)
        # 9. to uint8 on the device: a quarter of the bytes to download
        return self.decode(finished).mul(255).round().to(torch.uint8), handed_on

    def encode(
        self, frame: torch.Tensor, noise: torch.Tensor, sqrt_alpha: torch.Tensor, sqrt_one_minus_alpha: torch.Tensor
    ) -> torch.Tensor:
        """uint8 (H, W, 3) at the model's size -> latents at the first stage's noise level (1, 4, h, w)."""
        if tuple(frame.shape) != (self.height, self.width, 3):
            raise ValueError(
                f"the frame is {tuple(frame.shape)}, the model takes ({self.height}, {self.width}, 3): "
                "fit it first (stream.fit_into)"
            )
        # 1. uint8 HWC -> float NCHW in [-1, 1] (in float32, as diffusers' image processor does)
        image = (frame.permute(2, 0, 1).unsqueeze(0).to(torch.float32) / 127.5 - 1.0).to(self.dtype)
        # 2. VAE encode: the posterior mean (deterministic: the same frame gives the same latents)
        latents: torch.Tensor
        if self.tiny_vae:
            latents = self.vae.encode(image).latents
        else:
            latents = self.vae.encode(image).latent_dist.mode()
        latents = latents * self.scaling_factor
        # 3. forward-diffuse to the first stage with the fixed noise
        return sqrt_alpha * latents + sqrt_one_minus_alpha * noise

    def denoise(
        self,
        first: torch.Tensor,
        buffer: torch.Tensor,
        text: torch.Tensor,
        noise: torch.Tensor,
        c: StageCoefficients,
        timestep_cond: torch.Tensor | None,
        control: ControlInputs | None = None,
        style: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One UNet call over every stage -> (finished latents (1, 4, h, w), next buffer (k-1, 4, h, w))."""
        # 4. the stream batch: the newest frame at stage 0, older frames further along
        x = torch.cat([first, buffer]) if buffer.shape[0] else first
        steps = x.shape[0]
        texts = text.expand(steps, -1, -1)
        added: dict[str, torch.Tensor] | None = None
        if self.xl_time_ids is not None:  # SDXL: the pooled embedding and the time ids go in as added conditions
            added = {"text_embeds": texts[:, -1, : self.pooled_dim], "time_ids": self.xl_time_ids.expand(steps, -1)}
            texts = texts[:, :-1]
        control_added = added
        if style is not None:  # IP-Adapter: the image embedding, for the UNet only (as diffusers passes it)
            added = {**(added or {}), "image_embeds": [style.expand(steps, -1, -1)]}  # type: ignore[dict-item]
        # 5. one UNet call for all stages (after one call of each ControlNet, on the same input)
        if len(self.controlnets) and control is not None:
            down, mid = self.control_residuals(x, c.timesteps, texts, control, control_added)
            output = self.unet(x, c.timesteps, texts, timestep_cond, down, mid, added)
        elif added is not None:
            output = self.unet(x, c.timesteps, texts, timestep_cond, None, None, added)
        else:
            output = self.unet(x, c.timesteps, texts, timestep_cond)
        # 6. the scheduler's update, all stages at once
        x0, eps = split_prediction(self.prediction_type, output, x, c.sqrt_alpha, c.sqrt_one_minus_alpha)
        denoised = c.c_out * x0 + c.c_skip * x
        # 7. hand stages 0..k-2 on to the next timestep; the last stage is finished
        handed_on = c.next_signal[:-1] * denoised[:-1] + c.next_eps[:-1] * eps[:-1] + c.next_noise[:-1] * noise[1:]
        return denoised[-1:], handed_on

    def control_residuals(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        texts: torch.Tensor,
        control: ControlInputs,
        added: dict[str, torch.Tensor] | None = None,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Every ControlNet's residuals, scaled per stage and summed (``MultiControlNetModel``'s sum)."""
        down: tuple[torch.Tensor, ...] = ()
        mid = x  # (replaced by the first ControlNet's)
        for i, controlnet in enumerate(self.controlnets):
            d, m = controlnet(
                x,
                timesteps,
                encoder_hidden_states=texts,
                controlnet_cond=control.images[i].to(self.dtype),
                conditioning_scale=control.scales[i],
                added_cond_kwargs=added,
                return_dict=False,
            )
            if i == 0:
                down, mid = tuple(d), m
            else:
                down, mid = tuple(a + b for a, b in zip(down, d)), mid + m
        return down, mid

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Finished latents -> float image (h, w, 3) in [0, 1]."""
        # 8. VAE decode and denormalise
        image: torch.Tensor = self.vae.decode(latents / self.scaling_factor, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0)
