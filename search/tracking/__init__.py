"""MLflow tracking: one parent run per sweep, one child run per trial, written off the driver's hot path.

One job per module, imports going down the list:

* ``store`` — reaching the store (:func:`check_tracking`, :class:`TrackingUnavailable`, :func:`mlflow_client`,
  :func:`set_retry_defaults`, :func:`get_or_create_experiment`) and MLflow's shapes and limits
  (:func:`log_batch_chunked`, :func:`param_value`, :func:`flatten`, :func:`numeric_metrics`, :func:`best_effort`).
* ``runs_file`` — ``<sweep_dir>/mlflow_runs.json`` (trial id -> run id, status, epochs): :data:`RUNS_FILE`,
  :func:`read_runs_file`, :func:`write_json_atomic`, and :class:`RunsBook`, the file in memory.
* ``run`` — :class:`RunHandle`, one MLflow run as the driver writes it (create / reopen, params, metrics,
  tags, artifacts, end with a ``TrialStatus``); :class:`SweepTracker`, the sweep's parent run.
* ``backfill`` — :func:`backfill_runs`: what a killed driver had still queued, from Ray's results.
* ``events`` — what the Tune hooks tell the writer, one dataclass per kind.
* ``pending`` — per trial, what its child run is still owed (events applied, no MLflow call).
* ``child_runs`` — writing that into the child runs: found before made (no duplicates), batched metrics,
  the per-epoch image series in ``log_image``'s layout without re-encoding, files when the trial ends.
* ``store_process`` — :class:`StoreProcessClient`: ``MlflowClient``'s calls run in a helper process, for
  database stores (sqlite) whose work MLflow otherwise does in the driver (``mlflow.store_process``).
* ``writer`` — :class:`TrackingWriter`, the background thread: gathers events, saves the runs file, writes,
  retries with backoff while the server is down, ``flush`` / ``close`` / ``mark_interrupted`` / ``mark_lost``.
* ``callback`` — :class:`TrackingCallback`, the ``ray.tune.Callback``: hooks that only enqueue events.

The names below are this package's public API (``from losstune.search.tracking import X``).
"""

from losstune.search.progress import ProgressCallback  # console lines; re-exported for older callers
from losstune.search.tracking.backfill import backfill_runs
from losstune.search.tracking.callback import TrackingCallback
from losstune.search.tracking.child_runs import STAGE_TAG
from losstune.search.tracking.run import STATUS_TAG, RunHandle, SweepTracker
from losstune.search.tracking.runs_file import RUNS_FILE, RunsBook, read_runs_file, write_json_atomic
from losstune.search.tracking.store import (TrackingUnavailable, best_effort, check_tracking, flatten,
                                            get_or_create_experiment, log_batch_chunked, mlflow_client,
                                            numeric_metrics, param_value, set_retry_defaults, sqlite_path)
from losstune.search.tracking.writer import TrackingWriter

__all__ = [
    "RUNS_FILE", "STAGE_TAG", "STATUS_TAG", "ProgressCallback", "RunHandle", "RunsBook", "SweepTracker",
    "TrackingCallback", "TrackingUnavailable", "TrackingWriter", "backfill_runs", "best_effort", "check_tracking",
    "flatten", "get_or_create_experiment", "log_batch_chunked", "mlflow_client", "numeric_metrics", "param_value",
    "read_runs_file", "set_retry_defaults", "sqlite_path", "write_json_atomic",
]
