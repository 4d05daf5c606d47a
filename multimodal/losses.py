"""Every training loss, each taking ``FoundationModel.forward``'s dict: contrastive (open_clip's
``ClipLoss``, also across ranks), caption cross-entropy and the weighted denoising loss; plus the
per-token log-likelihood that ``FoundationPipeline.score`` shares with the caption loss."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .config import LOSSES

if TYPE_CHECKING:  # open_clip is imported where a loss is built: importing it takes seconds
    from open_clip.loss import ClipLoss


def contrastive_loss(out: dict[str, torch.Tensor], clip_loss: ClipLoss | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (image->text and text->image), CLIP's loss."""
    if clip_loss is None:
        from open_clip.loss import ClipLoss

        clip_loss = ClipLoss()
    return clip_loss(out["image_features"], out["text_features"], out["logit_scale"])


def caption_loss(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the captions' real tokens (in fp32)."""
    return F.cross_entropy(out["caption_logits"].float(), out["caption_targets"])


def denoising_loss(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample MSE between the denoiser's prediction and its target, times the objective's
    per-sample weight (ddpm: min-SNR-gamma or 1; flow: diffusers' SD3 weighting), averaged over the batch."""
    per_sample = (out["denoise_pred"].float() - out["denoise_target"].float()).pow(2).flatten(1).mean(1)  # [n]
    return (per_sample * out["denoise_weight"]).mean()


def token_log_likelihood(logits: torch.Tensor, tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Log-likelihood [B] of each text's tokens after the first (end-of-text included, padding
    not): ``logits`` [B, L-1, V] predict ``tokens`` [B, L] shifted by one, as the caption loss."""
    target = tokens[:, 1:]  # [B, L-1]
    logp = logits.float().log_softmax(-1).gather(-1, target[..., None]).squeeze(-1)  # [B, L-1]
    return (logp * (target != pad_id)).sum(-1)


LOSS_FUNCTIONS = {"contrastive": contrastive_loss, "caption": caption_loss, "diffusion": denoising_loss}


class FoundationLoss(nn.Module):
    """The weighted sum of the losses whose weight is > 0; returns every term and ``loss``.

    ``rank`` / ``world_size``: under DDP each rank scores its local batch against the features
    gathered from all ranks (with gradients), so the mean over ranks is the global batch's loss.
    """

    def __init__(self, weights: dict[str, float], rank: int = 0, world_size: int = 1):
        super().__init__()
        unknown = sorted(set(weights) - set(LOSSES))
        if unknown:
            raise ValueError(f"loss weights: unknown loss(es) {unknown}; known: {', '.join(LOSSES)}")
        self.weights = {k: float(w) for k, w in weights.items() if w > 0}
        from open_clip.loss import ClipLoss

        self.clip_loss = ClipLoss(
            local_loss=world_size > 1, gather_with_grad=world_size > 1, cache_labels=True, rank=rank, world_size=world_size,
        )

    @property
    def heads(self) -> tuple[str, ...]:
        """What ``FoundationModel.forward`` must compute for these losses."""
        return tuple(self.weights)

    def forward(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms = {
            name: contrastive_loss(out, self.clip_loss) if name == "contrastive" else LOSS_FUNCTIONS[name](out)
            for name in self.weights
        }
        device = next(iter(out.values())).device
        terms["loss"] = sum((self.weights[k] * v for k, v in terms.items()), torch.zeros((), device=device))
        return terms
