"""``losstune train``: the final training of an exported (or hand-written) training YAML.

The YAML is a ``TrainConfig`` plus an optional ``provenance:`` block (written by export). The run
is logged to MLflow tagged ``losstune.final=true`` and, when the provenance names the sweep's parent
run, nested under it (``mlflow.parentRunId``). Outputs (default ``<sweep folder>/final/`` for an
exported config, else ``results/<name>/final/``): ``model.pt`` (state_dict + config + metrics) and
``config.yaml``.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from search.config import SweepConfigError, check_tracking_uri, read_yaml, resolve_tracking_uri
from search.tracking import (TrackingUnavailable, best_effort, check_tracking, flatten, log_batch_chunked,
                             param_value)
from trainables.config import ConfigError, TrainConfig, parse_train_config


class FinalInputError(ValueError):
    """Bad input for ``losstune train`` (exit code 2)."""


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
    from trainables.registry import get_task_factory
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
              progress: bool = True, echo: Callable[[str], None] = print) -> FinalOutcome:
    import torch
    from tqdm import tqdm

    from trainables.loop import Trainer

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

    client, run_id = _start_run(uri, experiment or prov_mlflow.get("experiment") or "losstune", config,
                                provenance, path, echo)
    trainer = Trainer(config)
    history: list[dict[str, float]] = []
    bar = tqdm(total=config.epochs, desc=f"train {config.task}", unit="epoch", disable=not progress)

    def on_epoch(report) -> None:
        history.append(report.metrics)
        bar.update(1)
        bar.set_postfix({k: f"{report.metrics[k]:.4g}" for k in ("loss", "composite", "ssim")
                         if isinstance(report.metrics.get(k), float)})
        if client is not None:
            _log_epoch(client, run_id, report.epoch, report.metrics, echo)

    try:
        result = trainer.fit(on_epoch)
    except BaseException:
        bar.close()
        if client is not None:
            best_effort(lambda: client.set_terminated(run_id, status="FAILED"), echo)
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
    if client is not None:
        def finish() -> None:
            client.log_artifact(run_id, str(config_path))
            client.log_artifact(run_id, str(model_path))
            client.set_tag(run_id, "losstune.status", result.status)
            client.set_terminated(run_id, status="FINISHED" if result.status != "diverged" else "FAILED")
        best_effort(finish, echo)
    return FinalOutcome(result.status, out_dir, model_path, config_path,
                        {k: v for k, v in result.metrics.items()}, run_id, history)


def _start_run(uri: str, experiment: str, config: TrainConfig, provenance: Mapping[str, Any], path: Path,
               echo: Callable[[str], None]):
    from mlflow.entities import Param

    from search.tracking import _client, get_or_create_experiment
    try:
        client = _client(uri)
        experiment_id = get_or_create_experiment(client, experiment, uri)
        tags = {"losstune.final": "true", "losstune.kind": "final", "losstune.task": config.task,
                "losstune.config": str(path.resolve())}
        parent = (provenance.get("mlflow") or {}).get("parent_run_id")
        if parent:
            try:
                client.get_run(parent)
                tags["mlflow.parentRunId"] = parent
            except Exception:  # noqa: BLE001 - a parent in another store: keep the link as a plain tag
                echo(f"[losstune] warning: parent run {parent} is not in {uri}; the run is not nested")
            tags["losstune.parent_run_id"] = parent
        for key in ("sweep", "trial_id"):
            if provenance.get(key):
                tags[f"losstune.{key}"] = str(provenance[key])
        name = f"{provenance.get('sweep') or path.stem}-final"
        run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        log_batch_chunked(client, run_id, params=[Param(k, param_value(v))
                                                  for k, v in flatten(config.model_dump()).items()])
        return client, run_id
    except Exception as err:  # noqa: BLE001
        echo(f"[losstune] warning: MLflow run not created ({type(err).__name__}: {err}); training anyway")
        return None, None


def _log_epoch(client, run_id: str, epoch: int, metrics: Mapping[str, Any], echo: Callable[[str], None]) -> None:
    import time

    from mlflow.entities import Metric
    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, int(epoch)) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isinf(v))]
    best_effort(lambda: log_batch_chunked(client, run_id, metrics=batch), echo)
