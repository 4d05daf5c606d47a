"""The shipped shapes model (assets/models/shapes): usable right after install."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from multimodal import FoundationPipeline
from multimodal.cli import main
from multimodal.demo import SHIPPED_MODEL
from train.shapes import analyze, class_names, generate

pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL / "model.safetensors").is_file(), reason="no shipped model")


def test_shipped_model_is_small_and_safe():
    size = sum(p.stat().st_size for p in SHIPPED_MODEL.rglob("*") if p.is_file())
    assert size <= 40 * 2**20
    assert not [p for p in SHIPPED_MODEL.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    card = (SHIPPED_MODEL / "README.md").read_text()
    assert "multimodal fit --config assets/configs/shapes.yaml" in card and "multimodal test" in card


def test_generate_command_draws_a_red_circle(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", "a large red circle", "--out", str(out)]) == 0
    with Image.open(out) as img:
        found = analyze(np.asarray(img.convert("RGB")))
    assert found is not None and (found.color, found.shape) == ("red", "circle")


def test_shipped_model_classifies_and_captions_held_out_images():
    pipe = FoundationPipeline.from_pretrained(SHIPPED_MODEL)
    samples = [generate(0, "val", i) for i in range(12)]
    names = class_names()
    templates = ["a {}", "a picture of a {}", "an image of a {}", "a drawing of a {}"]
    probs = pipe.classify([img for img, _, _ in samples], names, templates=templates)
    truth = [f"{s.color} {s.shape}" for _, _, s in samples]
    assert [names[i] for i in probs.argmax(-1).tolist()] == truth
    captions = pipe.caption([img for img, _, _ in samples])
    assert sum(f"{s.color} {s.shape}" in c for c, (_, _, s) in zip(captions, samples)) >= 11
