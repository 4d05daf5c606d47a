"""Captioned shapes: the embedded default data, and an analyzer that reads images back.

Every sample is a pure function of ``(seed, split, index)``, so any sample can be regenerated.
The validation split uses only attribute combinations (shape, color, size, position) that the
training split never shows: one held-out (size, position) per (shape, color) pair, so every
color and shape is learned but each validation image is a combination never seen whole.
Because the renderer knows the truth, ``analyze`` can score generated images exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from multimodal.preprocess import to_tensor

SHAPES = ("circle", "square", "triangle", "diamond")
# Shapes the embedded data never shows: a new domain to adapt a trained model to (``write_new_domain``).
NEW_SHAPES = ("star", "cross", "hexagon", "heart")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 135, 30),
}
COLOR_NAMES = tuple(COLORS)
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "center", "bottom left", "bottom right")
BACKGROUND = (255, 255, 255)
IMAGE_SIZES = (32, 64)

_SIZE_FRACTION = {"small": 0.25, "large": 0.44}
_ANCHORS = {"top left": (0.28, 0.28), "top right": (0.72, 0.28), "center": (0.5, 0.5),
            "bottom left": (0.28, 0.72), "bottom right": (0.72, 0.72)}
# Caption templates ({a}: article, {d}: description). The same templates form the zero-shot ensemble.
TEMPLATES = ("{a} {d}", "a picture of {a} {d}", "an image of {a} {d}", "a drawing of {a} {d}")


@dataclass(frozen=True)
class ShapeSample:
    shape: str
    color: str
    size: str
    position: str

    @property
    def label(self) -> int:
        """Class index of the (color, shape) pair, the zero-shot target (24 classes)."""
        return COLOR_NAMES.index(self.color) * len(SHAPES) + SHAPES.index(self.shape)


def class_names() -> list[str]:
    """'color shape' for each label index."""
    return [f"{c} {s}" for c in COLOR_NAMES for s in SHAPES]


ALL_COMBOS = [ShapeSample(s, c, z, p) for c in COLOR_NAMES for s in SHAPES for z in SIZES for p in POSITIONS]


def _held_out() -> frozenset[ShapeSample]:
    """One (size, position) per (color, shape) pair, spread over all ten (size, position) cells."""
    cells = [(z, p) for z in SIZES for p in POSITIONS]
    out = set()
    for k, (c, s) in enumerate((c, s) for c in COLOR_NAMES for s in SHAPES):
        z, p = cells[(7 * k + 3) % len(cells)]
        out.add(ShapeSample(s, c, z, p))
    return frozenset(out)


HELD_OUT = _held_out()
TRAIN_COMBOS = [c for c in ALL_COMBOS if c not in HELD_OUT]
VAL_COMBOS = [c for c in ALL_COMBOS if c in HELD_OUT]


def fill_template(template: str, desc: str) -> str:
    return template.format(a="an" if desc[0] in "aeiou" else "a", d=desc)


def describe(sample: ShapeSample, with_size: bool = True, with_position: bool = True, template: str = TEMPLATES[0],
             with_color: bool = True) -> str:
    """Caption text, e.g. 'a small red circle at the top left'."""
    words = ([sample.size] if with_size else []) + ([sample.color] if with_color else []) + [sample.shape]
    desc = " ".join(words)
    if with_position:
        desc += " in the center" if sample.position == "center" else f" at the {sample.position}"
    return fill_template(template, desc)


def _geometry(sample: ShapeSample, image_size: int, jitter: tuple[int, int]) -> tuple[int, int, int]:
    side = round(_SIZE_FRACTION[sample.size] * image_size)
    ax, ay = _ANCHORS[sample.position]
    x0 = round(ax * image_size - side / 2) + jitter[0]
    y0 = round(ay * image_size - side / 2) + jitter[1]
    return x0, y0, side


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, side: int, fill) -> None:
    """Draw ``shape`` filling the box [x0, x0 + side) x [y0, y0 + side)."""
    x1, y1 = x0 + side - 1, y0 + side - 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "star":  # five points, outer radius side/2, inner 0.4 of it
        r = side / 2
        points = [(cx + (r if k % 2 == 0 else 0.4 * r) * np.sin(np.pi * k / 5), cy - (r if k % 2 == 0 else 0.4 * r) * np.cos(np.pi * k / 5))
                  for k in range(10)]
        draw.polygon(points, fill=fill)
    elif shape == "cross":  # a plus sign, arms a third of the side wide
        t = side / 3
        draw.rectangle([x0, cy - t / 2, x1, cy + t / 2], fill=fill)
        draw.rectangle([cx - t / 2, y0, cx + t / 2, y1], fill=fill)
    elif shape == "hexagon":
        r = side / 2
        draw.polygon([(cx + r * np.cos(np.pi * k / 3), cy + r * np.sin(np.pi * k / 3)) for k in range(6)], fill=fill)
    elif shape == "heart":  # two lobes over a downward point
        r = side / 4
        draw.ellipse([x0, y0, cx, y0 + 2 * r], fill=fill)
        draw.ellipse([cx, y0, x1, y0 + 2 * r], fill=fill)
        draw.polygon([(x0, y0 + r), (x1, y0 + r), (cx, y1)], fill=fill)
    else:
        raise ValueError(f"shape must be one of {SHAPES + NEW_SHAPES}, got {shape!r}")


def render(sample: ShapeSample, image_size: int = 32, jitter: tuple[int, int] = (0, 0)) -> Image.Image:
    """RGB PIL image of one shape on the plain background."""
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size}")
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    x0, y0, side = _geometry(sample, image_size, jitter)
    draw_shape(ImageDraw.Draw(image), sample.shape, x0, y0, side, COLORS[sample.color])
    return image


def _jitter(rng: np.random.Generator, image_size: int) -> tuple[int, int]:
    """A random (dx, dy) offset of up to 4% of the image, so no two renders line up exactly."""
    max_jitter = max(1, round(0.04 * image_size))
    return tuple(int(j) for j in rng.integers(-max_jitter, max_jitter + 1, size=2))


def generate(seed: int, split: str, index: int, image_size: int = 32) -> tuple[Image.Image, str, ShapeSample]:
    """The sample at ``index`` of ``split`` ('train' or 'val'): always the same image and caption."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    jitter = _jitter(rng, image_size)
    if split == "train":
        sample = TRAIN_COMBOS[int(rng.integers(len(TRAIN_COMBOS)))]
        keep_size, keep_pos = rng.random(2) < 0.5  # attribute dropout: "a red circle" means any size/position
        caption = describe(sample, bool(keep_size), bool(keep_pos), TEMPLATES[int(rng.integers(len(TEMPLATES)))])
    else:
        sample = VAL_COMBOS[index % len(VAL_COMBOS)]
        caption = describe(sample)  # full caption: one per held-out combination
    return render(sample, image_size, jitter), caption, sample


