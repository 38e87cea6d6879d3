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
    # symmetric ratio 2·g_p/(g_p + g_t): twice as sharp -> 4/3, half as sharp -> 2/3
    assert M.sharpness_ratio(2 * t, t) == pytest.approx(4 / 3, rel=1e-4)
    assert M.sharpness_ratio(0.5 * t, t) == pytest.approx(2 / 3, rel=1e-4)
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
    assert M.sharpness_ratio(b * x, a * x) == pytest.approx(2 * b / (a + b), rel=1e-4)


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
    # skill = (ref − mse)/(ref + mse): half the baseline's error -> 1/3
    assert M.composite_score(p, t, mse_ref=2 * m) == pytest.approx(0.4 * s + 0.3 / 3 + 0.3 * g, abs=1e-6)
    # much worse than the baseline: the skill part approaches -1 but stays above it (no clamp)
    worse = M.composite_score(p, t, mse_ref=m / 100)
    assert worse == pytest.approx(0.4 * s + 0.3 * (-99 / 101) + 0.3 * g, abs=1e-6)
    assert M.composite_score(p, t, mse_ref=m / 1000) < worse
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
            tt(blurred(t, 1.0)), tt(t), mse_ref=mse_ref) + 0.04


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_metrics_inside_a_callers_autocast_region_stay_float32(dtype):
    g = torch.Generator().manual_seed(0)
    t = torch.rand(2, 3, 32, 32, generator=g)
    p = (t + 0.05 * torch.randn(t.shape, generator=g)).clamp(0, 1)
    mask = torch.rand(2, 1, 32, 32, generator=g) > 0.5
    ref = M.evaluate_all(p, t, mse_ref=0.01, mask=mask, mse_ref_active=0.02)
    singles = {name: getattr(M, name)(p, t) for name in METRICS}
    with torch.autocast("cpu", dtype=dtype):  # a training loop's region: it would cast the convolutions
        assert M.evaluate_all(p, t, mse_ref=0.01, mask=mask, mse_ref_active=0.02) == ref
        assert {name: getattr(M, name)(p, t) for name in METRICS} == singles
        assert M.composite_score(p, t, mse_ref=0.01) == ref["composite_full"]
        assert torch.is_autocast_enabled("cpu")  # the caller's region is left as it was


def test_metrics_do_not_track_gradients():
    p = torch.rand(1, 1, 16, 16, requires_grad=True)
    t = torch.rand(1, 1, 16, 16)
    for name in METRICS:
        assert not getattr(M, f"{name}_per_sample")(p, t).requires_grad
    assert isinstance(M.evaluate_all(p, t)["composite"], float)


# ----- adversarial inputs: every metric finite and inside its documented range ---------------------

RANGES = {"ssim": (-1.0, 1.0), "mse": (0.0, 1.0), "psnr": (0.0, M.PSNR_MAX_DB), "gradient_match": (0.0, 1.0),
          "sharpness_ratio": (0.0, M.SHARPNESS_MAX), "histogram_distance": (0.0, 1.0), "composite": (-1.0, 1.0)}


def _camera_16bit_crop(y, x, size=32):
    """A crop of scikit-image's camera as a 16-bit image, percentile-normalised like the folder loader."""
    from skimage import data
    from losstune.trainables.data.paired_folder import percentile_normalize

    img16 = (data.camera().astype(np.uint32) * 257).astype(np.uint16)  # full 16-bit range
    norm = percentile_normalize(img16.astype(np.float32))
    return torch.from_numpy(norm[y:y + size, x:x + size].copy())[None, None]


