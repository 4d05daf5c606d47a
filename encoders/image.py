"""Vision transformer (patch embedding + class token), laid out like open_clip's."""

from __future__ import annotations

import torch
from torch import nn

from typing import TYPE_CHECKING

from .blocks import LayerNorm, Transformer

if TYPE_CHECKING:  # the config module imports nothing of ours: no cycle
    from multimodal.config import ImageEncoderConfig


class ImageEncoder(nn.Module):
    def __init__(self, config: "ImageEncoderConfig", embed_dim: int, backend: str | None = None):
        super().__init__()
        if config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} must be a multiple of patch_size {config.patch_size}")
        self.config = config
        grid = config.image_size // config.patch_size
        scale = config.width**-0.5
        self.patch_embed = nn.Conv2d(config.channels, config.width, config.patch_size, config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(config.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, config.width))
        self.ln_pre = LayerNorm(config.width)
        self.transformer = Transformer(
            config.width, config.layers, config.heads, config.mlp_ratio, config.activation, backend=backend
        )
        self.ln_post = LayerNorm(config.width)
        self.projection = nn.Parameter(scale * torch.randn(config.width, embed_dim))

    def check_images(self, images: torch.Tensor) -> None:
        c, s = self.config.channels, self.config.image_size
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (c, s, s):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must have shape [batch, {c}, {s}, {s}] (the encoder's image_size), got {shape}")

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, C, S, S] (normalized) -> (states [B, 1 + N, W], pooled [B, E])."""
        self.check_images(images)
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)  # [B, N, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, W]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, 1 + N, W]
        x = self.ln_post(self.transformer(self.ln_pre(x)))  # [B, 1 + N, W]
        return x, x[:, 0] @ self.projection.to(x.dtype)  # [B, 1 + N, W], [B, E]
