"""The one input layer for images, in training and inference alike.

``open_image`` reads a file or bytes: regular files only (a FIFO or device would block), the
pixel count checked from the header before any pixel is decoded (decompression bombs), damaged,
truncated and empty files refused; every refusal is an ``ImageError`` whose ``kind`` is what
training counts it as. ``preprocess``: any PIL image -> RGB (transparent pixels on white,
16-bit values scaled, not clipped) -> shorter side resized to the model's size (bicubic,
antialiased by PIL) -> center crop (or a random crop in training) -> float tensor [3, S, S] in
[0, 1]. The model normalizes with its own mean/std."""

from __future__ import annotations

import io
import random
import warnings
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .files import NotARegularFileError, open_regular

ImageInput = Union[Image.Image, np.ndarray, torch.Tensor, str, Path]
# Inputs with more pixels are refused before decoding (64 MP: 192 MB as RGB); the demo sets less.
MAX_PIXELS = 64_000_000
# The formats PIL may decode: the common raster ones (EPS would run Ghostscript, for one).
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


class ImageError(ValueError):
    """An image that cannot be used; ``kind`` is the count training files it under
    (``missing_image``, ``not_a_file``, ``not_an_image``, ``unreadable_image``, ``too_many_pixels``)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def open_image(source: bytes | str | Path, max_pixels: int = MAX_PIXELS, what: str = "images") -> Image.Image:
    """Decode one image file (or its bytes) after every check; ``what`` names the argument."""
    name = "the image bytes" if isinstance(source, bytes) else str(source)
    try:
        stream = io.BytesIO(source) if isinstance(source, bytes) else open_regular(source)
    except FileNotFoundError:
        raise ImageError("missing_image", f"{what}: file not found: {name}") from None
    except (IsADirectoryError, NotARegularFileError):
        raise ImageError("not_a_file", f"{what}: {name} is not a regular file (a folder, pipe or device)") from None
    except (OSError, ValueError) as err:  # ValueError: a name with a NUL byte
        raise ImageError("unreadable_image", f"{what}: {name} cannot be read ({getattr(err, 'strerror', None) or err})") from None
    with stream:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(stream, formats=FORMATS)
        except UnidentifiedImageError:
            raise ImageError("not_an_image", f"{what}: {name} is not an image file in a supported format "
                                             f"({', '.join(FORMATS)}), or is empty") from None
        except Image.DecompressionBombError:
            raise ImageError("too_many_pixels", f"{what}: {name} has more than {max_pixels} pixels (refused before decoding)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise ImageError("unreadable_image", f"{what}: {name} is not a readable image ({err})") from None
        if img.width * img.height > max_pixels:
            raise ImageError("too_many_pixels", f"{what}: {name} is {img.width}x{img.height} = {img.width * img.height} pixels, "
                                                f"more than the {max_pixels} allowed (refused before decoding)")
        try:
            img.load()  # reads the pixels; the file is closed on leaving
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
            raise ImageError("unreadable_image", f"{what}: {name} is damaged or truncated ({err})") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: transparent pixels become white (a bare ``convert`` makes them
    black or keeps hidden colors), 16/32-bit integer grayscale is scaled to 8 bits (a bare
    ``convert`` clips everything above 255 to white), float grayscale in [0, 1] too."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(img).astype(np.float64)
        scale = 257.0 if img.mode.startswith("I;16") or values.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(np.round(values / scale), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "F":  # 32-bit float: [0, 1] scaled to 8 bits, anything else clipped to [0, 255]
        values = np.nan_to_num(np.asarray(img, dtype=np.float64))
        scale = 255.0 if values.size and values.min() >= 0 and values.max() <= 1 else 1.0
        img = Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8), mode="L")
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
    try:
        rgb = to_rgb(img)
    except (ValueError, OSError) as err:  # a mode PIL cannot convert (e.g. some TIFF layouts)
        raise ImageError("unreadable_image", f"images: an image in mode {img.mode!r} cannot be made RGB ({err})") from None
    if min(rgb.size) < 1:
        raise ImageError("unreadable_image", f"images: an image of size {rgb.width}x{rgb.height} has no pixels")
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


def as_pil(item: Any, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A path, PIL image, numpy array (uint8, or float in [0, 1]) or tensor [3, H, W] in [0, 1]
    -> a PIL image in its own mode (``preprocess`` makes it RGB). Files go through ``open_image``."""
    if isinstance(item, (str, Path)):
        return open_image(item, max_pixels)
    if isinstance(item, torch.Tensor):
        if item.dim() != 3 or item.shape[0] != 3 or not item.is_floating_point():
            raise ValueError(f"images: a tensor image must be float [3, H, W] in [0, 1], got {item.dtype} {tuple(item.shape)}")
        item = item.detach().float().cpu().permute(1, 2, 0).numpy()
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[-1] not in (1, 3, 4) or 0 in item.shape:
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
