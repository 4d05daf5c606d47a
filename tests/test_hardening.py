"""A hostile or careless user against training (issue 16, items 1, 2, 4, 6, 7): no code from a
URL, no file outside the data folder, no hang on pipes or empty shards, no run that "trains" on
nothing, no saved model replaced by an untrained one. Every refusal: exit code 2, one line,
nothing written."""

from __future__ import annotations

import http.server
import io
import json
import os
import pickle
import threading
from pathlib import Path

import pytest
from PIL import Image

from conftest import ALIGN, folder_config, image_folder, scaled_config, write_tar
from multimodal.cli import main
from train.data import FoundationDataModule
from train.data_checks import check_shards


class _Payload:
    """A pickle that writes a marker file when it is unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "the payload ran"))


@pytest.fixture
def server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving a malicious checkpoint; counts its requests."""
    marker = tmp_path / "PAYLOAD_RAN"
    body = pickle.dumps({"state_dict": _Payload(marker)})
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/x.ckpt", marker, hits
    httpd.shutdown()


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_a_checkpoint_url_is_refused_and_never_fetched(tmp_path, monkeypatch, capsys, server, command):
    url, marker, hits = server
    monkeypatch.chdir(tmp_path)
    config = scaled_config(tmp_path, ALIGN)
    before = set(os.listdir(tmp_path))
    assert main([command, "--config", str(config), "--ckpt_path", url]) == 2
    assert "local files only" in capsys.readouterr().err
    assert not marker.exists() and hits == []  # refused before any request: nothing was unpickled
    assert set(os.listdir(tmp_path)) == before


def _metadata_folder(root: Path, n: int, extra_rows: list[dict]) -> Path:
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (16, 16), (200, i * 10, 0)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"an orange square {i}"})
    lines = [json.dumps(r) if isinstance(r, dict) else r for r in rows + extra_rows]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.timeout(60)  # a FIFO that is opened blocks forever
def test_metadata_cannot_reach_outside_the_data_folder_or_hang_on_a_pipe(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "outside.png")
    root = tmp_path / "data"
    folder = _metadata_folder(root, 4, [
        {"file_name": "/etc/passwd", "text": "secret"}, {"file_name": "../outside.png", "text": "outside"},
        {"file_name": "sub/../../outside.png", "text": "outside"}, {"file_name": "pipe.png", "text": "a pipe"},
        {"file_name": "captioned_by_pipe.png"}, {"file_name": 7, "text": "a number"}, {"file_name": "a\x00.png", "text": "nul"},
    ])
    os.mkfifo(folder / "pipe.png")
    dm = FoundationDataModule(source="folder", path=str(folder), val_path=str(folder), image_size=16)
    dm.setup("fit")
    kinds = [dm.train_set[i].get("bad") for i in range(len(dm.train_set))]
    assert kinds == [None] * 4 + ["outside_data_folder"] * 3 + ["not_a_file", "missing_caption", "bad_metadata", "bad_metadata"]
    # a same-name .txt caption that is a pipe is skipped too, not read
    txt = image_folder(tmp_path / "txt", 2, captions=True)
    (txt / "1.txt").unlink()
    os.mkfifo(txt / "1.txt")
    dm = FoundationDataModule(source="folder", path=str(txt), val_path=str(txt), image_size=16)
    dm.setup("fit")
    assert [dm.train_set[i].get("bad") for i in range(2)] == [None, "not_a_file"]


def test_training_data_that_only_points_outside_is_refused_before_the_first_step(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (16, 16)).save(tmp_path / "outside.png")
    folder = _metadata_folder(tmp_path / "data", 0, [{"file_name": "../outside.png", "text": "x"}] * 40)
    config = folder_config(tmp_path, {"source": "folder", "path": str(folder), "val_path": str(folder)})
    assert main(["fit", "--config", str(config)]) == 2
    assert "40 metadata lines name a file outside the data folder" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()




