"""``FoundationModule``: the thin LightningModule. The model computes what the losses need
(``FoundationModel.forward``), ``multimodal.losses`` turns that into losses; this module sums
them, steps the optimizer, keeps the decoder's EMA, and collects validation features for the
evaluators (``train.evaluation``)."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from diffusers.training_utils import EMAModel
from lightning.pytorch.utilities import rank_zero_info

from diffusion.latent_cache import LatentCache
from multimodal import lora as lora_utils
from multimodal.config import COMPONENTS, AdapterConfig, FoundationConfig, TrainingRecord, stage_config
from multimodal.losses import FoundationLoss
from multimodal.model import FoundationModel

from .data import DROPPED, FIXED, SKIPPED
from .data_checks import MAX_EMPTY_BATCHES, nothing_usable, report_line
from .evaluation import ValidationData
from .features import ValidationFeatures
from .init import OPEN_CLIP_PREFIX, add_training_adapter, init_source, load_matching_weights, with_encoder_fields
from .optim import adamw_cosine
from .record import base_knowledge, components_trained, extend_record, rng_states, set_rng_states

class FoundationModule(ValidationFeatures, L.LightningModule):
    """Trains a ``FoundationModel`` in one stage (its losses and frozen parts), from a preset or a saved model.

    Args:
        preset: named model size: tiny (tests), shapes (the embedded data), shapes_mmdit (shapes with
            an MMDiT flow decoder), base (GPUs), base_latent (GPUs, latent MMDiT).
        overrides: nested config fields laid over the preset, e.g. {text: {layers: 4}} or
            {sampling: {steps: 20}} (the recommended sampling settings every door uses).
        lr: AdamW peak learning rate (> 0).
        weight_decay: AdamW weight decay (>= 0; none on norms, biases, embeddings, logit scale).
        betas: AdamW betas, each in [0, 1).
        eps: AdamW epsilon (> 0).
        lr_multipliers: per-component learning-rate factors, e.g. {text: 0.1, decoder: 1.0}
            (text, image, decoder, language, logit_scale).
        warmup_steps: linear warmup steps (>= 0), then cosine decay.
        min_lr_ratio: the cosine decays to lr * min_lr_ratio (in [0, 1]).
        stage: align (contrastive), decoder (diffusion, encoders frozen), language (contrastive
            + captioning, CoCa) or joint (all three).
        loss_weights: override the stage's loss weights (contrastive, diffusion, caption).
        freeze: override the stage's frozen components (text, image, decoder, language).
        init_from: where to start: a save_pretrained folder, a LoRA adapter folder (its base, then
            the adapter), an open_clip checkpoint file (encoders) or open_clip:MODEL[:PRETRAINED];
            matching tensors are copied, the rest reported by name (default: random init).
        on_nonfinite: stop (after a checkpoint of the last good weights) or skip a step whose loss
            is NaN/inf.
        diffusion_batch_size: the denoising loss uses only the first N samples of each batch
            (denoising costs far more per sample than the other losses; default: all).
        diffusion_text_grad: whether the denoising loss trains the shared text encoder too
            (false: the decoder learns on the text states the other losses shape).
        lora: train LoRA adapters instead of the weights (components, r, alpha, dropout, targets):
            base weights stay bit-identical; the export writes the adapter alone (default: none).
        data_report_every: print the used / skipped / fixed sample counts at most this often
            (seconds; logged as data/<kind> every epoch).
        compile: torch.compile each component before training (minutes of compiling first; measured on
            2 CPU cores on the shapes joint step: 0.97 s -> 0.93 s a step after 100 s of compiling).
        latent_cache_gb: with a VAE decoder (decoder.vae), keep up to this many GB of the training
            images' latent distributions in host memory (per process), so the frozen encoder runs
            once per image (0: off; randomly cropped images are new images each time).
    """

    def __init__(
        self,
        preset: str = "shapes",
        overrides: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        lr_multipliers: dict[str, float] | None = None,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        stage: str = "align",
        loss_weights: dict[str, float] | None = None,
        freeze: list[str] | None = None,
        init_from: str | None = None,
        on_nonfinite: str = "stop",
        diffusion_batch_size: int | None = None,
        diffusion_text_grad: bool = True,
        lora: AdapterConfig | None = None,
        data_report_every: float = 60.0,
        compile: bool = False,
        latent_cache_gb: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"model.on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
        for name, ok, allowed in (("lr", lr > 0, "> 0"), ("weight_decay", weight_decay >= 0, ">= 0"), ("eps", eps > 0, "> 0"),
                                  ("betas", all(0 <= b < 1 for b in betas), "each in [0, 1)"),
                                  ("warmup_steps", warmup_steps >= 0, ">= 0"), ("min_lr_ratio", 0 <= min_lr_ratio <= 1, "in [0, 1]"),
                                  ("diffusion_batch_size", diffusion_batch_size is None or diffusion_batch_size >= 1, ">= 1 or null"),
                                  ("latent_cache_gb", latent_cache_gb == 0 or 0.001 <= latent_cache_gb <= 4096, "0 (off) or in [0.001, 4096]")):
            if not ok:
                raise ValueError(f"model.{name} must be {allowed}, got {locals()[name]!r}")
        unknown_groups = set(lr_multipliers or {}) - set(COMPONENTS) - {"logit_scale"}
        if unknown_groups:
            raise ValueError(f"model.lr_multipliers has unknown component(s) {sorted(unknown_groups)}; known: {', '.join(COMPONENTS)}, logit_scale")
        self.stage = stage_config(stage, loss_weights, freeze)
        config = FoundationConfig.from_preset(preset, overrides)
        self.base_model: str | None = init_from  # what a LoRA adapter of this run is trained on
        adapter_dir = init_from if init_from is not None and lora_utils.is_adapter_folder(init_from) else None
        if adapter_dir is not None:  # continue an adapter: its base first
            self.base_model = str(lora_utils.resolve_base(adapter_dir))
        source, encoder_fields = init_source(self.base_model) if init_from is not None else ({}, None)
        if encoder_fields is not None:  # an open_clip model: its encoder architecture, our decoder / language head
            config = with_encoder_fields(config, encoder_fields)
            # in the checkpoint's hyperparameters, so that export / load_from_checkpoint rebuild this architecture
            self.hparams["overrides"] = {**(overrides or {}), **encoder_fields}
        self.model = FoundationModel(config)
        self.init_report = load_matching_weights(self.model, source, self.base_model) if init_from is not None else None
        for name, needs in (("diffusion", self.model.decoder), ("caption", self.model.language)):
            if self.stage.uses(name) and needs is None:
                part = "decoder" if name == "diffusion" else "language"
                raise ValueError(f"model.loss_weights.{name} > 0 needs a model with a {part} (config.{part})")
        self.frozen = list(self.stage.freeze)
        for name in self.frozen:
            if (module := lora_utils.components(self.model)[name]) is not None:
                module.requires_grad_(False)
        if lora is not None or adapter_dir is not None:
            frozen_by = "model.freeze" if freeze is not None else f"stage {stage!r}"
            self.frozen = add_training_adapter(self.model, lora, adapter_dir, self.base_model, self.frozen, self.init_report, frozen_by)
            self.hparams["lora"] = asdict(self.model.adapter)  # so that a checkpoint rebuilds the same layers
        parts = lora_utils.components(self.model)
        if not any(p.requires_grad for c in COMPONENTS if parts[c] is not None for p in parts[c].parameters()):
            raise ValueError(f"every component is frozen (model.freeze / stage {stage!r}): nothing would train; "
                             f"leave at least one of {', '.join(COMPONENTS)} out of model.freeze")
        if latent_cache_gb > 0:
            if self.model.decoder is None or self.model.decoder.vae is None:
                raise ValueError("model.latent_cache_gb caches a VAE's latents, but this model's decoder works in pixel space "
                                 "(no decoder.vae): leave model.latent_cache_gb at 0")
            self.model.decoder.latent_cache = LatentCache(int(latent_cache_gb * 2**30))
        self.loss = FoundationLoss(self.stage.loss_weights)
        decoder_trains = self.stage.uses("diffusion") and "decoder" not in self.frozen and self.model.adapter is None
        self.ema = (EMAModel(self.model.decoder.parameters(), decay=config.decoder.ema_decay)
                    if decoder_trains and config.decoder.ema_decay > 0 else None)
        # what the model will know: the starting point's record and vocabulary, plus this run's
        weights = init_from is not None and (Path(init_from).is_file() or init_from.removeprefix(OPEN_CLIP_PREFIX).count(":") > 0)
        present = [c for c, m in lora_utils.components(self.model).items() if m is not None]
        self.base_record, base_vocab, self.vocabulary_known = base_knowledge(
            self.base_model, weights, adapter_dir, present, self.init_report)
        trains = [c for c in COMPONENTS if parts[c] is not None and any(p.requires_grad for p in parts[c].parameters())]
        self.trains = components_trained(self.stage, [c for c in COMPONENTS if c not in trains], present, diffusion_text_grad)
        # not a buffer (DDP would overwrite every rank's with rank 0's): merged over ranks each step, in checkpoints
        self.seen_tokens = torch.zeros(self.model.tokenizer.vocab_size, dtype=torch.uint8)
        self.seen_tokens[list(base_vocab or [])] = 1
        self._mark_seen(torch.zeros(0, dtype=torch.long))
        self.skipped_steps, self._empty_batches = 0, 0
        self.data_issues: Counter = Counter()  # this epoch's skipped / fixed samples, by kind
        self._report, self._report_epochs, self._last_report = Counter(), [], -math.inf  # printed data counts
        self.samples_seen = 0
        self._val_outputs: list[dict[str, torch.Tensor]] = []
        self._val_data: ValidationData | None = None
        self._val_complete = False  # features of the whole split on this rank (no gathering)
        self._keep_pixels = False
        self.last_metrics: tuple[int, dict[str, float]] = (-1, {})
        self.run_dir: Path | None = None  # set in setup

    # ---- training ------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.compile:  # in place: parameter names (checkpoints, exports) stay as they are
            for part in lora_utils.components(self.model).values():
                if part is not None and any(p.requires_grad for p in part.parameters()):
                    part.compile()
        if stage == "fit" and self.model.adapter is not None and self.model.adapter.base_sha256 is None:
            raise ValueError("model.lora needs model.init_from: the base model folder the adapter is trained on")
        world = self.trainer.world_size if self._trainer is not None else 1
        # the run folder, read here on every rank (trainer.log_dir is a collective call)
        self.run_dir = Path(self.trainer.log_dir) if self._trainer is not None and self.trainer.log_dir else None
        self.loss = FoundationLoss(self.stage.loss_weights, rank=self.global_rank, world_size=world)
        if self._trainer is not None:
            from lightning.pytorch.strategies import FSDPStrategy

            if isinstance(self.trainer.strategy, FSDPStrategy) and self.model.adapter is not None:
                raise ValueError("model.lora does not work with FSDP here yet (its export gathers full weights): use ddp; adapters are small")
            if isinstance(self.trainer.strategy, FSDPStrategy) and self.ema is not None:  # shadow weights full-size, live ones sharded
                raise ValueError("the decoder EMA does not work with FSDP yet: set model.overrides {decoder: {ema_decay: 0}} or use ddp")
            alone = [type(cb).__name__ for cb in self.trainer.callbacks if getattr(cb, "rank_zero_only", False)]
            if isinstance(self.trainer.strategy, FSDPStrategy) and alone:  # a sharded forward needs every rank
                raise ValueError(f"evaluators {alone} run the model on one rank, which FSDP cannot: use ddp, or evaluate the export with multimodal test")
        dm = self.trainer.datamodule if self._trainer is not None else None
        size = getattr(dm, "image_size", None)
        if size is not None and size != self.model.config.image.image_size:
            raise ValueError(f"data.image_size ({size}) must equal the model's image.image_size ({self.model.config.image.image_size})")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        self.data_issues.update(batch.pop("data_issues", None) or {})
        batch = self._even_batch(batch)
        bs = batch["image"].shape[0]
        if bs == 0:  # every sample of the batch was bad (counted above); endless bad data stops
            self._empty_batches += 1
            if self._empty_batches >= MAX_EMPTY_BATCHES:
                raise ValueError(nothing_usable(self.data_issues, f"{MAX_EMPTY_BATCHES} batches in a row"))
            return None
        self._empty_batches = 0
        self.samples_seen += bs
        self.data_issues["truncated_caption"] += sum(self.model.tokenizer.overflows(batch["caption"]))
        tokens = self.model.tokenize(batch["caption"])  # once: the vocabulary and the forward share it
        self._mark_seen(tokens)
        out = self.model({**batch, "caption": tokens}, heads=self.loss.heads, denoise_batch=self.hparams.diffusion_batch_size,
                         denoise_text_grad=self.hparams.diffusion_text_grad)
        losses = self.loss(out)
        loss = losses.pop("loss")
        finite = bool(torch.isfinite(loss))
        if self._trainer is not None and self.trainer.world_size > 1:  # every rank stops or skips together
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            return self._non_finite(loss)
        for name, value in losses.items():  # the mean of the ranks' contrastive losses is the global batch's
            self.log(f"train/{name}", value, batch_size=bs, sync_dist=name == "contrastive")
        if "logit_scale" in out:
            self.log("train/logit_scale", out["logit_scale"], batch_size=bs)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        cache = self.model.decoder.latent_cache if self.model.decoder is not None else None
        if cache is not None and cache.hits + cache.misses:  # each rank's own cache: the mean over ranks
            self.log("train/latent_cache_hit_rate", cache.hits / (cache.hits + cache.misses), batch_size=bs, sync_dist=True)
        return loss

    def probe_step(self, batch_size: int) -> Callable[[], None]:
        """One training step's forward and backward on a random batch of the model's sizes (at
        most 64 samples), with no optimizer step, no seen-token or data counts and the gradients
        cleared after (nor a draw from the global random stream, nor an entry in the latent
        cache): what ``train.precision.faster_step_precision`` times to choose the precision
        before training starts."""
        size, n = self.model.config.image.image_size, max(1, min(int(batch_size), 64))
        device = self.model.pixel_mean.device
        images = torch.rand(n, 3, size, size, device=device, generator=torch.Generator(device).manual_seed(0))  # [n, 3, S, S]
        tokens = self.model.tokenize(["a small red circle at the top left of a plain white picture"] * n)  # [n, L]
        decoder = self.model.decoder

        def step() -> None:
            cache = decoder.latent_cache if decoder is not None else None
            if cache is not None:
                decoder.latent_cache = None
            try:
                out = self.model({"image": images, "caption": tokens}, heads=self.loss.heads,
                                 denoise_batch=self.hparams.diffusion_batch_size, denoise_text_grad=self.hparams.diffusion_text_grad)
                loss = self.loss(out)["loss"]
                if loss.requires_grad:
                    loss.backward()
            finally:
                for param in self.parameters():
                    param.grad = None
                if cache is not None:
                    decoder.latent_cache = cache

        return step

    def _mark_seen(self, tokens: torch.Tensor) -> None:
        """Add the batch's caption tokens to the run's vocabulary (every rank's, under DDP)."""
        self.seen_tokens[tokens.flatten().cpu()] = 1
        if self._trainer is not None and self.trainer.world_size > 1 and torch.distributed.is_initialized():
            merged = self.seen_tokens.to(self.device)
            torch.distributed.all_reduce(merged, op=torch.distributed.ReduceOp.MAX)
            self.seen_tokens = merged.cpu()
        vocabulary = self.model.vocabulary
        compact = getattr(self.model.config.language, "vocabulary", None) == "compact"  # its softmax: the ids seen so far
        if compact and (vocabulary is None or len(vocabulary) != int(self.seen_tokens.sum())):  # only when new ids came
            self.model.vocabulary = frozenset(self.seen_tokens.nonzero().flatten().tolist())

    def _even_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Under DDP, cut every rank's batch to the smallest one (skipped samples leave ranks with
        different sizes; feature gathering needs equal ones); the cut samples are counted."""
        bs = batch["image"].shape[0]
        if self._trainer is None or self.trainer.world_size == 1 or not torch.distributed.is_initialized():
            return batch
        smallest = torch.tensor(bs, device=self.device)
        torch.distributed.all_reduce(smallest, op=torch.distributed.ReduceOp.MIN)
        if int(smallest) < bs:
            self.data_issues["dropped_uneven_batch"] += bs - int(smallest)
            batch = {k: v[: int(smallest)] for k, v in batch.items()}
        return batch

    def _non_finite(self, loss: torch.Tensor) -> None:
        """A NaN/inf loss: skip the step (``on_nonfinite: skip``, counted in ``train/skipped_steps``) or save
        a checkpoint of the still-good weights and stop (``stop``). None makes Lightning skip the step."""
        step = self.global_step
        if self.hparams.on_nonfinite == "skip":
            self.skipped_steps += 1
            rank_zero_info(f"non-finite loss ({loss.item()}) at step {step}: step skipped ({self.skipped_steps} so far)")
            self.log("train/skipped_steps", float(self.skipped_steps))
            return None
        ckpt = self.trainer.checkpoint_callback
        folder = Path(ckpt.dirpath) if ckpt is not None and ckpt.dirpath else Path(self.trainer.default_root_dir)
        path = folder / f"nonfinite-step={step}.ckpt"
        self.trainer.save_checkpoint(path)  # the weights are still those of the last good step
        raise FloatingPointError(
            f"non-finite loss ({loss.item()}) at step {step}; stopped. The weights before this step are in {path}; "
            f"resume with --ckpt_path {path} (e.g. with a lower --model.lr), or set --model.on_nonfinite skip"
        )

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # right after the update (before any callback, e.g. a checkpoint, sees this step)
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():  # as CLIP: keep the temperature in [1, 100]
            self.model.encoders.logit_scale.clamp_(0, math.log(100))
        if self.ema is not None:
            self.ema.step(self.model.decoder.parameters())

    def knowledge(self, data: dict[str, Any], steps: int | None = None) -> tuple[Any, frozenset[int] | None]:
        """The training record (the starting point's plus this run's steps on ``data``: source and path) and the
        caption vocabulary (None: unknown) the exported model carries."""
        steps = int(self.global_step if steps is None else steps)
        run = {"stage": self.hparams.stage, "steps": steps, "trained": self.trains, "data": data,
               **({"init_from": str(self.hparams.init_from)} if self.hparams.init_from else {})}
        record = extend_record(self.base_record, self.trains, steps, run)
        known = self.vocabulary_known or getattr(self.model.config.language, "vocabulary", None) == "compact"
        vocabulary = frozenset(self.seen_tokens.nonzero().flatten().tolist()) if known else None
        return record, vocabulary

    # ---- EMA of the decoder ----------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)

    @contextlib.contextmanager
    def ema_weights(self):
        """Swap the decoder's EMA weights in (validation samples, export), then back."""
        if self.ema is None:
            yield
            return
        params = list(self.model.decoder.parameters())
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # what the starting point knew (an export from this checkpoint alone needs it)
        checkpoint["training_base"] = {"record": json.dumps(asdict(self.base_record)) if self.base_record else None,
                                       "vocabulary_known": self.vocabulary_known, "seen_tokens": self.seen_tokens.clone()}
        if self.ema is not None:
            checkpoint["decoder_ema"] = self.ema.state_dict()
        if self.model.decoder is not None:  # what its output means (the preset's default may change)
            checkpoint["decoder_output"] = {"flow_target": self.model.config.decoder.flow_target,
                                            "flow_min_sigma": self.model.config.decoder.flow_min_sigma}
        # noise / timestep / dropout random streams, continued on resume (plain tensors: loadable with weights_only)
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        base = checkpoint.get("training_base")
        if base is None:  # a checkpoint from before training records: its history and vocabulary are unknown
            self.base_record, self.vocabulary_known = None, False
        else:
            self.base_record = TrainingRecord(**json.loads(base["record"])) if base["record"] else None
            self.vocabulary_known = bool(base["vocabulary_known"])
            self.seen_tokens = base["seen_tokens"].to(torch.uint8).clone()
            self._mark_seen(torch.zeros(0, dtype=torch.long))
        if self.ema is not None and "decoder_ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["decoder_ema"])
        if self.model.decoder is not None:  # checkpoints from before flow_target predict the velocity; it changes no weight
            output = checkpoint.get("decoder_output") or {"flow_target": "velocity"}
            self.model.config.decoder = replace(self.model.config.decoder, **output)
            self.model.decoder.config = self.model.config.decoder
        if checkpoint.get("rng_states") is not None:
            set_rng_states(checkpoint["rng_states"])

    def on_train_epoch_end(self) -> None:
        """Log how many samples were used, skipped and fixed this epoch (all ranks); print the
        sums at most every ``data_report_every`` seconds (small data runs many epochs a minute)."""
        kinds = ("used",) + SKIPPED + FIXED + DROPPED
        counts = torch.tensor([self.samples_seen] + [self.data_issues[k] for k in kinds[1:]], dtype=torch.float64)
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts.to(self.device), reduce_op="sum").cpu()
        totals = dict(zip(kinds, (int(c) for c in counts)))
        if totals["used"] == 0:  # every rank: the totals are summed over ranks
            raise ValueError(nothing_usable(totals, f"epoch {self.current_epoch}"))
        self.log_dict({f"data/{k}": float(v) for k, v in totals.items()}, rank_zero_only=True)
        self.data_issues, self.samples_seen = Counter(), 0
        self._report.update(totals)
        self._report_epochs.append(self.current_epoch)
        if time.monotonic() - self._last_report >= self.hparams.data_report_every:
            self.print_data_report()

    def print_data_report(self) -> None:
        if self._report_epochs:
            rank_zero_info(report_line(self._report, self._report_epochs))
            self._report, self._report_epochs, self._last_report = Counter(), [], time.monotonic()

    on_train_end = print_data_report

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_cosine(self, self.hparams, int(self.trainer.estimated_stepping_batches))
