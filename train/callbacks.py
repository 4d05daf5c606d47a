"""Callbacks: the end-of-fit alignment report (metrics, prediction PNG, exported model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy
from PIL import Image, ImageDraw, ImageFont

from multimodal.pipeline import zero_shot_weights


@torch.no_grad()
def collect_features(trainer: L.Trainer, module: L.LightningModule, loader) -> dict[str, torch.Tensor]:
    """Validation features with the trainer's precision, plus the raw images."""
    outs: dict[str, list[torch.Tensor]] = {"image": [], "text": [], "label": [], "group": [], "pixels": []}
    with trainer.precision_plugin.forward_context():
        for batch in loader:
            batch = {k: v.to(module.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            out = module._encode(batch)
            outs["image"].append(out["image_features"].float())
            outs["text"].append(out["text_features"].float())
            outs["label"].append(batch["label"])
            outs["group"].append(batch["group"])
            outs["pixels"].append(batch["image"].cpu())
    return {k: torch.cat(v) for k, v in outs.items()}


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


class AlignmentReport(Callback):
    """At the end of ``fit``: evaluate on the validation split with the final weights, print
    zero-shot accuracy and retrieval recall, write ``val_predictions.png`` and ``metrics.json``
    and export the weights (EMA decoder) as a ``save_pretrained`` folder (``model/``) in the run
    folder and, if ``export_to`` is set, there too (a stable path for the next stage's init_from)."""

    def __init__(self, num_images: int = 16, top_k: int = 3, export: bool = True, export_to: str | None = None):
        self.num_images, self.top_k, self.export, self.export_to = num_images, top_k, export, export_to

    @torch.no_grad()
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out_dir = Path(trainer.log_dir or ".")  # a collective call (broadcast): every rank makes it
        if isinstance(trainer.strategy, FSDPStrategy):
            self._export_sharded(trainer, pl_module, out_dir)
            return
        if not trainer.is_global_zero or trainer.datamodule is None:
            return
        dm = trainer.datamodule
        was_training = pl_module.training
        pl_module.eval()
        feats = collect_features(trainer, pl_module, dm.val_dataloader())
        last = getattr(pl_module, "last_eval", None)
        if last is not None and last[0] == trainer.global_step:  # validated with these very weights
            metrics = dict(last[1])
        else:
            metrics = pl_module.evaluate_features(feats)
            metrics.update(pl_module.generation_fidelity())
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics["global_step"] = trainer.global_step
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        lines = [f"Held-out validation ({len(feats['image'])} images, combinations never seen in training;"
                 " gen_*: generated images scored by the shapes analyzer):"]
        lines += [f"  {k:>14}: {v:.4f}" if isinstance(v, float) else f"  {k:>14}: {v}" for k, v in metrics.items()]

        prompts = dm.zero_shot_prompts()
        if prompts is not None:
            names = dm.classes
            with trainer.precision_plugin.forward_context():
                weights = zero_shot_weights(pl_module.model, prompts).to(feats["image"].device)
            n = min(self.num_images, len(feats["image"]))
            logits = pl_module.model.encoders.logit_scale.exp().float() * feats["image"][:n] @ weights.T
            probs, idx = logits.softmax(-1).topk(self.top_k, dim=-1)
            preds = [[(names[int(i)], float(p)) for p, i in zip(pr, ix)] for pr, ix in zip(probs, idx)]
            titles = [dm.val_captions[int(g)] for g in feats["group"][:n]]
            truth = [names[int(label)] for label in feats["label"][:n]]
            png = out_dir / "val_predictions.png"
            prediction_grid(feats["pixels"][:n], titles, truth, preds).save(png)
            lines.append(f"  wrote {png}")
        if self.export:
            from multimodal.card import describe_data, lora_summary, model_card

            measured = {k: v for k, v in metrics.items() if k != "global_step"}
            with pl_module.ema_weights():
                for target in [out_dir / "model"] + ([Path(self.export_to)] if self.export_to else []):
                    card = model_card(
                        pl_module.model.config, name=f"{trainer.logger.name if trainer.logger else 'model'} (step {trainer.global_step})",
                        data=describe_data(dm), metrics=measured,
                        command=f"multimodal test --config {out_dir / 'config.yaml'} --model.init_from {target}" + (
                            f" --model.overrides '{json.dumps(pl_module.hparams.overrides)}'"  # the open_clip architecture
                            if str(pl_module.hparams.init_from or "").startswith("open_clip:") else ""),
                        training=(f"`multimodal fit` stage `{pl_module.hparams.stage}`, preset `{pl_module.hparams.preset}`, "
                                  f"{trainer.global_step} steps; the run's resolved config is `{out_dir / 'config.yaml'}`. "
                                  "Metrics are on the held-out validation split, with the EMA decoder."
                                  + (lora_summary(pl_module.model.adapter, pl_module.base_model) if pl_module.model.adapter else "")),
                    )
                    if pl_module.model.adapter is not None:  # the adapter alone, with its base's name and hash
                        pl_module.model.save_adapter(target, card=card)
                        lines.append(f"  saved the LoRA adapter to {target} (base: {pl_module.base_model}; "
                                     "FoundationPipeline.from_pretrained loads both)")
                    else:
                        pl_module.model.save_pretrained(target, model_card=card)
                        lines.append(f"  saved model to {target} (FoundationPipeline.from_pretrained)")
        print("\n".join(lines), file=sys.stdout, flush=True)
        pl_module.train(was_training)


    def _export_sharded(self, trainer: L.Trainer, pl_module: L.LightningModule, out_dir: Path) -> None:
        """FSDP: the weights are sharded over the ranks, so every rank takes part in gathering
        the full state dict; rank 0 exports it. (Evaluate the export with ``multimodal test``:
        evaluating here would need every rank in every forward.)"""
        state = trainer.strategy.lightning_module_state_dict()
        if not self.export or not trainer.is_global_zero:
            return
        from multimodal.model import FoundationModel

        model = FoundationModel(pl_module.model.config)
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
        for target in [out_dir / "model"] + ([Path(self.export_to)] if self.export_to else []):
            model.save_pretrained(target)
            print(f"saved model to {target} (gathered from the FSDP shards)", flush=True)


class SampleGrid(Callback):
    """Every ``every_n_steps`` (and at the end of fit): generate the first ``num_images`` fixed
    fidelity prompts with fixed seeds (EMA decoder) and write ``samples/step_XXXXXX.png`` in the
    run folder: each image enlarged, its prompt above, the analyzer's reading below (green when
    color and shape match the prompt)."""

    def __init__(
        self, every_n_steps: int = 500, num_images: int = 16, steps: int = 25, guidance_scale: float = 3.0, scheduler: str = "ddim"
    ):
        self.every_n_steps, self.num_images, self.steps = every_n_steps, num_images, steps
        self.guidance_scale, self.scheduler = guidance_scale, scheduler

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.write(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.write(trainer, pl_module)

    @torch.no_grad()
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        dm = trainer.datamodule
        log_dir = Path(trainer.log_dir or ".")  # a collective call (broadcast): every rank makes it
        prompts = dm.generation_prompts(self.num_images) if dm is not None and pl_module.model.decoder is not None else None
        if not trainer.is_global_zero or not prompts:
            return None
        from train.shapes import analyze

        images = pl_module.generate_fixed([p for p, _, _ in prompts], self.steps, self.guidance_scale, self.scheduler)
        readings = []
        for img, (_, truth, _) in zip(images, prompts):
            found = analyze((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
            name = f"{found.color} {found.shape}" if found else "nothing"
            readings.append([(f"reads {name}", 1.0 if found and (found.color, found.shape) == (truth.color, truth.shape) else 0.0)])
        truth = [f"reads {t.color} {t.shape}" for _, t, _ in prompts]
        grid = prediction_grid(images, [p for p, _, _ in prompts], truth, readings)
        path = log_dir / "samples" / f"step_{trainer.global_step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_image"):  # TensorBoard
            import numpy as np

            experiment.add_image("samples", np.asarray(grid), trainer.global_step, dataformats="HWC")
        return path
