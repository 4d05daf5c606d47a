"""Noise schedules (diffusers' schedulers) and the DDPM training objective: what the denoiser is
given (noisy images, timesteps) and what it must predict (noise, or v), with the per-sample
loss weight (min-SNR-gamma). The loss itself lives with the other losses
(``multimodal.losses.denoising_loss``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

if TYPE_CHECKING:  # the config module imports nothing of ours: no cycle
    from multimodal.config import DecoderConfig

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "unipc": UniPCMultistepScheduler,
    "ddpm": DDPMScheduler,
}


def train_scheduler(config: "DecoderConfig") -> DDPMScheduler:
    """The training noise schedule; sampling schedulers are built from its config."""
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type, clip_sample=False,
    )


def sampling_scheduler(name: str, config: "DecoderConfig"):
    """A diffusers scheduler by name (``ddim``, ``dpm++``, ``euler``, ...) for this schedule."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
    base = train_scheduler(config).config
    extra = {"algorithm_type": "dpmsolver++"} if name == "dpm++" else {}
    if name == "ddim":
        extra = {"set_alpha_to_one": False}
    return SCHEDULERS[name].from_config(base, **extra)


class DenoisingTask(NamedTuple):
    """One training draw: the denoiser's input ``noisy`` [B, C, S, S] at ``timesteps`` [B], the
    ``target`` [B, C, S, S] it must predict and each sample's loss ``weight`` [B]."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor


class DDPMObjective:
    """DDPM noise (epsilon or v target) on diffusers' ``DDPMScheduler``, with optional
    min-SNR-gamma weighting (Hang et al. 2023)."""

    def __init__(self, config: "DecoderConfig"):
        self.scheduler = train_scheduler(config)
        self.min_snr_gamma = config.min_snr_gamma

    def draw(self, images: torch.Tensor, generator: torch.Generator | None = None) -> DenoisingTask:
        """Noise and timesteps for clean ``images`` [B, C, S, S] in [-1, 1]."""
        cfg = self.scheduler.config
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        t = torch.randint(0, cfg.num_train_timesteps, (images.shape[0],), device=images.device, generator=generator)
        noisy = self.scheduler.add_noise(images, noise, t)
        v = cfg.prediction_type == "v_prediction"
        target = self.scheduler.get_velocity(images, noise, t) if v else noise
        weight = torch.ones(images.shape[0], device=images.device)
        if self.min_snr_gamma is not None:
            alphas = self.scheduler.alphas_cumprod.to(images.device)[t]
            snr = alphas / (1 - alphas)
            weight = snr.clamp(max=self.min_snr_gamma) / (snr + 1 if v else snr)
        return DenoisingTask(noisy, t, target, weight)
