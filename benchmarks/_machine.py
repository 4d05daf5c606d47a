"""What a benchmark ran on, printed beside its figures (a ratio holds for one machine only),
and the few device-dependent helpers the scripts share."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what decides fp32 / bf16 speed on CPUs


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def describe(device: str) -> str:
    """One line: the device (GPU name, or CPU model and its matmul-relevant flags) and threads."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = sorted({f for line in info.splitlines() if line.startswith("flags") for f in line.split()[2:]} & set(CPU_FLAGS))
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), platform.processor())
    line = f"device={device}"
    if device.startswith("cuda"):
        line += f" gpu={torch.cuda.get_device_name(device)!r}"
    return (line + f" cpu={model!r} cpu_flags={' '.join(flags) or 'n/a'} threads={torch.get_num_threads()} "
            f"cores={os.cpu_count()} torch={torch.__version__}")


def autocast(device: str, precision: str):
    """bf16 autocast for ``bf16-mixed``; nothing for ``32`` and ``bf16-true`` (weights and inputs
    cast once to bf16 by the script: inference without per-step weight casts)."""
    if precision in ("32", "bf16-true"):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def sync(device: str) -> None:
    """Wait for queued GPU work, so that a timer stops when the work is done."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def positive(text: str) -> int:
    """argparse type: an integer >= 1 (a clear usage error instead of a traceback later)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def device_name(text: str) -> str:
    """argparse type: a torch device string (cpu, cuda, cuda:1)."""
    import argparse

    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"must be a torch device such as cpu or cuda, got {text!r}") from None
    return text
