"""Real-data sources (folder: jsonl / csv / txt, webdataset, hf): bad samples are skipped and
counted, fixable ones converted, every good sample is used exactly once per epoch."""

from __future__ import annotations

import csv
import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from multimodal.cli import main
from train.data import FIXED, SKIPPED, FoundationDataModule, collate
from train.shapes import generate

from conftest import ALIGN, scaled_config, write_tar

MAX_PIXELS = 128 * 128


class SeenCaptions(Callback):
    """Records every caption the training steps receive (the test's view of "used")."""

    seen: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        SeenCaptions.seen.extend(batch["caption"])


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def planted_samples() -> tuple[list[tuple[str, bytes | None, bytes | None]], set[str], dict[str, int]]:
    """(name, image bytes, caption bytes) with one of each bad kind; the good captions; the
    counts the report must give."""
    good, samples = set(), []

    def shape(i: int) -> Image.Image:
        return generate(0, "train", i)[0]

    for i in range(9):  # plain RGB samples
        caption = f"good {i} {generate(0, 'train', i)[1]}"
        samples.append((f"good{i}", _png(shape(i)), caption.encode()))
        good.add(caption)
    converted = {
        "cmyk": _png(shape(20).convert("CMYK"), "JPEG"),
        "palette": _png(shape(21).convert("P", palette=Image.ADAPTIVE)),
        "gray": _png(shape(22).convert("L")),
        "alpha": _png(shape(23).convert("RGBA")),
    }
    for name, data in converted.items():
        samples.append((name, data, f"converted {name}".encode()))
        good.add(f"converted {name}")
    long_caption = " ".join(["a very long caption"] * 10)  # far over the tiny preset's 16-token context
    samples.append(("long", _png(shape(24)), long_caption.encode()))
    good.add(long_caption)
    jpeg = _png(shape(25), "JPEG")
    bomb = Image.new("1", (12_000, 12_000))  # 144 Mpx in a few kB of PNG
    samples += [
        ("truncated", jpeg[: len(jpeg) // 2], b"a truncated file"),
        ("notimage", b"this is text, not a PNG", b"a text file named png"),
        ("bomb", _png(bomb), b"a decompression bomb"),
        ("empty", _png(shape(26)), b"   "),
        ("latin1", _png(shape(27)), "caf\u00e9 cr\u00e8me".encode("latin-1")),
    ]
    counts = {
        "used": len(good), "converted_mode": 4, "truncated_caption": 1, "unreadable_image": 1,
        "not_an_image": 1, "too_many_pixels": 1, "empty_caption": 1, "caption_not_utf8": 1,
    }
    return samples, good, counts


def clean_folder(root: Path, n: int = 8) -> Path:
    root.mkdir(parents=True)
    with (root / "metadata.jsonl").open("w") as f:
        for i in range(n):
            img, caption, _ = generate(0, "val", i)
            img.save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": caption}) + "\n")
    return root


def _fit(tmp_path: Path, **data) -> dict[str, float]:
    """Train one epoch of the tiny align config on ``data``; the run's final data report."""
    SeenCaptions.seen = []
    cfg = scaled_config(tmp_path, ALIGN, max_steps=-1, max_epochs=1, val_check_interval=None, check_val_every_n_epoch=1)
    args = ["fit", "--config", str(cfg), "--trainer.callbacks+=test_data.SeenCaptions"]
    for key, value in {"batch_size": 4, "val_batch_size": 8, "max_pixels": MAX_PIXELS, **data}.items():
        args += [f"--data.{key}", str(value)]
    assert main(args) == 0
    rows = list(csv.DictReader((tmp_path / "runs/align/version_0/metrics.csv").open()))
    last = [r for r in rows if r.get("data/used")][-1]
    return {k.removeprefix("data/"): float(v) for k, v in last.items() if k.startswith("data/") and v}


def _check(report: dict[str, float], good: set[str], counts: dict[str, int], caplog) -> None:
    assert sorted(SeenCaptions.seen) == sorted(good)  # every good sample, once
    assert {k: int(v) for k, v in report.items() if v} == counts
    # printed through Lightning's console logger (captured here by pytest's log capture)
    skipped = ", ".join(f"{counts[k]} {k}" for k in SKIPPED if k in counts)
    fixed = ", ".join(f"{counts[k]} {k}" for k in FIXED if k in counts)
    assert f"data, epoch 0: {counts['used']} samples used; skipped: {skipped}; fixed: {fixed}" in caplog.text


def test_folder_source_skips_and_counts_bad_samples(tmp_path, caplog):
    samples, good, counts = planted_samples()
    root = tmp_path / "data"
    root.mkdir()
    lines = []
    for name, image, caption in samples:
        ext = "jpg" if name in ("cmyk", "truncated") else "png"
        (root / f"{name}.{ext}").write_bytes(image)
        # JSON-escape everything but the latin-1 caption, whose raw bytes go into the file as they are
        text = caption.decode("utf-8", errors="surrogateescape")
        lines.append(json.dumps({"file_name": f"{name}.{ext}", "text": text}, ensure_ascii=False)
                     .encode("utf-8", errors="surrogateescape"))
    lines.append(b'{"file_name": "gone.png", "text": "a missing file"}')
    lines.append(b'{"file_name": "broken.png", "text": ')  # a cut-off metadata line
    # 19 + 2 records -> pad with 3 good ones so that batches of 4 (drop_last) use every record
    for i in (40, 41, 42):
        img, caption, _ = generate(0, "train", i)
        img.save(root / f"pad{i}.png")
        lines.append(json.dumps({"file_name": f"pad{i}.png", "text": f"pad {caption}"}).encode())
        good.add(f"pad {caption}")
    (root / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    counts = {**counts, "used": len(good), "missing_image": 1, "bad_metadata": 1}
    report = _fit(tmp_path, source="folder", path=root, val_path=clean_folder(tmp_path / "val"))
    _check(report, good, counts, caplog)




def test_webdataset_source_skips_counts_and_never_unpickles(tmp_path, caplog):
    samples, good, counts = planted_samples()
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (Path.touch, (marker,))

    members: list[dict[str, bytes]] = [{}, {}]
    for i, (name, image, caption) in enumerate(samples):
        ext = "jpg" if name in ("cmyk", "truncated") else "png"
        members[i % 2][f"{name}.{ext}"] = image
        members[i % 2][f"{name}.txt"] = caption
    members[0]["nocaption.png"] = _png(generate(0, "train", 30)[0])  # image without a text member
    members[0]["good0.pth"] = pickle.dumps(Trap())  # a pickle beside a good sample: never read
    members[1]["onlypickle.pyd"] = pickle.dumps(Trap())
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, m in enumerate(members):
        write_tar(shards / f"train-{i:03d}.tar", m)
    val = {}
    for i in range(8):
        img, caption, _ = generate(0, "val", i)
        val[f"v{i}.png"], val[f"v{i}.txt"] = _png(img), caption.encode()
    write_tar(shards / "val-000.tar", val)
    counts = {**counts, "missing_caption": 1}
    report = _fit(tmp_path, source="webdataset", path=f"{shards}/train-{{000..001}}.tar",
                  val_path=shards / "val-000.tar", num_workers=2, shuffle_buffer=0)
    _check(report, good, counts, caplog)
    assert not marker.exists()


def test_folder_csv_and_txt_captions(tmp_path):
    for kind in ("csv", "txt"):
        root = tmp_path / kind
        root.mkdir()
        rows = []
        for i in range(4):
            img, caption, _ = generate(0, "train", i)
            img.save(root / f"{i}.png")
            rows.append((f"{i}.png", caption))
            if kind == "txt":
                (root / f"{i}.txt").write_text(caption)
        if kind == "csv":
            with (root / "metadata.csv").open("w", newline="") as f:
                csv.writer(f).writerows([("file_name", "text"), *rows])
        else:
            (root / "3.txt").write_bytes(b"\xff\xfe not utf-8")
            generate(0, "train", 9)[0].save(root / "nocaption.png")
        dm = FoundationDataModule(source="folder", path=str(root), val_path=str(root), batch_size=8)
        dm.setup()
        batch = collate([dm.train_set[i] for i in range(len(dm.train_set))])
        if kind == "csv":
            assert batch["caption"] == [c for _, c in rows] and batch["data_issues"] == {}
        else:
            assert batch["caption"] == [c for _, c in rows[:3]]
            assert batch["data_issues"] == {"caption_not_utf8": 1, "missing_caption": 1}
        assert batch["image"].shape == (len(batch["caption"]), 3, 32, 32)


def test_hf_source_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    images, texts = [], []
    for i in range(6):
        img, caption, _ = generate(0, "train", i)
        images.append({"bytes": _png(img), "path": None})
        texts.append(caption)
    images.append({"bytes": b"not an image", "path": None})
    texts.append("a bad one")
    ds = datasets.Dataset.from_dict({"picture": images, "caption": texts}).cast_column("picture", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    dm = FoundationDataModule(source="hf", path=str(tmp_path / "hf"), image_column="picture", caption_column="caption",
                              val_fraction=0.3, batch_size=4)
    dm.setup()
    items = [dm.train_set[i] for i in range(len(dm.train_set))] + [dm.val_set[i] for i in range(len(dm.val_set))]
    batch = collate(items)
    assert sorted(batch["caption"]) == sorted(texts[:6]) and batch["data_issues"] == {"not_an_image": 1}
    assert torch.allclose(batch["image"][0], collate([dm.train_set[0]])["image"][0])
    with pytest.raises(ValueError, match="data.caption_column 'text'"):
        FoundationDataModule(source="hf", path=str(tmp_path / "hf"), image_column="picture").setup()


def test_fit_without_a_validation_split_still_exports(tmp_path, capsys):
    """webdataset without data.val_path: training runs with validation off, the end of fit says
    that nothing was measured and still exports the model (its card says: not measured)."""
    members = {}
    for i in range(16):
        img, caption, _ = generate(0, "train", i)
        members[f"s{i:02d}.png"], members[f"s{i:02d}.txt"] = _png(img), caption.encode()
    write_tar(tmp_path / "train-000.tar", members)
    cfg = scaled_config(tmp_path, ALIGN, max_steps=2, limit_val_batches=0)
    assert main(["fit", "--config", str(cfg), "--data.source", "webdataset", "--data.path", str(tmp_path / "train-000.tar"),
                 "--data.batch_size", "8", "--data.shuffle_buffer", "0"]) == 0
    assert "nothing measured" in capsys.readouterr().out
    assert "Not measured yet" in (tmp_path / "runs/align/version_0/model/README.md").read_text()
