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

import csv
import io
import json
import random
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset
from torch.utils.data._utils.collate import default_collate

from multimodal.adapt import DEFAULT_TEMPLATES

from . import shapes

SOURCES = ("shapes", "folder", "webdataset", "hf")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TEXT_EXTENSIONS = ("txt", "text", "caption")
# What the checks count. Skipped: the sample is dropped. Fixed: the sample is used, repaired.
SKIPPED = (
    "missing_image", "not_an_image", "unreadable_image", "too_many_pixels",
    "missing_caption", "empty_caption", "caption_not_utf8", "bad_metadata",
)
FIXED = ("converted_mode", "truncated_caption")
# Under DDP, samples beyond the smallest batch of any rank (after skipping) are dropped and counted.
DROPPED = ("dropped_uneven_batch",)


class BadSample(Exception):
    """A sample that cannot be used; ``kind`` is one of ``SKIPPED``."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


# ---- one sample -----------------------------------------------------------------------------------
def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparent pixels become white (not black, as a bare convert does)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(source: bytes | str | Path, size: int, max_pixels: int, random_crop: bool = False) -> tuple[torch.Tensor, bool]:
    """Decode, check and transform one image: (tensor [3, size, size] in [0, 1], converted?).

    The pixel count is checked from the header before any pixel is decoded (decompression
    bombs); the shorter side is resized to ``size`` (bicubic), then a center (or random) crop."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except FileNotFoundError as err:
        raise BadSample("missing_image", str(source)) from err
    except UnidentifiedImageError as err:
        raise BadSample("not_an_image", str(err)) from err
    except Image.DecompressionBombError as err:
        raise BadSample("too_many_pixels", str(err)) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise BadSample("unreadable_image", str(err)) from err
    with img:
        if img.width * img.height > max_pixels:
            raise BadSample("too_many_pixels", f"{img.width}x{img.height} > data.max_pixels={max_pixels}")
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError) as err:  # truncated or corrupt data
            raise BadSample("unreadable_image", str(err)) from err
        converted = img.mode != "RGB"
        rgb = to_rgb(img)
    scale = size / min(rgb.size)
    rgb = rgb.resize((max(size, round(rgb.width * scale)), max(size, round(rgb.height * scale))), Image.BICUBIC)
    if random_crop:
        left, top = random.randint(0, rgb.width - size), random.randint(0, rgb.height - size)
    else:
        left, top = (rgb.width - size) // 2, (rgb.height - size) // 2
    return shapes.to_tensor(rgb.crop((left, top, left + size, top + size))), converted


def read_caption(raw: bytes | str | None) -> str:
    """A caption as text: bytes must be UTF-8; whitespace is collapsed; empty is refused."""
    if raw is None:
        raise BadSample("missing_caption")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadSample("caption_not_utf8", str(err)) from err
    elif not isinstance(raw, str):
        raise BadSample("bad_metadata", f"caption is {type(raw).__name__}, not text")
    try:
        raw.encode("utf-8")  # text read with surrogateescape keeps undecodable bytes as surrogates
    except UnicodeEncodeError as err:
        raise BadSample("caption_not_utf8", str(err)) from err
    text = " ".join(raw.split())
    if not text:
        raise BadSample("empty_caption")
    return text


class SampleReader:
    """Turns raw (image, caption) into a batch item, or a ``{"bad": kind}`` marker: one code
    path for every source, so every source checks and counts the same way."""

    def __init__(self, image_size: int, max_pixels: int, random_crop: bool = False, groups: dict[str, int] | None = None):
        self.image_size, self.max_pixels, self.random_crop = image_size, max_pixels, random_crop
        self.groups = groups or {}

    def __call__(self, image: bytes | str | Path | None, caption: bytes | str | None) -> dict[str, Any]:
        try:
            if image is None:
                raise BadSample("missing_image")
            text = read_caption(caption)
            pixels, converted = load_image(image, self.image_size, self.max_pixels, self.random_crop)
        except BadSample as bad:
            return {"bad": bad.kind}
        return {
            "image": pixels, "caption": text, "label": -1, "group": self.groups.get(text, -1),
            "issues": ["converted_mode"] if converted else [],
        }


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Drop bad items and count every issue; the rest is torch's default collation."""
    issues: Counter = Counter()
    good = []
    for item in items:
        if "bad" in item:
            issues[item["bad"]] += 1
            continue
        issues.update(item.pop("issues", ()))
        good.append(item)
    if good:
        batch = default_collate(good)
    else:  # every item was bad: an empty batch the module skips
        batch = {"image": torch.zeros(0, 3, 1, 1), "caption": [], "label": torch.zeros(0, dtype=torch.long),
                 "group": torch.zeros(0, dtype=torch.long)}
    batch["data_issues"] = dict(issues)
    return batch


