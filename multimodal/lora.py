"""LoRA adapters (``peft``) on the attention and MLP projections of chosen components.

An adapter folder holds only the low-rank weights (``adapter_model.safetensors``) and
``adapter_config.json``: rank, components, target modules and a reference to the base model
(its folder and the sha256 of its ``model.safetensors``, checked on load so an adapter is never
silently applied to other weights). The base weights are never written to, so unloading an
adapter gives back the base model bit for bit; merging folds ``B @ A * alpha / r`` into them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn

from .config import AdapterConfig
from .files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, WEIGHTS_NAME, open_regular
from .folders import load_weights, write_folder

if TYPE_CHECKING:
    from .model import FoundationModel

ADAPTER_NAME = "default"


def peft_config(config: AdapterConfig, component: str):
    """peft's ``LoraConfig`` for one component of ``config``."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, bias="none",
        target_modules=config.target_modules(component),
    )


def weights_sha256(directory: str | Path) -> str:
    """sha256 of a model folder's ``model.safetensors`` (what an adapter was trained on)."""
    digest = hashlib.sha256()
    with open_regular(Path(directory) / WEIGHTS_NAME) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def components(model: "FoundationModel") -> dict[str, nn.Module | None]:
    return {"text": model.encoders.text, "image": model.encoders.image, "decoder": model.decoder, "language": model.language}


def _lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)]


def add_adapter(model: "FoundationModel", config: AdapterConfig) -> None:
    """Inject fresh LoRA layers (B = 0: the model's outputs are unchanged) into ``config``'s
    components. Only the LoRA weights of those components require grad afterwards."""
    from peft import inject_adapter_in_model

    if model.adapter is not None:
        raise ValueError("this model already has a LoRA adapter: merge_adapter() or unload_adapter() first")
    parts = components(model)
    for name in set(config.components) & set(model.skipped):
        model.require(name)  # loaded without it: says so
    missing = [c for c in config.components if parts[c] is None]
    if missing:
        raise ValueError(f"lora components {missing}: this model has no such component")
    # peft turns off grads of the adapted components' base weights; unloading turns them back
    model._grad_before_adapter = {n: p.requires_grad for n, p in model.named_parameters()}
    model.adapter = config
    for name in config.components:
        try:
            inject_adapter_in_model(peft_config(config, name), parts[name], adapter_name=ADAPTER_NAME)
        except ValueError as err:  # peft: "Target modules ... not found in the base model"
            _remove_lora_layers(model, merge=False)  # undo the components already adapted
            raise ValueError(f"lora targets {config.target_modules(name)} match no module of component {name!r} ({err})") from err


def adapter_state_dict(model: "FoundationModel") -> dict[str, torch.Tensor]:
    """The LoRA weights only, as ``<component>.<module path>.lora_{A,B}.weight``."""
    from peft import get_peft_model_state_dict

    if model.adapter is None:
        raise ValueError("this model has no LoRA adapter")
    parts = components(model)
    return {
        f"{name}.{key}": value
        for name in model.adapter.components
        for key, value in get_peft_model_state_dict(parts[name], adapter_name=ADAPTER_NAME).items()
    }


