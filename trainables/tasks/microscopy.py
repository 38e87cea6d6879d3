"""The ``microscopy`` task: widefield (WF) → two-photon-like (2P) images.

Data: synthetic specimens (:mod:`trainables.data.microscopy`) or, with ``data.input_dir`` and
``data.target_dir``, paired image folders (:mod:`trainables.data.paired_folder`).
Batches are ``{"input": N×1×H×W WF, "target": N×1×H×W 2P}`` in [0, 1].

Models (``model.name``):

* ``unet``: a UNet regressor with a sigmoid output; loss
  ``pixel_weight·pixel + gradient_weight·gradient + intensity_weight·intensity (+ perceptual_weight·perceptual)``.
* ``ddpm``: a conditional DDPM (ε-prediction, WF as condition); loss
  ``diffusion_weight·diffusion + intensity_weight·intensity + gradient_weight·gradient (+ perceptual)``
  where the image terms compare the predicted x0 with the target. Validation predictions are
  deterministic DDIM samples (``model.sampling_steps`` steps, fixed noise seed).

In both the intensity weight ramps up linearly over ``warmup_steps`` optimiser steps. The terms are
declared in :data:`LOSS_TERMS` (see :mod:`trainables.terms`); the primary term is pixel for unet,
diffusion for ddpm.

Evaluation region (``Task.eval_mask``, the ``*_active`` metrics), ``data.eval_region``:
``foreground`` (default) = the target's bright structures, ``target > Otsu threshold`` per crop,
dilated by 2 px (a flat crop has none; the metrics then fall back to the whole frame for it), so
the dark background that most crops of a specimen are does not dominate the score; ``none`` = no
region (the objective is the whole frame).

Augmentation (``data.augment``): ``dihedral`` (default) turns and mirrors each training batch at random
(one of the 8 symmetries of the square, :func:`trainables.data.augment.dihedral`): a specimen has no
preferred orientation; on a few training images it kept models from over-fitting at twice the epochs
and did not narrow the spread between model seeds (README, Augmentation); ``none`` trains on the crops
as loaded.

Validation size: folder data are split by image and the validation images give at least
``data.min_val_crops`` crops (default 32).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from losstune.losses.combined import WeightedLoss
from losstune.losses.diffusion import diffusion_loss
from losstune.losses.gradient import gradient_loss
from losstune.losses.intensity import intensity_weighted_loss
from losstune.losses.pixel import charbonnier_loss, l1_loss, mse_loss
from losstune.losses.regions import foreground
from losstune.trainables.config import ConfigError, TrainConfig, parse_section
from losstune.trainables.data.augment import dihedral
from losstune.trainables.data.microscopy import make_synthetic
from losstune.trainables.data.paired_folder import load_paired_folders
from losstune.trainables.models.ddpm import ConditionalDDPM
from losstune.trainables.models.unet import UNet
from losstune.trainables.task import Batch, Task
from losstune.trainables.terms import (DIFFUSION, GRADIENT, INTENSITY, PERCEPTUAL, PIXEL, config_weights,
                                       declare_terms, weighted_loss)

# the fixed seed of the DDIM starting noise at evaluation: the same model gives the same predictions
EVAL_SEED = 0
_TRAIN_SPLIT, _VAL_SPLIT = 0x7A1, 0x7A2  # mixed into the data seed so train and val differ

FOREGROUND_GROW_PX = 2  # the foreground is dilated by this much (to include the edges around it)

PIXEL_LOSSES = {"mse": mse_loss, "l1": l1_loss, "charbonnier": charbonnier_loss}


class MicroscopyData(BaseModel):
    """``data`` section of the microscopy task."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(64, ge=8, description="synthetic image size (px)")
    num_train: int = Field(64, ge=1, description="synthetic training pairs")
    num_val: int = Field(16, ge=1, description="synthetic validation pairs")
    seed: int | None = Field(None, description="data seed; default: the run's seed")
    input_dir: str | None = Field(None, description="folder of WF images (with target_dir: use real data)")
    target_dir: str | None = Field(None, description="folder of 2P images, same names as input_dir")
    val_input_dir: str | None = None
    val_target_dir: str | None = None
    crop_size: int | None = Field(None, ge=8, description="crop size for folder data; default: size")
    crops_per_image: int = Field(4, ge=1)
    percentiles: tuple[float, float] = (1.0, 99.8)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    min_val_crops: int = Field(32, ge=1, description="folder data: validation crops at least (more per image)")
    eval_region: Literal["foreground", "none"] = Field(
        "foreground", description="the region of the *_active metrics: the target's foreground (Otsu), or none")
    augment: Literal["dihedral", "none"] = Field(
        "dihedral", description="training batches turned and mirrored at random (one of the square's 8 "
                                "symmetries), or none")

    @field_validator("percentiles")
    @classmethod
    def _check_percentiles(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 <= low < high <= 100:
            raise ValueError(f"need 0 <= low < high <= 100, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _check(self) -> "MicroscopyData":
        if (self.input_dir is None) != (self.target_dir is None):
            raise ValueError("input_dir and target_dir go together (give both or neither)")
        if (self.val_input_dir is None) != (self.val_target_dir is None):
            raise ValueError("val_input_dir and val_target_dir go together (give both or neither)")
        if self.val_input_dir is not None and self.input_dir is None:
            raise ValueError("val_input_dir/val_target_dir need input_dir/target_dir")
        return self


class MicroscopyModel(BaseModel):
    """``model`` section of the microscopy task."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["unet", "ddpm"] = "unet"
    base_channels: int = Field(16, ge=4)
    depth: int = Field(2, ge=0, le=6)
    timesteps: int = Field(200, ge=2, description="ddpm: diffusion steps")
    schedule: Literal["linear", "cosine"] = Field("linear", description="ddpm: noise schedule")
    sampling_steps: int = Field(10, ge=1, description="ddpm: DDIM steps at evaluation")

    @model_validator(mode="after")
    def _check(self) -> "MicroscopyModel":
        if self.sampling_steps > self.timesteps:
            raise ValueError(f"sampling_steps ({self.sampling_steps}) must not exceed timesteps ({self.timesteps})")
        return self


def _split_seed(seed: int, split: int) -> int:
    return (int(seed) * 1_000_003 + split) % (2 ** 63)


def load_data(data: MicroscopyData, seed: int) -> tuple[Batch, Batch]:
    """Train and validation batches ``{"input", "target"}`` (folders if configured, else synthetic)."""
    if data.input_dir is not None:
        try:
            return load_paired_folders(
                data.input_dir, data.target_dir, crop_size=data.crop_size or data.size,
                crops_per_image=data.crops_per_image, percentiles=data.percentiles, seed=seed,
                val_input_dir=data.val_input_dir, val_target_dir=data.val_target_dir,
                val_fraction=data.val_fraction, min_val_crops=data.min_val_crops, prefix="data.")
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(str(err)) from None
    train_wf, train_tp = make_synthetic(data.num_train, data.size, _split_seed(seed, _TRAIN_SPLIT))
    val_wf, val_tp = make_synthetic(data.num_val, data.size, _split_seed(seed, _VAL_SPLIT))
    return {"input": train_wf, "target": train_tp}, {"input": val_wf, "target": val_tp}


LOSS_TERMS = (dataclasses.replace(PIXEL, models=("unet",)), dataclasses.replace(DIFFUSION, models=("ddpm",)),
              dataclasses.replace(INTENSITY, warmup=True), GRADIENT, PERCEPTUAL)


def _weighted_loss(functions, config: TrainConfig, model_name: str) -> WeightedLoss:
    weights = config_weights([t for t in LOSS_TERMS if t.name in functions], config)
    if not any(w > 0 for w in weights.values()):
        names = ", ".join(f"{name}_weight" for name in weights)
        raise ConfigError(f"{names}: all loss weights of the microscopy task (model.name={model_name}) are 0; "
                          "nothing to optimise")
    return weighted_loss(LOSS_TERMS, functions, config)


@declare_terms(*LOSS_TERMS)
def build(config: TrainConfig) -> Task:
    """The microscopy task for ``config`` (``data``/``model`` sections validated, errors name the field)."""
    data = parse_section(MicroscopyData, config.data, "data")
    arch = parse_section(MicroscopyModel, config.model, "model")
    train, val = load_data(data, config.seed if data.seed is None else data.seed)

    loss_modules: list[nn.Module] = []
    functions = {
        "intensity": lambda pred, target, **_: intensity_weighted_loss(pred, target),
        "gradient": lambda pred, target, **_: gradient_loss(pred, target, mode=config.gradient_mode),
    }
    if config.perceptual_weight > 0:
        from losstune.losses.perceptual import PerceptualLoss

        try:
            perceptual = PerceptualLoss(in_channels=1, weights_path=config.perceptual_weights_path)
        except (OSError, ValueError) as err:
            raise ConfigError(f"perceptual_weights_path: {err}") from None
        perceptual.requires_grad_(False)
        loss_modules.append(perceptual)
        functions["perceptual"] = lambda pred, target, **_: perceptual(pred, target)

    if arch.name == "unet":
        pixel = PIXEL_LOSSES[config.pixel_loss]
        functions["pixel"] = lambda pred, target, **_: pixel(pred, target)
        loss = _weighted_loss(functions, config, arch.name)

        def build_model() -> nn.Module:
            return UNet(1, 1, arch.base_channels, arch.depth, out_activation="sigmoid")

        def training_step(model, batch, step):
            return loss(step, pred=model(batch["input"]), target=batch["target"])

        def predict(model, batch):
            return model(batch["input"])
    else:
        functions["diffusion"] = lambda eps_pred, eps, **_: diffusion_loss(eps_pred, eps)
        loss = _weighted_loss(functions, config, arch.name)

        def build_model() -> nn.Module:
            return ConditionalDDPM(arch.base_channels, arch.depth, arch.timesteps, arch.schedule, arch.sampling_steps)

        def training_step(model, batch, step):
            out = model.training_outputs(batch["target"], batch["input"])
            return loss(step, eps_pred=out.eps_pred, eps=out.eps, pred=out.x0_pred, target=batch["target"])

        def predict(model, batch):
            return model.sample(batch["input"], arch.sampling_steps, seed=EVAL_SEED)

    return Task(
        name="microscopy",
        train=train,
        val=val,
        build_model=build_model,
        training_step=training_step,
        predict=predict,
        target=lambda batch: batch["target"],
        baseline=lambda batch: batch["input"],
        inputs_for_display=lambda batch: batch["input"],
        loss_modules=loss_modules,
        eval_mask=(lambda batch: foreground(batch["target"], FOREGROUND_GROW_PX)) if data.eval_region != "none" else None,
        augment=dihedral if data.augment == "dihedral" else None,
    )