# ---- map-style sources ------------------------------------------------------------------------------
def _read_text_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def folder_records(root: Path) -> list[tuple[Any, Any]]:
    """(image path, caption) records of a folder, from ``metadata.jsonl``, else ``metadata.csv``,
    else a same-name ``.txt`` per image (read lazily as bytes, so the UTF-8 check is per sample)."""
    jsonl, table = root / "metadata.jsonl", root / "metadata.csv"
    records: list[tuple[Any, Any]] = []
    if jsonl.is_file():
        for line in jsonl.read_bytes().splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8", errors="surrogateescape"))
                records.append((root / row["file_name"], row.get("text")))
            except (ValueError, KeyError, TypeError):
                records.append((None, BadSample("bad_metadata")))
        return records
    if table.is_file():
        with table.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "file_name" not in reader.fieldnames:
                raise ValueError(f"data.path: {table} needs a 'file_name' column (and 'text'), found {reader.fieldnames}")
            for row in reader:
                name = row.get("file_name")
                records.append((root / name if name else None, row.get("text")))
        return records
    images = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and p.is_file())
    return [(p, p.with_suffix(".txt")) for p in images]


def _folder_caption(caption: Any) -> Any:
    """A folder record's raw caption: a ``.txt`` path is read (as bytes) here, lazily."""
    return _read_text_file(caption) if isinstance(caption, Path) else caption


class FolderDataset(Dataset):
    """Items from ``folder_records``, read through ``SampleReader``."""

    def __init__(self, records: list[tuple[Any, Any]], reader: SampleReader, labels: list[int] | None = None):
        self.records, self.reader, self.labels = records, reader, labels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, caption = self.records[index]
        if isinstance(caption, BadSample):  # a metadata line that could not be parsed
            return {"bad": caption.kind}
        item = self.reader(image, _folder_caption(caption))
        if self.labels is not None and "bad" not in item:
            item["label"] = self.labels[index]
        return item


