"""Cheap adaptation on frozen embeddings: linear probes, few-shot class prototypes, and the
labeled-folder evaluation behind ``multimodal probe``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .files import IMAGE_SUFFIXES
from .pipeline import FoundationPipeline
from .preprocess import ImageInput
from .zero_shot import prototypes


def fit_linear_probe(
    embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float = 1e-4, steps: int = 200
) -> torch.nn.Linear:
    """A logistic-regression head on frozen embeddings (full-batch L-BFGS, L2 penalty), as in
    CLIP's linear-probe evaluation."""
    torch.manual_seed(0)
    head = torch.nn.Linear(embeddings.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(embeddings), labels) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head.eval()


@dataclass
class ProbeReport:
    classes: list[str]
    train_images: int
    test_images: int
    shots: int
    linear_probe_acc: float
    zero_shot_acc: float
    few_shot_acc: float

    def __str__(self) -> str:
        rows = (("linear probe", self.linear_probe_acc), ("zero-shot", self.zero_shot_acc),
                (f"{self.shots}-shot prototypes", self.few_shot_acc))
        lines = [f"{len(self.classes)} classes, {self.train_images} train / {self.test_images} test images"]
        return "\n".join(lines + [f"  {name + ':':<20} {acc:.4f}" for name, acc in rows])


def labeled_folder(root: str | Path, what: str = "--data", max_per_class: int | None = None) -> tuple[list[Path], list[int], list[str]]:
    """Images of a folder with one subfolder per class (at most ``max_per_class`` each, in name
    order); class names are the subfolder names with ``_`` read as a space."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{what}: not a folder: {root}")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"the number of examples per class must be at least 1, got {max_per_class}")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    for i, folder in enumerate(folders):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:max_per_class]
        if not files:
            raise ValueError(f"{what}: the class folder {folder} has no images")
        paths += files
        labels += [i] * len(files)
    if len(folders) < 2 or not paths:
        raise ValueError(f"{what}: {root} needs at least two class subfolders with images")
    return paths, labels, [f.name.replace("_", " ") for f in folders]


def probe(
    pipe: FoundationPipeline, images: Sequence[ImageInput], labels: Sequence[int], classes: Sequence[str],
    templates: Sequence[str] = ("{}",), test_fraction: float = 0.5, shots: int = 5, seed: int = 0,
) -> ProbeReport:
    """Split each class into train/test (seeded), then on the same test images: a linear probe
    fit on all train embeddings, zero-shot from the class names, and ``shots``-shot prototypes."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    y = torch.tensor(list(labels))
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in range(len(classes)):
        members = rng.permutation(np.flatnonzero(y.numpy() == c)).tolist()
        n_test = max(1, round(test_fraction * len(members)))
        if len(members) - n_test < 1:
            raise ValueError(f"class {classes[c]!r} has {len(members)} image(s): too few to split")
        test_idx += members[:n_test]
        train_idx += members[n_test:]
    emb = torch.cat([pipe.embed_image(list(images[i:i + 256])) for i in range(0, len(images), 256)]).float()
    x_train, y_train, x_test, y_test = emb[train_idx], y[train_idx], emb[test_idx], y[test_idx]
    head = fit_linear_probe(x_train, y_train, len(classes))
    with torch.no_grad():
        linear = (head(x_test).argmax(-1) == y_test).float().mean().item()
    zero = (pipe.classify([images[i] for i in test_idx], classes, templates).argmax(-1) == y_test).float().mean().item()
    support = [torch.nonzero(y_train == c).flatten()[:shots] for c in range(len(classes))]
    support = torch.cat(support)
    few = ((x_test @ prototypes(x_train[support], y_train[support], len(classes)).T).argmax(-1) == y_test).float().mean().item()
    return ProbeReport(list(classes), len(train_idx), len(test_idx), shots, linear, zero, few)
