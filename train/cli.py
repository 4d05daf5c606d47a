"""LightningCLI wiring: ``multimodal fit|validate|test|predict --config assets/configs/<name>.yaml``."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI

from .data import FoundationDataModule
from .data_checks import check_trainable
from .evaluation import default_evaluators, evaluators_of
from .module import FoundationModule
from .precision import cpu_bf16_could_pay, default_precision, faster_step_precision


# Messages a user cannot act on (library internals, advertising); warnings of this project and real
# problems stay. Each is matched by its start, so a changed library message shows up again.
QUIET_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"Precision .* is not supported by the model summary",
                  r"LightningCLI's args parameter")  # args are the command line (sys.argv stays: DDP relaunches it)
QUIET_INFO = ("💡 Tip: For seamless cloud logging",)


def _no_version(items: dict) -> dict:
    items.pop("v_num", None)  # the logger's version folder, shown as "v_num: 0.000"
    return items


class RichBar(RichProgressBar):
    """Lightning's bar without ``v_num`` and without "Epoch 0/-2" (``max_epochs`` -1 in a
    ``max_steps`` run): "Epoch 0"."""

    def get_metrics(self, trainer, pl_module) -> dict:
        return _no_version(super().get_metrics(trainer, pl_module))

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 1:
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"


class TQDMBar(TQDMProgressBar):
    def get_metrics(self, trainer, pl_module) -> dict:
        return _no_version(super().get_metrics(trainer, pl_module))


class LineProgress(ProgressBar):
    """Progress as plain lines, for output that is not a terminal (a file, ``nohup``, CI), where a
    live bar shows nothing: a line at most every ``every_s`` seconds and at the last step."""

    def __init__(self, every_s: float = 30.0):
        super().__init__()
        self.every_s, self._enabled, self._start, self._last = every_s, True, 0.0, 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = self._last = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now, step, total = time.monotonic(), trainer.global_step, trainer.max_steps
        if not self._enabled or not trainer.is_global_zero or (now - self._last < self.every_s and step != total):
            return
        self._last = now
        metrics = _no_version(self.get_metrics(trainer, pl_module))
        shown = "".join(f", {k} {v:.4g}" if isinstance(v, float) else f", {k} {v}" for k, v in metrics.items())
        rate = (now - self._start) / max(step, 1)
        left = f", about {rate * (total - step) / 60:.0f} min left" if total and total > step else ""
        print(f"step {step}" + (f"/{total}" if total and total > 0 else "") + f"{shown}, {rate:.2f} s/step{left}", flush=True)


_CHOSEN: dict[str, tuple[str, dict[str, float]]] = {}  # per model (config, losses, batch) in this process: choice, seconds


class FoundationCLI(LightningCLI):
    """LightningCLI with this project's module and data module; the run's resolved config is
    saved as ``config.yaml`` in the run folder (the logger's versioned directory). A config that
    names no evaluator gets the default ones (retrieval, zero-shot)."""

    def add_arguments_to_parser(self, parser) -> None:
        # None: chosen when the model is built (``choose_precision``); a config or --trainer.precision wins.
        parser.set_defaults({"trainer.precision": None})
        for action in parser._actions:
            if action.dest == "trainer.precision":
                action.help = ("32-true (fp32), bf16-mixed, 16-mixed, bf16-true, ... (Lightning's precisions). Default (null): "
                               "bf16-mixed on a CUDA GPU with bf16 (else 16-mixed); for fit on the CPU in one process, whichever of 32-true and "
                               "bf16-mixed runs this model's training step faster here (a few steps timed before training; printed; "
                               "a resumed run times again); otherwise bf16-mixed where a bf16 matmul is clearly faster")

    def before_fit(self) -> None:
        """Refuse data that cannot train before the first step, while nothing is written yet."""
        self.check_ckpt_path()
        check_trainable(self.datamodule, self.model.model.config.image.image_size, self.trainer.world_size)

    def after_fit(self) -> None:
        """What to run next, after Lightning's last output (a progress bar would break the lines)."""
        for callback in self.trainer.callbacks:
            if getattr(callback, "next_steps", None) and self.trainer.is_global_zero:
                print(callback.next_steps, flush=True)

    def before_validate(self) -> None:
        self.check_ckpt_path()

    before_test = before_predict = before_validate

    def _parse_ckpt_path(self) -> None:
        """``--ckpt_path`` is checked before LightningCLI reads the file's hyperparameters: a
        local file that is a whole checkpoint, never a URL (Lightning unpickles remote
        checkpoints with ``weights_only=False``, which runs whatever code the file carries)."""
        value = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        if value is not None and value not in ("last", "best", "hpc"):
            check_checkpoint_file(str(value), "--ckpt_path")
        try:
            super()._parse_ckpt_path()
        except Exception as err:  # torch's UnpicklingError suggests weights_only=False: never
            if type(err).__name__ != "UnpicklingError":
                raise
            raise ValueError(f"--ckpt_path: {value} holds objects other than tensors and plain values: refused (unpickling "
                             "them could run any code); resume only from checkpoints multimodal fit wrote") from None

    def check_ckpt_path(self) -> None:
        """``--ckpt_path last`` must name a checkpoint: Lightning would start from scratch without a word."""
        if self.config[self.subcommand].get("ckpt_path") != "last":
            return
        found = {p for cb in self.trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)
                 for p in cb._find_last_checkpoints(self.trainer)}
        if not found:
            raise FileNotFoundError("--ckpt_path last: there is no last checkpoint to resume from (none in the run's "
                                    "checkpoint folder): leave --ckpt_path out to start a new run")

    def choose_precision(self, trainer_config: dict) -> str:
        """The default precision: on one CUDA device bf16-mixed where supported; for ``fit`` on the
        CPU, whichever of fp32 and bf16-mixed runs this model's training step faster (a few steps
        timed, seconds); otherwise by a matmul (``train.precision``)."""
        accelerator = str(trainer_config.get("accelerator") or "auto")
        on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available() and not torch.backends.mps.is_available())
        one_process = trainer_config.get("devices") in (1, "1", "auto", None) and trainer_config.get("num_nodes", 1) == 1
        if not (on_cpu and one_process and self.subcommand == "fit" and cpu_bf16_could_pay()):
            return default_precision(on_cpu)  # every process of a multi-process run decides alike
        batch_size = getattr(self.datamodule, "batch_size", 32)
        key = json.dumps([asdict(self.model.model.config), self.model.loss.heads, self.model.frozen, self.model.hparams.lora,
                          batch_size, self.model.hparams.diffusion_batch_size], sort_keys=True, default=str)
        if key not in _CHOSEN:  # once per model and process: two fits of one model (a resume in a test) train alike
            _CHOSEN[key] = faster_step_precision(self.model.probe_step(batch_size))
        choice, seconds = _CHOSEN[key]
        print(f"precision: {choice} (this model's training step took {seconds['bf16-mixed']:.3g} s in bf16-mixed and "
              f"{seconds['32-true']:.3g} s in fp32 here; --trainer.precision chooses)", flush=True)
        return choice

    def instantiate_trainer(self, **kwargs):
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("precision") is None and kwargs.get("precision") is None:
            kwargs["precision"] = self.choose_precision(trainer_config)
            if self.subcommand is not None:  # the run's config.yaml says it
                self.config[self.subcommand]["trainer"]["precision"] = kwargs["precision"]
        trainer = super().instantiate_trainer(**kwargs)
        for i, callback in enumerate(trainer.callbacks):  # Lightning's default bars, without the noise; lines off a terminal
            if type(callback) in (RichProgressBar, TQDMProgressBar):
                bar = RichBar if type(callback) is RichProgressBar else TQDMBar
                trainer.callbacks[i] = bar() if sys.stdout.isatty() else LineProgress()
        if not evaluators_of(trainer):
            trainer.callbacks.extend(default_evaluators())
        return trainer


