"""AdamW with per-component learning rates and no decay on norms, biases and embeddings, under
a linear-warmup + cosine schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

# Parameters without weight decay besides biases and norms (ndim < 2): embedding tables and the
# encoders' embedding parameters, by their own (last) name; a Linear inside e.g. the UNet's
# ``time_embedding`` is an ordinary weight and is decayed.
_NO_DECAY_LEAF_NAMES = ("positional_embedding", "class_embedding", "logit_scale")


def no_weight_decay(model: nn.Module) -> set[str]:
    """Names of ``model``'s parameters that get no weight decay."""
    names = set()
    for module_name, module in model.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{leaf}" if module_name else leaf
            if param.ndim < 2 or isinstance(module, nn.Embedding) or leaf in _NO_DECAY_LEAF_NAMES:
                names.add(full)
    return names


def adamw_cosine(module: nn.Module, hp: Any, total_steps: int) -> dict[str, Any]:
    """The optimizer and per-step schedule of ``module`` (a ``FoundationModule``) from its hyperparameters."""
    multipliers = hp.lr_multipliers or {}
    no_decay = {f"model.{n}" for n in no_weight_decay(module.model)}
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            groups.setdefault((_param_group(name), name not in no_decay), []).append(param)
    optimizer = torch.optim.AdamW(
        [
            {"params": params, "weight_decay": hp.weight_decay if decay else 0.0,
             "lr": hp.lr * multipliers.get(group, 1.0), "name": f"{group}{'' if decay else '_no_decay'}"}
            for (group, decay), params in groups.items()
        ],
        lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
        fused=_can_fuse(module, [p for g in groups.values() for p in g]) or None,
    )
    total = max(1, total_steps)
    warmup, floor = min(hp.warmup_steps, total), hp.min_lr_ratio

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _can_fuse(module: Any, params: list[torch.nn.Parameter]) -> bool:
    """One fused AdamW kernel for all parameters (CPU and CUDA) instead of a loop of small ops;
    not where Lightning clips gradients under mixed precision (it refuses a fused optimizer there)."""
    trainer = getattr(module, "_trainer", None)
    if trainer is not None and trainer.gradient_clip_val and "mixed" in str(trainer.precision):
        return False
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def _param_group(name: str) -> str:
    """The component a parameter belongs to (for ``lr_multipliers``)."""
    for component, prefix in (("text", "model.encoders.text."), ("image", "model.encoders.image."),
                              ("decoder", "model.decoder."), ("language", "model.language.")):
        if name.startswith(prefix):
            return component
    return "logit_scale" if name.endswith("logit_scale") else "other"
