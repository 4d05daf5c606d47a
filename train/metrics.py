"""Alignment metrics on embeddings: zero-shot accuracy and retrieval recall."""

from __future__ import annotations

import torch


def zero_shot_accuracy(image_features: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor) -> float:
    """Share of images [N, E] whose nearest class embedding [C, E] is their label [N]."""
    return (image_features @ class_weights.T).argmax(dim=-1).eq(labels).float().mean().item()


def retrieval_recall(
    image_features: torch.Tensor, groups: torch.Tensor, text_features: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Recall@k both ways over unique captions.

    ``text_features`` [G, E] holds one embedding per unique caption and ``groups`` [N] says
    which caption each image [N, E] has. image->text: the image's caption is in its top k;
    text->image: some image with that caption is in the caption's top k. Images that share a
    caption (same attributes, different jitter) are all correct answers, as they should be.
    """
    sims = image_features @ text_features.T  # [N, G]
    out = {}
    for k in ks:
        k_t = min(k, sims.shape[1])
        top_t = sims.topk(k_t, dim=1).indices  # [N, k]
        out[f"i2t_R@{k}"] = top_t.eq(groups[:, None]).any(dim=1).float().mean().item()
        k_i = min(k, sims.shape[0])
        top_i = sims.T.topk(k_i, dim=1).indices  # [G, k]
        hit = groups[top_i].eq(torch.arange(sims.shape[1], device=groups.device)[:, None]).any(dim=1)
        present = torch.zeros(sims.shape[1], dtype=torch.bool, device=groups.device)
        present[groups] = True
        out[f"t2i_R@{k}"] = hit[present].float().mean().item()
    return out
