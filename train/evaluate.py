"""``multimodal evaluate --model DIR --data PATH [--out report/]``: every measurement of
``train.report`` on a saved model and any image-caption data, written as ``report.json``,
``report.md`` and PNGs."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from multimodal.folders import check_target, write_folder
from multimodal.model import FoundationModel

from .data import FoundationDataModule
from .evaluation import ValidationData
from .report import (FEATURES_NOTE, alignment_metrics, caption_metrics, class_reader, generation_metrics,
                     labeled_training_images, summary_for, top_captions, write_report)


@torch.no_grad()
def collect(model: FoundationModel, loader: Any, info: Any) -> ValidationData:
    """Features, labels, caption groups and pixels of a whole split (no Lightning needed)."""
    parts: dict[str, list[torch.Tensor]] = {"image": [], "text": [], "label": [], "group": [], "pixels": []}
    device, issues = model.pixel_mean.device, Counter()
    for batch in loader:
        issues.update(batch.pop("data_issues", None) or {})
        if not batch["image"].shape[0]:
            continue
        out = model({"image": batch["image"].to(device), "caption": batch["caption"]}, heads=("contrastive",))
        parts["image"].append(out["image_features"].float().cpu())
        parts["text"].append(out["text_features"].float().cpu())
        parts["label"].append(batch["label"])
        parts["group"].append(batch["group"])
        parts["pixels"].append((batch["image"].float() * 255).round().to(torch.uint8))
    if not parts["image"]:
        counts = ", ".join(f"{kind.replace('_', ' ')}: {n}" for kind, n in issues.items() if n) or "nothing found"
        raise ValueError(f"--data: no usable image-caption pair in the evaluation data (skipped: {counts}); every image "
                         "needs a caption (metadata.jsonl, metadata.csv or a .txt beside it)")
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return ValidationData(cat["image"], cat["text"], cat["label"], cat["group"], cat["pixels"], info)


def training_path(model: FoundationModel) -> str | None:
    """The folder the model's last run trained on (its record), for the pixel classifier."""
    record = model.config.training
    for run in reversed(record.runs if record else []):
        data = run.get("data")
        if isinstance(data, dict) and data.get("source") == "folder" and data.get("path"):
            return str(data["path"])
    return None


def run_evaluate(model_dir: str, data: str, out: str, train_data: str | None = None, inception: str | None = None,
                 limit: int | None = None, overwrite: bool = False, batch_size: int = 128) -> dict[str, float]:
    from multimodal import scores

    inputs = [x for x in (model_dir, data, train_data, inception) if x]
    out_dir = check_target(out, overwrite, "--out", inputs)  # before any work; replaced as a whole at the end
    if not Path(data).is_dir():
        raise FileNotFoundError(f"--data: no folder at {data} (an image folder with captions: metadata.jsonl, metadata.csv or .txt files)")
    if limit is not None and limit < 4:
        raise ValueError(f"--limit must be at least 4 (the real-vs-real floor needs two halves of two), got {limit}")
    started = time.time()
    model = FoundationModel.from_pretrained(model_dir)
    train_data = train_data or training_path(model)
    if train_data is not None and not Path(train_data).is_dir():
        print(f"the training folder {train_data} is not here: no pixel classifier (pass --train-data)")
        train_data = None
    dm = FoundationDataModule("folder", path=train_data or data, val_path=data, image_size=model.config.image.image_size,
                              batch_size=batch_size, val_batch_size=batch_size)
    dm.setup("validate")
    split = collect(model, dm.val_dataloader(), dm.split_info())
    n = len(split.groups)
    print(f"evaluating {model_dir} on {n} images of {data}" + (f" ({len(dm.classes)} classes)" if dm.classes else ""), flush=True)
    trained, skipped = summary_for(model)
    metrics = alignment_metrics(model, split)
    made: list[str] = []
    if "language" in trained and model.language is not None:
        caption, made = caption_metrics(model, split, limit)
        metrics.update(caption)
        print(f"captions done ({time.time() - started:.0f} s)", flush=True)
    fake = real = torch.empty(0)
    if "decoder" in trained and model.decoder is not None:
        reader = class_reader(*labeled_training_images(dm)) if train_data else None
        extra = {"inception": scores.InceptionFeatures(inception)} if inception else None
        gen, fake, real = generation_metrics(model, split, reader, extra, limit)
        metrics.update(gen)
        print(f"generation done ({time.time() - started:.0f} s)", flush=True)
    about = {
        "model": str(model_dir), "data": str(data), "images": n, "trained_components": trained, "skipped": skipped,
        "classifier_training_data": train_data, "seconds": round(time.time() - started, 1),
        "limit": limit, "images_captioned_and_generated": min(limit or n, n),
        "summary": (f"{n} validation images (retrieval, zero-shot); captions and generated images for "
                    f"{min(limit or n, n)} of them{' (--limit)' if limit else ''}; trained components: {', '.join(trained)}"
                    + (f"; skipped: {'; '.join(skipped)}" if skipped else "") + "."),
        "notes": {"features own": FEATURES_NOTE["own"], **({"features inception": FEATURES_NOTE["inception"]} if inception else {}),
                  "real_floor": "FID/KID between two random halves of the validation images: the best a generator can reach with this many images",
                  "untrained_decoder": "the same scores for a freshly initialized decoder (the baseline)",
                  "gen_class_acc": "class of generated images as read by a logistic regression on the real training pixels; real_val_class_acc: the same classifier on the real validation images"},
    }
    about["notes"] = {k: v for k, v in about["notes"].items()  # only for the metrics measured
                      if k.startswith("features own") and "gen_fid_own" in metrics or k == "features inception"
                      or any(k.split(" ")[0] in m for m in metrics)}
    if n < 10:
        about["notes"]["few images"] = f"only {n} validation images: every figure here is very noisy"
    files: list[Path] = []
    write_folder(out_dir, lambda folder: files.extend(write_report(folder, metrics, about, split, made, fake, real, top_captions(split))),
                 overwrite, "--out")
    print(format_table(metrics))
    print("wrote " + ", ".join(str(out_dir / Path(f).name) for f in files))
    return metrics


def format_table(metrics: dict[str, float]) -> str:
    return "\n".join(f"  {k:>34}: {v:.4f}" for k, v in metrics.items())
