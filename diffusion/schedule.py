"""Noise schedules (diffusers' schedulers) and the denoising loss."""

from __future__ import annotations

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from .config import DecoderConfig
from .decoder import TextCondition

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "unipc": UniPCMultistepScheduler,
    "ddpm": DDPMScheduler,
}


def train_scheduler(config: DecoderConfig) -> DDPMScheduler:
    """The training noise schedule; sampling schedulers are built from its config."""
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type, clip_sample=False,
    )


def sampling_scheduler(name: str, config: DecoderConfig):
    """A diffusers scheduler by name (``ddim``, ``dpm++``, ``euler``, ...) for this schedule."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
    base = train_scheduler(config).config
    extra = {"algorithm_type": "dpmsolver++"} if name == "dpm++" else {}
    if name == "ddim":
        extra = {"set_alpha_to_one": False}
    return SCHEDULERS[name].from_config(base, **extra)


def diffusion_loss(
    decoder,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    cond: TextCondition,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """MSE between the decoder's prediction and the target (noise, or v), optionally weighted
    by min-SNR-gamma. ``images`` [B, C, S, S] in [-1, 1]; ``cond`` for the same B texts."""
    noise = torch.randn_like(images)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (images.shape[0],), device=images.device)
    noisy = scheduler.add_noise(images, noise, t)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(images, noise, t)
    else:
        target = noise
    pred = decoder(noisy, t, cond)  # [B, C, S, S]
    per_sample = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # [B]
    if min_snr_gamma is not None:
        alphas = scheduler.alphas_cumprod.to(images.device)[t]
        snr = alphas / (1 - alphas)
        weight = snr.clamp(max=min_snr_gamma) / (snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr)
        per_sample = per_sample * weight
    return per_sample.mean()
