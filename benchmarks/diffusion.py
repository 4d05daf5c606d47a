"""The diffusion decoder against bare diffusers, side by side in one process:

1. training step (the objective's draw, forward, MSE, backward, AdamW): our ``Decoder`` (core
   attention processor, memory format from ``DecoderConfig.channels_last``) vs the bare diffusers
   denoiser of the same config and weights (``UNet2DConditionModel`` or, with ``--backbone
   mmdit``, ``SD3Transformer2DModel``; its default processor and memory format);
2. sampling: our ``FoundationPipeline.__call__`` (CFG, the model's scheduler: DPM-Solver++ for
   the UNet, flow-matching Euler for the MMDiT) vs a plain diffusers-style denoising loop over
   the bare denoiser with the same scheduler, prompts and step count.

    python benchmarks/diffusion.py [--backbone unet|mmdit] [--batch 64] [--precision 32 bf16-mixed]

Prints samples/s (images/s) of each and the ratio ours / diffusers, in each precision.
Rounds alternate the order of the two; figures are medians.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import _no_shadow  # noqa: F401  (first: this file's name would shadow the diffusion package)
import torch
import torch.nn.functional as F
import diffusers
from _machine import autocast as precision_autocast, default_device, describe, sync, device_name, positive

from diffusion.schedule import sampling_scheduler
from multimodal import FoundationConfig, FoundationModel, FoundationPipeline


def timed(fn, rounds: int, device: str) -> list[float]:
    out = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backbone", choices=("unet", "mmdit"), default="unet")
    parser.add_argument("--preset", default=None, help="model preset (default: shapes, or shapes_mmdit with --backbone mmdit)")
    parser.add_argument("--batch", type=positive, default=64)
    parser.add_argument("--bf16-batch", type=positive, default=8)
    parser.add_argument("--steps", type=positive, default=3, help="training steps per round")
    parser.add_argument("--sample-steps", type=positive, default=25)
    parser.add_argument("--images", type=positive, default=16, help="images per sampling call")
    parser.add_argument("--rounds", type=positive, default=8, help="timed rounds (medians; fewer are noisy on 2 cores)")
    parser.add_argument("--precision", nargs="+", default=["32", "bf16-mixed"], choices=["32", "bf16-mixed"])
    parser.add_argument("--device", type=device_name, default=default_device(), help="cpu or cuda (cuda when present)")
    args = parser.parse_args()

    torch.manual_seed(0)
    preset = args.preset or ("shapes_mmdit" if args.backbone == "mmdit" else "shapes")
    model = FoundationModel(FoundationConfig.from_preset(preset, {"decoder": {"backbone": args.backbone}})).eval().to(args.device)
    cfg = model.config.decoder
    if cfg.vae is not None:
        parser.error("the benchmark compares denoisers in pixel space: use a preset without decoder.vae")
    mine = model.decoder.denoiser
    bare = getattr(diffusers, type(mine).__name__).from_config(mine.config)
    bare.load_state_dict(mine.state_dict())
    bare.to(args.device)
    scheduler = model.config.sampling.scheduler
    print(f"preset={preset} backbone={cfg.backbone} objective={cfg.objective} scheduler={scheduler} "
          f"decoder params={sum(p.numel() for p in bare.parameters()) / 1e6:.2f}M")
    print(describe(args.device))

    def bare_call(x, t, c, labels):  # the call a diffusers user writes for this denoiser
        if cfg.backbone == "mmdit":
            return bare(hidden_states=x, encoder_hidden_states=c.states, pooled_projections=labels, timestep=t).sample
        return bare(x, t, encoder_hidden_states=c.states, class_labels=labels).sample

    for precision in args.precision:
        bf16 = precision == "bf16-mixed"
        autocast = lambda: precision_autocast(args.device, precision)  # noqa: E731
        batch = args.bf16_batch if bf16 else args.batch
        images = torch.rand(batch, *model.decoder.sample_shape, device=args.device) * 2 - 1
        with torch.no_grad():
            cond = model.text_condition(["a small red circle at the top left"] * batch)
        labels = model.decoder.class_labels(cond.embeds)

        def make_train(unet_call, params):
            opt = torch.optim.AdamW(params, lr=1e-4)

            def run():
                for i in range(args.steps):
                    task = model.objective.draw(images, torch.Generator(args.device).manual_seed(i))
                    with autocast():
                        pred = unet_call(task.noisy, task.timesteps, cond)
                        loss = F.mse_loss(pred.float(), task.target)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            return run

        model.decoder.train()
        bare.train()
        trains = {
            "ours": make_train(model.decoder, model.decoder.parameters()),
            "diffusers": make_train(lambda x, t, c: bare_call(x, t, c, labels), bare.parameters()),
        }
        model.decoder.eval()
        bare.eval()
        n_img = min(args.images, batch) if bf16 else args.images
        prompts = ["a small red circle at the top left", "a large blue square in the center"] * (n_img // 2)
        pipe = FoundationPipeline(model, scheduler=scheduler)

        def ours_sample():
            with autocast():
                pipe(prompts, num_inference_steps=args.sample_steps, guidance_scale=3.0, show_progress=False,
                     generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))], output_type="pt")

        @torch.no_grad()
        def diffusers_sample():  # the loop a diffusers user writes around the same UNet and scheduler
            with autocast():
                sched = sampling_scheduler(scheduler, cfg)
                both = model.text_condition([""] * len(prompts)).cat(model.text_condition(prompts))
                both_labels = model.decoder.class_labels(both.embeds)
                gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
                x = torch.stack([torch.randn(images.shape[1:], generator=g) for g in gens]).to(args.device) * getattr(sched, "init_noise_sigma", 1.0)
                sched.set_timesteps(args.sample_steps, device=args.device)
                for t in sched.timesteps:
                    inp = torch.cat([x, x])
                    inp = sched.scale_model_input(inp, t) if hasattr(sched, "scale_model_input") else inp
                    u, c = bare_call(inp, t.expand(len(inp)), both, both_labels).float().chunk(2)
                    x = sched.step(u + 3.0 * (c - u), t, x).prev_sample

        for label, fns, count in (("train step", trains, batch * args.steps), ("sampling", {"ours": ours_sample, "diffusers": diffusers_sample}, n_img)):
            for fn in fns.values():
                fn()  # warm-up
            times: dict[str, list[float]] = {k: [] for k in fns}
            for r in range(args.rounds):
                for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                    with (contextlib.nullcontext() if label == "train step" else torch.inference_mode()):
                        times[name] += timed(fns[name], 1, args.device)
            o, d = (count / statistics.median(times[k]) for k in ("ours", "diffusers"))
            unit = "samples/s" if label == "train step" else "images/s"
            print(f"precision={precision:<10} {label:<10} batch={count if label == 'sampling' else batch:<4} "
                  f"ours {o:8.2f} {unit} | diffusers {d:8.2f} {unit} | ratio {o / d:.3f}x", flush=True)


if __name__ == "__main__":
    main()
