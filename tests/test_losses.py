"""The losses, the model's forward and one training step, called directly on a tiny model and a
hand-made batch (no Trainer, no data module)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from multimodal import FoundationConfig, FoundationModel
from multimodal.losses import FoundationLoss, caption_loss, contrastive_loss, denoising_loss, token_log_likelihood
from train.module import FoundationModule
from train.optim import no_weight_decay

CAPTIONS = ["a red circle", "a small blue square at the top left", "a green triangle", "a large yellow diamond"]


def _batch(n: int = 4) -> dict:
    return {"image": torch.rand(n, 3, 32, 32), "caption": CAPTIONS[:n]}


def test_contrastive_loss_is_clip_symmetric_cross_entropy():
    image, text = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * image @ text.T
    want = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
    got = contrastive_loss({"image_features": image, "text_features": text, "logit_scale": scale})
    torch.testing.assert_close(got, want)
    # matching pairs give a lower loss than shuffled ones
    assert contrastive_loss({"image_features": text, "text_features": text, "logit_scale": scale}) < got


def test_caption_loss_and_token_log_likelihood_agree():
    logits = torch.randn(2, 3, 7)  # [B, L-1, V]
    tokens = torch.tensor([[1, 4, 2, 0], [1, 5, 6, 3]])  # 0 is padding
    ll = token_log_likelihood(logits, tokens)
    logp = logits.log_softmax(-1)
    assert ll[0].item() == pytest.approx((logp[0, 0, 4] + logp[0, 1, 2]).item())
    assert ll[1].item() == pytest.approx((logp[1, 0, 5] + logp[1, 1, 6] + logp[1, 2, 3]).item())
    real = tokens[:, 1:] != 0
    ce = caption_loss({"caption_logits": logits[real], "caption_targets": tokens[:, 1:][real]})
    assert ce.item() == pytest.approx(-(ll.sum() / real.sum()).item())


def test_denoising_loss_weights_each_sample():
    pred, target = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    target[1] *= 2
    out = {"denoise_pred": pred, "denoise_target": target, "denoise_weight": torch.tensor([1.0, 0.5])}
    assert denoising_loss(out).item() == pytest.approx((1 * 1 + 0.5 * 4) / 2)


def test_forward_returns_what_every_loss_needs(tiny_model):
    out = tiny_model(_batch(), heads=("contrastive", "caption", "diffusion"), denoise_batch=3)
    assert out["image_features"].shape == out["text_features"].shape == (4, 32)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(4))
    n_real = sum(len(tiny_model.tokenizer._bpe.encode(c)) + 1 for c in CAPTIONS)  # the words and end-of-text
    assert out["caption_logits"].shape == (n_real, 49408) and out["caption_targets"].shape == (n_real,)
    assert out["denoise_pred"].shape == out["denoise_target"].shape == (3, 3, 32, 32)
    assert out["denoise_weight"].shape == (3,)
    losses = FoundationLoss({"contrastive": 1.0, "caption": 2.0, "diffusion": 0.5})(out)
    total = losses["contrastive"] + 2 * losses["caption"] + 0.5 * losses["diffusion"]
    torch.testing.assert_close(losses["loss"], total)
    assert math.isfinite(losses["loss"].item())
    with pytest.raises(ValueError, match="heads must be among"):
        tiny_model(_batch(), heads=("nonsense",))


def test_cfg_dropout_belongs_to_the_model_conditioning(tiny_model):
    states, pooled = tiny_model.encoders.text(tiny_model.tokenize(CAPTIONS), trim=False)
    empty = tiny_model.text_condition([""])
    all_dropped = tiny_model.condition(states, pooled, drop_prob=0.999999)
    assert torch.equal(all_dropped.states, empty.states.expand_as(states))
    kept = tiny_model.condition(states, pooled, drop_prob=0.0)
    assert torch.equal(kept.states, states)


def _module(stage: str) -> FoundationModule:
    torch.manual_seed(0)
    return FoundationModule(preset="tiny", stage=stage)


@pytest.mark.parametrize("stage, trained, frozen", [
    ("align", {"encoders.text", "encoders.image", "encoders.logit_scale"}, {"decoder", "language"}),
    ("decoder", {"decoder"}, {"encoders.text", "encoders.image", "language"}),
    ("language", {"encoders.text", "encoders.image", "language"}, {"decoder"}),
    ("joint", {"encoders.text", "encoders.image", "decoder", "language"}, set()),
])
def test_training_step_directly(stage, trained, frozen):
    module = _module(stage)
    with warnings.catch_warnings():  # self.log without a Trainer warns and does nothing
        warnings.simplefilter("ignore")
        loss = module.training_step(_batch(), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = {n for n, p in module.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    for part in trained:
        assert any(n.startswith(part) for n in grads), (stage, part)
    for part in frozen:
        assert not any(n.startswith(part) for n in grads), (stage, part)


def test_training_step_sums_the_stage_losses():
    module = _module("joint")
    batch = _batch()
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = module.training_step(dict(batch), 0)
    torch.manual_seed(1)
    terms = FoundationLoss(module.stage.loss_weights)(module.model(batch, heads=module.loss.heads))
    torch.testing.assert_close(loss, terms["loss"])


def test_no_weight_decay_is_by_kind_not_by_substring():
    names = no_weight_decay(FoundationModel(FoundationConfig.from_preset("tiny")))
    assert "encoders.text.token_embedding.weight" in names and "encoders.text.positional_embedding" in names
    assert "encoders.logit_scale" in names and "encoders.image.class_embedding" in names
    assert "encoders.text.transformer.blocks.0.ln_1.weight" in names  # norms and biases (1-D)
    # Linear weights inside the UNet's time / class embeddings are ordinary weights
    assert "decoder.unet.time_embedding.linear_1.weight" not in names
    assert "decoder.unet.class_embedding.linear_1.weight" not in names
    assert "encoders.text.transformer.blocks.0.attn.qkv.weight" not in names
