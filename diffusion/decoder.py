"""The diffusion decoder: a diffusers ``UNet2DConditionModel`` whose attention runs through the
project's core, plus its diffusers-format export."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from .config import DecoderConfig
from .processor import CoreAttnProcessor


def build_unet(config: DecoderConfig, cross_attention_dim: int) -> UNet2DConditionModel:
    config.validate()
    channels = tuple(config.block_out_channels)
    mid = "UNetMidBlock2DCrossAttn" if any("CrossAttn" in b for b in config.down_block_types) else None
    return UNet2DConditionModel(
        sample_size=config.image_size,
        in_channels=config.channels,
        out_channels=config.channels,
        down_block_types=tuple(config.down_block_types),
        up_block_types=tuple(config.up_block_types),
        mid_block_type=mid,
        block_out_channels=channels,
        layers_per_block=config.layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=tuple(c // config.attention_head_dim for c in channels),  # diffusers: heads per block
        norm_num_groups=config.norm_num_groups,
    )


class Decoder(nn.Module):
    """Predicts noise (or v) for noisy images [B, C, S, S] given timesteps and text states."""

    def __init__(self, config: DecoderConfig, cross_attention_dim: int, attention_backend: str | None = None):
        super().__init__()
        self.config = config
        self.unet = build_unet(config, cross_attention_dim)
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.unet.to(memory_format=self.memory_format)
        self.set_attention_backend(attention_backend)

    def set_attention_backend(self, backend: str | None) -> None:
        """Install the core processor on every attention module of the UNet."""
        self.unet.set_attn_processor(CoreAttnProcessor(backend))

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        # sample [B, C, S, S], timesteps [B], text_states [B, L, W] -> prediction [B, C, S, S]
        sample = sample.contiguous(memory_format=self.memory_format)
        return self.unet(sample, timesteps, encoder_hidden_states=text_states).sample

    def save_diffusers(self, directory: str | Path) -> Path:
        """Write the UNet in diffusers' own folder format (``UNet2DConditionModel.from_pretrained``)."""
        self.unet.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors
        try:
            self.unet.save_pretrained(str(directory), safe_serialization=True)
        finally:
            self.unet.to(memory_format=self.memory_format)
        return Path(directory)
