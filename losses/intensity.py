"""Intensity-aware weighting: up-weight rare target intensities.

Each target pixel gets the inverse frequency of its intensity bin in the sample's histogram,
the class-rebalancing idea of inverse-frequency weighting (e.g. King & Zeng 2001; for
imbalanced pixel regression, Yang et al., "Delving into deep imbalanced regression", ICML
2021). The histogram is smoothed by mixing it with a uniform one, so rare bins get a large
but bounded weight, and the weights are normalised to mean 1 per sample so they rebalance the
loss without acting as a learning rate. Weights are computed from the target without grad, fully
vectorised (one ``scatter_add`` histogram for the whole batch, no host sync).
"""

from __future__ import annotations

import torch
from torch import Tensor

from losstune.losses._checks import check_pair, check_tensor, compute_dtype, upcast

KINDS = ("l1", "mse")


def _bin_index(x: Tensor, bins: int, value_range: tuple[float, float] | None) -> Tensor:
    """Bin of every element of ``x`` (N×D), per sample over [min, max] or ``value_range``."""
    if value_range is None:
        lo = x.amin(dim=1, keepdim=True)
        hi = x.amax(dim=1, keepdim=True)
    else:
        lo, hi = (torch.tensor(v, dtype=x.dtype, device=x.device) for v in value_range)
    pos = (x - lo) * (bins / (hi - lo))  # a constant sample gives 0·inf = NaN -> bin 0
    return torch.nan_to_num(pos, nan=0.0, posinf=bins - 1, neginf=0.0).floor().clamp_(0, bins - 1).long()


@torch.no_grad()
def intensity_weights(target: Tensor, bins: int = 64, smoothing: float = 0.1,
                      value_range: tuple[float, float] | None = None) -> Tensor:
    """Per-pixel weights (same shape as ``target``, mean 1 per sample) ∝ 1 / p(intensity bin).

    Args:
        target: N×C×H×W (any ``N×...`` works); all channels of a sample share one histogram.
        bins: number of histogram bins.
        smoothing: fraction ``s`` in [0, 1] of a uniform histogram mixed in,
            ``p' = (1 − s)·p + s/bins``; bounds the largest weight ratio by ``bins / s``.
            0 gives pure inverse frequency, 1 gives uniform weights.
        value_range: ``(lo, hi)`` for the bins; default: each sample's own min..max.

    >>> target = torch.zeros(1, 1, 4, 4)
    >>> target[..., 0, 0] = 1.0  # one bright pixel among 15 dark ones
    >>> w = intensity_weights(target, bins=2, smoothing=0.0)
    >>> round(w.mean().item(), 4), round((w[..., 0, 0] / w[..., 1, 1]).item(), 4)  # mean 1; the rare one weighs 15×
    (1.0, 15.0)
    """
    check_tensor(target, "target")
    if bins < 1:
        raise ValueError(f"bins: must be >= 1, got {bins}")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing: must be in [0, 1], got {smoothing}")
    if value_range is not None and not value_range[1] > value_range[0]:
        raise ValueError(f"value_range: need lo < hi, got {value_range}")
    if target.ndim < 2:
        raise ValueError(f"target: expected a batch N×C×H×W, got shape {tuple(target.shape)}")
    n = target.shape[0]
    flat = upcast(target.detach()).reshape(n, -1)
    idx = _bin_index(flat, bins, value_range)
    # scatter_add into a fixed-size histogram: unlike bincount it never syncs with the host
    counts = torch.zeros(n, bins, dtype=flat.dtype, device=flat.device).scatter_add_(1, idx, torch.ones_like(flat))
    prob = counts / flat.shape[1]
    prob = (1.0 - smoothing) * prob + smoothing / bins
    w = torch.gather(1.0 / prob.clamp_min(torch.finfo(flat.dtype).tiny), 1, idx)
    w = w / w.mean(dim=1, keepdim=True)
    return w.view(target.shape).to(compute_dtype(target))


def intensity_weighted_loss(pred: Tensor, target: Tensor, bins: int = 64, smoothing: float = 0.1,
                            kind: str = "l1") -> Tensor:
    """``mean(w · err)`` with ``w = intensity_weights(target)`` and ``err`` = |d| (``"l1"``) or d² (``"mse"``).

    >>> target = torch.rand(2, 1, 8, 8)
    >>> intensity_weighted_loss(target, target), intensity_weighted_loss(target + 0.1, target) > 0
    (tensor(0.), tensor(True))
    """
    if kind not in KINDS:
        raise ValueError(f"kind: must be one of {KINDS}, got {kind!r}")
    check_pair(pred, target, min_ndim=2)
    w = intensity_weights(target, bins=bins, smoothing=smoothing)
    d = upcast(pred) - upcast(target)
    err = d.abs() if kind == "l1" else d.square()
    return (w * err).mean()
