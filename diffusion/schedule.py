"""Noise schedules (diffusers' schedulers) and the two training objectives: what the denoiser is
given (noisy samples, timesteps), what it must predict and each sample's loss weight. ``ddpm``:
noise or v, min-SNR-gamma weighting; ``flow``: rectified flow as in SD3 (x_s = (1 - s) x + s e,
target e - x, noise levels and weights from diffusers' SD3 training utilities). The loss itself
lives with the other losses (``multimodal.losses.denoising_loss``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import importlib

import torch

if TYPE_CHECKING:  # the config module imports nothing of ours: no cycle
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from multimodal.config import DecoderConfig

# diffusers scheduler classes by name, imported on first use (importing diffusers takes seconds,
# and the commands that never sample should not pay for it)
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    "ddpm": "DDPMScheduler",
}
FLOW_SCHEDULERS = {"euler": "FlowMatchEulerDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}


def _diffusers(name: str):
    return getattr(importlib.import_module("diffusers"), name)


def scheduler_names(config: "DecoderConfig | None") -> list[str]:
    """The sampling schedulers a decoder with this config takes."""
    return sorted(FLOW_SCHEDULERS if config is not None and config.objective == "flow" else SCHEDULERS)


def train_scheduler(config: "DecoderConfig") -> DDPMScheduler | FlowMatchEulerDiscreteScheduler:
    """The training noise schedule; sampling schedulers are built from its config."""
    if config.objective == "flow":
        return _diffusers("FlowMatchEulerDiscreteScheduler")(num_train_timesteps=config.num_train_timesteps, shift=config.flow_shift)
    return _diffusers("DDPMScheduler")(
        num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type, clip_sample=False,
    )


def sampling_scheduler(name: str, config: "DecoderConfig"):
    """A diffusers scheduler by name (``ddim``, ``dpm++``, ``euler``, ...) for this schedule;
    for ``flow`` models ``euler`` (flow-matching Euler), ``dpm++`` and ``unipc`` with flow sigmas."""
    if config.objective == "flow":
        if name not in FLOW_SCHEDULERS:
            raise ValueError(f"scheduler must be one of {sorted(FLOW_SCHEDULERS)} for a flow-matching decoder, got {name!r}")
        if name == "euler":
            return train_scheduler(config)
        extra = {"algorithm_type": "dpmsolver++"} if name == "dpm++" else {}
        return _diffusers(FLOW_SCHEDULERS[name])(num_train_timesteps=config.num_train_timesteps, use_flow_sigmas=True,
                                                 prediction_type="flow_prediction", flow_shift=config.flow_shift, **extra)
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
    base = train_scheduler(config).config
    extra = {"algorithm_type": "dpmsolver++"} if name == "dpm++" else {}
    if name == "ddim":
        extra = {"set_alpha_to_one": False}
    return _diffusers(SCHEDULERS[name]).from_config(base, **extra)


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


class FlowObjective:
    """Rectified flow (SD3, Esser et al. 2024): a noise level s per sample from diffusers'
    ``compute_density_for_timestep_sampling`` (logit-normal by default) mapped through the
    shifted training schedule, x_s = (1 - s) x + s e, target e - x, weight from
    ``compute_loss_weighting_for_sd3``; the timestep given to the denoiser is 1000 s, as
    diffusers' flow schedulers give it at sampling time."""

    def __init__(self, config: "DecoderConfig"):
        self.scheduler = train_scheduler(config)
        self.config = config

    def draw(self, images: torch.Tensor, generator: torch.Generator | None = None) -> DenoisingTask:
        """Noise levels, noisy samples and targets for clean ``images`` [B, C, S, S]."""
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        cfg, n, device = self.config, images.shape[0], images.device
        noise = torch.randn(images.shape, generator=generator, device=device, dtype=images.dtype)
        u = compute_density_for_timestep_sampling(cfg.weighting_scheme, n, cfg.logit_mean, cfg.logit_std, cfg.mode_scale,
                                                  device=device, generator=generator)  # [B] in [0, 1]
        index = (u * cfg.num_train_timesteps).long().clamp(0, cfg.num_train_timesteps - 1)
        timesteps = self.scheduler.timesteps.to(device)[index]  # [B]
        sigmas = self.scheduler.sigmas.to(device=device, dtype=images.dtype)[index]  # [B]
        s = sigmas.view(-1, *([1] * (images.ndim - 1)))
        noisy = (1.0 - s) * images + s * noise
        weight = compute_loss_weighting_for_sd3(cfg.weighting_scheme, sigmas).float().expand(n)
        return DenoisingTask(noisy, timesteps, noise - images, weight)


def make_objective(config: "DecoderConfig") -> DDPMObjective | FlowObjective:
    """The decoder's training objective by ``config.objective``."""
    return FlowObjective(config) if config.objective == "flow" else DDPMObjective(config)
