"""``FoundationDataModule``: one LightningDataModule in front of every data source.

Sources (``data.source``):

- ``shapes``: procedural captioned shapes, the embedded default (deterministic by index).
- ``folder``: images plus captions from ``metadata.jsonl`` (``file_name``, ``text``), a
  ``metadata.csv`` with the same columns, or a same-name ``.txt`` beside each image.
- ``webdataset``: tar shards (local paths, brace patterns ``shard-{000..099}.tar`` or any fsspec
  URL), split by node and by worker, optionally resampled; only image and text members are read
  (nothing is unpickled).
- ``hf``: a Hugging Face ``datasets`` dataset: a ``save_to_disk`` folder, a plain image folder
  (``imagefolder``), or a hub name where there is internet.

Every sample goes through the same checks: bad ones (unreadable, not an image, too many pixels,
missing, empty / non-UTF-8 captions) are skipped, fixable ones (CMYK / palette / grayscale /
alpha images) are converted, and each kind is counted per batch (``batch["data_issues"]``); the
training module sums the counts and reports them at the end of every epoch.

Batches are dicts: ``image`` [B, 3, S, S] in [0, 1] (the model normalizes with its own
mean/std), ``caption`` (list of str), ``label`` [B] (zero-shot class, -1 if none), ``group`` [B]
(index of the item's caption among the split's unique captions, for retrieval; -1 in training)
and ``data_issues`` (kind -> count for this batch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from multimodal.templates import DEFAULT_TEMPLATES, check_templates, class_prompts

from . import shapes
from .evaluation import SplitInfo
from .samples import DROPPED, FIXED, SKIPPED, BadSample, IMAGE_EXTENSIONS, TEXT_EXTENSIONS, SampleReader, collate, read_caption
from .sources import FolderDataset, HFDataset, WebDatasetSource, ListDataset, folder_caption, folder_labels, folder_records, hf_dataset

SOURCES = ("shapes", "folder", "webdataset", "hf")
__all__ = ["FoundationDataModule", "SOURCES", "SKIPPED", "FIXED", "DROPPED"]


# ---- resumable loading ------------------------------------------------------------------------------
class ResumableSampler(DistributedSampler):
    """This rank's share of a seeded per-epoch order (a ``DistributedSampler``, also on one
    process, so Lightning leaves it alone) that can start part-way through an epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0  # indices of this rank to skip, once (set when resuming)

    def __iter__(self):
        indices = list(super().__iter__())[self.start:]
        self.start = 0
        return iter(indices)


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position is saved in Lightning checkpoints: ``state_dict`` reads the
    batches the fit loop has consumed this epoch, ``load_state_dict`` skips them (by index,
    without loading them) on the next pass, so a resumed run sees the same batches."""

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, int]] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self.progress() if self.progress is not None else (0, 0)
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        batches = int(state.get("batches", 0))
        if isinstance(self.sampler, ResumableSampler) and 0 < batches < len(self):
            self.sampler.start = batches * int(self.batch_size)


def _class_keys(records: list[tuple[Any, Any]], root: Path) -> list[str | None]:
    """Per folder record, its class: a ``label`` in the metadata (which wins), else the
    subfolder it sits in (None: an image directly in ``root``)."""
    named = folder_labels(root)
    return [named.get(p) if named else p.parent.name if p is not None and p.parent != root else None for p, _ in records]


# ---- the data module --------------------------------------------------------------------------------
class FoundationDataModule(L.LightningDataModule):
    """Image-caption batches from any source; bad samples are skipped and counted.

    Args:
        source: where the pairs come from: shapes (generated), folder, webdataset or hf.
        path: the data: a folder (folder; hf save_to_disk or image folder), tar shards
            (webdataset: a path, brace pattern, URL, or several joined by ::) or a hub dataset
            name (hf); not used by shapes.
        val_path: separate validation data of the same kind (needed for webdataset; default:
            val_fraction of a folder / hf dataset is held out).
        image_size: pixels per side; must equal the model's image.image_size.
        batch_size: training samples per step and process.
        val_batch_size: validation samples per batch.
        num_workers: data loader worker processes (0: in the training process).
        random_crop: random instead of center crops in training (not bit-exact on resume).
        max_pixels: larger images are skipped (checked from the header, before decoding).
        image_column: hf: the image column.
        caption_column: hf: the caption column.
        hf_split: hf: the split to read.
        hf_name: hf: the configuration name (default: none).
        resampled: webdataset: draw shards with replacement (endless; set epoch_size).
        shuffle_buffer: webdataset: shuffle buffer size (0: off).
        epoch_size: webdataset: samples per epoch per rank and worker (default: one pass).
        train_size: shapes: generated training samples per epoch.
        val_size: shapes: generated validation samples; also caps the webdataset validation set
            (read once into memory).
        val_fraction: folder / hf without val_path: the share held out for validation, in (0, 1).
        seed: the seed of the data order, crops and held-out split.
        class_folders: folder: each validation image's class is its metadata label, else its
            subfolder, and validation reports zero-shot accuracy over those classes (default: when
            the validation images sit in at least two subfolders; true: required).
        zero_shot_templates: folder: the zero-shot prompt ensemble, templates with {} (default:
            the built-in ones).
    """

    def __init__(
        self,
        source: str = "shapes",
        path: str | None = None,
        val_path: str | None = None,
        image_size: int = 32,
        batch_size: int = 256,
        val_batch_size: int = 256,
        num_workers: int = 0,
        random_crop: bool = False,
        max_pixels: int = 64_000_000,
        image_column: str = "image",
        caption_column: str = "text",
        hf_split: str = "train",
        hf_name: str | None = None,
        resampled: bool = False,
        shuffle_buffer: int = 1000,
        epoch_size: int | None = None,
        train_size: int = 1_000_000,
        val_size: int = 240,
        val_fraction: float = 0.1,
        seed: int = 0,
        class_folders: bool | None = None,
        zero_shot_templates: list[str] | None = None,
    ):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"data.source must be one of {SOURCES}, got {source!r}")
        if source != "shapes" and not path:
            raise ValueError(f"data.path is required for source {source!r}")
        if source == "folder":
            for name, value in (("data.path", path), ("data.val_path", val_path)):
                if value is not None and not Path(value).is_dir():
                    raise FileNotFoundError(f"{name} does not exist or is not a folder: {value}")
        if batch_size < 1 or val_batch_size < 1:
            raise ValueError(f"data.batch_size and data.val_batch_size must be at least 1, got {batch_size}, {val_batch_size}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if max_pixels < image_size * image_size:
            raise ValueError(f"data.max_pixels ({max_pixels}) is below image_size**2 ({image_size * image_size})")
        self.save_hyperparameters()
        self.source, self.path, self.val_path, self.image_size = source, path, val_path, image_size
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.train_size, self.val_size, self.val_fraction, self.seed = train_size, val_size, val_fraction, seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.val_captions: list[str] = []
        if class_folders is True and source != "folder":
            raise ValueError(f"data.class_folders works with source 'folder', not {source!r}")
        self.classes: list[str] | None = shapes.class_names() if source == "shapes" else None  # set up for class folders
        self.class_dirs: list[str] | None = None
        self.templates = check_templates(zero_shot_templates or DEFAULT_TEMPLATES, "data.zero_shot_templates")

    def split_info(self) -> SplitInfo:
        """What evaluators know about the validation split: its zero-shot classes with their
        prompt ensembles (shapes: the caption templates; class folders: ``zero_shot_templates``)
        and its unique captions."""
        if self.source == "shapes":
            prompts = [[shapes.fill_template(t, name) for t in shapes.TEMPLATES] for name in shapes.class_names()]
            return SplitInfo(shapes.class_names(), prompts, list(self.val_captions))
        if self.classes is None:
            return SplitInfo(None, None, list(self.val_captions))
        return SplitInfo(list(self.classes), class_prompts(self.classes, self.templates), list(self.val_captions))

    def _reader(self, train: bool, groups: dict[str, int] | None = None) -> SampleReader:
        return SampleReader(self.image_size, self.hparams.max_pixels, self.hparams.random_crop and train, groups)

    def _val_groups(self, captions: Iterable[Any]) -> dict[str, int]:
        texts = set()
        for raw in captions:
            try:
                texts.add(read_caption(raw))
            except BadSample:
                pass
        self.val_captions = sorted(texts)
        return {c: i for i, c in enumerate(self.val_captions)}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        getattr(self, f"_setup_{self.source}")()

    def _setup_shapes(self) -> None:
        self.train_set = shapes.ShapesDataset("train", self.train_size, self.image_size, self.seed)
        self.val_set = shapes.ShapesDataset("val", self.val_size, self.image_size, self.seed)
        self.val_captions = [shapes.describe(c) for c in shapes.VAL_COMBOS]

    def _split(self, n: int) -> tuple[list[int], list[int]]:
        order = np.random.default_rng(self.seed).permutation(n).tolist()
        n_val = max(1, round(self.val_fraction * n))
        return order[n_val:], order[:n_val]

    def _setup_folder(self) -> None:
        records = folder_records(Path(self.path))
        if not records:
            raise ValueError(f"data.path: no images or metadata found in {self.path}")
        if self.val_path is not None:
            train, val = records, folder_records(Path(self.val_path))
        else:
            train_idx, val_idx = self._split(len(records))
            train, val = [records[i] for i in sorted(train_idx)], [records[i] for i in sorted(val_idx)]
        val_texts = [folder_caption(c) for _, c in val if not isinstance(c, BadSample)]
        labels = None
        root = Path(self.val_path or self.path)
        folders = _class_keys(val, root)
        classes = sorted({f for f in folders if f is not None})
        if self.hparams.class_folders is True and len(classes) < 2:
            raise ValueError(f"data.class_folders: the validation images of {root} need at least two class subfolders")
        if self.hparams.class_folders is not False and len(classes) >= 2:
            self.class_dirs = classes  # the subfolder names (classes: as the prompts say them)
            labels = [classes.index(f) if f is not None else -1 for f in folders]
            self.classes = [c.replace("_", " ") for c in classes]
        self.train_set = FolderDataset(train, self._reader(True))
        self.val_set = FolderDataset(val, self._reader(False, self._val_groups(val_texts)), labels)

    def train_labels(self) -> list[int]:
        """Per training record, its class index among ``classes`` (-1: none), read the way the
        validation classes are (label column, else subfolder): for classifiers of real images."""
        if self.class_dirs is None or not isinstance(self.train_set, FolderDataset):
            return []
        keys = _class_keys(self.train_set.records, Path(self.path))
        return [self.class_dirs.index(k) if k in self.class_dirs else -1 for k in keys]

    def _setup_hf(self) -> None:
        h = self.hparams
        ds = hf_dataset(self.path, h.hf_split, h.hf_name, h.image_column)
        if h.caption_column not in ds.column_names:
            raise ValueError(f"data.caption_column {h.caption_column!r} not in the dataset's columns {ds.column_names}")
        if self.val_path is not None:
            val_ds = hf_dataset(self.val_path, h.hf_split, h.hf_name, h.image_column)
            train_idx, val_idx = list(range(len(ds))), list(range(len(val_ds)))
        else:
            val_ds = ds
            train_idx, val_idx = (sorted(i) for i in self._split(len(ds)))
        groups = self._val_groups(val_ds.select(val_idx)[h.caption_column])
        self.train_set = HFDataset(ds, train_idx, h.image_column, h.caption_column, self._reader(True))
        self.val_set = HFDataset(val_ds, val_idx, h.image_column, h.caption_column, self._reader(False, groups))

    def _webdataset(self, urls: str, train: bool, groups: dict[str, int] | None = None) -> WebDatasetSource:
        h = self.hparams
        return WebDatasetSource(
            urls.split("::") if "::" in urls else urls, self._reader(train, groups),
            resampled=h.resampled and train, shuffle=h.shuffle_buffer if train else 0, seed=self.seed,
            epoch_size=h.epoch_size if train else None, image_keys=IMAGE_EXTENSIONS, text_keys=TEXT_EXTENSIONS,
        )

    def _setup_webdataset(self) -> None:
        self.train_set = self._webdataset(self.path, True)
        if self.val_path is None:
            return
        # validation: read once into memory (capped at val_size), so it is map-style and repeatable
        raw = []
        for sample in self._webdataset(self.val_path, False).pipeline():
            raw.append(sample)
            if len(raw) >= self.val_size:
                break
        self.val_set = ListDataset(raw)
        good = [s["caption"] for s in raw if "bad" not in s]
        groups = self._val_groups(good)
        for s in raw:
            if "bad" not in s:
                s["group"] = groups[s["caption"]]

    # ---- loaders ----------------------------------------------------------------------------------
    def _progress(self) -> tuple[int, int]:
        trainer = self.trainer
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        common = dict(
            batch_size=batch_size, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            collate_fn=collate, generator=torch.Generator().manual_seed(self.seed),  # never the global RNG
        )
        if isinstance(dataset, IterableDataset):  # shards end with a partial batch per worker: keep it
            return DataLoader(dataset, drop_last=False, **common)
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if not train:
            return DataLoader(dataset, shuffle=False, drop_last=False, **common)
        # shapes samples are already i.i.d. by index, so their order needs no shuffling
        sampler = ResumableSampler(dataset, world, rank, shuffle=self.source != "shapes", seed=self.seed)
        return ResumableDataLoader(
            dataset, sampler=sampler, drop_last=True, progress=self._progress if trainer is not None else None, **common
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            raise ValueError(
                "data.val_path is needed for validation with the webdataset source "
                "(or turn validation off: --trainer.limit_val_batches 0)"
            )
        return self._loader(self.val_set, self.val_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
