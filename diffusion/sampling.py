"""Sampling loop with classifier-free guidance over any diffusers scheduler."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def sample(
    decoder,
    scheduler,
    cond_states: torch.Tensor,
    uncond_states: torch.Tensor,
    generators: list[torch.Generator | None],
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    progress: bool = True,
    callback_on_step_end: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Images [B, C, S, S] in [-1, 1] for text states [B, L, W].

    Image i starts from noise drawn from ``generators[i]``, so a batch gives the same images
    as one call per image with the same generators. ``uncond_states`` ([B, L, W]) are the text
    encoder's states for the negative (by default empty) prompt; guidance is skipped at 1.0.
    """
    cfg = decoder.config
    batch = cond_states.shape[0]
    device, dtype = cond_states.device, cond_states.dtype
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    x = torch.stack([torch.randn(shape, generator=g, device=device, dtype=torch.float32) for g in generators])
    scheduler.set_timesteps(num_inference_steps, device=device)
    x = x * scheduler.init_noise_sigma
    guided = guidance_scale != 1.0
    states = torch.cat([uncond_states, cond_states]) if guided else cond_states
    step_kwargs = {}  # stochastic schedulers (ddpm, euler_a) draw noise in step(): from the shared generator
    if "generator" in inspect.signature(scheduler.step).parameters and len(set(map(id, generators))) == 1:
        step_kwargs["generator"] = generators[0]
    for i, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False)):
        inp = torch.cat([x, x]) if guided else x
        inp = scheduler.scale_model_input(inp, t)
        pred = decoder(inp.to(dtype), t.expand(inp.shape[0]), states).float()  # [(2)B, C, S, S]
        if guided:
            uncond, cond = pred.chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        x = scheduler.step(pred, t, x, **step_kwargs).prev_sample
        if callback_on_step_end is not None:
            callback_on_step_end(i, int(t), x)
    return x.clamp(-1, 1).view(batch, *shape)
