"""Evaluation scores (multimodal.scores) on tiny hand-checkable inputs."""

from __future__ import annotations

import math
import subprocess
import sys
from unittest import mock

import pytest
import torch

from multimodal.scores import (ImageTowerFeatures, InceptionFeatures, PixelClassifier, caption_scores,
                               clip_style_score, fid_kid, real_floor)

EPS64 = torch.finfo(torch.float64).eps


def _tower(dim: int = 8) -> ImageTowerFeatures:
    """Deterministic features: a fixed random projection of 4x4 average-pooled pixels."""
    w = torch.randn(3 * 4 * 4, dim, generator=torch.Generator().manual_seed(1)) / math.sqrt(3 * 4 * 4)
    return ImageTowerFeatures(lambda x: torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1) @ w, name="proj")


def _images(n: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _feats(tower: ImageTowerFeatures, x: torch.Tensor) -> torch.Tensor:
    return tower(x).double()


def test_fid_kid_identical_sets_are_zero():
    tower, x = _tower(), _images()
    out = fid_kid(x, x, tower)
    f = _feats(tower, x)
    m, d = f.shape
    cov = torch.cov(f.T)
    # Identical sets give identical means and covariances; what remains is FID's
    # tr(S1 + S2 - 2 sqrt(S1 S2)) with sqrt taken of eigvals(S @ S), whose rounding error is
    # ~d*eps*|S|^2, i.e. up to sqrt(d*eps)*|S| per eigenvalue after the square root.
    assert abs(out["fid"]) <= 2 * d * math.sqrt(d * EPS64) * torch.linalg.matrix_norm(cov, 2).item()
    # KID is the unbiased MMD estimate; with subset size = N (50 clamped to 32) every subset is the
    # whole set, so it equals 2(S - T)/(m(m-1)) - 2S/m^2 (S: kernel sum, T: its trace), which is
    # <= 0 and O(1/m). Tolerance: worst-case float64 summation error of m^2 kernel entries.
    k = (f @ f.T / d + 1) ** 3
    s, t = k.sum().item(), k.trace().item()
    expected = 2 * (s - t) / (m * (m - 1)) - 2 * s / m**2
    tol = 4 * m**2 * EPS64 * k.abs().max().item()
    assert out["kid"] == pytest.approx(expected, abs=tol)
    assert expected <= 0 and abs(expected) <= 2 * k.diagonal().max().item() / (m - 1)
    assert out["kid_std"] <= tol


def test_fid_kid_different_sets():
    tower, x = _tower(), _images()
    y = (x + 0.4).clamp(max=1.0)  # brighter
    out = fid_kid(x, y, tower)
    a, b = _feats(tower, x), _feats(tower, y)
    # FID = |mu_a - mu_b|^2 + a squared Bures distance (>= 0) between the covariances
    mean_gap = (a.mean(0) - b.mean(0)).square().sum().item()
    assert mean_gap > 0.1
    assert out["fid"] >= mean_gap * (1 - 1e-9)
    # and it is the Frechet distance computed independently (scipy's sqrtm, float64)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    ca, cb = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    ref = mean_gap + float(ca.trace() + cb.trace() - 2 * scipy_linalg.sqrtm(ca @ cb).real.trace())
    assert out["fid"] == pytest.approx(ref, rel=1e-6)
    assert out["kid"] > 0 and math.isfinite(out["kid_std"])
    # KID's random subsets are seeded, and drawing them leaves the global generator alone
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    sub = fid_kid(x, y, tower, kid_subset_size=10)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(7)
    assert fid_kid(x, y, tower, kid_subset_size=10) == sub and sub["kid_std"] > 0


def test_real_floor_is_finite_and_below_a_real_gap():
    tower, x = _tower(), _images(40)
    floor = real_floor(x, tower)
    assert all(math.isfinite(v) for v in floor.values())
    assert floor["fid"] >= 0 and floor["kid_std"] >= 0  # KID may dip below 0: it is unbiased
    assert floor == real_floor(x, tower)  # seeded split
    assert floor["fid"] < fid_kid(x, (x + 0.4).clamp(max=1.0), tower)["fid"]


def test_fid_kid_bad_inputs():
    tower, x = _tower(), _images(4)
    with pytest.raises(ValueError, match="fake"):
        fid_kid(x, x[:1], tower)
    with pytest.raises(ValueError, match="real"):
        fid_kid(x * 2 - 1, x, tower)  # [-1, 1] images
    with pytest.raises(ValueError, match="real"):
        fid_kid(x[:, :1], x, tower)
    with pytest.raises(ValueError, match="kid_subset_size"):
        fid_kid(x, x, tower, kid_subset_size=1)
    with pytest.raises(ValueError, match="real"):
        real_floor(x[:3], tower)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        fid_kid(x, x, ImageTowerFeatures(lambda im: im))


def test_inception_features_needs_a_local_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        InceptionFeatures(tmp_path / "nowhere.pth")
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")
    with mock.patch.dict(sys.modules, {"torch_fidelity": None, "torch_fidelity.feature_extractor_inceptionv3": None}):
        with pytest.raises(ImportError, match="torch-fidelity"):
            InceptionFeatures(weights)


def test_inception_features_wiring_with_random_weights(tmp_path):
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    with mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        net = fe.FeatureExtractorInceptionV3("x", ["2048"], feature_extractor_weights_path=str(empty))
    path = tmp_path / "weights-inception-random.pth"
    torch.save(net.state_dict(), path)
    inception = InceptionFeatures(path)
    assert inception.name == "Inception-v3 (weights-inception-random.pth)"
    inception.net.INPUT_IMAGE_SIZE = 75  # the smallest Inception-v3 takes: keeps this wiring check fast
    out = inception(_images(3))
    assert out.shape == (3, 2048) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_bleu4_hand_computed():
    # identical: every n-gram precision is k/(k + 1e-9) (pycocoevalcap's smoothing), so 1 - O(1e-10)
    same = caption_scores(["A dog runs on grass."], [["a dog runs on grass"]])
    assert same["bleu4"] == pytest.approx(1.0, abs=1e-8)
    # "a black cat sat on the mat" vs "a white cat sat on the mat", equal lengths (no brevity
    # penalty): 1-grams 6/7, 2-grams 4/6, 3-grams 3/5, 4-grams 2/4 -> (6/7*4/6*3/5*2/4)^(1/4) = (6/35)^(1/4)
    out = caption_scores(["a black cat sat on the mat"], [["a white cat sat on the mat"]])
    assert out["bleu4"] == pytest.approx((6 / 35) ** 0.25, rel=1e-8)


def test_rouge_l_hand_computed():
    # LCS("a cat on the mat", "a black cat sat on the mat") = 5 -> P = 5/5, R = 5/7;
    # F = (1 + 1.2^2) P R / (R + 1.2^2 P) = 2.44 * 5/7 / (5/7 + 1.44) = 12.2 / 15.08 = 305/377
    out = caption_scores(["A cat, on the mat!"], [["a black cat sat on the mat"]])
    assert out["rouge_l"] == pytest.approx(305 / 377, rel=1e-12)


def test_cider_and_ranking():
    refs = [["a dog runs on the grass", "a brown dog running"], ["a red car on a street", "a car parked"],
            ["two birds on a wire", "birds sitting on a line"]]
    right = caption_scores([r[0] for r in refs], refs)
    wrong = caption_scores([refs[1][0], refs[2][0], refs[0][0]], refs)
    assert right["cider_d"] > 0
    for key in ("bleu4", "cider_d", "rouge_l"):
        assert wrong[key] < right[key], key


def test_empty_candidate_scores_zero():
    out = caption_scores([""], [["a dog runs"]])
    assert out["rouge_l"] == 0 and out["cider_d"] == 0 and out["bleu4"] == pytest.approx(0, abs=1e-6)
    mixed = caption_scores(["", "a dog runs"], [["a cat sleeps"], ["a dog runs"]])
    assert mixed["rouge_l"] == pytest.approx(0.5)


def test_caption_scores_bad_inputs():
    with pytest.raises(ValueError, match="candidates and references"):
        caption_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="candidates"):
        caption_scores([], [])
    with pytest.raises(ValueError, match=r"references\[1\]"):
        caption_scores(["a dog", "a cat"], [["a dog"], []])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        caption_scores(["a dog"], [["..."]])
    with pytest.raises(TypeError, match="references"):
        caption_scores(["a dog"], ["a dog"])  # flat list of strings


