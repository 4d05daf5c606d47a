"""Argument checks shared by the pipeline's methods: every argument is checked before any work,
and an error names the argument and the allowed range."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from .config import MAX_BATCH, MAX_IMAGES, DecoderConfig

OUTPUT_TYPES = ("pil", "np", "pt")
MAX_GUIDANCE = 100.0


def check_generation_inputs(
    decoder: DecoderConfig, prompt: Any, negative_prompt: Any, steps: int, guidance: float, per_prompt: int,
    generator: Any, output_type: str, height: int | None, width: int | None,
) -> tuple[list[str], list[str], list[torch.Generator | None]]:
    """(prompts, negative prompts, one generator per image) for ``FoundationPipeline.__call__``."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else []
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a non-empty string or list of strings")
    most = decoder.num_train_timesteps - 1  # multistep solvers (dpm++, unipc) break at the schedule's length
    if not is_int(steps) or not 1 <= steps <= most:
        raise ValueError(f"num_inference_steps must be an integer in [1, {most}], got {steps!r}")
    if not is_number(guidance) or not 0 <= guidance <= MAX_GUIDANCE:
        raise ValueError(f"guidance_scale must be a number in [0, {MAX_GUIDANCE:g}], got {guidance!r}")
    if not is_int(per_prompt) or not 1 <= per_prompt <= MAX_IMAGES:
        raise ValueError(f"num_images_per_prompt must be an integer in [1, {MAX_IMAGES}], got {per_prompt!r}")
    if len(prompts) * per_prompt > MAX_BATCH:
        raise ValueError(f"at most {MAX_BATCH} images per call (prompts x num_images_per_prompt), got "
                         f"{len(prompts)} x {per_prompt}: generate in several calls")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    size = decoder.image_size
    for name, value in (("height", height), ("width", width)):
        if value is not None and value != size:
            raise ValueError(f"{name} must be {size} (the decoder's image_size), got {value}")
    if negative_prompt is None or isinstance(negative_prompt, str):
        negatives = [negative_prompt or ""] * len(prompts)  # default: the empty prompt
    else:
        negatives = list(negative_prompt)
    if len(negatives) != len(prompts):
        raise ValueError(f"negative_prompt must be a string or a list as long as prompt ({len(prompts)}), got {len(negatives)}")
    n = len(prompts) * per_prompt
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(f"generator list must have one generator per image ({n}), got {len(generator)}")
        generators = list(generator)
    else:
        generators = [generator] * n
    if not all(g is None or isinstance(g, torch.Generator) for g in generators):
        raise ValueError(f"generator must be a torch.Generator, a list of them (one per image) or None, got {generator!r}")
    return prompts, negatives, generators


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def texts_arg(texts: Any) -> list[str]:
    """A string or a non-empty list of strings, as a list; an error names the argument."""
    texts = [texts] if isinstance(texts, str) else list(texts) if isinstance(texts, (list, tuple)) else None
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a string or a non-empty list of strings")
    return texts


def check_finite(values: torch.Tensor, what: str) -> torch.Tensor:
    """``values`` unchanged, or an error when any is NaN/inf (damaged weights, an overflow):
    a wrong number is never returned as if it were an answer."""
    if not bool(torch.isfinite(values).all()):
        raise FloatingPointError(f"{what} came out NaN/inf: the model's weights are damaged or overflow in this dtype "
                                 "(try float32)")
    return values


def check_image_path(path: str | Path, overwrite: bool, what: str = "--out") -> Path:
    """An image file to write: not a folder, a known image suffix, its folder writable, and not
    an existing file unless ``overwrite``. Checked before any work."""
    from .files import IMAGE_SUFFIXES
    from .folders import check_writable

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what}: {path} is a folder; give a file name such as {path / 'image.png'}")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"{what} must end in an image suffix ({', '.join(IMAGE_SUFFIXES)}), got {str(path)!r}")
    if path.is_symlink():  # --overwrite would write through it, into whatever file it points at
        raise ValueError(f"{what}: {path} is a link (to {os.readlink(path)}): write to a new file, or to the linked file itself")
    if os.path.lexists(path) and not path.is_file():
        raise ValueError(f"{what}: {path} exists and is not a regular file (a pipe, device or link to nothing)")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{what}: {path} exists; pass --overwrite to replace it, or choose another name")
    check_writable(path.absolute().parent, what)
    return path
