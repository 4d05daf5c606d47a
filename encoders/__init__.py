"""Attention core, transformer blocks, shared text + image encoders, tokenizer, open_clip import."""

from .attention import attention, attention_backend, available_backends, set_default_backend
from .blocks import Transformer, TransformerBlock
from .config import EncoderConfig, ImageEncoderConfig, TextEncoderConfig
from .dual import DualEncoder
from .image import ImageEncoder
from .text import TextEncoder
from .tokenizer import Tokenizer

__all__ = [
    "attention",
    "attention_backend",
    "available_backends",
    "set_default_backend",
    "Transformer",
    "TransformerBlock",
    "EncoderConfig",
    "ImageEncoderConfig",
    "TextEncoderConfig",
    "DualEncoder",
    "ImageEncoder",
    "TextEncoder",
    "Tokenizer",
]
