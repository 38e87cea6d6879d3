"""A user's task defined outside losstune, named in config as ``plugin_task:build``.

Denoising of smooth random images: the smallest real image-to-image task that still
exercises the plug-in path end to end. ``plugin_task:build_with_edges`` is the same task with a
loss term of its own (``edge``, weight ``edge_weight``), declared through the loss-term registry;
``plugin_task:build_slow`` sleeps ``data.step_sleep`` s per training step (trials that overlap, or that a
test can interrupt half-way).
"""

import time

import torch
from torch import nn

from losstune.losses.combined import WeightedLoss
from losstune.losses.gradient import gradient_loss
from losstune.losses.pixel import mse_loss
from losstune.trainables.task import Task
from losstune.trainables.terms import PIXEL, LossTerm, declare_terms, weighted_loss

EDGE = LossTerm("edge", default_weight=0.0, warmup=True)


def _images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    coarse = torch.rand(n, 1, size // 4, size // 4, generator=generator)
    return nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def build(config) -> Task:
    loss = WeightedLoss(
        {"pixel": lambda pred, target, **_: mse_loss(pred, target),
         "gradient": lambda pred, target, **_: gradient_loss(pred, target)},
        {"pixel": config.pixel_weight, "gradient": config.gradient_weight})
    return _denoise(config, loss)


def build_slow(config) -> Task:
    """:func:`build`, sleeping ``data.step_sleep`` s (default 0.05) per training step."""
    task = build(config)
    sleep = float(config.data.get("step_sleep", 0.05))
    inner = task.training_step

    def training_step(model, batch, step):
        time.sleep(sleep)
        return inner(model, batch, step)

    task.training_step = training_step
    return task


def edge_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the images' Laplacians (a term losstune does not ship)."""
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=pred.dtype,
                          device=pred.device).view(1, 1, 3, 3).repeat(pred.shape[1], 1, 1, 1)
    laplacian = lambda x: nn.functional.conv2d(x, kernel, groups=x.shape[1])  # noqa: E731
    return (laplacian(pred) - laplacian(target)).abs().mean()


@declare_terms(PIXEL, EDGE)
def build_with_edges(config) -> Task:
    functions = {"pixel": lambda pred, target, **_: mse_loss(pred, target),
                 "edge": lambda pred, target, **_: edge_loss(pred, target)}
    loss = weighted_loss(build_with_edges.loss_terms, functions, config)
    return _denoise(config, loss)


def _denoise(config, loss: WeightedLoss) -> Task:
    size = int(config.data.get("size", 16))
    g = torch.Generator().manual_seed(config.seed)
    clean = _images(48, size, g)
    noisy = (clean + 0.15 * torch.randn(clean.shape, generator=g)).clamp(0, 1)

    def build_model() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1), nn.Sigmoid())

    def training_step(model, batch, step):
        return loss(step, pred=model(batch["input"]), target=batch["target"])

    return Task(
        name="denoise",
        train={"input": noisy[:36], "target": clean[:36]},
        val={"input": noisy[36:], "target": clean[36:]},
        build_model=build_model,
        training_step=training_step,
        predict=lambda model, batch: model(batch["input"]),
        target=lambda batch: batch["target"],
        baseline=lambda batch: batch["input"],
    )


def build_poisoned(config) -> Task:
    """The same task whose loss turns NaN after ``data.poison_step`` steps (a diverging run)."""
    task = build(config)
    poison_step = int(config.data.get("poison_step", 2))
    clean_step = task.training_step

    def training_step(model, batch, step):
        total, components = clean_step(model, batch, step)
        if step >= poison_step:
            total = total * float("nan")
        return total, components

    task.training_step = training_step
    return task