def _adversarial_cases():
    g = torch.Generator().manual_seed(0)
    texture = torch.rand(1, 1, 32, 32, generator=g)
    flat = 0.4 + 1e-4 * torch.rand(1, 1, 32, 32, generator=g)  # a nearly flat crop (microscopy background)
    sparse = torch.zeros(1, 1, 32, 32)
    sparse.view(-1)[torch.randperm(1024, generator=g)[:10]] = 1.0  # 1 % bright pixels on black
    sky = _camera_16bit_crop(0, 0)  # the camera image's flat sky
    detail = _camera_16bit_crop(300, 200)
    tiny_t, tiny_p = torch.rand(1, 1, 11, 11, generator=g), torch.rand(1, 1, 11, 11, generator=g)
    return {
        "flat_target": (texture, flat),
        "flat_target_flat_pred": (flat.flip(-1), flat),
        "constant_prediction": (torch.full_like(texture, 0.5), texture),
        "all_zeros": (torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16)),
        "all_ones": (torch.ones(1, 1, 16, 16), torch.ones(1, 1, 16, 16)),
        "zeros_vs_ones": (torch.zeros(1, 1, 16, 16), torch.ones(1, 1, 16, 16)),
        "sparse_bright_on_black": (torch.zeros_like(sparse), sparse),
        "sparse_vs_shifted": (sparse.roll(1, -1), sparse),
        "16bit_flat_sky_crop": (sky.flip(-1) * 0.98, sky),
        "16bit_detail_vs_flat_pred": (torch.full_like(detail, float(detail.mean())), detail),
        "16bit_flat_target_detail_pred": (detail, sky),
        "tiny_11x11": (tiny_p, tiny_t),
    }


ADVERSARIAL = _adversarial_cases()


def _in_range(name, value):
    low, high = RANGES[name.removesuffix("_active").removesuffix("_full")]
    return math.isfinite(value) and low - 1e-6 <= value <= high + 1e-6


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case", list(ADVERSARIAL))
def test_every_metric_is_finite_and_in_range_on_adversarial_input(metric, case):
    p, t = ADVERSARIAL[case]
    value = getattr(M, metric)(p, t)
    assert _in_range(metric, value), (metric, case, value)
    per_sample = getattr(M, f"{metric}_per_sample")(p, t)
    assert torch.isfinite(per_sample).all()


@pytest.mark.parametrize("mse_ref", [None, 0.0, 1e-6, 0.02])
@pytest.mark.parametrize("case", list(ADVERSARIAL))
def test_composite_and_region_metrics_are_finite_and_in_range_on_adversarial_input(case, mse_ref):
    from losstune.losses.regions import foreground

    p, t = ADVERSARIAL[case]
    composite = M.composite_score(p, t, mse_ref=mse_ref)
    assert _in_range("composite", composite), (case, composite)
    for mask in (foreground(t), torch.zeros_like(t, dtype=torch.bool), torch.ones_like(t, dtype=torch.bool)):
        values = M.evaluate_all(p, t, mse_ref=mse_ref, mask=mask, mse_ref_active=mse_ref, region="active")
        for name, value in values.items():
            if name in ("active_fallback", "active_fraction"):
                assert 0.0 <= value <= 1.0
            else:
                assert _in_range(name, value), (case, name, value)
        # the MSE part never sits at a bound unless the prediction is perfect or the baseline is
        if mse_ref and values["mse"] > 0:
            assert -1.0 < M.mse_skill(values["mse"], mse_ref) < 1.0


def test_sharpness_ratio_over_a_flat_target_is_bounded_not_huge():
    """The 16-bit TIFF case of issue 14: a textured prediction over a nearly flat target gave 97 469."""
    p, t = ADVERSARIAL["16bit_flat_target_detail_pred"]
    assert 1.5 < M.sharpness_ratio(p, t) <= M.SHARPNESS_MAX
    flat = ADVERSARIAL["flat_target_flat_pred"][1]
    assert M.sharpness_ratio(flat, flat) == pytest.approx(1.0)


def test_mse_skill_is_symmetric_and_strictly_monotone():
    values = [M.mse_skill(m, 0.01) for m in (0.0, 0.005, 0.01, 0.02, 0.1, 1.0, 100.0)]
    assert values[0] == 1.0 and values[2] == 0.0
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[-1] > -1.0
    assert M.mse_skill(0.0, 0.0) == 1.0
    with pytest.raises(ValueError, match="mse_ref"):
        M.mse_skill(0.1, -1.0)


