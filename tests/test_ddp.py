"""Many processes on CPU (gloo): DDP through the real command line, compared with one process
on the same global batch."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file, save_file

from conftest import ALIGN, scaled_config

STEPS = 3


class SaveRankWeights(Callback):
    """Every rank writes its final weights to ``weights-rank{R}.safetensors`` in the working folder."""

    def on_fit_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in pl_module.model.state_dict().items()}
        save_file(state, f"weights-rank{trainer.global_rank}.safetensors")


def _run(folder: Path, devices: int, batch_size: int) -> tuple[list[float], Path]:
    folder.mkdir()
    cfg = scaled_config(folder, ALIGN, max_steps=STEPS, val_check_interval=1000, limit_val_batches=0, precision="32-true")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "multimodal.cli", "fit", "--config", str(cfg), "--trainer.devices", str(devices),
            "--trainer.callbacks+=test_ddp.SaveRankWeights", "--data.batch_size", str(batch_size)]
    if devices > 1:
        args += ["--trainer.strategy", "ddp"]
    done = subprocess.run(args, cwd=folder, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = list(csv.DictReader((folder / "runs/align/version_0/metrics.csv").open()))
    losses = {int(r["step"]): float(r["train/contrastive"]) for r in rows if r.get("train/contrastive")}
    return [losses[s] for s in sorted(losses)], folder


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    ddp_losses, ddp = _run(tmp_path / "ddp", devices=2, batch_size=8)  # 2 ranks x 8 = a global batch of 16
    one_losses, one = _run(tmp_path / "one", devices=1, batch_size=16)
    assert len(ddp_losses) == len(one_losses) == STEPS
    # the logged contrastive loss (mean of the ranks' local losses) is the loss of the global batch
    assert max(abs(a - b) for a, b in zip(ddp_losses, one_losses)) <= 1e-5, (ddp_losses, one_losses)
    rank0, rank1 = load_file(str(ddp / "weights-rank0.safetensors")), load_file(str(ddp / "weights-rank1.safetensors"))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    single = load_file(str(one / "weights-rank0.safetensors"))
    # and the update is that of one process on the whole batch (up to float summation order)
    # (Adam divides by the gradient RMS, so summation-order differences grow to ~1e-4 here)
    assert max((rank0[k] - single[k]).abs().max().item() for k in rank0) <= 1e-3
