"""Image-quality metrics for validation (functional, batch-aware, data range 1.0).

Every metric accepts ``N×C×H×W``, ``C×H×W`` or ``H×W`` tensors (``pred`` and ``target`` of the
same shape, values in [0, 1]) and returns the batch mean as a Python float; ``<name>_per_sample``
returns a 1-D float32 tensor of length N on the input's device. Inputs are checked (shapes,
sizes, NaN/inf -> ``ValueError`` naming the argument), everything runs under ``torch.no_grad``
in float32 (half-precision inputs are upcast), also inside a caller's ``torch.autocast`` region and
with cuDNN's TF32 turned off for the call. :func:`evaluate_all` computes every metric and
the composite score sharing the intermediate results, over the whole frame and, given a mask,
over a region (``<name>_active``).

Every value is finite and inside a fixed range for any finite input in [0, 1], including flat,
constant, empty (all 0), saturated (all 1), sparse and tiny (11×11) images:

==================  ============  ====================================================================
metric              range         meaning
==================  ============  ====================================================================
ssim                [-1, 1]       structural similarity; 1 = identical
mse                 [0, 1]        mean squared error
psnr                [0, 100] dB   ``10·log10(1/MSE)``; identical images give 100 dB
gradient_match      (0, 1]        gradient-magnitude similarity (GMS); 1 = same edges, falls with blur
sharpness_ratio     [0, 2]        ``2·g_p / (g_p + g_t)`` of mean gradient magnitudes: 1 = as sharp as the
                                  target, < 1 blurrier, > 1 sharper (``g_p/g_t = s / (2 − s)``)
histogram_distance  [0, 1]        Wasserstein-1 distance of the intensity distributions
composite           [-1, 1]       the tuning objective (:func:`composite_score`); 1 = perfect
==================  ============  ====================================================================
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from losstune.losses._checks import check_pair

DATA_RANGE = 1.0
SSIM_SIGMA, SSIM_RADIUS = 1.5, 5  # radius = int(3.5·σ + 0.5): scikit-image's truncate=3.5 -> 11×11 window
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_MIN_SIZE = 2 * SSIM_RADIUS + 1
GMS_C = 170.0 / 255.0**2  # GMSD's c = 170 for [0, 255] images, rescaled to [0, 1]
PSNR_MAX_DB = 100.0  # PSNR of identical images (instead of inf); the MSE is floored at 1e-10
MSE_FLOOR = DATA_RANGE**2 * 10.0 ** (-PSNR_MAX_DB / 10.0)
HIST_MAX_VALUES = 1 << 20  # per sample; larger images are subsampled evenly (deterministic)
# the floor added to both mean gradient magnitudes of the sharpness ratio: far below the mean Prewitt
# magnitude of any textured image (a 1 % grey-level ramp gives 0.02), so it only decides flat vs flat (= 1);
# the ratio's bound [0, 2] does not depend on it
SHARPNESS_FLOOR = 1e-6 * DATA_RANGE
SHARPNESS_MAX = 2.0
DEFAULT_COMPOSITE_WEIGHTS = {"ssim": 0.4, "mse": 0.3, "gradient_match": 0.3}
METRIC_NAMES = ("ssim", "mse", "psnr", "gradient_match", "sharpness_ratio", "histogram_distance")


def _float32(metric: Callable) -> Callable:
    """Run ``metric`` without autograd, outside any autocast region and (on CUDA) without TF32 convolutions.

    The module promises float32 arithmetic: SSIM's local variances (E[x²] − μ², a difference of nearly
    equal numbers) lose most of their digits when an enclosing ``torch.autocast`` casts the convolutions to
    bf16 (SSIM of nearly flat, noisy 128-px images off by 0.13, on the CPU and on an H200 alike). cuDNN may
    run float32 convolutions in TF32 (its default on Ampere and newer GPUs); the depthwise ones here gave
    the same values with it on or off on an H200, and turning it off keeps that true whatever kernel cuDNN
    picks. The TF32 switch is process-global: it is restored when the call returns.
    """
    @functools.wraps(metric)
    def wrapper(pred, *args, **kwargs):
        device_type = pred.device.type if isinstance(pred, Tensor) else "cpu"
        no_autocast = torch.autocast(device_type, enabled=False) if _has_autocast(device_type) else nullcontext()
        tf32 = torch.backends.cudnn.allow_tf32
        try:
            if device_type == "cuda":
                torch.backends.cudnn.allow_tf32 = False
            with torch.no_grad(), no_autocast:
                return metric(pred, *args, **kwargs)
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
    return wrapper


def _has_autocast(device_type: str) -> bool:
    available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
    return available(device_type) if available else device_type in ("cpu", "cuda")


# ----- input handling ------------------------------------------------------------------------------

def _prepare(pred: Tensor, target: Tensor, min_size: int = 1) -> tuple[Tensor, Tensor]:
    """Validate and return both as float32 N×C×H×W (detached)."""
    check_pair(pred, target, min_ndim=2, max_ndim=4)
    h, w = pred.shape[-2:]
    if h < min_size or w < min_size:
        raise ValueError(f"pred: images must be at least {min_size}×{min_size} for this metric, "
                         f"got {h}×{w}")
    if pred.numel() == 0:
        raise ValueError(f"pred: empty tensor of shape {tuple(pred.shape)}")
    finite = torch.stack([torch.isfinite(pred).all(), torch.isfinite(target).all()]).tolist()  # one sync
    for ok, name in zip(finite, ("pred", "target")):
        if not ok:
            raise ValueError(f"{name} contains NaN or inf values")
    while pred.ndim < 4:
        pred, target = pred.unsqueeze(0), target.unsqueeze(0)
    return pred.detach().float(), target.detach().float()


# ----- building blocks (take prepared float32 N×C×H×W) --------------------------------------------

def _gaussian_1d(device: torch.device) -> Tensor:
    x = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return (g / g.sum()).to(device=device, dtype=torch.float32)


def _ssim(p: Tensor, t: Tensor) -> Tensor:
    """SSIM per sample (Wang et al. 2004) over the 'valid' region, as scikit-image crops it."""
    return _ssim_map(p, t).flatten(1).mean(1)


def _ssim_map(p: Tensor, t: Tensor) -> Tensor:
    """The local SSIM of every window that fits: N×C×(H−10)×(W−10), centred on pixel (i+5, j+5)."""
    n, c, h, w = p.shape
    x = torch.cat([p, t, p * p, t * t, p * t], dim=1)  # the five local statistics in one pass
    g = _gaussian_1d(p.device)
    k = 5 * c  # separable depthwise Gaussian ('valid', no padding): much faster than channels-as-batch
    x = F.conv2d(x, g.view(1, 1, -1, 1).expand(k, 1, -1, 1), groups=k)
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(k, 1, 1, -1), groups=k)
    mu_p, mu_t, e_pp, e_tt, e_pt = x.view(n, 5, c, h - 2 * SSIM_RADIUS, w - 2 * SSIM_RADIUS).unbind(1)
    var_p, var_t, cov = e_pp - mu_p * mu_p, e_tt - mu_t * mu_t, e_pt - mu_p * mu_t  # population
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    return ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))


def _mse(p: Tensor, t: Tensor) -> Tensor:
    return (p - t).square().flatten(1).mean(1)


def _psnr_from_mse(mse: Tensor) -> Tensor:
    return 10.0 * torch.log10(DATA_RANGE**2 / mse.clamp_min(MSE_FLOOR))


def _gradient_magnitude(x: Tensor) -> Tensor:
    """Prewitt gradient magnitude per channel (GMSD's filters, 'valid' region): N×C×(H−2)×(W−2)."""
    n, c, h, w = x.shape
    k = torch.tensor([[1.0, 0.0, -1.0]] * 3, device=x.device) / 3.0
    kernels = torch.stack([k, k.t()]).unsqueeze(1).repeat(c, 1, 1, 1)  # d/dx, d/dy for every channel
    g = F.conv2d(x, kernels, groups=c)
    return g.view(n, c, 2, h - 2, w - 2).square().sum(2).sqrt()


def _gms_map(gm_p: Tensor, gm_t: Tensor) -> Tensor:
    """Gradient-magnitude similarity of every pixel (Xue et al. 2014), in (0, 1]."""
    return (2 * gm_p * gm_t + GMS_C) / (gm_p.square() + gm_t.square() + GMS_C)


def _gms(gm_p: Tensor, gm_t: Tensor) -> Tensor:
    """Mean gradient-magnitude similarity per sample (GMSM), in (0, 1]."""
    return _gms_map(gm_p, gm_t).flatten(1).mean(1)


def _sharpness_from_means(g_p: Tensor, g_t: Tensor) -> Tensor:
    """Symmetric ratio ``2·g_p / (g_p + g_t)`` in [0, 2] (floored so flat vs flat is 1, never 0/0)."""
    return (2 * g_p + 2 * SHARPNESS_FLOOR) / (g_p + g_t + 2 * SHARPNESS_FLOOR)


def _sharpness(gm_p: Tensor, gm_t: Tensor) -> Tensor:
    return _sharpness_from_means(gm_p.flatten(1).mean(1), gm_t.flatten(1).mean(1))


def _wasserstein(p: Tensor, t: Tensor) -> Tensor:
    """1-D Wasserstein-1 distance between the intensity distributions of each sample."""
    p, t = p.flatten(1), t.flatten(1)
    if p.shape[1] > HIST_MAX_VALUES:
        idx = torch.linspace(0, p.shape[1] - 1, HIST_MAX_VALUES, device=p.device).long()
        p, t = p[:, idx], t[:, idx]
    return (_sorted(p) - _sorted(t)).abs().mean(1)


def _sorted(x: Tensor) -> Tensor:
    """Each row sorted; on CPU via NumPy, whose values-only sort is ~3× faster than torch.sort."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy(), axis=1))
    return x.sort(dim=1).values


def _check_composite_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
    if weights is None:
        return dict(DEFAULT_COMPOSITE_WEIGHTS)
    unknown = sorted(set(weights) - set(DEFAULT_COMPOSITE_WEIGHTS))
    if unknown:
        raise ValueError(f"weights: unknown composite part(s) {unknown}; known: {sorted(DEFAULT_COMPOSITE_WEIGHTS)}")
    out = {k: float(weights.get(k, 0.0)) for k in DEFAULT_COMPOSITE_WEIGHTS}
    if any(not math.isfinite(v) or v < 0 for v in out.values()):
        raise ValueError(f"weights: must be finite and >= 0, got {dict(weights)}")
    total = sum(out.values())
    if total <= 0:
        raise ValueError("weights: at least one composite weight must be > 0")
    return {k: v / total for k, v in out.items()}


def _check_mse_ref(mse_ref: float | None, name: str = "mse_ref") -> None:
    if mse_ref is not None and (not math.isfinite(mse_ref) or mse_ref < 0):
        raise ValueError(f"{name}: must be a finite number >= 0, got {mse_ref}")


def mse_skill(mse: float, mse_ref: float | None) -> float:
    """The composite's MSE part: ``(ref − MSE) / (ref + MSE)`` in [-1, 1] against a baseline MSE ``ref``.

    1 = perfect, 0 = as good as the baseline (e.g. copying the input), −1 only when the baseline is
    perfect and the prediction is not (else approached in the limit of an infinitely worse
    prediction); the step from "baseline" to "twice the baseline's error" is −1/3, so it never sits at
    a bound the way a clamped ``1 − MSE/ref`` did. A perfect prediction of a perfect baseline gives 1.
    Without ``ref``: ``1 − MSE`` in [0, 1].

    >>> mse_skill(0.0, 0.02), mse_skill(0.02, 0.02), round(mse_skill(0.04, 0.02), 4)
    (1.0, 0.0, -0.3333)
    >>> mse_skill(0.25, None)
    0.75
    """
    if mse_ref is None:
        return 1.0 - mse
    _check_mse_ref(mse_ref)
    total = mse_ref + mse
    return 1.0 if total <= 0 else (mse_ref - mse) / total


def _composite(ssim_value: float, mse_value: float, gm_value: float, weights: Mapping[str, float] | None,
               mse_ref: float | None) -> float:
    w = _check_composite_weights(weights)
    return (w["ssim"] * ssim_value + w["mse"] * mse_skill(mse_value, mse_ref)
            + w["gradient_match"] * gm_value)


# ----- public per-sample metrics -------------------------------------------------------------------

@_float32
def ssim_per_sample(pred: Tensor, target: Tensor) -> Tensor:
    """Structural similarity (Wang, Bovik, Sheikh & Simoncelli, IEEE TIP 2004) per sample.

    Gaussian window 11×11 with σ = 1.5, K1 = 0.01, K2 = 0.03, population covariance, averaged
    over the region where the window fits (scikit-image crops the same 5-pixel border), and over
    channels. Matches ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1.0)``. Images must be at least 11×11.
    """
    return _ssim(*_prepare(pred, target, SSIM_MIN_SIZE))


@_float32
def mse_per_sample(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample."""
    return _mse(*_prepare(pred, target))