def analyze(image: Image.Image | np.ndarray, threshold: int = 60) -> ShapeSample | None:
    """Read shape, color, size and position back from pixels (None when nothing is drawn).

    Color is the palette entry nearest the median foreground pixel; size and position come from
    the foreground's bounding box; shape is the template (re-rendered in that box) with the
    highest overlap with the foreground mask.
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"image must be RGB [H, W, 3], got shape {pixels.shape}")
    pixels = pixels.astype(np.int32)
    size = pixels.shape[0]
    mask = np.abs(pixels - np.array(BACKGROUND)).max(axis=2) > threshold
    if mask.sum() < 3:
        return None
    palette = np.array(list(COLORS.values()))
    median = np.median(pixels[mask], axis=0)
    color = COLOR_NAMES[int(np.argmin(((palette - median) ** 2).sum(axis=1)))]
    ys, xs = np.nonzero(mask)
    x0, y0 = xs.min(), ys.min()
    side = max(xs.max() - x0, ys.max() - y0) + 1
    small, large = (round(_SIZE_FRACTION[z] * size) for z in SIZES)
    size_name = "small" if side < (small + large) / 2 else "large"
    cx, cy = (x0 + side / 2) / size, (y0 + side / 2) / size
    position = min(POSITIONS, key=lambda p: (_ANCHORS[p][0] - cx) ** 2 + (_ANCHORS[p][1] - cy) ** 2)

    def overlap(shape: str) -> float:
        template = Image.new("1", (size, size), 0)
        draw_shape(ImageDraw.Draw(template), shape, int(x0), int(y0), int(side), 1)
        t = np.asarray(template, dtype=bool)
        return (t & mask).sum() / max((t | mask).sum(), 1)

    shape = max(SHAPES, key=overlap)
    return ShapeSample(shape, color, size_name, position)


class ShapesDataset(Dataset):
    """Map-style dataset: item i is ``generate(seed, split, i)`` as tensors."""

    def __init__(self, split: str = "train", size: int = 100_000, image_size: int = 32, seed: int = 0):
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        if image_size not in IMAGE_SIZES:
            raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size}")
        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        image, caption, sample = generate(self.seed, self.split, index, self.image_size)
        group = VAL_COMBOS.index(sample) if self.split == "val" else ALL_COMBOS.index(sample)
        return {"image": to_tensor(image), "caption": caption, "label": sample.label, "group": group}


def generation_prompts(n: int) -> list[tuple[str, ShapeSample, bool]]:
    """``n`` fixed (caption, truth, held_out) prompts for scoring generation: alternately a
    held-out combination (never trained on) and a held-in one, each with its full caption."""
    out = []
    for k in range(n):
        held_out = k % 2 == 0
        sample = VAL_COMBOS[(k // 2) % len(VAL_COMBOS)] if held_out else TRAIN_COMBOS[(37 * (k // 2)) % len(TRAIN_COMBOS)]
        out.append((describe(sample), sample, held_out))
    return out


def read_caption(text: str) -> dict[str, str | None]:
    """The attributes a caption names, read with the dataset's vocabulary: for each of shape,
    color, size and position the one word (or phrase) named, None if none or several are."""
    words = " " + " ".join(text.lower().replace(",", " ").replace(".", " ").split()) + " "

    def one(vocab) -> str | None:
        found = [v for v in vocab if f" {v} " in words]
        found = [v for v in found if not any(v != o and v in o for o in found)]  # "left" vs "top left"
        return found[0] if len(found) == 1 else None

    return {"shape": one(SHAPES), "color": one(COLOR_NAMES), "size": one(SIZES), "position": one(POSITIONS)}


def caption_label(text: str) -> int:
    """The (color, shape) class index a caption names (``ShapeSample.label``), -1 if it does
    not name exactly one color and one shape."""
    read = read_caption(text)
    if read["color"] is None or read["shape"] is None:
        return -1
    return COLOR_NAMES.index(read["color"]) * len(SHAPES) + SHAPES.index(read["shape"])


def fidelity(images: list[Image.Image] | np.ndarray, truths: list[ShapeSample]) -> dict[str, list[bool]]:
    """Per image: does the analyzer find the prompt's color+shape (``cs``) and all four
    attributes (``full``)?"""
    cs, full = [], []
    for image, truth in zip(images, truths):
        if isinstance(image, np.ndarray) and image.dtype != np.uint8:
            image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        found = analyze(image)
        cs.append(found is not None and (found.color, found.shape) == (truth.color, truth.shape))
        full.append(found == truth)
    return {"cs": cs, "full": full}


def write_class_folder(root: str | Path, split: str = "val", count: int = 240, seed: int = 0) -> Path:
    """Write ``count`` samples of ``split`` as ``root/<color>_<shape>/<index>.png`` (one
    subfolder per class): the labeled-folder layout of ``multimodal probe``."""
    root = Path(root)
    for index in range(count):
        image, _, sample = generate(seed, split, index)
        folder = root / f"{sample.color}_{sample.shape}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:05d}.png")
    return root


def write_new_domain(root: str | Path, count: int = 480, seed: int = 0, shapes: tuple[str, ...] = NEW_SHAPES,
                     image_size: int = 32) -> Path:
    """A captioned, labeled folder of shapes the embedded data never shows (``NEW_SHAPES``), in
    every color, size and position: ``root/<shape>/<index>.png`` (the class-folder layout of
    ``multimodal probe`` and ``classify --support``) plus ``root/metadata.jsonl`` captions
    ("a small red star at the top left", with the embedded data's templates; size and position
    are left out of half the captions, color out of a quarter), so one folder serves ``multimodal fit --data.source folder`` and evaluation."""
    import json

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        rng = np.random.default_rng([seed, 2, index])
        shape = shapes[index % len(shapes)]  # balanced classes
        color, size, position = (COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))], SIZES[int(rng.integers(len(SIZES)))],
                                 POSITIONS[int(rng.integers(len(POSITIONS)))])
        sample = ShapeSample(shape, color, size, position)
        jitter = _jitter(rng, image_size)
        keep_size, keep_pos, keep_color = rng.random(3) < (0.5, 0.5, 0.75)
        caption = describe(sample, bool(keep_size), bool(keep_pos), TEMPLATES[int(rng.integers(len(TEMPLATES)))], bool(keep_color))
        name = f"{shape}/{index:05d}.png"
        (root / shape).mkdir(exist_ok=True)
        render(sample, image_size, jitter).save(root / name)
        lines.append(json.dumps({"file_name": name, "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


if __name__ == "__main__":  # python -m train.shapes --new-domain DIR
    import argparse

    parser = argparse.ArgumentParser(prog="python -m train.shapes", description="write shapes data folders")
    parser.add_argument("--new-domain", required=True, help="output folder: train/ (3840 images) and val/ (240, other seeds)")
    args = parser.parse_args()
    for split, count, seed in (("train", 3840, 0), ("val", 240, 1)):
        print(f"wrote {write_new_domain(Path(args.new_domain) / split, count=count, seed=seed)}")


def training_captions() -> list[str]:
    """Every caption the training split can produce (all training combinations, templates and
    attribute dropouts): the shipped model's training vocabulary comes from them."""
    return sorted({describe(s, size, pos, t) for s in TRAIN_COMBOS for t in TEMPLATES for size in (True, False) for pos in (True, False)})
