"""Picture grids for run folders and reports: images enlarged crisp with their texts."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont


def prediction_grid(
    pixels: torch.Tensor, titles: list[str], truth: list[str], predictions: list[list[tuple[str, float]]],
    columns: int = 4, scale: int = 4,
) -> Image.Image:
    """Images enlarged with nearest-neighbour (crisp), caption above, top predictions below;
    a prediction is green when it is the true class ``truth[i]``, red otherwise."""
    font = ImageFont.load_default()
    size = pixels.shape[-1] * scale
    line = 12
    cell_w, cell_h = max(size, 210) + 8, size + line * (2 + len(predictions[0])) + 8
    rows = (len(truth) + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), (250, 250, 250))
    draw = ImageDraw.Draw(grid)
    for i, (px, title, true, preds) in enumerate(zip(pixels, titles, truth, predictions)):
        x, y = (i % columns) * cell_w + 4, (i // columns) * cell_h + 4
        draw.text((x, y), title, fill=(0, 0, 0), font=font)
        img = Image.fromarray((px.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()).resize((size, size), Image.NEAREST)
        grid.paste(img, (x, y + line + 2))
        for j, (name, prob) in enumerate(preds):
            color = (0, 140, 0) if name == true else (200, 0, 0)
            draw.text((x, y + line + size + 4 + j * line), f"{j + 1}. {name}  {prob:.2f}", fill=color, font=font)
    return grid


def text_grid(pixels: torch.Tensor, lines: list[list[tuple[str, tuple[int, int, int]]]], columns: int = 4,
              scale: int | None = None) -> Image.Image:
    """Images enlarged crisp, each with its lines of (text, color) below (long lines wrapped)."""
    font = ImageFont.load_default()
    scale = scale or max(1, 96 // pixels.shape[-1])
    size, line, width = pixels.shape[-1] * scale, 12, 260
    wrapped = [[(chunk, color) for text, color in cell for chunk in _wrap(text, width // 6)] for cell in lines]
    cell_w, cell_h = max(size, width) + 8, size + line * max(len(c) for c in wrapped) + 10
    rows = (len(pixels) + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), (250, 250, 250))
    draw = ImageDraw.Draw(grid)
    for i, (px, cell) in enumerate(zip(pixels, wrapped)):
        x, y = (i % columns) * cell_w + 4, (i // columns) * cell_h + 4
        img = Image.fromarray((px.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()).resize((size, size), Image.NEAREST)
        grid.paste(img, (x, y))
        for j, (text, color) in enumerate(cell):
            draw.text((x, y + size + 2 + j * line), text, fill=color, font=font)
    return grid


def _wrap(text: str, chars: int) -> list[str]:
    words, out, cur = text.split(), [], ""
    for word in words:
        if cur and len(cur) + 1 + len(word) > chars:
            out.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}".strip()
    return out + ([cur] if cur else []) or [""]
