"""LightningCLI wiring: ``multimodal fit|validate|test|predict --config assets/configs/<name>.yaml``."""

from __future__ import annotations

import zipfile
from pathlib import Path

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from .data import FoundationDataModule
from .data_checks import check_trainable
from .evaluation import default_evaluators, evaluators_of
from .module import FoundationModule
from .precision import default_precision


class FoundationCLI(LightningCLI):
    """LightningCLI with this project's module and data module; the run's resolved config is
    saved as ``config.yaml`` in the run folder (the logger's versioned directory). A config that
    names no evaluator gets the default ones (retrieval, zero-shot)."""

    def add_arguments_to_parser(self, parser) -> None:
        # bf16-mixed by default only where it is faster; a config or --trainer.precision wins.
        parser.set_defaults({"trainer.precision": default_precision()})

    def before_fit(self) -> None:
        """Refuse data that cannot train before the first step, while nothing is written yet."""
        self.check_ckpt_path()
        check_trainable(self.datamodule, self.model.model.config.image.image_size, self.trainer.world_size)

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

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if not evaluators_of(trainer):
            trainer.callbacks.extend(default_evaluators())
        return trainer


def run_cli(args: list[str]) -> FoundationCLI:
    try:
        return FoundationCLI(
            FoundationModule,
            FoundationDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},
        )
    except MisconfigurationException as err:  # Lightning's own argument checks (e.g. max_steps -5)
        raise ValueError(str(err)) from None


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