# ----- metrics over a region -----------------------------------------------------------------------

def test_region_metrics_average_the_maps_over_the_region():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(2, 3, 24, 24, generator=g)
    p = t.clone()
    p[:, :, 8:16, 8:16] = (p[:, :, 8:16, 8:16] + 0.2).clamp(0, 1)  # an error only inside the region
    mask = torch.zeros(2, 1, 24, 24, dtype=torch.bool)
    mask[:, :, 8:16, 8:16] = True
    v = M.evaluate_all(p, t, mask=mask)
    region_sq = (p - t)[:, :, 8:16, 8:16].square().mean()
    assert v["mse_active"] == pytest.approx(float(region_sq), rel=1e-5)
    assert v["mse"] == pytest.approx(float(region_sq) * 64 / 576, rel=1e-5)
    assert v["active_fraction"] == pytest.approx(64 / 576) and v["active_fallback"] == 0.0
    for name in ("ssim", "gradient_match", "psnr"):
        assert v[f"{name}_active"] < v[name], name  # the error is concentrated in the region
    assert v["histogram_distance_active"] > v["histogram_distance"]
    # the whole frame as the region gives the whole-frame values
    full = M.evaluate_all(p, t, mask=torch.ones_like(mask))
    for name in METRICS:
        assert full[f"{name}_active"] == pytest.approx(full[name], rel=1e-5, abs=1e-6), name


def test_region_composite_is_chosen_and_empty_region_falls_back():
    g = torch.Generator().manual_seed(1)
    t = torch.rand(1, 1, 20, 20, generator=g)
    p = (t + 0.1 * torch.randn(t.shape, generator=g)).clamp(0, 1)
    mask = torch.zeros(1, 1, 20, 20)
    mask[..., 2:18, 2:18] = 1.0
    full = M.evaluate_all(p, t, mse_ref=0.05, mask=mask, mse_ref_active=0.05, region="full")
    active = M.evaluate_all(p, t, mse_ref=0.05, mask=mask, mse_ref_active=0.05, region="active")
    assert full["composite"] == full["composite_full"] and active["composite"] == active["composite_active"]
    assert full["composite_full"] == active["composite_full"]
    assert full["composite_full"] == pytest.approx(M.composite_score(p, t, mse_ref=0.05), abs=1e-6)
    empty = M.evaluate_all(p, t, mse_ref=0.05, mask=torch.zeros_like(mask), mse_ref_active=0.05, region="active")
    assert empty["active_fallback"] == 1.0 and empty["active_fraction"] == 0.0
    for name in METRICS:
        assert empty[f"{name}_active"] == empty[name]
    with pytest.raises(ValueError, match="region"):
        M.evaluate_all(p, t, region="active")
    with pytest.raises(ValueError, match="mse_ref_active"):
        M.evaluate_all(p, t, mse_ref=0.05, mask=mask)
    with pytest.raises(ValueError, match="mask"):
        M.evaluate_all(p, t, mask=torch.ones(1, 1, 20, 19))


@pytest.mark.parametrize("channels", [1, 3])
def test_blur_lowers_every_region_metric_monotonically(channels):
    t = image("structured", channels, 48, 40)
    mask = torch.zeros(1, 1, 48, 40, dtype=torch.bool)
    mask[..., 10:30, 8:32] = True
    results = [M.evaluate_all(tt(blurred(t, s))[None], tt(t)[None], mask=mask) for s in (0.5, 1, 2, 3)]
    for key in ("gradient_match", "ssim", "sharpness_ratio", "psnr", "composite_active"):
        key = key if key.endswith("_active") else f"{key}_active"
        values = [r[key] for r in results]
        assert all(a > b for a, b in zip(values, values[1:])), (key, values)


def test_docstring_examples_run():
    import doctest

    from losstune.losses import regions

    for module in (M, regions):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
