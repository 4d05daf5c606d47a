"""The language stage end to end: contrastive + captioning in one step, caption accuracy,
export, and the caption command."""

import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT, scaled_config
from multimodal import FoundationConfig, FoundationModel
from multimodal.cli import main
from train.shapes import caption_label, generate, read_caption

LANGUAGE = ROOT / "assets" / "configs" / "language.yaml"


def test_read_caption_uses_the_shapes_vocabulary():
    assert read_caption("a picture of a small red circle at the top left") == {
        "shape": "circle", "color": "red", "size": "small", "position": "top left"}
    assert caption_label("a red blue circle") == -1  # two colors: not readable
    _, caption, sample = generate(0, "val", 3)
    assert caption_label(caption) == sample.label


@pytest.mark.slow
def test_language_stage_trains_head_and_encoders_and_captions(tmp_path):
    start = FoundationModel(FoundationConfig.from_preset("tiny"))
    start.save_pretrained(tmp_path / "start")
    cfg = scaled_config(tmp_path, LANGUAGE, max_steps=3, val_check_interval=3, model={"init_from": str(tmp_path / "start")})
    assert main(["fit", "--config", str(cfg)]) == 0
    header, *rows = (tmp_path / "runs/language/version_0/metrics.csv").read_text().splitlines()
    logged = {k for row in rows for k, v in zip(header.split(","), row.split(",")) if v}
    assert {"train/contrastive", "train/caption", "val/caption_acc", "val/zero_shot_acc"} <= logged
    model_dir = tmp_path / "runs/language/model"
    trained = load_file(str(model_dir / "model.safetensors"))
    init = start.state_dict()
    for prefix in ("language.", "encoders.text.", "encoders.image."):
        assert any(not torch.equal(init[k], trained[k]) for k in init if k.startswith(prefix)), prefix
    assert all(torch.equal(init[k], trained[k]) for k in init if k.startswith("decoder."))  # frozen

    image = tmp_path / "shape.png"
    generate(0, "val", 0)[0].save(image)
    result = subprocess.run([sys.executable, "-m", "multimodal.cli", "caption", str(image), str(image), "--model", str(model_dir),
                             "--max-new-tokens", "4"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(str(image)) for line in lines)
    bad = subprocess.run([sys.executable, "-m", "multimodal.cli", "caption", str(image), "--model", str(model_dir),
                          "--num-beams", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--num-beams must be in [1, 16], got 0" in bad.stderr
