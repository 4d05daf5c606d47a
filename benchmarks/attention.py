"""Attention core: time and peak memory of the fused ``sdpa`` backend against the ``math``
reference (which materializes the [N, N] score matrix), for sequence lengths 256..8192.

    python benchmarks/attention.py [--heads 8] [--head-dim 64] [--causal] [--device cpu|cuda]

Peak memory on CPU is the rise of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs before each call) above what was resident before it; the script re-runs
itself with glibc's mmap threshold at 16 KiB so that freed buffers go back to the system and
are not silently reused (which would hide allocations from the resident set). On CUDA it is
``torch.cuda.max_memory_allocated`` above the allocation before the call. Inputs are allocated
before the measurement, so the figures are the attention call's own working memory + output.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import _no_shadow  # noqa: F401  (first: keeps benchmarks/diffusion.py from shadowing the package)
import torch

from _machine import describe, device_name, positive
from encoders.attention import attention, attention_backend


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes(fn, device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del out
        return peak
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    out = fn()
    peak = (_rss_kib("VmHWM") - before) * 1024
    del out
    return peak


def seconds(fn, device: str, reps: int) -> float:
    fn()  # warm up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def main() -> None:
    if sys.platform == "linux" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "16384":
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TRIM_THRESHOLD_": "0"})
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--lengths", type=positive, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--heads", type=positive, default=8)
    parser.add_argument("--head-dim", type=positive, default=64)
    parser.add_argument("--batch", type=positive, default=1)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"dtype={args.dtype} batch={args.batch} heads={args.heads} head_dim={args.head_dim} causal={args.causal}")
    print(describe(args.device))
    print(f"{'N':>6} | {'sdpa ms':>9} {'math ms':>9} {'time ratio':>10} | {'sdpa MiB':>9} {'math MiB':>9} {'mem ratio':>9}")
    with torch.inference_mode():
        for n in args.lengths:
            q, k, v = (torch.randn(args.batch, args.heads, n, args.head_dim, device=args.device, dtype=dtype) for _ in range(3))
            results = {}
            for backend in ("sdpa", "math"):
                def call(backend=backend):
                    with attention_backend(backend):
                        return attention(q, k, v, causal=args.causal)
                reps = max(1, min(20, int(2e9 / (n * n * args.heads * args.batch))))
                results[backend] = (seconds(call, args.device, reps), peak_bytes(call, args.device))
            (ts, ms), (tm, mm) = results["sdpa"], results["math"]
            print(f"{n:>6} | {ts * 1e3:>9.2f} {tm * 1e3:>9.2f} {ts / tm:>10.3f} | "
                  f"{ms / 2**20:>9.1f} {mm / 2**20:>9.1f} {ms / max(mm, 1):>9.4f}", flush=True)
            del q, k, v


if __name__ == "__main__":
    main()
