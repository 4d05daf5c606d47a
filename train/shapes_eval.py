"""Exact evaluators for the embedded shapes world: the shapes analyzer reads color, shape, size
and position back from pixels, so generated images and captions are scored exactly. They are
evaluators like any other (``train.evaluation``) and a sample-grid callback; recipes for the
shapes data list them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from multimodal.config import SCHEDULER_NAMES
from multimodal.pipeline import FoundationPipeline

from . import shapes
from .evaluation import Evaluator
from .grid import text_grid
from .report import generate_fixed


class ShapesGeneration(Evaluator):
    """Share of generated images (fixed prompts and seeds, EMA decoder, the model's sampling
    settings unless ``scheduler`` / ``steps`` / ``guidance_scale`` are given) in which the
    analyzer reads the prompt's color+shape (``gen_cs_*``) and all four attributes
    (``gen_full_*``), for held-out and held-in prompts (``num_prompts`` in all); with other
    settings the names end in ``_{scheduler}{steps}`` (e.g. ``gen_cs_heldout_euler8``)."""

    rank_zero_only = True

    def __init__(self, num_prompts: int = 64, scheduler: str | None = None, steps: int | None = None,
                 guidance_scale: float | None = None):
        if num_prompts < 2:
            raise ValueError(f"num_prompts must be at least 2 (held-out and held-in), got {num_prompts}")
        self.num_prompts = num_prompts
        if scheduler is not None and scheduler not in SCHEDULER_NAMES:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULER_NAMES)}, got {scheduler!r}")
        self.settings = {k: v for k, v in (("scheduler", scheduler), ("num_inference_steps", steps), ("guidance_scale", guidance_scale))
                         if v is not None}
        if steps is not None and not (isinstance(steps, int) and 1 <= steps <= 999):
            raise ValueError(f"steps must be an integer in [1, 999], got {steps}")
        if guidance_scale is not None and not 0 <= guidance_scale <= 100:
            raise ValueError(f"guidance_scale must be in [0, 100], got {guidance_scale}")
        tag = f"{scheduler or ''}{steps or ''}" + (f"{'_' if scheduler or steps else ''}g{guidance_scale:g}" if guidance_scale is not None else "")
        self.suffix = f"_{tag}" if tag else ""

    def evaluate(self, model, data, generator, out_dir):
        if model.decoder is None:
            return {}
        prompts = shapes.generation_prompts(self.num_prompts)
        images = generate_fixed(model, [p for p, _, _ in prompts], model.pixel_mean.device, **self.settings)
        scores = shapes.fidelity(images.permute(0, 2, 3, 1).cpu().numpy(), [t for _, t, _ in prompts])
        metrics = {}
        for split, held in (("heldout", True), ("heldin", False)):
            idx = [i for i, (_, _, h) in enumerate(prompts) if h == held]
            for kind in ("cs", "full"):
                metrics[f"gen_{kind}_{split}{self.suffix}"] = sum(scores[kind][i] for i in idx) / max(1, len(idx))
        return metrics


class ShapesCaption(Evaluator):
    """Share of labeled validation images whose greedy caption (``max_new_tokens``, KV cache)
    names their color and shape (``caption_acc``), read with the shapes vocabulary."""

    rank_zero_only = True
    needs_pixels = True

    def __init__(self, max_new_tokens: int = 12, batch_size: int = 256):
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def evaluate(self, model, data, generator, out_dir):
        keep = data.labeled
        if model.language is None or not bool(keep.any()):
            return {}
        pipe = FoundationPipeline(model)
        pixels = data.images(keep).to(model.pixel_mean.device)
        captions = [c for chunk in pixels.split(self.batch_size) for c in pipe.caption(chunk, max_new_tokens=self.max_new_tokens)]
        found = torch.tensor([shapes.caption_label(c) for c in captions])
        return {"caption_acc": (found == data.labels[keep]).float().mean().item()}


class SampleGrid(Callback):
    """Every ``every_n_steps`` (and at the end of fit): generate the first ``num_images`` fixed
    shapes prompts with fixed seeds (EMA decoder, the model's sampling settings) and write
    ``samples/step_XXXXXX.png`` in the run folder: each image enlarged, its prompt above, the
    analyzer's reading of color+shape and of size+position below it, each green where it matches
    the prompt and red where not."""

    def __init__(self, every_n_steps: int = 500, num_images: int = 16):
        self.every_n_steps, self.num_images = every_n_steps, num_images

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.write(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.write(trainer, pl_module)

    @torch.no_grad()
    def write(self, trainer: L.Trainer, pl_module: Any) -> Path | None:
        log_dir = Path(trainer.log_dir or ".")  # a collective call (broadcast): every rank makes it
        if not trainer.is_global_zero or pl_module.model.decoder is None:
            return None
        prompts = shapes.generation_prompts(self.num_images)
        was_training = pl_module.training
        with pl_module.ema_weights():
            images = generate_fixed(pl_module.model, [p for p, _, _ in prompts], pl_module.device)
        pl_module.train(was_training)
        lines = []
        for img, (prompt, truth, _) in zip(images, prompts):
            found = shapes.analyze((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
            cell = [(prompt, (0, 0, 0))]
            for what, fields in (("color+shape", ("color", "shape")), ("size+position", ("size", "position"))):
                read = " ".join(getattr(found, f) for f in fields) if found else "nothing"
                match = found is not None and all(getattr(found, f) == getattr(truth, f) for f in fields)
                cell.append((f"{what}: {read}", (0, 140, 0) if match else (200, 0, 0)))
            lines.append(cell)
        grid = text_grid(images, lines, scale=4)
        path = log_dir / "samples" / f"step_{trainer.global_step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_image"):  # TensorBoard
            experiment.add_image("samples", np.asarray(grid), trainer.global_step, dataformats="HWC")
        return path
