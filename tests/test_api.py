"""The public Python API and the inference commands: safe loading, dtype choice, docstrings."""

from __future__ import annotations

import inspect

import pytest
import torch

import multimodal
from multimodal import FoundationConfig, FoundationModel, FoundationPipeline
from multimodal.cli import main


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "model"
    FoundationModel(FoundationConfig.from_preset("tiny")).save_pretrained(folder)
    return folder


def test_pickle_files_are_refused(tmp_path, saved):
    pickled = tmp_path / "weights.pt"
    torch.save({"x": torch.zeros(1)}, pickled)
    with pytest.raises(ValueError, match="pickle-based"):
        FoundationPipeline.from_pretrained(pickled)
    folder = tmp_path / "only_pickle"
    folder.mkdir()
    (saved / "config.json").rename(folder / "config.json")
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no model.safetensors \(found \['pytorch_model.bin'\]; pickle files are never loaded\)"):
        FoundationPipeline.from_pretrained(folder)


def test_dtype_choice_runs_every_task(saved):
    pipe = FoundationPipeline.from_pretrained(saved, dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and next(pipe.model.parameters()).dtype == torch.bfloat16
    image = torch.rand(3, 32, 32)
    assert pipe.embed_image([image]).shape == (1, 32) and pipe.embed_text("a red circle").shape == (1, 32)
    assert torch.allclose(pipe.classify(image, ["red circle", "blue square"]).sum(), torch.tensor(1.0), atol=1e-3)
    assert len(pipe.caption(image, max_new_tokens=2)) == 1
    assert pipe.complete("a picture of", max_new_tokens=2)[0].startswith("a picture of")
    assert pipe("a red circle", num_inference_steps=2, show_progress=False).images[0].size == (32, 32)
    with pytest.raises(ValueError, match="dtype must be a floating-point dtype"):
        pipe.to(dtype=torch.int8)


def test_public_names_are_documented():
    for name in multimodal.__all__:
        assert getattr(multimodal, name) is not None
    for name, member in inspect.getmembers(FoundationPipeline, inspect.isfunction):
        if not name.startswith("_") or name == "__call__":
            assert member.__doc__, f"FoundationPipeline.{name} has no docstring"


def test_inference_commands(saved, tmp_path, capsys, monkeypatch):
    from PIL import Image

    png = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(png)
    assert main(["classify", str(png), "--labels", "red circle, blue square", "--model", str(saved)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{png}\t") and "red circle" in line and "blue square" in line
    assert main(["complete", "a picture of", "--max-new-tokens", "2", "--model", str(saved)]) == 0
    assert capsys.readouterr().out.startswith("a picture of")
    assert main(["complete", "a picture of", "--image", str(png), "--max-new-tokens", "2", "--model", str(saved)]) == 0
    assert main(["classify", str(png), "--labels", "just one", "--model", str(saved)]) == 2
    assert "--labels" in capsys.readouterr().err
    monkeypatch.setattr("multimodal.demo.SHIPPED_MODEL", tmp_path / "nowhere")
    assert main(["caption", str(png)]) == 2
    assert "no model folder" in capsys.readouterr().err
