"""Model cards in Hugging Face's ``ModelCard`` format (YAML metadata + markdown), written beside
every ``save_pretrained`` folder so that whoever receives the weights also receives what they
were trained on, how well they do (with the command that measures it) and what they are not for."""

from __future__ import annotations

import json
from typing import Any

from .config import FoundationConfig

DEFAULT_USE = (
    "Research and experimentation with jointly trained text+image models: zero-shot "
    "classification and retrieval in the shared space, text-to-image generation, captioning and "
    "text completion, and as a starting point for fine-tuning."
)
DEFAULT_LIMITS = (
    "The model knows only what its training data shows; inputs unlike that data give unreliable "
    "outputs. Generated images and texts can reproduce biases of the data. It has no built-in "
    "content safety: pass `prompt_filter=` / `output_checker=` to `FoundationPipeline` before "
    "exposing generation to others. Not for decisions about people."
)


def model_card(
    config: FoundationConfig,
    name: str = "multimodal-foundation model",
    data: str = "Not described: say what the model was trained on.",
    metrics: dict[str, float] | None = None,
    command: str | None = None,
    training: str | None = None,
    intended_use: str = DEFAULT_USE,
    limitations: str = DEFAULT_LIMITS,
    license: str = "apache-2.0",
) -> str:
    """The ``README.md`` text of a model folder; ``metrics`` are listed with the ``command`` that
    reproduces them."""
    from huggingface_hub import ModelCard, ModelCardData

    from .knowledge import train_command, trained_components

    trained = trained_components(config)
    heads = [h for h, part in (("diffusion decoder", "decoder"), ("language head", "language")) if part in trained]
    untrained = [c for c in ("text", "image", "decoder", "language") if getattr(config, c, True) is not None and c not in trained]
    tags = ["clip", "contrastive"] * ("text" in trained) + ["text-to-image"] * ("decoder" in trained)
    meta = ModelCardData(license=license, library_name="multimodal-foundation",
                         tags=tags + ["image-captioning"] * ("language" in trained) + ["multimodal"])
    not_trained = "".join(
        f"\n\nNot trained: the {c} component (its weights are random; inference refuses it). Train it with `{train_command(config, c)}`."
        for c in untrained)
    dec = config.decoder
    if dec is not None:
        cls, arg = ("SD3Transformer2DModel", "pooled_projections") if dec.backbone == "mmdit" else ("UNet2DConditionModel", "class_labels")
        pooled = (f"`{arg}` = sqrt({config.embed_dim}) x the unit text embedding" if dec.text_embed_conditioning
                  else ("`pooled_projections` = zeros [B, 1]" if dec.backbone == "mmdit" else "no `class_labels`"))
        space = (", on the VAE in `vae/`'s latents z scaled as (z - shift_factor) x scaling_factor" if dec.vae else ", in pixel space [-1, 1]")
        kind = "rectified flow (target noise - image)" if dec.objective == "flow" else f"DDPM ({dec.prediction_type})"
        if dec.objective == "flow" and dec.flow_target == "sample":  # what a diffusers user must undo
            kind += (f"; it outputs the clean image x', a solver's velocity is (x_t - x') / max(t / {dec.num_train_timesteps}, "
                     f"{dec.flow_min_sigma:g}) at timestep t")
        not_trained += (f"\n\nThe image decoder is a diffusers `{cls}` in `decoder/`, trained with {kind}{space}; its sampling "
                        f"scheduler is in `scheduler/`. It is conditioned on the text encoder's token states and {pooled}.")
    if metrics:
        rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items())
        measured = f"| metric | value |\n|---|---|\n{rows}\n\nReproduce with:\n\n```bash\n{command}\n```"
    else:
        measured = "Not measured yet. Measure on a held-out split with `multimodal test --config <run config> --model.init_from <this folder>`."
    body = f"""---
{meta.to_yaml()}
---

# {name}

Shared text and image encoders aligned in one embedding space{', with a ' + ' and a '.join(heads) + ' on the same text encoder' if heads else ''}
(multimodal-foundation). Load with `FoundationPipeline.from_pretrained("<this folder>")`.{not_trained}

## Training data

{data}

## Training

{training or "Not described."}

## Metrics

{measured}

## Intended use

{intended_use}

## Limitations

{limitations}

## License

{license}

## Config

```json
{json.dumps(config.to_dict(), indent=2)}
```
"""
    return str(ModelCard(body))


def describe_data(datamodule: Any) -> str:
    """A data description from a ``FoundationDataModule`` (source, path, sizes)."""
    source = getattr(datamodule, "source", "unknown")
    if source == "shapes":
        return ("The embedded procedural captioned-shapes data (`data.source: shapes`): one shape in one "
                "of six colors, two sizes and five positions per 32x32 image, four caption templates; "
                "for each of the 24 color+shape pairs one size+position combination (24 of the 240 "
                "combinations) is held out of training for evaluation: every pair is trained on, the "
                "held-out images show it at a size and place it was never seen at.")
    text = f"`data.source: {source}`, `data.path: {getattr(datamodule, 'path', None)}`"
    if getattr(datamodule, "val_path", None):
        text += f", validation `data.val_path: {datamodule.val_path}`"
    classes = getattr(datamodule, "classes", None)
    if classes:
        text += f"; zero-shot classes: {', '.join(classes)}"
    return text + "."


def lora_summary(adapter: Any, base_model: str | None) -> str:
    """Card text for a LoRA adapter folder: what it adapts and which base it needs."""
    return (f"\n\nThis folder is a **LoRA adapter** (r={adapter.r}, alpha={adapter.alpha}) on the "
            f"{', '.join(adapter.components)} component(s) of the base model `{base_model}`; it holds only the adapter "
            "weights. `FoundationPipeline.from_pretrained(\"<this folder>\")` loads the base, checks its sha256, then the "
            "adapter; `multimodal merge --adapter <this folder> --out DIR` writes a merged full model.")
