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


def test_grad_checkpointing_covers_every_component():
    model = FoundationModel(FoundationConfig.from_preset("tiny", {"grad_checkpointing": True}))
    assert model.encoders.text.transformer.grad_checkpointing and model.encoders.image.transformer.grad_checkpointing
    assert model.language.transformer.grad_checkpointing and model.decoder.unet.is_gradient_checkpointing
    model.set_grad_checkpointing(False)
    assert not model.language.transformer.grad_checkpointing and not model.decoder.unet.is_gradient_checkpointing


def test_configs_check_themselves_and_name_unknown_keys():
    with pytest.raises(ValueError, match="image.image_size .* multiple of image.patch_size"):
        FoundationConfig.from_preset("tiny", {"image": {"patch_size": 5}})
    with pytest.raises(ValueError, match="decoder.cfg_dropout must be in"):
        FoundationConfig.from_preset("tiny", {"decoder": {"cfg_dropout": 1.5}})
    with pytest.raises(ValueError, match="unknown config key.*'widht'"):
        FoundationConfig.from_preset("tiny", {"text": {"widht": 8}})


def test_from_open_clip_parses_nested_overrides():
    import open_clip

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32},
           "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1}}
    assert open_clip.CLIP(**cfg) is not None
    model = FoundationModel.from_open_clip(cfg, text={"trim_padding": False}, language={"layers": 1, "heads": 2})
    assert model.config.text.trim_padding is False and model.config.text.width == 32 and model.language is not None
    with pytest.raises(ValueError, match="unknown config key.*'nonsense'"):
        FoundationModel.from_open_clip(cfg, text={"nonsense": 1})


def test_from_pretrained_puts_the_whole_model_on_map_location(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    model = FoundationModel.from_pretrained(tmp_path / "m", map_location="meta")  # any device: meta needs no hardware
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.pixel_mean.device.type == "meta"
