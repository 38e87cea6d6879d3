"""Image-gradient losses.

``mode="match"``: the gradient-difference loss (GDL) of Mathieu, Couprie & LeCun, "Deep
multi-scale video prediction beyond mean square error", ICLR 2016: match the *magnitude* of
the prediction's finite differences to the target's, ``| |∂t| − |∂p| |^alpha``. It penalises
blur (missing edges) and spurious edges alike.

``mode="sharpen"``: a bounded one-sided variant that only penalises edges the prediction is
missing, ``relu(|∂t| − |∂p|)``: it rewards a larger |∇pred| up to the target's, gives no
reward beyond it, and is bounded by ``mean |∇target|`` whatever the prediction is, so it
cannot blow up (and cannot be minimised by adding noise).
"""

from __future__ import annotations

import torch
from torch import Tensor

from losstune.losses._checks import check_pair, check_tensor, check_weight, upcast

MODES = ("match", "sharpen")


def image_gradients(x: Tensor) -> tuple[Tensor, Tensor]:
    """Forward differences along width and height: ``(dx, dy)``.

    For ``x`` of shape ``(..., H, W)``: ``dx = x[..., :, 1:] − x[..., :, :-1]`` has shape
    ``(..., H, W−1)`` and ``dy = x[..., 1:, :] − x[..., :-1, :]`` has shape ``(..., H−1, W)``
    (no padding, so no artificial edge at the border).

    >>> dx, dy = image_gradients(torch.tensor([[0.0, 1.0, 3.0], [0.0, 1.0, 3.0]]))
    >>> dx, dy
    (tensor([[1., 2.],
            [1., 2.]]), tensor([[0., 0., 0.]]))
    """
    check_tensor(x, "x")
    if x.ndim < 2 or x.shape[-1] < 2 or x.shape[-2] < 2:
        raise ValueError(f"x: need at least 2×2 spatial dims, got shape {tuple(x.shape)}")
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def _pair_weights(weight: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """The per-pixel weight averaged onto the horizontal and vertical pixel pairs."""
    w = upcast(weight).expand(like.shape)
    return 0.5 * (w[..., :, 1:] + w[..., :, :-1]), 0.5 * (w[..., 1:, :] + w[..., :-1, :])


def _penalty(grad_p: Tensor, grad_t: Tensor, mode: str, alpha: float) -> Tensor:
    diff = grad_t.abs() - grad_p.abs()
    if mode == "match":
        return diff.abs() if alpha == 1 else diff.abs().pow(alpha)
    return torch.relu(diff)


def gradient_loss(pred: Tensor, target: Tensor, mode: str = "match", weight: Tensor | None = None,
                  alpha: float = 1.0) -> Tensor:
    """Gradient loss of ``pred`` against ``target`` (N×C×H×W, or any ``(..., H, W)``).

    Args:
        mode: ``"match"`` (gradient-difference loss, Mathieu et al. 2016) or ``"sharpen"``
            (``mean relu(|∇t| − |∇p|)``: ≥ 0 and ≤ ``mean |∇target|``).
        weight: optional per-pixel weight broadcastable to ``pred`` (e.g. N×1×H×W); each pixel
            pair is weighted by the mean weight of its two pixels.
        alpha: exponent of the match penalty (1 as in Mathieu et al.; ignored by ``sharpen``).

    Returns the mean over both directions and all pixel pairs (a scalar).

    >>> edge = torch.tensor([[[[0.0, 0.0, 1.0, 1.0]] * 4]])  # a sharp vertical edge
    >>> blurred = torch.tensor([[[[0.0, 0.33, 0.67, 1.0]] * 4]])
    >>> gradient_loss(edge, edge), bool(gradient_loss(blurred, edge) > 0)
    (tensor(0.), True)
    >>> round(gradient_loss(torch.zeros(1, 1, 4, 4), edge, mode="sharpen").item(), 4)  # = mean |∇edge| when flat
    0.1667
    """
    if mode not in MODES:
        raise ValueError(f"mode: must be one of {MODES}, got {mode!r}")
    if alpha <= 0:
        raise ValueError(f"alpha: must be > 0, got {alpha}")
    check_pair(pred, target, min_ndim=2)
    if pred.shape[-1] < 2 or pred.shape[-2] < 2:
        raise ValueError(f"pred: need at least 2×2 pixels for gradients, got shape {tuple(pred.shape)}")
    check_weight(weight, pred)
    pdx, pdy = image_gradients(upcast(pred))
    tdx, tdy = image_gradients(upcast(target))
    err_x, err_y = _penalty(pdx, tdx, mode, alpha), _penalty(pdy, tdy, mode, alpha)
    if weight is not None:
        wx, wy = _pair_weights(weight, pred)
        err_x, err_y = err_x * wx, err_y * wy
    return 0.5 * (err_x.mean() + err_y.mean())