def _quiet_info(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(QUIET_INFO)


def run_cli(args: list[str]) -> FoundationCLI:
    """Train / evaluate with ``args`` (the command line after ``multimodal``), without the
    library messages a user cannot act on."""
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")  # Lightning's use of jsonargparse, not the user's
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.addFilter(_quiet_info)
    try:
        with warnings.catch_warnings():
            for message in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            # the module's own AdamW + cosine (model.lr, ...): no --optimizer / --lr_scheduler groups that would bypass it
            return FoundationCLI(FoundationModule, FoundationDataModule, args=args, save_config_kwargs={"overwrite": True},
                                 auto_configure_optimizers=False)
    except MisconfigurationException as err:  # Lightning's own argument checks (e.g. max_steps -5)
        raise ValueError(str(err)) from None
    finally:
        rank_zero.removeFilter(_quiet_info)


def check_checkpoint_file(value: str, what: str) -> None:
    """A local, complete checkpoint file (a zip archive, as ``torch.save`` writes), or an error."""
    if "://" in value:
        raise ValueError(f"{what}: checkpoints are read from local files only, not URLs ({value}): Lightning would "
                         "unpickle a remote file, which can run any code it carries. Download it from a source you "
                         "trust and pass the local path")
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no checkpoint file at {value}")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(f"{what}: {value} is not a Lightning checkpoint, or is truncated ({err})") from None
    if damaged is not None:
        raise ValueError(f"{what}: {value} is damaged (its part {damaged} fails its checksum)")
