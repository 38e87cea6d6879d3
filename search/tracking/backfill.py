"""Filling in the child runs from Ray's results what a killed driver still had queued for MLflow."""

from __future__ import annotations

from typing import Any, Mapping

from losstune.search.status import TrialStatus
from losstune.search.tracking.run import STATUS_TAG, RunHandle
from losstune.search.tracking.store import missing_params, mlflow_client, now_ms, numeric_metrics


def backfill_runs(uri: str, runs: Mapping[str, Mapping[str, Any]],
                  histories: Mapping[str, list[Mapping[str, Any]]]) -> dict[str, int]:
    """Write into the child runs what a killed driver still had queued for MLflow.

    The driver logs asynchronously, so a SIGKILL can lose its last few writes; Ray's per-trial
    ``result.json`` (``histories``: trial id -> results) has everything. For each trial with a run
    in ``runs`` (the ``mlflow_runs.json`` mapping), log the (metric, step) pairs MLflow lacks, the params
    it lacks (the entry's ``params``: a run's params go with its first batch) and, for a trial that ended,
    its status. Idempotent: a second call writes nothing.

    Returns counts: ``runs`` touched, ``metrics`` values written, ``params`` written, ``statuses`` set.
    """
    from mlflow.entities import Metric, Param

    client = mlflow_client(uri)
    counts = {"runs": 0, "metrics": 0, "params": 0, "statuses": 0}
    for trial_id, entry in runs.items():
        if not entry.get("run_id"):
            continue
        run = RunHandle(client, entry["run_id"])
        by_step: dict[int, dict[str, float]] = {}
        stamp: dict[int, int] = {}  # step -> ms, Tune's timestamps are seconds
        for result in histories.get(trial_id) or []:
            metrics = numeric_metrics(result)
            step = int(result.get("training_iteration") or metrics.get("epoch") or 0)
            by_step.setdefault(step, {}).update(metrics)
            stamp[step] = int(1000 * float(result.get("timestamp") or 0)) or now_ms()
        missing = []
        for key in sorted({k for m in by_step.values() for k in m}):
            have = run.logged_steps(key)
            missing += [Metric(key, metrics[key], stamp[step], step)
                        for step, metrics in sorted(by_step.items()) if key in metrics and step not in have]
        status = TrialStatus(entry.get("status") or TrialStatus.RUNNING)
        stored = client.get_run(run.run_id)
        set_status = status.ended and (stored.data.tags.get(STATUS_TAG) != status
                                       or stored.info.status != status.run_status)
        params = [Param(k, v) for k, v in missing_params(entry.get("params"), stored.data.params).items()]
        if missing or params:
            run.log_batch(metrics=missing, params=params)
        if set_status:
            run.end(status)
        if missing or params or set_status:
            counts["runs"] += 1
            counts["metrics"] += len(missing)
            counts["params"] += len(params)
            counts["statuses"] += int(set_status)
    return counts
