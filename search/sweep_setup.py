"""The runner's set-up phase: the sweep folder, ``sweep.yaml``, ``sweep.json`` and the MLflow parent run.

All or nothing: a set-up that fails or is stopped by Ctrl-C leaves no folder for a new sweep (the same
command starts it again) and ends a parent run it started (KILLED for Ctrl-C, FAILED otherwise).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from losstune.search import space as sp
from losstune.search.config import Sweep
from losstune.search.status import TrialStatus
from losstune.search.sweep_record import SweepRun, now
from losstune.search.tracking import SweepTracker, flatten
from losstune.search.study import study_file
from losstune.search.trials import SWEEP_CONFIG


def overrides_text(overrides: dict[str, Any]) -> str:
    """KEY=VALUE overrides as one would type them (the MLflow parent run's ``losstune.overrides`` tag)."""
    def text(value: Any) -> str:
        dumped = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6)
        return dumped.strip().removesuffix("...").strip()
    return " ".join(f"{key}={text(value)}" for key, value in overrides.items())


def parent_params(sweep: Sweep) -> dict[str, Any]:
    """The parent run's params: the fixed training config, the space and every sweep setting."""
    params = {f"train.{k}": v for k, v in flatten(sweep.base_train).items() if k not in sweep.params}
    params.update({f"space.{k}": v for k, v in sp.describe(sweep.params).items()})
    params.update({f"search.{k}": v for k, v in sweep.search.model_dump(exclude={"points_to_evaluate"}).items()})
    params["search.points_to_evaluate"] = len(sweep.points)
    params.update({f"scheduler.{k}": v for k, v in sweep.scheduler.model_dump().items()})
    params.update({f"objective.{k}": v for k, v in sweep.objective.model_dump().items() if v is not None})
    params.update({f"resources.{k}": v for k, v in sweep.resources.model_dump().items()})
    return params


def set_up_sweep(run: SweepRun) -> None:
    """Make the folder and ``sweep.yaml`` (a new sweep), fill and write ``sweep.json``, start (or, on
    resume, reopen) the parent run as ``run.tracker``; the last step is a Ctrl-C safe point.

    On any error or KeyboardInterrupt, undoes what it did (see the module docstring) and re-raises.
    """
    created = False
    try:
        if not run.resume:
            run.sweep_dir.mkdir(parents=True, exist_ok=False)
            created = True
            _write_sweep_config(run)
        _fill_record(run)
        if run.tracking_uri:
            _start_parent_run(run)
        run.write_record()
        if run.tracker is not None and not run.resume:
            _log_sweep_artifacts(run)
        run.stop_if_requested()
    except (Exception, KeyboardInterrupt) as err:
        if created:
            shutil.rmtree(run.sweep_dir, ignore_errors=True)
        if run.tracker is not None and run.tracker.run_id:
            status = TrialStatus.INTERRUPTED if isinstance(err, KeyboardInterrupt) else TrialStatus.FAILED
            try:
                run.tracker.finish(status.run_status)
            except Exception:  # noqa: BLE001 - the set-up's own error is the one to report
                pass
        raise


def _write_sweep_config(run: SweepRun) -> None:
    sweep = run.sweep
    saved = dict(sweep.raw, results_dir=str(sweep.results_dir))  # absolute: --resume from anywhere
    if run.tracking_uri:  # resolved: a resume tracks to the same place whatever the environment says then
        saved["mlflow"] = {**(saved.get("mlflow") or {}), "tracking_uri": run.tracking_uri,
                           "experiment": sweep.experiment}
    (run.sweep_dir / SWEEP_CONFIG).write_text(
        f"# the effective sweep config of {sweep.name!r} (from {sweep.source}); --resume reads it\n"
        + yaml.safe_dump(saved, sort_keys=False, default_flow_style=None))


def _fill_record(run: SweepRun) -> None:
    sweep, record = run.sweep, run.record
    record.name = sweep.name
    record.status = "running"
    if not run.resume:
        record.config_path = str(Path(sweep.source).resolve()) if sweep.source else None
    record.sweep_config = SWEEP_CONFIG
    record.tune_dir = f"{sweep.storage_path.rstrip('/')}/{sweep.name}"
    record.storage_path = sweep.storage_path
    record.tracking_uri = run.tracking_uri
    record.experiment = sweep.experiment
    record.objective = sweep.objective.model_dump()
    record.max_epochs = sweep.epochs
    record.params = list(sweep.params)
    record.num_samples = sweep.search.num_samples
    record.optuna_storage = str(study_file(run.sweep_dir))
    record.optuna_study = sweep.name
    record.created_at = record.created_at or now()
    if run.resume:
        record.resumed_at = now()


def _start_parent_run(run: SweepRun) -> None:
    sweep, record = run.sweep, run.record
    run.tracker = SweepTracker(run.tracking_uri, sweep.experiment)
    tags = {"losstune.task": str(sweep.base_train["task"]), "losstune.sweep_dir": str(run.sweep_dir)}
    if record.overrides:
        tags["losstune.overrides"] = overrides_text(record.overrides)
    record.parent_run_id = run.tracker.start(sweep.name, parent_params(sweep), tags,
                                             resume_run_id=record.parent_run_id)
    record.experiment_id = run.tracker.experiment_id
    run.out(f"[losstune] MLflow: experiment {sweep.experiment!r}, parent run {record.parent_run_id} "
            f"at {run.tracking_uri}")


def _log_sweep_artifacts(run: SweepRun) -> None:
    sweep, tracker = run.sweep, run.tracker
    tracker.log_artifact(run.sweep_dir / SWEEP_CONFIG)
    if sweep.source and Path(sweep.source).is_file():
        tracker.log_artifact(sweep.source, "source")
    tracker.log_text(json.dumps({"params": sp.describe(sweep.params), "fixed": sweep.fixed,
                                 "points_to_evaluate": sweep.points}, indent=1, default=str),
                     "search_space.json")
