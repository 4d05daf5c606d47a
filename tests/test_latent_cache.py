"""The latent cache of VAE decoders (``diffusion.latent_cache``, ``model.latent_cache_gb``)."""

import copy

import pytest
import torch
from test_flow import MMDIT, _model, _tiny_vae

from diffusion.latent_cache import LatentCache
from train.module import FoundationModule


def test_the_latent_cache_encodes_each_image_once_and_draws_as_the_encoder_does(tmp_path):
    """Cached, an image seen again skips the encoder; its latent is drawn from the stored
    distribution exactly as from the encoder (same random stream: same latents); the cache
    stops growing at its size; copies of the model do not copy it; pixel models refuse it."""
    _tiny_vae(tmp_path / "vae")
    model = _model({"vae": str(tmp_path / "vae"), "patch_size": 2})
    calls = []
    model.decoder.vae.encoder.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    torch.manual_seed(5)
    plain = model.decoder.to_latents(x)
    model.decoder.latent_cache = LatentCache(max_bytes=2**20)
    for batch in (x, torch.cat([x, torch.rand(2, 3, 32, 32) * 2 - 1])):  # then the same four with two new ones
        torch.manual_seed(5)
        torch.testing.assert_close(model.decoder.to_latents(batch)[:4], plain, rtol=0, atol=0)
    assert sum(calls) == 4 + 4 + 2  # without the cache, the cache's first sight of the four, then the two new ones
    assert (model.decoder.latent_cache.hits, model.decoder.latent_cache.misses) == (4, 6)
    torch.manual_seed(6)
    assert not torch.equal(model.decoder.to_latents(x), plain)  # a fresh draw from the stored distribution
    assert sum(calls) == 10 and model.decoder.latent_cache.hits == 8  # ... without the encoder
    mixed = torch.cat([torch.rand(1, 3, 32, 32) * 2 - 1, x[2:3], torch.rand(1, 3, 32, 32) * 2 - 1, x[0:1]])
    cache, model.decoder.latent_cache = model.decoder.latent_cache, None
    torch.manual_seed(7)
    expected = model.decoder.to_latents(mixed)
    model.decoder.latent_cache = cache
    torch.manual_seed(7)
    torch.testing.assert_close(model.decoder.to_latents(mixed), expected, rtol=0, atol=0)  # stored and new rows in place

    one = 2 * 4 * 16 * 16 * 4  # bytes of one image's mean and log-variance
    small = LatentCache(max_bytes=int(2.5 * one))
    model.decoder.latent_cache = small
    model.decoder.to_latents(x)
    assert len(small) == 2 and small.used == 2 * one  # full: the rest are encoded every time
    assert len(copy.deepcopy(model).decoder.latent_cache) == 0
    with pytest.raises(ValueError, match="positive"):
        LatentCache(0)
    with pytest.raises(ValueError, match="model.latent_cache_gb caches a VAE's latents"):
        FoundationModule(preset="tiny", stage="decoder", latent_cache_gb=1.0)
    for bad in (-1, 1e-10, 5000):
        with pytest.raises(ValueError, match="model.latent_cache_gb must be 0 \\(off\\) or in \\[0.001, 4096\\]"):
            FoundationModule(preset="tiny", stage="decoder", latent_cache_gb=bad)
    module = FoundationModule(preset="tiny", stage="decoder", latent_cache_gb=0.5,
                              overrides={"decoder": {"vae": str(tmp_path / "vae"), "patch_size": 2, **MMDIT}})
    assert module.model.decoder.latent_cache.max_bytes == 2**29
