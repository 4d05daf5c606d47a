"""Adaptation on frozen embeddings: linear probe, few-shot prototypes, ``multimodal probe``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from multimodal import FoundationConfig, FoundationModel, FoundationPipeline
from multimodal.adapt import fit_linear_probe
from multimodal.zero_shot import prototypes
from multimodal.cli import main
from multimodal.demo import SHIPPED_MODEL
from train.shapes import write_class_folder


def test_probe_and_prototypes_separate_clusters():
    torch.manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    labels = torch.arange(3).repeat_interleave(20)
    x = torch.nn.functional.normalize(centers[labels] + 0.1 * torch.randn(60, 8), dim=-1)
    head = fit_linear_probe(x, labels, 3)
    assert (head(x).argmax(-1) == labels).all()
    protos = prototypes(x, labels, 3)
    assert torch.allclose(protos.norm(dim=-1), torch.ones(3)) and ((x @ protos.T).argmax(-1) == labels).all()


def test_few_shot_from_the_api(tmp_path):
    pipe = FoundationPipeline(FoundationModel(FoundationConfig.from_preset("tiny")))
    support = [torch.rand(3, 32, 32) for _ in range(4)]
    scores = pipe.classify_few_shot(support, support, [0, 0, 1, 1])
    assert scores.shape == (4, 2)


def test_probe_command_on_the_shapes_validation_split(tmp_path, capsys):
    data = write_class_folder(tmp_path / "val", "val", count=240)
    model = [] if (SHIPPED_MODEL / "model.safetensors").is_file() else ["--model", "missing"]
    assert main(["probe", "--data", str(data), *model]) == 0
    out = capsys.readouterr().out
    acc = {k: float(v) for k, v in re.findall(r"(linear probe|zero-shot|5-shot prototypes):\s+([0-9.]+)", out)}
    assert set(acc) == {"linear probe", "zero-shot", "5-shot prototypes"}, out
    assert acc["linear probe"] >= acc["zero-shot"]


def test_few_shot_classify_command(tmp_path, capsys):
    """multimodal classify --support: class prototypes from k labeled examples per class."""
    if not (SHIPPED_MODEL / "model.safetensors").is_file():
        pytest.skip("the shipped model is not in this checkout")
    support = write_class_folder(tmp_path / "support", "val", count=96)
    queries = write_class_folder(tmp_path / "queries", "val", count=24, seed=5)
    images = sorted(str(p) for p in queries.rglob("*.png"))
    assert main(["classify", *images, "--support", str(support), "--shots", "2", "--top", "1"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    hits = [Path(path).parent.name.replace("_", " ") == row.split("\t")[1].rsplit(" ", 1)[0] for path, row in zip(images, rows)]
    assert len(rows) == 24 and sum(hits) >= 22, rows
    assert main(["classify", images[0]]) == 2  # neither --labels nor --support
    assert "give --labels" in capsys.readouterr().err
