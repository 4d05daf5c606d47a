"""One sample, whatever its source: decode and check the image, read the caption, count what
was skipped or fixed. Every source goes through ``SampleReader``, so every source checks and
counts the same way; images go through the one preprocessing function of training and
inference (``multimodal.preprocess``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils.data._utils.collate import default_collate

from multimodal.files import IMAGE_SUFFIXES
from multimodal.preprocess import ImageError, open_image, preprocess

IMAGE_EXTENSIONS = tuple(s.lstrip(".") for s in IMAGE_SUFFIXES)  # webdataset member keys: no dot
TEXT_EXTENSIONS = ("txt", "text", "caption")
# What the checks count. Skipped: the sample is dropped. Fixed: the sample is used, repaired.
SKIPPED = (
    "missing_image", "not_a_file", "outside_data_folder", "not_an_image", "unreadable_image", "too_many_pixels",
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


# ---- one sample ----------------------------------------------------------------------------------
def load_image(source: bytes | str | Path, size: int, max_pixels: int, random_crop: bool = False) -> tuple[torch.Tensor, bool]:
    """Decode, check and transform one image (``multimodal.preprocess``: the pixel count is
    checked from the header before any pixel is decoded; pipes and devices are refused):
    (tensor [3, size, size] in [0, 1], converted?)."""
    try:
        img = open_image(source, max_pixels)
        return preprocess(img, size, random_crop), img.mode != "RGB"
    except ImageError as err:
        raise BadSample(err.kind, str(err)) from err


def read_caption(raw: bytes | str | BadSample | None) -> str:
    """A caption as text: bytes must be UTF-8; whitespace is collapsed; empty is refused."""
    if raw is None:
        raise BadSample("missing_caption")
    if isinstance(raw, BadSample):  # a caption file that could not be read (e.g. a pipe)
        raise raw
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
