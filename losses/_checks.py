"""Shared input validation for loss terms and metrics.

Loss terms only check *shapes* (metadata, free): they never look at tensor values, since a
NaN check would force a host sync every step (the training loop detects divergence itself).
Metrics (:mod:`losses.metrics`) additionally check that values are finite.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_tensor(x: object, name: str) -> Tensor:
    """``x`` itself if it is a floating-point tensor, else ``ValueError`` naming ``name``."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    return x


def check_pair(pred: object, target: object, names: tuple[str, str] = ("pred", "target"),
               *, min_ndim: int = 1, max_ndim: int | None = None) -> None:
    """Both are floating tensors of the same shape with ``min_ndim <= ndim <= max_ndim``."""
    check_tensor(pred, names[0])
    check_tensor(target, names[1])
    if pred.shape != target.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.ndim < min_ndim or (max_ndim is not None and pred.ndim > max_ndim):
        want = f"{min_ndim}" if max_ndim == min_ndim else f"{min_ndim}..{max_ndim or 'any'}"
        raise ValueError(f"{names[0]}: expected {want} dimensions, got {pred.ndim} "
                         f"(shape {tuple(pred.shape)})")
    if pred.device != target.device:
        raise ValueError(f"{names[0]} is on {pred.device} but {names[1]} is on {target.device}")


def check_weight(weight: Tensor | None, like: Tensor, name: str = "weight") -> None:
    """``weight`` is ``None`` or a tensor that broadcasts to ``like``'s shape (e.g. N×1×H×W)."""
    if weight is None:
        return
    check_tensor(weight, name)
    # by hand: torch.broadcast_shapes imports sympy on first use (~0.4 s)
    fits = weight.ndim <= like.ndim and all(
        w == 1 or w == n for w, n in zip(reversed(weight.shape), reversed(like.shape)))
    if not fits:
        raise ValueError(f"{name}: shape {tuple(weight.shape)} does not broadcast to the "
                         f"prediction's shape {tuple(like.shape)}")


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64: the dtype losses compute in."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def upcast(x: Tensor) -> Tensor:
    """``x`` in :func:`compute_dtype` (differentiable; a no-op for float32/float64)."""
    return x.to(compute_dtype(x))
