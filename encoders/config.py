"""Typed configs for the encoders, plus strict dict -> dataclass conversion shared by all configs."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class TextEncoderConfig:
    """Causal transformer over open_clip's BPE tokens (open_clip ``CLIPTextCfg`` subset)."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    activation: str = "gelu"  # "gelu" | "quick_gelu" (OpenAI weights)
    trim_padding: bool = True  # skip positions after the batch's longest text (same embeddings)


@dataclass
class ImageEncoderConfig:
    """ViT with a class token (open_clip ``CLIPVisionCfg`` subset)."""

    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    # Normalization applied by the pipelines/data to pixel values in [0, 1].
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class EncoderConfig:
    """The shared pair: both towers project into one ``embed_dim`` space."""

    embed_dim: int = 512
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    logit_scale_init: float = 2.6592600369644043  # log(1 / 0.07), as CLIP
    attention_backend: str = "auto"  # see encoders.attention
    grad_checkpointing: bool = False


ACTIVATIONS = ("gelu", "quick_gelu")


def config_from_dict(cls: type[T], data: dict[str, Any] | T, path: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict; unknown keys are an error naming the key."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"config{'.' + path if path else ''} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in '{path}'" if path else ""
        raise ValueError(f"unknown config key(s){where}: {', '.join(map(repr, unknown))}; allowed: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        sub = f"{path}.{key}" if path else key
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and isinstance(value, dict):
            hint = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), hint)  # Optional[Config]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = config_from_dict(hint, value, sub)
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def merge_dicts(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update (override wins), used to apply user overrides on presets."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out
