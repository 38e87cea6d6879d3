"""A weighted sum of named loss terms with optional linear warm-up of their weights."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

Term = Callable[..., Tensor]


def _check_names(names: Mapping, terms: Mapping, what: str) -> None:
    unknown = sorted(set(names) - set(terms))
    if unknown:
        raise ValueError(f"{what}: no loss term named {', '.join(map(repr, unknown))}; "
                         f"terms are {sorted(terms)}")


def _check_weights(weights: Mapping[str, float], terms: Mapping[str, Term]) -> dict[str, float]:
    _check_names(weights, terms, "weights")
    missing = sorted(set(terms) - set(weights))
    if missing:
        raise ValueError(f"weights: no weight given for term(s) {', '.join(map(repr, missing))}")
    out = {}
    for name, w in weights.items():
        w = float(w)
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weights[{name!r}]: must be a finite number >= 0, got {w}")
        out[name] = w
    if not any(w > 0 for w in out.values()):
        raise ValueError("weights: all weights are 0, there is nothing to optimise")
    return out


def _check_warmup(warmup: Mapping[str, int] | None, terms: Mapping[str, Term]) -> dict[str, int]:
    if not warmup:
        return {}
    _check_names(warmup, terms, "warmup")
    out = {}
    for name, steps in warmup.items():
        if isinstance(steps, bool) or int(steps) != steps or steps < 0:
            raise ValueError(f"warmup[{name!r}]: must be a whole number of steps >= 0, got {steps!r}")
        out[name] = int(steps)
    return out


class WeightedLoss:
    """``total = Σ_name weight_at(name, step) · term(**inputs)`` over the terms with weight > 0.

    Args:
        terms: name -> callable called as ``term(**inputs)``; each takes the keyword arguments it
            needs and ignores the rest via ``**_`` (``lambda pred, target, **_: mse_loss(pred, target)``).
        weights: name -> weight >= 0, one for every term (``ValueError`` for an unknown name, a
            missing or negative weight). A term with weight 0 is never called.
        warmup: name -> N steps: that weight ramps linearly from 0 at step 0 to its full value at
            step N (``w·min(step/N, 1)``); the term is still called during the ramp.

    Calling ``loss(step, **inputs)`` returns ``(total, components)``: ``components[name]`` is the
    *weighted* value of each term, detached (a 0 tensor for weight-0 terms). Nothing syncs
    with the host, so a NaN simply propagates to ``total`` for the training loop to detect.

    >>> from losstune.losses.pixel import l1_loss, mse_loss
    >>> loss = WeightedLoss({"mse": lambda pred, target, **_: mse_loss(pred, target),
    ...                      "l1": lambda pred, target, **_: l1_loss(pred, target)},
    ...                     {"mse": 1.0, "l1": 0.5}, warmup={"l1": 10})
    >>> total, parts = loss(5, pred=torch.ones(1, 1, 2, 2), target=torch.zeros(1, 1, 2, 2))
    >>> total, parts["l1"], loss.weight_at("l1", 5)  # half-way through the l1 warm-up
    (tensor(1.2500), tensor(0.2500), 0.25)
    """

    def __init__(self, terms: Mapping[str, Term], weights: Mapping[str, float],
                 warmup: Mapping[str, int] | None = None):
        if not terms:
            raise ValueError("terms: need at least one loss term")
        for name, term in terms.items():
            if not callable(term):
                raise ValueError(f"terms[{name!r}]: must be callable, got {type(term).__name__}")
        self.terms: dict[str, Term] = dict(terms)
        self.weights: dict[str, float] = _check_weights(weights, self.terms)
        self.warmup: dict[str, int] = _check_warmup(warmup, self.terms)

    @property
    def active(self) -> list[str]:
        """Names of the terms that are computed (weight > 0)."""
        return [name for name in self.terms if self.weights[name] > 0]

    def weight_at(self, name: str, step: int) -> float:
        """The weight of term ``name`` at optimiser step ``step`` (after warm-up)."""
        if name not in self.weights:
            raise ValueError(f"no loss term named {name!r}; terms are {sorted(self.terms)}")
        w, n = self.weights[name], self.warmup.get(name, 0)
        if n <= 0:
            return w
        return w * min(max(step, 0) / n, 1.0)

    def __call__(self, step: int = 0, **inputs) -> tuple[Tensor, dict[str, Tensor]]:
        total: Tensor | None = None
        weighted: dict[str, Tensor] = {}
        for name in self.active:
            value = self.terms[name](**inputs)
            if not isinstance(value, Tensor) or value.ndim != 0:
                raise ValueError(f"loss term {name!r} must return a scalar tensor, got "
                                 f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}")
            weighted[name] = self.weight_at(name, step) * value
            total = weighted[name] if total is None else total + weighted[name]
        components = {}
        for name in self.terms:
            components[name] = weighted[name].detach() if name in weighted else torch.zeros_like(total).detach()
        return total, components

    def __repr__(self) -> str:
        parts = ", ".join(f"{name}={self.weights[name]:g}" + (f" (warm-up {self.warmup[name]})"
                                                            if name in self.warmup else "")
                          for name in self.terms)
        return f"WeightedLoss({parts})"
