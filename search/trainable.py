"""The Tune trainable: one trial = one training run of ``trainables.loop`` with sampled loss weights.

Each epoch is reported with ``tune.report`` together with a checkpoint (``Trainer.save`` plus the
validation predictions ``predictions.npz``/``.png`` and ``config.yaml`` of :func:`search.plots.save_trial_artifacts`),
so a restarted trial (node failure, ``--resume``) continues from its last epoch via ``tune.get_checkpoint``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Callable, Mapping

from ray import tune

from search import space as sp


def report_metrics(metrics: Mapping[str, Any], diverged: bool) -> dict[str, float]:
    """The loop's numbers plus ``diverged`` (0/1), as floats (Tune, Optuna and MLflow read these)."""
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out["diverged"] = 1.0 if diverged else float(out.get("diverged", 0.0))
    return out


def save_artifacts(directory: str, trainer) -> None:
    """predictions.npz / predictions.png / config.yaml of the model beside its state (for the report and
    the child run's images); a failure here never fails the trial."""
    try:
        from search.plots import save_trial_artifacts
    except ImportError:  # pragma: no cover - the plotting module is optional
        return
    try:
        save_trial_artifacts(directory, trainer)
    except Exception as err:  # noqa: BLE001
        logging.getLogger("losstune").warning("cannot save the trial's prediction artifacts: %s", err)


def _node_id() -> str | None:
    try:
        import ray
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray (plain calls in tests)
        return None


def run_trial(config: Mapping[str, Any], base_train: Mapping[str, Any], params: Mapping[str, sp.ParamSpec],
              cpus: float | None = None, cwd: str | None = None) -> None:
    """Train the trial's config, reporting (and checkpointing) every epoch to Tune."""
    from trainables.loop import Trainer

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # no "Checkpoint successfully created" per epoch
    if cwd and os.path.isdir(cwd):  # relative data paths resolve like they do for the driver
        os.chdir(cwd)
    threads = max(1, int(cpus)) if cpus else None
    trainer = Trainer(sp.trial_config(base_train, params, config), num_threads=threads)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load(directory)

    node_id = _node_id()

    def on_epoch(report) -> bool:
        diverged = report.status == "diverged"
        metrics = report_metrics(report.metrics, diverged)
        if node_id:  # nodes of one machine share an IP: the Ray node id tells them apart
            metrics["node_id"] = node_id
        if diverged:  # nothing worth resuming from
            tune.report(metrics)
            return True
        with tempfile.TemporaryDirectory(prefix="losstune-ckpt-") as directory:
            report.trainer.save(directory)
            save_artifacts(directory, report.trainer)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
        return False

    trainer.fit(on_epoch)


def make_trainable(base_train: Mapping[str, Any], params: Mapping[str, sp.ParamSpec], cpus: float | None = None,
                   cwd: str | None = None) -> Callable[[dict], None]:
    """A function trainable bound to the sweep's fixed config and space (pickled to the workers)."""
    base_train, params = dict(base_train), dict(params)
    cwd = cwd or os.getcwd()

    def losstune_trial(config: dict) -> None:
        run_trial(config, base_train, params, cpus, cwd)

    return losstune_trial