@pytest.mark.timeout(120)
@pytest.mark.parametrize("case, message", [
    ("missing", "no tar shard at"), ("not a tar", "is not a tar file"), ("empty tar", "is an empty tar file"),
    ("resampled, one bad shard of two", "is not a tar file"), ("pattern with a missing shard", "one of the 3 shards"),
    ("resampled, no image members", "has no image member among its first 2"),
])
def test_shards_that_cannot_train_are_refused_instead_of_looping(tmp_path, monkeypatch, capsys, case, message):
    monkeypatch.chdir(tmp_path)
    png = io.BytesIO()
    Image.new("RGB", (16, 16)).save(png, format="PNG")
    good = write_tar(tmp_path / "good-0.tar", {"a.png": png.getvalue(), "a.txt": b"a black square"})
    path = {"missing": str(tmp_path / "nothing.tar"),
            "not a tar": str(Path(tmp_path / "notes.tar").write_text("hello") and tmp_path / "notes.tar"),
            "empty tar": str(write_tar(tmp_path / "empty.tar", {})),
            "resampled, one bad shard of two": f"{good}::{Path(tmp_path / 'bad.tar').write_bytes(b'x' * 600) and tmp_path / 'bad.tar'}",
            "pattern with a missing shard": str(tmp_path / "good-{0..2}.tar"),
            "resampled, no image members": str(write_tar(tmp_path / "json.tar", {"a.json": b"{}", "a.txt": b"x"}))}[case]
    data = {"source": "webdataset", "path": path, "val_path": str(good), "resampled": case.startswith("resampled"),
            "epoch_size": 64}
    config = folder_config(tmp_path, data)
    assert main(["fit", "--config", str(config)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ValueError, match=message):
        check_shards(path, "data.path")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("source", ["folder", "webdataset"])
def test_data_where_every_sample_is_bad_stops_without_an_export(tmp_path, monkeypatch, capsys, source):
    """Captions are there (so the early check passes) but no image can be read: the run stops at
    the end of the first epoch with the counts, exit 2, and the link to the earlier model stays."""
    monkeypatch.chdir(tmp_path)
    if source == "folder":
        folder = image_folder(tmp_path / "data", 40, captions=True)
        for png in folder.glob("*.png"):
            png.write_bytes(b"\x89PNG\r\n\x1a\n broken")
        data = {"source": "folder", "path": str(folder), "val_path": str(image_folder(tmp_path / "val", 8, True))}
    else:
        pairs = {f"{i}.{ext}": data for i in range(40) for ext, data in (("png", b"not an image"), ("txt", b"a caption"))}
        shard = write_tar(tmp_path / "bad.tar", pairs)
        png = io.BytesIO()
        Image.new("RGB", (16, 16)).save(png, format="PNG")
        val = write_tar(tmp_path / "val.tar", {"a.png": png.getvalue(), "a.txt": b"a black square"})
        data = {"source": "webdataset", "path": str(shard), "val_path": str(val)}
    config = folder_config(tmp_path, data)
    earlier = tmp_path / "earlier_model"
    earlier.mkdir()
    link = tmp_path / "runs" / "folder" / "model"  # export_to of the scaled config
    link.parent.mkdir(parents=True)
    link.symlink_to(earlier, target_is_directory=True)
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert __import__("re").search(r"no usable training sample in epoch 0 \(skipped: \d+ not_an_image\)", err), err
    assert link.resolve() == earlier.resolve()
    assert not list((tmp_path / "runs").rglob("model.safetensors"))


def test_resuming_from_last_with_nothing_to_resume_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = scaled_config(tmp_path, ALIGN)
    assert main(["fit", "--config", str(config), "--ckpt_path", "last"]) == 2
    assert "no last checkpoint to resume from" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("content, message", [
    (None, "not a Lightning checkpoint, or is truncated"),
    (b"not a zip", "not a Lightning checkpoint, or is truncated"),
])
def test_truncated_checkpoints_and_bad_trainer_values_are_one_line_errors(tmp_path, monkeypatch, capsys, content, message):
    monkeypatch.chdir(tmp_path)
    import torch

    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, ckpt)
    whole = ckpt.read_bytes()
    ckpt.write_bytes(whole[: len(whole) // 2] if content is None else content)
    config = scaled_config(tmp_path, ALIGN)
    assert main(["fit", "--config", str(config), "--ckpt_path", str(ckpt)]) == 2
    assert message in capsys.readouterr().err
    assert main(["fit", "--config", str(config), "--trainer.max_steps", "-5"]) == 2
    assert "`max_steps` must be a non-negative integer or -1" in capsys.readouterr().err
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_one_good_metadata_line_among_bad_ones_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """The red-team case: one usable line trained 0 steps and exported an untrained model."""
    monkeypatch.chdir(tmp_path)
    folder = _metadata_folder(tmp_path / "data", 1, [{"file_name": "/etc/passwd", "text": "x"}, "not json"])
    config = folder_config(tmp_path, {"source": "folder", "path": str(folder), "val_path": str(folder)})
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert ("1 training samples with captions (1 metadata lines could not be parsed: each must be a JSON object with file_name "
            "and text) (1 metadata lines name a file outside the data folder (absolute or with ..): refused), fewer than one batch") in err, err
    assert not (tmp_path / "runs").exists()


def test_a_pickled_checkpoint_or_weights_file_is_one_line_and_never_suggests_unpickling(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    import torch

    from encoders.open_clip_import import load_state_file

    marker = tmp_path / "PAYLOAD_RAN"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _Payload(marker)}, evil)
    config = scaled_config(tmp_path, ALIGN)
    assert main(["fit", "--config", str(config), "--ckpt_path", str(evil)]) == 2
    err = capsys.readouterr().err
    assert "holds objects other than tensors and plain values: refused" in err and "weights_only=False" not in err, err
    with pytest.raises(ValueError, match="holds objects other than tensors: refused"):
        load_state_file(evil)
    evil.write_bytes(evil.read_bytes()[:50])
    with pytest.raises(ValueError, match="nor a complete torch file"):
        load_state_file(evil)
    assert not marker.exists()


@pytest.mark.timeout(120)
def test_resampled_shards_that_never_read_stop_instead_of_retrying_forever(tmp_path):
    """Remote shards are not checked before training (an unreachable URL is retried forever by
    webdataset); a missing local file, read past the early check, fails the same way, fast."""
    from train.samples import SampleReader
    from train.sources import MAX_SHARD_ERRORS, WebDatasetSource

    source = WebDatasetSource(str(tmp_path / "gone.tar"), SampleReader(16, 10**6), resampled=True, shuffle=0,
                              seed=0, epoch_size=None, image_keys=("png",), text_keys=("txt",))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=f"{MAX_SHARD_ERRORS} shard reads failed in a row"):
        next(iter(source))
