"""The diffusion decoder: a diffusers ``UNet2DConditionModel`` whose attention runs through the
project's core, plus its diffusers-format export."""

from __future__ import annotations

import copy

import math
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from .processor import CoreAttnProcessor

if TYPE_CHECKING:  # the config module imports nothing of ours: no cycle
    from multimodal.config import DecoderConfig


class TextCondition(NamedTuple):
    """What the decoder is conditioned on, for a batch of texts: the text encoder's full-length
    token states ``states`` [B, L, W] (cross-attention) and the texts' unit embeddings in the
    shared space ``embeds`` [B, E] (added to the timestep embedding)."""

    states: torch.Tensor
    embeds: torch.Tensor

    def cat(self, other: "TextCondition") -> "TextCondition":
        return TextCondition(torch.cat([self.states, other.states]), torch.cat([self.embeds, other.embeds]))

    def where(self, mask: torch.Tensor, other: "TextCondition") -> "TextCondition":
        """Per sample: ``other`` where ``mask`` [B] is true (``other`` may have batch 1)."""
        return TextCondition(
            torch.where(mask[:, None, None], other.states.to(self.states.dtype), self.states),
            torch.where(mask[:, None], other.embeds.to(self.embeds.dtype), self.embeds),
        )


def build_unet(config: "DecoderConfig", cross_attention_dim: int, text_embed_dim: int | None = None) -> UNet2DConditionModel:
    if config.text_embed_conditioning and text_embed_dim is None:
        raise ValueError("text_embed_dim is required when decoder.text_embed_conditioning is on")
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
        class_embed_type="projection" if config.text_embed_conditioning else None,
        projection_class_embeddings_input_dim=text_embed_dim if config.text_embed_conditioning else None,
    )


class Decoder(nn.Module):
    """Predicts noise (or v) for noisy images [B, C, S, S] given timesteps and a ``TextCondition``.

    With ``text_embed_conditioning`` the UNet's ``class_labels`` are the unit text embeddings
    times sqrt(E) (entries of unit variance, like the sinusoidal timestep features they join);
    a diffusers user of the exported ``decoder/`` passes the same."""

    def __init__(self, config: "DecoderConfig", cross_attention_dim: int, text_embed_dim: int | None = None,
                 attention_backend: str | None = None):
        super().__init__()
        self.config = config
        self.unet = build_unet(config, cross_attention_dim, text_embed_dim)
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.unet.to(memory_format=self.memory_format)
        self.set_attention_backend(attention_backend)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the UNet's activations in the backward pass (diffusers' own switch)."""
        if enable:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    def set_attention_backend(self, backend: str | None) -> None:
        """Install the core processor on every attention module of the UNet."""
        self.unet.set_attn_processor(CoreAttnProcessor(backend))

    @staticmethod
    def class_labels(embeds: torch.Tensor) -> torch.Tensor:
        """Unit text embeddings [B, E] -> the UNet's ``class_labels`` [B, E] (unit-variance entries)."""
        return embeds * math.sqrt(embeds.shape[-1])

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        # sample [B, C, S, S], timesteps [B], cond.states [B, L, W], cond.embeds [B, E] -> prediction [B, C, S, S]
        sample = sample.contiguous(memory_format=self.memory_format)
        labels = self.class_labels(cond.embeds).to(cond.states.dtype) if self.config.text_embed_conditioning else None
        return self.unet(sample, timesteps, encoder_hidden_states=cond.states, class_labels=labels).sample

    def save_diffusers(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write the UNet in diffusers' own folder format (``UNet2DConditionModel.from_pretrained``),
        optionally with its weights stored in ``dtype``."""
        if dtype is not None:
            copy.deepcopy(self.unet).to(dtype=dtype, memory_format=torch.contiguous_format).save_pretrained(
                str(directory), safe_serialization=True
            )
            return Path(directory)
        self.unet.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors
        try:
            self.unet.save_pretrained(str(directory), safe_serialization=True)
        finally:
            self.unet.to(memory_format=self.memory_format)
        return Path(directory)