def save_adapter(model: "FoundationModel", directory: str | Path, base_model: str | Path | None = None,
                 card: str | None = None, overwrite: bool = False, extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` + ``README.md`` (``card``,
    else a default model card); the config records ``base_model`` (a folder) and its weights'
    sha256. ``extra(folder)`` adds files; the folder is written as ``write_folder`` does."""
    config = model.adapter
    if config is None:
        raise ValueError("this model has no LoRA adapter to save")
    if base_model is not None and str(base_model) != config.base_model:  # else: the base recorded when it was added
        base = Path(base_model)
        config.base_model = str(base)
        config.base_sha256 = weights_sha256(base) if base.is_dir() else None
    if config.base_sha256 is None:
        import warnings

        warnings.warn(f"saving an adapter without a base model hash (base_model={config.base_model!r}): loading it cannot check its base", stacklevel=2)
    if card is None:
        from .card import lora_summary, model_card

        card = model_card(model.config, name="LoRA adapter", training="Not described." + lora_summary(config, config.base_model))
    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}

    def write(folder: Path) -> None:
        save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config.save(folder / ADAPTER_CONFIG)
        (folder / "README.md").write_text(card)
        if extra is not None:
            extra(folder)

    return write_folder(directory, write, overwrite, what="directory")


def is_adapter_folder(directory: str | Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def read_adapter_config(directory: str | Path) -> AdapterConfig:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {directory}")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / name).is_file():
            raise ValueError(f"{directory} is not an adapter folder: no {name}")
    return AdapterConfig.load(directory / ADAPTER_CONFIG)


def resolve_base(directory: str | Path, base: str | Path | None = None) -> Path:
    """The base model folder of an adapter: ``base`` if given, else the recorded one (as written,
    then relative to the adapter folder); its weights must match the recorded sha256."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    if base is None:
        if config.base_model is None:
            raise ValueError(f"{directory}: the adapter records no base model; pass the base folder explicitly")
        candidates = [Path(config.base_model), directory / config.base_model]
        found = [c for c in candidates if c.is_dir()]
        if not found:
            raise FileNotFoundError(
                f"{directory}: its base model {config.base_model!r} was not found (tried {', '.join(map(str, candidates))}); "
                "pass the base folder explicitly"
            )
        base = found[0]
    base = Path(base)
    if not (base / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"base model of {directory}: {base} has no {WEIGHTS_NAME}")
    if config.base_sha256 is not None:
        actual = weights_sha256(base)
        if actual != config.base_sha256:
            raise ValueError(
                f"{directory} was trained on a base model whose weights have sha256 {config.base_sha256[:12]}..., "
                f"but {base} has {actual[:12]}...: not the same base model"
            )
    return base


def load_adapter(model: "FoundationModel", directory: str | Path) -> AdapterConfig:
    """Inject the adapter saved in ``directory`` into ``model`` (its base is not checked here:
    ``resolve_base`` does that). Missing or unexpected LoRA tensors are reported by name."""
    from peft import set_peft_model_state_dict

    directory = Path(directory)
    config = read_adapter_config(directory)
    state = load_weights(directory / ADAPTER_WEIGHTS, device=str(model.pixel_mean.device))
    add_adapter(model, config)
    parts = components(model)
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        unload_adapter(model)
        show = lambda names: ", ".join(names[:5]) + (" ..." if len(names) > 5 else "") or "none"  # noqa: E731
        raise ValueError(f"{directory}: {ADAPTER_WEIGHTS} does not match its config (missing: {show(missing)}; unexpected: {show(unexpected)})")
    wrong = [k for k in state if state[k].shape != expected[k].shape]
    if wrong:
        unload_adapter(model)
        raise ValueError(f"{directory}: tensor shapes do not match its config (r={config.r}) and this model: {', '.join(wrong[:5])}")
    for name in config.components:
        prefix = f"{name}."
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        set_peft_model_state_dict(parts[name], part, adapter_name=ADAPTER_NAME)
    return config


def _remove_lora_layers(model: "FoundationModel", merge: bool) -> None:
    if model.adapter is None:
        raise ValueError("this model has no LoRA adapter")
    for part in components(model).values():
        if part is None:
            continue
        for name, layer in _lora_layers(part):
            if merge:
                layer.merge(safe_merge=True)  # refuses NaN/inf results
            parent_name, _, child = name.rpartition(".")
            setattr(part.get_submodule(parent_name) if parent_name else part, child, layer.get_base_layer())
    before = getattr(model, "_grad_before_adapter", {})
    for name, param in model.named_parameters():
        param.requires_grad_(before.get(name, param.requires_grad))
    model.adapter = None


def merge_adapter(model: "FoundationModel") -> None:
    """Fold the adapter into the base weights and remove the LoRA layers: a plain model again
    (``save_pretrained`` writes it as a full model), as fast as the base."""
    _remove_lora_layers(model, merge=True)


def unload_adapter(model: "FoundationModel") -> None:
    """Remove the LoRA layers without merging: the base model, bit for bit."""
    _remove_lora_layers(model, merge=False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