@_float32
def psnr_per_sample(pred: Tensor, target: Tensor) -> Tensor:
    """Peak signal-to-noise ratio ``10·log10(1 / MSE)`` in dB per sample (data range 1).

    Identical images give 100 dB (the MSE is floored at 1e-10) instead of infinity.
    """
    return _psnr_from_mse(_mse(*_prepare(pred, target)))


@_float32
def gradient_match_per_sample(pred: Tensor, target: Tensor) -> Tensor:
    """Mean gradient-magnitude similarity in (0, 1] per sample; 1 for identical images.

    GMS map ``(2·m_p·m_t + c) / (m_p² + m_t² + c)`` of Prewitt gradient magnitudes with
    ``c = 170/255²``, averaged (Xue, Zhang, Mou & Bovik, "Gradient magnitude similarity
    deviation", IEEE TIP 2014, without its downsampling). Falls as the prediction gets blurrier.
    """
    p, t = _prepare(pred, target, 3)
    return _gms(_gradient_magnitude(p), _gradient_magnitude(t))


@_float32
def sharpness_ratio_per_sample(pred: Tensor, target: Tensor) -> Tensor:
    """How sharp the prediction is relative to the target, in [0, 2], per sample.

    ``2·g_p / (g_p + g_t)`` of the mean Prewitt gradient magnitudes ``g`` (both floored by 1e-6):
    1 = as sharp as the target, < 1 blurrier, > 1 sharper; the plain ratio is ``s / (2 − s)``.
    Symmetric and bounded: a textured prediction over a flat target gives 2, not a huge number.

    >>> t = torch.linspace(0, 1, 20 * 20).view(1, 1, 20, 20)
    >>> [round(float(v), 4) for v in sharpness_ratio_per_sample(torch.cat([t, 0.5 * t]), torch.cat([t, t]))]
    [1.0, 0.6667]
    """
    p, t = _prepare(pred, target, 3)
    return _sharpness(_gradient_magnitude(p), _gradient_magnitude(t))


