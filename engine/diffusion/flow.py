"""Flow matching on the frame path: FLUX, SD3 / SD3.5 and SANA-Sprint img2img as one tensor function.

In rectified flow a sample lies on the straight line between data and noise,
``x_t = (1 - sigma) * x_0 + sigma * noise``; the transformer predicts the velocity
``v = noise - x_0`` and a step is Euler's, ``x <- x + (sigma_next - sigma) * v``. SANA-Sprint
is TrigFlow (sCM), the same idea on a quarter circle: ``x_s = cos(s) * x_0 + sin(s) * noise``,
and its consistency step jumps to the predicted ``x_0`` and re-noises it to the next angle.

``FlowHotPath.frame(*FlowInputs)`` has the shape of the UNet hot path (``hotpath.py``):

    encode   uint8 frame -> VAE latents (the model's shift and scaling) -> the point on the line
             at the first stage's sigma (``scale_noise``'s formula, with the fixed noise)
    denoise  all stages in one transformer call (the stream batch) -> finished latents + next buffer
    decode   finished latents -> uint8 image

The numbers are the scheduler's own: ``flow_schedule`` runs ``set_timesteps`` as the
pipelines do (FLUX's ``calculate_shift`` mu, SD3's dynamic shifting when its config asks for
it, SCM's ``max_timesteps``) and keeps the stages img2img at this strength would run. Only
the formulas of ``scale_noise`` and ``step`` are written here, once, for all stages at once;
the tests hold them to diffusers' pipelines.

Importing this module needs torch but not diffusers; the pipelines' helpers are imported
where they are used.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

FlowKind = Literal["flux", "sd3", "sana_sprint"]
FLOW_KINDS: tuple[FlowKind, ...] = ("flux", "sd3", "sana_sprint")
TRIGFLOW_MAX = 1.57080  # SANA-Sprint's max_timesteps (pi / 2 rounded, as its pipeline writes it)


class UnsupportedScheduler(ValueError):
    """The model came with a scheduler the flow hot path does not implement."""


def flow_kind(pipe: Any) -> FlowKind:
    """Which of the three families a diffusers pipeline (or its transformer) is."""
    transformer = getattr(pipe, "transformer", pipe)
    name = type(transformer).__name__
    if name.startswith("Flux"):
        return "flux"
    if name.startswith("SD3"):
        return "sd3"
    if name.startswith("Sana"):
        return "sana_sprint"
    raise ValueError(f"{name} is not a FLUX, SD3 or SANA transformer")


def check_scheduler(kind: FlowKind, scheduler: Any) -> None:
    """One line naming the scheduler and the fix, when it is not the one the hot path implements."""
    wanted = "SCMScheduler" if kind == "sana_sprint" else "FlowMatchEulerDiscreteScheduler"
    have = type(scheduler).__name__
    if have != wanted:
        raise UnsupportedScheduler(
            f"the {kind} hot path runs {wanted}, this model has {have}: use the model's own "
            f"scheduler folder (scheduler/scheduler_config.json with _class_name {wanted})"
        )
    if kind != "sana_sprint" and scheduler.config.get("stochastic_sampling", False):
        raise UnsupportedScheduler(
            "FlowMatchEulerDiscreteScheduler with stochastic_sampling is not supported: set it to false"
        )


# -- the schedule -----------------------------------------------------------------------------------


class FlowCoefficients(NamedTuple):
    """Per-stage numbers, float32 (k,): the model's timestep input and the stage's two sigmas.

    Flow matching: ``sigmas`` / ``next_sigmas`` are the scheduler's sigmas at and after each
    stage, ``timesteps`` its timesteps. TrigFlow: both are SCM angles (``timesteps`` = ``sigmas``).
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor
    next_sigmas: torch.Tensor


