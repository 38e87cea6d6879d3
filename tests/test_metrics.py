"""Validation metrics (losses/metrics.py), checked against scikit-image where it has them."""

import math

import numpy as np
import pytest
import torch
from skimage.filters import gaussian
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from losstune.losses import metrics as M


pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPES = [(16, 16), (17, 23), (64, 48)]
METRICS = ["ssim", "mse", "psnr", "gradient_match", "sharpness_ratio", "histogram_distance"]


def structured(c, h, w):
    """Checkerboard + textured disc, C×H×W float64 in [0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = 0.2 + 0.6 * ((xx // 6 + yy // 6) % 2)
    disc = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (min(h, w) / 3) ** 2
    img = np.where(disc, 0.5 + 0.3 * np.sin(xx / 2), img)
    return np.stack([img * (1 - 0.2 * k) for k in range(c)])


def image(kind, c, h, w, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((c, h, w)) if kind == "random" else structured(c, h, w)


def distorted(t, seed=1):
    rng = np.random.default_rng(seed)
    return np.clip(gaussian(t, 0.7, channel_axis=0) + 0.05 * rng.standard_normal(t.shape), 0, 1)


def blurred(t, sigma):
    return gaussian(t, sigma, channel_axis=0)


def sk_ssim(p, t):
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    if p.shape[0] == 1:
        return structural_similarity(p[0], t[0], **kw)
    return structural_similarity(p, t, channel_axis=0, **kw)


def tt(x):
    return torch.from_numpy(np.ascontiguousarray(x))


# ----- agreement with scikit-image ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["random", "structured"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("shape", SHAPES + [(11, 11)])
def test_ssim_agrees_with_skimage(shape, channels, kind):
    t = image(kind, channels, *shape)
    p = distorted(t)
    ours = M.ssim(tt(p), tt(t)) if channels == 3 else M.ssim(tt(p[0]), tt(t[0]))  # grey as H×W
    assert ours == pytest.approx(sk_ssim(p, t), abs=1e-3)
    # float32 compute still agrees much more closely than required
    assert ours == pytest.approx(sk_ssim(p, t), abs=5e-5)


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_and_psnr_per_sample_agree_with_skimage_on_a_batch(channels):
    targets = [image("structured", channels, 17, 23), image("random", channels, 17, 23, seed=3)]
    preds = [distorted(targets[0], seed=4), np.clip(targets[1] * 0.8 + 0.1, 0, 1)]
    p, t = tt(np.stack(preds)), tt(np.stack(targets))
    ssim_ps, psnr_ps = M.ssim_per_sample(p, t), M.psnr_per_sample(p, t)
    assert ssim_ps.shape == psnr_ps.shape == (2,)
    for i in range(2):
        assert float(ssim_ps[i]) == pytest.approx(sk_ssim(preds[i], targets[i]), abs=1e-3)
        assert float(psnr_ps[i]) == pytest.approx(
            peak_signal_noise_ratio(targets[i], preds[i], data_range=1.0), abs=1e-4)
    assert M.psnr(p, t) == pytest.approx(float(psnr_ps.mean()), abs=1e-6)
    assert M.ssim(p, t) == pytest.approx(float(ssim_ps.mean()), abs=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_psnr_and_mse_agree_with_skimage(shape, channels):
    t = image("structured", channels, *shape)
    p = distorted(t)
    assert M.psnr(tt(p), tt(t)) == pytest.approx(peak_signal_noise_ratio(t, p, data_range=1.0), abs=1e-4)
    assert M.mse(tt(p), tt(t)) == pytest.approx(float(np.mean((p - t) ** 2)), rel=1e-5)


# ----- identity and blur ---------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
def test_identical_images(channels):
    t = tt(image("structured", channels, 32, 24)).float()
    values = M.evaluate_all(t, t.clone())
    assert values["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert values["gradient_match"] == pytest.approx(1.0, abs=1e-6)
    assert values["mse"] == 0.0
    assert values["psnr"] == M.PSNR_MAX_DB  # capped instead of inf
    assert values["sharpness_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert values["histogram_distance"] == 0.0
    assert values["composite"] == pytest.approx(1.0, abs=1e-6)
    flat = torch.full((1, 16, 16), 0.3)  # no gradients at all: still 1, not 0/0
    assert M.sharpness_ratio(flat, flat) == 1.0 and M.gradient_match(flat, flat) == 1.0


@pytest.mark.parametrize("channels", [1, 3])
def test_blur_lowers_every_quality_metric_monotonically(channels):
    t = image("structured", channels, 48, 40)
    results = [M.evaluate_all(tt(blurred(t, s)), tt(t)) for s in (0.5, 1, 2, 3)]
    for key in ("gradient_match", "ssim", "sharpness_ratio", "psnr", "composite"):
        values = [r[key] for r in results]
        assert all(a > b for a, b in zip(values, values[1:])), (key, values)
    for key in ("mse", "histogram_distance"):
        values = [r[key] for r in results]
        assert all(a < b for a, b in zip(values, values[1:])), (key, values)
    assert 0.0 < results[-1]["gradient_match"] < results[0]["gradient_match"] < 1.0


def test_sharpness_ratio_and_histogram_distance_values():
    t = torch.rand(2, 1, 20, 20, generator=torch.Generator().manual_seed(0))
    assert M.sharpness_ratio(2 * t, t) == pytest.approx(2.0, rel=1e-5)
    assert M.sharpness_ratio(0.5 * t, t) == pytest.approx(0.5, rel=1e-5)
    # W1 of two constants is their difference; a spatial permutation keeps the distribution
    assert M.histogram_distance(torch.full((16, 16), 0.7), torch.full((16, 16), 0.2)) == pytest.approx(0.5)
    perm = t.flatten(1)[:, torch.randperm(400, generator=torch.Generator().manual_seed(1))].view_as(t)
    assert M.histogram_distance(perm, t) == 0.0 and M.mse(perm, t) > 0.01
    assert M.histogram_distance(t + 0.1, t) == pytest.approx(0.1, rel=1e-5)


def test_gradient_match_value_on_ramps():
    """Prewitt magnitude of a ramp of slope a is 2a: GMS = (8ab + c) / (4a² + 4b² + c), c = 170/255²."""
    x = torch.arange(24, dtype=torch.float32).expand(20, 24)
    a, b, c = 0.02, 0.01, 170 / 255**2
    expected = (8 * a * b + c) / (4 * a * a + 4 * b * b + c)
    assert M.gradient_match(b * x, a * x) == pytest.approx(expected, rel=1e-5)
    assert M.gradient_match(a * x.t(), a * x.t()) == pytest.approx(1.0)
    assert M.sharpness_ratio(b * x, a * x) == pytest.approx(b / a, rel=1e-5)


def test_histogram_distance_subsamples_huge_images_deterministically(monkeypatch):
    g = torch.Generator().manual_seed(0)
    p, t = torch.rand(2, 1, 64, 64, generator=g), torch.rand(2, 1, 64, 64, generator=g) ** 2
    exact = M.histogram_distance_per_sample(p, t)
    monkeypatch.setattr(M, "HIST_MAX_VALUES", 1000)
    first, second = M.histogram_distance_per_sample(p, t), M.histogram_distance_per_sample(p, t)
    assert torch.equal(first, second)
    assert not torch.equal(first, exact)
    assert torch.allclose(first, exact, atol=0.02)


# ----- composite score -----------------------------------------------------------------------------

def test_composite_default_formula_and_skill_score():
    t = tt(image("structured", 3, 32, 32))
    p = tt(blurred(image("structured", 3, 32, 32), 1.0))
    s, m, g = M.ssim(p, t), M.mse(p, t), M.gradient_match(p, t)
    assert M.composite_score(p, t) == pytest.approx(0.4 * s + 0.3 * (1 - m) + 0.3 * g, abs=1e-6)
    assert M.composite_score(p, t, mse_ref=2 * m) == pytest.approx(0.4 * s + 0.3 * 0.5 + 0.3 * g, abs=1e-6)
    # much worse than the baseline: the skill part is clamped at -1
    assert M.composite_score(p, t, mse_ref=m / 100) == pytest.approx(0.4 * s - 0.3 + 0.3 * g, abs=1e-6)
    assert M.composite_score(t, t, mse_ref=0.0) == pytest.approx(1.0, abs=1e-6)


def test_composite_weights_are_normalised_and_checked():
    t = tt(image("structured", 1, 24, 24))
    p = tt(distorted(image("structured", 1, 24, 24)))
    assert M.composite_score(p, t, weights={"ssim": 5.0}) == pytest.approx(M.ssim(p, t), abs=1e-6)
    assert M.composite_score(p, t, weights={"ssim": 4, "mse": 3, "gradient_match": 3}) == pytest.approx(
        M.composite_score(p, t), abs=1e-6)
    with pytest.raises(ValueError, match="psnr"):
        M.composite_score(p, t, weights={"ssim": 1.0, "psnr": 1.0})
    with pytest.raises(ValueError, match="weights"):
        M.composite_score(p, t, weights={"ssim": -1.0, "mse": 2.0})
    with pytest.raises(ValueError, match="weights"):
        M.composite_score(p, t, weights={"ssim": 0.0})
    with pytest.raises(ValueError, match="mse_ref"):
        M.composite_score(p, t, mse_ref=-0.1)
    with pytest.raises(ValueError, match="psnr"):
        M.evaluate_all(p, t, weights={"psnr": 1.0})


@pytest.mark.parametrize("channels", [1, 3])
def test_sharp_prediction_scores_higher_than_blurred(channels):
    t = image("structured", channels, 32, 32)
    sharp = np.clip(t + 0.02 * np.random.default_rng(0).standard_normal(t.shape), 0, 1)
    for mse_ref in (None, 0.02):
        assert M.composite_score(tt(sharp), tt(t), mse_ref=mse_ref) > M.composite_score(
            tt(blurred(t, 1.0)), tt(t), mse_ref=mse_ref) + 0.05


def test_evaluate_all_matches_the_single_metrics():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(3, 2, 20, 18, generator=g)
    p = (t + 0.1 * torch.randn(t.shape, generator=g)).clamp(0, 1)
    values = M.evaluate_all(p, t, mse_ref=0.05, weights={"ssim": 1, "mse": 1, "gradient_match": 2})
    assert list(values) == METRICS + ["composite"]
    assert all(isinstance(v, float) for v in values.values())
    for name in METRICS:
        assert values[name] == pytest.approx(getattr(M, name)(p, t), rel=1e-6, abs=1e-7), name
    assert values["composite"] == pytest.approx(
        M.composite_score(p, t, weights={"ssim": 1, "mse": 1, "gradient_match": 2}, mse_ref=0.05), abs=1e-7)


# ----- shapes, dtypes, bad input -------------------------------------------------------------------

@pytest.mark.parametrize("name", METRICS)
def test_every_metric_accepts_2d_3d_4d_and_has_per_sample(name):
    g = torch.Generator().manual_seed(0)
    t = torch.rand(16, 16, generator=g)
    p = (t + 0.1 * torch.randn(t.shape, generator=g)).clamp(0, 1)
    fn, per_sample = getattr(M, name), getattr(M, f"{name}_per_sample")
    value = fn(p, t)
    assert isinstance(value, float)
    assert fn(p[None], t[None]) == value and fn(p[None, None], t[None, None]) == value
    batch_p, batch_t = torch.stack([p, t, 1 - p])[:, None], torch.stack([t, t, 1 - t])[:, None]
    ps = per_sample(batch_p, batch_t)
    assert ps.shape == (3,) and ps.dtype == torch.float32
    assert float(ps[0]) == pytest.approx(value, rel=1e-6)
    assert fn(batch_p, batch_t) == pytest.approx(float(ps.mean()), rel=1e-6)


@pytest.mark.parametrize("name", METRICS + ["composite_score", "evaluate_all"])
def test_bad_input_is_a_value_error_naming_the_argument(name):
    fn = getattr(M, name)
    good = torch.rand(1, 1, 16, 16)
    with pytest.raises(ValueError, match="same shape"):
        fn(good, torch.rand(1, 1, 16, 15))
    with pytest.raises(ValueError, match="dimensions"):
        fn(torch.rand(16), torch.rand(16))
    with pytest.raises(ValueError, match="dimensions"):
        fn(torch.rand(1, 1, 1, 16, 16), torch.rand(1, 1, 1, 16, 16))
    for arg in ("pred", "target"):
        for bad_value in (math.nan, math.inf):
            bad = good.clone()
            bad[0, 0, 3, 3] = bad_value
            args = (bad, good) if arg == "pred" else (good, bad)
            with pytest.raises(ValueError, match=f"{arg} contains NaN or inf"):
                fn(*args)
    with pytest.raises(ValueError, match="pred"):
        fn(np.zeros((16, 16)), good[0, 0])


@pytest.mark.parametrize("name", ["ssim", "composite_score", "evaluate_all"])
def test_ssim_needs_at_least_11x11(name):
    fn = getattr(M, name)
    fn(torch.rand(11, 11), torch.rand(11, 11))
    with pytest.raises(ValueError, match="11×11"):
        fn(torch.rand(10, 32), torch.rand(10, 32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    g = torch.Generator().manual_seed(0)
    t = torch.rand(2, 3, 16, 16, generator=g).to(dtype)
    p = (t.float() + 0.05 * torch.randn(t.shape, generator=g)).clamp(0, 1).to(dtype)
    low = M.evaluate_all(p, t)
    ref = M.evaluate_all(p.float(), t.float())
    assert low == ref  # identical: the half inputs are upcast before any arithmetic
    assert M.ssim_per_sample(p, t).dtype == torch.float32


def test_metrics_do_not_track_gradients():
    p = torch.rand(1, 1, 16, 16, requires_grad=True)
    t = torch.rand(1, 1, 16, 16)
    for name in METRICS:
        assert not getattr(M, f"{name}_per_sample")(p, t).requires_grad
    assert isinstance(M.evaluate_all(p, t)["composite"], float)
