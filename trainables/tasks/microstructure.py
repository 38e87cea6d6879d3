"""Task ``microstructure``: predict the next frame of a laser-solidification microstructure.

Data: synthetic sequences from :mod:`trainables.data.solidification` or, with ``data.npz``, real
ones from :mod:`trainables.data.npz_sequences`. Each sequence gives ``frames - seq_length``
samples: ``seq_length`` consecutive input frames of 4 channels (RGB + normalised temperature,
see :func:`~trainables.data.solidification.normalise_temperature`) -> the next RGB frame.
Train and validation are split by sequence (a single-sequence ``.npz`` is split in time into two
disjoint segments instead), so no frame is in both.

Batch keys: ``frames`` N×T×4×H×W, ``target`` N×3×H×W, ``temperature`` N×1×H×W (the target frame's
temperature in kelvin, for the solidification-window weighting); all float32.

``data`` keys (defaults): ``size`` 64 (>= 16; synthetic only, an ``.npz`` keeps its own size),
``num_sequences`` 16 (>= 2), ``frames`` 12, ``seq_length`` 4 (``frames >= seq_length + 1``),
``val_fraction`` 0.25, ``npz`` None (path of an ``.npz`` file), ``seed`` None (= the run's ``seed``),
``max_tracks`` 3 (synthetic: at most this many laser tracks per sequence).

``model`` keys (defaults): ``name`` "convlstm", ``hidden_channels`` [16, 32, 64],
``kernel_size`` 3 (odd), ``copy_gate`` true (see :class:`~trainables.models.convlstm.ConvLSTMNet`).

Loss (:class:`losses.combined.WeightedLoss`): ``pixel`` (``pixel_loss`` mse/l1/charbonnier,
weight ``pixel_weight``), ``gradient`` (``gradient_mode``, weight ``gradient_weight``),
``perceptual`` (only when ``perceptual_weight > 0``; ``perceptual_weights_path``). With
``solidification_weighting`` the pixel and gradient terms are weighted per pixel by
:func:`losses.weighting.solidification_weights` of the target's temperature (``T_solidus``,
``T_liquidus``). ``warmup_steps`` ramps the gradient and perceptual weights up from 0. The terms are
declared in :data:`LOSS_TERMS` (see :mod:`trainables.terms`); pixel is the primary term.

Evaluation region (``Task.eval_mask``, the ``*_active`` metrics): the pixels that change between the
last input frame and the target (``|target − last input| > 0.05`` in any RGB channel, dilated by
2 px: the moving melt pool and the grains growing behind it), united with the target frame's
solidification window ``T_solidus <= T <= T_liquidus``. About 90 % of a frame is copied through
unchanged, so whole-frame metrics mostly measure the copy; the region measures the prediction.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Mapping

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator
from torch import nn

from losstune.losses.combined import WeightedLoss
from losstune.losses.gradient import gradient_loss
from losstune.losses.perceptual import PerceptualLoss
from losstune.losses.regions import changed_region
from losstune.losses.pixel import charbonnier_loss, l1_loss, mse_loss
from losstune.losses.weighting import solidification_weights
from losstune.trainables.config import ConfigError, TrainConfig, parse_section, parse_train_config
from losstune.trainables.data.npz_sequences import load_npz_sequences
from losstune.trainables.data.solidification import Sequences, generate_sequences, normalise_temperature
from losstune.trainables.models.convlstm import ConvLSTMNet
from losstune.trainables.task import Batch, LossResult, Task
from losstune.trainables.terms import GRADIENT, PERCEPTUAL, PIXEL, declare_terms, weighted_loss

PIXEL_LOSSES = {"mse": mse_loss, "l1": l1_loss, "charbonnier": charbonnier_loss}
CHANGE_THRESHOLD = 0.05  # |target − last input| above this (any channel) counts as a change
CHANGE_GROW_PX = 2       # the changed pixels are dilated by this much (to include the edges around them)


def active_region(batch: Batch, t_solidus: float, t_liquidus: float) -> torch.Tensor:
    """The evaluation region of a batch (N×1×H×W bool): changed pixels ∪ the solidification window."""
    changed = changed_region(batch["target"], batch["frames"][:, -1, :3], CHANGE_THRESHOLD, CHANGE_GROW_PX)
    temperature = batch["temperature"]
    return changed | ((temperature >= t_solidus) & (temperature <= t_liquidus))


class MicrostructureData(BaseModel):
    """``config.data`` of the microstructure task."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(64, ge=16)
    num_sequences: int = Field(16, ge=2)
    frames: int = Field(12, ge=2)
    seq_length: int = Field(4, ge=1)
    val_fraction: float = Field(0.25, gt=0, lt=1)
    npz: str | None = None
    seed: int | None = None
    max_tracks: int = Field(3, ge=1)


