"""``losstune train``: the final training of an exported (or hand-written) training YAML.

The YAML is a ``TrainConfig`` plus an optional ``provenance:`` block (written by export). The run
is logged to MLflow tagged ``losstune.final=true`` and, when the provenance names the sweep's parent
run, nested under it (``mlflow.parentRunId``). Outputs (default ``<sweep folder>/final/`` for an
exported config, else ``results/<name>/final/``): ``model.pt`` (state_dict + config + metrics) and
``config.yaml``.

The final training is the long one, so it is resumable: after every epoch the full training state goes to
``<out>/state.pt`` (atomically) and ``<out>/train.json`` says how far it got. Ctrl-C (or a kill) loses at
most the epoch in progress; ``losstune train CONFIG --resume`` continues from the last saved epoch, in the
same MLflow run. ``state.pt`` is removed when the training ends.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from losstune.search.config import (SweepConfigError, check_tracking_uri, read_yaml, resolve_experiment,
                                    resolve_tracking_uri)
from losstune.search.interrupts import first_ctrl_c_sets_event
from losstune.search.status import TrialStatus
from losstune.search.tracking import (STATUS_TAG, RunHandle, TrackingUnavailable, best_effort, check_tracking, flatten,
                                      get_or_create_experiment, mlflow_client, write_json_atomic)
from losstune.trainables.config import ConfigError, TrainConfig, parse_train_config
from losstune.trainables.loop import STATE_FILE, TrainingStopped

PROGRESS_FILE = "train.json"
ENDED = (TrialStatus.FINISHED, TrialStatus.DIVERGED)  # a final training that will not continue
# settings a resumed training may change: where it runs, not what it trains
RESUME_MAY_CHANGE = ("device", "num_threads")


class FinalInputError(ValueError):
    """Bad input for ``losstune train`` (exit code 2)."""


class FinalInterrupted(Exception):
    """Ctrl-C during ``losstune train``: the state of the last finished epoch is saved for ``--resume``."""

    def __init__(self, epoch: int, epochs: int, out_dir: Path):
        super().__init__(f"interrupted after epoch {epoch}/{epochs}")
        self.epoch, self.epochs, self.out_dir = epoch, epochs, out_dir


def read_progress(out_dir: Path) -> dict[str, Any]:
    """``<out>/train.json``: status, epoch, epochs, config, mlflow_run_id of the last training there ({} if none)."""
    try:
        return json.loads((out_dir / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _resumable(out_dir: Path, progress: Mapping[str, Any]) -> bool:
    return bool(progress) and progress.get("status") not in ENDED and (out_dir / STATE_FILE).is_file()


def _check_resume(out_dir: Path, progress: Mapping[str, Any], config: TrainConfig, resume: bool) -> None:
    """Refuse to resume nothing, to resume another config, and to start over an unfinished training."""
    if not resume:
        if _resumable(out_dir, progress):
            raise FinalInputError(
                f"{out_dir} holds an unfinished training (epoch {progress.get('epoch')}/{progress.get('epochs')}, "
                f"{progress.get('status')}): continue it with --resume, or choose another --out")
        return
    if not _resumable(out_dir, progress):
        what = f"the training there is {progress['status']}" if progress.get("status") in ENDED else \
            f"no saved training state ({STATE_FILE})"
        raise FinalInputError(f"--resume: nothing to resume in {out_dir}: {what}")
    saved, now = dict(progress.get("config") or {}), _config_record(config)
    changed = sorted(k for k in set(saved) | set(now) if k not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k))
    if changed:
        raise FinalInputError(f"--resume: the config differs from the one of the interrupted training in "
                              f"{', '.join(changed)} (saved in {out_dir / PROGRESS_FILE}); only "
                              f"{' and '.join(RESUME_MAY_CHANGE)} may change")


def _config_record(config: TrainConfig) -> dict[str, Any]:
    """The config as train.json keeps it (JSON values), to compare a resumed training's with."""
    return json.loads(json.dumps(config.model_dump(), default=str))


def _write_progress(out_dir: Path, config: TrainConfig, status: str, epoch: int, run_id: str | None) -> None:
    write_json_atomic(out_dir / PROGRESS_FILE, {
        "status": status, "epoch": epoch, "epochs": config.epochs, "mlflow_run_id": run_id,
        "updated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": _config_record(config)})


