"""LightningCLI wiring: ``multimodal fit|validate|test|predict --config assets/configs/<name>.yaml``."""

from __future__ import annotations

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
        check_trainable(self.datamodule, self.model.model.config.image.image_size, self.trainer.world_size)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if not evaluators_of(trainer):
            trainer.callbacks.extend(default_evaluators())
        return trainer


def run_cli(args: list[str]) -> FoundationCLI:
    return FoundationCLI(
        FoundationModule,
        FoundationDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
    )
