"""Evaluation for any data, during ``fit`` (the ``Captioning`` and ``Generation`` evaluators)
and as ``multimodal evaluate --model DIR --data PATH [--out report/]``.

What is measured, each with the features it used named beside it:

- retrieval R@1/5/10 both ways over the split's unique captions; zero-shot accuracy where the
  data has classes (class subfolders);
- captions: greedy captions of the validation images against their reference captions, BLEU-4,
  CIDEr-D and ROUGE-L (pycocoevalcap);
- generation: one image per validation caption (seeded, the model's sampling settings), FID and
  KID (torchmetrics) against the validation images on the model's own image-tower features (or
  Inception-v3 from a local weights file), beside the real-vs-real floor (two halves of the
  validation images) and the same scores for an untrained decoder; a CLIP-style score with the
  model's own encoders; where the data has classes, the class of each generated image as read
  by a scikit-learn classifier fitted on the real training pixels (which the model under test
  did not shape), beside that classifier's accuracy on the real validation images.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from multimodal import scores
from multimodal.knowledge import trained_components
from multimodal.pipeline import FoundationPipeline

from .evaluation import Evaluator, Retrieval, SplitInfo, ValidationData, ZeroShot
from .grid import text_grid

MAX_CLASSIFIER_IMAGES = 5000  # real training images the pixel classifier is fitted on


# ---- generating -----------------------------------------------------------------------------------
@torch.no_grad()
def generate_fixed(model: Any, prompts: list[str], device: torch.device, batch: int = 128, **settings: Any) -> torch.Tensor:
    """Images [N, C, S, S] in [0, 1] with the model's recommended sampling settings (or the
    ``settings`` given: ``scheduler``, ``num_inference_steps``, ``guidance_scale``), image i
    seeded with i (comparable across validations, and with the API, CLI and demo). Samples that
    are not finite come back black with a warning: an unstable decoder scores badly instead of
    stopping a run."""
    pipe, out = FoundationPipeline(model, allow_untrained=True), []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        with warnings.catch_warnings():  # evaluation prompts are ours: no filter needed
            warnings.filterwarnings("ignore", message="generating without a prompt filter")
            try:
                gens = [torch.Generator(device).manual_seed(start + i) for i in range(len(chunk))]
                out.append(pipe(chunk, output_type="pt", show_progress=False, generator=gens, **settings).images)
            except FloatingPointError as err:
                warnings.warn(f"evaluation samples are not finite ({err}); scored as black images")
                size = model.config.decoder.image_size
                out.append(torch.zeros(len(chunk), model.config.decoder.channels, size, size))
    return torch.cat(out)


def untrained_decoder(model: Any) -> Any:
    """A copy of ``model`` whose decoder is freshly initialized (seed 0): the baseline FID."""
    from diffusion.decoder import Decoder

    baseline = copy.deepcopy(model)
    torch.manual_seed(0)
    cfg = model.config
    baseline.decoder = Decoder(cfg.decoder, cfg.text.width, cfg.embed_dim, cfg.attention_backend, model.decoder.vae).to(model.pixel_mean.device)
    return baseline.eval()


# ---- the measurements -----------------------------------------------------------------------------
def alignment_metrics(model: Any, data: ValidationData) -> dict[str, float]:
    """Retrieval R@1/5/10 and zero-shot accuracy (the fit evaluators'), each beside chance."""
    metrics = {**Retrieval(ks=(1, 5, 10)).evaluate(model, data, None, None), **ZeroShot().evaluate(model, data, None, None)}
    if "i2t_R@1" in metrics:
        metrics["retrieval_chance_R@1"] = 1 / len(data.caption_features())
    if "zero_shot_acc" in metrics:
        metrics["zero_shot_chance"] = 1 / len(data.info.class_prompts)
    return metrics


@torch.no_grad()
def caption_metrics(model: Any, data: ValidationData, limit: int | None = None,
                    max_new_tokens: int = 16) -> tuple[dict[str, float], list[str]]:
    """Greedy captions of the validation images against their reference captions
    (``caption_<score>`` metrics, the captions made)."""
    captions = data.info.captions or []
    n = len(data.groups) if limit is None else min(limit, len(data.groups))
    if model.language is None or n == 0 or not captions:
        return {}, []
    pipe, made = FoundationPipeline(model, allow_untrained=True), []
    for start in range(0, n, 64):
        made += pipe.caption(list(data.images(torch.arange(start, min(start + 64, n)))), max_new_tokens=max_new_tokens)
    references = [[captions[int(g)]] for g in data.groups[:n]]
    return {f"caption_{k}": v for k, v in scores.caption_scores(made, references).items()}, made


def class_reader(images: torch.Tensor, labels: torch.Tensor) -> scores.PixelClassifier | None:
    """The pixel classifier of the real training images (None: fewer than two classes)."""
    if len(labels) == 0 or len(torch.unique(labels)) < 2:
        return None
    return scores.PixelClassifier().fit(images, labels)


@torch.no_grad()
def generation_metrics(model: Any, data: ValidationData, reader: scores.PixelClassifier | None = None,
                       extra_features: dict[str, torch.nn.Module] | None = None, limit: int | None = None,
                       baseline: bool = True) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Generated images for the validation captions scored against the validation images, on
    the model's own image features (``gen_<score>_own``) and each of ``extra_features``
    (``gen_<score>_<name>``): (metrics, generated [n, C, S, S], real [n, C, S, S])."""
    captions = data.info.captions or []
    n = len(data.groups) if limit is None else min(limit, len(data.groups))
    if model.decoder is None or n < 2 or not captions:
        return {}, torch.empty(0), torch.empty(0)
    device = model.pixel_mean.device
    prompts = [captions[int(g)] for g in data.groups[:n]]
    real = data.images(torch.arange(n))
    fake = generate_fixed(model, prompts, device)
    base = generate_fixed(untrained_decoder(model), prompts, device) if baseline else None
    own = scores.ImageTowerFeatures(lambda x: model.encode_image(x.to(device)).float().cpu())
    metrics: dict[str, float] = {}
    for tag, features in {"own": own, **(extra_features or {})}.items():
        metrics.update({f"gen_{k}_{tag}": v for k, v in scores.fid_kid(real, fake, features).items()})
        if n >= 4:  # two halves of at least two images each
            metrics.update({f"gen_{k}_{tag}_real_floor": v for k, v in scores.real_floor(real, features).items()})
        if base is not None:
            metrics.update({f"gen_{k}_{tag}_untrained_decoder": v for k, v in scores.fid_kid(real, base, features).items()})
    text = model.encode_text(prompts).float().cpu()
    metrics["gen_clip_score_own"] = scores.clip_style_score(own(fake), text)
    metrics["gen_clip_score_own_real"] = scores.clip_style_score(own(real), text)
    labels = data.labels[:n]
    if reader is not None and bool((labels >= 0).all()):
        metrics["gen_class_acc"] = reader.accuracy(fake, labels)
        metrics["gen_real_val_class_acc"] = reader.accuracy(real, labels)
    return metrics, fake, real


# ---- evaluators for fit ---------------------------------------------------------------------------
class Captioning(Evaluator):
    """BLEU-4 / CIDEr-D / ROUGE-L of greedy captions of (at most ``num_images``) validation images."""

    rank_zero_only = True
    needs_pixels = True

    def __init__(self, num_images: int = 128):
        self.num_images = num_images

    def evaluate(self, model, data, generator, out_dir):
        return caption_metrics(model, data, self.num_images)[0]


class Generation(Evaluator):
    """FID / KID on the model's own image features, CLIP-style score and (data with classes)
    the class accuracy of images generated for (at most ``num_images``) validation captions."""

    rank_zero_only = True
    needs_pixels = True

    def __init__(self, num_images: int = 128):
        self.num_images = num_images
        self.reader: scores.PixelClassifier | None = None
        self.fitted = False

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not self.fitted and trainer.is_global_zero and trainer.datamodule is not None:
            self.reader = class_reader(*labeled_training_images(trainer.datamodule))
            self.fitted = True

    def evaluate(self, model, data, generator, out_dir):
        return generation_metrics(model, data, self.reader, limit=self.num_images, baseline=False)[0]


def labeled_training_images(dm: Any, limit: int = MAX_CLASSIFIER_IMAGES) -> tuple[torch.Tensor, torch.Tensor]:
    """Real training images [n, 3, S, S] with their class (as the validation classes are read),
    at most ``limit``, spread evenly over the split."""
    labels = dm.train_labels() if hasattr(dm, "train_labels") else []
    picked = [i for i, label in enumerate(labels) if label >= 0]
    images, kept = [], []
    for i in picked[:: max(1, len(picked) // limit)][:limit]:
        item = dm.train_set[i]
        if "bad" not in item:
            images.append(item["image"])
            kept.append(labels[i])
    if not images:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.stack(images), torch.tensor(kept)


# ---- the report -----------------------------------------------------------------------------------
FEATURES_NOTE = {
    "own": "the evaluated model's own image tower (unit embeddings); comparable between runs of one model only",
    "inception": "Inception-v3 pool features from the given weights file (comparable with published FIDs only at their image size and count)",
}


def write_report(out: Path, metrics: dict[str, float], about: dict[str, Any], data: ValidationData,
                 made_captions: list[str], fake: torch.Tensor, real: torch.Tensor, top_captions: list[str]) -> list[Path]:
    """``report.json``, ``report.md`` and the PNGs; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"metrics": metrics, **about}, indent=2) + "\n")
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items())
    notes = "\n".join(f"- `{k}`: {v}" for k, v in about.get("notes", {}).items())
    (out / "report.md").write_text(
        f"# Evaluation of `{about['model']}` on `{about['data']}`\n\n{about['summary']}\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n\n{notes}\n")
    written = [out / "report.json", out / "report.md"]
    n = min(24, len(data.groups))
    refs = data.info.captions or []
    if n and data.pixels is not None:
        lines = [[("ref: " + refs[int(data.groups[i])], (0, 0, 0))]
                 + ([("top: " + top_captions[i], (0, 90, 160))] if top_captions else [])
                 + ([("gen: " + made_captions[i], (140, 0, 140))] if i < len(made_captions) else []) for i in range(n)]
        text_grid(data.images(torch.arange(n)), lines).save(out / "captions.png")
        written.append(out / "captions.png")
    if len(fake):
        k = min(24, len(fake))
        pairs = torch.stack([real[:k], fake[:k]], dim=1).flatten(0, 1)  # real, generated, real, ...
        lines = [[(("real: " if j % 2 == 0 else "generated: ") + refs[int(data.groups[j // 2])], (0, 0, 0))] for j in range(2 * k)]
        text_grid(pairs, lines, columns=8).save(out / "generated.png")
        written.append(out / "generated.png")
    return written


def top_captions(data: ValidationData) -> list[str]:
    """Each validation image's nearest caption among the split's unique captions."""
    text = data.caption_features()
    if text is None or not data.info.captions:
        return []
    return [data.info.captions[int(i)] for i in (data.image_features @ text.T).argmax(dim=1)]


def summary_for(model: Any) -> tuple[list[str], list[str]]:
    """(trained components, skipped parts with why)."""
    trained = trained_components(model.config)
    skipped = [f"{part}: not trained (config.json training record)" for part in ("decoder", "language")
               if getattr(model.config, part) is not None and part not in trained]
    return trained, skipped


__all__ = ["Captioning", "Generation", "SplitInfo", "alignment_metrics", "caption_metrics", "generation_metrics",
           "generate_fixed", "write_report", "labeled_training_images", "class_reader", "top_captions", "summary_for"]
