"""Evaluation as callbacks with one written interface, independent of the data source.

What an evaluator receives: the ``FoundationModel`` being trained (eval mode, EMA decoder
weights swapped in), a ``ValidationData`` (below: the validation split's features, labels,
caption groups and pixels, gathered from every rank, plus what the data module says about the
split: class names, their zero-shot prompts, the unique captions), a seeded
``torch.Generator`` and the run folder (for PNGs). What it returns: named float metrics, which
the callback logs as ``val/<name>`` (``test/<name>`` in ``multimodal test``) and which the
end-of-fit report and the model card list.

Every evaluator runs at each validation and once more at the end of fit (``final_metrics``,
reused when the last validation ran on the same weights). Evaluators that only make sense for
some models or data (a decoder, class labels) return no metrics when those are missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from multimodal.zero_shot import zero_shot_weights

from .metrics import retrieval_recall, zero_shot_accuracy

if TYPE_CHECKING:
    from multimodal.model import FoundationModel


@dataclass
class SplitInfo:
    """What the data module knows about its validation split (``FoundationDataModule.split_info``):
    ``classes`` (zero-shot class names; None: the data has no classes), ``class_prompts`` (per
    class, its prompt ensemble) and ``captions`` (the split's unique captions: ``groups`` index them)."""

    classes: list[str] | None = None
    class_prompts: list[list[str]] | None = None
    captions: list[str] | None = None


@dataclass
class ValidationData:
    """The validation split as evaluators see it: ``image_features`` / ``text_features`` [N, E]
    (unit norm, fp32), ``labels`` [N] (class index, -1: none), ``groups`` [N] (index of the
    image's caption in ``info.captions``), ``pixels`` [N, 3, S, S] uint8 (during training kept
    only when an evaluator has ``needs_pixels``: images of a large split are big; the end-of-fit
    evaluation keeps them for its picture). All on the CPU."""

    image_features: torch.Tensor
    text_features: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor
    pixels: torch.Tensor | None
    info: SplitInfo

    def images(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pixels (of the ``mask`` rows) as float [n, 3, S, S] in [0, 1]."""
        if self.pixels is None:
            raise ValueError("this evaluation kept no pixels: set needs_pixels = True on the evaluator")
        return (self.pixels if mask is None else self.pixels[mask]).float() / 255

    def caption_features(self) -> torch.Tensor | None:
        """One text embedding per unique caption [G, E] (None: some image has no caption group)."""
        if not len(self.groups) or bool((self.groups < 0).any()):
            return None
        text = torch.zeros(int(self.groups.max()) + 1, self.text_features.shape[1])
        text[self.groups] = self.text_features  # every item of a group has the same caption, so the same embedding
        return text

    @property
    def labeled(self) -> torch.Tensor:
        """Mask [N] of the images that have a class label."""
        return self.labels >= 0


class Evaluator(Callback):
    """Base class: subclasses implement ``evaluate``; logging and timing are done here."""

    #: generating evaluators (images, captions) run on global rank 0 only
    rank_zero_only: bool = False
    #: whether ``evaluate`` reads ``data.pixels`` (they are kept and gathered only then)
    needs_pixels: bool = False

    def evaluate(self, model: "FoundationModel", data: ValidationData, generator: torch.Generator,
                 out_dir: Path | None) -> dict[str, float]:
        raise NotImplementedError

    def run(self, trainer: L.Trainer, module: Any) -> dict[str, float]:
        data = module.validation_data()  # a collective call (gathers over ranks): every rank makes it
        if data is None or (self.rank_zero_only and not trainer.is_global_zero):
            return {}
        generator = torch.Generator(module.device).manual_seed(0)
        out_dir = module.run_dir
        was_training = module.training
        module.eval()
        try:
            with module.ema_weights(), torch.no_grad():  # full precision, as the exported model runs
                return self.evaluate(module.model, data, generator, out_dir)
        finally:
            module.train(was_training)

    def _log(self, trainer: L.Trainer, module: Any, prefix: str) -> None:
        metrics = self.run(trainer, module)
        module.record_metrics(metrics)
        if metrics:
            module.log_dict({f"{prefix}/{k}": v for k, v in metrics.items()}, rank_zero_only=True)

    def on_validation_epoch_end(self, trainer: L.Trainer, module: Any) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, module: Any) -> None:
        self._log(trainer, module, "test")


class Retrieval(Evaluator):
    """Recall@k (``ks``: 1 and 5 by default) image->text and text->image over the split's
    unique captions (``i2t_R@k``, ``t2i_R@k``)."""

    def __init__(self, ks: tuple[int, ...] = (1, 5)):
        self.ks = tuple(ks)

    def evaluate(self, model, data, generator, out_dir):
        text = data.caption_features()
        return {} if text is None else retrieval_recall(data.image_features, data.groups, text, self.ks)


class ZeroShot(Evaluator):
    """Zero-shot classification accuracy over the split's classes with their prompt ensembles
    (``zero_shot_acc``); nothing for data without classes."""

    def evaluate(self, model, data, generator, out_dir):
        prompts = data.info.class_prompts
        if prompts is None or not bool(data.labeled.any()):
            return {}
        weights = zero_shot_weights(model, prompts).float().cpu()
        keep = data.labeled
        return {"zero_shot_acc": zero_shot_accuracy(data.image_features[keep], data.labels[keep], weights)}


def default_evaluators() -> list[Evaluator]:
    """What every run measures when its config names no evaluator."""
    return [Retrieval(), ZeroShot()]


def final_metrics(trainer: L.Trainer, module: Any) -> dict[str, float]:
    """Every evaluator's metrics on the final weights: those of the last validation when it ran
    at this step, else a fresh evaluation (all ranks take part in gathering the features)."""
    step, metrics = module.last_metrics
    if step == trainer.global_step:  # the last validation (or final evaluation) ran on these weights
        return dict(metrics)
    module.start_evaluation(trainer.datamodule.val_dataloader())
    results: dict[str, float] = {}
    for evaluator in evaluators_of(trainer):
        results.update(evaluator.run(trainer, module))
    module.last_metrics = (trainer.global_step, dict(results))
    return results


def evaluators_of(trainer: L.Trainer) -> list[Evaluator]:
    return [cb for cb in trainer.callbacks if isinstance(cb, Evaluator)]
