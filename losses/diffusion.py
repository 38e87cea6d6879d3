"""Denoising-diffusion training loss.

Ho, Jain & Abbeel, "Denoising diffusion probabilistic models", NeurIPS 2020: with
``x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε``, the network predicts ``ε`` and is trained with the
simplified objective ``L_simple = E‖ε − ε_θ(x_t, t)‖²`` (the mean over all elements).
"""

from __future__ import annotations

from torch import Tensor

from losstune.losses._checks import check_pair, upcast


def diffusion_loss(eps_pred: Tensor, eps: Tensor) -> Tensor:
    """DDPM ε-prediction loss ``mean((eps_pred − eps)²)`` (computed in float32 for half inputs).

    >>> import torch
    >>> eps = torch.randn(4, 1, 8, 8)
    >>> diffusion_loss(eps, eps), diffusion_loss(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    (tensor(0.), tensor(1.))
    """
    check_pair(eps_pred, eps, ("eps_pred", "eps"))
    return (upcast(eps_pred) - upcast(eps)).square().mean()
