"""Sampling loop with classifier-free guidance over any diffusers scheduler."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .decoder import TextCondition


@torch.no_grad()
def sample(
    decoder,
    scheduler,
    cond: TextCondition,
    uncond: TextCondition,
    generators: list[torch.Generator | None],
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    progress: bool = True,
    callback_on_step_end: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Images [B, C, S, S] in [-1, 1] for B texts' conditions (sampled in the decoder's latent
    space when it has a VAE, then decoded).

    Image i starts from noise drawn from ``generators[i]``, so a batch gives the same images
    as one call per image with the same generators. ``uncond`` is the condition of the negative
    (by default empty) prompt; guidance is skipped at 1.0.
    """
    device = cond.states.device
    # drawn on each generator's own device (CPU generators serve a GPU pipeline, as in diffusers), then moved
    x = torch.stack([torch.randn(decoder.sample_shape, generator=g, device=g.device if g is not None else device,
                                 dtype=torch.float32).to(device) for g in generators])
    scheduler.set_timesteps(num_inference_steps, device=device)
    if len(set(scheduler.timesteps.tolist())) < len(scheduler.timesteps):  # multistep solvers lose their place
        raise ValueError(f"num_inference_steps {num_inference_steps} gives repeated timesteps with the {type(scheduler).__name__} "
                         "of this decoder (flow_shift): use fewer steps or the euler scheduler")
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)  # flow schedulers start at pure noise
    scale = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    guided = guidance_scale != 1.0
    both = uncond.cat(cond) if guided else cond
    step_kwargs = {}  # stochastic schedulers (ddpm, euler_a) draw noise in step(): from the shared generator
    if "generator" in inspect.signature(scheduler.step).parameters and len(set(map(id, generators))) == 1:
        step_kwargs["generator"] = generators[0]
    flow = decoder.config.objective == "flow"
    for i, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False)):
        inp = torch.cat([x, x]) if guided else x
        inp = scale(inp, t)
        # flow: the solver's exact noise level (dpm++ / unipc round their timesteps to integers: 2% off near s = 0)
        t_in = scheduler.sigmas[i].to(device=device, dtype=torch.float32) * decoder.config.num_train_timesteps if flow else t
        pred = decoder(inp.to(both.states.dtype), t_in.expand(inp.shape[0]), both).float()  # [(2)B, C, S, S]
        if guided:
            uncond, cond = pred.chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        x = scheduler.step(pred, t, x, **step_kwargs).prev_sample
        if callback_on_step_end is not None:
            callback_on_step_end(i, int(t), x)
    return decoder.from_latents(x).clamp(-1, 1)  # [B, C, S, S]