@_float32
def histogram_distance_per_sample(pred: Tensor, target: Tensor) -> Tensor:
    """Wasserstein-1 distance between the intensity distributions of ``pred`` and ``target``.

    Computed exactly as the mean absolute difference of the sorted values (all channels of a
    sample pooled); samples with more than 2**20 values are first subsampled at evenly spaced
    positions (deterministic).
    """
    return _wasserstein(*_prepare(pred, target))


# ----- public batch-mean metrics -------------------------------------------------------------------

def _mean(values: Tensor) -> float:
    return float(values.mean())


def ssim(pred: Tensor, target: Tensor) -> float:
    """Mean SSIM of the batch (see :func:`ssim_per_sample`)."""
    return _mean(ssim_per_sample(pred, target))


def mse(pred: Tensor, target: Tensor) -> float:
    """Mean squared error of the batch."""
    return _mean(mse_per_sample(pred, target))


def psnr(pred: Tensor, target: Tensor) -> float:
    """Mean of the per-sample PSNR in dB (capped at 100 dB, see :func:`psnr_per_sample`)."""
    return _mean(psnr_per_sample(pred, target))


def gradient_match(pred: Tensor, target: Tensor) -> float:
    """Mean gradient-magnitude similarity of the batch in (0, 1] (see :func:`gradient_match_per_sample`)."""
    return _mean(gradient_match_per_sample(pred, target))


