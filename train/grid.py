"""Picture grids for run folders: images enlarged crisp, a title above, readings below."""

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
