"""The data sources behind ``FoundationDataModule``: a folder of images with captions, tar
shards (webdataset) and Hugging Face datasets; each yields raw samples through ``SampleReader``."""

from __future__ import annotations

import csv
import io
import json
import random
import warnings
from pathlib import Path
from typing import Any, Iterable

from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from multimodal.files import read_regular

from .samples import BadSample, IMAGE_EXTENSIONS, SampleReader

# ---- map-style sources ------------------------------------------------------------------------------
MAX_CAPTION_BYTES = 1 << 20  # a caption file larger than this is not a caption
MAX_METADATA_BYTES = 1 << 31


def _read_text_file(path: Path) -> bytes | BadSample | None:
    """A caption file's bytes; None when there is none; a regular file only (a pipe would hang)."""
    try:
        return read_regular(path, MAX_CAPTION_BYTES)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return BadSample("not_a_file", str(path))


def inside(root: Path, name: Any) -> Path | BadSample:
    """``root / name`` for a metadata ``file_name``, which must be a relative path that stays
    inside ``root`` (no absolute path, no ``..``): a data set never reads files outside its folder."""
    if not isinstance(name, str) or not name or "\x00" in name:
        return BadSample("bad_metadata", f"file_name {name!r}")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or relative.drive:
        return BadSample("outside_data_folder", name)
    return root / relative


def _record(root: Path, name: Any, caption: Any) -> tuple[Any, Any]:
    path = inside(root, name)
    return (None, path) if isinstance(path, BadSample) else (path, caption)


def metadata_rows(root: Path) -> list[dict[str, Any] | None] | None:
    """The rows of ``metadata.jsonl`` (None for a line that is not a JSON object), else of
    ``metadata.csv``; None when the folder has neither. The one reader of a folder's metadata."""
    jsonl, table = root / "metadata.jsonl", root / "metadata.csv"
    if jsonl.is_file():
        rows: list[dict[str, Any] | None] = []
        for line in read_regular(jsonl, MAX_METADATA_BYTES).splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8", errors="surrogateescape"))
            except ValueError:
                row = None
            rows.append(row if isinstance(row, dict) else None)
        return rows
    if table.is_file():
        text = read_regular(table, MAX_METADATA_BYTES).decode("utf-8", errors="surrogateescape")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or "file_name" not in reader.fieldnames:
            raise ValueError(f"data.path: {table} needs a 'file_name' column (and 'text'), found {reader.fieldnames}")
        return list(reader)
    return None


def folder_records(root: Path) -> list[tuple[Any, Any]]:
    """(image path, caption) records of a folder, from ``metadata.jsonl``, else ``metadata.csv``,
    else a same-name ``.txt`` per image (read lazily as bytes, so the UTF-8 check is per sample).
    A record whose file cannot be used (a ``file_name`` outside the folder, a metadata line
    that does not parse) is (None, ``BadSample``): skipped and counted by kind."""
    rows = metadata_rows(root)
    if rows is not None:
        return [_record(root, row.get("file_name"), row.get("text")) if row is not None else (None, BadSample("bad_metadata"))
                for row in rows]
    images = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and p.is_file())
    return [(p, p.with_suffix(".txt")) for p in images]


def folder_labels(root: Path) -> dict[Path, str]:
    """Image path -> class from a ``label`` field of ``metadata.jsonl`` / column of
    ``metadata.csv`` (empty when there is none)."""
    labels: dict[Path, str] = {}
    for row in metadata_rows(root) or []:
        path = inside(root, row.get("file_name")) if row is not None else None
        if isinstance(path, Path) and row.get("label") not in (None, ""):
            labels[path] = str(row["label"])
    return labels


def folder_caption(caption: Any) -> Any:
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
        if isinstance(caption, BadSample):  # a metadata line that could not be used (see folder_records)
            return {"bad": caption.kind}
        item = self.reader(image, folder_caption(caption))
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
def member_ext(name: str) -> str:
    return name.rsplit("/", 1)[-1].split(".", 1)[-1].lower() if "." in name.rsplit("/", 1)[-1] else ""


MAX_SHARD_ERRORS = 50


class WebDatasetSource(IterableDataset):
    """Samples of tar shards, split by node (DDP rank) and by dataloader worker; only members
    with an image or text extension are read, and none is decoded by webdataset itself."""

    def __init__(self, urls: str | list[str], reader: SampleReader, resampled: bool, shuffle: int, seed: int,
                 epoch_size: int | None, image_keys: tuple[str, ...], text_keys: tuple[str, ...]):
        super().__init__()
        self.urls, self.reader, self.resampled, self.shuffle, self.seed = urls, reader, resampled, shuffle, seed
        self.epoch_size, self.image_keys, self.text_keys = epoch_size, image_keys, text_keys
        self._errors = 0  # shard reads failed in a row

    def _sample(self, raw: dict[str, Any]) -> dict[str, Any]:
        self._errors = 0  # a shard was read: errors before it were not in a row
        image = next((raw[k] for k in self.image_keys if k in raw), None)
        caption = next((raw[k] for k in self.text_keys if k in raw), None)
        return self.reader(image, caption)

    def _handler(self, error: Exception) -> bool:
        """Skip a shard that cannot be read (with a warning), but stop after
        ``MAX_SHARD_ERRORS`` in a row: resampled shards that all fail (an unreachable URL)
        would otherwise be retried forever without one sample."""
        self._errors += 1
        if self._errors >= MAX_SHARD_ERRORS:
            raise ValueError(f"data.path: {self._errors} shard reads failed in a row, the last with "
                             f"{type(error).__name__}: {str(error)[:200]}; check that the shards are reachable")
        warnings.warn(f"skipped a shard that could not be read: {error!r}", UserWarning, stacklevel=2)
        return True

    def pipeline(self) -> Iterable[dict[str, Any]]:
        try:
            import webdataset as wds
        except ImportError as err:
            raise ImportError("data.source 'webdataset' needs the webdataset package: pip install 'multimodal-foundation[data]'") from err
        wanted = set(self.image_keys) | set(self.text_keys)
        ds = wds.WebDataset(
            self.urls, resampled=self.resampled, shardshuffle=(100 if self.shuffle else False),
            nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker, handler=self._handler,
            select_files=lambda name: member_ext(name) in wanted, empty_check=False, seed=self.seed,
        )
        if self.shuffle:
            ds = ds.shuffle(self.shuffle, rng=random.Random(self.seed))
        ds = ds.map(self._sample)
        return ds.with_epoch(self.epoch_size) if self.epoch_size else ds

    def __iter__(self):
        return iter(self.pipeline())


class ListDataset(Dataset):
    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.items[index])
        if "issues" in item:
            item["issues"] = list(item["issues"])
        return item
