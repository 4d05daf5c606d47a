"""``FoundationModule``: the LightningModule that owns the losses and the optimizer."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections import Counter
from dataclasses import asdict
from typing import Any

import lightning as L
import numpy as np
import torch
from open_clip.loss import ClipLoss

from pathlib import Path

from diffusers.training_utils import EMAModel
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import load_file

from diffusion.decoder import TextCondition
from diffusion.schedule import diffusion_loss, train_scheduler
from multimodal import lora as lora_utils
from multimodal.config import FoundationConfig
from multimodal.lora import AdapterConfig
from multimodal.model import WEIGHTS_NAME, FoundationModel
from multimodal.pipeline import FoundationPipeline, zero_shot_weights

from . import shapes
from .data import DROPPED, FIXED, SKIPPED
from .metrics import retrieval_recall, zero_shot_accuracy

_NO_DECAY_NAMES = ("embedding", "logit_scale")
COMPONENTS = ("text", "image", "decoder", "language")
LOSSES = ("contrastive", "diffusion", "caption")
# Stage presets: which losses are on and which components are frozen.
STAGES: dict[str, dict[str, Any]] = {
    "align": {"loss_weights": {"contrastive": 1.0, "diffusion": 0.0, "caption": 0.0}, "freeze": ["decoder", "language"]},
    "decoder": {"loss_weights": {"contrastive": 0.0, "diffusion": 1.0, "caption": 0.0}, "freeze": ["text", "image", "language"]},
    # CoCa: contrastive and captioning losses in the same step, on the same text encoder pass
    "language": {"loss_weights": {"contrastive": 1.0, "diffusion": 0.0, "caption": 2.0}, "freeze": ["decoder"]},
    "joint": {"loss_weights": {"contrastive": 1.0, "diffusion": 1.0, "caption": 2.0}, "freeze": []},
}


OPEN_CLIP_PREFIX = "open_clip:"


def init_source(init_from: str) -> tuple[dict[str, torch.Tensor], Any]:
    """The tensors ``init_from`` names, under FoundationModel's parameter names, and the encoder
    config they imply (None when the model's own config stays): a ``save_pretrained`` folder;
    an open_clip checkpoint file (``.safetensors``, or ``.pt`` read with ``weights_only``); or
    ``open_clip:MODEL[:PRETRAINED]`` (an open_clip model name, with a local weights file or an
    open_clip tag, which needs internet): its architecture and weights for the encoders."""
    from encoders.open_clip_import import convert_open_clip_state_dict, dual_encoder_from_open_clip, load_state_file

    if init_from.startswith(OPEN_CLIP_PREFIX):
        name, _, pretrained = init_from[len(OPEN_CLIP_PREFIX):].partition(":")
        encoders = dual_encoder_from_open_clip(name, pretrained or None)
        return {f"encoders.{k}": v for k, v in encoders.state_dict().items()}, encoders.config
    path = Path(init_from)
    if path.is_file():
        return {f"encoders.{k}": v for k, v in convert_open_clip_state_dict(load_state_file(path)).items()}, None
    if not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"model.init_from: {init_from} is neither a model folder with {WEIGHTS_NAME}, an open_clip checkpoint file, "
            f"nor {OPEN_CLIP_PREFIX}MODEL[:PRETRAINED]"
        )
    return load_file(str(path / WEIGHTS_NAME)), None


def load_matching_weights(model: FoundationModel, source: dict[str, torch.Tensor], name: str) -> dict[str, list[str]]:
    """Copy every tensor of ``source`` whose name and shape match, and report by name what was
    missing, mismatched or unexpected (printed, and returned)."""
    target = model.state_dict()
    report = {
        "loaded": [k for k in target if k in source and source[k].shape == target[k].shape],
        "missing": [k for k in target if k not in source],
        "mismatched": [k for k in target if k in source and source[k].shape != target[k].shape],
        "unexpected": [k for k in source if k not in target],
    }
    model.load_state_dict({k: source[k] for k in report["loaded"]}, strict=False)
    rank_zero_info(f"init_from {name}: loaded {len(report['loaded'])} tensors")
    for kind in ("missing", "mismatched", "unexpected"):
        if report[kind]:
            names = ", ".join(report[kind][:8]) + (" ..." if len(report[kind]) > 8 else "")
            rank_zero_info(f"init_from {name}: {len(report[kind])} {kind} (kept initial values): {names}")
    return report


class FoundationModule(L.LightningModule):
    """Args:
        preset: named model preset (``tiny``, ``shapes``, ``base``).
        overrides: nested config overrides applied on the preset, e.g. ``{text: {layers: 4}}``.
        stage: ``align`` (contrastive), ``decoder`` (diffusion, encoders frozen), ``language``
            (contrastive + captioning, CoCa) or ``joint`` (all three).
        loss_weights / freeze: override the stage's loss weights (``contrastive``, ``diffusion``,
            ``caption``) and frozen components (``text``, ``image``, ``decoder``, ``language``).
        diffusion_batch_size: the denoising loss uses only the first N samples of each batch
            (denoising costs far more per sample than the other losses); None: all.
        diffusion_text_grad: whether the denoising loss trains the shared text encoder too
            (False: the decoder learns on the text states the other losses shape).
        caption_tokens: new-token budget of the validation captions (caption accuracy).
        on_nonfinite: a NaN/inf loss ``stop``s the run (after saving a checkpoint of the last
            good weights) or ``skip``s that step.
        init_from: where to start: a ``save_pretrained`` folder, a LoRA adapter folder (its base
            model, then the adapter), an open_clip checkpoint file (encoders), or
            ``open_clip:MODEL[:PRETRAINED]`` (that open_clip architecture and weights for the
            encoders). Matching tensors are copied; the rest is reported by name.
        lora: train LoRA adapters instead of the weights (``multimodal.lora.AdapterConfig``:
            components, r, alpha, dropout, targets): every base weight is frozen and stays
            bit-identical; the end-of-fit export writes the adapter alone.
        fidelity_images / fidelity_steps / fidelity_scheduler / guidance_scale: generation
            fidelity at validation (fixed prompts and seeds, EMA decoder).
        lr, weight_decay, betas, eps: AdamW (no decay on norms, biases, embeddings, logit scale).
        lr_multipliers: per-component learning-rate factors, e.g. ``{text: 0.1, decoder: 1.0}``
            (components ``text``, ``image``, ``decoder``, ``language``; ``logit_scale`` too).
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
        lr_multipliers: dict[str, float] | None = None,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        stage: str = "align",
        loss_weights: dict[str, float] | None = None,
        freeze: list[str] | None = None,
        init_from: str | None = None,
        fidelity_images: int = 64,
        fidelity_steps: int = 25,
        fidelity_scheduler: str = "dpm++",
        guidance_scale: float = 3.0,
        caption_tokens: int = 12,
        on_nonfinite: str = "stop",
        diffusion_batch_size: int | None = None,
        diffusion_text_grad: bool = True,
        lora: AdapterConfig | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if stage not in STAGES:
            raise ValueError(f"model.stage must be one of {sorted(STAGES)}, got {stage!r}")
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"model.on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
        self.skipped_steps = 0
        self.data_issues: Counter = Counter()  # this epoch's skipped / fixed samples, by kind
        self.samples_seen = 0
        unknown_groups = set(lr_multipliers or {}) - set(COMPONENTS) - {"logit_scale"}
        if unknown_groups:
            raise ValueError(f"model.lr_multipliers has unknown component(s) {sorted(unknown_groups)}; known: {', '.join(COMPONENTS)}, logit_scale")
        config = FoundationConfig.from_preset(preset, overrides)
        self.base_model: str | None = init_from  # what a LoRA adapter of this run is trained on
        adapter_dir = init_from if init_from is not None and lora_utils.is_adapter_folder(init_from) else None
        if adapter_dir is not None:  # continue an adapter: its base first
            self.base_model = str(lora_utils.resolve_base(adapter_dir))
        source, encoder_config = init_source(self.base_model) if init_from is not None else ({}, None)
        if encoder_config is not None:  # an open_clip model: its encoder architecture, our decoder / language head
            config = FoundationConfig(**{**config.__dict__, **encoder_config.__dict__})
            # in the checkpoint's hyperparameters, so that export / load_from_checkpoint rebuild this architecture
            self.hparams["overrides"] = {**(overrides or {}), **dataclasses.asdict(encoder_config)}
        self.model = FoundationModel(config)
        if init_from is not None:
            self.init_report = load_matching_weights(self.model, source, self.base_model)
        self.loss_weights = {**STAGES[stage]["loss_weights"], **(loss_weights or {})}
        unknown = set(self.loss_weights) - set(LOSSES)
        if unknown:
            raise ValueError(f"model.loss_weights has unknown loss(es) {sorted(unknown)}; known: {', '.join(LOSSES)}")
        self.frozen = list(STAGES[stage]["freeze"] if freeze is None else freeze)
        if set(self.frozen) - set(COMPONENTS):
            raise ValueError(f"model.freeze entries must be among {COMPONENTS}, got {self.frozen}")
        self.use_diffusion = self.loss_weights["diffusion"] > 0
        if self.use_diffusion and self.model.decoder is None:
            raise ValueError("model.loss_weights.diffusion > 0 needs a model with a decoder (config.decoder)")
        self.use_caption = self.loss_weights["caption"] > 0
        if self.use_caption and self.model.language is None:
            raise ValueError("model.loss_weights.caption > 0 needs a model with a language head (config.language)")
        for name in self.frozen:
            module = self._component(name)
            if module is not None:
                module.requires_grad_(False)
        if lora is not None or adapter_dir is not None:
            self._add_lora(lora, adapter_dir, explicit_freeze=freeze is not None)
        self.clip_loss = ClipLoss()
        self.noise_scheduler = train_scheduler(self.model.config.decoder) if self.use_diffusion else None
        self.ema = (
            EMAModel(self.model.decoder.parameters(), decay=self.model.config.decoder.ema_decay)
            if self.use_diffusion and "decoder" not in self.frozen and self.model.config.decoder.ema_decay > 0
            and self.model.adapter is None else None
        )
        self._val_outputs: list[dict[str, torch.Tensor]] = []
        self.last_eval: tuple[int, dict[str, float]] | None = None

    def _add_lora(self, lora: AdapterConfig | None, adapter_dir: str | None, explicit_freeze: bool) -> None:
        """Freeze every base weight, then inject the adapter (new, or loaded from ``adapter_dir``)."""
        if self.base_model is not None and not Path(self.base_model).is_dir():
            raise ValueError(
                f"model.lora: the base must be a save_pretrained folder (the adapter records it), got {self.base_model!r}; "
                "start a full fit from it first, or export it with FoundationModel.from_open_clip(...).save_pretrained(DIR)"
            )
        if isinstance(lora, dict):  # from a checkpoint's hyperparameters
            lora = AdapterConfig(**lora)
        report = getattr(self, "init_report", {})
        bad = {k: report.get(k) for k in ("missing", "mismatched", "unexpected") if report.get(k)}
        if bad:  # an adapter must sit on exactly the base it names
            detail = "; ".join(f"{k}: {', '.join(v[:4])}{' ...' if len(v) > 4 else ''}" for k, v in bad.items())
            raise ValueError(f"model.lora: model.init_from {self.base_model} does not match the model's preset/overrides ({detail})")
        config = lora
        if adapter_dir is not None:
            config = lora_utils.read_adapter_config(adapter_dir)
            shape = lambda c: (sorted(c.components), c.r, c.alpha, c.dropout, c.targets)  # noqa: E731
            if lora is not None and shape(lora) != shape(config):
                raise ValueError(f"model.lora differs from the adapter in model.init_from {adapter_dir} ({config}); leave model.lora out to continue it")
        clash = sorted(set(config.components) & set(self.frozen))
        if clash:
            why = "model.freeze" if explicit_freeze else f"stage {self.hparams.stage!r}"
            what = f"the adapter in {adapter_dir}" if adapter_dir is not None else "model.lora.components"
            raise ValueError(f"{what}: components {clash} are frozen by {why}: their adapters would never train")
        self.frozen = [c for c in COMPONENTS if c not in config.components]
        self.model.requires_grad_(False)
        if adapter_dir is not None:
            self.model.load_adapter(adapter_dir)
        else:
            self.model.add_adapter(config)
        if self.base_model is not None:  # recorded now: the weights trained on, whatever happens to the folder later
            self.model.adapter.base_model = self.base_model
            self.model.adapter.base_sha256 = lora_utils.weights_sha256(self.base_model)
        self.hparams["lora"] = asdict(self.model.adapter)  # so that a checkpoint rebuilds the same layers
        trainable, total = lora_utils.count_parameters(self.model)
        parts = sum(p.numel() for c in config.components for p in self._component(c).parameters() if not p.requires_grad)
        rank_zero_info(
            f"LoRA r={config.r} on {', '.join(config.components)}: {trainable:,} trainable parameters = "
            f"{100 * trainable / total:.2f}% of the model ({total:,}), {100 * trainable / parts:.2f}% of the adapted components"
        )

    def _component(self, name: str) -> torch.nn.Module | None:
        return {
            "text": self.model.encoders.text, "image": self.model.encoders.image,
            "decoder": self.model.decoder, "language": self.model.language,
        }[name]

    # ---- training ------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.model.adapter is not None and self.model.adapter.base_sha256 is None:
            raise ValueError("model.lora needs model.init_from: the base model folder the adapter is trained on")
        world = self.trainer.world_size if self._trainer is not None else 1
        # Across ranks: each rank scores its local batch against all gathered features, with grads.
        self.clip_loss = ClipLoss(
            local_loss=world > 1, gather_with_grad=world > 1, cache_labels=True,
            rank=self.global_rank, world_size=world,
        )
        if self._trainer is not None and self.model.adapter is not None:
            from lightning.pytorch.strategies import FSDPStrategy

            if isinstance(self.trainer.strategy, FSDPStrategy):
                raise ValueError("model.lora does not work with FSDP here yet (its export gathers full weights): use ddp; adapters are small")
        if self.ema is not None and self._trainer is not None:
            from lightning.pytorch.strategies import FSDPStrategy

            if isinstance(self.trainer.strategy, FSDPStrategy):  # its shadow weights would be full-size, the live ones sharded
                raise ValueError("the decoder EMA does not work with FSDP yet: set model.overrides {decoder: {ema_decay: 0}} or use ddp")
        dm = self.trainer.datamodule if self._trainer is not None else None
        size = getattr(dm, "image_size", None)
        if size is not None and size != self.model.config.image.image_size:
            raise ValueError(
                f"data.image_size ({size}) must equal the model's image.image_size ({self.model.config.image.image_size})"
            )

    def _encode(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = self.model.normalize_pixels(batch["image"])
        return self.model.encoders(images, self.model.tokenize(batch["caption"]))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        w, bs = self.loss_weights, batch["image"].shape[0]
        self.data_issues.update(batch.pop("data_issues", None) or {})
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.trainer.world_size > 1:
            # skipped samples leave ranks with different batch sizes; feature gathering needs equal ones
            smallest = torch.tensor(bs, device=self.device)
            torch.distributed.all_reduce(smallest, op=torch.distributed.ReduceOp.MIN)
            if int(smallest) < bs:
                self.data_issues["dropped_uneven_batch"] += bs - int(smallest)
                bs = int(smallest)
                batch = {k: v[:bs] for k, v in batch.items()}
        if bs == 0:  # every sample of the batch was bad (counted above)
            return None
        self.samples_seen += bs
        self.data_issues["truncated_caption"] += sum(self.model.tokenizer.overflows(batch["caption"]))
        enc = self.model.encoders
        tokens = self.model.tokenize(batch["caption"])
        text_grad = "text" not in self.frozen
        with torch.set_grad_enabled(text_grad and torch.is_grad_enabled()):
            # one pass of the shared text encoder feeds every loss (full length when the decoder needs states)
            text_states, text_pooled = enc.text(tokens, trim=False if self.use_diffusion else None)
        loss = torch.zeros((), device=self.device)
        if w["contrastive"] > 0 or self.use_caption:
            image_states, image_pooled = enc.image(self.model.normalize_pixels(batch["image"]))  # [B, 1+N, Wi], [B, E]
        if w["contrastive"] > 0:
            image_features = torch.nn.functional.normalize(image_pooled, dim=-1)
            scale = enc.logit_scale.exp()
            contrastive = self.clip_loss(image_features, torch.nn.functional.normalize(text_pooled, dim=-1), scale)
            loss = loss + w["contrastive"] * contrastive
            # mean of the ranks' local losses = the loss of the global batch
            self.log("train/contrastive", contrastive, batch_size=bs, sync_dist=True)
            self.log("train/logit_scale", scale, batch_size=bs)
        if self.use_caption:
            caption = self.caption_loss(text_states, tokens[:, : text_states.shape[1]], image_states)
            loss = loss + w["caption"] * caption
            self.log("train/caption", caption, batch_size=bs)
        if self.use_diffusion:
            cfg = self.model.config.decoder
            n = min(bs, self.hparams.diffusion_batch_size or bs)  # the denoising loss may use part of the batch
            grad = text_grad and self.hparams.diffusion_text_grad
            states, pooled = text_states[:n], text_pooled[:n]
            if not grad:
                states, pooled = states.detach(), pooled.detach()
            cond = TextCondition(states, torch.nn.functional.normalize(pooled, dim=-1))
            drop = torch.rand(n, device=self.device) < cfg.cfg_dropout  # classifier-free guidance dropout
            if drop.any():
                with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                    empty = self.model.text_condition([""])  # the unconditional embedding, batch 1
                cond = cond.where(drop, empty)
            images = batch["image"][:n]
            if images.shape[-1] != cfg.image_size:  # e.g. a 224-pixel image tower beside a 64-pixel decoder
                images = torch.nn.functional.interpolate(images, size=cfg.image_size, mode="bicubic", antialias=True).clamp(0, 1)
            denoise = diffusion_loss(self.model.decoder, self.noise_scheduler, images * 2 - 1, cond, cfg.min_snr_gamma)
            loss = loss + w["diffusion"] * denoise
            self.log("train/diffusion", denoise, batch_size=bs)
        finite = bool(torch.isfinite(loss))
        if self.trainer.world_size > 1:  # every rank stops or skips together
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            return self._non_finite(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        return loss

    def _non_finite(self, loss: torch.Tensor) -> None:
        """A NaN/inf loss: skip the step (``on_nonfinite: skip``, counted in
        ``train/skipped_steps``) or save a checkpoint of the still-good weights and stop
        (``stop``). Returning None makes Lightning skip the optimizer step."""
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

    def caption_loss(self, text_states: torch.Tensor, tokens: torch.Tensor, image_states: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy of the language head over the captions' real tokens
        (padding ignored); a ``text_only_prob`` share of captions is read without its image."""
        # text_states [B, L, W], tokens [B, L], image_states [B, M, Wi]
        target = tokens[:, 1:]  # [B, L-1]: token i+1 is predicted at position i
        with_image = torch.rand(tokens.shape[0], device=tokens.device) >= self.model.config.language.text_only_prob
        logits, targets = [], []
        for rows, context in ((with_image, image_states), (~with_image, None)):
            if rows.any():
                hidden = self.model.language(text_states[rows][:, :-1], context[rows] if context is not None else None)
                real = target[rows] != 0
                logits.append(self.model.lm_logits(hidden[real]))  # [T, V]: logits for real tokens only
                targets.append(target[rows][real])
        return torch.nn.functional.cross_entropy(torch.cat(logits).float(), torch.cat(targets))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # right after the update (before any callback, e.g. a checkpoint, sees this step)
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():  # as CLIP: keep the temperature in [1, 100]
            self.model.encoders.logit_scale.clamp_(0, math.log(100))
        if self.ema is not None:
            self.ema.step(self.model.decoder.parameters())

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
        if self.ema is not None:
            checkpoint["decoder_ema"] = self.ema.state_dict()
        # the random streams of noise, timesteps and dropout, so that a resumed run continues them
        # (tensors, ints and tuples only: the checkpoint stays loadable with weights_only=True)
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
            **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None and "decoder_ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["decoder_ema"])
        rng = checkpoint.get("rng_states")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            kind, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(tuple(rng["python"]))
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    # ---- data report ---------------------------------------------------------------------------------
    def on_train_epoch_end(self) -> None:
        """Log and print how many samples were used, skipped and fixed this epoch (all ranks)."""
        kinds = ("used",) + SKIPPED + FIXED + DROPPED
        counts = torch.tensor([self.samples_seen] + [self.data_issues[k] for k in kinds[1:]], dtype=torch.float64)
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts.to(self.device), reduce_op="sum").cpu()
        totals = dict(zip(kinds, (int(c) for c in counts)))
        self.log_dict({f"data/{k}": float(v) for k, v in totals.items()}, rank_zero_only=True)
        skipped = ", ".join(f"{totals[k]} {k}" for k in SKIPPED + DROPPED if totals[k]) or "none"
        fixed = ", ".join(f"{totals[k]} {k}" for k in FIXED if totals[k]) or "none"
        rank_zero_info(f"data, epoch {self.current_epoch}: {totals['used']} samples used; skipped: {skipped}; fixed: {fixed}")
        self.data_issues.clear()
        self.samples_seen = 0

    def _param_group(self, name: str) -> str:
        """The component a parameter belongs to (for ``lr_multipliers``)."""
        for component, prefix in (("text", "model.encoders.text."), ("image", "model.encoders.image."),
                                  ("decoder", "model.decoder."), ("language", "model.language.")):
            if name.startswith(prefix):
                return component
        return "logit_scale" if name.endswith("logit_scale") else "other"

    def configure_optimizers(self) -> dict[str, Any]:
        multipliers = self.hparams.lr_multipliers or {}
        groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            decay = not (param.ndim < 2 or any(n in name for n in _NO_DECAY_NAMES))
            groups.setdefault((self._param_group(name), decay), []).append(param)
        optimizer = torch.optim.AdamW(
            [
                {"params": params, "weight_decay": self.hparams.weight_decay if decay else 0.0,
                 "lr": self.hparams.lr * multipliers.get(group, 1.0), "name": f"{group}{'' if decay else '_no_decay'}"}
                for (group, decay), params in groups.items()
            ],
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
        batch.pop("data_issues", None)  # bad validation samples are skipped (training counts them)
        if batch["image"].shape[0] == 0:
            return
        out = self._encode(batch)
        record = {
            "image": out["image_features"].float(), "text": out["text_features"].float(),
            "label": batch["label"], "group": batch["group"],
        }
        if self._scores_captions() and bool((batch["label"] >= 0).any()):  # captions are read with the shapes vocabulary
            record["caption_label"] = self.caption_labels(batch["image"])
        self._val_outputs.append(record)

    def _scores_captions(self) -> bool:
        dm = self.trainer.datamodule if self._trainer is not None else None
        return self.use_caption and getattr(dm, "source", None) == "shapes"

    @torch.no_grad()
    def caption_labels(self, images: torch.Tensor) -> torch.Tensor:
        """Greedy captions (KV cache) of images [B, C, S, S] in [0, 1], read with the shapes
        vocabulary: the (color, shape) class each names, -1 if unreadable."""
        captions = FoundationPipeline(self.model).caption(images, max_new_tokens=self.hparams.caption_tokens)
        return torch.tensor([shapes.caption_label(c) for c in captions], device=self.device)

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
        metrics.update(self.generation_fidelity())
        self.last_eval = (self.global_step, metrics)  # the end-of-fit report reuses it at the same step
        self.log_dict({f"{prefix}/{k}": v for k, v in metrics.items()}, sync_dist=False, rank_zero_only=True)

    @torch.no_grad()
    def generate_fixed(self, prompts: list[str], steps: int, guidance_scale: float, scheduler: str) -> torch.Tensor:
        """Images [N, C, S, S] in [0, 1] from the EMA decoder, image i seeded with i (comparable
        across validations); leaves the module in the train/eval mode it had."""
        was_training = self.training
        with self.ema_weights():
            out = FoundationPipeline(self.model)(
                prompts, num_inference_steps=steps, guidance_scale=guidance_scale, scheduler=scheduler,
                output_type="pt", show_progress=False,
                generator=[torch.Generator(self.device).manual_seed(i) for i in range(len(prompts))],
            )
        self.train(was_training)
        return out.images

    @torch.no_grad()
    def generation_fidelity(self) -> dict[str, float]:
        """Share of generated images (EMA decoder, fixed seeds) in which the shapes analyzer
        finds the prompt's color+shape, and all attributes, for held-out and held-in prompts."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        prompts = dm.generation_prompts(self.hparams.fidelity_images) if dm is not None and self.use_diffusion else None
        if not prompts:
            return {}
        images = self.generate_fixed(
            [p for p, _, _ in prompts], self.hparams.fidelity_steps, self.hparams.guidance_scale, self.hparams.fidelity_scheduler
        )
        scores = shapes.fidelity(images.permute(0, 2, 3, 1).cpu().numpy(), [t for _, t, _ in prompts])
        metrics = {}
        for split, held in (("heldout", True), ("heldin", False)):
            idx = [i for i, (_, _, h) in enumerate(prompts) if h == held]
            for kind in ("cs", "full"):
                metrics[f"gen_{kind}_{split}"] = sum(scores[kind][i] for i in idx) / max(1, len(idx))
        return metrics

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
        if self._scores_captions() and (feats["label"] >= 0).any():
            if "caption_label" not in feats:
                feats["caption_label"] = torch.cat([self.caption_labels(p.to(self.device)) for p in feats["pixels"].split(256)])
            keep = feats["label"] >= 0
            metrics["caption_acc"] = (feats["caption_label"][keep] == feats["label"][keep]).float().mean().item()
        return metrics
