"""A diffusers attention processor that routes every attention of the denoisers through the
project's core: the UNet's self- and cross-attention and the MMDiT's joint attention.

Mirrors ``diffusers.models.attention_processor.AttnProcessor2_0`` and, for attention modules
with context projections (SD3's joint blocks), ``JointAttnProcessor2_0`` step for step; only the
attention product itself changes (``encoders.attention.attention`` with its backends).
"""

from __future__ import annotations

import torch

from encoders.attention import attention


class CoreAttnProcessor:
    """Install with ``denoiser.set_attn_processor(CoreAttnProcessor(backend))``."""

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
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if getattr(attn, "add_q_proj", None) is not None and encoder_hidden_states is not None:
            return self.joint(attn, hidden_states, encoder_hidden_states)
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
        query, key, value = (_heads(t, attn.heads) for t in (query, key, value))  # [B, heads, N or M, head_dim]
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = attention(query, key, value, mask=attention_mask, backend=self.backend)  # [B, heads, N, head_dim]
        out = out.transpose(1, 2).flatten(2).to(query.dtype)  # [B, N, inner]
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def joint(self, attn, hidden_states: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SD3's joint attention: image tokens [B, N, D] and context tokens [B, M, D] attend
        together, each stream with its own projections and norms; returns both streams' outputs."""
        n = hidden_states.shape[1]
        sample = [_heads(proj(hidden_states), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v)]
        extra = [_heads(proj(context), attn.heads) for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
        for i, (norm, added) in enumerate(((attn.norm_q, attn.norm_added_q), (attn.norm_k, attn.norm_added_k))):
            if norm is not None:
                sample[i] = norm(sample[i])
            if added is not None:
                extra[i] = added(extra[i])
        query, key, value = (torch.cat([s, e], dim=2) for s, e in zip(sample, extra))  # [B, heads, N + M, head_dim]
        out = attention(query, key, value, backend=self.backend)  # [B, heads, N + M, head_dim]
        out = out.transpose(1, 2).flatten(2).to(query.dtype)  # [B, N + M, inner]
        hidden, context = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](hidden)), context


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, heads * head_dim] -> [B, heads, N, head_dim]."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)
