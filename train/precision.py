"""Pick the training precision that is actually faster on this machine.

bf16 matrix products are several times faster than fp32 on CPUs with AVX512-BF16 or AMX, and
hundreds of times slower on CPUs without them (seen here on an AVX2-only EPYC: 0.3 vs 120
GFLOP/s), so the CPU default is decided by a short measurement instead of a guess. A fast bf16
matmul is not enough: at a small model's sizes autocast's casts can eat the gain (a shapes-size
CLIP step ran slower in bf16-mixed on a CPU whose bf16 matmul was 2.3x faster), so ``fit`` times
the model's own training step both ways (``faster_step_precision``); the matmul only rules out
CPUs where bf16 cannot pay (timing a step there would take minutes).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable

import torch


def _time_matmul(dtype: torch.dtype, n: int = 256, reps: int = 3) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm up
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return time.perf_counter() - start


@functools.lru_cache(maxsize=None)
def bf16_matmul_ratio(tries: int = 5) -> float:
    """bf16 / fp32 time of a 256x256 matmul on this CPU (measured once, ~ms). Each kind is
    timed ``tries`` times, interleaved, and the fastest try counts: another job on the cores
    slows single tries, not the best one, so a busy machine decides as a quiet one."""
    best = {torch.bfloat16: float("inf"), torch.float32: float("inf")}
    for _ in range(tries):
        for dtype in best:
            best[dtype] = min(best[dtype], _time_matmul(dtype))
    return best[torch.bfloat16] / best[torch.float32]


def cpu_bf16_is_faster() -> bool:
    """True when a bf16 matmul beats fp32 by a clear margin on this CPU."""
    return bf16_matmul_ratio() < 0.7


def cpu_bf16_could_pay() -> bool:
    """False on CPUs without fast bf16 (a bf16 matmul slower than fp32): no step is timed there."""
    return bf16_matmul_ratio() < 1.0


PRECISION_CONTEXTS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "32-true": contextlib.nullcontext,
    "bf16-mixed": lambda: torch.autocast("cpu", dtype=torch.bfloat16),  # as Lightning's bf16-mixed on the CPU
}


def faster_step_precision(step: Callable[[], None], tries: int = 2, margin: float = 0.9) -> tuple[str, dict[str, float]]:
    """Time ``step`` (one training step's forward and backward) in fp32 and under bf16 autocast:
    one warm-up each, then ``tries`` interleaved timings, the fastest counting. bf16-mixed wins
    only when it is faster by more than ``1 - margin`` (it costs some accuracy). Returns the
    choice and the best seconds per step of each. The random streams are left as they were."""
    best = dict.fromkeys(PRECISION_CONTEXTS, float("inf"))
    with torch.random.fork_rng(devices=[]):
        for rep in range(tries + 1):
            for name, context in PRECISION_CONTEXTS.items():
                start = time.perf_counter()
                with context():
                    step()
                if rep:  # the first round warms up (allocations, autocast caches)
                    best[name] = min(best[name], time.perf_counter() - start)
    return ("bf16-mixed" if best["bf16-mixed"] < margin * best["32-true"] else "32-true"), best


def default_precision(on_cpu: bool | None = None) -> str:
    """``bf16-mixed`` where it is faster (CUDA with bf16, or a CPU with fast bf16), else ``32-true``
    (``16-mixed`` on CUDA without bf16). ``on_cpu`` defaults to: no CUDA device here."""
    if on_cpu is None:
        on_cpu = not torch.cuda.is_available()
    if not on_cpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_bf16_is_faster() else "32-true"
