"""The task interface: everything the training loop needs to know about one problem.

A task is built from the (flat) training config by a factory ``build(config) -> Task``.
Built-in tasks are registered by name in :mod:`trainables.registry`; a user's task is
named in config as ``"module.path:function"``.

Data are dicts of tensors whose first dimension indexes samples, so the loop can move
the whole set to the device once (``preload``) and slice batches there without any
host round trip.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

Batch = dict[str, torch.Tensor]
# training_step returns the total loss and each weighted component (detached tensors)
LossResult = tuple[torch.Tensor, dict[str, torch.Tensor]]


@dataclass
class Task:
    """One image-to-image problem.

    Attributes:
        name: short name (used in logs).
        train / val: named tensors, first dim = samples (e.g. ``{"inputs": ..., "target": ...}``).
        build_model: returns a fresh ``nn.Module`` (the loop moves it to the device).
        training_step: ``(model, batch, step) -> (total_loss, components)``; ``step`` is the
            global optimiser step (for warm-up schedules). Runs inside ``torch.autocast``.
        predict: ``(model, batch) -> prediction`` in the target's range [0, 1], N×C×H×W.
            Used for validation metrics (under ``torch.no_grad``).
        target: ``batch -> target`` image N×C×H×W in [0, 1].
        baseline: ``batch -> trivial prediction`` (e.g. last input frame); its MSE is the
            composite score's ``mse_ref``.
        weight_names: deprecated, unused (a non-empty value warns). A task's loss weights are declared once,
            on its factory (:func:`trainables.terms.declare_terms`); validation, the search space, export
            and the verification's matched baseline read them from there.
        inputs_for_display: optional ``batch -> image`` N×C×H×W shown as "input" in reports.
        loss_modules: modules owned by the loss (e.g. a perceptual extractor) that must follow
            the model to the device; they are not trained.
        eval_mask: optional ``batch -> region`` N×1×H×W (bool, or float > 0.5 = in): the pixels the
            objective should look at (e.g. where the image changes). With it every validation
            metric is also reported over the region (``ssim_active`` ...), and the composite can be
            scored there (``objective_region``). It must depend on the batch only (not the model).
        augment: optional ``(batch, generator) -> batch``, applied by the loop to every training batch (not
            to validation) before ``training_step``, e.g. random flips and rotations
            (:func:`trainables.data.augment.dihedral`). It must draw its randomness from ``generator`` (a
            CPU generator saved in checkpoints), so runs repeat and resume exactly.
    """

    name: str
    train: Batch
    val: Batch
    build_model: Callable[[], nn.Module]
    training_step: Callable[[nn.Module, Batch, int], LossResult]
    predict: Callable[[nn.Module, Batch], torch.Tensor]
    target: Callable[[Batch], torch.Tensor]
    baseline: Callable[[Batch], torch.Tensor]
    weight_names: tuple[str, ...] = ()
    inputs_for_display: Callable[[Batch], torch.Tensor] | None = None
    loss_modules: list[nn.Module] = field(default_factory=list)
    eval_mask: Callable[[Batch], torch.Tensor] | None = None
    augment: Callable[[Batch, torch.Generator], Batch] | None = None

    def __post_init__(self) -> None:
        if self.weight_names:
            warnings.warn(f"task {self.name!r}: Task.weight_names is deprecated and unused; declare the task's loss "
                          "terms on its factory with losstune.trainables.terms.declare_terms", DeprecationWarning,
                          stacklevel=3)
        for split, data in (("train", self.train), ("val", self.val)):
            if not data:
                raise ValueError(f"task {self.name!r}: {split} data is empty")
            sizes = {k: v.shape[0] for k, v in data.items()}
            if len(set(sizes.values())) != 1:
                raise ValueError(f"task {self.name!r}: {split} tensors differ in length: {sizes}")
            if next(iter(sizes.values())) == 0:
                raise ValueError(f"task {self.name!r}: {split} data has no samples")

    @property
    def num_train(self) -> int:
        return next(iter(self.train.values())).shape[0]

    @property
    def num_val(self) -> int:
        return next(iter(self.val.values())).shape[0]


TaskFactory = Callable[[Mapping], Task]