@dataclass(frozen=True)
class FlowSchedule:
    kind: FlowKind
    timesteps: tuple[float, ...]
    sigmas: tuple[float, ...]  # k + 1: each stage's, then the end (0 for a full trajectory)
    total_steps: int  # the num_inference_steps of the pipeline call this is the tail of

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def strength(self) -> float:
        """The pipeline's ``strength`` for the same stages (SCM: the angle over its maximum)."""
        if self.kind == "sana_sprint":
            return self.sigmas[0] / TRIGFLOW_MAX
        return self.steps / self.total_steps

    def tensors(self, device: torch.device) -> FlowCoefficients:
        def vector(values: tuple[float, ...]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        return FlowCoefficients(vector(self.timesteps), vector(self.sigmas[:-1]), vector(self.sigmas[1:]))


def image_seq_len(kind: FlowKind, latent_size: tuple[int, int], patch_size: int) -> int:
    """The transformer's image tokens, as the pipelines count them for ``calculate_shift``."""
    height, width = latent_size
    patch = 2 if kind == "flux" else patch_size  # FLUX packs 2x2 latents into one token
    return (height // patch) * (width // patch)


def flow_schedule(
    kind: FlowKind, scheduler: Any, steps: int, strength: float, seq_len: int, *, device: torch.device | None = None
) -> FlowSchedule:
    """The last ``steps`` stages of the schedule img2img at ``strength`` runs, from the scheduler itself.

    Flow matching: ``num_inference_steps = round(steps / strength)``, set on a copy of the
    scheduler exactly as the FLUX / SD3 img2img pipelines set it, then the pipelines'
    ``get_timesteps`` tail of ``steps`` stages; so ``strength`` moves in steps of the total
    (at ``steps / total`` it is exactly the pipeline's call). SANA-Sprint (SCM): the first
    angle is ``strength * max_timesteps`` and the scheduler spaces ``steps`` stages to 0 (its
    pipeline's ``max_timesteps`` argument; ``intermediate_timesteps`` off).
    Raises ValueError for a strength or step count the schedule cannot give.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength {strength} is outside (0, 1]: 0 would keep the frame as it is")
    check_scheduler(kind, scheduler)
    fresh = type(scheduler).from_config(scheduler.config)  # set_timesteps mutates: never the model's own
    if kind == "sana_sprint":
        fresh.set_timesteps(steps, max_timesteps=strength * TRIGFLOW_MAX, intermediate_timesteps=None, device=device)
        angles = tuple(float(t) for t in fresh.timesteps)
        return FlowSchedule(kind, angles[:-1], angles, steps)
    total = max(steps, round(steps / strength))
    kwargs: dict[str, Any] = {}
    sigmas = None
    if kind == "flux":
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux_img2img import calculate_shift

        sigmas = np.linspace(1.0, 1 / total, total)  # what FluxImg2ImgPipeline passes
        config = fresh.config
        kwargs["mu"] = calculate_shift(
            seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
    elif fresh.config.get("use_dynamic_shifting", None):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import calculate_shift

        config = fresh.config
        kwargs["mu"] = calculate_shift(
            seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        )
    fresh.set_timesteps(total if sigmas is None else None, device=device, sigmas=sigmas, **kwargs)
    start = total - steps  # get_timesteps' t_start (order 1)
    timesteps = tuple(float(t) for t in fresh.timesteps[start:])
    stage_sigmas = tuple(float(s) for s in fresh.sigmas[start:])
    return FlowSchedule(kind, timesteps, stage_sigmas, total)


# -- the transformer as a tensor function -------------------------------------------------------------


class FlowText(NamedTuple):
    """A prompt as the transformer reads it: (1, S, D) embeddings and what goes with them."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None  # FLUX, SD3: (1, P) pooled CLIP
    mask: torch.Tensor | None  # SANA: (1, S) attention mask


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FLUX's 2x2 patches as tokens: (B, C, h, w) -> (B, h/2 * w/2, 4C) (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, channels = tokens.shape
    latents = tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, h, w)


def flux_image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) positions of the packed tokens (FluxImg2ImgPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FlowTransformer(torch.nn.Module):
    """(latents (B, C, h, w), scheduler timesteps (B,), text, guidance) -> the scheduler's model output.

    One ``forward`` for the three families, each called exactly as its img2img pipeline calls it.
    """

    def __init__(self, kind: FlowKind, transformer: Any, latent_size: tuple[int, int], sigma_data: float) -> None:
        super().__init__()
        self.kind = kind
        self.transformer = transformer
        self.height, self.width = latent_size
        self.sigma_data = sigma_data
        config = transformer.config
        self.guidance_embeds = bool(config.get("guidance_embeds", False))
        self.guidance_scale_factor = float(config.get("guidance_embeds_scale", 1.0))
        self.image_ids: torch.Tensor | None = None
        if kind == "flux":
            self.image_ids = flux_image_ids(self.height, self.width, transformer.device, transformer.dtype)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        text: FlowText,
        guidance: torch.Tensor | None,
        negative: FlowText | None = None,
    ) -> torch.Tensor:
        """``negative``: SD3's classifier-free guidance (its pipeline's ``guidance_scale > 1``): the
        negative and the positive prompt in one batch, ``uncond + guidance * (cond - uncond)``."""
        batch = x.shape[0]
        embeds = text.embeds.expand(batch, -1, -1)
        dtype = self.transformer.dtype
        output: torch.Tensor
        if self.kind == "flux":
            assert text.pooled is not None and self.image_ids is not None  # FLUX prompts have a pooled part
            output = self.transformer(
                hidden_states=pack_latents(x),
                timestep=timesteps.to(x.dtype) / 1000,
                guidance=None if not self.guidance_embeds or guidance is None else guidance.expand(batch),
                pooled_projections=text.pooled.expand(batch, -1),
                encoder_hidden_states=embeds,
                txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=embeds.dtype),
                img_ids=self.image_ids,
                return_dict=False,
            )[0]
            return unpack_latents(output, self.height, self.width)
        if self.kind == "sd3":
            assert text.pooled is not None
            pooled = text.pooled.expand(batch, -1)
            if negative is None or guidance is None:
                output = self.transformer(
                    hidden_states=x,
                    timestep=timesteps,
                    encoder_hidden_states=embeds,
                    pooled_projections=pooled,
                    return_dict=False,
                )[0]
                return output
            assert negative.pooled is not None
            output = self.transformer(
                hidden_states=torch.cat([x, x]),
                timestep=torch.cat([timesteps, timesteps]),
                encoder_hidden_states=torch.cat([negative.embeds.expand(batch, -1, -1), embeds]),
                pooled_projections=torch.cat([negative.pooled.expand(batch, -1), pooled]),
                return_dict=False,
            )[0]
            uncond, cond = output.chunk(2)
            return uncond + guidance.to(cond.dtype) * (cond - uncond)
        # SANA-Sprint: TrigFlow in, SCM's parameterisation around the transformer (its pipeline's loop)
        assert text.mask is not None
        scm = torch.sin(timesteps) / (torch.cos(timesteps) + torch.sin(timesteps))
        scm4 = scm.view(-1, 1, 1, 1)
        norm = torch.sqrt(scm4**2 + (1 - scm4) ** 2)
        model_in = x / self.sigma_data * norm
        scale = guidance if guidance is not None else torch.ones(1, device=x.device)
        output = self.transformer(
            model_in.to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            encoder_attention_mask=text.mask.expand(batch, -1),
            guidance=scale.expand(batch).to(embeds.dtype) * self.guidance_scale_factor,
            timestep=scm,
            return_dict=False,
        )[0]
        output = ((1 - 2 * scm4) * model_in + (1 - 2 * scm4 + 2 * scm4**2) * output) / norm
        return output.float() * self.sigma_data


