"""Evaluation scores for any data: caption n-gram scores (pycocoevalcap), FID/KID (torchmetrics)
over any feature extractor, a CLIP-style score over our own encoders, and a pixel classifier
(scikit-learn) that reads the class of generated images.

The libraries are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

# coco-caption runs Stanford's PTBTokenizer (Java) with -lowerCase, then drops these tokens.
_CONTRACTION = re.compile(r"(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_KEEP = {"n't", "'s", "'re", "'ve", "'ll", "'d", "'m"}


def _tokenize(text: str) -> str:
    """coco-caption's tokenization without Java: lowercase, split PTB contractions ("don't" ->
    "do n't", "dog's" -> "dog 's"), drop punctuation, split on whitespace. Intra-word hyphens stay
    (as in PTB); unlike PTB, "3.5" becomes "3 5" and "u.s." becomes "u s"."""
    text = _CONTRACTION.sub(r"\1 \2", re.sub(r"[^\w\s'-]", " ", text.lower()))
    tokens = (t if t in _KEEP else t.strip("'-") for t in text.split())
    return " ".join(t for t in tokens if t)


def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4, CIDEr-D and ROUGE-L (coco-caption's definitions, via pycocoevalcap) of one
    candidate per image against that image's references. CIDEr-D takes its n-gram IDF from the
    references given, so it is 0 for a single image and only meaningful over a set of images."""
    if isinstance(candidates, str) or any(not isinstance(c, str) for c in candidates):
        raise TypeError("candidates must be a sequence of strings, one per image")
    if isinstance(references, str) or any(isinstance(r, str) for r in references):
        raise TypeError("references must be a sequence of lists of strings (the references of each image)")
    if len(candidates) != len(references):
        raise ValueError(f"candidates and references differ in length: {len(candidates)} != {len(references)}")
    if not candidates:
        raise ValueError("candidates and references are empty: need at least one image")
    res = {i: [_tokenize(c)] for i, c in enumerate(candidates)}
    gts = {i: [_tokenize(r) for r in refs] for i, refs in enumerate(references)}
    for i, refs in gts.items():
        if not any(refs):
            raise ValueError(f"references[{i}] has no non-empty reference")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    with contextlib.redirect_stdout(io.StringIO()):  # BleuScorer prints its counts
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        cider, _ = Cider().compute_score(gts, res)
        rouge, _ = Rouge().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider_d": float(cider), "rouge_l": float(rouge)}


class ImageTowerFeatures(torch.nn.Module):
    """Any image encoder as a FID/KID feature extractor: ``encode`` maps float images [N,3,H,W]
    in [0,1] to features [N,D] (normalization for the model is the caller's job)."""

    def __init__(self, encode: Callable[[Tensor], Tensor], name: str = "own image tower") -> None:
        super().__init__()
        self.encode = encode  # registered as a submodule when it is an nn.Module
        self.name = name

    def forward(self, images: Tensor) -> Tensor:
        out = self.encode(images)
        if out.dim() != 2 or out.shape[0] != images.shape[0]:
            raise ValueError(f"encode must return features [N, D] for N={images.shape[0]} images, got {tuple(out.shape)}")
        return out.float()


