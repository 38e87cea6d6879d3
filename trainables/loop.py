"""The one training loop for every task: CUDA-ready, resumable, reporting per epoch.

Hot-loop rules: batches are sliced from tensors already on the device (``preload``), loss
sums stay on the device, and the host only synchronises once per epoch (to check for
divergence and to compute the validation metrics).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Mapping

import torch
from torch import nn

from losstune.losses.metrics import evaluate_all
from losstune.trainables.config import ConfigError, TrainConfig, parse_train_config
from losstune.trainables.registry import get_task_factory
from losstune.trainables.task import Batch, Task

DIVERGED_SCORE = -1.0
# what a diverged epoch reports for the objective metrics: the worst value of each
DIVERGED_METRICS = {"composite": DIVERGED_SCORE, "ssim": -1.0, "mse": 1.0, "psnr": 0.0,
                    "gradient_match": 0.0, "diverged": 1.0}
STATE_FILE = "state.pt"
# fewer validation samples than this: the scores of two configs are too noisy to tell them apart
MIN_VAL_SAMPLES = 8
# share of free GPU memory the preloaded data may take; beyond it batches are copied per step
PRELOAD_MEMORY_FRACTION = 0.5

Status = Literal["running", "diverged"]


class TrainingStopped(Exception):
    """Raised by ``fit`` when its ``stop`` event is set from another thread (checked before every step)."""


@dataclass
class EpochReport:
    epoch: int
    metrics: dict[str, float]
    status: Status
    trainer: "Trainer"


@dataclass
class TrainResult:
    status: Literal["finished", "stopped", "diverged"]
    epochs_completed: int
    history: list[dict[str, float]]
    metrics: dict[str, float]
    best_composite: float
    trainer: "Trainer" = field(repr=False)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device: {name!r} requested but CUDA is not available")
    return device


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full precision. ``auto`` is bf16/fp16 on CUDA, off elsewhere."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _nbytes(data: Batch) -> int:
    return sum(t.numel() * t.element_size() for t in data.values())


class Trainer:
    """Holds model, optimiser and data for one run; ``fit`` trains epoch by epoch."""

    def __init__(self, config: Mapping | TrainConfig, num_threads: int | None = None, warn_small_val: bool = True):
        self.config = cfg = parse_train_config(config)
        threads = num_threads or cfg.num_threads
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(cfg.seed)
        self.device = resolve_device(cfg.device)
        self.amp_dtype = resolve_amp(cfg.amp, self.device)

        self.task: Task = get_task_factory(cfg.task)(cfg)
        self.preloaded = self._should_preload()
        self.train_data = self._place(self.task.train)
        self.val_data = self._place(self.task.val)

        self.model: nn.Module = self.task.build_model().to(self.device)
        for module in self.task.loss_modules:
            module.to(self.device)
        # fused on CUDA: one kernel per step, and under fp16's GradScaler it skips a step with inf gradients on
        # the device (the unfused path reads the inf flag on the host: a sync every step)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           fused=True if self.device.type == "cuda" else None)
        self.steps_per_epoch = math.ceil(self.task.num_train / cfg.batch_size)
        self.scheduler = self._make_scheduler()
        # the scaler only does something for fp16; bf16 and fp32 need no loss scaling
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.shuffle = torch.Generator().manual_seed(cfg.seed)

        self.stop: threading.Event | None = None  # set by another thread: training ends before the next step
        self.epoch = 0
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.best_composite = -math.inf
        self.objective_region = self._resolve_region()
        # the evaluation region depends on the validation data alone: computed once, not every epoch
        self.val_mask = self._val_mask()
        self.mse_ref, self.mse_ref_active = self._baseline_mse()
        if warn_small_val and (warning := small_validation_warning(self.task)):
            _warn_once(warning)

    # ----- setup helpers -------------------------------------------------------------------
    def _should_preload(self) -> bool:
        if not self.config.preload or self.device.type == "cpu":
            return self.config.preload
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return _nbytes(self.task.train) + _nbytes(self.task.val) < PRELOAD_MEMORY_FRACTION * free
        return True

    def _place(self, data: Batch) -> Batch:
        return {k: v.to(self.device) for k, v in data.items()} if self.preloaded else data

    def _batch(self, data: Batch, idx: torch.Tensor) -> Batch:
        if self.preloaded:
            return {k: v[idx] for k, v in data.items()}
        if self.device.type != "cuda":
            return {k: v[idx].to(self.device) for k, v in data.items()}
        # each batch is gathered into pinned memory (PyTorch's caching host allocator reuses the blocks), so its
        # copy to the GPU is asynchronous; a copy from pageable memory would block the host until it is done
        return {k: v[idx].pin_memory().to(self.device, non_blocking=True) for k, v in data.items()}

    def _make_scheduler(self):
        cfg = self.config
        if cfg.lr_schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=cfg.epochs * self.steps_per_epoch)
        if cfg.lr_schedule == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, factor=0.5, patience=2)
        return None

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def val_batches(self):
        """The validation set in batches of ``batch_size``, on the device, in order (never augmented)."""
        n, size = self.task.num_val, self.config.batch_size
        for start in range(0, n, size):
            idx = torch.arange(start, min(start + size, n), device=self.device if self.preloaded else "cpu")
            yield self._batch(self.val_data, idx)

    def _resolve_region(self) -> str:
        region = self.config.objective_region
        if region == "auto":
            return "active" if self.task.eval_mask is not None else "full"
        if region == "active" and self.task.eval_mask is None:
            raise ConfigError(f"objective_region: 'active' but task {self.task.name!r} gives no evaluation region "
                              "(use full or auto)")
        return region

    @torch.no_grad()
    def _val_mask(self) -> torch.Tensor | None:
        """The task's evaluation region of the whole validation set (N×1×H×W, in batch order), or None."""
        if self.task.eval_mask is None:
            return None
        return torch.cat([self.task.eval_mask(batch) for batch in self.val_batches()])

    @torch.no_grad()
    def _baseline_mse(self) -> tuple[float, float | None]:
        """The trivial baseline's MSE over the whole validation set, and over its evaluation region
        (None without one; the whole-frame value when the region is empty)."""
        sq_sum, count = torch.zeros((), device=self.device), 0
        sq_region, count_region = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        start = 0
        for batch in self.val_batches():
            base, target = self.task.baseline(batch).float(), self.task.target(batch).float()
            sq = (base - target).pow(2)
            sq_sum += sq.sum()
            count += target.numel()
            if self.val_mask is not None:
                mask = self.val_mask[start:start + sq.shape[0]].to(sq.device).float()
                sq_region += (sq * mask).sum()
                count_region += mask.sum() * sq.shape[1]
            start += sq.shape[0]
        full = float(sq_sum) / count
        if self.val_mask is None:
            return full, None
        n = float(count_region)
        return full, (float(sq_region) / n if n > 0 else full)

    # ----- one epoch -------------------------------------------------------------------------
    def _train_epoch(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, model = self.config, self.model
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        perm = torch.randperm(self.task.num_train, generator=self.shuffle)
        if self.preloaded:
            perm = perm.to(self.device, non_blocking=True)
        loss_sum = torch.zeros((), device=self.device)
        component_sums: dict[str, torch.Tensor] = {}
        for i in range(self.steps_per_epoch):
            if self.stop is not None and self.stop.is_set():
                raise TrainingStopped(f"stopped in epoch {self.epoch + 1}")
            batch = self._batch(self.train_data, perm[i * cfg.batch_size:(i + 1) * cfg.batch_size])
            if self.task.augment is not None:
                batch = self.task.augment(batch, self.shuffle)
            with self._autocast():
                total, components = self.task.training_step(model, batch, self.step)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            if cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if isinstance(self.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
                self.scheduler.step()
            loss_sum += total.detach().float()
            for name, value in components.items():
                component_sums[name] = component_sums.get(name, 0) + value.detach().float()
            self.step += 1
        return loss_sum / self.steps_per_epoch, {k: v / self.steps_per_epoch for k, v in component_sums.items()}

    def evaluate(self) -> dict[str, float]:
        """Validation loss and image metrics of the model as it is now (e.g. before training)."""
        return self._evaluate()

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        self.model.eval()
        preds, targets, val_loss = [], [], torch.zeros((), device=self.device)
        for batch in self.val_batches():
            with self._autocast():
                batch_loss = self.task.training_step(self.model, batch, self.step)[0].float()
                val_loss += batch_loss * _num_samples(batch)
                preds.append(self.task.predict(self.model, batch).float())
            targets.append(self.task.target(batch).float())
        t0 = time.perf_counter()
        metrics = evaluate_all(torch.cat(preds), torch.cat(targets), mse_ref=self.mse_ref,
                               weights=self.config.composite_weights, mask=self.val_mask,
                               mse_ref_active=self.mse_ref_active, region=self.objective_region)
        metrics["metrics_time_s"] = time.perf_counter() - t0
        metrics["val_loss"] = float(val_loss) / self.task.num_val
        return metrics

    def run_epoch(self) -> EpochReport:
        t0 = time.perf_counter()
        loss, components = self._train_epoch()
        loss_value = float(loss)  # the one host sync of the training phase
        train_time = time.perf_counter() - t0
        self.epoch += 1
        metrics: dict[str, float] = {"epoch": float(self.epoch), "lr": self.optimizer.param_groups[0]["lr"]}
        if not math.isfinite(loss_value):
            return self._diverged(metrics)
        metrics["loss"] = loss_value
        metrics.update({f"loss_{k}": float(v) for k, v in components.items()})
        t1 = time.perf_counter()
        try:
            metrics.update(self._evaluate())
        except ValueError:  # non-finite predictions: the metrics refuse them
            return self._diverged(metrics)
        metrics["baseline_mse"] = self.mse_ref
        if self.mse_ref_active is not None:
            metrics["baseline_mse_active"] = self.mse_ref_active
        metrics["num_val"] = float(self.task.num_val)
        metrics["eval_time_s"] = time.perf_counter() - t1
        metrics["epoch_time_s"] = train_time + metrics["eval_time_s"]
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(metrics["val_loss"])
        self.best_composite = max(self.best_composite, metrics["composite"])
        self.history.append(metrics)
        return EpochReport(self.epoch, metrics, "running", self)

    def _diverged(self, metrics: dict[str, float]) -> EpochReport:
        metrics.update(DIVERGED_METRICS)
        if self.task.eval_mask is not None:
            metrics.update({"composite_full": DIVERGED_SCORE, "composite_active": DIVERGED_SCORE})
        self.history.append(metrics)
        return EpochReport(self.epoch, metrics, "diverged", self)

    def fit(self, on_epoch: Callable[[EpochReport], bool | None] | None = None,
            stop: threading.Event | None = None) -> TrainResult:
        """Train the remaining epochs; ``on_epoch`` returning True ends it early. Setting ``stop`` (from another
        thread) raises :class:`TrainingStopped` before the next training step."""
        self.stop = stop
        status = "finished"
        while self.epoch < self.config.epochs:
            report = self.run_epoch()
            stop = on_epoch(report) if on_epoch else False
            if report.status == "diverged":
                status = "diverged"
                break
            if stop:
                status = "stopped"
                break
        last = self.history[-1] if self.history else {}
        return TrainResult(status, self.epoch, self.history, last, self.best_composite, self)

    # ----- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "best_composite": self.best_composite,
            "shuffle_rng": self.shuffle.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "config": self.config.model_dump(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when saved without fp16 loss scaling
            self.scaler.load_state_dict(state["scaler"])
        if self.scheduler and state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history = list(state["history"])
        self.best_composite = state["best_composite"]
        self.shuffle.set_state(state["shuffle_rng"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def save(self, directory: str | Path) -> Path:
        """Write the full state to ``directory/state.pt`` atomically (never a half-written file)."""
        path = Path(directory) / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    def load(self, directory: str | Path) -> None:
        path = Path(directory)
        path = path / STATE_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no training state at {path}")
        # read onto the CPU: the RNG states must be CPU tensors, and the model's and optimiser's load_state_dict
        # copy their tensors to the model's device themselves (so a GPU run also resumes on a CPU)
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    # ----- for reports ---------------------------------------------------------------------
    @torch.no_grad()
    def predict_val(self, n: int = 4) -> dict[str, torch.Tensor]:
        """The first ``n`` validation samples: input, baseline, prediction, target (CPU, N×C×H×W)."""
        self.model.eval()
        idx = torch.arange(min(n, self.task.num_val), device=self.device if self.preloaded else "cpu")
        batch = self._batch(self.val_data, idx)
        with self._autocast():
            prediction = self.task.predict(self.model, batch)
        shown = self.task.inputs_for_display or self.task.baseline
        out = {"input": shown(batch), "baseline": self.task.baseline(batch),
               "prediction": prediction, "target": self.task.target(batch)}
        return {k: v.detach().float().clamp(0, 1).cpu() for k, v in out.items()}


def small_validation_warning(task: Task) -> str | None:
    """One line saying the task's validation set is too small to separate configs, or None."""
    if task.num_val >= MIN_VAL_SAMPLES:
        return None
    return (f"warning: task {task.name}: the validation set has only {task.num_val} samples (< {MIN_VAL_SAMPLES}); "
            "differences between configs may be noise: use more validation data")


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Log ``message`` as a warning once per process (every trial of a sweep would repeat it)."""
    if message not in _WARNED:
        _WARNED.add(message)
        logging.getLogger("losstune").warning(message)


def _num_samples(batch: Batch) -> int:
    return next(iter(batch.values())).shape[0]


def train(config: Mapping | TrainConfig, *, on_epoch: Callable[[EpochReport], bool | None] | None = None,
          resume_from: str | Path | None = None, num_threads: int | None = None) -> TrainResult:
    """Train one config to the end (or until ``on_epoch`` returns True); usable without Ray."""
    trainer = Trainer(config, num_threads=num_threads)
    if resume_from is not None:
        trainer.load(resume_from)
    return trainer.fit(on_epoch)