def hf_dataset(path: str, split: str, name: str | None, image_column: str) -> Any:
    """A Hugging Face dataset split with its image column left undecoded (bytes/path), so
    that decoding goes through the same checks as every other source."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError("data.source 'hf' needs the datasets package: pip install 'multimodal-foundation[data]'") from err
    folder = Path(path)
    if folder.is_dir() and any((folder / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(str(folder))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"data.hf_split {split!r} not in {path} (splits: {', '.join(ds)})")
            ds = ds[split]
    elif folder.is_dir():
        ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split=split)
    else:
        ds = datasets.load_dataset(path, name, split=split)
    if image_column not in ds.column_names:
        raise ValueError(f"data.image_column {image_column!r} not in the dataset's columns {ds.column_names}")
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


class HFDataset(Dataset):
    def __init__(self, ds: Any, indices: list[int], image_column: str, caption_column: str, reader: SampleReader):
        self.ds, self.indices, self.reader = ds, indices, reader
        self.image_column, self.caption_column = image_column, caption_column

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.ds[self.indices[index]]
        image = row[self.image_column]
        if isinstance(image, dict):  # datasets.Image(decode=False): {"bytes", "path"}
            image = image.get("bytes") or image.get("path")
        elif isinstance(image, Image.Image):  # an already decoded column: re-encode for the checks
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            image = buffer.getvalue()
        return self.reader(image, row[self.caption_column])


# ---- webdataset -------------------------------------------------------------------------------------
def _member_ext(name: str) -> str:
    return name.rsplit("/", 1)[-1].split(".", 1)[-1].lower() if "." in name.rsplit("/", 1)[-1] else ""


class WebDatasetSource(IterableDataset):
    """Samples of tar shards, split by node (DDP rank) and by dataloader worker; only members
    with an image or text extension are read, and none is decoded by webdataset itself."""

    def __init__(self, urls: str | list[str], reader: SampleReader, resampled: bool, shuffle: int, seed: int,
                 epoch_size: int | None, image_keys: tuple[str, ...], text_keys: tuple[str, ...]):
        super().__init__()
        self.urls, self.reader, self.resampled, self.shuffle, self.seed = urls, reader, resampled, shuffle, seed
        self.epoch_size, self.image_keys, self.text_keys = epoch_size, image_keys, text_keys

    def _sample(self, raw: dict[str, Any]) -> dict[str, Any]:
        image = next((raw[k] for k in self.image_keys if k in raw), None)
        caption = next((raw[k] for k in self.text_keys if k in raw), None)
        return self.reader(image, caption)

    def pipeline(self) -> Iterable[dict[str, Any]]:
        try:
            import webdataset as wds
        except ImportError as err:
            raise ImportError("data.source 'webdataset' needs the webdataset package: pip install 'multimodal-foundation[data]'") from err
        wanted = set(self.image_keys) | set(self.text_keys)
        ds = wds.WebDataset(
            self.urls, resampled=self.resampled, shardshuffle=(100 if self.shuffle else False),
            nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker, handler=wds.warn_and_continue,
            select_files=lambda name: _member_ext(name) in wanted, empty_check=False, seed=self.seed,
        )
        if self.shuffle:
            ds = ds.shuffle(self.shuffle, rng=random.Random(self.seed))
        ds = ds.map(self._sample)
        return ds.with_epoch(self.epoch_size) if self.epoch_size else ds

    def __iter__(self):
        return iter(self.pipeline())


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


# ---- the data module --------------------------------------------------------------------------------
class FoundationDataModule(L.LightningDataModule):
    """Args:
        source: ``shapes``, ``folder``, ``webdataset`` or ``hf``.
        path: the data: a folder (``folder``; ``hf`` ``save_to_disk`` or image folder), tar
            shards (``webdataset``: a path, brace pattern, URL, or several joined by ``::``),
            or a hub dataset name (``hf``).
        val_path: separate validation data of the same kind (needed for ``webdataset``);
            otherwise ``val_fraction`` of a folder / hf dataset is held out.
        image_size: pixels per side; must match the model's ``image.image_size``.
        random_crop: random instead of center crops in training (not bit-exact on resume).
        max_pixels: larger images are skipped (checked from the header, before decoding).
        image_column / caption_column: ``hf`` columns (default ``image`` / ``text``).
        hf_split / hf_name: ``hf`` split (default ``train``) and configuration name.
        resampled / shuffle_buffer / epoch_size: ``webdataset``: draw shards with replacement
            (endless; pair with ``epoch_size`` samples per rank and worker), shuffle buffer size
            (0: off), samples per epoch.
        train_size / val_size: number of generated samples (``shapes``); ``val_size`` also caps
            the ``webdataset`` validation set (read once into memory).
        class_folders / zero_shot_templates: ``folder``: each validation image's class is the
            subfolder it sits in (``_`` read as a space), so validation also reports zero-shot
            accuracy over those classes, with this prompt ensemble.
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
        class_folders: bool = False,
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
        if class_folders and source != "folder":
            raise ValueError(f"data.class_folders works with source 'folder', not {source!r}")
        self.classes: list[str] | None = shapes.class_names() if source == "shapes" else None  # set up for class folders
        self.templates = list(zero_shot_templates or DEFAULT_TEMPLATES)
        if any("{}" not in t for t in self.templates):
            raise ValueError(f"data.zero_shot_templates must each contain {{}}, got {self.templates}")

    def zero_shot_prompts(self) -> list[list[str]] | None:
        """Per zero-shot class (``classes``), its prompt ensemble (None for data without classes)."""
        if self.source == "shapes":
            return [[shapes.fill_template(t, name) for t in shapes.TEMPLATES] for name in shapes.class_names()]
        if self.classes is None:
            return None
        return [[t.format(name) for t in self.templates] for name in self.classes]

    def generation_prompts(self, n: int) -> list[tuple[str, "shapes.ShapeSample", bool]] | None:
        """Prompts whose generations can be scored exactly (shapes only)."""
        return shapes.generation_prompts(n) if self.source == "shapes" else None

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
        val_texts = [_folder_caption(c) for _, c in val if not isinstance(c, BadSample)]
        labels = None
        if self.hparams.class_folders:
            root = Path(self.val_path or self.path)
            folders = [p.parent.name if p is not None and p.parent != root else None for p, _ in val]
            self.classes = sorted({f for f in folders if f is not None})
            if len(self.classes) < 2:
                raise ValueError(f"data.class_folders: the validation images of {root} need at least two class subfolders")
            labels = [self.classes.index(f) if f is not None else -1 for f in folders]
            self.classes = [c.replace("_", " ") for c in self.classes]
        self.train_set = FolderDataset(train, self._reader(True))
        self.val_set = FolderDataset(val, self._reader(False, self._val_groups(val_texts)), labels)

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
        self.val_set = _ListDataset(raw)
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


class _ListDataset(Dataset):
    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.items[index])
        if "issues" in item:
            item["issues"] = list(item["issues"])
        return item
