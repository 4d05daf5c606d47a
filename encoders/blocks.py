"""Pre-LayerNorm transformer blocks: the only blocks the encoders (and heads) use.

Parameter names mirror open_clip's where the weights map one to one (ln_1, ln_2, attn, mlp),
so importing open_clip checkpoints is a renaming, not a reshaping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import attention


class LayerNorm(nn.LayerNorm):
    """LayerNorm that returns the input dtype (keeps bf16 activations bf16 under autocast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation (needed to reproduce its pretrained weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


class KVCache:
    """Keys/values kept between generation steps, per attention module.

    Self-attention keys/values grow with each new position, so a step costs one position
    instead of the whole prefix; cross-attention keys/values of a fixed context (image tokens)
    are computed on the first step only. ``reorder`` follows beams in beam search.
    """

    def __init__(self) -> None:
        self.store: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.store.get(module)

    def put(self, module: nn.Module, k: torch.Tensor, v: torch.Tensor) -> None:
        self.store[module] = (k, v)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` [B'] (in that order) of every cached tensor."""
        self.store = {m: (k.index_select(0, index), v.index_select(0, index)) for m, (k, v) in self.store.items()}


class Attention(nn.Module):
    """Multi-head self-attention (fused qkv) or cross-attention (q from x, kv from context)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, backend: str | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} must be divisible by heads {heads}")
        self.heads, self.backend, self.is_cross = heads, backend, context_dim is not None
        if self.is_cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(context_dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        b, n, d = x.shape  # x: [B, N, D]; context: [B, M, Dc]
        if self.is_cross:
            q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)  # [B, H, N, Dh]
            cached = cache.get(self) if cache is not None else None
            if cached is None:
                k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
                if cache is not None:
                    cache.put(self, k, v)
            else:
                k, v = cached  # [B, H, M, Dh], computed on the first step
        else:
            q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x [B, H, N, Dh]
            if cache is not None:
                past = cache.get(self)
                if past is not None:  # new positions follow the P cached ones
                    k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # [B, H, P + N, Dh]
                    if causal:  # query i (absolute P + i) sees keys 0 .. P + i
                        p = past[0].shape[2]
                        if n > 1:
                            if mask is not None:
                                raise ValueError("a padding mask with cached keys/values is not supported")
                            mask = torch.ones(n, p + n, dtype=torch.bool, device=x.device).tril(p)[None, None]
                        causal = False
                cache.put(self, k, v)
        out = attention(q, k, v, causal=causal, mask=mask, backend=self.backend)  # [B, H, N, Dh]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # [B, N, D]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str = "gelu"):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), make_activation(activation), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """x += attn(ln_1(x)); [x += cross_attn(ln_cross(x), context)]; x += mlp(ln_2(x))."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        activation: str = "gelu",
        context_dim: int | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        self.ln_1 = LayerNorm(dim)
        self.attn = Attention(dim, heads, backend=backend)
        if context_dim is not None:
            self.ln_cross = LayerNorm(dim)
            self.cross_attn = Attention(dim, heads, context_dim=context_dim, backend=backend)
        else:
            self.cross_attn = None
        self.ln_2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), activation)

    def forward(
        self,
        x: torch.Tensor,
        *,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal, mask=mask, cache=cache)  # [B, N, D]
        if self.cross_attn is not None and context is not None:  # no context: text-only, cross-attention skipped
            x = x + self.cross_attn(self.ln_cross(x), context, mask=context_mask, cache=cache)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of ``TransformerBlock``s with optional gradient checkpointing."""

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        activation: str = "gelu",
        context_dim: int | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        self.width, self.layers, self.grad_checkpointing = width, layers, False
        self.blocks = nn.ModuleList(
            TransformerBlock(width, heads, mlp_ratio, activation, context_dim, backend) for _ in range(layers)
        )

    def init_weights(self) -> None:
        """open_clip's text-tower init: depth-scaled output projections keep the residual stream stable."""
        proj_std = (self.width**-0.5) * ((2 * self.layers) ** -0.5)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=self.width**-0.5)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.fc1.weight, std=(2 * self.width) ** -0.5)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        for block in self.blocks:  # x: [B, N, D]
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False, **kwargs)
            else:
                x = block(x, **kwargs)
        return x
