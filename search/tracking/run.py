"""One MLflow run as the driver writes it, synchronously: :class:`RunHandle`; the sweep's parent run:
:class:`SweepTracker`. Errors are the caller's to handle (``store.best_effort`` where MLflow must not
fail the work).

Every run losstune makes goes through a handle: the sweep's parent run, the final training's run
(``search/final.py``), the child runs of trials (the writer thread) and the backfill of a killed driver's
writes. A run ends with a :class:`TrialStatus`: the ``losstune.status`` tag says the word, the MLflow
status is its :attr:`TrialStatus.run_status`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

from losstune.search.status import TrialStatus
from losstune.search.tracking.store import get_or_create_experiment, log_batch_chunked, mlflow_client, now_ms, \
    param_value

logger = logging.getLogger("losstune.tracking")

STATUS_TAG = "losstune.status"  # every run losstune makes: its TrialStatus word


def is_number(value: Any) -> bool:
    """A value MLflow takes as a metric (bools are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class RunHandle:
    """A run of an MLflow store, by id (``artifact_uri``: where its artifacts go, when known)."""

    def __init__(self, client, run_id: str, artifact_uri: str | None = None):
        self.client, self.run_id, self.artifact_uri = client, run_id, artifact_uri

    @classmethod
    def create(cls, client, experiment_id: str, name: str | None, tags: Mapping[str, str],
               params: Mapping[str, Any] | None = None) -> "RunHandle":
        """A new run (tags set at creation), with ``params`` (any values, as :func:`param_value` writes them)."""
        info = client.create_run(experiment_id, run_name=name, tags=dict(tags)).info
        run = cls(client, info.run_id, info.artifact_uri)
        if params:
            run.log_params(params)
        return run

    @classmethod
    def reopen(cls, client, run_id: str, tags: Mapping[str, str] | None = None) -> "RunHandle":
        """An existing run, running again (raises when the store does not have it)."""
        run = cls(client, run_id)
        client.update_run(run_id, status=TrialStatus.RUNNING.run_status)
        if tags:
            run.set_tags(tags)
        return run

    def exists(self) -> bool:
        try:
            self.client.get_run(self.run_id)
            return True
        except Exception:  # noqa: BLE001 - MLflow raises its own exception kinds per store
            return False

    def log_batch(self, metrics: Iterable = (), params: Iterable = (), tags: Iterable = ()) -> None:
        """MLflow entities (``Metric``, ``Param``, ``RunTag``), in as few calls as MLflow's limits allow."""
        log_batch_chunked(self.client, self.run_id, metrics=metrics, params=params, tags=tags)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        self.log_batch(params=[Param(k, param_value(v)) for k, v in params.items()])

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        """The numbers of ``metrics`` at ``step`` (other values are skipped), stamped now."""
        from mlflow.entities import Metric
        ts = now_ms()
        self.log_batch(metrics=[Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if is_number(v)])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag
        self.log_batch(tags=[RunTag(k, param_value(v)) for k, v in tags.items()])

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which metric ``key`` has a value."""
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        """Every file under ``folder``, in one upload."""
        self.client.log_artifacts(self.run_id, str(folder), artifact_path=artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def terminate(self, run_status: str) -> None:
        """The run ends with MLflow status ``run_status`` (FINISHED, KILLED, FAILED)."""
        self.client.set_terminated(self.run_id, status=run_status)

    def end(self, status: TrialStatus | str) -> None:
        """The run ends as ``status``: its ``losstune.status`` tag, and MLflow's matching run status."""
        status = TrialStatus(status)
        self.client.set_tag(self.run_id, STATUS_TAG, status.value)
        self.terminate(status.run_status)


class SweepTracker:
    """The parent run of a sweep (driver side, synchronous; errors are the caller's to handle)."""

    def __init__(self, uri: str, experiment: str):
        self.uri, self.experiment = uri, experiment
        self.client = mlflow_client(uri)
        self.experiment_id = get_or_create_experiment(self.client, experiment, uri)
        self.run: RunHandle | None = None

    @property
    def run_id(self) -> str | None:
        return self.run.run_id if self.run is not None else None

    def start(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str],
              resume_run_id: str | None = None) -> str:
        """The parent run: ``resume_run_id``'s, running again (``--resume``), else a new one; returns its id."""
        if resume_run_id:
            try:
                self.run = RunHandle.reopen(self.client, resume_run_id, tags={"losstune.resumed": "true"})
                return self.run.run_id
            except Exception as err:  # noqa: BLE001 - the run is gone: start a new one
                logger.warning("parent run %s not found (%s); creating a new one", resume_run_id, err)
        self.run = RunHandle.create(self.client, self.experiment_id, name,
                                    {"losstune.kind": "sweep", "losstune.sweep": name, **tags}, params)
        return self.run.run_id

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.run.log_artifact(path, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.run.log_text(text, artifact_file)

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        self.run.log_metrics(metrics)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.run.set_tags(tags)

    def finish(self, status: str = "FINISHED") -> None:
        """The parent run ends with MLflow run status ``status``."""
        self.run.terminate(status)