def test_clip_style_score():
    e = torch.eye(4)
    assert clip_style_score(e, e) == pytest.approx(100.0)
    assert clip_style_score(e, e.roll(1, dims=0)) == pytest.approx(0.0)
    # clamped per pair (CLIPScore as defined by Hessel et al.): (100 + 0) / 2
    assert clip_style_score(e[:2], torch.stack([e[0], -e[1]])) == pytest.approx(50.0)
    assert clip_style_score(3 * e, e) == pytest.approx(100.0)  # cosine, not dot product
    with pytest.raises(ValueError, match="image_features and text_features"):
        clip_style_score(e, e[:3])


def _left_right(n: int, seed: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    x = 0.3 * torch.rand(n, 3, size, size, generator=g)
    half = size // 2
    x[labels == 0, :, :, :half] += 0.6  # bright left
    x[labels == 1, :, :, half:] += 0.6  # bright right
    return x, labels


def test_pixel_classifier_reads_the_class():
    x, y = _left_right(40, seed=0)
    clf = PixelClassifier().fit(x, y)
    test_x, test_y = _left_right(20, seed=1)
    assert clf.accuracy(test_x, test_y) == 1.0
    assert torch.equal(clf.predict(test_x), test_y)
    big_x, big_y = _left_right(20, seed=2, size=32)  # other resolution: resized to the fitted one
    assert clf.accuracy(big_x, big_y) == 1.0


def test_pixel_classifier_bad_inputs():
    x, y = _left_right(10, seed=0)
    with pytest.raises(ValueError, match="2 classes"):
        PixelClassifier().fit(x, torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        PixelClassifier().fit(x, y[:5])
    with pytest.raises(RuntimeError, match="fit"):
        PixelClassifier().predict(x)


def test_import_is_cheap():
    code = ("import sys, multimodal.scores; "
            "print([m for m in ('torchmetrics', 'sklearn', 'pycocoevalcap', 'lightning', 'train') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
