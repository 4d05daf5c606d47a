"""Imported first by every benchmark script: ``benchmarks/diffusion.py`` is named like the
``diffusion`` package, and Python puts a script's own folder first on ``sys.path``, so drop
that folder before the project's packages are imported."""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
