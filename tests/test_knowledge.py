"""A model says what it knows: untrained components are refused (API, CLI), words never seen in
training are reported, and the training record / vocabulary travel with the model folder."""

from __future__ import annotations

import warnings

import pytest

from multimodal import FoundationConfig, FoundationModel, FoundationPipeline
from multimodal.cli import main
from multimodal.config import STAGES, TrainingRecord
from multimodal.knowledge import UnseenWordsWarning, UntrainedComponentError, UntrainedComponentWarning, load_vocabulary
from train.record import components_trained

SHIPPED = "assets/models/shapes"


def test_generate_warns_about_words_the_shipped_model_never_saw(tmp_path, capsys):
    out = str(tmp_path / "x.png")
    assert main(["generate", "a cat", "--steps", "2", "--out", out]) == 0
    assert "never saw 'cat'" in capsys.readouterr().err
    assert main(["generate", "a large red circle", "--steps", "2", "--out", out, "--overwrite"]) == 0
    assert "never saw" not in capsys.readouterr().err


def test_complete_and_classify_report_unseen_words(capsys):
    pipe = FoundationPipeline.from_pretrained(SHIPPED)
    completed = pipe.complete("the weather today is", max_new_tokens=2)
    assert completed.unseen_words == ["weather", "today", "is"] and completed[0].startswith("the weather today is")
    assert pipe.complete("a red", max_new_tokens=2).unseen_words == []
    with pytest.warns(UnseenWordsWarning, match="'cat'"):
        pipe.classify(pipe.model.pixel_mean.new_zeros(1, 3, 32, 32) + 0.5, ["cat", "red circle"])
    assert main(["complete", "a zebra", "--max-new-tokens", "2"]) == 0
    assert "never saw 'zebra'" in capsys.readouterr().err


def test_shipped_vocabulary_is_that_of_the_shapes_training_captions():
    from train.shapes import training_captions

    model = FoundationModel.from_pretrained(SHIPPED)
    assert model.vocabulary == frozenset(model.tokenize(training_captions()).flatten().tolist())
    assert model.config.training.trained("decoder") and model.config.training.trained("language")


def _align_only(tmp_path) -> str:
    """A model folder whose record says only the encoders were trained (as align.yaml exports)."""
    model = FoundationModel(FoundationConfig.from_preset("tiny", {"sampling": {"steps": 2}}))
    model.config.training = TrainingRecord(steps={"text": 10, "image": 10})
    model.vocabulary = frozenset(model.tokenize("a red circle").flatten().tolist())
    return str(model.save_pretrained(tmp_path / "align"))


def test_untrained_components_are_refused_naming_the_command_that_trains_them(tmp_path, capsys):
    folder = _align_only(tmp_path)
    pipe = FoundationPipeline.from_pretrained(folder)
    with pytest.raises(UntrainedComponentError, match=r"image decoder .* never trained .*decoder\.yaml"):
        pipe("a red circle", show_progress=False)
    with pytest.raises(UntrainedComponentError, match=r"language head .*language\.yaml"):
        pipe.caption(pipe.model.pixel_mean.new_zeros(1, 3, 32, 32))
    pipe.embed_text("a red circle")  # the trained encoders still work
    assert main(["generate", "a red circle", "--model", folder, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "never trained" in err and "decoder.yaml" in err and "--allow-untrained" in err
    assert not (tmp_path / "x.png").exists()
    png = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 0, 0)).save(png)
    assert main(["caption", str(png), "--model", folder]) == 2
    assert "language head" in capsys.readouterr().err
    # explicitly allowed: runs, with a warning
    with pytest.warns(UntrainedComponentWarning):
        FoundationPipeline.from_pretrained(folder, allow_untrained=True)("a red circle", show_progress=False, num_inference_steps=1)
    card = (tmp_path / "align" / "README.md").read_text()
    assert "Not trained: the decoder" in card and "text-to-image" not in card.split("---")[1]


