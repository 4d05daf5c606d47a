"""``FoundationDataModule``: one LightningDataModule in front of every data source.

Sources: ``shapes`` (the embedded default, generated on the fly) and ``folder`` (images plus a
``metadata.jsonl`` with ``file_name`` and ``text``). Batches are dicts: ``image`` [B, 3, S, S]
in [0, 1], ``caption`` (list of str), ``label`` [B] (zero-shot class, -1 if none) and ``group``
[B] (index of the item's caption among the split's unique captions, for retrieval).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from . import shapes

SOURCES = ("shapes", "folder")


class FolderDataset(Dataset):
    """Images listed in ``metadata.jsonl`` (``file_name``, ``text``), resized and center-cropped."""

    def __init__(self, root: Path, records: list[dict], image_size: int, captions: list[str]):
        self.root, self.records, self.image_size, self.captions = root, records, image_size, captions
        self._group = {c: i for i, c in enumerate(captions)}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        with Image.open(self.root / rec["file_name"]) as img:
            img = img.convert("RGB")
            scale = self.image_size / min(img.size)
            img = img.resize((max(self.image_size, round(img.width * scale)), max(self.image_size, round(img.height * scale))), Image.BICUBIC)
            left, top = (img.width - self.image_size) // 2, (img.height - self.image_size) // 2
            img = img.crop((left, top, left + self.image_size, top + self.image_size))
        return {"image": shapes.to_tensor(img), "caption": rec["text"], "label": -1, "group": self._group[rec["text"]]}


class FoundationDataModule(L.LightningDataModule):
    """Args:
        source: ``shapes`` or ``folder``.
        path: folder with ``metadata.jsonl`` (``folder`` source only).
        image_size: pixels per side; must match the model's ``image.image_size``.
        train_size / val_size: number of generated samples (``shapes``).
        val_fraction: share of a folder held out for validation.
    """

    def __init__(
        self,
        source: str = "shapes",
        path: str | None = None,
        image_size: int = 32,
        batch_size: int = 256,
        val_batch_size: int = 256,
        num_workers: int = 0,
        train_size: int = 1_000_000,
        val_size: int = 240,
        val_fraction: float = 0.1,
        seed: int = 0,
    ):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"data.source must be one of {SOURCES}, got {source!r}")
        if source == "folder":
            if not path:
                raise ValueError("data.path is required for source 'folder'")
            if not Path(path).is_dir():
                raise FileNotFoundError(f"data.path does not exist or is not a folder: {path}")
            if not (Path(path) / "metadata.jsonl").is_file():
                raise FileNotFoundError(f"data.path has no metadata.jsonl: {path}")
        if batch_size < 1 or val_batch_size < 1:
            raise ValueError(f"data.batch_size must be at least 1, got {batch_size}")
        self.save_hyperparameters()
        self.source, self.path, self.image_size = source, path, image_size
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.train_size, self.val_size, self.val_fraction, self.seed = train_size, val_size, val_fraction, seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.val_captions: list[str] = []

    def zero_shot_prompts(self) -> list[list[str]] | None:
        """Per zero-shot class, its prompt ensemble (None for sources without classes)."""
        if self.source != "shapes":
            return None
        return [[shapes.fill_template(t, name) for t in shapes.TEMPLATES] for name in shapes.class_names()]

    def generation_prompts(self, n: int) -> list[tuple[str, "shapes.ShapeSample", bool]] | None:
        """Prompts whose generations can be scored exactly (shapes only)."""
        return shapes.generation_prompts(n) if self.source == "shapes" else None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.source == "shapes":
            self.train_set = shapes.ShapesDataset("train", self.train_size, self.image_size, self.seed)
            self.val_set = shapes.ShapesDataset("val", self.val_size, self.image_size, self.seed)
            self.val_captions = [shapes.describe(c) for c in shapes.VAL_COMBOS]
        else:
            root = Path(self.path)
            records = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines() if line.strip()]
            order = np.random.default_rng(self.seed).permutation(len(records))
            n_val = max(1, round(self.val_fraction * len(records)))
            val = [records[i] for i in order[:n_val]]
            train = [records[i] for i in order[n_val:]]
            self.val_captions = sorted({r["text"] for r in val})
            self.train_set = FolderDataset(root, train, self.image_size, sorted({r["text"] for r in train}))
            self.val_set = FolderDataset(root, val, self.image_size, self.val_captions)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, drop_last=drop_last,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        # shapes samples are already i.i.d. by index, so order needs no shuffling (and resumes cleanly)
        return self._loader(self.train_set, self.batch_size, shuffle=self.source != "shapes", drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.val_batch_size, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
