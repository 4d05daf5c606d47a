"""Multimodal foundation model: shared encoders, diffusion decoder and language head."""

from .config import PRESETS, FoundationConfig
from .model import FoundationModel
from .pipeline import FoundationPipeline

__all__ = ["FoundationConfig", "FoundationModel", "FoundationPipeline", "PRESETS"]
