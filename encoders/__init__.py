"""Attention core, transformer blocks, shared text + image encoders, tokenizer, open_clip import.

The attention function lives in ``encoders.attention`` (``from encoders.attention import
attention``); it is not re-exported here, so that name always means the module.
"""

from .blocks import Transformer, TransformerBlock
from .dual import DualEncoder
from .image import ImageEncoder
from .text import TextEncoder
from .tokenizer import Tokenizer

__all__ = ["DualEncoder", "ImageEncoder", "TextEncoder", "Tokenizer", "Transformer", "TransformerBlock"]
