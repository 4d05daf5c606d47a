import importlib

import pytest
import torch

from encoders.attention import attention, attention_backend, available_backends, resolve_backend

attn_mod = importlib.import_module("encoders.attention")

FAST = [b for b in available_backends() if b != "math"]
CASES = {
    "self": dict(lq=12, lk=12, causal=False, mask=False),
    "causal": dict(lq=12, lk=12, causal=True, mask=False),
    "padded": dict(lq=12, lk=12, causal=False, mask=True),
    "causal_padded": dict(lq=12, lk=12, causal=True, mask=True),
    "cross": dict(lq=5, lk=17, causal=False, mask=False),
    "cross_padded": dict(lq=5, lk=17, causal=False, mask=True),
}


def _inputs(lq, lk, mask, device="cpu", dtype=torch.float32):
    q = torch.randn(2, 3, lq, 16, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 3, lk, 16, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 3, lk, 8 if lq != lk else 16, device=device, dtype=dtype, requires_grad=True)
    m = None
    if mask:  # key padding: sample 0 sees everything, sample 1 loses its last 4 keys
        m = torch.ones(2, lk, dtype=torch.bool, device=device)
        m[1, -4:] = False
    return q, k, v, m


def _run(backend, q, k, v, m, causal):
    for t in (q, k, v):
        t.grad = None
    with attention_backend(backend):
        out = attention(q, k, v, causal=causal, mask=m)
    (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    return out.detach(), [t.grad.clone() for t in (q, k, v)]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_math(backend, case):
    c = CASES[case]
    device = "cuda" if backend == "xformers" else "cpu"
    q, k, v, m = _inputs(c["lq"], c["lk"], c["mask"], device)
    ref, ref_grads = _run("math", q, k, v, m, c["causal"])
    out, grads = _run(backend, q, k, v, m, c["causal"])
    assert out.shape == (2, 3, c["lq"], v.shape[-1])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-4)


def test_math_is_a_true_reference():
    """The reference itself must equal a by-hand softmax(QK^T/sqrt(d))V with the causal rule."""
    q, k, v, _ = _inputs(6, 6, False)
    with attention_backend("math"):
        out = attention(q, k, v, causal=True)
    scores = (q @ k.transpose(-2, -1)) / 4.0
    scores = scores.masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
    torch.testing.assert_close(out, scores.softmax(-1) @ v)
    # and padded keys really get no weight
    m = torch.ones(2, 6, dtype=torch.bool)
    m[:, -1] = False
    v2 = v.detach().clone()
    v2[:, :, -1] = 1e6
    with attention_backend("math"):
        assert attention(q, k, v2, mask=m).abs().max() < 1e3


def test_causal_reaches_kernel_as_is_causal(monkeypatch):
    seen = {}

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        seen.update(mask=attn_mask, causal=is_causal)
        return torch.zeros_like(q)

    monkeypatch.setattr(attn_mod.F, "scaled_dot_product_attention", spy)
    q, k, v, _ = _inputs(8, 8, False)
    with attention_backend("sdpa"):
        attention(q, k, v, causal=True)
    assert seen == {"mask": None, "causal": True}


def test_override_priority():
    cpu = torch.device("cpu")
    assert resolve_backend(None, cpu) == "sdpa"  # auto on CPU
    assert resolve_backend("math", cpu) == "math"  # config choice
    with attention_backend("math"):
        assert resolve_backend("sdpa", cpu) == "math"  # context manager beats config
    attn_mod.set_default_backend("math")
    try:
        assert resolve_backend(None, cpu) == "math"
        assert resolve_backend("sdpa", cpu) == "sdpa"
    finally:
        attn_mod.set_default_backend("auto")


def test_xformers_request_on_cpu_falls_back_with_warning():
    with pytest.warns(UserWarning, match="xformers"):
        attn_mod._warn_once.cache_clear()
        assert resolve_backend("xformers", torch.device("cpu")) == "sdpa"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(causal=True, lk=5), "causal=True needs q_len == kv_len"),
        (dict(mask=torch.ones(2, 8)), "boolean"),
        (dict(mask=torch.ones(3, 8, dtype=torch.bool)), "does not broadcast"),
        (dict(backend="flash"), "backend must be one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    lk = kwargs.pop("lk", 8)
    q, k, v = torch.randn(2, 2, 8, 4), torch.randn(2, 2, lk, 4), torch.randn(2, 2, lk, 4)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, **kwargs)


def test_encoders_route_every_attention_through_the_core(monkeypatch, tiny_model):
    calls = []
    real = attn_mod.attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("causal", False))
        return real(*args, **kwargs)

    import encoders.blocks

    monkeypatch.setattr(encoders.blocks, "attention", counting)
    cfg = tiny_model.config
    tiny_model.encode_text(["a red circle"])
    tiny_model.encode_image(torch.rand(1, 3, 32, 32))
    assert calls == [True] * cfg.text.layers + [False] * cfg.image.layers


def test_encoder_outputs_equal_across_backends(tiny_model):
    images = torch.rand(3, 3, 32, 32)
    with attention_backend("math"):
        ref_i, ref_t = tiny_model.encode_image(images), tiny_model.encode_text(["a", "a blue square", "x y z"])
    with attention_backend("sdpa"):
        out_i, out_t = tiny_model.encode_image(images), tiny_model.encode_text(["a", "a blue square", "x y z"])
    torch.testing.assert_close(out_i, ref_i, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_t, ref_t, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["sdpa"] + (["xformers"] if "xformers" in FAST else []))
def test_gpu_bf16_matches_math(backend):
    q, k, v, m = _inputs(64, 64, False, "cuda", torch.bfloat16)
    ref, _ = _run("math", q, k, v, None, True)
    out, _ = _run(backend, q, k, v, None, True)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
