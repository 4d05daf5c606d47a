"""Build the shared encoders from an open_clip CLIP model (config + weights).

The weights map one to one after renaming (see ``_rename``); unsupported open_clip features
(attention pooling, layer scale, SigLIP bias, ...) are refused by name instead of loading wrong.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch


_UNSUPPORTED_VISION = {
    "attentional_pool": False, "ls_init_value": None, "no_ln_pre": False, "final_ln_after_pool": False,
    "pool_type": "tok", "pos_embed_type": "learnable", "block_type": None, "qk_norm": False,
    "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
    "scale_fc": False, "timm_model_name": None, "hf_model_name": None, "act_kwargs": None, "norm_kwargs": None,
}
_UNSUPPORTED_TEXT = {
    "ls_init_value": None, "embed_cls": False, "no_causal_mask": False, "final_ln_after_pool": False,
    "pool_type": "argmax", "proj_bias": False, "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
    "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
    "hf_model_name": None, "act_kwargs": None, "norm_kwargs": None,
}


def _check_supported(cfg: dict[str, Any], defaults: dict[str, Any], tower: str) -> None:
    for key, ok in defaults.items():
        if key in cfg and cfg[key] != ok and not (key == "pool_type" and cfg[key] is None):
            raise ValueError(f"open_clip {tower} option {key}={cfg[key]!r} is not supported (needs {ok!r})")


def encoder_config_from_open_clip(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """Translate an open_clip model config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``) into
    the encoder fields of a ``FoundationConfig`` as a plain dict (``embed_dim``, ``text``,
    ``image``); ``FoundationConfig.from_dict`` checks it."""
    vision, text = dict(model_cfg.get("vision_cfg", {})), dict(model_cfg.get("text_cfg", {}))
    if isinstance(vision.get("layers"), (list, tuple)):
        raise ValueError("open_clip ResNet image towers are not supported; use a ViT model")
    if model_cfg.get("init_logit_bias") is not None:
        raise ValueError("open_clip SigLIP models (logit bias) are not supported")
    _check_supported(vision, _UNSUPPORTED_VISION, "vision_cfg")
    _check_supported(text, _UNSUPPORTED_TEXT, "text_cfg")
    if text.get("proj_type", "linear") not in ("linear", None):
        raise ValueError(f"open_clip text_cfg proj_type={text['proj_type']!r} is not supported")
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    v_width = vision.get("width", 768)
    image = {
        "image_size": vision.get("image_size", 224), "patch_size": vision.get("patch_size", 16), "width": v_width,
        "layers": vision.get("layers", 12), "heads": v_width // vision.get("head_width", 64),
        "mlp_ratio": vision.get("mlp_ratio", 4.0), "activation": act,
    }
    text_cfg = {
        "vocab_size": text.get("vocab_size", 49408), "context_length": text.get("context_length", 77),
        "width": text.get("width", 512), "layers": text.get("layers", 12), "heads": text.get("heads", 8),
        "mlp_ratio": text.get("mlp_ratio", 4.0), "activation": act,
    }
    return {"embed_dim": model_cfg["embed_dim"], "text": text_cfg, "image": image}


_RULES = [
    (r"^visual\.conv1\.", "image.patch_embed."),
    (r"^visual\.proj$", "image.projection"),
    (r"^visual\.transformer\.resblocks\.", "image.transformer.blocks."),
    (r"^visual\.", "image."),
    (r"^(text\.)?transformer\.resblocks\.", "text.transformer.blocks."),
    (r"^(text\.)?text_projection(\.weight)?$", "text.projection"),
    (r"^(text\.)?(token_embedding|positional_embedding|ln_final)", r"text.\2"),
    (r"\.attn\.in_proj_weight$", ".attn.qkv.weight"),
    (r"\.attn\.in_proj_bias$", ".attn.qkv.bias"),
    (r"\.attn\.out_proj\.", ".attn.proj."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
]


def _rename(key: str) -> str:
    for pattern, repl in _RULES:
        key = re.sub(pattern, repl, key)
    return key


def convert_open_clip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip CLIP / CustomTextCLIP state dict -> ``DualEncoder`` state dict."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key in ("attn_mask", "text.attn_mask"):
            continue  # open_clip's materialized causal mask; we pass is_causal instead
        if key.endswith("text_projection.weight"):
            value = value.t()  # nn.Linear form [E, W] -> matrix form [W, E]
        out[_rename(key)] = value
    return out


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights without unpickling arbitrary objects (safetensors, or torch weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    if path.suffix == ".safetensors":
        from multimodal.folders import load_weights

        return load_weights(path)
    import zipfile

    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is neither a safetensors file nor a complete torch file (truncated, or another format)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - report any failure by name of the file
        if type(err).__name__ == "UnpicklingError":  # torch's message would suggest weights_only=False
            raise ValueError(f"{path} holds objects other than tensors: refused (unpickling them could run any code); "
                             "convert it to safetensors where you trust its origin") from None
        raise ValueError(f"{path} cannot be read as torch weights ({type(err).__name__})") from None


def open_clip_encoder_source(
    model_name: str | dict[str, Any], pretrained: str | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """open_clip model name (or config dict) + weights -> (encoder config fields, ``DualEncoder``
    state dict or None without ``pretrained``).

    ``pretrained`` may be a local ``.safetensors``/``.pt`` file, an open_clip pretrained tag
    (downloads, so needs internet), or None for the random-init open_clip architecture.
    """
    import open_clip

    if isinstance(model_name, str):
        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise ValueError(f"unknown open_clip model name {model_name!r}; see open_clip.list_models()")
    else:
        model_cfg = model_name
    if isinstance(model_name, str) and model_name.endswith("-quickgelu"):
        model_cfg = {**model_cfg, "quick_gelu": True}
    fields = encoder_config_from_open_clip(model_cfg)
    if pretrained is None:
        return fields, None
    if Path(pretrained).exists():
        state = load_state_file(pretrained)
    else:
        if not isinstance(model_name, str):
            raise ValueError(f"pretrained={pretrained!r} is neither a local file nor usable as a tag without a model name")
        state = open_clip.create_model(model_name, pretrained=pretrained).state_dict()
    return fields, convert_open_clip_state_dict(state)
