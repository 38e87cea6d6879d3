"""Pixel-wise losses: MSE, L1 and Charbonnier, with an optional per-pixel weight map.

All take ``pred`` and ``target`` of the same shape (usually N×C×H×W) and an optional
``weight`` broadcastable to it (e.g. N×1×H×W with mean ~1, see :mod:`losses.weighting` and
:mod:`losses.intensity`). The weighted loss is ``mean(weight * err)`` over all elements, so a
weight map of mean 1 keeps the loss on the scale of the unweighted one. Half-precision inputs
are computed in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from losstune.losses._checks import check_pair, check_weight, upcast


def _weighted_mean(err: Tensor, weight: Tensor | None) -> Tensor:
    if weight is None:
        return err.mean()
    return (err * upcast(weight)).mean()


def _diff(pred: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
    check_pair(pred, target)
    check_weight(weight, pred)
    return upcast(pred) - upcast(target)


def mse_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean squared error ``mean(weight · (pred − target)²)``.

    >>> pred, target = torch.tensor([[[[0.0, 1.0]]]]), torch.tensor([[[[0.0, 0.5]]]])
    >>> mse_loss(pred, target)
    tensor(0.1250)
    >>> mse_loss(pred, target, weight=torch.tensor([[[[0.0, 2.0]]]]))  # only the second pixel counts
    tensor(0.2500)
    """
    return _weighted_mean(_diff(pred, target, weight).square(), weight)


def l1_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean absolute error ``mean(weight · |pred − target|)``.

    >>> l1_loss(torch.tensor([[[[0.0, 1.0]]]]), torch.tensor([[[[0.0, 0.5]]]]))
    tensor(0.2500)
    """
    return _weighted_mean(_diff(pred, target, weight).abs(), weight)


def charbonnier_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None,
                     eps: float = 1e-3) -> Tensor:
    """Charbonnier (smooth L1) loss ``mean(weight · (sqrt(d² + eps²) − eps))``.

    Charbonnier et al., ICIP 1994; used for image restoration by Lai et al. (LapSRN, CVPR 2017).
    The ``− eps`` offset makes the loss exactly 0 for identical images.

    >>> x = torch.rand(2, 1, 8, 8)
    >>> charbonnier_loss(x, x)
    tensor(0.)
    >>> round(charbonnier_loss(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).item(), 4)  # ~ L1 for |d| >> eps
    0.999
    """
    if eps <= 0:
        raise ValueError(f"eps: must be > 0, got {eps}")
    d = _diff(pred, target, weight)
    return _weighted_mean(torch.sqrt(d.square() + eps * eps) - eps, weight)
