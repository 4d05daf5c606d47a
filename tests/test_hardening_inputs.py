"""A hostile or careless user against the API and the commands (issue 16, items 3, 5, 6 and the
traceback cases): one input layer for images, one for model folders, one for generation
arguments; every bad input is a clear error naming the argument (exit code 2 for the CLI),
checked before any work, and no output is NaN."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multimodal import FoundationConfig, FoundationModel, FoundationPipeline
from multimodal.cli import main
from multimodal.preprocess import ImageError, open_image, preprocess
from train.samples import load_image

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "models" / "shapes"
EXAMPLE = Path(__file__).resolve().parents[1] / "assets" / "demo" / "small_red_circle.png"


def huge_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of width x height (all black): a few kB on disk, width * height pixels decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\x00" * (1 + (width + 7) // 8)
    compressor, rows = zlib.compressobj(9), []
    for _ in range(height):
        rows.append(compressor.compress(row))
    data = b"".join(rows) + compressor.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    whole = EXAMPLE.read_bytes()
    (root / "empty.png").write_bytes(b"")
    (root / "truncated.png").write_bytes(whole[:100])
    (root / "text.png").write_text("not an image at all")
    huge_png(root / "bomb.png", 13000, 13000)
    (root / "postscript.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")  # would run Ghostscript
    return {p.stem: p for p in root.iterdir()}


@pytest.fixture(scope="module")
def pipe():
    return FoundationPipeline.from_pretrained(SHIPPED)


def test_a_huge_image_is_refused_from_its_header_before_any_pixel_is_decoded(bad_images, monkeypatch):
    path = bad_images["bomb"]
    assert path.stat().st_size < 2_000_000  # passes an upload size limit
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
    with pytest.raises(ImageError, match=r"13000x13000 = 169000000 pixels, more than the 64000000 allowed \(refused before decoding\)"):
        open_image(path)
    with pytest.raises(ImageError, match="refused before decoding") as refused:
        open_image(path, max_pixels=4096 * 4096)
    assert refused.value.kind == "too_many_pixels"


@pytest.mark.parametrize("name, kind, message", [
    ("empty", "not_an_image", "is not an image file"), ("text", "not_an_image", "is not an image file"),
    ("postscript", "not_an_image", "is not an image file in a supported format"),
    ("truncated", "unreadable_image", "damaged or truncated"), ("bomb", "too_many_pixels", "refused before decoding"),
])
def test_bad_image_files_are_one_line_errors_everywhere(bad_images, pipe, capsys, tmp_path, name, kind, message):
    path = str(bad_images[name])
    with pytest.raises(ImageError, match=message) as err:  # the API
        pipe.embed_image(path)
    assert err.value.kind == kind
    from train.samples import BadSample

    with pytest.raises(BadSample) as bad:  # training counts it
        load_image(path, 32, 64_000_000)
    assert bad.value.kind == kind
    assert main(["classify", path, "--labels", "red circle, blue square"]) == 2
    err_text = capsys.readouterr().err
    assert message in err_text and "Traceback" not in err_text
    if name != "truncated":  # the other commands read images through the same layer: one case is enough
        return
    assert main(["caption", path]) == 2
    assert message in capsys.readouterr().err
    folder = tmp_path / "classes"
    for cls in ("red", "blue"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            (folder / cls / f"{i}.png").write_bytes(EXAMPLE.read_bytes())
    (folder / "red" / f"bad{Path(path).suffix}").write_bytes(Path(path).read_bytes())
    assert main(["probe", "--data", str(folder), "--shots", "1"]) == 2
    assert message in capsys.readouterr().err
    assert main(["classify", str(EXAMPLE), "--support", str(folder)]) == 2
    assert message in capsys.readouterr().err


def test_sixteen_bit_grayscale_is_scaled_not_clipped_in_training_and_inference(tmp_path, pipe):
    path = tmp_path / "gray16.png"
    Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    pixels, converted = load_image(str(path), 32, 64_000_000)
    assert converted and torch.allclose(pixels, torch.full_like(pixels, 128 / 255))  # mid-gray, not white
    assert torch.equal(pipe._pixels(str(path))[0], pixels)  # inference reads it the same way
    assert torch.allclose(preprocess(Image.fromarray(np.full((4, 4), 0.5, np.float32)), 4), torch.tensor(128 / 255))


@pytest.mark.parametrize("flags, message", [
    (["--guidance", "nan"], r"--guidance must be a number in \[0, 100\], got nan"),  # the pipeline's words, as options
    (["--steps", "10000"], r"--steps must be an integer in \[1, 999\]"),
    (["--num-images", "65"], r"--num-images must be in \[1, 64\]"),
    (["--out", "{tmp}"], "is a folder; give a file name"),
    (["--out", "{tmp}/x.txt"], "must end in an image suffix"),
    (["--out", "/proc/no/x.png"], "cannot write"),
    (["--out", "{tmp}/exists.png"], "exists; pass --overwrite"),
    (["--out", "{tmp}/fifo.png", "--overwrite"], "exists and is not a regular file"),
])
def test_generation_arguments_are_refused_before_sampling(tmp_path, capsys, monkeypatch, flags, message):
    import multimodal.pipeline

    monkeypatch.setattr(multimodal.pipeline, "sample", lambda *a, **k: pytest.fail("sampled before refusing"))
    (tmp_path / "exists.png").write_bytes(b"the user's picture")
    __import__("os").mkfifo(tmp_path / "fifo.png")
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    assert main(["generate", "a red circle", *flags]) == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err), err
    assert (tmp_path / "exists.png").read_bytes() == b"the user's picture"


@pytest.mark.parametrize("scheduler", ["dpm++", "unipc", "ddim"])
def test_the_most_steps_allowed_give_finite_images(scheduler):
    """Multistep solvers give NaN at steps == the schedule's length: the bound is one below it."""
    model = FoundationModel(FoundationConfig.from_preset("tiny", {"decoder": {"num_train_timesteps": 20}, "sampling": {"steps": 2}}))
    pipe = FoundationPipeline(model)
    out = pipe("a red circle", num_inference_steps=19, scheduler=scheduler, output_type="pt", show_progress=False)
    assert torch.isfinite(out.images).all()
    with pytest.raises(ValueError, match=r"num_inference_steps must be an integer in \[1, 19\]"):
        pipe("a red circle", num_inference_steps=20, scheduler=scheduler, show_progress=False)


