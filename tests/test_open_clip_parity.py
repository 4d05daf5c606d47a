import open_clip
import pytest
import torch
from safetensors.torch import save_file

from encoders.open_clip_import import convert_open_clip_state_dict, encoder_config_from_open_clip
from multimodal import FoundationConfig, FoundationModel

from conftest import assert_same_computation

TINY = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
    text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2),
)


@pytest.fixture(scope="module")
def saved_open_clip(tmp_path_factory):
    torch.manual_seed(0)
    reference = open_clip.CLIP(**TINY).eval()
    with torch.no_grad():  # random-init open_clip leaves some weights at their trivial init; perturb all
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("oc") / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    return reference, path


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_embeddings_equal_open_clip(saved_open_clip, quick_gelu):
    reference, path = saved_open_clip
    cfg = {**TINY, "quick_gelu": quick_gelu}
    if quick_gelu:  # same saved weights, OpenAI's activation
        state = reference.state_dict()
        reference = open_clip.CLIP(**cfg).eval()
        reference.load_state_dict(state)
    model = FoundationModel.from_open_clip(cfg, pretrained=str(path)).eval()
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    texts = ["a red circle", "a small blue square at the top left", ""]
    images = torch.randn(3, 3, 32, 32)  # already normalized, as open_clip's encode_image expects
    with torch.no_grad():
        ours_i = model.encoders.encode_image(images, normalize=False)
        ours_t = model.encode_text(texts, normalize=False)
        ref_i = reference.encode_image(images)
        ref_t = reference.encode_text(tokenizer(texts))
    # open_clip's fused in-projection and attention vs ours: fp32 summation order only
    widths = max(TINY["vision_cfg"]["width"], TINY["text_cfg"]["width"])
    depth = max(TINY["vision_cfg"]["layers"], TINY["text_cfg"]["layers"]) + 1
    assert_same_computation(ours_i, ref_i, reduction=4 * widths, depth=depth)
    assert_same_computation(ours_t, ref_t, reduction=4 * widths, depth=depth)
    assert model.encoders.logit_scale.item() == pytest.approx(reference.logit_scale.item())
    assert model.config.text.activation == ("quick_gelu" if quick_gelu else "gelu")


def test_registered_model_name_builds_same_architecture():
    fields = encoder_config_from_open_clip(open_clip.get_model_config("ViT-B-32"))
    cfg = FoundationConfig.from_dict(fields)
    assert (cfg.image.width, cfg.image.layers, cfg.image.heads, cfg.image.patch_size) == (768, 12, 12, 32)
    assert (cfg.text.width, cfg.text.layers, cfg.text.context_length, cfg.embed_dim) == (512, 12, 77, 512)


def test_unsupported_open_clip_features_are_refused():
    with pytest.raises(ValueError, match="ResNet"):
        encoder_config_from_open_clip({"embed_dim": 32, "vision_cfg": {"layers": [1, 1, 1, 1]}})
    with pytest.raises(ValueError, match="attentional_pool"):
        encoder_config_from_open_clip({"embed_dim": 32, "vision_cfg": {"attentional_pool": True}})
    with pytest.raises(ValueError, match="unknown open_clip model name"):
        FoundationModel.from_open_clip("not-a-model")


def test_state_dict_conversion_covers_every_key(saved_open_clip):
    reference, _ = saved_open_clip
    converted = convert_open_clip_state_dict(reference.state_dict())
    ours = FoundationModel.from_open_clip(TINY).encoders.state_dict()
    assert set(converted) == set(ours)
    assert all(converted[k].shape == ours[k].shape for k in ours)


def test_fit_starts_from_an_open_clip_checkpoint(saved_open_clip, tmp_path, monkeypatch):
    """model.init_from: an open_clip checkpoint file (the preset's architecture) or
    open_clip:MODEL:FILE (open_clip's architecture); the encoders then embed exactly as open_clip,
    and what was not in the checkpoint is reported by name."""
    import json

    import train.init
    from train.module import FoundationModule

    said = []
    monkeypatch.setattr(train.init, "rank_zero_info", said.append)
    reference, path = saved_open_clip
    images, texts = torch.rand(2, 3, 32, 32), ["a red circle", "a blue square"]
    with torch.no_grad():
        want_image = reference.encode_image((images - 0.5) / 0.5, normalize=True)
        want_text = reference.encode_text(open_clip.get_tokenizer("ViT-B-32", context_length=16)(texts), normalize=True)
    (tmp_path / "tiny-test-clip.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(tmp_path / "tiny-test-clip.json")
    overrides = {"image": {"width": 64, "layers": 2, "heads": 2}, "text": {"layers": 2}}
    for init_from, kwargs in ((str(path), {"overrides": overrides}), (f"open_clip:tiny-test-clip:{path}", {})):
        module = FoundationModule(preset="tiny", init_from=init_from, stage="joint", **kwargs)
        model = module.model.eval()
        model.pixel_mean.fill_(0.5), model.pixel_std.fill_(0.5)
        with torch.no_grad():
            assert torch.allclose(model.encode_image(images), want_image, atol=1e-5)
            assert torch.allclose(model.encode_text(texts), want_text, atol=1e-5)
        assert module.init_report["missing"] and all(k.startswith(("decoder.", "language.")) for k in module.init_report["missing"])
        assert not module.init_report["mismatched"]
    assert any("missing (kept initial values): decoder." in line for line in said), said
    # the open_clip architecture is in the hyperparameters, so a checkpoint / export rebuilds it
    rebuilt = FoundationModule(preset="tiny", overrides=module.hparams["overrides"], stage="joint")
    rebuilt.load_state_dict(module.state_dict(), strict=True)
    # the preset's own (smaller) architecture: mismatched tensors named, not loaded
    module = FoundationModule(preset="tiny", init_from=str(path))
    assert "encoders.image.transformer.blocks.0.attn.qkv.weight" in module.init_report["mismatched"]
    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        FoundationModule(preset="tiny", init_from=str(tmp_path / "nothing"))
