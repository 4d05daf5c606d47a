"""The modern generative core: SD3's MMDiT denoiser, rectified-flow training and sampling, and a
frozen VAE's latent space — against hand computations and diffusers itself."""

import json

import pytest
import torch
from conftest import assert_same_computation
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

from diffusion.processor import CoreAttnProcessor
from diffusion.schedule import FlowObjective, sampling_scheduler
from encoders.attention import attention_backend
from multimodal import FoundationConfig, FoundationModel, FoundationPipeline
from multimodal.config import DecoderConfig
from multimodal.losses import denoising_loss

MMDIT = {"backbone": "mmdit", "objective": "flow", "width": 32, "num_layers": 2, "attention_head_dim": 16, "patch_size": 4}


def _model(decoder: dict | None = None, **extra) -> FoundationModel:
    over = {"decoder": {**MMDIT, **(decoder or {})}, "sampling": {"scheduler": "euler", "steps": 3}, **extra}
    return FoundationModel(FoundationConfig.from_preset("tiny", over)).eval()


def _inputs(model: FoundationModel, batch: int = 2):
    shape = model.decoder.sample_shape
    cond = model.text_condition(["a red circle", "a blue square"][:batch])
    return torch.randn(batch, *shape), torch.tensor([10.0, 700.0])[:batch], cond


def _sd3_call(transformer, sample, t, cond):
    """The exported MMDiT called as the model card says: pooled_projections = sqrt(E) * unit text embedding."""
    pooled = cond.embeds * cond.embeds.shape[-1] ** 0.5
    return transformer(hidden_states=sample, encoder_hidden_states=cond.states, pooled_projections=pooled, timestep=t).sample


@pytest.mark.parametrize("shift,scheme", [(1.0, "logit_normal"), (3.0, "logit_normal"), (3.0, "sigma_sqrt"), (1.0, "mode")])
def test_flow_matching_draw_and_loss_match_a_hand_computation(shift, scheme):
    cfg = DecoderConfig(objective="flow", flow_shift=shift, weighting_scheme=scheme, logit_mean=0.3, logit_std=0.8)
    x = torch.rand(5, 3, 4, 4) * 2 - 1
    task = FlowObjective(cfg).draw(x, torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)  # the same stream, by hand: noise first, then the noise levels
    noise = torch.randn(x.shape, generator=g)
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.normal(0.3, 0.8, size=(5,), generator=g))
    else:
        u = torch.rand(5, generator=g)
        if scheme == "mode":
            u = 1 - u - 1.29 * (torch.cos(torch.pi * u / 2) ** 2 - 1 + u)
    index = (u * 1000).long()
    plain = (1000 - index).double() / 1000  # the training schedule runs from s = 1 down to 1/1000
    sigma = (shift * plain / (1 + (shift - 1) * plain)).float()
    torch.testing.assert_close(task.timesteps, sigma * 1000)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(task.noisy, (1 - s) * x + s * noise)
    torch.testing.assert_close(task.target, noise - x)
    weight = sigma ** -2 if scheme == "sigma_sqrt" else torch.ones(5)
    torch.testing.assert_close(task.weight, weight)

    pred = torch.randn_like(x)
    out = {"denoise_pred": pred, "denoise_target": task.target, "denoise_weight": task.weight}
    by_hand = sum(weight[i] * ((pred[i] - (noise[i] - x[i])) ** 2).mean() for i in range(5)) / 5
    torch.testing.assert_close(denoising_loss(out), by_hand)


def test_every_attention_module_of_both_backbones_uses_the_core_processor():
    for model in (_model(), _model({"backbone": "unet"}), FoundationModel(FoundationConfig.from_preset("tiny"))):
        denoiser = model.decoder.denoiser
        modules = [m for m in denoiser.modules() if isinstance(m, Attention)]
        assert modules and all(isinstance(m.processor, CoreAttnProcessor) for m in modules)
    calls = []
    import diffusion.processor as processor

    real = processor.attention
    processor.attention = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        model = _model()
        with torch.no_grad():
            model.decoder(*_inputs(model))
    finally:
        processor.attention = real
    assert len(calls) == model.config.decoder.num_layers  # one joint attention per block, all through the core