@dataclass
class FinalOutcome:
    status: str
    out_dir: Path
    model_path: Path
    config_path: Path
    metrics: dict[str, float]
    run_id: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def load_train_yaml(path: str | Path, epochs: int | None = None, device: str | None = None
                    ) -> tuple[TrainConfig, dict[str, Any]]:
    """(config, provenance) from a training YAML; :class:`FinalInputError` names the file and field."""
    try:
        raw = read_yaml(path)
    except SweepConfigError as err:
        raise FinalInputError(str(err)) from None
    if not isinstance(raw, Mapping):
        raise FinalInputError(f"{path}: expected a mapping of training settings, got {type(raw).__name__}")
    raw = dict(raw)
    provenance = raw.pop("provenance", None) or {}
    if not isinstance(provenance, Mapping):
        raise FinalInputError(f"{path}: provenance: expected a mapping")
    if epochs is not None:
        if epochs < 1:
            raise FinalInputError("--epochs: must be >= 1")
        raw["epochs"] = epochs
    if device is not None:
        raw["device"] = device
    try:
        config = parse_train_config(raw)
    except ConfigError as err:
        raise FinalInputError(f"{path}: {err}") from None
    from losstune.trainables.registry import get_task_factory
    try:
        get_task_factory(config.task)
    except ConfigError as err:
        raise FinalInputError(f"{path}: {err}") from None
    return config, dict(provenance)


def default_out_dir(path: Path, provenance: Mapping[str, Any]) -> Path:
    sweep_dir = provenance.get("sweep_dir")
    if sweep_dir and Path(sweep_dir).is_dir():
        return Path(sweep_dir) / "final"
    name = provenance.get("sweep") or path.stem
    return Path("results").resolve() / str(name) / "final"


def run_final(path: str | Path, *, epochs: int | None = None, device: str | None = None,
              out: str | Path | None = None, tracking_uri: str | None = None, experiment: str | None = None,
              progress: bool = True, resume: bool = False, echo: Callable[[str], None] = print) -> FinalOutcome:
    import torch
    from tqdm import tqdm

    from losstune.trainables.loop import Trainer

    path = Path(path)
    config, provenance = load_train_yaml(path, epochs, device)
    prov_mlflow = provenance.get("mlflow") or {}
    uri = tracking_uri or prov_mlflow.get("tracking_uri")
    try:
        if uri:
            check_tracking_uri(uri)
        uri = resolve_tracking_uri(uri)
        check_tracking(uri)
    except (ValueError, TrackingUnavailable) as err:
        raise FinalInputError(f"MLflow: {err}") from None
    out_dir = Path(out).expanduser().resolve() if out else default_out_dir(path, provenance)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FinalInputError(f"--out: cannot create {out_dir}: {err}") from None
    saved = read_progress(out_dir)
    _check_resume(out_dir, saved, config, resume)

    trainer = Trainer(config)
    if resume:
        try:
            trainer.load(out_dir)
        except Exception as err:  # noqa: BLE001 - a damaged or foreign state file
            raise FinalInputError(f"--resume: cannot load {out_dir / STATE_FILE}: "
                                  f"{type(err).__name__}: {err}") from None
    experiment = resolve_experiment(experiment or prov_mlflow.get("experiment"))  # then $MLFLOW_EXPERIMENT_NAME
    run = _reopen_run(uri, saved.get("mlflow_run_id"), trainer.history, echo) if resume else None
    if run is None:
        run = _start_run(uri, experiment, config, provenance, path, echo)
    run_id = run.run_id if run is not None else None
    saved_epoch = trainer.epoch
    _write_progress(out_dir, config, "running", saved_epoch, run_id)
    bar = tqdm(total=config.epochs, initial=trainer.epoch, desc=f"train {config.task}", unit="epoch",
               disable=not progress)

    def on_epoch(report) -> None:
        nonlocal saved_epoch
        report.trainer.save(out_dir)  # first the state, so a logged epoch is always one --resume starts after
        saved_epoch = report.epoch
        _write_progress(out_dir, config, "running", saved_epoch, run_id)
        bar.update(1)
        bar.set_postfix({k: f"{report.metrics[k]:.4g}" for k in ("loss", "composite", "ssim")
                         if isinstance(report.metrics.get(k), float)})
        if run is not None:
            _log_epoch(run, report.epoch, report.metrics, echo)

    try:
        # the first Ctrl-C stops before the next step, never inside a state save or an MLflow write
        with first_ctrl_c_sets_event() as stop:
            result = trainer.fit(on_epoch, stop=stop)
    except (KeyboardInterrupt, TrainingStopped):
        bar.close()
        _write_progress(out_dir, config, "interrupted", saved_epoch, run_id)
        if run is not None:
            best_effort(lambda: run.end(TrialStatus.INTERRUPTED), echo)
        raise FinalInterrupted(saved_epoch, config.epochs, out_dir) from None
    except BaseException:
        bar.close()
        _write_progress(out_dir, config, "failed", saved_epoch, run_id)
        if run is not None:
            best_effort(lambda: run.terminate(TrialStatus.FAILED.run_status), echo)
        raise
    bar.close()

    config_path = out_dir / "config.yaml"
    final_provenance = {**provenance, "final": {
        "epochs": result.epochs_completed, "status": result.status, "mlflow_run_id": run_id,
        "trained_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}}
    config_path.write_text(yaml.safe_dump({**config.model_dump(), "provenance": final_provenance},
                                          sort_keys=False, default_flow_style=None))
    model_path = out_dir / "model.pt"
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()},
                "config": config.model_dump(), "metrics": result.metrics, "status": result.status,
                "provenance": final_provenance}, model_path)
    _write_progress(out_dir, config, result.status, result.epochs_completed, run_id)
    (out_dir / STATE_FILE).unlink(missing_ok=True)  # the model is saved; the optimiser state is not needed
    if run is not None:
        def finish() -> None:
            run.log_artifact(config_path)
            run.log_artifact(model_path)
            run.end(result.status)
        best_effort(finish, echo)
    return FinalOutcome(result.status, out_dir, model_path, config_path,
                        {k: v for k, v in result.metrics.items()}, run_id, list(result.history))


