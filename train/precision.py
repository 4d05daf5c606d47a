"""Pick the training precision that is actually faster on this machine.

bf16 matrix products are several times faster than fp32 on CPUs with AVX512-BF16 or AMX, and
hundreds of times slower on CPUs without them (seen here on an AVX2-only EPYC: 0.3 vs 120
GFLOP/s), so the CPU default is decided by a short measurement instead of a guess.
"""

from __future__ import annotations

import functools
import time

import torch


def _time_matmul(dtype: torch.dtype, n: int = 256, reps: int = 3) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm up
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return time.perf_counter() - start


@functools.lru_cache(maxsize=None)
def cpu_bf16_is_faster(tries: int = 5) -> bool:
    """True when a bf16 matmul beats fp32 by a clear margin on this CPU (measured once, ~ms).
    Each kind is timed ``tries`` times, interleaved, and the fastest try counts: another job on
    the cores slows single tries, not the best one, so a busy machine decides as a quiet one."""
    best = {torch.bfloat16: float("inf"), torch.float32: float("inf")}
    for _ in range(tries):
        for dtype in best:
            best[dtype] = min(best[dtype], _time_matmul(dtype))
    return best[torch.bfloat16] < 0.7 * best[torch.float32]


def default_precision() -> str:
    """``bf16-mixed`` where it is faster (CUDA with bf16, or a CPU with fast bf16), else ``32-true``."""
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_bf16_is_faster() else "32-true"
