import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from diffusion.decoder import Decoder
from diffusion.processor import CoreAttnProcessor
from diffusion.schedule import DDPMObjective
from multimodal.losses import denoising_loss
from encoders.attention import attention_backend
from multimodal import FoundationPipeline


def _inputs(model, batch=2):
    dec = model.decoder
    size, ch = dec.config.image_size, dec.config.channels
    return torch.randn(batch, ch, size, size), torch.tensor([10, 700])[:batch], model.text_condition(["a red circle", "a blue square"][:batch])


def _diffusers_call(unet, sample, t, cond):
    """The exported UNet called the way the model card says: class_labels = sqrt(E) * unit text embedding."""
    return unet(sample, t, encoder_hidden_states=cond.states, class_labels=cond.embeds * cond.embeds.shape[-1] ** 0.5).sample


def test_every_attention_uses_the_core_processor_and_matches_diffusers(tiny_model):
    unet = tiny_model.decoder.unet
    processors = unet.attn_processors
    assert processors and all(isinstance(p, CoreAttnProcessor) for p in processors.values())
    assert any("attn2" in name for name in processors)  # cross-attention to the text states is there
    sample, t, cond = _inputs(tiny_model)
    with torch.no_grad():
        ours = tiny_model.decoder(sample, t, cond)
        with attention_backend("math"):
            ours_math = tiny_model.decoder(sample, t, cond)
        unet.set_attn_processor(AttnProcessor2_0())
        reference = _diffusers_call(unet, sample, t, cond)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_math, reference, atol=1e-5, rtol=0)


def test_exported_decoder_loads_in_diffusers(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "model")
    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "model" / "decoder")).eval()
    sample, t, cond = _inputs(tiny_model)
    with torch.no_grad():
        torch.testing.assert_close(_diffusers_call(unet, sample, t, cond), tiny_model.decoder(sample, t, cond), atol=1e-5, rtol=0)


def test_text_embedding_conditions_the_decoder(tiny_model):
    """The pooled text embedding reaches the UNet (through its class embedding), and the
    option can be switched off (cross-attention only, as in the plain diffusers UNet)."""
    assert tiny_model.decoder.unet.config.class_embed_type == "projection"
    sample, t, cond = _inputs(tiny_model)
    with torch.no_grad():
        base = tiny_model.decoder(sample, t, cond)
        other = tiny_model.decoder(sample, t, cond._replace(embeds=cond.embeds.flip(0)))
    assert not torch.allclose(base, other)
    cfg = dataclasses.replace(tiny_model.config.decoder, text_embed_conditioning=False)
    plain = Decoder(cfg, tiny_model.config.text.width)
    assert plain.unet.config.class_embed_type is None
    with torch.no_grad():
        torch.testing.assert_close(plain(sample, t, cond), plain(sample, t, cond._replace(embeds=cond.embeds.flip(0))))
    with pytest.raises(ValueError, match="text_embed_dim"):
        Decoder(tiny_model.config.decoder, tiny_model.config.text.width)


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler"])
def test_same_seed_same_images_and_batching_is_invisible(tiny_model, scheduler):
    pipe = FoundationPipeline(tiny_model, scheduler=scheduler)
    kw = dict(num_inference_steps=3, guidance_scale=2.0, output_type="pt", show_progress=False)
    a = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(a, b)
    assert not torch.allclose(a, pipe("a red circle", generator=torch.Generator().manual_seed(1), **kw).images)
    batched = pipe(["a red circle", "a blue square"], num_images_per_prompt=2, generator=_gens(0, 1, 2, 3), **kw).images
    singles = [pipe(p, generator=_gens(s), **kw).images[0] for p, s in [("a red circle", 0), ("a red circle", 1), ("a blue square", 2), ("a blue square", 3)]]
    assert batched.shape == (4, 3, 32, 32)
    # batched convolutions may pick other kernels: equal within one 8-bit level
    torch.testing.assert_close(batched, torch.stack(singles), atol=1 / 255, rtol=0)


def test_output_types_and_progress_callback(tiny_model):
    pipe = FoundationPipeline(tiny_model)
    seen = []
    out = pipe("x", num_inference_steps=2, show_progress=False, callback_on_step_end=lambda i, t, x: seen.append(i))
    assert seen == [0, 1] and out.images[0].size == (32, 32)
    arr = pipe("x", num_inference_steps=1, output_type="np", show_progress=False).images
    assert arr.shape == (1, 32, 32, 3) and 0 <= arr.min() and arr.max() <= 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(guidance_scale=-1), "guidance_scale"),
        (dict(prompt=[]), "prompt"),
        (dict(height=64), "height must be 32"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(output_type="jpg"), "output_type"),
        (dict(scheduler="plms2"), "scheduler must be one of"),
    ],
)
def test_bad_generation_arguments(tiny_model, kwargs, match):
    kwargs = {"prompt": "a red circle", **kwargs}
    with pytest.raises(ValueError, match=match):
        FoundationPipeline(tiny_model)(show_progress=False, **kwargs)


@pytest.mark.parametrize("prediction_type, gamma", [("epsilon", None), ("v_prediction", 5.0)])
def test_diffusion_loss_trains(tiny_model, prediction_type, gamma):
    cfg = tiny_model.config.decoder
    cfg.prediction_type = prediction_type
    cfg.min_snr_gamma = gamma
    objective = DDPMObjective(cfg)
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    cond = tiny_model.text_condition(["a red circle"] * 8)
    cond = cond._replace(states=cond.states.detach(), embeds=cond.embeds.detach())
    opt = torch.optim.Adam(tiny_model.decoder.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        torch.manual_seed(step % 3)
        task = objective.draw(images)
        pred = tiny_model.decoder(task.noisy, task.timesteps, cond)
        loss = denoising_loss({"denoise_pred": pred, "denoise_target": task.target, "denoise_weight": task.weight})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < sum(losses[:3])
