"""The one attention function every component calls.

Layout is fixed to ``[batch, heads, seq, head_dim]``. Backends:

* ``sdpa``     - ``torch.nn.functional.scaled_dot_product_attention``; torch picks a fused
                 kernel (flash / memory-efficient on CUDA, flash on CPU) when it can.
* ``xformers`` - ``xformers.ops.memory_efficient_attention``; optional extra, CUDA tensors only.
* ``math``     - reference implementation that materializes the score matrix.
* ``auto``     - xformers for CUDA tensors when it is installed, else sdpa (decided once).

Which backend runs, highest priority first: the ``attention_backend(...)`` context manager,
the ``backend=`` argument (what component configs pass), ``set_default_backend(...)``, ``auto``.
Causal attention is requested with ``causal=True`` and reaches the kernels as ``is_causal``;
no ``-inf`` mask is materialized, so fused kernels stay usable.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import math as _math
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "math", "xformers")

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("attention_override", default=None)
_default_backend = "auto"


def _check_name(name: str, argument: str = "backend") -> str:
    if name not in BACKENDS:
        raise ValueError(f"{argument} must be one of {BACKENDS}, got {name!r}")
    return name


@functools.lru_cache(maxsize=None)
def xformers_available() -> bool:
    """True when xformers is installed and CUDA exists (checked once, imported lazily)."""
    return torch.cuda.is_available() and importlib.util.find_spec("xformers") is not None


def available_backends() -> list[str]:
    """Concrete backends usable on this machine."""
    return ["sdpa", "math"] + (["xformers"] if xformers_available() else [])


def set_default_backend(name: str) -> None:
    """Process-wide default, used when neither a context manager nor a config chooses."""
    global _default_backend
    _default_backend = _check_name(name)


def get_default_backend() -> str:
    return _default_backend


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Force a backend for every attention call inside the block (beats config choices)."""
    token = _override.set(_check_name(name))
    try:
        yield
    finally:
        _override.reset(token)


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The concrete backend (sdpa / math / xformers) a call on ``device`` will use."""
    name = _override.get() or (backend and _check_name(backend)) or _default_backend
    if name == "auto":
        return "xformers" if device.type == "cuda" and xformers_available() else "sdpa"
    if name == "xformers" and (device.type != "cuda" or not xformers_available()):
        _warn_once("attention backend 'xformers' needs CUDA tensors and the xformers package; using 'sdpa'")
        return "sdpa"
    return name


def _normalize_mask(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean mask (True = attend) as a 4-d tensor broadcastable to [B, H, Lq, Lk]."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a boolean tensor (True = attend), got dtype {mask.dtype}")
    if mask.dim() == 2:  # key padding [B, Lk]
        mask = mask[:, None, None, :]
    elif mask.dim() == 3:  # [B, Lq, Lk]
        mask = mask[:, None]
    elif mask.dim() != 4:
        raise ValueError(f"mask must have 2, 3 or 4 dims, got shape {tuple(mask.shape)}")
    try:
        torch.broadcast_shapes(mask.shape, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to "
            f"[batch, heads, q_len, kv_len] = {[q.shape[0], q.shape[1], q.shape[2], k.shape[2]]}"
        ) from None
    return mask


def _causal_mask(lq: int, lk: int, device: torch.device) -> torch.Tensor:
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril()


def _math_attention(q, k, v, causal, mask, dropout_p, scale):
    scores = (q @ k.transpose(-2, -1)) * scale  # [B, H, Lq, Lk]
    if causal:
        mask = _causal_mask(q.shape[2], k.shape[2], q.device) if mask is None else mask & _causal_mask(q.shape[2], k.shape[2], q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v  # [B, H, Lq, D]


def _xformers(q, k, v, causal, mask, dropout_p, scale):
    import xformers.ops as xops  # lazy: optional extra

    bias = xops.LowerTriangularMask() if causal else None
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=dropout_p, scale=scale
    )  # xformers layout [B, L, H, D]
    return out.transpose(1, 2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention on ``[batch, heads, seq, head_dim]`` tensors.

    ``mask`` is boolean, True where a query may attend to a key: ``[B, Lk]`` (key padding),
    ``[B, Lq, Lk]`` or anything broadcastable to ``[B, H, Lq, Lk]``. ``causal`` is top-left
    aligned and needs ``q_len == kv_len``. Returns ``[batch, heads, q_len, head_dim_v]``.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "attention expects q, k, v of shape [batch, heads, seq, head_dim], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"incompatible q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal=True needs q_len == kv_len, got {q.shape[2]} and {k.shape[2]}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if mask is not None:
        mask = _normalize_mask(mask, q, k)
    scale = 1.0 / _math.sqrt(q.shape[-1]) if scale is None else scale
    name = resolve_backend(backend, q.device)

    if name == "math":
        return _math_attention(q, k, v, causal, mask, dropout_p, scale)
    if name == "xformers" and mask is None:
        return _xformers(q, k, v, causal, mask, dropout_p, scale)
    # sdpa (and xformers calls with a padding mask, which xformers cannot take as a bool mask)
    if causal and mask is not None:
        # torch's SDPA accepts either is_causal or a mask, not both: fold the two together.
        mask = mask & _causal_mask(q.shape[2], k.shape[2], q.device)
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale)
