"""A diffusers attention processor that routes every UNet attention through the project's core.

Mirrors ``diffusers.models.attention_processor.AttnProcessor2_0`` step for step; only the
attention product itself changes (``encoders.attention.attention`` with its backends).
"""

from __future__ import annotations

import torch

from encoders.attention import attention


class CoreAttnProcessor:
    """Install with ``unet.set_attn_processor(CoreAttnProcessor(backend))``."""

    def __init__(self, backend: str | None = None):
        self.backend = backend

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # [B, C, H, W] -> [B, H*W, C]
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attention_mask is not None:
            # diffusers hands additive masks (0 / -10000); the core takes booleans (True = attend)
            kv_len = (encoder_hidden_states if encoder_hidden_states is not None else hidden_states).shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, kv_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
            attention_mask = attention_mask > -1.0 if attention_mask.dtype != torch.bool else attention_mask
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)  # [B, N, inner]
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)  # [B, M, inner]
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = attention(query, key, value, mask=attention_mask, backend=self.backend)  # [B, heads, N, head_dim]
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
