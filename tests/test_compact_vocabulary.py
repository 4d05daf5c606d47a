"""``language.vocabulary: compact``: the caption softmax over the training captions' token ids
only (a few dozen of 49,408 for shapes), generation and scoring restricted to them, the token
embedding (and so the tokenizer, the export and open_clip interop) unchanged."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from multimodal import FoundationConfig, FoundationModel, FoundationPipeline
from multimodal.model import OUTSIDE_VOCABULARY_LOGIT
from train.module import FoundationModule

CAPTIONS = ["a red circle", "a small blue square at the top left", "a green triangle", "a large yellow diamond"]
COMPACT = {"language": {"vocabulary": "compact"}}


def _models():
    """The same random weights with a full and with a compact vocabulary."""
    full = FoundationModel(FoundationConfig.from_preset("tiny"))
    compact = FoundationModel(FoundationConfig.from_preset("tiny", COMPACT))
    compact.load_state_dict(full.state_dict())
    return full, compact


def test_compact_caption_loss_is_the_softmax_over_the_vocabulary_ids():
    full, compact = _models()
    tokens = full.tokenize(CAPTIONS)
    vocab = torch.cat([tokens.flatten(), torch.tensor([7, 4000])]).unique()  # the batch's ids and two more
    states, _ = full.encoders.text(tokens)
    images = full.encoders.image(full.normalize_pixels(torch.rand(4, 3, 32, 32)))[0]
    torch.manual_seed(3)  # the same captions read without their image in both
    logits_full, targets_full = full.caption_logits(states, tokens[:, : states.shape[1]], images)
    torch.manual_seed(3)
    logits, targets = compact.caption_logits(states, tokens[:, : states.shape[1]], images, vocab)
    assert logits.shape == (len(targets_full), len(vocab))
    assert torch.equal(vocab[targets], targets_full)  # the targets index the vocabulary
    torch.testing.assert_close(logits, logits_full[:, vocab])  # the same logits, restricted
    by_hand = -(logits_full[:, vocab].log_softmax(-1).gather(1, targets[:, None])).mean()
    torch.testing.assert_close(F.cross_entropy(logits, targets), by_hand)
    F.cross_entropy(logits, targets).backward()
    grad = compact.encoders.text.token_embedding.weight.grad  # [V, W]
    outside = torch.ones(grad.shape[0], dtype=torch.bool)
    outside[vocab] = False
    assert grad[vocab].abs().sum() > 0 and grad[outside].abs().sum() == 0  # ids outside are not trained


def test_compact_vocabulary_must_hold_every_caption_token():
    _, compact = _models()
    tokens = compact.tokenize(CAPTIONS)
    states, _ = compact.encoders.text(tokens)
    images = compact.encoders.image(compact.normalize_pixels(torch.rand(4, 3, 32, 32)))[0]
    ids = tokens.flatten().unique()
    for bad in (ids[:-1], torch.cat([ids, ids]).sort().values, torch.cat([torch.tensor([-1]), ids]), ids.float(),
                torch.cat([ids, torch.tensor([49408])]), ids[:0], ids[None], ids.flip(0)):
        with pytest.raises(ValueError, match="caption_vocab must be sorted unique token ids in"):
            compact.caption_logits(states, tokens[:, : states.shape[1]], images, bad)


def test_generation_and_scores_stay_inside_a_compact_vocabulary():
    full, compact = _models()
    for model in (full, compact):
        model.encoders.text.token_embedding.weight.data.mul_(20)  # decisive random logits
    compact.vocabulary = frozenset(compact.tokenize(CAPTIONS).flatten().tolist())
    hidden = torch.randn(2, 3, 32)
    ids = torch.tensor(sorted(compact.vocabulary))
    logits = compact.lm_logits(hidden)
    torch.testing.assert_close(logits[..., ids], full.lm_logits(hidden)[..., ids])
    outside = torch.ones(logits.shape[-1], dtype=torch.bool)
    outside[ids] = False
    assert (logits[..., outside] == OUTSIDE_VOCABULARY_LOGIT).all()
    pipe = FoundationPipeline(compact.eval())
    for text in pipe.complete(["a", "a red"], max_new_tokens=6, do_sample=True, generator=torch.Generator().manual_seed(0)):
        assert set(compact.tokenize(text).flatten().tolist()) <= compact.vocabulary, text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unseen word is reported; its score is a number
        score = pipe.score(None, ["a purple circle"])
    assert torch.isfinite(score).all() and score.item() < 0.5 * OUTSIDE_VOCABULARY_LOGIT
    compact.vocabulary = None  # unknown: the untrained ids cannot be told apart, so refused
    with pytest.raises(ValueError, match="compact, but the model has no vocabulary.json"):
        compact.lm_logits(hidden)


def test_training_steps_grow_the_vocabulary_the_softmax_covers():
    module = FoundationModule(preset="tiny", overrides=COMPACT, stage="language", warmup_steps=0)
    assert module.model.vocabulary == frozenset()  # nothing seen yet
    with warnings.catch_warnings():  # self.log without a Trainer warns and does nothing
        warnings.simplefilter("ignore")
        module.training_step({"image": torch.rand(2, 3, 32, 32), "caption": CAPTIONS[:2]}, 0)
        first = module.model.vocabulary
        module.training_step({"image": torch.rand(2, 3, 32, 32), "caption": CAPTIONS[2:]}, 1)
    assert first == frozenset(module.model.tokenize(CAPTIONS[:2]).flatten().tolist())
    assert module.model.vocabulary == frozenset(module.model.tokenize(CAPTIONS).flatten().tolist())
    assert module.knowledge({"source": "shapes"})[1] == module.model.vocabulary  # what the export carries


def test_vocabulary_option_is_checked():
    with pytest.raises(ValueError, match="language.vocabulary must be one of 'full', 'compact'"):
        FoundationConfig.from_preset("tiny", {"language": {"vocabulary": "small"}})


@pytest.mark.parametrize("ids", [[], [60000], [-1, 320], [1.7, 320], [True, 320], "320"])
def test_a_damaged_vocabulary_file_is_refused(tmp_path, ids):
    import json

    from multimodal.knowledge import load_vocabulary

    (tmp_path / "vocabulary.json").write_text(json.dumps({"token_ids": ids}))
    with pytest.raises(ValueError, match="vocabulary.json: not a vocabulary file"):
        load_vocabulary(tmp_path)
