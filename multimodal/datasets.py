"""Real data sets that a registry package ships, written as ordinary training folders.

``digits``: the UCI "Optical Recognition of Handwritten Digits" test set as shipped inside
scikit-learn (``sklearn.datasets.load_digits``; 1797 scans of digits written by 43 people,
8x8 pixels, 17 grey levels; CC BY 4.0, Alpaydin & Kaynak 1998). Nothing is downloaded. The
images are real; the data set has labels, not captions, so each image gets a caption made from
its label with one of a few phrasings (chosen by index), which is said wherever it is used.
The folder is what any user's data looks like: ``train/`` and ``val/``, class subfolders and a
``metadata.jsonl`` with ``file_name`` and ``text``.
"""

from __future__ import annotations

import json
from pathlib import Path

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_CAPTIONS = ("a handwritten digit {name}", "the number {name} written by hand", "a scan of a handwritten {name}")
DATASETS = ("digits",)


def write_digits(out: str | Path, val_every: int = 5, overwrite: bool = False) -> dict[str, int]:
    """Write scikit-learn's digits as ``out/train`` and ``out/val`` image folders (every
    ``val_every``-th image is held out); returns the number of images per split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the digits data set ships with scikit-learn: pip install scikit-learn") from err
    from PIL import Image

    if val_every < 2:
        raise ValueError(f"val_every must be at least 2, got {val_every}")
    from .folders import check_target, write_folder

    out = check_target(out, overwrite, "out")
    digits = load_digits()
    counts = {"train": 0, "val": 0}

    def write(folder: Path) -> None:
        lines: dict[str, list[str]] = {"train": [], "val": []}
        for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
            split = "val" if index % val_every == 0 else "train"
            name = DIGIT_NAMES[int(label)]
            file_name = f"{name}/{index:04d}.png"
            path = folder / split / file_name
            path.parent.mkdir(parents=True, exist_ok=True)
            # 17 grey levels (0..16, ink high) -> 8-bit, white ink on black, the data set's own 8x8
            Image.fromarray((pixels * 255 / 16).round().astype("uint8"), mode="L").save(path)
            caption = DIGIT_CAPTIONS[(index // val_every) % len(DIGIT_CAPTIONS)].format(name=name)
            lines[split].append(json.dumps({"file_name": file_name, "text": caption}))
            counts[split] += 1
        for split, rows in lines.items():
            (folder / split / "metadata.jsonl").write_text("\n".join(rows) + "\n")

    write_folder(out, write, overwrite, "out")
    return counts
