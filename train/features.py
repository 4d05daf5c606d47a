"""The validation features the evaluators read (``train.evaluation``): collected per batch in
Lightning's loop or over a whole split at the end of fit, gathered over ranks once. A mixin of
``FoundationModule`` (it uses the module's model, trainer and device)."""

from __future__ import annotations

from typing import Any

import torch

from .evaluation import SplitInfo, ValidationData


class ValidationFeatures:
    @torch.no_grad()
    def features(self, batch: dict[str, Any], pixels: bool) -> dict[str, torch.Tensor]:
        """One validation batch -> what ``ValidationData`` holds: fp32 features, and with
        ``pixels`` the images as uint8 (exact: every source makes them from 8-bit values)."""
        out = self.model(batch, heads=("contrastive",))
        record = {"image": out["image_features"].float(), "text": out["text_features"].float(),
                  "label": batch["label"], "group": batch["group"]}
        if pixels:
            record["pixels"] = (batch["image"].float() * 255).round().to(torch.uint8)
        return record

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        batch.pop("data_issues", None)  # bad validation samples are skipped (training counts them)
        if batch["image"].shape[0]:
            self._val_outputs.append(self.features(batch, self._keep_pixels))

    test_step = validation_step

    def on_validation_epoch_start(self) -> None:
        self.last_metrics = (self.global_step, {})
        # images are kept (and gathered over ranks) only when an evaluator reads them
        self._keep_pixels = any(getattr(cb, "needs_pixels", False) for cb in self.trainer.callbacks)

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:  # runs after the evaluator callbacks
        self.end_evaluation()

    on_test_epoch_end = on_validation_epoch_end

    def record_metrics(self, metrics: dict[str, float]) -> None:
        """Evaluators report here, so the end-of-fit report reuses the last validation's figures."""
        self.last_metrics[1].update(metrics)

    def start_evaluation(self, loader) -> None:
        """Features of a whole split on this process, outside Lightning's loop (end of fit)."""
        self.end_evaluation()
        was_training = self.training
        self.eval()
        with self.trainer.precision_plugin.forward_context():
            for batch in loader:
                batch.pop("data_issues", None)
                batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                if batch["image"].shape[0]:
                    self._val_outputs.append(self.features(batch, pixels=True))
        self.train(was_training)
        self._val_complete = True

    def end_evaluation(self) -> None:
        self._val_outputs.clear()
        self._val_data, self._val_complete = None, False

    def validation_data(self) -> ValidationData | None:
        """This evaluation's features from every rank (gathered once, then cached)."""
        if self._val_data is not None or not self._val_outputs:
            return self._val_data
        merged = {k: torch.cat([o[k] for o in self._val_outputs]) for k in self._val_outputs[0]}
        if not self._val_complete and self._trainer is not None and self.trainer.world_size > 1:
            gathered = {k: self.all_gather(v.to(self.device)) for k, v in merged.items()}
            merged = {k: v.flatten(0, 1) if v.dim() > merged[k].dim() else v for k, v in gathered.items()}
        dm = self.trainer.datamodule if self._trainer is not None else None
        info = dm.split_info() if hasattr(dm, "split_info") else SplitInfo()
        cpu = {k: v.cpu() for k, v in merged.items()}
        self._val_data = ValidationData(cpu["image"], cpu["text"], cpu["label"], cpu["group"], cpu.get("pixels"), info)
        return self._val_data
