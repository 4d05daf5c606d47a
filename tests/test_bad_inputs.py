"""Bad input to the API and the command line: a clear error naming the argument and its allowed
range, never a traceback, a silent black image or a silently misread image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from multimodal import FoundationConfig, FoundationPipeline
from multimodal.cli import _model_dir, main
from train.module import FoundationModule


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    from multimodal import FoundationModel

    return FoundationPipeline(FoundationModel(FoundationConfig.from_preset("tiny")))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_inference_steps=1000), r"num_inference_steps must be an integer in \[1, 999\]"),  # dpm++ gives NaN there
    (dict(num_inference_steps=True), "num_inference_steps must be an integer"),
    (dict(guidance_scale=float("inf")), r"guidance_scale must be a number in \[0, 100\]"),
    (dict(guidance_scale="5"), "guidance_scale must be a number"),
    (dict(num_images_per_prompt=2.0), "num_images_per_prompt must be an integer"),
    (dict(generator=3), "generator must be a torch.Generator"),
])
def test_generation_arguments_are_checked_first(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe("a red circle", show_progress=False, **kwargs)


def test_non_finite_samples_are_an_error_not_a_black_image(pipe):
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        pipe.postprocess(torch.full((1, 3, 32, 32), float("nan")), "pil")


@pytest.mark.parametrize("image, match", [
    (np.full((32, 32, 3), 200.0, np.float32), r"uint8 in \[0, 255\] or float in \[0, 1\]"),  # 0..255 floats
    (np.zeros((32, 32, 3), np.uint16), "uint8 in"),
    (np.full((32, 32, 3), np.nan), "uint8 in"),
    (torch.zeros(3, 32, 32, dtype=torch.uint8), "tensor image must be float"),
    (torch.full((1, 3, 32, 32), 255.0), r"tensor batch must be float in \[0, 1\]"),
    (np.zeros((1, 32, 32, 3), np.uint8), r"must be \[H, W, 3\]"),
])
def test_images_in_the_wrong_range_are_refused(pipe, image, match):
    with pytest.raises(ValueError, match=match):
        pipe.embed_image(image)


def test_text_arguments(pipe):
    with pytest.raises(ValueError, match="texts must be a string or a non-empty list"):
        pipe.embed_text(None)
    with pytest.raises(ValueError, match="longer than the model's context"):
        pipe.complete("a picture of a small red circle at the top left and a picture of a large blue")
    with pytest.raises(ValueError, match="scheduler must be one of"):
        FoundationPipeline(pipe.model, scheduler="nonsense")
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
        pipe.to(dtype=torch.int8)


@pytest.mark.parametrize("overrides, match", [
    ({"text": {"width": "64"}}, "config.text.width must be an integer, got '64'"),
    ({"text": {"layers": True}}, "config.text.layers must be an integer"),
    ({"decoder": {"cfg_dropout": "x"}}, "config.decoder.cfg_dropout must be a number"),
])
def test_config_values_of_the_wrong_kind_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        FoundationConfig.from_preset("tiny", overrides)
    with pytest.raises(ValueError, match="overrides must be a mapping"):
        FoundationConfig.from_preset("tiny", [1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "model.lr must be > 0"),
    (dict(min_lr_ratio=2.0), r"model.min_lr_ratio must be in \[0, 1\]"),
    (dict(freeze=["text", "image", "decoder", "language"]), "every component is frozen"),
])
def test_training_arguments_are_checked_before_anything_runs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FoundationModule(preset="tiny", **kwargs)


def test_commands_answer_bad_files_and_sizes_in_one_line(tmp_path, capsys):
    readme = str(tmp_path / "notes.txt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert main(["export", "--ckpt", readme, "--out", str(tmp_path / "out")]) == 2
    assert "is not a Lightning checkpoint" in capsys.readouterr().err
    assert main(["generate", "x", "--num-images", "1000"]) == 2
    assert "--num-images must be in [1, 64]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    assert main(["generate", "x", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")]) == 2
    assert "--model: " in capsys.readouterr().err and not (tmp_path / "x.png").exists()
    for name in ("adapter_config.json", "pytorch_model.bin"):  # an adapter brings its base; the loader explains a pickle
        (tmp_path / name.split(".")[0]).mkdir()
        (tmp_path / name.split(".")[0] / name).write_text("{}")
        assert _model_dir(str(tmp_path / name.split(".")[0])) == tmp_path / name.split(".")[0]


def test_a_label_given_twice_is_refused(tiny_model):
    from multimodal import FoundationPipeline

    with pytest.raises(ValueError, match="labels: 'red circle' given more than once"):
        FoundationPipeline(tiny_model).classify(torch.rand(1, 3, 32, 32), ["red circle", "blue square", "red circle"])
