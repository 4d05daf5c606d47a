"""A user's own image folder end to end (tiny scale): data that cannot train is refused before
anything is written, folder.yaml trains all three heads, the export records what was trained,
and ``multimodal evaluate`` writes its report."""

from __future__ import annotations

import json
import os
import pytest
from PIL import Image

from conftest import folder_config, image_folder
from multimodal.cli import main
from multimodal.datasets import write_digits


@pytest.mark.parametrize("case, data, message", [
    ("no captions", {"captions": False, "n": 8}, r"none of the 7 training images has a caption.*metadata\.jsonl"),
    ("fewer than a batch", {"captions": True, "n": 8}, r"7 training samples with captions, fewer than one batch.*lower --data.batch_size to at most 7"),
    ("image size", {"captions": True, "n": 40, "image_size": 32}, r"data.image_size \(32\) is not the model's image.image_size \(16\): pass --data.image_size 16"),
    ("no validation", {"captions": True, "n": 40, "val_empty": True}, r"no validation split possible.*has no image with a caption"),
])
def test_data_that_cannot_train_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch, case, data, message):
    monkeypatch.chdir(tmp_path)
    folder = image_folder(tmp_path / "images", data["n"], data["captions"])
    extra = {"source": "folder", "path": str(folder)}
    if "image_size" in data:
        extra["image_size"] = data["image_size"]
    if data.get("val_empty"):
        extra["val_path"] = str(image_folder(tmp_path / "val", 4, captions=False))
    config = folder_config(tmp_path, extra)
    before = set(os.listdir(tmp_path))
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err), err
    assert set(os.listdir(tmp_path)) == before  # no runs/, no checkpoint, no folder


def test_small_data_prints_its_counts_at_most_once_a_minute(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = image_folder(tmp_path / "images", 40, captions=True)
    config = folder_config(tmp_path, {"source": "folder", "path": str(folder), "batch_size": 16}, max_steps=8, val_check_interval=8)
    with caplog.at_level("INFO"):
        assert main(["fit", "--config", str(config)]) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data, epoch")]
    assert lines == ["data, epoch 0: 32 samples used; skipped: none; fixed: none",
                     "data, epochs 1-3: 96 samples used; skipped: none; fixed: none"], lines


@pytest.mark.slow
def test_folder_recipe_trains_all_heads_records_them_and_evaluate_reports(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    counts = write_digits(tmp_path / "digits")
    assert counts == {"train": 1437, "val": 360}
    data = {"source": "folder", "path": str(tmp_path / "digits/train"), "val_path": str(tmp_path / "digits/val"),
            "image_size": 16, "val_batch_size": 64}
    config = folder_config(tmp_path, data, max_steps=3, val_check_interval=3)
    assert main(["fit", "--config", str(config)]) == 0
    link = tmp_path / "runs/folder/model"
    assert link.is_symlink() and link.resolve() == (tmp_path / "runs/folder/version_0/model").resolve()
    saved = json.loads((link / "config.json").read_text())
    assert saved["training"]["steps"] == {"text": 3, "image": 3, "decoder": 3, "language": 3}
    assert saved["training"]["runs"][-1]["data"] == {"source": "folder", "path": data["path"]}
    words = json.loads((link / "vocabulary.json").read_text())["token_ids"]
    assert len(words) > 10
    metrics = json.loads((tmp_path / "runs/folder/version_0/metrics.json").read_text())
    assert {"caption_bleu4", "gen_fid_own", "gen_class_acc", "zero_shot_acc"} <= set(metrics)

    # a second run gets its own export; the link moves, the first export stays
    assert main(["fit", "--config", str(config)]) == 0
    assert link.resolve() == (tmp_path / "runs/folder/version_1/model").resolve()
    assert (tmp_path / "runs/folder/version_0/model/model.safetensors").is_file()

    assert main(["evaluate", "--model", str(link), "--data", data["val_path"], "--limit", "12", "--out", "report"]) == 0
    report = json.loads((tmp_path / "report/report.json").read_text())
    m = report["metrics"]
    for key in ("i2t_R@1", "t2i_R@10", "zero_shot_acc", "caption_bleu4", "caption_cider_d", "caption_rouge_l",
                "gen_fid_own", "gen_kid_own", "gen_fid_own_real_floor", "gen_fid_own_untrained_decoder",
                "gen_clip_score_own", "gen_class_acc", "gen_real_val_class_acc"):
        assert key in m, key
    assert report["classifier_training_data"] == data["path"]  # read from the model's record
    for name in ("report.md", "captions.png", "generated.png"):
        assert (tmp_path / "report" / name).is_file()
    assert main(["evaluate", "--model", str(link), "--data", data["val_path"], "--out", "report"]) == 2  # never overwritten
    assert "--overwrite" in capsys.readouterr().err


def test_classes_from_a_label_column_or_class_subfolders(tmp_path):
    from train.data import FoundationDataModule

    root = tmp_path / "flat"
    root.mkdir()
    rows = []
    for i in range(20):
        Image.new("RGB", (16, 16), (200 * (i % 2), 0, 0)).save(root / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"picture {i}", "label": ["red", "black"][i % 2]}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    dm = FoundationDataModule("folder", path=str(root), image_size=16, val_fraction=0.5)
    dm.setup("fit")
    assert dm.classes == ["black", "red"]
    labels = dm.train_labels()
    assert len(labels) == 10 and all(label == ["black", "red"].index(["red", "black"][int(p.stem) % 2])
                                     for label, (p, _) in zip(labels, dm.train_set.records))
    assert sorted(dm.val_set.labels) == sorted(["black", "red"].index(["red", "black"][int(p.stem) % 2]) for p, _ in dm.val_set.records)

    counts = write_digits(tmp_path / "digits", val_every=5)
    dm = FoundationDataModule("folder", path=str(tmp_path / "digits/train"), val_path=str(tmp_path / "digits/val"), image_size=16)
    dm.setup("fit")
    assert dm.classes == sorted(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    assert len(dm.train_labels()) == counts["train"] and min(dm.train_labels()) == 0
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_digits(tmp_path / "digits")


def test_generation_scores_on_two_or_three_images_skip_only_the_floor(tiny_model):
    import torch

    from train.evaluation import SplitInfo, ValidationData
    from train.report import generation_metrics

    n = 3
    data = ValidationData(torch.zeros(n, 32), torch.zeros(n, 32), torch.tensor([0, 1, 0]), torch.tensor([0, 1, 0]),
                          (torch.rand(n, 3, 32, 32) * 255).to(torch.uint8), SplitInfo(["a", "b"], None, ["a red circle", "a blue square"]))
    tiny_model.config.sampling.steps = 1
    metrics, fake, real = generation_metrics(tiny_model, data, baseline=False)
    assert "gen_fid_own" in metrics and not any("floor" in k for k in metrics) and fake.shape == real.shape == (3, 3, 32, 32)


def test_evaluate_on_images_without_captions_says_why(tmp_path, capsys):
    """A class folder without captions: evaluate names what it skipped and what each image needs."""
    from multimodal.cli import main
    from train.shapes import write_class_folder

    folder = write_class_folder(tmp_path / "classes", count=8)
    assert main(["evaluate", "--data", str(folder), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert "skipped: missing caption: 8" in err and "needs a caption" in err, err
