"""Multimodal foundation model: shared encoders, diffusion decoder and language head."""

from .config import PRESETS, FoundationConfig
from .model import FoundationModel
from .pipeline import FoundationPipeline, GenerationOutput, PromptBlocked

__all__ = ["FoundationConfig", "FoundationModel", "FoundationPipeline", "GenerationOutput", "PRESETS", "PromptBlocked"]