def test_mmdit_matches_diffusers_with_its_own_processors_and_every_backend():
    model = _model()
    sample, t, cond = _inputs(model)
    transformer = model.decoder.transformer
    with torch.no_grad():
        for _, m in transformer.named_modules():  # a trained-looking net: the zero-initialized layers get weights
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=0.1)
        ours = model.decoder(sample, t, cond)
        with attention_backend("math"):
            ours_math = model.decoder(sample, t, cond)
        transformer.set_attn_processor(JointAttnProcessor2_0())
        reference = _sd3_call(transformer, sample, t, cond)
    assert reference.abs().max() > 1e-3
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_math, reference, atol=1e-5, rtol=0)


def test_exported_mmdit_reloads_in_diffusers_with_equal_outputs(tmp_path):
    model = _model()
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "model")
    transformer = SD3Transformer2DModel.from_pretrained(str(tmp_path / "model" / "decoder")).eval()
    assert {type(p) for p in transformer.attn_processors.values()} == {JointAttnProcessor2_0}  # diffusers' own
    sample, t, cond = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(_sd3_call(transformer, sample, t, cond), model.decoder(sample, t, cond), atol=1e-5, rtol=0)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(tmp_path / "model" / "scheduler"))
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.shift == 1.0
    again = FoundationModel.from_pretrained(tmp_path / "model")
    with torch.no_grad():
        torch.testing.assert_close(again.decoder(sample, t, cond), model.decoder(sample, t, cond), atol=0, rtol=0)


