"""The loss-term registry: which loss terms a task has, and what each one's config key is.

A task declares its terms once, on its factory::

    from losstune.trainables.terms import LossTerm, declare_terms

    @declare_terms(LossTerm("pixel", 1.0, shaping=False), LossTerm("edge", 0.0))
    def build(config) -> Task:
        ...  # reads config.pixel_weight and config.edge_weight

Each term's weight is the flat config key ``<name>_weight``. The built-in weights are fields of
:class:`~trainables.config.TrainConfig`; a plug-in term's weight (``edge_weight``) is accepted by the
training config of that task only, defaults to the term's ``default_weight``, and can be set in a
sweep's ``train:`` or searched in its ``space:`` like a built-in weight.

A *shaping* term is any term beside the task's primary one (the pixel or diffusion loss): the
verification stage compares a config with its :func:`matched_baseline`, the same config with every
shaping weight at 0. A factory that declares nothing is taken to read the built-in weights
(:data:`BUILTIN_TERMS`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from losstune.losses.combined import Term, WeightedLoss

TERMS_ATTRIBUTE = "loss_terms"  # the attribute of a task factory that holds its declared terms


@dataclass(frozen=True)
class LossTerm:
    """One named loss term of a task.

    Attributes:
        name: the term's name in :class:`~losses.combined.WeightedLoss` and in logs (an identifier).
        default_weight: its weight when the config does not set ``<name>_weight`` (>= 0).
        shaping: False only for the task's primary term (pixel or diffusion loss); a config with
            every shaping weight at 0 is the task's plain baseline.
        warmup: the weight ramps up from 0 over ``warmup_steps`` optimiser steps.
        models: the ``model.name`` values that use this term; empty: every model of the task.

    >>> edge = LossTerm("edge", 0.1)
    >>> edge.weight_key, edge.shaping
    ('edge_weight', True)
    >>> LossTerm("diffusion", 1.0, shaping=False, models=("ddpm",)).used_by("unet")
    False
    """

    name: str
    default_weight: float = 0.0
    shaping: bool = True
    warmup: bool = False
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (isinstance(self.name, str) and self.name.isidentifier()):
            raise ValueError(f"LossTerm.name: {self.name!r} is not an identifier")
        if not self.default_weight >= 0:
            raise ValueError(f"LossTerm {self.name!r}: default_weight must be >= 0, got {self.default_weight}")

    @property
    def weight_key(self) -> str:
        """The config key of this term's weight."""
        return f"{self.name}_weight"

    def used_by(self, model: str | None) -> bool:
        """Whether the model named ``model`` uses this term (None: not known, so yes)."""
        return model is None or not self.models or model in self.models


PIXEL = LossTerm("pixel", 1.0, shaping=False)
GRADIENT = LossTerm("gradient", 0.0)
PERCEPTUAL = LossTerm("perceptual", 0.0)
INTENSITY = LossTerm("intensity", 0.0)
DIFFUSION = LossTerm("diffusion", 1.0, shaping=False)
# the weights TrainConfig has a field for; the terms of a factory that declares none
BUILTIN_TERMS = (PIXEL, GRADIENT, PERCEPTUAL, INTENSITY, DIFFUSION)
BUILTIN_WEIGHT_KEYS = frozenset(term.weight_key for term in BUILTIN_TERMS)


def declare_terms(*terms: LossTerm) -> Callable[[Callable], Callable]:
    """Decorator: the loss terms of a task factory (stored as its ``loss_terms`` attribute).

    >>> @declare_terms(PIXEL, LossTerm("edge", 0.0))
    ... def build(config): ...
    >>> [term.weight_key for term in build.loss_terms]
    ['pixel_weight', 'edge_weight']
    """
    names = [term.name for term in terms]
    if not terms or len(set(names)) != len(names):
        raise ValueError(f"declare_terms: need one or more terms with distinct names, got {names}")
    for term in terms:
        builtin = next((b for b in BUILTIN_TERMS if b.name == term.name), None)
        if builtin is not None and builtin.default_weight != term.default_weight:
            raise ValueError(f"declare_terms: {term.weight_key} is a built-in weight whose default is "
                             f"{builtin.default_weight}, not {term.default_weight}")

    def attach(factory: Callable) -> Callable:
        setattr(factory, TERMS_ATTRIBUTE, tuple(terms))
        return factory

    return attach


def factory_terms(factory: Callable) -> tuple[LossTerm, ...]:
    """The terms a task factory declares (:data:`BUILTIN_TERMS` when it declares none)."""
    return tuple(getattr(factory, TERMS_ATTRIBUTE, None) or BUILTIN_TERMS)


def loss_terms(task: str) -> tuple[LossTerm, ...]:
    """The loss terms of a built-in or plug-in task (``ConfigError`` naming ``task`` if unknown).

    >>> [term.name for term in loss_terms("microstructure")]
    ['pixel', 'gradient', 'perceptual']
    """
    # the registry imports the training config, which imports this module: resolve at call time
    from losstune.trainables.registry import get_task_factory

    return factory_terms(get_task_factory(task))


def model_name(config: Mapping[str, Any]) -> str | None:
    """``model.name`` of a flat training config (``model: ddpm`` is shorthand), None if not set."""
    model = config.get("model")
    if isinstance(model, str):
        return model
    return model.get("name") if isinstance(model, Mapping) else None


def shaping_weight_names(config: Mapping[str, Any]) -> list[str]:
    """The ``<term>_weight`` keys of the shaping terms of this config's task and model.

    >>> shaping_weight_names({"task": "microscopy", "model": {"name": "ddpm"}})
    ['intensity_weight', 'gradient_weight', 'perceptual_weight']
    """
    model = model_name(config)
    return [term.weight_key for term in loss_terms(str(config.get("task") or "microstructure"))
            if term.shaping and term.used_by(model)]


def matched_baseline(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with every shaping weight set to 0, everything else equal.

    >>> base = matched_baseline({"task": "microstructure", "gradient_weight": 0.3, "lr": 0.01})
    >>> base["gradient_weight"], base["perceptual_weight"], base["lr"]
    (0.0, 0.0, 0.01)
    """
    baseline = copy.deepcopy(dict(config))
    for key in shaping_weight_names(config):
        baseline[key] = 0.0
    return baseline


def config_weights(terms: Sequence[LossTerm], config: Any) -> dict[str, float]:
    """Term name -> its weight in a parsed training config (``config.<name>_weight``)."""
    return {term.name: float(getattr(config, term.weight_key)) for term in terms}


def weighted_loss(terms: Sequence[LossTerm], functions: Mapping[str, Term], config: Any) -> WeightedLoss:
    """The :class:`WeightedLoss` of the declared ``terms`` that ``functions`` implements.

    Weights are read from ``config`` (``<name>_weight``); the terms declared with ``warmup`` ramp
    up over ``config.warmup_steps``. A function with no declared term is a ``ValueError``.
    """
    declared = {term.name: term for term in terms}
    undeclared = sorted(set(functions) - set(declared))
    if undeclared:
        raise ValueError(f"loss functions {undeclared} have no declared term; declared: {sorted(declared)}")
    used = [declared[name] for name in functions]
    steps = int(getattr(config, "warmup_steps", 0) or 0)
    warmup = {term.name: steps for term in used if term.warmup} if steps > 0 else None
    return WeightedLoss(dict(functions), config_weights(used, config), warmup=warmup or None)

