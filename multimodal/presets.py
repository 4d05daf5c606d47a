"""The named model sizes (``FoundationConfig.from_preset``): nested dicts of config fields.
Standard library only, like ``multimodal.config``."""

from __future__ import annotations

from typing import Any

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
