"""The benchmark scripts stay runnable: each one imports the project and parses its options
(``--help``). Their figures come from running them in full, never from tests."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow  # each script imports torch, diffusers and open_clip before parsing --help: ~35 s for the four
@pytest.mark.parametrize("script", ["attention.py", "clip_step.py", "diffusion.py", "caption.py", "shapes_shards.py"])
def test_benchmark_starts(script):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"


def _gpu_check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(GPU_CHECK), *args], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def _dry_commands(out) -> list[str]:
    """The commands of a dry run, without their ``(cd OUT && ... )`` wrapper."""
    dry = _gpu_check("--dry-run", "--out", str(out))
    assert dry.returncode == 0, dry.stderr
    return [line.split(" && ", 1)[1].rstrip(" )") for line in dry.stdout.strip().splitlines()]


def test_gpu_check_parses_and_explains_itself(tmp_path):
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True).returncode == 0
    helped = _gpu_check("--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: benchmarks/gpu_check.sh")
    for bad, message in ((["--fit-steps", "0"], "--fit-steps must be an integer"), (["--bogus"], "unknown option '--bogus'")):
        refused = _gpu_check(*bad)
        assert refused.returncode == 2 and message in refused.stderr
    commands = _dry_commands(tmp_path / "out")
    assert len(commands) == 9, commands
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    for line in commands:  # every script it names exists
        assert all((ROOT / "benchmarks" / word.split("/")[-1]).is_file() for word in line.split() if word.endswith((".py",)) and "benchmarks/" in word)
    assert sum("multimodal.cli fit" in c for c in commands) == 3 and any("BlockFSDP" in c for c in commands)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_check_says_it_needs_a_gpu():
    refused = _gpu_check()
    assert refused.returncode == 3 and "no CUDA device" in refused.stderr


@pytest.mark.slow  # three LightningCLI parses (~10 s each)
def test_gpu_check_fit_commands_parse(tmp_path):
    """The fit commands gpu_check.sh runs on a GPU are accepted by the CLI (``--print_config``)."""
    fits = [c for c in _dry_commands(tmp_path / "out") if "multimodal.cli fit" in c]
    for line in fits:
        done = subprocess.run(f"{line} --print_config", shell=True, capture_output=True, text=True, timeout=300, cwd=ROOT,
                              executable="/bin/bash")
        assert done.returncode == 0, done.stderr[-2000:]
        assert "max_steps:" in done.stdout and "block_out_channels:" in done.stdout  # gpu1.yaml's decoder kept
    assert "ema_decay: 0" in done.stdout and "gradient_clip_val: 0" in done.stdout  # the FSDP step's own settings


@pytest.mark.slow  # two interpreters importing torch
def test_shapes_shards_are_webdataset_samples(tmp_path):
    import tarfile

    out = tmp_path / "shards"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shapes_shards.py"), str(out), "--shards", "2", "--per-shard", "3"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["train-00000.tar", "train-00001.tar", "val-00000.tar"]
    with tarfile.open(out / "train-00001.tar") as tar:
        names = tar.getnames()
        caption = tar.extractfile("0000003.txt").read().decode()
    assert names == [f"{i:07d}.{ext}" for i in range(3, 6) for ext in ("png", "txt")]
    assert caption.split()[-1] in ("circle", "square", "triangle", "diamond", "left", "right", "center")
    again = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shapes_shards.py"), str(out)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "not an empty folder" in again.stderr
