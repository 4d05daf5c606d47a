"""Data that cannot train is refused before the first step (and before anything is written),
with a message that says what to do: no captions, fewer samples than a batch, no validation
split, an image size the model does not have."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .samples import BadSample

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
    dm.setup("fit")
    where = f"data.path {dm.path}"
    counts = captioned(dm.train_set)
    if counts is not None:
        good, total = counts
        bad = sum(1 for p, _ in getattr(dm.train_set, "records", []) if p is None)
        unparsed = f" ({bad} metadata lines could not be parsed: each must be a JSON object with file_name and text)" if bad else ""
        if total == 0:
            raise ValueError(f"{where}: no training images found{unparsed} (a folder of images with captions: {CAPTION_HELP})")
        if good == 0:
            raise ValueError(f"{where}: none of the {total} training images has a caption{unparsed}, so nothing can train. "
                             f"Add captions: {CAPTION_HELP}")
        need = dm.batch_size * world_size
        if good < need:
            raise ValueError(
                f"{where}: {good} training samples with captions, fewer than one batch (data.batch_size {dm.batch_size} x "
                f"{world_size} process(es) = {need}): lower --data.batch_size to at most {good // world_size or 1}, or add data")
    if dm.val_set is None:
        return  # webdataset without data.val_path: fit says that nothing was measured
    val = captioned(dm.val_set)
    if val is not None and val[0] == 0:
        what = f"data.val_path {dm.val_path}" if dm.val_path else f"the held-out data.val_fraction {dm.val_fraction} of {dm.path}"
        raise ValueError(f"no validation split possible: {what} has no image with a caption ({val[1]} images); pass "
                         f"--data.val_path with captioned images, or raise --data.val_fraction")