def sharpness_ratio(pred: Tensor, target: Tensor) -> float:
    """Mean of the per-sample sharpness ratio in [0, 2] (see :func:`sharpness_ratio_per_sample`)."""
    return _mean(sharpness_ratio_per_sample(pred, target))


def histogram_distance(pred: Tensor, target: Tensor) -> float:
    """Mean per-sample Wasserstein-1 distance between intensity distributions."""
    return _mean(histogram_distance_per_sample(pred, target))


@_float32
def composite_score(pred: Tensor, target: Tensor, weights: Mapping[str, float] | None = None,
                    mse_ref: float | None = None) -> float:
    """The tuning objective: ``w_ssim·SSIM + w_mse·skill + w_gm·gradient_match`` in [-1, 1] (higher is better).

    Parts: SSIM in [-1, 1]; ``skill`` = :func:`mse_skill` of the MSE against a trivial baseline whose
    MSE is ``mse_ref`` (in [-1, 1], 0 = no better than the baseline; without ``mse_ref``: ``1 − MSE``);
    gradient_match in (0, 1]. ``weights`` has keys ``ssim``, ``mse``, ``gradient_match`` (default
    0.4/0.3/0.3; missing keys count as 0) and is normalised to sum 1; unknown keys raise ``ValueError``.

    >>> t = torch.linspace(0, 1, 16 * 16).view(16, 16)
    >>> round(composite_score(t, t, mse_ref=0.01), 6)
    1.0
    """
    _check_composite_weights(weights)
    _check_mse_ref(mse_ref)
    p, t = _prepare(pred, target, SSIM_MIN_SIZE)
    parts = torch.stack([_ssim(p, t).mean(), _mse(p, t).mean(),
                         _gms(_gradient_magnitude(p), _gradient_magnitude(t)).mean()]).tolist()
    return _composite(*parts, weights, mse_ref)


