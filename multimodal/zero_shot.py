"""Class embeddings in the shared space: zero-shot weights from prompt ensembles and few-shot
prototypes from example images."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model import FoundationModel


@torch.no_grad()
def zero_shot_weights(model: "FoundationModel", prompts: list[list[str]]) -> torch.Tensor:
    """Class embeddings [C, E] from a prompt ensemble per class (same count for every class):
    the normalized mean of the normalized prompt embeddings."""
    texts = [p for class_prompts in prompts for p in class_prompts]
    emb = model.encode_text(texts).float().view(len(prompts), len(prompts[0]), -1).mean(dim=1)
    return torch.nn.functional.normalize(emb, dim=-1)


def prototypes(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class prototypes [C, E]: the normalized mean of each class's (normalized) embeddings."""
    # embeddings [N, E], labels [N]
    if (torch.bincount(labels, minlength=num_classes) == 0).any():
        raise ValueError("every class needs at least one example")
    sums = torch.zeros(num_classes, embeddings.shape[1], dtype=embeddings.dtype).index_add_(0, labels, embeddings)
    return torch.nn.functional.normalize(sums, dim=-1)