# -- the frame --------------------------------------------------------------------------------------


class FlowInputs(NamedTuple):
    """Everything a flow frame reads, as fixed device tensors (live changes write into them)."""

    pixels: torch.Tensor  # (H, W, 3) uint8 at the model's size
    buffer: torch.Tensor  # (k-1, C, h, w): the stream batch's frames in flight
    noise: torch.Tensor  # (k, C, h, w): the fixed noise (SCM re-noises each stage with the next one)
    embeds: torch.Tensor  # (1, S, D)
    pooled: torch.Tensor | None
    mask: torch.Tensor | None
    negative_embeds: torch.Tensor | None  # SD3 with classifier-free guidance: the empty prompt's
    negative_pooled: torch.Tensor | None
    guidance: torch.Tensor | None  # (1,) float32: a guidance embedding's input, or SD3's CFG scale
    coefficients: FlowCoefficients


class FlowStep(NamedTuple):
    """One point of a trajectory (``FlowHotPath.trajectory``): the state and its predicted end."""

    step: int  # 1..steps
    total: int
    x_t: torch.Tensor  # latents after this step
    x0: torch.Tensor  # the clean latents this step predicts


class FlowHotPath(torch.nn.Module):
    """One flow-matching frame as a pure tensor function (see the module docstring)."""

    def __init__(self, kind: FlowKind, pipe: Any, *, size: tuple[int, int], dtype: torch.dtype) -> None:
        super().__init__()
        self.kind = kind
        self.height, self.width = size
        self.dtype = dtype
        # Any: diffusers' VAE classes (encode, decode, config)
        self.vae: Any = pipe.vae
        vae_config: Any = self.vae.config
        self.scaling_factor = float(vae_config.scaling_factor)
        self.shift_factor = float(vae_config.get("shift_factor", None) or 0.0)
        self.sigma_data = float(pipe.scheduler.config.get("sigma_data", 1.0)) if kind == "sana_sprint" else 1.0
        self.scale = vae_downscale(self.vae)
        self.latent_size = (self.height // self.scale, self.width // self.scale)
        self.velocity = FlowTransformer(kind, pipe.transformer, self.latent_size, self.sigma_data)
        # SANA's pipeline keeps its latents in float32 (and casts for the transformer); FLUX and SD3 in the model's
        self.latent_dtype = torch.float32 if kind == "sana_sprint" else dtype

    def frame(
        self,
        pixels: torch.Tensor,
        buffer: torch.Tensor,
        noise: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor | None,
        mask: torch.Tensor | None,
        negative_embeds: torch.Tensor | None,
        negative_pooled: torch.Tensor | None,
        guidance: torch.Tensor | None,
        c: FlowCoefficients,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (H, W, 3) -> (uint8 image (H, W, 3), the next stream-batch buffer)."""
        first = self.encode(pixels, noise[:1], c.sigmas[:1])
        negative = None if negative_embeds is None else FlowText(negative_embeds, negative_pooled, None)
        finished, handed_on = self.denoise(first, buffer, noise, FlowText(embeds, pooled, mask), guidance, c, negative)
        return self.decode(finished).mul(255).round().to(torch.uint8), handed_on

    def encode(self, frame: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """uint8 (H, W, 3) -> (1, C, h, w) latents on the line at the first stage's sigma."""
        if tuple(frame.shape) != (self.height, self.width, 3):
            raise ValueError(
                f"the frame is {tuple(frame.shape)}, the model takes ({self.height}, {self.width}, 3): fit it first"
            )
        image = (frame.permute(2, 0, 1).unsqueeze(0).to(torch.float32) / 127.5 - 1.0).to(self.dtype)
        latents = self.vae_latents(image)
        if self.kind == "sana_sprint":  # TrigFlow: cos / sin of the angle, in units of sigma_data
            return torch.cos(sigma) * latents + torch.sin(sigma) * (noise * self.sigma_data)
        s = sigma.to(latents.dtype).view(-1, 1, 1, 1)  # scale_noise: sigma in the sample's dtype
        return s * noise.to(latents.dtype) + (1.0 - s) * latents

    def vae_latents(self, image: torch.Tensor) -> torch.Tensor:
        """The VAE's latents of a [-1, 1] image, shifted and scaled as the model's pipeline does."""
        if self.kind == "sana_sprint":  # AutoencoderDC: deterministic
            latent: torch.Tensor = self.vae.encode(image).latent
            return latent * self.scaling_factor * self.sigma_data
        mean: torch.Tensor = self.vae.encode(image).latent_dist.mode()  # the posterior mean: deterministic
        return (mean - self.shift_factor) * self.scaling_factor

    def denoise(
        self,
        first: torch.Tensor,
        buffer: torch.Tensor,
        noise: torch.Tensor,
        text: FlowText,
        guidance: torch.Tensor | None,
        c: FlowCoefficients,
        negative: FlowText | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One transformer call over every stage -> (finished latents, the next buffer)."""
        x = torch.cat([first, buffer]) if buffer.shape[0] else first
        output = self.velocity(x, c.timesteps, text, guidance, negative)
        renoise = torch.cat([noise[1:], noise[:1]])  # SCM: stage i goes on with noise i + 1 (the last: unused)
        x0, x_next = self.step(x, output, renoise, c)
        if self.kind == "sana_sprint":
            return x0[-1:], x_next[:-1]
        return x_next[-1:], x_next[:-1]

    def step(
        self, x: torch.Tensor, output: torch.Tensor, renoise: torch.Tensor, c: FlowCoefficients
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The scheduler's ``step`` for every stage at once -> (predicted x0, the next state).

        ``renoise``: SCM only, the noise each stage's x0 is re-noised with (one per stage)."""
        s = c.sigmas.view(-1, 1, 1, 1)
        t = c.next_sigmas.view(-1, 1, 1, 1)
        if self.kind == "sana_sprint":  # SCMScheduler.step: x0, then re-noised to the next angle
            x0 = torch.cos(s) * x - torch.sin(s) * output
            return x0, torch.cos(t) * x0 + torch.sin(t) * (renoise * self.sigma_data)
        # FlowMatchEulerDiscreteScheduler.step: Euler in float32, back to the model's dtype
        x_next = (x.to(torch.float32) + (t - s) * output).to(output.dtype)
        x0 = x - s.to(x.dtype) * output  # the line's end: x_t - sigma * v
        return x0, x_next

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Finished latents -> float image (H, W, 3) in [0, 1]."""
        if self.kind == "sana_sprint":
            latents = (latents / self.sigma_data).to(self.vae.dtype) / self.scaling_factor
        else:
            latents = latents / self.scaling_factor + self.shift_factor
        image: torch.Tensor = self.vae.decode(latents, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0)

    def trajectory(
        self,
        pixels: torch.Tensor,
        noise: torch.Tensor,
        text: FlowText,
        guidance: torch.Tensor | None,
        c: FlowCoefficients,
        negative: FlowText | None = None,
    ) -> Iterator[FlowStep]:
        """The same flow one image at a time, stage after stage: each point on the way (the flow scene).

        Its last ``x_t`` (flow matching) or ``x0`` (SCM) is the image ``frame`` gives after the batch fills.
        """
        steps = c.timesteps.shape[0]
        x = self.encode(pixels, noise[:1], c.sigmas[:1])
        for i in range(steps):
            stage = FlowCoefficients(c.timesteps[i : i + 1], c.sigmas[i : i + 1], c.next_sigmas[i : i + 1])
            output = self.velocity(x, stage.timesteps, text, guidance, negative)
            after = (i + 1) % noise.shape[0]  # SCM: stage i re-noises with noise i + 1 (the last: unused)
            x0, x = self.step(x, output, noise[after : after + 1], stage)
            yield FlowStep(i + 1, steps, x, x0)


def vae_downscale(vae: Any) -> int:
    """How many pixels one latent covers: 8 for FLUX / SD3's VAE, 32 for SANA's DC-AE."""
    config = vae.config
    if type(vae).__name__ == "AutoencoderDC":
        return int(2 ** (len(config.encoder_block_out_channels) - 1))
    return int(2 ** (len(config.block_out_channels) - 1))


def guidance_tensor(scale: float, device: torch.device) -> torch.Tensor:
    return torch.full((1,), float(scale), dtype=torch.float32, device=device)


__all__ = [
    "FLOW_KINDS",
    "FlowCoefficients",
    "FlowHotPath",
    "FlowInputs",
    "FlowKind",
    "FlowSchedule",
    "FlowStep",
    "FlowText",
    "FlowTransformer",
    "UnsupportedScheduler",
    "check_scheduler",
    "flow_kind",
    "flow_schedule",
    "guidance_tensor",
    "image_seq_len",
]
