"""Solidification-window weighting: emphasise pixels in the mushy zone.

In a solidifying melt the microstructure forms where the temperature lies between the solidus
and the liquidus (``T_solidus ≤ T ≤ T_liquidus``); fully liquid and fully solid regions change
little. These weights emphasise the window by a factor ``boost`` with smooth (logistic)
edges, and are normalised to mean 1 per sample so that they redistribute the loss without
changing its overall scale (they do not act as a learning rate).
"""

from __future__ import annotations

import torch
from torch import Tensor

from losstune.losses._checks import check_tensor, compute_dtype, upcast


def _window(t: Tensor, t_solidus: float, t_liquidus: float, softness: float) -> Tensor:
    """Soft indicator of ``t_solidus ≤ t ≤ t_liquidus`` in [0, 1]."""
    if softness == 0:
        return ((t >= t_solidus) & (t <= t_liquidus)).to(t.dtype)
    tau = softness * (t_liquidus - t_solidus)
    return torch.sigmoid((t - t_solidus) / tau) * torch.sigmoid((t_liquidus - t) / tau)


@torch.no_grad()
def solidification_weights(temperature: Tensor, t_solidus: float, t_liquidus: float, boost: float = 4.0,
                           softness: float = 0.05) -> Tensor:
    """Per-pixel weights N×1×H×W (mean 1 per sample) from a temperature map.

    Before normalisation the weight is ``1 + (boost − 1)·s(T)`` with ``s`` the soft window
    indicator ``σ((T − T_s)/τ)·σ((T_l − T)/τ)``, ``τ = softness·(T_l − T_s)``; so pixels deep in
    the window weigh ``boost`` times as much as pixels far outside it.

    Args:
        temperature: N×H×W or N×1×H×W (any units, the same as the two thresholds).
        t_solidus, t_liquidus: window edges, ``t_solidus < t_liquidus``.
        boost: weight ratio inside/outside the window (> 0; 1 gives uniform weights).
        softness: edge width as a fraction of the window width (0 gives a hard window).

    >>> temperature = torch.tensor([[[1500.0, 1650.0]]])  # N×H×W: one pixel below, one inside the window
    >>> w = solidification_weights(temperature, t_solidus=1600.0, t_liquidus=1700.0, boost=4.0, softness=0.0)
    >>> w.shape, w.mean().item(), (w[..., 1] / w[..., 0]).item()
    (torch.Size([1, 1, 1, 2]), 1.0, 4.0)
    """
    check_tensor(temperature, "temperature")
    if temperature.ndim == 3:
        temperature = temperature.unsqueeze(1)
    if temperature.ndim != 4 or temperature.shape[1] != 1:
        raise ValueError(f"temperature: expected N×H×W or N×1×H×W, got shape {tuple(temperature.shape)}")
    if not t_liquidus > t_solidus:
        raise ValueError(f"t_liquidus ({t_liquidus}) must be greater than t_solidus ({t_solidus})")
    if not boost > 0:
        raise ValueError(f"boost: must be > 0, got {boost}")
    if not softness >= 0:
        raise ValueError(f"softness: must be >= 0, got {softness}")
    t = upcast(temperature.detach())
    raw = 1.0 + (boost - 1.0) * _window(t, float(t_solidus), float(t_liquidus), float(softness))
    return (raw / raw.mean(dim=(1, 2, 3), keepdim=True)).to(compute_dtype(temperature))
