"""Imported first by every benchmark script: ``benchmarks/diffusion.py`` is named like the
``diffusion`` package, and Python puts a script's own folder first on ``sys.path``, so drop
that folder before the project's packages are imported (after loading the scripts' shared
helpers in ``_machine``, which import no project package)."""

import sys
from pathlib import Path

import _machine  # noqa: F401  (stays importable by name once the folder is off the path)

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
