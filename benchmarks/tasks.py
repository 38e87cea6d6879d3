"""A plug-in task for the overhead benchmark (``task: benchmarks.tasks:build``).

Denoising of smooth random images with a small conv net and a real ``WeightedLoss`` (pixel + gradient
+ perceptual): its set-up (data generation) is ~ms, so a sweep's overhead measures losstune (Ray,
Optuna, MLflow, checkpoints), not a data loader. ``data``: ``size`` (32), ``num_train`` (64),
``num_val`` (16); ``model``: ``channels`` (16), ``layers`` (3).
"""

from __future__ import annotations

import torch
from torch import nn

from losstune.losses.combined import WeightedLoss
from losstune.losses.gradient import gradient_loss
from losstune.losses.perceptual import PerceptualLoss
from losstune.losses.pixel import mse_loss
from losstune.trainables.task import Task


def _images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    coarse = torch.rand(n, 1, max(2, size // 4), max(2, size // 4), generator=generator)
    return nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def build(config) -> Task:
    size = int(config.data.get("size", 32))
    n_train, n_val = int(config.data.get("num_train", 64)), int(config.data.get("num_val", 16))
    channels, layers = int(config.model.get("channels", 16)), int(config.model.get("layers", 3))
    g = torch.Generator().manual_seed(config.seed)
    clean = _images(n_train + n_val, size, g)
    noisy = (clean + 0.15 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    terms = {"pixel": lambda pred, target, **_: mse_loss(pred, target),
             "gradient": lambda pred, target, **_: gradient_loss(pred, target)}
    weights = {"pixel": config.pixel_weight, "gradient": config.gradient_weight}
    modules: list[nn.Module] = []
    if config.perceptual_weight > 0:
        net = PerceptualLoss(in_channels=1)
        terms["perceptual"] = lambda pred, target, **_: net(pred, target)
        weights["perceptual"] = config.perceptual_weight
        modules.append(net)
    loss = WeightedLoss(terms, weights)

    def build_model() -> nn.Module:
        mods: list[nn.Module] = [nn.Conv2d(1, channels, 3, padding=1), nn.ReLU()]
        for _ in range(layers - 2):
            mods += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()]
        mods += [nn.Conv2d(channels, 1, 3, padding=1), nn.Sigmoid()]
        return nn.Sequential(*mods)

    def training_step(model, batch, step):
        return loss(step, pred=model(batch["input"]), target=batch["target"])

    return Task(
        name="bench-denoise",
        train={"input": noisy[:n_train], "target": clean[:n_train]},
        val={"input": noisy[n_train:], "target": clean[n_train:]},
        build_model=build_model,
        training_step=training_step,
        predict=lambda model, batch: model(batch["input"]),
        target=lambda batch: batch["target"],
        baseline=lambda batch: batch["input"],
        loss_modules=modules,
    )
