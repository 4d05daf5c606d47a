import dataclasses

import pytest
import torch

from multimodal import FoundationConfig, FoundationModel

from conftest import assert_same_computation


def test_trim_padding_keeps_embeddings(tiny_model):
    texts = ["a red circle", "a small blue square at the top left"]
    trimmed = tiny_model.encode_text(texts)
    states, _ = tiny_model.encoders.text(tiny_model.tokenize(texts))
    tiny_model.encoders.text.config = dataclasses.replace(tiny_model.config.text, trim_padding=False)
    full = tiny_model.encode_text(texts)
    full_states, _ = tiny_model.encoders.text(tiny_model.tokenize(texts))
    # another sequence length may pick another kernel: equal up to fp32 summation order
    width, depth = tiny_model.config.text.width, tiny_model.config.text.layers + 1
    assert_same_computation(trimmed, full, reduction=4 * width, depth=depth)
    assert states.shape[1] < full_states.shape[1] == 16
    assert_same_computation(states, full_states[:, : states.shape[1]], reduction=4 * width, depth=depth)


def test_outputs_and_shapes(tiny_model):
    out = tiny_model.encoders(tiny_model.normalize_pixels(torch.rand(3, 3, 32, 32)), tiny_model.tokenize(["a", "b c", "d"]))
    assert out["image_features"].shape == out["text_features"].shape == (3, 32)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(3))
    assert out["image_states"].shape == (3, 1 + 16, 32)


def test_gradient_checkpointing_matches(tiny_model):
    images, tokens = torch.rand(2, 3, 32, 32), tiny_model.tokenize(["a red circle", "a blue square"])
    grads = []
    for flag in (False, True):
        tiny_model.train().zero_grad()
        tiny_model.encoders.set_grad_checkpointing(flag)
        out = tiny_model.encoders(tiny_model.normalize_pixels(images), tokens)
        (out["image_features"] @ out["text_features"].T).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in tiny_model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_save_and_load_pretrained(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m", model_card="# card\n")
    loaded = FoundationModel.from_pretrained(tmp_path / "m")
    texts = ["a green diamond"]
    torch.testing.assert_close(loaded.encode_text(texts), tiny_model.encode_text(texts))
    assert (tmp_path / "m" / "README.md").read_text() == "# card\n"


def test_from_pretrained_refuses_pickles(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle files are never loaded"):
        FoundationModel.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="pickle-based"):
        FoundationModel.from_pretrained(tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError):
        FoundationModel.from_pretrained(tmp_path / "nothing")


def test_unknown_config_keys_are_named():
    with pytest.raises(ValueError, match="in 'text': 'widht'"):
        FoundationConfig.from_preset("tiny", {"text": {"widht": 3}})
    with pytest.raises(ValueError, match="preset must be one of"):
        FoundationConfig.from_preset("huge")
