"""Where a run starts: ``model.init_from`` (a model folder, a LoRA adapter folder, an open_clip
checkpoint or ``open_clip:MODEL[:PRETRAINED]``) and LoRA set-up for training an adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from multimodal import lora as lora_utils
from multimodal.config import COMPONENTS, AdapterConfig, FoundationConfig
from multimodal.files import WEIGHTS_NAME
from multimodal.folders import load_weights
from multimodal.model import FoundationModel

OPEN_CLIP_PREFIX = "open_clip:"


def init_source(init_from: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The tensors ``init_from`` names, under FoundationModel's parameter names, and the encoder
    config fields they imply (None when the model's own config stays): a ``save_pretrained``
    folder; an open_clip checkpoint file (``.safetensors``, or ``.pt`` read with ``weights_only``);
    or ``open_clip:MODEL[:PRETRAINED]`` (its architecture, with a local weights file or an
    open_clip tag, which needs internet)."""
    from encoders.open_clip_import import convert_open_clip_state_dict, load_state_file, open_clip_encoder_source

    if init_from.startswith(OPEN_CLIP_PREFIX):
        name, _, pretrained = init_from[len(OPEN_CLIP_PREFIX):].partition(":")
        fields, state = open_clip_encoder_source(name, pretrained or None)
        return {f"encoders.{k}": v for k, v in (state or {}).items()}, fields
    path = Path(init_from)
    if path.is_file():
        return {f"encoders.{k}": v for k, v in convert_open_clip_state_dict(load_state_file(path)).items()}, None
    if not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"model.init_from: {init_from} is neither a model folder with {WEIGHTS_NAME}, an open_clip checkpoint file, "
            f"nor {OPEN_CLIP_PREFIX}MODEL[:PRETRAINED]"
        )
    return load_weights(path / WEIGHTS_NAME), None


def with_encoder_fields(config: FoundationConfig, fields: dict[str, Any]) -> FoundationConfig:
    """``config`` with its encoders replaced by an open_clip architecture (whole ``text`` and
    ``image`` sections, so normalization and the rest take the open_clip defaults)."""
    return FoundationConfig.from_dict({**config.to_dict(), **fields})


def load_matching_weights(model: FoundationModel, source: dict[str, torch.Tensor], name: str) -> dict[str, list[str]]:
    """Copy every tensor of ``source`` whose name and shape match, and report by name what was
    missing, mismatched or unexpected (printed, and returned)."""
    target = model.state_dict()
    report = {
        "loaded": [k for k in target if k in source and source[k].shape == target[k].shape],
        "missing": [k for k in target if k not in source],
        "mismatched": [k for k in target if k in source and source[k].shape != target[k].shape],
        "unexpected": [k for k in source if k not in target],
    }
    model.load_state_dict({k: source[k] for k in report["loaded"]}, strict=False)
    rank_zero_info(f"init_from {name}: loaded {len(report['loaded'])} tensors")
    for kind in ("missing", "mismatched", "unexpected"):
        if report[kind]:
            names = ", ".join(report[kind][:8]) + (" ..." if len(report[kind]) > 8 else "")
            rank_zero_info(f"init_from {name}: {len(report[kind])} {kind} (kept initial values): {names}")
    return report


def add_training_adapter(
    model: FoundationModel, lora: AdapterConfig | dict | None, adapter_dir: str | None, base_model: str | None,
    frozen: list[str], init_report: dict[str, list[str]] | None, frozen_by: str,
) -> list[str]:
    """Freeze every base weight, then inject the adapter (new, or loaded from ``adapter_dir``).
    Returns the components that stay frozen (those without an adapter)."""
    if base_model is not None and not Path(base_model).is_dir():
        raise ValueError(
            f"model.lora: the base must be a save_pretrained folder (the adapter records it), got {base_model!r}; "
            "start a full fit from it first, or export it with FoundationModel.from_open_clip(...).save_pretrained(DIR)"
        )
    if isinstance(lora, dict):  # from a checkpoint's hyperparameters
        lora = AdapterConfig(**lora)
    bad = {k: v for k, v in (init_report or {}).items() if k in ("missing", "mismatched", "unexpected") and v}
    if bad:  # an adapter must sit on exactly the base it names
        detail = "; ".join(f"{k}: {', '.join(v[:4])}{' ...' if len(v) > 4 else ''}" for k, v in bad.items())
        raise ValueError(f"model.lora: model.init_from {base_model} does not match the model's preset/overrides ({detail})")
    config = lora
    if adapter_dir is not None:
        config = lora_utils.read_adapter_config(adapter_dir)
        shape = lambda c: (sorted(c.components), c.r, c.alpha, c.dropout, c.targets)  # noqa: E731
        if lora is not None and shape(lora) != shape(config):
            raise ValueError(f"model.lora differs from the adapter in model.init_from {adapter_dir} ({config}); leave model.lora out to continue it")
    clash = sorted(set(config.components) & set(frozen))
    if clash:
        what = f"the adapter in {adapter_dir}" if adapter_dir is not None else "model.lora.components"
        raise ValueError(f"{what}: components {clash} are frozen by {frozen_by}: their adapters would never train")
    model.requires_grad_(False)
    if adapter_dir is not None:
        model.load_adapter(adapter_dir)
    else:
        model.add_adapter(config)
    if base_model is not None:  # recorded now: the weights trained on, whatever happens to the folder later
        model.adapter.base_model = base_model
        model.adapter.base_sha256 = lora_utils.weights_sha256(base_model)
    trainable, total = lora_utils.count_parameters(model)
    parts = lora_utils.components(model)
    adapted = sum(p.numel() for c in config.components for p in parts[c].parameters() if not p.requires_grad)
    rank_zero_info(
        f"LoRA r={config.r} on {', '.join(config.components)}: {trainable:,} trainable parameters = "
        f"{100 * trainable / total:.2f}% of the model ({total:,}), {100 * trainable / adapted:.2f}% of the adapted components"
    )
    return [c for c in COMPONENTS if c not in config.components]
