"""Caption generation speed, side by side in one process:

1. our language head with the KV cache vs the same model recomputing the whole prefix every
   step (``use_cache=False``): same greedy tokens, the cache's speed-up;
2. against open_clip's CoCa ``generate`` (greedy: ``generation_type="top_k", top_k=1``) at the
   same widths, depths, heads, vocabulary and image tower (random init; open_clip recomputes
   the prefix each step).

    python benchmarks/caption.py [--batches 1 8 32] [--coca-batch 8] [--new-tokens 32] [--width 512]

Each cached step reads every weight once for only ``batch`` new positions, so at small batches
on a CPU with little memory bandwidth the cache's gain is bounded by weight reads; it grows
with the batch (the uncached path recomputes the whole prefix).

Defaults are CoCa-Base's text side (512 wide, 12 unimodal + 12 multimodal layers, 8 heads) with
a ViT-B/32 image tower. At small widths the 49408-way output projection, the same with or
without the cache, dominates each step and the cache's gain shrinks (try ``--width 256
--layers 4``).

Every run generates exactly ``--new-tokens`` tokens per image (end-of-text is held back until
then: ``min_new_tokens`` here, ``min_seq_len`` in open_clip). Prints tokens/s and ratios;
rounds alternate the order, figures are medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import _no_shadow  # noqa: F401  (first: keeps benchmarks/diffusion.py from shadowing the package)
import torch
import transformers
from open_clip import coca_model
from open_clip.coca_model import CoCa, MultimodalCfg
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from _machine import autocast, default_device, describe, sync, device_name, positive
from multimodal import FoundationConfig, FoundationModel, FoundationPipeline


def _enable_coca_greedy() -> None:
    """open_clip's CoCa imports ``BeamSearchScorer``, which transformers 5 removed, and then
    disables ``generate`` altogether. Its greedy / top-k path only needs the logits processors
    and stopping criteria, which transformers 5 still has: give them to the module."""
    if coca_model._has_transformers:
        return
    for name in ("LogitsProcessorList", "TopPLogitsWarper", "TopKLogitsWarper", "RepetitionPenaltyLogitsProcessor",
                 "MinLengthLogitsProcessor", "MaxLengthCriteria", "StoppingCriteriaList"):
        setattr(coca_model, name, getattr(transformers, name))
    coca_model.GENERATION_TYPES.update(top_k=transformers.TopKLogitsWarper, top_p=transformers.TopPLogitsWarper)
    coca_model._has_transformers = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batches", type=positive, nargs="+", default=[1, 8, 32], help="batch sizes for cache vs no cache")
    parser.add_argument("--coca-batch", type=positive, default=8, help="batch size for the open_clip comparison")
    parser.add_argument("--new-tokens", type=positive, default=32)
    parser.add_argument("--width", type=positive, default=512, help="text encoder and language head width")
    parser.add_argument("--layers", type=positive, default=12, help="layers of the text encoder, and of the language head")
    parser.add_argument("--heads", type=positive, default=8)
    parser.add_argument("--image-size", type=positive, default=224)
    parser.add_argument("--patch-size", type=positive, default=32)
    parser.add_argument("--image-width", type=positive, default=768)
    parser.add_argument("--image-layers", type=positive, default=12)
    parser.add_argument("--image-heads", type=positive, default=12)
    parser.add_argument("--rounds", type=positive, default=2)
    parser.add_argument("--precision", nargs="+", default=["32", "bf16-mixed", "bf16-true"], choices=["32", "bf16-mixed", "bf16-true"],
                        help="bf16-mixed: autocast (casts every weight at every step); bf16-true: both models' weights in bf16")
    parser.add_argument("--device", type=device_name, default=default_device(), help="cpu or cuda (cuda when present)")
    args = parser.parse_args()
    _enable_coca_greedy()
    ctx = 77
    torch.manual_seed(0)
    w, n, h = args.width, args.layers, args.heads
    iw, il, ih = args.image_width, args.image_layers, args.image_heads
    ours = FoundationModel(FoundationConfig.from_dict({
        "embed_dim": w,
        "text": {"context_length": ctx, "width": w, "layers": n, "heads": h},
        "image": {"image_size": args.image_size, "patch_size": args.patch_size, "width": iw, "layers": il, "heads": ih},
        "language": {"layers": n, "heads": h},
    })).eval().to(args.device)
    coca = CoCa(
        embed_dim=w,
        multimodal_cfg=MultimodalCfg(context_length=ctx - 1, width=w, heads=h, layers=n),
        text_cfg=CLIPTextCfg(context_length=ctx - 1, width=w, heads=h, layers=n, embed_cls=True, output_tokens=True),
        vision_cfg=CLIPVisionCfg(image_size=args.image_size, patch_size=args.patch_size, width=iw, layers=il,
                                 head_width=iw // ih, attentional_pool=True, output_tokens=True),
    ).eval().to(args.device)
    pipe = FoundationPipeline(ours)
    k = args.new_tokens
    print(f"new_tokens={k} width={w} layers={n}+{n} heads={h} vocab=49408 "
          f"image={args.image_size}px/{args.patch_size} width={iw} layers={il} "
          f"params ours={sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M "
          f"open_clip CoCa={sum(p.numel() for p in coca.parameters()) / 1e6:.1f}M")
    print(describe(args.device))

    def run_ours(images, cache: bool):
        return lambda: pipe.caption(images, max_new_tokens=k, min_new_tokens=k, use_cache=cache)

    def run_coca(images):
        # seq_len counts the start token; min_seq_len holds end-of-text back until k new tokens
        return lambda: coca.generate(images, seq_len=k + 1, generation_type="top_k", top_k=1, min_seq_len=k)

    def rates(fns: dict, batch: int) -> dict[str, float]:
        times: dict[str, list[float]] = {name: [] for name in fns}
        for r in range(args.rounds):
            for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                sync(args.device)
                start = time.perf_counter()
                fns[name]()
                sync(args.device)
                times[name].append(time.perf_counter() - start)
        return {name: batch * k / statistics.median(t) for name, t in times.items()}

    for precision in args.precision:
        dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
        pipe.to(dtype=dtype)
        coca.to(dtype=dtype)
        with torch.inference_mode(), autocast(args.device, precision):
            probe = torch.rand(2, 3, args.image_size, args.image_size, device=args.device, dtype=dtype)
            same = run_ours(probe, True)() == run_ours(probe, False)()  # bf16 rounds the two paths differently
            assert same or precision != "32", "cached and uncached greedy tokens differ"
            assert run_coca(probe)().shape[1] == k + 1  # also the warm-up
            for batch in args.batches:
                images = torch.rand(batch, 3, args.image_size, args.image_size, device=args.device, dtype=dtype)
                r = rates({"cache": run_ours(images, True), "no cache": run_ours(images, False)}, batch)
                print(f"precision={precision:<10} batch={batch:<3} ours KV cache {r['cache']:7.1f} tokens/s | ours no cache {r['no cache']:7.1f} tokens/s"
                      f" | ratio {r['cache'] / r['no cache']:.2f}x", flush=True)
            images = torch.rand(args.coca_batch, 3, args.image_size, args.image_size, device=args.device, dtype=dtype)
            r = rates({"ours": run_ours(images, True), "ours no cache": run_ours(images, False), "coca": run_coca(images)}, args.coca_batch)
            print(f"precision={precision:<10} batch={args.coca_batch:<3} ours KV cache {r['ours']:7.1f} tokens/s | open_clip CoCa generate {r['coca']:7.1f} tokens/s"
                  f" | ratio {r['ours'] / r['coca']:.2f}x (ours without cache: {r['ours no cache'] / r['coca']:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
