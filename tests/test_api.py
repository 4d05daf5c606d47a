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
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
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


def test_prompt_filter_output_checker_and_the_unfiltered_warning(saved):
    import warnings

    from multimodal import PromptBlocked

    model = FoundationModel.from_pretrained(saved)
    pipe = FoundationPipeline(model, prompt_filter=["forbidden", "bad word"])
    with pytest.raises(PromptBlocked, match=r"prompt refused by the prompt filter \(word list: 'Bad Word'\)"):
        pipe(["a red circle", "a Bad Word here"], num_inference_steps=1, show_progress=False)
    with pytest.raises(PromptBlocked, match="word list"):
        pipe.complete("something forbidden", max_new_tokens=1)
    assert pipe.complete("forbiddenness is fine", max_new_tokens=1)  # whole words only

    def no_circles(prompt: str) -> bool:
        return "circle" in prompt

    with pytest.raises(PromptBlocked, match=r"\(no_circles\)"):
        FoundationPipeline(model, prompt_filter=no_circles)("a red circle", num_inference_steps=1, show_progress=False)

    checked = FoundationPipeline(model, output_checker=lambda images: [i % 2 == 1 for i in range(len(images))])
    with pytest.warns(UserWarning, match="flagged 1 of 2"):
        out = checked("a red circle", num_inference_steps=1, num_images_per_prompt=2, output_type="pt", show_progress=False)
    assert out.flagged == [False, True] and out.images[1].abs().sum() == 0 and out.images[0].abs().sum() > 0

    plain = FoundationPipeline(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            plain("a red circle", num_inference_steps=1, show_progress=False)
    assert sum("without a prompt filter" in str(w.message) for w in caught) == 1


def test_exported_model_card_lists_metrics_its_command_reproduces(tmp_path, capsys):
    import json
    import shlex

    import yaml
    from huggingface_hub import ModelCard

    from conftest import ALIGN, scaled_config

    assert main(["fit", "--config", str(scaled_config(tmp_path, ALIGN))]) == 0
    card = ModelCard.load(tmp_path / "runs/align/model/README.md")
    assert card.data.license == "apache-2.0" and "## Intended use" in card.text and "## Limitations" in card.text
    assert "shapes" in card.text.split("## Training data")[1].split("##")[0]
    listed = {k: float(v) for k, v in (row.strip("| ").split(" | ") for row in card.text.splitlines()
                                      if row.startswith("| ") and not row.startswith(("| metric", "|---")))}
    command = card.text.split("```bash\n")[1].split("\n```")[0]
    assert command.startswith("multimodal test --config ")
    capsys.readouterr()
    assert main(shlex.split(command)[1:]) == 0
    table = capsys.readouterr().out
    reproduced = {m.group(1): float(m.group(2)) for m in __import__("re").finditer(r"test/(\S+)\s+│\s+([0-9.e-]+)", table)}
    assert listed and set(listed) <= set(reproduced), (listed, reproduced)
    assert all(abs(listed[k] - reproduced[k]) < 1e-3 for k in listed), (listed, reproduced)
    saved = json.loads((tmp_path / "runs/align/model/config.json").read_text())
    assert json.dumps(saved, indent=2) in card.text  # the config is in the card
    assert yaml.safe_load(card.content.split("---")[1])["library_name"] == "multimodal-foundation"
