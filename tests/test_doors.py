"""One model, every door: the API, `multimodal generate` and the demo page use the model's
recommended sampling settings (config.json "sampling") and give the same image for the same
prompt and seed; an image gives the same pixels through the API as through training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from multimodal import FoundationConfig, FoundationModel, FoundationPipeline
from multimodal.cli import main
from train.samples import SampleReader

SAMPLING = {"scheduler": "dpm++", "steps": 3, "guidance_scale": 4.0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    FoundationModel(FoundationConfig.from_preset("tiny", {"sampling": SAMPLING})).save_pretrained(folder)
    return folder


def test_sampling_settings_are_stored_with_the_model(model_dir):
    assert json.loads((model_dir / "config.json").read_text())["sampling"] == SAMPLING
    assert FoundationPipeline.from_pretrained(model_dir).scheduler == "dpm++"
    with pytest.raises(ValueError, match="sampling.steps must be an integer in"):
        FoundationConfig.from_preset("tiny", {"sampling": {"steps": 0}})
    with pytest.raises(ValueError, match=r"sampling.steps must be below decoder.num_train_timesteps \(100\)"):
        FoundationConfig.from_preset("tiny", {"sampling": {"steps": 200}, "decoder": {"num_train_timesteps": 100}})
    with pytest.raises(ValueError, match="sampling.scheduler must be one of"):
        FoundationConfig.from_preset("tiny", {"sampling": {"scheduler": "plms"}})


def _pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_api_cli_and_demo_give_the_same_image(model_dir, tmp_path):
    pipe = FoundationPipeline.from_pretrained(model_dir)
    api = np.asarray(pipe("a red circle", generator=[torch.Generator().manual_seed(5)], show_progress=False).images[0])
    other = np.asarray(pipe("a red circle", generator=[torch.Generator().manual_seed(6)], show_progress=False).images[0])
    assert not np.array_equal(api, other)  # the seed matters, so equality below means something

    assert main(["generate", "a red circle", "--model", str(model_dir), "--seed", "5", "--out", str(tmp_path / "cli.png")]) == 0
    np.testing.assert_array_equal(_pixels(tmp_path / "cli.png"), api)

    gradio_client = pytest.importorskip("gradio_client")
    from multimodal.demo import launch

    app = launch(model_dir, port=None, prevent_thread_lock=True, quiet=True)
    try:
        client = gradio_client.Client(app.local_url, verbose=False)
        # only prompt, seed and count given: steps, guidance and scheduler are the page's defaults
        images, _ = client.predict(prompt="a red circle", seed=5, num_images=1, api_name="/generate")
    finally:
        app.close()
    shown = _pixels(images[0]["image"])  # enlarged 6x with nearest-neighbour for the page
    np.testing.assert_array_equal(shown[::6, ::6], api)


def _write(folder, name: str, img: Image.Image) -> str:
    path = folder / name
    img.save(path)
    return str(path)


def test_awkward_images_give_the_same_pixels_for_inference_and_training(model_dir, tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (40, 70), dtype=np.uint8)
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 3
    gray16 = (np.linspace(0, 65535, 50 * 30).reshape(50, 30)).astype(np.uint16)
    files = {
        "wide.png": Image.fromarray(rgb),  # non-square: shorter side resized, center crop
        "tall.jpg": Image.fromarray(rgb.transpose(1, 0, 2).copy()),
        "rgba.png": Image.fromarray(np.dstack([rgb, alpha]), "RGBA"),
        "la.png": Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA"),
        "palette.png": palette,
        "gray16.png": Image.fromarray(gray16),
    }
    pipe = FoundationPipeline.from_pretrained(model_dir)
    reader = SampleReader(image_size=32, max_pixels=10**7)
    for name, img in files.items():
        path = _write(tmp_path, name, img)
        train = reader(path, "a caption")["image"]  # [3, 32, 32], the training data path
        infer = pipe._pixels(path)[0]
        assert torch.equal(infer, train), name
        torch.testing.assert_close(pipe.embed_image(path)[0], pipe.embed_image(train[None])[0], rtol=0, atol=0)
    # transparent pixels are white, 16-bit values are scaled (mid-gray stays mid-gray, not white)
    clear = Image.fromarray(np.zeros((32, 32, 4), dtype=np.uint8), "RGBA")
    assert pipe._pixels(_write(tmp_path, "clear.png", clear)).min() == 1.0
    mid = Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16))
    value = pipe._pixels(_write(tmp_path, "mid16.png", mid)).mean().item()
    assert abs(value - 128 / 255) < 1 / 255
