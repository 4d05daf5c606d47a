"""What a checkpoint and an export carry besides the weights: the training record a run adds to
its model (``config.training``: which components it trained, for how many steps, on what data,
so that inference can refuse what was never trained), and the random streams of the run."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multimodal.config import COMPONENTS, FoundationConfig, StageConfig, TrainingRecord
from multimodal.files import CONFIG_NAME
from multimodal.knowledge import load_vocabulary

from .init import OPEN_CLIP_PREFIX

# which components each loss sends gradients to (the caption loss cross-attends the image tower)
_LOSS_COMPONENTS = {"contrastive": ("text", "image"), "caption": ("text", "image", "language"), "diffusion": ("decoder",)}


def components_trained(stage: StageConfig, frozen: list[str], present: list[str], diffusion_text_grad: bool) -> list[str]:
    """The components a run with these losses and frozen parts updates."""
    touched = {c for loss, parts in _LOSS_COMPONENTS.items() if stage.uses(loss) for c in parts}
    if stage.uses("diffusion") and diffusion_text_grad:
        touched.add("text")
    return [c for c in COMPONENTS if c in touched and c in present and c not in frozen]


def base_knowledge(init_from: str | None, open_clip_weights: bool, adapter_dir: str | None, present: list[str],
                   init_report: dict[str, list[str]] | None) -> tuple[TrainingRecord | None, frozenset[int] | None, bool]:
    """What the starting point knew: its training record (components whose weights did not all
    load count as untrained), its vocabulary (with a continued adapter's), and whether the
    vocabulary is known at all (a fresh model: yes, empty; open_clip weights or a folder saved
    without one: no)."""
    if init_from is None:
        return TrainingRecord(), frozenset(), True
    if init_from.startswith(OPEN_CLIP_PREFIX) or Path(init_from).is_file():
        if not open_clip_weights:  # an open_clip architecture from scratch
            return TrainingRecord(runs=[{"init_from": init_from}]), frozenset(), True
        return TrainingRecord(pretrained=["text", "image"], runs=[{"init_from": init_from}]), None, False
    folder = Path(init_from)
    record = FoundationConfig.load(folder / CONFIG_NAME).training if (folder / CONFIG_NAME).is_file() else None
    # unknown history: what is present counts as trained elsewhere (nothing is refused)
    record = record or TrainingRecord(pretrained=list(present), runs=[{"init_from": init_from, "note": "history unknown"}])
    incomplete = {_component(k) for key in ("missing", "mismatched") for k in (init_report or {}).get(key, [])}
    record = TrainingRecord(steps={c: 0 if c in incomplete else v for c, v in record.steps.items()}, runs=record.runs,
                            pretrained=[c for c in record.pretrained if c not in incomplete])
    vocabulary = load_vocabulary(folder)
    if vocabulary is not None and adapter_dir is not None:
        taught = load_vocabulary(adapter_dir)
        vocabulary = vocabulary | taught if taught is not None else None
    return record, vocabulary, vocabulary is not None


def _component(state_key: str) -> str | None:
    for component, prefix in (("text", "encoders.text."), ("image", "encoders.image."), ("decoder", "decoder."), ("language", "language.")):
        if state_key.startswith(prefix):
            return component
    return None


def extend_record(base: TrainingRecord | None, trained: list[str], steps: int, run: dict[str, Any]) -> TrainingRecord:
    """``base`` plus this run: ``steps`` more for each trained component, and the run entry
    (``base`` None: a checkpoint from before records, whose history is unknown)."""
    base = base or TrainingRecord(pretrained=list(COMPONENTS), runs=[{"note": "history before this checkpoint unknown"}])
    added = {c: base.steps.get(c, 0) + (steps if c in trained else 0) for c in COMPONENTS}
    return TrainingRecord(steps=added, runs=[*base.runs, run], pretrained=list(base.pretrained))


def rng_states() -> dict[str, Any]:
    """The random streams of noise, timesteps and dropout, so that a resumed run continues them
    (tensors, ints and tuples only: the checkpoint stays loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(), "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}),
    }


def set_rng_states(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(tuple(rng["python"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
