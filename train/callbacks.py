"""End-of-fit callbacks: ``FitReport`` (final metrics printed and written with a picture of
predictions) and ``ExportModel`` (the trained weights as a ``save_pretrained`` folder with its
model card, or the LoRA adapter alone)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy

from multimodal.zero_shot import zero_shot_weights

from .evaluation import final_metrics
from .grid import prediction_grid, text_grid
from .init import OPEN_CLIP_PREFIX


def _final(trainer: L.Trainer, module: Any) -> dict[str, float] | None:
    """The final metrics on rank 0 (None elsewhere, and under FSDP, where evaluating would need
    every rank in every forward: evaluate the export with ``multimodal test``); empty when the
    data has no validation split."""
    if isinstance(trainer.strategy, FSDPStrategy) or not trainer.is_global_zero:
        return None
    return final_metrics(trainer, module) if _has_validation(trainer) else {}


def _has_validation(trainer: L.Trainer) -> bool:
    """Whether the data module has a validation split (webdataset needs ``data.val_path``)."""
    return trainer.datamodule is not None and getattr(trainer.datamodule, "val_set", True) is not None


class FitReport(Callback):
    """At the end of ``fit``: every evaluator's metrics on the final weights, printed and
    written to ``metrics.json`` in the run folder, and ``val_predictions.png``: the first
    ``num_images`` validation images with their ``top_k`` zero-shot predictions (data with
    classes) or their ``top_k`` nearest captions of the split (data without)."""

    def __init__(self, num_images: int = 16, top_k: int = 3):
        self.num_images, self.top_k = num_images, top_k

    @torch.no_grad()
    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        out_dir = Path(trainer.log_dir or ".")  # a collective call (broadcast): every rank makes it
        metrics = _final(trainer, pl_module)
        if metrics is None:
            return
        if not _has_validation(trainer):
            print("No validation split (data.val_path): nothing measured at the end of fit.", flush=True)
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps({**metrics, "global_step": trainer.global_step}, indent=2) + "\n")
        data = pl_module.validation_data()
        if data is None or data.pixels is None:  # collect the features again, with the images (encoders only)
            pl_module.start_evaluation(trainer.datamodule.val_dataloader())
            data = pl_module.validation_data()
        n_images = len(data.labels) if data is not None else 0
        lines = [f"Validation ({n_images} images) at step {trainer.global_step}:"]
        lines += [f"  {k:>14}: {v:.4f}" for k, v in metrics.items()]
        png = self.write_predictions(pl_module, data, out_dir / "val_predictions.png")
        if png is not None:
            lines.append(f"  wrote {png}")
        pl_module.end_evaluation()
        print("\n".join(lines), file=sys.stdout, flush=True)

    def write_predictions(self, module: Any, data: Any, path: Path) -> Path | None:
        if data is None or data.pixels is None or not len(data.labels):
            return None
        if data.info.class_prompts is None or not bool(data.labeled.any()):  # no classes: the top captions
            return self.write_top_captions(data, path)
        names = data.info.classes
        keep = data.labeled.nonzero().flatten()[: self.num_images]
        weights = zero_shot_weights(module.model, data.info.class_prompts).float().cpu()
        logits = module.model.encoders.logit_scale.exp().float().cpu() * data.image_features[keep] @ weights.T
        probs, idx = logits.softmax(-1).topk(min(self.top_k, len(names)), dim=-1)
        preds = [[(names[int(i)], float(p)) for p, i in zip(pr, ix)] for pr, ix in zip(probs, idx)]
        captions = data.info.captions or []
        titles = [captions[int(g)] if 0 <= int(g) < len(captions) else "" for g in data.groups[keep]]
        truth = [names[int(label)] for label in data.labels[keep]]
        prediction_grid(data.images(keep), titles, truth, preds).save(path)
        return path


    def write_top_captions(self, data: Any, path: Path) -> Path | None:
        """Validation images with their caption and the ``top_k`` nearest captions of the split."""
        captions, text = data.info.captions or [], data.caption_features()
        if not captions or text is None:
            return None
        n = min(self.num_images, len(data.groups))
        top = (data.image_features[:n] @ text.T).topk(min(self.top_k, len(captions)), dim=1).indices
        lines = [[(captions[int(g)], (0, 0, 0))] + [(f"{j + 1}. {captions[int(c)]}", (0, 140, 0) if int(c) == int(g) else (200, 0, 0))
                                                  for j, c in enumerate(row)] for g, row in zip(data.groups[:n], top)]
        text_grid(data.images(torch.arange(n)), lines).save(path)
        return path


class ExportModel(Callback):
    """At the end of ``fit``: write the trained weights (the EMA decoder's) as a
    ``save_pretrained`` folder ``model/`` in the run folder (one per run, never overwritten)
    with its training record, caption vocabulary and a model card listing the final metrics
    and the command that reproduces them. A LoRA run writes its adapter alone. ``export_to``
    (e.g. ``runs/align/model``) becomes a link to the newest run's folder, a stable path for the
    next stage's ``init_from``; a real folder there is left alone. Under FSDP every rank takes
    part in gathering the full weights; rank 0 writes them."""

    def __init__(self, export_to: str | None = None):
        self.export_to = export_to
        self.next_steps = ""  # set by an export: the commands that use the model

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        """Before training: refuse to end where an export cannot go without overwriting."""
        if stage != "fit":
            return
        target = Path(trainer.log_dir or ".") / "model"
        if target.exists() and any(target.iterdir()):  # a logger without versions (or none): the same folder each run
            raise ValueError(f"{target} holds a model from an earlier run and would be overwritten: move it away, or "
                             "log into a new folder (trainer.logger with a versioned save_dir)")
        link = Path(self.export_to) if self.export_to else None
        if link is not None and link.exists() and not link.is_symlink():
            raise ValueError(f"{link} (ExportModel export_to) is a folder from an earlier version of this project, which "
                             f"this run would have overwritten; it now becomes a link to each run's export: move it away "
                             f"first (mv {link} {link}.old) and use {link}.old as --model.init_from if you need it")

    @torch.no_grad()
    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        out_dir = Path(trainer.log_dir or ".")  # a collective call (broadcast): every rank makes it
        if trainer.global_step == 0:  # nothing trained: no model that looks like one, no link moved to it
            if trainer.is_global_zero:
                print("no training step ran: nothing exported", flush=True)
            return
        from multimodal.card import describe_data, lora_summary, model_card

        dm = trainer.datamodule
        record, vocabulary = pl_module.knowledge({"source": getattr(dm, "source", None), "path": getattr(dm, "path", None)})  # all ranks
        if isinstance(trainer.strategy, FSDPStrategy):
            self._export_sharded(trainer, pl_module, out_dir / "model", record, vocabulary)
            return
        metrics = _final(trainer, pl_module)
        if metrics is None:
            return
        model, hp, target = pl_module.model, pl_module.hparams, out_dir / "model"
        model.config.training, model.vocabulary = record, vocabulary
        with pl_module.ema_weights():
            card = model_card(
                model.config, name=f"{trainer.logger.name if trainer.logger else 'model'} (step {trainer.global_step})",
                data=describe_data(trainer.datamodule), metrics=metrics,
                command=f"multimodal test --config {out_dir / 'config.yaml'} --model.init_from {target}" + (
                    f" --model.overrides '{json.dumps(hp.overrides)}'"  # the open_clip architecture
                    if str(hp.init_from or "").startswith(OPEN_CLIP_PREFIX) else ""),
                training=(f"`multimodal fit` stage `{hp.stage}`, preset `{hp.preset}`, {trainer.global_step} steps; "
                          f"the run's resolved config is `{out_dir / 'config.yaml'}`. "
                          + (" Metrics are on the held-out validation split" + (", with the EMA decoder." if "decoder" in pl_module.trains else ".") if metrics else "")
                          + (lora_summary(model.adapter, pl_module.base_model) if model.adapter else "")),
            )
            if model.adapter is not None:  # the adapter alone, with its base's name and hash
                model.save_adapter(target, card=card)
                print(f"saved the LoRA adapter to {target} (base: {pl_module.base_model}; "
                      "FoundationPipeline.from_pretrained loads both)", flush=True)
            else:
                model.save_pretrained(target, model_card=card)
                print(f"saved model to {target} (FoundationPipeline.from_pretrained)", flush=True)
        self._link(target)
        if model.adapter is None:  # printed by the command once the progress bar is gone (train.cli)
            self.next_steps = next_steps(Path(self.export_to) if self.export_to else target, model.config, getattr(dm, "source", None))
        pl_module.end_evaluation()  # the final features are not needed any more

    def _link(self, target: Path) -> None:
        """Point ``export_to`` at ``target`` (replacing only an earlier link)."""
        if not self.export_to:
            return
        link = Path(self.export_to)
        if link.exists() and not link.is_symlink():
            print(f"{link} is a folder of its own (not a link from an earlier run): left as it is; this run's model is {target}", flush=True)
            return
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(target.resolve(), target_is_directory=True)
        print(f"{link} -> {target}", flush=True)

    def _export_sharded(self, trainer: L.Trainer, pl_module: Any, target: Path, record: Any, vocabulary: Any) -> None:
        state = trainer.strategy.lightning_module_state_dict()
        if not trainer.is_global_zero:
            return
        from multimodal.model import FoundationModel

        model = FoundationModel(pl_module.model.config)
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
        model.config.training, model.vocabulary = record, vocabulary
        model.save_pretrained(target)
        print(f"saved model to {target} (gathered from the FSDP shards)", flush=True)
        self._link(target)


def next_steps(folder: Path, config: Any, source: str | None) -> str:
    """What to run with a freshly trained model: the commands for its trained heads."""
    from multimodal.knowledge import trained_components

    trained = trained_components(config)
    shapes = source in (None, "shapes")
    prompt, image = ("'a large red circle'", "assets/demo/small_red_circle.png") if shapes else ("'YOUR PROMPT'", "IMAGE.png")
    labels = "'red circle, blue square'" if shapes else "'A, B'"
    lines = [f"next: use the model in {folder}"]
    if "decoder" in trained:
        lines.append(f"  multimodal generate {prompt} --model {folder} --out image.png")
    if "language" in trained:
        lines.append(f"  multimodal caption {image} --model {folder}")
    lines.append(f"  multimodal classify {image} --labels {labels} --model {folder}")
    lines.append(f"  multimodal demo --model {folder}   (scores on a folder: multimodal evaluate --model {folder} --data FOLDER)")
    return "\n".join(lines)
