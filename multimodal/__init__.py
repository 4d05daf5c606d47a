"""Multimodal foundation model: shared encoders, diffusion decoder and language head.

The public names are loaded on first use, so that ``import multimodal.config`` (or the
``multimodal`` command's ``--help``) does not pull in torch, diffusers and open_clip.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "FoundationConfig": "config", "PRESETS": "config",
    "FoundationModel": "model",
    "FoundationPipeline": "pipeline", "GenerationOutput": "pipeline", "PromptBlocked": "pipeline",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .config import PRESETS, FoundationConfig
    from .model import FoundationModel
    from .pipeline import FoundationPipeline, GenerationOutput, PromptBlocked


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'multimodal' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
