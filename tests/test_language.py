import pytest
import torch

from multimodal import FoundationPipeline
from multimodal.language import _filter_logits


@pytest.fixture
def pipe(tiny_model):
    # a random-init head emits end-of-text early half of the time; a larger logit scale keeps
    # the argmax well away from ties so cached and uncached paths cannot diverge by rounding
    torch.manual_seed(0)
    with torch.no_grad():
        tiny_model.encoders.text.token_embedding.weight.mul_(20)
    return FoundationPipeline(tiny_model)


def _images(n, seed=0):
    return list(torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_kv_cache_gives_the_same_tokens_batched_and_unbatched(pipe, num_beams):
    images = _images(3)
    kw = dict(max_new_tokens=8, num_beams=num_beams)
    cached = pipe.caption(images, **kw)
    assert cached == pipe.caption(images, use_cache=False, **kw)
    assert cached == [pipe.caption([im], **kw)[0] for im in images]
    assert any(cached)  # something was generated
    texts = ["a", "a large red", "a small blue square at the"]  # prompts of different lengths
    done = pipe.complete(texts, **kw)
    assert done == pipe.complete(texts, use_cache=False, **kw)
    assert done == [pipe.complete(t, **kw)[0] for t in texts]
    assert all(d.startswith(t) for d, t in zip(done, texts))
    with_images = pipe.complete(texts, images=images, **kw)
    assert with_images == pipe.complete(texts, images=images, use_cache=False, **kw)
    assert with_images != done  # the image is seen


def test_generation_stops_at_the_budget_and_at_context_length(pipe):
    tok = pipe.model.tokenizer
    for n in (1, 3):
        assert all(len(tok(c)[0].nonzero()) - 2 <= n for c in pipe.caption(_images(4), max_new_tokens=n))
    ctx = pipe.model.config.text.context_length
    long = pipe.complete("a " * (ctx - 3), max_new_tokens=50)[0]  # room for one more token only
    assert len(tok(long)[0].nonzero()) <= ctx


def test_sampling_is_seeded_and_top_k_1_is_greedy(pipe):
    images = _images(2)
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a = pipe.caption(images, do_sample=True, temperature=2.0, generator=gen(0))
    assert a == pipe.caption(images, do_sample=True, temperature=2.0, generator=gen(0))
    draws = {tuple(pipe.caption(images, do_sample=True, temperature=2.0, generator=gen(s))) for s in range(1, 6)}
    assert len(draws) > 1
    assert pipe.caption(images, do_sample=True, top_k=1, generator=gen(3)) == pipe.caption(images)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(_filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    assert torch.isinf(_filter_logits(logits, None, 0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(_filter_logits(logits, None, 0.81)).tolist() == [[False, False, False, True]]
    assert torch.isinf(_filter_logits(logits, None, 0.4)).tolist() == [[False, True, True, True]]


def test_score_is_the_caption_log_likelihood(pipe):
    model = pipe.model
    image = _images(1)[0]
    texts = ["a red circle", "a blue square at the top"]
    scores = pipe.score(image, texts)
    states = model.image_tokens(pipe._pixels(image))
    for text, score in zip(texts, scores):
        ids = model.tokenize([text])[0]
        ids = ids[: int(ids.argmax()) + 1]  # through end-of-text
        logp = model.language_logits(ids[None, :-1], states).log_softmax(-1)[0]
        expected = logp[torch.arange(len(ids) - 1), ids[1:]].sum()
        torch.testing.assert_close(score, expected, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(scores, pipe.score(None, texts))  # text-only differs


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: p.caption([]), "images"),
        (lambda p: p.complete([]), "texts"),
        (lambda p: p.score(None, []), "texts"),
        (lambda p: p.caption(_images(1), max_new_tokens=0), "max_new_tokens"),
        (lambda p: p.complete("a", num_beams=0), "num_beams"),
        (lambda p: p.complete("a", do_sample=True, top_p=0.0), "top_p"),
        (lambda p: p.complete("a", do_sample=True, top_p=1.5), "top_p"),
        (lambda p: p.complete("a", do_sample=True, temperature=0), "temperature"),
        (lambda p: p.complete(["a", "b"], images=_images(1)), "images"),
    ],
)
def test_bad_language_arguments(pipe, call, match):
    with pytest.raises(ValueError, match=match):
        call(pipe)
