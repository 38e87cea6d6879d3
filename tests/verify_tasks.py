"""Plug-in tasks for the verification tests: one where a shaping term is known to matter, one where it cannot.

* ``verify_tasks:build`` — reproduce a sharp image (input = target). The primary ``pixel`` term compares 4x4
  averages only, so a blurred copy satisfies it; only the ``gradient`` term (full resolution) tells the model
  about the edges. Its weights must beat pixel-only.
* ``verify_tasks:build_inert`` — the same images with a full-resolution pixel term; the ``gradient`` term is
  computed on the detached prediction, so it adds a constant to the loss and never changes a parameter update:
  the weights and their matched baseline train the same model.
"""

import torch
from torch import nn

from losstune.losses.combined import WeightedLoss
from losstune.losses.gradient import gradient_loss
from losstune.losses.pixel import mse_loss
from losstune.trainables.task import Task


def _images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Random rectangles on a flat background: sharp edges at every scale."""
    images = torch.full((n, 1, size, size), 0.2)
    for i in range(n):
        for _ in range(3):
            y, x = torch.randint(0, size - 3, (2,), generator=generator).tolist()
            h, w = torch.randint(2, size // 2, (2,), generator=generator).tolist()
            images[i, 0, y:y + h, x:x + w] = torch.rand((), generator=generator) * 0.6 + 0.4
    return images


def _model() -> nn.Module:
    """One 3x3 convolution (the identity is one of its kernels), starting from a flat output: all it learns of
    the images' structure comes from the loss."""
    conv = nn.Conv2d(1, 1, 3, padding=1, padding_mode="replicate")
    nn.init.zeros_(conv.weight)
    return conv


def _task(name: str, config, pixel, gradient) -> Task:
    size = int(config.data.get("size", 16))
    images = _images(48, size, torch.Generator().manual_seed(config.seed))
    loss = WeightedLoss({"pixel": pixel, "gradient": gradient},
                        {"pixel": config.pixel_weight, "gradient": config.gradient_weight})
    return Task(
        name=name,
        train={"input": images[:36], "target": images[:36]},
        val={"input": images[36:], "target": images[36:]},
        build_model=_model,
        training_step=lambda model, batch, step: loss(step, pred=model(batch["input"]), target=batch["target"]),
        predict=lambda model, batch: model(batch["input"]).clamp(0, 1),
        target=lambda batch: batch["target"],
        baseline=lambda batch: torch.full_like(batch["target"], 0.5),
    )


def _coarse_mse(pred, target, **_):
    return mse_loss(nn.functional.avg_pool2d(pred, 4), nn.functional.avg_pool2d(target, 4))


def build(config) -> Task:
    """The pixel term sees 4x4 averages, the gradient term the edges."""
    return _task("edges", config, _coarse_mse, lambda pred, target, **_: gradient_loss(pred, target))


def build_inert(config) -> Task:
    """``inert``: full-resolution pixel term; a gradient term without any gradient (detached prediction)."""
    return _task("inert", config, lambda pred, target, **_: mse_loss(pred, target),
                 lambda pred, target, **_: gradient_loss(pred.detach(), target))