@pytest.mark.parametrize("scheduler", ["euler", "dpm++", "unipc"])
def test_flow_sampling_with_every_flow_scheduler_is_seeded_and_batch_invisible(scheduler):
    model = _model()
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pipe = FoundationPipeline(model, allow_untrained=True)
    run = lambda prompts, seeds: pipe(prompts, scheduler=scheduler, num_inference_steps=3, output_type="pt", show_progress=False,  # noqa: E731
                                      generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    both = run(["a red circle", "a blue square"], [0, 1])
    assert both.shape == (2, 3, 32, 32) and torch.isfinite(both).all()
    torch.testing.assert_close(run(["a blue square"], [1])[0], both[1], atol=1e-5, rtol=0)
    assert not torch.allclose(both[0], both[1])


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("scheduler", ["euler", "dpm++", "unipc"])
def test_flow_samplers_follow_the_training_convention(scheduler, shift):
    """An oracle denoiser that knows the clean sample c predicts the training target exactly:
    at timestep 1000 s the sample is x = (1 - s) c + s e, so e - c = (x - c) / s. Every flow
    scheduler must then land on c: timesteps and velocity sign agree with ``FlowObjective``."""
    cfg = DecoderConfig(objective="flow", flow_shift=shift)
    clean = torch.rand(2, 3, 8, 8) * 2 - 1
    sched = sampling_scheduler(scheduler, cfg)
    sched.set_timesteps(12)
    x = torch.randn(2, 3, 8, 8)
    for t in sched.timesteps:
        s = float(t) / 1000
        x = sched.step((x - clean) / s, t, x).prev_sample
    assert (x - clean).abs().max() < 2e-2  # dpm++ / unipc round timesteps to integers (diffusers' own)


@pytest.mark.parametrize("scheduler", ["euler", "dpm++", "unipc"])
def test_a_clean_sample_prediction_is_the_velocity_the_loss_and_solvers_use(scheduler):
    """flow_target sample: the MMDiT's output x' enters as (x_s - x') / max(s, flow_min_sigma), by
    hand; an oracle that outputs the clean image exactly is a perfect velocity model (every flow
    solver lands on it), and the flow loss is the velocity loss of that conversion."""
    model = _model({"flow_target": "sample", "flow_min_sigma": 0.05})
    sample, t, cond = _inputs(model)
    t = torch.tensor([10.0, 700.0])  # s = 0.01 (held at 0.05) and 0.7
    raw = _sd3_call(model.decoder.transformer, sample, t, cond)
    by_hand = (sample - raw) / torch.tensor([0.05, 0.7]).view(-1, 1, 1, 1)
    torch.testing.assert_close(model.decoder(sample, t, cond), by_hand)

    clean = torch.rand(2, 3, 8, 8) * 2 - 1
    cfg = DecoderConfig(objective="flow", flow_target="sample")
    sched = sampling_scheduler(scheduler, cfg)
    sched.set_timesteps(12)
    x = torch.randn(2, 3, 8, 8)
    for step_t in sched.timesteps:
        x = sched.step(model.decoder.velocity_from_sample(x, step_t.expand(2), clean), step_t, x).prev_sample
    assert (x - clean).abs().max() < 2e-2

    task = FlowObjective(cfg).draw(clean, torch.Generator().manual_seed(3))
    assert (task.timesteps >= 50).all()  # s >= flow_min_sigma: the division is exact
    pred = model.decoder.velocity_from_sample(task.noisy, task.timesteps, clean)  # the oracle: zero loss
    assert denoising_loss({"denoise_pred": pred, "denoise_target": task.target, "denoise_weight": task.weight}) < 1e-10
    wrong = model.decoder.velocity_from_sample(task.noisy, task.timesteps, clean + 0.1)
    assert denoising_loss({"denoise_pred": wrong, "denoise_target": task.target, "denoise_weight": task.weight}) > 1e-3


@pytest.mark.parametrize("scheduler", ["euler", "dpm++", "unipc"])
def test_the_sampling_loop_gives_flow_decoders_the_solvers_exact_noise_level(scheduler):
    """An oracle that knows the clean image lands on it through the real sampling loop, within
    float rounding: the decoder sees sigma * 1000, not the solver's integer timestep (2% off near 0)."""
    from types import SimpleNamespace

    from diffusion.sampling import sample

    clean = torch.rand(1, 3, 8, 8) * 2 - 1
    seen = []

    class Oracle(torch.nn.Module):
        config = DecoderConfig(objective="flow")
        sample_shape = (3, 8, 8)

        def forward(self, x, t, cond):
            seen.append(float(t[0]))
            return (x - clean) / (t.view(-1, 1, 1, 1) / 1000)

        def from_latents(self, x):
            return x

    sched = sampling_scheduler(scheduler, Oracle.config)
    cond = SimpleNamespace(states=torch.zeros(1, 2, 4))
    out = sample(Oracle(), sched, cond, cond, [torch.Generator().manual_seed(0)], num_inference_steps=12, guidance_scale=1.0)
    assert (out - clean).abs().max() < 1e-4
    torch.testing.assert_close(torch.tensor(seen), sched.sigmas[:12].float() * 1000)


@pytest.mark.parametrize("decoder", [{"objective": "ddpm"}, {"text_embed_conditioning": False}])
def test_mmdit_with_ddpm_or_without_the_pooled_embedding_trains_and_samples(decoder):
    model = _model(decoder, sampling={"scheduler": "dpm++", "steps": 2})
    out = model({"image": torch.rand(2, 3, 32, 32), "caption": ["a red circle"] * 2}, heads=("diffusion",))
    denoising_loss(out).backward()
    image = FoundationPipeline(model, allow_untrained=True)(["a red circle"], show_progress=False, output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_flow_models_name_the_schedulers_they_take():
    with pytest.raises(ValueError, match="sampling.scheduler must be one of 'euler', 'dpm\\+\\+', 'unipc'"):
        _model(sampling={"scheduler": "ddim"})
    pipe = FoundationPipeline(_model(), allow_untrained=True)
    with pytest.raises(ValueError, match="flow-matching decoder"):
        pipe(["a red circle"], scheduler="euler_a", num_inference_steps=2, show_progress=False)
    with pytest.raises(ValueError, match=r"dpm\+\+, euler, unipc \(a flow-matching decoder.*got 'ddim'"):
        FoundationPipeline(pipe.model, scheduler="ddim")
    with pytest.raises(ValueError, match="decoder.backbone must be one of"):
        DecoderConfig(backbone="dit")
    with pytest.raises(ValueError, match="decoder.flow_target must be one of 'velocity', 'sample'"):
        DecoderConfig(objective="flow", flow_target="x0")
    with pytest.raises(ValueError, match="decoder.flow_target 'sample' needs decoder.objective 'flow'"):
        DecoderConfig(objective="ddpm", flow_target="sample")
    with pytest.raises(ValueError, match="decoder.flow_min_sigma must be in"):
        DecoderConfig(objective="flow", flow_min_sigma=0.0)
    with pytest.raises(ValueError, match="decoder.image_size must be in \\[1, 64\\] in pixel space"):
        DecoderConfig(image_size=256)


@pytest.mark.parametrize("backbone,target", [("unet", "velocity"), ("mmdit", "velocity"), ("mmdit", "sample")])
def test_flow_objective_trains_either_backbone(backbone, target):
    torch.manual_seed(0)
    model = _model({"backbone": backbone, "flow_target": target}).train()
    params = [p for p in model.decoder.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3)
    batch = {"image": torch.rand(8, 3, 32, 32), "caption": ["a red circle"] * 8}
    losses = []
    for step in range(30):
        torch.manual_seed(step % 2)  # two fixed draws: the loss on them must fall
        loss = denoising_loss(model(batch, heads=("diffusion",)))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-4:]) < 0.85 * sum(losses[:4]), losses  # a decoder without gradients stays at 1.0


