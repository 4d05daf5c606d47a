"""Causal text transformer; its token states are shared by the contrastive loss, the diffusion
decoder's cross-attention and the language head."""

from __future__ import annotations

import torch
from torch import nn

from typing import TYPE_CHECKING

from .blocks import KVCache, LayerNorm, Transformer

if TYPE_CHECKING:  # the config module imports nothing of ours: no cycle
    from multimodal.config import TextEncoderConfig


class TextEncoder(nn.Module):
    def __init__(self, config: "TextEncoderConfig", embed_dim: int, backend: str | None = None):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.transformer = Transformer(
            config.width, config.layers, config.heads, config.mlp_ratio, config.activation, backend=backend
        )
        self.ln_final = LayerNorm(config.width)
        self.projection = nn.Parameter(torch.empty(config.width, embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.projection, std=config.width**-0.5)
        self.transformer.init_weights()

    def token_states(self, tokens: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """tokens [B, N] at positions start .. start + N - 1 -> states [B, N, W] (after ln_final).

        With a ``cache`` holding positions 0 .. start - 1, only the new positions are computed
        (the language head's incremental generation); the states equal the uncached ones.
        """
        if start + tokens.shape[1] > self.config.context_length:
            raise ValueError(f"text of {start + tokens.shape[1]} tokens exceeds context_length {self.config.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[start : start + tokens.shape[1]]  # [B, N, W]
        return self.ln_final(self.transformer(x, causal=True, cache=cache))  # [B, N, W]

    def forward(self, tokens: torch.Tensor, trim: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, L] (L <= context_length) -> (states [B, L, W], pooled [B, E]).

        Pooling takes the end-of-text position, which is the highest token id (open_clip's
        ``argmax`` pooling); causal attention makes padding after it irrelevant, so no mask is
        needed, and (``trim_padding``) the batch is cut after its longest text: the pooled
        embedding is unchanged and padding-only positions cost nothing. States are then
        [B, L', W] with L' the longest text in the batch (end-of-text included).
        """
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor [batch, seq], got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[1] > self.config.context_length:
            raise ValueError(f"tokens has {tokens.shape[1]} positions; context_length is {self.config.context_length}")
        eot = tokens.argmax(dim=-1)  # [B]
        if self.config.trim_padding if trim is None else trim:
            tokens = tokens[:, : int(eot.max()) + 1]
        x = self.token_states(tokens)  # [B, L, W]
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]  # [B, W]
        return x, pooled @ self.projection.to(pooled.dtype)  # [B, L, W], [B, E]
