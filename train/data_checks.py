"""Data that cannot train is refused before the first step (and before anything is written),
with a message that says what to do: no captions, fewer samples than a batch, no validation
split, an image size the model does not have."""

from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

from .samples import DROPPED, FIXED, IMAGE_EXTENSIONS, SKIPPED, BadSample
from .sources import member_ext

WHY = {"bad_metadata": "could not be parsed: each must be a JSON object with file_name and text",
       "outside_data_folder": "name a file outside the data folder (absolute or with ..): refused"}
CAPTION_HELP = ("captions come from a metadata.jsonl ({\"file_name\": ..., \"text\": ...} per line), a metadata.csv "
                "(file_name,text) or a same-name .txt file beside each image")


def _has_caption(caption: Any) -> bool:
    if isinstance(caption, BadSample) or caption is None:
        return False
    if isinstance(caption, Path):
        return caption.is_file() and caption.stat().st_size > 0
    return bool(str(caption).strip()) if not isinstance(caption, bytes) else bool(caption.strip())


def captioned(dataset: Any, limit: int = 200_000) -> tuple[int, int] | None:
    """(samples with a caption, samples) of a map-style split; None when it cannot be told
    without reading it (tar shards)."""
    records = getattr(dataset, "records", None)
    if records is not None:  # folder (metadata lines that could not be parsed are not images)
        images = [(p, c) for p, c in records if p is not None]
        return sum(_has_caption(c) for p, c in images[:limit]), len(images)
    ds, indices = getattr(dataset, "ds", None), getattr(dataset, "indices", None)
    if ds is not None and indices is not None:  # hf
        column = ds.select(indices[:limit])[dataset.caption_column]
        return sum(_has_caption(c) for c in column), len(indices)
    return None


def check_trainable(dm: Any, image_size: int, world_size: int) -> None:
    """Raise ``ValueError`` naming the problem and the fix when ``dm`` cannot train a model
    whose images are ``image_size`` pixels on ``world_size`` processes."""
    if getattr(dm, "image_size", image_size) != image_size:
        raise ValueError(
            f"data.image_size ({dm.image_size}) is not the model's image.image_size ({image_size}): pass --data.image_size "
            f"{image_size}, or size the model for your images with --model.overrides '{{image: {{image_size: {dm.image_size}}}, "
            f"decoder: {{image_size: {dm.image_size}}}}}' (image_size a multiple of image.patch_size)")
    if getattr(dm, "source", "shapes") == "shapes":
        return
    if dm.source == "webdataset":
        check_shards(dm.path, "data.path")
        if dm.val_path:
            check_shards(dm.val_path, "data.val_path")
    dm.setup("fit")
    where = f"data.path {dm.path}"
    counts = captioned(dm.train_set)
    if counts is not None:
        good, total = counts
        kinds = Counter(c.kind for p, c in getattr(dm.train_set, "records", []) if p is None)
        unparsed = "".join(f" ({n} metadata lines {WHY[kind]})" for kind, n in sorted(kinds.items()))
        if total == 0:
            raise ValueError(f"{where}: no training images found{unparsed} (a folder of images with captions: {CAPTION_HELP})")
        if good == 0:
            raise ValueError(f"{where}: none of the {total} training images has a caption{unparsed}, so nothing can train. "
                             f"Add captions: {CAPTION_HELP}")
        need = dm.batch_size * world_size
        if good < need:
            raise ValueError(
                f"{where}: {good} training samples with captions{unparsed}, fewer than one batch (data.batch_size {dm.batch_size} "
                f"x {world_size} process(es) = {need}): lower --data.batch_size to at most {good // world_size or 1}, or add data")
    if dm.val_set is None:
        return  # webdataset without data.val_path: fit says that nothing was measured
    val = captioned(dm.val_set)
    if val is not None and val[0] == 0:
        what = f"data.val_path {dm.val_path}" if dm.val_path else f"the held-out data.val_fraction {dm.val_fraction} of {dm.path}"
        raise ValueError(f"no validation split possible: {what} has no image with a caption ({val[1]} images); pass "
                         f"--data.val_path with captioned images, or raise --data.val_fraction")


SCANNED_MEMBERS = 1000  # a shard's first members that must include an image


def check_shards(urls: str, what: str) -> None:
    """Every local tar shard named by ``urls`` (paths, brace patterns, several joined by ``::``)
    must exist and hold an image among its first ``SCANNED_MEMBERS`` members: otherwise
    webdataset loops through empty epochs forever (or, resampled, waits forever for a sample).
    Remote URLs are read as they stream (``WebDatasetSource`` stops after failures in a row)."""
    try:
        from braceexpand import braceexpand
    except ImportError:  # comes with webdataset; without it the source refuses anyway
        braceexpand = lambda pattern: [pattern]  # noqa: E731
    names = [name for pattern in urls.split("::") for name in braceexpand(pattern)]
    for name in names:
        if name.startswith("pipe:") or ("://" in name and not name.startswith("file://")):
            continue
        path = Path(name.removeprefix("file://"))
        many = f" (one of the {len(names)} shards {urls} names)" if len(names) > 1 else ""
        if not path.is_file():
            raise ValueError(f"{what}: no tar shard at {name}{many}" + (" (a folder: name its .tar files, e.g. "
                             f"{name.rstrip('/')}/shard-{{000..009}}.tar)" if path.is_dir() else ""))
        try:
            with tarfile.open(path) as tar:
                members = [m.name for _, m in zip(range(SCANNED_MEMBERS), tar)]
        except (tarfile.TarError, OSError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{what}: {name} is not a tar file{many} ({reason})") from None
        if not members:
            raise ValueError(f"{what}: {name} is an empty tar file{many}: nothing to train on")
        if not any(member_ext(m) in IMAGE_EXTENSIONS for m in members):
            shown = ", ".join(members[:3])
            raise ValueError(f"{what}: {name} has no image member among its first {len(members)} ({shown} ...){many}: "
                             f"samples are NAME.png (or {', '.join(IMAGE_EXTENSIONS[1:])}) beside NAME.txt")


# Batches in a row without one usable sample after which training stops (endless bad data,
# e.g. resampled shards that all fail, would otherwise "train" on nothing forever).
MAX_EMPTY_BATCHES = 100


def nothing_usable(counts: dict[str, int], span: str) -> str:
    """The message for training that found no usable sample in ``span``: what was skipped."""
    skipped = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()) if n and kind != "used") or "no sample at all"
    return (f"no usable training sample in {span} (skipped: {skipped}): nothing can train, so the run stops "
            "before saving anything. Check data.path: images must be readable files inside the data folder, "
            "each with a non-empty UTF-8 caption")


def report_line(totals: dict[str, int], epochs: list[int]) -> str:
    """One line of used / skipped / fixed sample counts over ``epochs``."""
    skipped = ", ".join(f"{totals[k]} {k}" for k in SKIPPED + DROPPED if totals.get(k)) or "none"
    fixed = ", ".join(f"{totals[k]} {k}" for k in FIXED if totals.get(k)) or "none"
    span = f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}-{epochs[-1]}"
    return f"data, {span}: {totals.get('used', 0)} samples used; skipped: {skipped}; fixed: {fixed}"