def _tiny_vae(folder):
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=32, scaling_factor=0.5, shift_factor=0.1)
    vae.save_pretrained(str(folder), safe_serialization=True)
    return vae


def test_a_latent_decoder_trains_two_steps_and_generates_through_its_vae(tmp_path):
    vae = _tiny_vae(tmp_path / "vae")
    model = _model({"vae": str(tmp_path / "vae"), "patch_size": 2}).train()
    assert model.decoder.sample_shape == (4, 16, 16)  # the VAE halves each side
    assert not any(k.startswith("decoder.vae") or ".vae." in k for k in model.state_dict())  # referenced, not trained
    images = torch.rand(4, 3, 32, 32)
    x = images * 2 - 1
    torch.manual_seed(3)
    latents = model.decoder.to_latents(x)
    with torch.no_grad():  # diffusers' SD3 convention: (z - shift) * scale, and back
        torch.manual_seed(3)
        torch.testing.assert_close(latents, (vae.encode(x).latent_dist.sample() - 0.1) * 0.5)
        torch.testing.assert_close(model.decoder.from_latents(latents), vae.decode(latents / 0.5 + 0.1).sample)
    assert not any(p.requires_grad for p in model.decoder.vae.parameters())
    assert all(p.dtype == torch.float64 for p in model.to(torch.float64).decoder.vae.parameters())  # moved with the model
    model.to(torch.float32)
    before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        out = model({"image": images, "caption": ["a red circle"] * 4}, heads=("diffusion",))
        assert out["denoise_pred"].shape == (4, 4, 16, 16)
        denoising_loss(out).backward()
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(before[k], v) for k, v in model.decoder.state_dict().items())

    model.eval()
    image = FoundationPipeline(model, allow_untrained=True)(["a red circle"], num_inference_steps=2, show_progress=False,
                                                           generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    saved = model.save_pretrained(tmp_path / "model")  # the VAE travels with the model; the config names it relatively
    assert json.loads((saved / "config.json").read_text())["decoder"]["vae"] == "vae"
    AutoencoderKL.from_pretrained(str(saved / "vae"))
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").unlink()  # the original may go away
    again = FoundationModel.from_pretrained(saved)
    again_image = FoundationPipeline(again, allow_untrained=True)(["a red circle"], num_inference_steps=2, show_progress=False,
                                                                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(again_image, image, atol=1e-5, rtol=0)


def test_checkpoints_keep_what_the_decoder_outputs():
    """A checkpoint says whether its MMDiT predicts the velocity or the clean image: resuming or
    exporting it keeps that even where the preset's default changed; checkpoints from before the
    option predict the velocity."""
    from train.module import FoundationModule

    module = FoundationModule(preset="tiny", stage="decoder", overrides={"decoder": {**MMDIT, "flow_target": "sample"}})
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["decoder_output"] == {"flow_target": "sample", "flow_min_sigma": 0.05}
    module.on_load_checkpoint({})  # older than flow_target
    assert module.model.config.decoder.flow_target == "velocity" and module.model.decoder.config.flow_target == "velocity"
    module.on_load_checkpoint(checkpoint)
    assert module.model.decoder.config is module.model.config.decoder and module.model.decoder.config.flow_target == "sample"


def test_bad_vae_folders_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="not a diffusers VAE folder"):
        _model({"vae": str(tmp_path)})
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="not one of AutoencoderKL, AutoencoderDC"):
        _model({"vae": str(tmp_path)})
    _tiny_vae(tmp_path / "v")
    (tmp_path / "v" / "diffusion_pytorch_model.safetensors").rename(tmp_path / "v" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle files are never loaded"):
        _model({"vae": str(tmp_path / "v")})
    _tiny_vae(tmp_path / "w")
    with pytest.raises(ValueError, match="multiple of the VAE's downsampling"):
        _model({"vae": str(tmp_path / "w"), "image_size": 33})


def test_lora_adapts_the_mmdit_joint_attention_and_starts_as_the_identity():
    from multimodal.config import AdapterConfig

    model = _model()
    sample, t, cond = _inputs(model)
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        before = model.decoder(sample, t, cond)
    model.add_adapter(AdapterConfig(components=["decoder"], r=2))
    names = [n for n, _ in model.decoder.named_modules() if n.endswith(("attn.add_q_proj", "attn.to_q"))]
    assert names and all(hasattr(model.decoder.get_submodule(n), "lora_A") for n in names)
    with torch.no_grad():
        # zero-initialized LoRA B adds zeros: only summation order may differ, bounded by fp32 eps per layer
        assert_same_computation(model.decoder(sample, t, cond), before, reduction=model.config.decoder.width,
                                depth=model.config.decoder.num_layers)


def test_hostile_vae_configs_folders_and_schedules_are_one_line_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    _tiny_vae(tmp_path / "part")  # a weights file without the decoder half
    weights = tmp_path / "part" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if not k.startswith("decoder.")}, str(weights))
    with pytest.raises(ValueError, match="is missing weights"):
        _model({"vae": str(tmp_path / "part")})
    for key, value in (("scaling_factor", 0), ("scaling_factor", "x"), ("latent_channels", 50000), ("block_out_channels", [])):
        _tiny_vae(tmp_path / "bad")
        cfg = json.loads((tmp_path / "bad" / "config.json").read_text())
        (tmp_path / "bad" / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match="decoder.vae: .*config.json"):
            _model({"vae": str(tmp_path / "bad")})
    _tiny_vae(tmp_path / "v")
    saved = _model({"vae": str(tmp_path / "v"), "patch_size": 2}).save_pretrained(tmp_path / "m")
    cfg = json.loads((saved / "config.json").read_text())
    for elsewhere in (str(tmp_path / "v"), "../v"):  # a saved folder names only its own copy
        cfg["decoder"]["vae"] = elsewhere
        (saved / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match="decoder.vae must name a folder inside the model folder"):
            FoundationModel.from_pretrained(saved)
    pipe = FoundationPipeline(_model({"flow_shift": 50.0}), allow_untrained=True)
    with pytest.raises(ValueError, match="repeated timesteps"):
        pipe(["a red circle"], scheduler="unipc", num_inference_steps=25, show_progress=False)
