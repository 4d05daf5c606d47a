"""Image preprocessing, one function for training and inference alike: any PIL image -> RGB
(transparent pixels on white, 16-bit values scaled, not clipped) -> shorter side resized to the
model's size (bicubic, antialiased by PIL) -> center crop (or a random crop in training) ->
float tensor [3, S, S] in [0, 1]. The model normalizes with its own mean/std."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

ImageInput = Union[Image.Image, np.ndarray, torch.Tensor, str, Path]


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: transparent pixels become white (a bare ``convert`` makes them
    black or keeps hidden colors), 16/32-bit integer grayscale is scaled to 8 bits (a bare
    ``convert`` clips everything above 255 to white)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(img).astype(np.float64)
        scale = 257.0 if img.mode.startswith("I;16") or values.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(np.round(values / scale), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)


def preprocess(img: Image.Image, size: int, random_crop: bool = False) -> torch.Tensor:
    """Any PIL image -> [3, size, size] in [0, 1]: RGB, shorter side to ``size``, then a center
    crop (``random_crop``: a random one, from Python's ``random``)."""
    rgb = to_rgb(img)
    if rgb.size != (size, size):
        scale = size / min(rgb.size)
        rgb = rgb.resize((max(size, round(rgb.width * scale)), max(size, round(rgb.height * scale))), Image.BICUBIC)
    if random_crop:
        left, top = random.randint(0, rgb.width - size), random.randint(0, rgb.height - size)
    else:
        left, top = (rgb.width - size) // 2, (rgb.height - size) // 2
    if (left, top, rgb.width, rgb.height) != (0, 0, size, size):
        rgb = rgb.crop((left, top, left + size, top + size))
    return to_tensor(rgb)


def as_pil(item: Any) -> Image.Image:
    """A path, PIL image, numpy array (uint8, or float in [0, 1]) or tensor [3, H, W] in [0, 1]
    -> a PIL image in its own mode (``preprocess`` makes it RGB)."""
    if isinstance(item, (str, Path)):
        if not Path(item).is_file():
            raise ValueError(f"images: file not found: {item}")
        try:
            img = Image.open(item)
            img.load()  # reads the pixels and closes the file
            return img
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"images: {Path(item).name} is not a readable image ({err})") from None
    if isinstance(item, torch.Tensor):
        if item.dim() != 3 or item.shape[0] != 3 or not item.is_floating_point():
            raise ValueError(f"images: a tensor image must be float [3, H, W] in [0, 1], got {item.dtype} {tuple(item.shape)}")
        item = item.detach().float().cpu().permute(1, 2, 0).numpy()
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[-1] not in (1, 3, 4):
            raise ValueError(f"images: an array image must be [H, W, 3] (or 1 / 4 channels), got shape {item.shape}")
        if item.dtype != np.uint8:
            if not np.issubdtype(item.dtype, np.floating) or not np.isfinite(item).all() or item.min() < 0 or item.max() > 1:
                raise ValueError(f"images: an array image must be uint8 in [0, 255] or float in [0, 1], got {item.dtype} "
                                 f"with values in [{item.min()}, {item.max()}]")
            item = (item * 255).round().astype(np.uint8)
        return Image.fromarray(item[..., 0] if item.shape[-1] == 1 else item)
    if not isinstance(item, Image.Image):
        raise ValueError(f"images: unsupported type {type(item).__name__} (PIL image, numpy array, tensor or path)")
    return item