class ConvLSTMConfig(BaseModel):
    """``config.model`` of the microstructure task."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["convlstm"] = "convlstm"
    hidden_channels: list[PositiveInt] = Field(default_factory=lambda: [16, 32, 64], min_length=1)
    kernel_size: PositiveInt = 3
    copy_gate: bool = True

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"must be odd, got {v}")
        return v


# ----- data ----------------------------------------------------------------------------------------

def split_sequences(num: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random train/val split of ``num`` sequence indices (at least one each), sorted."""
    n_val = min(max(1, round(num * val_fraction)), num - 1)
    perm = np.random.default_rng(seed).permutation(num)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def make_windows(micro: np.ndarray, temperature: np.ndarray, seq_length: int,
                 t_solidus: float, t_liquidus: float) -> Batch:
    """Sliding windows over ``micro[S,T,H,W,3]`` / ``temperature[S,T,H,W]`` (K) -> the batch dict."""
    s, t, h, w, _ = micro.shape
    n_win = t - seq_length
    if n_win < 1:
        raise ValueError(f"sequences of {t} frames give no window of seq_length={seq_length} + 1 frames")
    temp_in = normalise_temperature(temperature, t_solidus, t_liquidus).astype(np.float32)
    inputs = np.concatenate([micro, temp_in[..., None]], axis=-1)  # S,T,H,W,4
    idx = np.arange(n_win)[:, None] + np.arange(seq_length)[None, :]
    frames = inputs[:, idx].reshape(s * n_win, seq_length, h, w, 4).transpose(0, 1, 4, 2, 3)
    target = micro[:, seq_length:].reshape(s * n_win, h, w, 3).transpose(0, 3, 1, 2)
    target_temp = temperature[:, seq_length:].reshape(s * n_win, 1, h, w)
    return {"frames": torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32)),
            "target": torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32)),
            "temperature": torch.from_numpy(np.ascontiguousarray(target_temp, dtype=np.float32))}


def load_sequences(data: MicrostructureData, config: TrainConfig) -> Sequences:
    """The synthetic sequences, or the ``data.npz`` file's (ValueError -> :class:`ConfigError`)."""
    seed = config.seed if data.seed is None else data.seed
    if data.npz:
        try:
            return load_npz_sequences(data.npz, label="data.npz")
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return generate_sequences(data.num_sequences, data.frames, data.size, seed=seed,
                              t_solidus=config.T_solidus, t_liquidus=config.T_liquidus,
                              max_tracks=data.max_tracks)


def build_data(data: MicrostructureData, config: TrainConfig) -> tuple[Batch, Batch]:
    """Train and val batch dicts, split by sequence."""
    seqs = load_sequences(data, config)
    micro, temperature = seqs.micro, seqs.temperature
    num, length = micro.shape[:2]
    where = f"data.npz: {data.npz}: " if data.npz else ""
    windows = lambda m, t: make_windows(m, t, data.seq_length, config.T_solidus, config.T_liquidus)  # noqa: E731
    if num == 1:  # one real sequence: two disjoint segments in time
        n_val = max(data.seq_length + 1, round(length * data.val_fraction))
        if length - n_val < data.seq_length + 1:
            raise ConfigError(f"{where}a single sequence of {length} frames is too short to split into train "
                              f"and val windows of data.seq_length={data.seq_length} (needs at least "
                              f"{2 * (data.seq_length + 1)} frames, or several sequences)")
        return (windows(micro[:, :length - n_val], temperature[:, :length - n_val]),
                windows(micro[:, length - n_val:], temperature[:, length - n_val:]))
    if length < data.seq_length + 1:
        raise ConfigError(f"{where}data.seq_length={data.seq_length} needs sequences of at least "
                          f"{data.seq_length + 1} frames, got {length}")
    seed = config.seed if data.seed is None else data.seed
    train_idx, val_idx = split_sequences(num, data.val_fraction, seed)
    return (windows(micro[train_idx], temperature[train_idx]),
            windows(micro[val_idx], temperature[val_idx]))


