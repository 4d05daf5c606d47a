"""``FoundationModule``: the LightningModule that owns the losses and the optimizer."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from open_clip.loss import ClipLoss

from multimodal.config import FoundationConfig
from multimodal.model import FoundationModel
from multimodal.pipeline import zero_shot_weights

from .metrics import retrieval_recall, zero_shot_accuracy

_NO_DECAY_NAMES = ("embedding", "logit_scale")


class FoundationModule(L.LightningModule):
    """Args:
        preset: named model preset (``tiny``, ``shapes``, ``base``).
        overrides: nested config overrides applied on the preset, e.g. ``{text: {layers: 4}}``.
        lr, weight_decay, betas, eps: AdamW (no decay on norms, biases, embeddings, logit scale).
        warmup_steps, min_lr_ratio: linear warmup, then cosine decay to ``lr * min_lr_ratio``.
    """

    def __init__(
        self,
        preset: str = "shapes",
        overrides: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        contrastive_weight: float = 1.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = FoundationModel(FoundationConfig.from_preset(preset, overrides))
        self.clip_loss = ClipLoss()
        self._val_outputs: list[dict[str, torch.Tensor]] = []

    # ---- training ------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        world = self.trainer.world_size if self._trainer is not None else 1
        # Across ranks: each rank scores its local batch against all gathered features, with grads.
        self.clip_loss = ClipLoss(
            local_loss=world > 1, gather_with_grad=world > 1, cache_labels=True,
            rank=self.global_rank, world_size=world,
        )
        dm = self.trainer.datamodule if self._trainer is not None else None
        size = getattr(dm, "image_size", None)
        if size is not None and size != self.model.config.image.image_size:
            raise ValueError(
                f"data.image_size ({size}) must equal the model's image.image_size ({self.model.config.image.image_size})"
            )

    def _encode(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = self.model.normalize_pixels(batch["image"])
        return self.model.encoders(images, self.model.tokenize(batch["caption"]))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self._encode(batch)
        loss = self.clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
        loss = self.hparams.contrastive_weight * loss
        bs = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/logit_scale", out["logit_scale"], batch_size=bs)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():  # as CLIP: keep the temperature in [1, 100]
            self.model.encoders.logit_scale.clamp_(0, math.log(100))

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or any(n in name for n in _NO_DECAY_NAMES) else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr, betas=tuple(self.hparams.betas), eps=self.hparams.eps,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup, floor = min(self.hparams.warmup_steps, total), self.hparams.min_lr_ratio

        def lr_lambda(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- evaluation ----------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self._encode(batch)
        self._val_outputs.append({
            "image": out["image_features"].float(), "text": out["text_features"].float(),
            "label": batch["label"], "group": batch["group"],
        })

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, prefix: str) -> None:
        if not self._val_outputs:
            return
        merged = {k: torch.cat([o[k] for o in self._val_outputs]) for k in self._val_outputs[0]}
        self._val_outputs.clear()
        gathered = {k: self.all_gather(v) for k, v in merged.items()}
        merged = {k: v.flatten(0, 1) if v.dim() > merged[k].dim() else v for k, v in gathered.items()}
        metrics = self.evaluate_features(merged)
        self.log_dict({f"{prefix}/{k}": v for k, v in metrics.items()}, sync_dist=False, rank_zero_only=True)

    @torch.no_grad()
    def evaluate_features(self, feats: dict[str, torch.Tensor]) -> dict[str, float]:
        """Zero-shot accuracy (prompt ensemble) and retrieval recall from validation features."""
        metrics: dict[str, float] = {}
        dm = self.trainer.datamodule if self._trainer is not None else None
        prompts = dm.zero_shot_prompts() if dm is not None else None
        if prompts is not None and (feats["label"] >= 0).any():
            weights = zero_shot_weights(self.model, prompts).to(feats["image"].device)
            keep = feats["label"] >= 0
            metrics["zero_shot_acc"] = zero_shot_accuracy(feats["image"][keep], feats["label"][keep], weights)
        groups = feats["group"]
        text = torch.zeros(int(groups.max()) + 1, feats["text"].shape[1], device=groups.device)
        text[groups] = feats["text"]  # every item of a group has the same caption, so the same embedding
        metrics.update(retrieval_recall(feats["image"], groups, text))
        return metrics
