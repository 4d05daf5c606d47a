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
        # the captions use a few dozen of the 49,408 token ids: the softmax over those is 4x cheaper a step
        "language": {"layers": 2, "heads": 4, "vocabulary": "compact"},
    },
    # shapes encoders with SD3's recipe for the decoder: an MMDiT over 8x8 patches of 4x4 pixels
    # and the 16 text tokens, trained by rectified flow, sampled with flow-matching Euler (patches
    # of 4 cost ~1/3.6 of patches of 2 per step: in a fixed CPU budget that buys 3.6x the samples,
    # which measured better than the finer patches on every fidelity figure). It predicts the clean
    # image (JiT), not the velocity: color+shape 98% / 95% against 86% / 91% in the same run budget.
    "shapes_mmdit": {
        "embed_dim": 128,
        "text": {"context_length": 16, "width": 128, "layers": 2, "heads": 4},
        "image": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 3, "heads": 4, "mean": _HALF, "std": _HALF},
        "decoder": {"backbone": "mmdit", "objective": "flow", "flow_target": "sample", "width": 128, "num_layers": 5, "patch_size": 4,
                    "attention_head_dim": 32},
        "language": {"layers": 2, "heads": 4, "vocabulary": "compact"},
        "sampling": {"scheduler": "euler"},
    },
    "base": {  # ViT-B/16 image tower, CLIP text tower
        "embed_dim": 512,
        "text": {"context_length": 77, "width": 512, "layers": 12, "heads": 8},
        "image": {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12, "heads": 12},
        "language": {"layers": 12, "heads": 8},  # CoCa-Base's multimodal text decoder
    },
    # GPUs: base encoders (a 256-pixel image tower) and a DiT-B-sized MMDiT trained by rectified flow
    # in the latent space of a frozen VAE: set decoder.vae to a local diffusers AutoencoderKL /
    # AutoencoderDC folder (an f8 VAE gives 32x32 latents, 256 patches of 2x2)
    "base_latent": {
        "embed_dim": 512,
        "text": {"context_length": 77, "width": 512, "layers": 12, "heads": 8},
        "image": {"image_size": 256, "patch_size": 16, "width": 768, "layers": 12, "heads": 12},
        "decoder": {"backbone": "mmdit", "objective": "flow", "image_size": 256, "width": 768, "num_layers": 12,
                    "attention_head_dim": 64, "patch_size": 2, "cfg_dropout": 0.1, "ema_decay": 0.9999},
        "language": {"layers": 12, "heads": 8},
        "sampling": {"scheduler": "euler", "steps": 28, "guidance_scale": 5.0},
    },
}

# The training stages: which losses train (their weights) and which components stay frozen
# (``multimodal.config.stage_config`` lays the user's choices over them).
STAGE_PRESETS: dict[str, tuple[dict[str, float], list[str]]] = {
    "align": ({"contrastive": 1.0}, ["decoder", "language"]),
    "decoder": ({"diffusion": 1.0}, ["text", "image", "language"]),
    # CoCa: contrastive and captioning losses in the same step, on the same text encoder pass
    "language": ({"contrastive": 1.0, "caption": 2.0}, ["decoder"]),
    "joint": ({"contrastive": 1.0, "diffusion": 1.0, "caption": 2.0}, []),
}

# Module-name suffixes (peft matches ``name == t or name.endswith("." + t)``) of the attention and
# MLP projections: our transformer blocks, and diffusers' blocks inside the UNet / MMDiT.
_BLOCK_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
LORA_TARGETS: dict[str, list[str]] = {
    "text": _BLOCK_TARGETS,
    "image": _BLOCK_TARGETS,
    "language": _BLOCK_TARGETS + ["cross_attn.q", "cross_attn.kv", "cross_attn.proj"],
    "decoder": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff_context.net.0.proj", "ff_context.net.2"],
}