# ----- loss ----------------------------------------------------------------------------------------

LOSS_TERMS = (PIXEL, dataclasses.replace(GRADIENT, warmup=True), dataclasses.replace(PERCEPTUAL, warmup=True))


def build_loss(config: TrainConfig) -> tuple[WeightedLoss, list[nn.Module]]:
    """The weighted loss of this task and the modules it owns (the perceptual network, if used)."""
    pixel_fn = PIXEL_LOSSES[config.pixel_loss]
    mode = config.gradient_mode

    def pixel(pred, target, weight=None, **_):
        return pixel_fn(pred, target, weight=weight)

    def gradient(pred, target, weight=None, **_):
        return gradient_loss(pred, target, mode=mode, weight=weight)

    functions = {"pixel": pixel, "gradient": gradient}
    modules: list[nn.Module] = []
    if config.perceptual_weight > 0:
        perceptual_net = PerceptualLoss(in_channels=3, weights_path=config.perceptual_weights_path)

        def perceptual(pred, target, **_):
            return perceptual_net(pred, target)

        functions["perceptual"] = perceptual
        modules.append(perceptual_net)
    return weighted_loss(LOSS_TERMS, functions, config), modules


# ----- task ----------------------------------------------------------------------------------------

def _check_size(model_cfg: ConvLSTMConfig, height: int, width: int, source: str) -> None:
    levels = len(model_cfg.hidden_channels)
    multiple = 2 ** (levels - 1)
    if height % multiple or width % multiple:
        raise ConfigError(f"model.hidden_channels: {levels} levels need the image size divisible by "
                          f"2**{levels - 1}={multiple}; {source} is {height}×{width}")


@declare_terms(*LOSS_TERMS)
def build(config: Mapping | TrainConfig) -> Task:
    """The microstructure task for ``config`` (see the module docstring for its keys)."""
    config = parse_train_config(config)
    data = parse_section(MicrostructureData, config.data, "data")
    model_cfg = parse_section(ConvLSTMConfig, config.model, "model")
    if not data.npz and data.frames < data.seq_length + 1:
        raise ConfigError(f"data.frames: {data.frames} frames per sequence leave no window for "
                          f"data.seq_length={data.seq_length}; need frames >= seq_length + 1")
    if not data.npz:
        _check_size(model_cfg, data.size, data.size, "data.size")
    try:  # before the data, so a bad loss setting fails fast
        loss, loss_modules = build_loss(config)
    except FileNotFoundError as err:
        raise ConfigError(f"perceptual_weights_path: {err}") from None
    except ValueError as err:  # all weights 0, an unreadable perceptual weights file
        names = ("perceptual_weights_path" if "weights_path" in str(err)
                 else "pixel_weight/gradient_weight/perceptual_weight")
        raise ConfigError(f"{names}: {err}") from None
    train, val = build_data(data, config)
    _check_size(model_cfg, *train["target"].shape[-2:], f"data.npz ({data.npz}) frames")

    weighting = config.solidification_weighting
    t_solidus, t_liquidus = config.T_solidus, config.T_liquidus

    def build_model() -> nn.Module:
        return ConvLSTMNet(in_channels=4, out_channels=3, hidden_channels=model_cfg.hidden_channels,
                           kernel_size=model_cfg.kernel_size, copy_gate=model_cfg.copy_gate)

    def training_step(model: nn.Module, batch: Batch, step: int) -> LossResult:
        pred = model(batch["frames"])
        weight = solidification_weights(batch["temperature"], t_solidus, t_liquidus) if weighting else None
        return loss(step, pred=pred, target=batch["target"], weight=weight)

    def last_frame(batch: Batch) -> torch.Tensor:
        return batch["frames"][:, -1, :3]

    return Task(
        name="microstructure",
        train=train,
        val=val,
        build_model=build_model,
        training_step=training_step,
        predict=lambda model, batch: model(batch["frames"]),
        target=lambda batch: batch["target"],
        baseline=last_frame,
        inputs_for_display=last_frame,
        loss_modules=loss_modules,
        eval_mask=lambda batch: active_region(batch, t_solidus, t_liquidus),
    )