def _start_run(uri: str, experiment: str, config: TrainConfig, provenance: Mapping[str, Any], path: Path,
               echo: Callable[[str], None]) -> RunHandle | None:
    """A new MLflow run of the training (nested under the sweep's parent run when the store has it)."""
    try:
        client = mlflow_client(uri)
        experiment_id = get_or_create_experiment(client, experiment, uri)
        tags = {"losstune.final": "true", "losstune.kind": "final", "losstune.task": config.task,
                "losstune.config": str(path.resolve())}
        parent = (provenance.get("mlflow") or {}).get("parent_run_id")
        if parent:
            if RunHandle(client, parent).exists():
                tags["mlflow.parentRunId"] = parent
            else:  # a parent in another store: keep the link as a plain tag
                echo(f"[losstune] warning: parent run {parent} is not in {uri}; the run is not nested")
            tags["losstune.parent_run_id"] = parent
        for key in ("sweep", "trial_id"):
            if provenance.get(key):
                tags[f"losstune.{key}"] = str(provenance[key])
        name = f"{provenance.get('sweep') or path.stem}-final"
        return RunHandle.create(client, experiment_id, name, tags, flatten(config.model_dump()))
    except Exception as err:  # noqa: BLE001
        echo(f"[losstune] warning: MLflow run not created ({type(err).__name__}: {err}); training anyway")
        return None


def _reopen_run(uri: str, run_id: str | None, history: list[Mapping[str, Any]],
                echo: Callable[[str], None]) -> RunHandle | None:
    """The interrupted training's MLflow run, running again, with any epoch of ``history`` it is missing
    (the state is saved before an epoch is logged); None when it cannot be reopened."""
    if not run_id:
        return None
    try:
        run = RunHandle.reopen(mlflow_client(uri), run_id, tags={STATUS_TAG: TrialStatus.RUNNING.value})
        logged = run.logged_steps("epoch")
        for epoch, metrics in enumerate(history, start=1):
            if epoch not in logged:
                _log_epoch(run, epoch, metrics, echo)
        return run
    except Exception as err:  # noqa: BLE001
        echo(f"[losstune] warning: MLflow run {run_id} of the interrupted training cannot be reopened "
             f"({type(err).__name__}: {err}); logging to a new run")
        return None


def _log_epoch(run: RunHandle, epoch: int, metrics: Mapping[str, Any], echo: Callable[[str], None]) -> None:
    finite = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isinf(v))}
    best_effort(lambda: run.log_metrics(finite, step=epoch), echo)
