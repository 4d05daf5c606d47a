"""The ``multimodal`` command. Training subcommands go to LightningCLI (imported lazily, so
the modeling packages never import Lightning)."""

from __future__ import annotations

import sys

TRAIN_COMMANDS = ("fit", "validate", "test", "predict")
USAGE = """usage: multimodal {fit,validate,test,predict} --config assets/configs/align.yaml [options]

  fit        train (LightningCLI; --print_config shows every option)
  validate   evaluate a checkpoint on the validation split (--ckpt_path)
  test       same metrics on the held-out split (--ckpt_path)
  predict    run prediction (--ckpt_path)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] in TRAIN_COMMANDS:
        from train.cli import run_cli

        try:
            run_cli(argv)
        except (ValueError, FileNotFoundError) as err:
            print(f"multimodal {argv[0]}: error: {err}", file=sys.stderr)
            return 2
        return 0
    print(f"multimodal: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