REGIONS = ("full", "active")


def _prepare_mask(mask: Tensor, like: Tensor) -> Tensor:
    """The mask as float32 N×1×H×W (1 = in the region) for prepared ``like`` (N×C×H×W); channels are OR-ed."""
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
    m = mask.detach()
    while m.ndim < 4:
        m = m.unsqueeze(0)
    n, c, h, w = like.shape
    if m.ndim != 4 or m.shape[0] != n or m.shape[1] not in (1, c) or m.shape[-2:] != (h, w):
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not fit pred/target of shape {tuple(like.shape)} "
                         f"(need N×1×H×W or N×C×H×W)")
    m = m.to(like.device)
    m = m if m.dtype == torch.bool else m > 0.5
    return m.any(1, keepdim=True).float()


def _crop_to(mask: Tensor, values: Tensor) -> Tensor:
    """``mask`` (N×1×H×W) centre-cropped to the spatial size of a 'valid' map ``values``."""
    dy, dx = (mask.shape[-2] - values.shape[-2]) // 2, (mask.shape[-1] - values.shape[-1]) // 2
    return mask[..., dy:mask.shape[-2] - dy, dx:mask.shape[-1] - dx]


def _region_means(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample mean of a map over the region, and the region's size per sample (0: value is 0)."""
    m = _crop_to(mask, values)
    count = m.flatten(1).sum(1)
    total = (values * m).flatten(1).sum(1) / values.shape[1]
    return total / count.clamp_min(1), count


def _masked_wasserstein(p: Tensor, t: Tensor, mask: Tensor) -> Tensor:
    """W1 between the intensity distributions inside each sample's region (both have the same count).

    Values outside the region are replaced by the largest float in pred and target alike, so they sort
    to the end of both rows and cancel exactly; the first ``count`` sorted values are the region's.
    """
    m = mask.expand_as(p).flatten(1) > 0
    p, t = p.flatten(1), t.flatten(1)
    if p.shape[1] > HIST_MAX_VALUES:
        idx = torch.linspace(0, p.shape[1] - 1, HIST_MAX_VALUES, device=p.device).long()
        p, t, m = p[:, idx], t[:, idx], m[:, idx]
    big = torch.finfo(p.dtype).max
    p, t = p.masked_fill(~m, big), t.masked_fill(~m, big)
    return (_sorted(p) - _sorted(t)).abs().sum(1) / m.sum(1).clamp_min(1)


def _region_metrics(p: Tensor, t: Tensor, maps: Mapping[str, Tensor], mask: Tensor,
                    gm_p: Tensor, gm_t: Tensor) -> tuple[Tensor, Tensor]:
    """Every metric over the region: per sample, then averaged weighted by the region's size per sample
    (so the map metrics are plain means over all the region's pixels of the batch). A metric whose region
    is empty in the whole batch (after its border crop) takes its whole-frame value: returns (values, fell back)."""
    ssim_s, ssim_n = _region_means(maps["ssim"], mask)
    mse_s, n = _region_means(maps["mse"], mask)
    gms_s, gms_n = _region_means(maps["gms"], mask)
    gp_s, _ = _region_means(gm_p, mask)
    gt_s, _ = _region_means(gm_t, mask)
    per_sample = torch.stack([ssim_s, mse_s, _psnr_from_mse(mse_s), gms_s, _sharpness_from_means(gp_s, gt_s),
                              _masked_wasserstein(p, t, mask)])
    weights = torch.stack([ssim_n, n, n, gms_n, gms_n, n])
    total = weights.sum(1)
    values = (per_sample * weights).sum(1) / total.clamp_min(1)
    return values, total == 0


@_float32
def evaluate_all(pred: Tensor, target: Tensor, mse_ref: float | None = None,
                 weights: Mapping[str, float] | None = None, *, mask: Tensor | None = None,
                 mse_ref_active: float | None = None, region: str = "full") -> dict[str, float]:
    """Every metric (batch means) and ``composite``, sharing the intermediate work.

    One pass per building block (SSIM statistics, squared error, gradient magnitudes, sorted
    values) and two host syncs in all (the finiteness check and the results).

    Keys: ``ssim``, ``mse``, ``psnr``, ``gradient_match``, ``sharpness_ratio``,
    ``histogram_distance``, ``composite`` (see :func:`composite_score` for ``mse_ref``/``weights``).

    With ``mask`` (N×1×H×W or N×C×H×W, bool or float > 0.5 = in; e.g. the pixels that change) every
    metric is also computed over that region as ``<name>_active``: the per-pixel maps (local SSIM,
    squared error, GMS, gradient magnitudes) averaged over the region's pixels of the whole batch; PSNR,
    sharpness and histogram distance per sample over its region, averaged weighted by region size. SSIM
    uses the region's pixels at least 5 px from the border (where its window fits), the gradient metrics
    those at least 1 px in. A region empty in the whole batch falls back to the whole frame and
    ``active_fallback`` is 1 (else 0); ``active_fraction`` is the region's share of the pixels. Then
    ``composite_full`` and ``composite_active`` (its MSE part against ``mse_ref_active``, the
    baseline's MSE in the region) are both reported, and ``composite`` is the one ``region`` names.

    >>> t = torch.zeros(1, 1, 16, 16); t[..., 4:12, 4:12] = 1.0
    >>> p = t.clone(); p[..., 6, 6] = 0.0
    >>> m = t > 0
    >>> v = evaluate_all(p, t, mse_ref=0.25, mask=m, mse_ref_active=1.0, region="active")
    >>> round(v["mse"], 6), round(v["mse_active"], 6), v["active_fraction"], v["composite"] == v["composite_active"]
    (0.003906, 0.015625, 0.25, True)
    """
    _check_composite_weights(weights)
    _check_mse_ref(mse_ref)
    _check_mse_ref(mse_ref_active, "mse_ref_active")
    if region not in REGIONS:
        raise ValueError(f"region: must be one of {', '.join(REGIONS)}, got {region!r}")
    if region == "active" and mask is None:
        raise ValueError("region: 'active' needs a mask")
    if mask is not None and mse_ref is not None and mse_ref_active is None:
        raise ValueError("mse_ref_active: needed with mask and mse_ref (the baseline's MSE in the region)")
    p, t = _prepare(pred, target, SSIM_MIN_SIZE)
    gm_p, gm_t = _gradient_magnitude(p), _gradient_magnitude(t)
    maps = {"ssim": _ssim_map(p, t), "mse": (p - t).square(), "gms": _gms_map(gm_p, gm_t)}
    mse_s = maps["mse"].flatten(1).mean(1)
    per_sample = [maps["ssim"].flatten(1).mean(1), mse_s, _psnr_from_mse(mse_s), maps["gms"].flatten(1).mean(1),
                  _sharpness(gm_p, gm_t), _wasserstein(p, t)]
    full = torch.stack(per_sample).mean(1)
    if mask is None:
        values = dict(zip(METRIC_NAMES, full.tolist()))
        values["composite"] = _composite(values["ssim"], values["mse"], values["gradient_match"], weights, mse_ref)
        return values
    m = _prepare_mask(mask, p)
    active, empty = _region_metrics(p, t, maps, m, gm_p, gm_t)
    active = torch.where(empty, full, active)
    numbers = torch.cat([full, active, empty.any().float().view(1), m.mean().view(1)]).tolist()  # one sync
    k = len(METRIC_NAMES)
    values = dict(zip(METRIC_NAMES, numbers[:k]))
    values.update({f"{name}_active": v for name, v in zip(METRIC_NAMES, numbers[k:2 * k])})
    values["active_fallback"], values["active_fraction"] = numbers[2 * k:]
    values["composite_full"] = _composite(values["ssim"], values["mse"], values["gradient_match"], weights, mse_ref)
    values["composite_active"] = _composite(values["ssim_active"], values["mse_active"],
                                            values["gradient_match_active"], weights,
                                            mse_ref_active if mse_ref is not None else None)
    values["composite"] = values[f"composite_{region}"]
    return values
