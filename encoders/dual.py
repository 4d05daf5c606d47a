"""The shared pair of encoders: text and image towers in one CLIP-style embedding space."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from typing import TYPE_CHECKING

from .image import ImageEncoder
from .text import TextEncoder

if TYPE_CHECKING:  # the config module imports nothing of ours: no cycle
    from multimodal.config import FoundationConfig


class DualEncoder(nn.Module):
    def __init__(self, config: "FoundationConfig"):
        """``config``: anything with ``embed_dim``, ``text``, ``image``, ``logit_scale_init``,
        ``attention_backend`` and ``grad_checkpointing`` (a ``FoundationConfig``)."""
        super().__init__()
        self.config = config
        backend = config.attention_backend
        self.text = TextEncoder(config.text, config.embed_dim, backend)
        self.image = ImageEncoder(config.image, config.embed_dim, backend)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.set_grad_checkpointing(config.grad_checkpointing)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.text.transformer.grad_checkpointing = enable
        self.image.transformer.grad_checkpointing = enable

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """tokens [B, L] -> text embeddings [B, E] (L2-normalized by default)."""
        pooled = self.text(tokens)[1]
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images [B, C, S, S] -> image embeddings [B, E] (L2-normalized by default)."""
        pooled = self.image(images)[1]
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both towers at once; token states are returned for the heads that reuse them."""
        image_states, image_pooled = self.image(images)  # [B, 1 + N, W], [B, E]
        text_states, text_pooled = self.text(tokens)  # [B, L, W], [B, E]
        return {
            "image_features": F.normalize(image_pooled, dim=-1),
            "text_features": F.normalize(text_pooled, dim=-1),
            "image_states": image_states,
            "text_states": text_states,
            "logit_scale": self.logit_scale.exp(),
        }