class InceptionFeatures(torch.nn.Module):
    """Inception-v3 pool features (2048) of the FID reference network, loaded from a local file
    only (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``); never downloads. Takes
    float images in [0,1], quantizes them to uint8 as torchmetrics does, and resizes to 299 the
    way TensorFlow 1.x did (torch-fidelity), like the original FID code."""

    num_features = 2048

    def __init__(self, weights_path: str | Path) -> None:
        super().__init__()
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights not found: {path} (download them once, e.g. "
                                    "torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as e:
            raise ImportError("InceptionFeatures needs torch-fidelity: pip install 'multimodal-foundation[eval]'") from e
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
        self.name = f"Inception-v3 ({path.name})"

    def forward(self, images: Tensor) -> Tensor:
        return self.net((images.clamp(0, 1) * 255).to(torch.uint8))[0].float()


class _Given(torch.nn.Module):
    """Features already computed: torchmetrics reads ``num_features`` instead of probing the
    module with a dummy 299x299 image, and passes our [N, D] float64 rows straight through."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


def _check_images(images: Tensor, name: str, at_least: int = 2) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"{name} must be float images [N, 3, H, W], got {getattr(images, 'shape', type(images))}")
    if images.shape[0] < at_least:
        raise ValueError(f"{name} has {images.shape[0]} images; at least {at_least} are needed")
    if images.min() < 0 or images.max() > 1:
        raise ValueError(f"{name} must lie in [0, 1], got [{images.min():.3g}, {images.max():.3g}]")


@torch.no_grad()
def _features(features: torch.nn.Module, images: Tensor, batch: int = 256) -> Tensor:
    """Features [N, D] in float64 on the CPU, in eval mode (restored after)."""
    was_training = features.training
    features.eval()
    try:
        out = torch.cat([features(images[i:i + batch]).double().cpu() for i in range(0, len(images), batch)])
    finally:
        features.train(was_training)
    if not torch.isfinite(out).all():
        raise ValueError("the feature extractor returned non-finite features")
    return out


def _fid_kid(f_real: Tensor, f_fake: Tensor, kid_subset_size: int) -> dict[str, float]:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if kid_subset_size < 2:
        raise ValueError(f"kid_subset_size must be at least 2, got {kid_subset_size}")
    size = min(kid_subset_size, len(f_real), len(f_fake))
    # The states are float64 already; feeding float64 features keeps the result (FID returns in
    # the features' dtype) and KID's kernel in float64. set_dtype would also cast the extractor.
    fid = FrechetInceptionDistance(feature=_Given(f_real.shape[1]), normalize=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=_Given(f_real.shape[1]), subset_size=size, normalize=True)
    for metric in (fid, kid):
        metric.update(f_real, real=True)
        metric.update(f_fake, real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global generator
        torch.manual_seed(0)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


def fid_kid(real: Tensor, fake: Tensor, features: torch.nn.Module, kid_subset_size: int = 50) -> dict[str, float]:
    """FID and KID (mean, std over 100 seeded subsets) between float images [N,3,H,W] in [0,1],
    in the space of ``features`` (torchmetrics), computed in float64. The KID subset size is
    clamped to the smaller set; with identical sets KID is the unbiased estimate, slightly < 0."""
    _check_images(real, "real")
    _check_images(fake, "fake")
    return _fid_kid(_features(features, real), _features(features, fake), kid_subset_size)


def real_floor(real: Tensor, features: torch.nn.Module, kid_subset_size: int = 50) -> dict[str, float]:
    """FID/KID between two random halves of the real images (seed 0): the score a perfect
    generator would get with this many images, since both scores are biased by the sample size."""
    _check_images(real, "real", at_least=4)
    f = _features(features, real)
    perm = torch.randperm(len(f), generator=torch.Generator().manual_seed(0))
    half = len(f) // 2
    return _fid_kid(f[perm[:half]], f[perm[half:]], kid_subset_size)


def clip_style_score(image_features: Tensor, text_features: Tensor) -> float:
    """Mean over pairs of 100 * max(cos, 0), CLIPScore on our own encoders' features. Written by
    hand: torchmetrics' CLIPScore needs a Hugging Face CLIP model (and clamps the mean, not each pair)."""
    if image_features.dim() != 2 or image_features.shape != text_features.shape or len(image_features) == 0:
        raise ValueError(f"image_features and text_features must both be [N, D] with N >= 1, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    cos = torch.nn.functional.cosine_similarity(image_features.double(), text_features.double(), dim=-1)
    return float((100 * cos.clamp(min=0)).mean())


def _one_blas_thread():
    """Single-threaded BLAS: deterministic sums whatever the machine, and no fight with torch's
    spinning OpenMP threads (which made a 2-core fit 15x slower)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


class PixelClassifier:
    """Standardized logistic regression (scikit-learn) on pixels area-downsampled to at most
    ``size`` x ``size``, fitted on real images; reading the class of generated images tells
    whether a class-conditional generator draws the class it was asked for."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._hw: tuple[int, int] | None = None
        self._model = None

    def _pixels(self, images: Tensor, name: str = "images"):
        if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"{name} must be float images [N, C, H, W], got {getattr(images, 'shape', type(images))}")
        hw = self._hw or (min(self.size, images.shape[2]), min(self.size, images.shape[3]))
        x = torch.nn.functional.interpolate(images.detach().float().cpu(), size=hw, mode="area")
        return x.flatten(1).double().numpy(), hw

    def fit(self, images: Tensor, labels: Tensor) -> PixelClassifier:
        """Fit on real images [N,C,H,W] in [0,1] and their integer labels [N]."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self._hw = None
        x, hw = self._pixels(images)
        y = torch.as_tensor(labels).cpu().numpy()
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"labels must be [N] for N={len(x)} images, got shape {tuple(y.shape)}")
        if len(set(y.tolist())) < 2:
            raise ValueError("labels hold fewer than 2 classes: nothing to classify")
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=0))
        with _one_blas_thread():
            self._model = model.fit(x, y)
        self._hw = hw
        return self

    def predict(self, images: Tensor) -> Tensor:
        """Class [N] of each image (resized to the fitted resolution first)."""
        if self._model is None:
            raise RuntimeError("PixelClassifier.predict before fit")
        with _one_blas_thread():
            return torch.as_tensor(self._model.predict(self._pixels(images)[0]))

    def accuracy(self, images: Tensor, labels: Tensor) -> float:
        """Fraction of images whose predicted class is their label."""
        labels = torch.as_tensor(labels).cpu()
        if labels.shape != (len(images),):
            raise ValueError(f"labels must be [N] for N={len(images)} images, got shape {tuple(labels.shape)}")
        return float((self.predict(images) == labels).double().mean())