@pytest.mark.parametrize("call, message", [
    (lambda p: p(123), "prompt must be a non-empty string or list of strings"),
    (lambda p: p("x", guidance_scale=float("inf")), r"guidance_scale must be a number in \[0, 100\], got inf"),
    (lambda p: p("x", guidance_scale=1e30), r"guidance_scale must be a number in \[0, 100\], got 1e\+30"),
    (lambda p: p("x", num_inference_steps=1000), r"num_inference_steps must be an integer in \[1, 999\]"),
    (lambda p: p("x", num_inference_steps=2.5), "num_inference_steps must be an integer"),
    (lambda p: p("x", generator=5), "generator must be a torch.Generator"),
    (lambda p: p("x", num_images_per_prompt=65), r"num_images_per_prompt must be an integer in \[1, 64\]"),
    (lambda p: p(["x"] * 100, num_images_per_prompt=3), "at most 256 images per call"),
    (lambda p: p.classify(EXAMPLE, ["a", "b"], templates=["{x}"]), "templates must be a non-empty list of strings"),
    (lambda p: p.classify(EXAMPLE, ["a", "b"], templates=["a {} {x}"]), "no other braces"),
    (lambda p: p.classify(EXAMPLE, "red circle, blue square"), "labels must be a non-empty list of strings"),
    (lambda p: p.caption(EXAMPLE, num_beams=100000), r"num_beams must be in \[1, 16\]"),
    (lambda p: p.caption(EXAMPLE, num_beams="3"), "num_beams must be an integer"),
    (lambda p: p.caption(EXAMPLE, beams=3), "unknown option"),
    (lambda p: p.retrieve("x", [EXAMPLE], top_k=1.5), "top_k must be an integer"),
    (lambda p: p.embed_image([torch.zeros(3, 0, 5)]), r"an array image must be \[H, W, 3\]"),
])
def test_api_arguments_are_named_in_their_errors(pipe, call, message):
    with pytest.raises(ValueError, match=message):
        call(pipe)


def test_commands_check_their_numbers_first(capsys, tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "dir.png").mkdir()
    for path in ("pipe.png", "dir.png"):
        assert main(["classify", str(tmp_path / path), "--labels", "a, b"]) == 2
        assert "is not a regular file (a folder, pipe or device)" in capsys.readouterr().err
    assert main(["demo", "--port", "99999"]) == 2
    assert "--port must be in [1, 65535], got 99999" in capsys.readouterr().err
    assert main(["classify", str(EXAMPLE), "--labels", "a, b", "--top", "-1"]) == 2
    assert "--top must be at least 1, got -1" in capsys.readouterr().err
    assert main(["caption", str(EXAMPLE), "--num-beams", "100000"]) == 2
    assert "--num-beams must be in [1, 16], got 100000" in capsys.readouterr().err


@pytest.fixture
def model_copy(tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(SHIPPED, tmp_path / "model"))


def _edit_config(folder: Path, **text_fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["text"].update(text_fields)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]), "not a readable safetensors file"),
    (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 16), "not a readable safetensors file"),
    (lambda f: _corrupt_floats(f / "model.safetensors"), "holds NaN/inf values"),
    (lambda f: _edit_config(f, width="128"), "config.json: config.text.width must be an integer, got '128'"),
    (lambda f: _edit_config(f, width=2.5), "config.text.width must be an integer, got 2.5"),
    (lambda f: _edit_config(f, heads=0), r"text.heads must be in \[1, 16384\], got 0"),
    (lambda f: _edit_config(f, context_length=1e9), "config.text.context_length must be an integer"),
    (lambda f: _edit_config(f, context_length=10**9), r"text.context_length must be in \[3, 4096\], got 1000000000"),
    (lambda f: (f / "config.json").write_text("{"), "not a readable JSON file"),
])
def test_damaged_model_folders_are_one_line_errors(model_copy, capsys, damage, message):
    damage(model_copy)
    with pytest.raises(ValueError, match=message):
        FoundationModel.from_pretrained(model_copy)
    assert main(["classify", str(EXAMPLE), "--labels", "a, b", "--model", str(model_copy)]) == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err) and "Traceback" not in err


def _corrupt_floats(path: Path) -> None:
    """Overwrite bytes in the middle of the tensor data (the header stays intact) with 0xFF:
    float32 NaNs, as a damaged disk or a bad copy would leave."""
    data = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    middle = (start + len(data)) // 2 // 4 * 4
    data[middle:middle + 4096] = b"\xff" * 4096
    path.write_bytes(bytes(data))


def test_outputs_are_checked_for_nan_before_they_are_returned(tiny_model):
    pipe = FoundationPipeline(tiny_model)
    with torch.no_grad():
        tiny_model.encoders.logit_scale.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="class probabilities came out NaN/inf"):
        pipe.classify(torch.rand(1, 3, 32, 32), ["a", "b"])
    with torch.no_grad():
        next(tiny_model.encoders.text.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="text embeddings came out NaN/inf"):
        pipe.embed_text("a red circle")
