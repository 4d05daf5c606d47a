"""One full CLIP training step (forward, contrastive loss, backward, AdamW) of our shared
encoders against an open_clip CLIP of identical size, side by side in one process with the same
batch, threads and precision. Prints samples/s of each and the ratio (ours / open_clip).

    python benchmarks/clip_step.py [--preset shapes] [--batch 128] [--steps 10] [--precision 32 bf16-mixed]

Rounds alternate between the two models, in alternating order, so that machine noise and
warm-up hit both alike; the figure is the median over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import open_clip
import _no_shadow  # noqa: F401  (first: keeps benchmarks/diffusion.py from shadowing the package)
import torch
from open_clip.loss import ClipLoss

from _machine import autocast, default_device, describe, sync, device_name, positive
from encoders import DualEncoder
from encoders.open_clip_import import encoder_config_from_open_clip
from multimodal.config import PRESETS, FoundationConfig, merge_dicts


def open_clip_cfg(cfg: FoundationConfig) -> dict:
    """open_clip model config with exactly our sizes."""
    return dict(
        embed_dim=cfg.embed_dim,
        vision_cfg=dict(image_size=cfg.image.image_size, patch_size=cfg.image.patch_size, width=cfg.image.width,
                        layers=cfg.image.layers, head_width=cfg.image.width // cfg.image.heads, mlp_ratio=cfg.image.mlp_ratio),
        text_cfg=dict(context_length=cfg.text.context_length, vocab_size=cfg.text.vocab_size, width=cfg.text.width,
                      heads=cfg.text.heads, layers=cfg.text.layers, mlp_ratio=cfg.text.mlp_ratio),
    )


def make_step(encode, params, precision: str, device: str):
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)

    def step(images, tokens):
        with autocast(device, precision):
            img, txt, scale = encode(images, tokens)
            loss = loss_fn(torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1), scale)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="shapes", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=positive, default=128)
    parser.add_argument("--steps", type=positive, default=6, help="timed steps per model per round")
    parser.add_argument("--rounds", type=positive, default=3)
    parser.add_argument("--precision", nargs="+", default=["32", "bf16-mixed"], choices=["32", "bf16-mixed"])
    parser.add_argument("--device", type=device_name, default=default_device(), help="cpu or cuda (cuda when present)")
    parser.add_argument("--bf16-batch", type=positive, default=None, help="batch for bf16-mixed (default: --batch)")
    parser.add_argument("--no-trim", action="store_true",
                        help="run our text tower over all context positions, as open_clip does (trim_padding=False)")
    args = parser.parse_args()

    cfg = FoundationConfig.from_preset(args.preset)
    oc_cfg = open_clip_cfg(cfg)
    torch.manual_seed(0)
    ref = open_clip.CLIP(**oc_cfg).train().to(args.device)
    ours_cfg = FoundationConfig.from_dict(merge_dicts(encoder_config_from_open_clip(oc_cfg), {"text": {"trim_padding": not args.no_trim}}))
    ours = DualEncoder(ours_cfg).train().to(args.device)
    n_ours, n_ref = (sum(p.numel() for p in m.parameters()) for m in (ours, ref))
    assert n_ours == n_ref, (n_ours, n_ref)
    print(f"preset={args.preset} trim_padding={not args.no_trim} params={n_ours / 1e6:.2f}M open_clip={open_clip.__version__}")
    print(describe(args.device))

    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg.text.context_length)
    words = ["red", "blue", "small", "large", "circle", "square", "at", "the", "top", "left"]
    for precision in args.precision:
        batch = args.bf16_batch if precision == "bf16-mixed" and args.bf16_batch else args.batch
        g = torch.Generator().manual_seed(1)
        images = torch.randn(batch, 3, cfg.image.image_size, cfg.image.image_size, generator=g).to(args.device)
        captions = [" ".join(words[j] for j in torch.randint(len(words), (6,), generator=g)) for _ in range(batch)]
        tokens = tokenizer(captions).to(args.device)
        steps = {
            "ours": make_step(lambda i, t: (ours.image(i)[1], ours.text(t)[1], ours.logit_scale.exp()), ours.parameters(), precision, args.device),
            "open_clip": make_step(lambda i, t: (ref.encode_image(i), ref.encode_text(t), ref.logit_scale.exp()), ref.parameters(), precision, args.device),
        }
        rates: dict[str, list[float]] = {name: [] for name in steps}
        for name, step in steps.items():
            step(images, tokens)  # warm-up
        for r in range(args.rounds):
            for name, step in (list(steps.items()) if r % 2 == 0 else list(steps.items())[::-1]):
                sync(args.device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(images, tokens)
                sync(args.device)
                rates[name].append(batch * args.steps / (time.perf_counter() - start))
        o, r = statistics.median(rates["ours"]), statistics.median(rates["open_clip"])
        print(f"precision={precision:<10} batch={batch:<4} ours {o:8.1f} samples/s | open_clip {r:8.1f} samples/s | ratio {o / r:.3f}x", flush=True)


if __name__ == "__main__":
    main()
