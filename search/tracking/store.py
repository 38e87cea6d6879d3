"""The MLflow store: reaching it, and the shapes MLflow accepts.

* :func:`check_tracking` — before anything starts: an http(s) server must answer quickly (else
  :class:`TrackingUnavailable`, the CLI exits 2); for sqlite the parent folder is created.
* :func:`mlflow_client`, :func:`set_retry_defaults` (bounded HTTP calls: our writers retry themselves),
  :func:`get_or_create_experiment` (artifacts of a sqlite store beside its database).
* :func:`artifact_repository` — where a run's artifacts go, when its artifact URI is already known.
* :func:`log_batch_chunked` — ``log_batch`` within MLflow's per-call limits; :func:`param_value`,
  :func:`flatten`, :func:`numeric_metrics` — values in the form MLflow stores.
* :func:`best_effort` — a tracking call that must not fail a finished sweep or training.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

# Tune's own result keys: not training metrics
TUNE_KEYS = frozenset({
    "timestamp", "time_this_iter_s", "time_total_s", "time_since_restore", "iterations_since_restore",
    "timesteps_total", "episodes_total", "timesteps_since_restore", "episodes_this_iter",
    "timesteps_this_iter", "pid", "training_iteration", "done", "date", "hostname", "node_ip", "node_id", "trial_id",
    "experiment_id", "experiment_tag", "config", "should_checkpoint", "checkpoint_dir_name", "warmup_time",
})
MAX_ENTITIES = 1000  # MLflow's log_batch limit (metrics + params + tags)
MAX_PARAMS = 100     # ... and its limit of params, and of tags, per call
PARAM_LEN = 500      # a param value's length MLflow keeps


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached (checked before the sweep starts)."""


def mlflow_client(uri: str):
    """An ``MlflowClient`` of the store at ``uri``."""
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def now_ms() -> int:
    """MLflow's timestamp of a value logged now."""
    return int(time.time() * 1000)


def param_value(value: Any) -> str:
    """A param as MLflow stores it: text (JSON for non-strings), cut to :data:`PARAM_LEN`."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= PARAM_LEN else text[:PARAM_LEN - 3] + "..."


def missing_params(params: Mapping[str, Any] | None, logged: Mapping[str, str]) -> dict[str, str]:
    """The ``params`` a run does not have yet (``logged``: its params), as MLflow stores them.

    >>> missing_params({"lr": 0.001, "gradient_weight": 0.2}, {"lr": "0.001"})
    {'gradient_weight': '0.2'}
    """
    return {k: param_value(v) for k, v in (params or {}).items() if k not in logged}


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def numeric_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The training metrics of a Tune result: every number that is not one of Tune's own keys."""
    return {k: float(v) for k, v in result.items()
            if k not in TUNE_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def log_batch_chunked(client, run_id: str, metrics: list = (), params: list = (), tags: list = ()) -> None:
    """``log_batch`` within MLflow's limits (<= 1000 entities, <= 100 params/tags per call)."""
    metrics, params, tags = list(metrics), list(params), list(tags)
    while metrics or params or tags:
        p, params = params[:MAX_PARAMS], params[MAX_PARAMS:]
        t, tags = tags[:MAX_PARAMS], tags[MAX_PARAMS:]
        room = MAX_ENTITIES - len(p) - len(t)
        m, metrics = metrics[:room], metrics[room:]
        client.log_batch(run_id, metrics=m, params=p, tags=t, synchronous=True)


def artifact_repository(artifact_uri: str, tracking_uri: str):
    """MLflow's artifact repository for a run whose ``artifact_uri`` is known (from the ``Run`` that
    ``create_run`` or ``search_runs`` returned), built as ``MlflowClient.log_artifacts`` builds it; None for
    a Databricks tracking URI (MLflow adds profile details to the URI there: use the client).

    ``MlflowClient.log_artifacts(run_id, ...)`` first reads the whole run (``get_run``: its params, tags and
    latest metrics) to learn that URI, once per run and process: on a sqlite store ~4 ms of CPU, a sixth of
    the MLflow work of a sweep's short trial.

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> type(artifact_repository(folder, "sqlite:///mlflow.db")).__name__
    'LocalArtifactRepository'
    >>> artifact_repository(folder, "databricks") is None
    True
    """
    if tracking_uri.split(":", 1)[0].lower() in ("databricks", "databricks-uc"):
        return None
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    return get_artifact_repository(artifact_uri, tracking_uri=tracking_uri)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store (None for any other store, or an in-memory one)."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        return Path(path) if path and path != ":memory:" else None
    return None


def check_tracking(uri: str, timeout: float = 10.0, create: bool = True) -> None:
    """Fail fast (:class:`TrackingUnavailable`) when the tracking store cannot work.

    A sqlite store: its folder is made (``create``; else the nearest existing folder must be writable)
    and an existing file must be readable and writable. Any other store: one API call through MLflow's
    own client, no retries, ``timeout`` seconds, so MLflow's TLS and auth settings apply exactly as they
    will for the sweep (``MLFLOW_TRACKING_SERVER_CERT_PATH``, ``MLFLOW_TRACKING_INSECURE_TLS``,
    ``MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN``, request-header and auth plugins).
    """
    path = sqlite_path(uri)
    if path is not None:
        if create:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise TrackingUnavailable(f"MLflow store {uri}: cannot create {path.parent}: {err}") from None
        else:
            existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())
            if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
                raise TrackingUnavailable(f"MLflow store {uri}: cannot create {path.parent} ({existing} "
                                          "is not a writable folder)")
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            raise TrackingUnavailable(f"MLflow store {uri}: {path} is not readable and writable")
        return
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, int(timeout)))
    try:
        mlflow_client(uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - any failure means we cannot track
        text = " ".join(str(err).split())
        refused = getattr(err, "error_code", None) in ("UNAUTHENTICATED", "PERMISSION_DENIED")
        if refused or any(f"error code {code}" in text for code in (401, 403)):
            raise TrackingUnavailable(f"MLflow tracking server at {uri} refused the credentials; check "
                                      "MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN") from None
        reason = text if len(text) <= 300 else text[:297] + "..."
        raise TrackingUnavailable(f"MLflow tracking server at {uri} is unreachable: {reason}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def set_retry_defaults() -> None:
    """Bound each MLflow HTTP call (our own loop retries with backoff, so the client needn't for minutes)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # one "View run" line per trial


def best_effort(fn: Callable[[], Any], echo: Callable[[str], None]) -> Any:
    """``fn()``, or None with a warning: a tracking call that must not fail a finished sweep or training."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - MLflow is a mirror of the results, never their owner
        echo(f"[losstune] warning: MLflow: {type(err).__name__}: {err}")
        return None


def get_or_create_experiment(client, name: str, uri: str) -> str:
    """The id of experiment ``name`` (restored if deleted, created if missing; a sqlite store keeps its
    artifacts in ``mlartifacts/`` beside the database, not in ``./mlruns`` of whatever the CWD is)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    path = sqlite_path(uri)
    if path is not None:
        location = (path.parent / "mlartifacts").resolve().as_uri()
    try:
        # the kind tag makes MLflow 3's UI open the experiment in its model-training view (runs, charts)
        return client.create_experiment(name, artifact_location=location,
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except Exception:  # noqa: BLE001 - created concurrently by someone else
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