def test_a_model_without_a_record_is_of_unknown_history_and_not_refused(tiny_model):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedComponentWarning)
        FoundationPipeline(tiny_model)("a red circle", num_inference_steps=1, show_progress=False)
    assert FoundationPipeline(tiny_model).unseen_words("anything at all") == []  # vocabulary unknown


def test_record_and_vocabulary_round_trip_and_are_checked(tmp_path, tiny_model):
    tiny_model.config.training = TrainingRecord(steps={"text": 3}, runs=[{"stage": "align", "steps": 3}])
    tiny_model.vocabulary = frozenset({1, 2, 3})
    tiny_model.save_pretrained(tmp_path)
    loaded = FoundationModel.from_pretrained(tmp_path)
    assert loaded.config.training.steps == {"text": 3, "image": 0, "decoder": 0, "language": 0}
    assert loaded.vocabulary == frozenset({1, 2, 3}) == load_vocabulary(tmp_path)
    tiny_model.vocabulary = None  # a later model without a vocabulary does not inherit the old file
    tiny_model.save_pretrained(tmp_path, overwrite=True)
    assert load_vocabulary(tmp_path) is None
    with pytest.raises(ValueError, match="training.steps keys"):
        TrainingRecord(steps={"unet": 1})
    with pytest.raises(ValueError, match="training.steps values"):
        TrainingRecord(steps={"text": -1})


@pytest.mark.parametrize("stage, expected", [
    ("align", ["text", "image"]), ("decoder", ["decoder"]), ("language", ["text", "image", "language"]),
    ("joint", ["text", "image", "decoder", "language"]),
])
def test_which_components_a_stage_trains(stage, expected):
    spec = STAGES[stage]
    assert components_trained(spec, spec.freeze, ["text", "image", "decoder", "language"], True) == expected


def test_fit_records_what_it_trained_and_export_from_checkpoints_keeps_it(tmp_path, capsys):
    import json

    import torch

    from conftest import ALIGN, scaled_config

    assert main(["fit", "--config", str(scaled_config(tmp_path, ALIGN, max_steps=2, val_check_interval=2))]) == 0
    model_dir = tmp_path / "runs/align/model"
    record = json.loads((model_dir / "config.json").read_text())["training"]
    assert record["steps"] == {"text": 2, "image": 2, "decoder": 0, "language": 0}
    assert record["runs"][-1]["stage"] == "align" and record["runs"][-1]["data"]["source"] == "shapes"
    vocabulary = load_vocabulary(model_dir)
    model = FoundationModel.from_pretrained(model_dir)
    assert set(model.tokenize("a red circle").flatten().tolist()) <= vocabulary
    assert "Not trained: the decoder" in (model_dir / "README.md").read_text()

    ckpt = tmp_path / "runs/align/checkpoints/last.ckpt"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "exported")]) == 0
    exported = FoundationModel.from_pretrained(tmp_path / "exported")
    assert exported.config.training.steps == {"text": 2, "image": 2, "decoder": 0, "language": 0}
    assert exported.vocabulary == vocabulary

    old = torch.load(ckpt, weights_only=True)  # a checkpoint written before training records
    del old["training_base"]
    torch.save(old, tmp_path / "old.ckpt")
    assert main(["export", "--ckpt", str(tmp_path / "old.ckpt"), "--out", str(tmp_path / "old")]) == 0
    legacy = FoundationModel.from_pretrained(tmp_path / "old")
    assert legacy.vocabulary is None  # unknown, not empty: no word is reported as unseen
    assert legacy.config.training.trained("decoder")  # history unknown: nothing refused

    # an export folder of the old layout at export_to is refused before training, with the fix
    (tmp_path / "runs/align/model").unlink()
    (tmp_path / "runs/align/model").mkdir()
    (tmp_path / "runs/align/model/config.json").write_text("{}")
    capsys.readouterr()
    assert main(["fit", "--config", str(scaled_config(tmp_path, ALIGN, max_steps=2, val_check_interval=2))]) == 2
    assert "mv " in capsys.readouterr().err
    assert not (tmp_path / "runs/align/version_1/model").exists()
