"""Evaluation regions: boolean masks of the pixels an objective should look at (N×1×H×W).

The metrics in :mod:`losses.metrics` can be computed over such a region (``mask=`` of
:func:`losses.metrics.evaluate_all`). These helpers build the usual ones in pure torch, on the
input's device, without host syncs:

* :func:`changed_region`: where the target differs from a reference (e.g. the last input frame of
  a next-frame predictor), so the score is not dominated by what a model can copy through;
* :func:`foreground`: the bright structures of a target (Otsu's threshold per sample);
* :func:`dilate`: grow a mask by a few pixels (so the region includes the edges around it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

OTSU_BINS = 256
FLAT_RANGE = 1e-3  # a sample whose target spans less than this has no foreground (nothing to separate)


def _as_nchw(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name}: expected N×C×H×W, got shape {tuple(x.shape)}")
    return x


def dilate(mask: Tensor, pixels: int) -> Tensor:
    """``mask`` (N×1×H×W bool) grown by ``pixels`` in every direction (a square structuring element).

    >>> m = torch.zeros(1, 1, 5, 5, dtype=torch.bool); m[0, 0, 2, 2] = True
    >>> int(dilate(m, 1).sum()), int(dilate(m, 2).sum())
    (9, 25)
    """
    mask = _as_nchw(mask, "mask")
    if pixels < 0:
        raise ValueError(f"pixels: must be >= 0, got {pixels}")
    if pixels == 0:
        return mask.bool()
    size = 2 * pixels + 1
    return F.max_pool2d(mask.float(), size, stride=1, padding=pixels) > 0


def changed_region(target: Tensor, reference: Tensor, threshold: float = 0.05, grow: int = 2) -> Tensor:
    """Pixels where ``|target − reference| > threshold`` in any channel, dilated by ``grow`` px (N×1×H×W bool).

    >>> ref = torch.zeros(1, 3, 8, 8); tgt = ref.clone(); tgt[0, 1, 4, 4] = 0.5
    >>> int(changed_region(tgt, ref, grow=0).sum()), int(changed_region(tgt, ref, grow=1).sum())
    (1, 9)
    """
    target, reference = _as_nchw(target, "target"), _as_nchw(reference, "reference")
    if target.shape != reference.shape:
        raise ValueError(f"reference: shape {tuple(reference.shape)} differs from target {tuple(target.shape)}")
    changed = ((target.float() - reference.float()).abs() > threshold).any(1, keepdim=True)
    return dilate(changed, grow)


def otsu_threshold(x: Tensor, bins: int = OTSU_BINS) -> Tensor:
    """Otsu's threshold per sample of ``x`` (N×C×H×W, values in [0, 1]) as a tensor of length N.

    The threshold maximises the between-class variance of a ``bins``-bin histogram over [0, 1].

    >>> x = torch.cat([torch.full((50,), 0.2), torch.full((50,), 0.8)]).view(1, 1, 10, 10)
    >>> 0.2 <= float(otsu_threshold(x)[0]) < 0.8
    True
    """
    x = _as_nchw(x, "x").float().flatten(1).clamp(0, 1)
    n = x.shape[0]
    idx = (x * (bins - 1)).round().long()
    hist = torch.zeros(n, bins, device=x.device).scatter_add_(1, idx, torch.ones_like(x))
    p = hist / hist.sum(1, keepdim=True)
    levels = torch.linspace(0, 1, bins, device=x.device)
    w0 = p.cumsum(1)
    mu = (p * levels).cumsum(1)
    mu_total = mu[:, -1:]
    between = (mu_total * w0 - mu).square() / (w0 * (1 - w0)).clamp_min(1e-12)
    return levels[between.argmax(1)]


def foreground(target: Tensor, grow: int = 2) -> Tensor:
    """The target's bright structures: ``target > Otsu threshold`` per sample, dilated by ``grow`` px.

    Channels are averaged first. A flat sample (range < 1e-3) has no foreground (an empty mask).

    >>> t = torch.zeros(1, 1, 12, 12); t[0, 0, 5:7, 5:7] = 1.0
    >>> int(foreground(t, grow=0).sum()), int(foreground(t, grow=1).sum())
    (4, 16)
    """
    target = _as_nchw(target, "target").float().mean(1, keepdim=True)
    threshold = otsu_threshold(target).view(-1, 1, 1, 1)
    flat = target.flatten(1)
    spread = (flat.amax(1) - flat.amin(1)).view(-1, 1, 1, 1)
    return dilate((target > threshold) & (spread >= FLAT_RANGE), grow)
