"""Lightning strategies preset for this model (usable from YAML by class path)."""

from __future__ import annotations

from typing import Any

from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
from lightning.pytorch.strategies import FSDPStrategy

from encoders.blocks import TransformerBlock

# The units FSDP shards and gathers one at a time: every transformer block of the text and
# image encoders and the language head, the decoder UNet's transformer blocks and the MMDiT's joint blocks.
WRAP_UNITS = {TransformerBlock, BasicTransformerBlock, JointTransformerBlock}


class BlockFSDP(FSDPStrategy):
    """``FSDPStrategy`` wrapping at the transformer block (``WRAP_UNITS``), optionally with
    activation checkpointing of the same blocks. Every other ``FSDPStrategy`` argument
    (``sharding_strategy``, ``state_dict_type``, ``cpu_offload``, ...) passes through."""

    def __init__(self, checkpoint_blocks: bool = False, **kwargs: Any):
        kwargs.setdefault("auto_wrap_policy", WRAP_UNITS)
        if checkpoint_blocks:
            kwargs.setdefault("activation_checkpointing_policy", WRAP_UNITS)
        super().__init__(**kwargs)
