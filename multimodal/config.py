"""``FoundationConfig`` and its named presets (``tiny`` for tests, ``shapes`` for the embedded
default, ``base`` for GPUs). Unknown keys anywhere are an error that names them."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusion.config import DecoderConfig
from encoders.config import EncoderConfig, config_from_dict, merge_dicts

from .language import LanguageHeadConfig


@dataclass
class FoundationConfig(EncoderConfig):
    """The whole model. Encoder fields come from ``EncoderConfig``; heads are added beside them
    (``decoder: None`` means a model without a diffusion decoder, ``language: None`` one
    without a language head)."""

    decoder: DecoderConfig | None = None
    language: LanguageHeadConfig | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FoundationConfig":
        return config_from_dict(cls, data)

    @classmethod
    def from_preset(cls, name: str, overrides: dict[str, Any] | None = None) -> "FoundationConfig":
        """A named preset with optional nested overrides, e.g. ``{"text": {"layers": 2}}``."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        return cls.from_dict(merge_dicts(PRESETS[name], overrides or {}))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "FoundationConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


_HALF = (0.5, 0.5, 0.5)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "embed_dim": 32,
        "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2},
        "image": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2, "mean": _HALF, "std": _HALF},
        "decoder": {"block_out_channels": (32, 32), "attention_head_dim": 16, "norm_num_groups": 8},
        "language": {"layers": 1, "heads": 2},
    },
    "shapes": {
        "embed_dim": 128,
        "text": {"context_length": 16, "width": 128, "layers": 2, "heads": 4},
        "image": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 3, "heads": 4, "mean": _HALF, "std": _HALF},
        "decoder": {
            "block_out_channels": (32, 64), "attention_head_dim": 32,
            "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction", "min_snr_gamma": 5.0,
        },
        "language": {"layers": 2, "heads": 4},
    },
    "base": {  # ViT-B/16 image tower, CLIP text tower
        "embed_dim": 512,
        "text": {"context_length": 77, "width": 512, "layers": 12, "heads": 8},
        "image": {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12, "heads": 12},
        "language": {"layers": 12, "heads": 8},  # CoCa-Base's multimodal text decoder
    },
}
