"""MLflow tracking: one parent run per sweep, one child run per trial, written off the hot path.

* :func:`check_tracking` — before anything starts: an http(s) server must answer quickly
  (else :class:`TrackingUnavailable`, the CLI exits 2); for sqlite the parent folder is created.
* :class:`SweepTracker` — the driver's synchronous helper for the parent run (create / reuse on
  ``--resume``, params, artifacts, final metrics, status).
* :class:`TrackingCallback` — a ``ray.tune.Callback`` that never blocks: each hook only puts a
  small event on a queue (a few µs; ``stats()`` reports the time spent in the hooks). A background
  thread creates the child runs, writes metrics with ``MlflowClient.log_batch`` (batched), keeps
  ``<sweep_dir>/mlflow_runs.json`` (trial id -> run id, status, epochs) and retries with backoff
  while the tracking server is down; trials keep running meanwhile, and their results stay in
  Ray's trial folders for ``losstune export``.

Child runs are found again on ``--resume`` and after trial restarts (the mapping file, else a
search by the tags ``losstune.trial_id`` + ``mlflow.parentRunId``), so no run is duplicated.

Each epoch's ``predictions.png`` and its ``predictions.webp`` thumbnail (both made by the trial) become
an MLflow image series, filed under the names ``MlflowClient.log_image(key=..., step=...)`` would use but
without its decode / re-encode / resize (~30 ms per image, benchmarks/mlflow_cost.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ray import tune

from losstune.search.formatting import format_value
from losstune.search.status import TrialStatus

logger = logging.getLogger("losstune.tracking")

RUNS_FILE = "mlflow_runs.json"
# small files of each checkpoint that the child run keeps (written by search.artifacts.write_trial_artifacts)
ARTIFACT_FILES = ("predictions.png", "config.yaml")
THUMBNAIL_FILE = "predictions.webp"  # the image series' thumbnail, made by the trial beside predictions.png
IMAGE_KEY = "predictions"  # the image series' key in the MLflow UI
LOGGED_IMAGES_TAG = "mlflow.loggedImages"  # what MlflowClient.log_image sets: the UI then looks for images/
MAX_PENDING_IMAGES = 100
# Tune's own result keys: not training metrics
TUNE_KEYS = {
    "timestamp", "time_this_iter_s", "time_total_s", "time_since_restore", "iterations_since_restore",
    "timesteps_total", "episodes_total", "timesteps_since_restore", "episodes_this_iter",
    "timesteps_this_iter", "pid", "training_iteration", "done", "date", "hostname", "node_ip", "node_id", "trial_id",
    "experiment_id", "experiment_tag", "config", "should_checkpoint", "checkpoint_dir_name", "warmup_time",
}
STAGE_TAG = "stage"  # every child run: "search" (a sweep trial) or "verify" (a verification run)
# numbers a trial reports with every result that describe its data, not its progress: also child-run params
DATA_PARAMS = ("num_val",)  # the validation samples the trial's metrics average over
MAX_ENTITIES = 1000  # MLflow's log_batch limit (metrics + params + tags)
MAX_PARAMS = 100
PARAM_LEN = 500


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached (checked before the sweep starts)."""


# ----- small helpers ----------------------------------------------------------------------------
def _ended_or_lost(entry: Mapping[str, Any]) -> bool:
    """A trial of ``mlflow_runs.json`` that will not run again in this sweep."""
    status = TrialStatus(entry.get("status") or TrialStatus.RUNNING)
    return status.ended or status is TrialStatus.LOST


def mlflow_client(uri: str):
    """An ``MlflowClient`` of the store at ``uri``."""
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def _now_ms() -> int:
    return int(time.time() * 1000)


def param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= PARAM_LEN else text[:PARAM_LEN - 3] + "..."


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
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


def sqlite_path(uri: str) -> Path | None:
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
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    path = sqlite_path(uri)
    if path is not None:  # keep artifacts beside the database, not in ./mlruns of whatever the CWD is
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


def read_runs_file(sweep_dir: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(sweep_dir) / RUNS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


# ----- the parent run ---------------------------------------------------------------------------
class SweepTracker:
    """The parent run of a sweep (driver side, synchronous; errors are the caller's to handle)."""

    def __init__(self, uri: str, experiment: str):
        self.uri, self.experiment = uri, experiment
        self.client = mlflow_client(uri)
        self.experiment_id = get_or_create_experiment(self.client, experiment, uri)
        self.run_id: str | None = None

    def start(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str],
              resume_run_id: str | None = None) -> str:
        if resume_run_id:
            try:
                run = self.client.get_run(resume_run_id)
                self.run_id = run.info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
                self.client.set_tag(self.run_id, "losstune.resumed", "true")
                return self.run_id
            except Exception as err:  # noqa: BLE001 - the run is gone: start a new one
                logger.warning("parent run %s not found (%s); creating a new one", resume_run_id, err)
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"losstune.kind": "sweep", "losstune.sweep": name, **tags})
        self.run_id = run.info.run_id
        from mlflow.entities import Param
        log_batch_chunked(self.client, self.run_id,
                          params=[Param(k, param_value(v)) for k, v in params.items()])
        return self.run_id

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric
        ts = _now_ms()
        log_batch_chunked(self.client, self.run_id,
                          metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool)])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag
        log_batch_chunked(self.client, self.run_id, tags=[RunTag(k, param_value(v)) for k, v in tags.items()])

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


# ----- the callback -----------------------------------------------------------------------------
def backfill_runs(uri: str, runs: Mapping[str, Mapping[str, Any]],
                  histories: Mapping[str, list[Mapping[str, Any]]]) -> dict[str, int]:
    """Write into the child runs what a killed driver still had queued for MLflow.

    The driver logs asynchronously, so a SIGKILL can lose its last few writes; Ray's per-trial
    ``result.json`` (``histories``: trial id -> results) has everything. For each trial with a run
    in ``runs`` (the ``mlflow_runs.json`` mapping), log the (metric, step) pairs MLflow lacks and, for
    a trial that ended, its status. Idempotent: a second call writes nothing.

    Returns counts: ``runs`` touched, ``metrics`` values written, ``statuses`` set.
    """
    from mlflow.entities import Metric, RunTag

    client = mlflow_client(uri)
    counts = {"runs": 0, "metrics": 0, "statuses": 0}
    for trial_id, entry in runs.items():
        run_id = entry.get("run_id")
        history = histories.get(trial_id) or []
        if not run_id:
            continue
        by_step: dict[int, dict[str, float]] = {}
        stamp: dict[int, int] = {}  # step -> ms, Tune's timestamps are seconds
        for result in history:
            metrics = numeric_metrics(result)
            step = int(result.get("training_iteration") or metrics.get("epoch") or 0)
            by_step.setdefault(step, {}).update(metrics)
            stamp[step] = int(1000 * float(result.get("timestamp") or 0)) or _now_ms()
        missing = []
        for key in sorted({k for m in by_step.values() for k in m}):
            have = {m.step for m in client.get_metric_history(run_id, key)}
            missing += [Metric(key, metrics[key], stamp[step], step)
                        for step, metrics in sorted(by_step.items()) if key in metrics and step not in have]
        status = TrialStatus(entry.get("status") or TrialStatus.RUNNING)
        run = client.get_run(run_id)
        set_status = status.ended and (run.data.tags.get("losstune.status") != status
                                       or run.info.status != status.run_status)
        if missing:
            log_batch_chunked(client, run_id, metrics=missing)
        if set_status:
            log_batch_chunked(client, run_id, tags=[RunTag("losstune.status", status.value)])
            client.set_terminated(run_id, status=status.run_status)
        if missing or set_status:
            counts["runs"] += 1
            counts["metrics"] += len(missing)
            counts["statuses"] += int(set_status)
    return counts


def _thumbnail_of(png: bytes) -> bytes:
    """MLflow's image-series thumbnail of a PNG (for trials that sent none)."""
    import io

    from PIL import Image

    from losstune.search.artifacts import save_thumbnail
    out = io.BytesIO()
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        save_thumbnail(image, out)
    return out.getvalue()


class _TrialState:
    __slots__ = ("trial_id", "run_id", "params", "name", "metrics", "tags", "end", "started", "reopen", "node_ip",
                 "node_id", "restarts", "images", "images_tagged", "files", "config_logged", "data_params",
                 "data_params_logged")

    def __init__(self, trial_id: str):
        self.trial_id = trial_id
        self.run_id: str | None = None
        self.params: dict[str, Any] | None = None
        self.name = trial_id
        self.metrics: list = []
        self.tags: dict[str, str] = {}
        self.end: str | None = None
        self.started = False
        self.reopen = False  # an existing run continues (resume / restart): set it RUNNING again
        self.node_ip: str | None = None
        self.node_id: str | None = None
        self.restarts = 0
        self.images: list[tuple[int, int, bytes, bytes | None]] = []  # (step, ms, png, webp): the image series
        self.images_tagged = False
        self.files: dict[str, bytes] = {}          # the newest predictions.png / config.yaml of the trial
        self.config_logged = False
        self.data_params: dict[str, int] = {}      # DATA_PARAMS read from a result, not yet logged
        self.data_params_logged: set[str] = set()


class TrackingCallback(tune.Callback):
    """Driver-side MLflow logging for a sweep; see the module docstring.

    Args:
        sweep_dir: local results folder of the sweep (``mlflow_runs.json`` lives there).
        tracking_uri / experiment_id / parent_run_id: where the child runs go; ``tracking_uri=None``
            keeps only the status file (MLflow disabled).
        max_epochs: ``train.epochs``; a trial that ends earlier without diverging was stopped early.
        decode: ``config -> {param: value}`` for the child run's params (the sampled values).
        tags: extra tags of every child run (task, sweep).
        flush_interval: seconds the background thread collects events before writing a batch.
        flush_timeout: seconds :meth:`close` keeps retrying pending writes while the server is down.
    """

    _instances: "weakref.WeakValueDictionary[str, TrackingCallback]" = weakref.WeakValueDictionary()

    def __init__(self, sweep_dir: str | Path, tracking_uri: str | None, experiment_id: str | None,
                 parent_run_id: str | None, max_epochs: int, decode=None, tags: Mapping[str, str] | None = None,
                 flush_interval: float = 0.5, flush_timeout: float = 60.0):
        self.sweep_dir = str(sweep_dir)
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.max_epochs = int(max_epochs)
        self.decode = decode
        self.tags = dict(tags or {})
        self.flush_interval = flush_interval
        self.flush_timeout = flush_timeout
        self._init_runtime()

    # Tune pickles callbacks into tuner.pkl and restores them on Tuner.restore: keep only the settings
    _SETTINGS = ("sweep_dir", "tracking_uri", "experiment_id", "parent_run_id", "max_epochs", "decode", "tags",
                 "flush_interval", "flush_timeout")

    def __getstate__(self) -> dict:
        return {k: self.__dict__[k] for k in self._SETTINGS}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._trials: dict[str, _TrialState] = {}
        self._runs: dict[str, dict[str, Any]] = {}
        self._deadline = math.inf
        self._waiters: list[threading.Event] = []
        self.callback_time_s = 0.0
        self.checkpoint_time_s = 0.0
        self.num_results = 0
        self.num_events = 0
        self.num_batches = 0
        self.errors = 0
        self.last_error: str | None = None
        self.dropped_metrics = 0
        self._dirty = False
        TrackingCallback._instances[self.sweep_dir] = self

    @classmethod
    def for_sweep(cls, sweep_dir: str | Path) -> "TrackingCallback | None":
        """The live callback of a sweep (on --resume: the one Tune restored from tuner.pkl)."""
        return cls._instances.get(str(sweep_dir))

    # ----- hooks: cheap, never block ------------------------------------------------------------
    def _put(self, event: tuple) -> None:
        if self._thread is None:
            self._start_thread()
        self._queue.put(event)

    def setup(self, **info) -> None:
        self._start_thread()

    def _set_status(self, trial_id: str, status: TrialStatus, epochs: int | None = None) -> None:
        # statuses are kept here, in the driver's thread (cheap), so they are right even while the
        # writer thread waits on a dead tracking server
        with self._lock:
            entry = self._runs.setdefault(trial_id, {"run_id": None, "status": status.value, "epochs": 0})
            entry["status"] = status.value
            if epochs is not None:
                entry["epochs"] = max(int(entry.get("epochs") or 0), epochs)
        self._dirty = True

    def on_trial_start(self, iteration, trials, trial, **info):
        t0 = time.perf_counter()
        self._set_status(trial.trial_id, TrialStatus.RUNNING)
        self._put(("start", trial.trial_id, dict(trial.config), str(trial)))
        self.callback_time_s += time.perf_counter() - t0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        t0 = time.perf_counter()
        self._put(("result", trial.trial_id, result.get("training_iteration"), result, _now_ms()))
        self.num_results += 1
        self.callback_time_s += time.perf_counter() - t0

    def on_trial_complete(self, iteration, trials, trial, **info):
        t0 = time.perf_counter()
        last = trial.last_result or {}
        iters = int(last.get("training_iteration") or 0)
        status = TrialStatus.of_completed(last, self.max_epochs)
        self._set_status(trial.trial_id, status, iters)
        self._put(("end", trial.trial_id, status, iters))
        self.callback_time_s += time.perf_counter() - t0

    def on_trial_error(self, iteration, trials, trial, **info):
        t0 = time.perf_counter()
        iters = int((trial.last_result or {}).get("training_iteration") or 0)
        self._set_status(trial.trial_id, TrialStatus.FAILED, iters)
        self._put(("end", trial.trial_id, TrialStatus.FAILED, iters))
        self.callback_time_s += time.perf_counter() - t0

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        # the checkpoint folder may be deleted (num_to_keep) before the writer gets to it: read the two
        # small files now (local storage only; a few KB)
        t0 = time.perf_counter()
        files = {}
        path = getattr(checkpoint, "path", None)
        if path and os.path.isdir(path):
            for name in (*ARTIFACT_FILES, THUMBNAIL_FILE):
                try:
                    with open(os.path.join(path, name), "rb") as f:
                        files[name] = f.read()
                except OSError:
                    pass
        if files:
            step = int((trial.last_result or {}).get("training_iteration") or 0)
            self._put(("artifacts", trial.trial_id, step, files, int(time.time() * 1000)))
        self.checkpoint_time_s += time.perf_counter() - t0

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._put(("recover", trial.trial_id))

    def on_experiment_end(self, trials, **info):
        self._put(("flush", None))

    def get_state(self) -> dict | None:
        # Tune checkpoints the experiment: a good moment to write what is pending
        self._put(("flush", None))
        with self._lock:
            return {"runs": {k: dict(v) for k, v in self._runs.items()}}

    def set_state(self, state: dict) -> None:
        with self._lock:
            for trial_id, entry in (state or {}).get("runs", {}).items():
                self._runs.setdefault(trial_id, dict(entry))

    def stats(self) -> dict[str, float]:
        """Time spent inside Tune's hooks (the driver's cost of tracking) and the writer's counters."""
        return {"callback_time_s": self.callback_time_s, "num_results": self.num_results,
                "per_result_ms": 1000 * self.callback_time_s / max(1, self.num_results),
                "checkpoint_hook_time_s": self.checkpoint_time_s,
                "batches": self.num_batches, "errors": self.errors, "dropped_metrics": self.dropped_metrics}

    # ----- the background writer ----------------------------------------------------------------
    def _start_thread(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            for k, v in read_runs_file(self.sweep_dir).items():
                self._runs.setdefault(k, v)
            self._thread = threading.Thread(target=self._run, name="losstune-mlflow", daemon=True)
            self._thread.start()

    def _collect(self, wait: float) -> list[tuple]:
        """Block up to ``wait`` s for an event, then gather more for up to ``flush_interval`` s."""
        try:
            events = [self._queue.get(timeout=max(0.001, wait))]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.flush_interval
        while events[-1][0] not in ("flush", "stop"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                events.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        while True:
            try:
                events.append(self._queue.get_nowait())
            except queue.Empty:
                return events

    def _run(self) -> None:
        client = None
        failures, next_try = 0, 0.0
        stopping = False
        while True:
            now = time.monotonic()
            wait = self.flush_interval if next_try <= now else min(self.flush_interval, next_try - now)
            for ev in self._collect(wait):
                if ev[0] == "stop":
                    stopping = True
                elif ev[0] == "flush":
                    if ev[1] is not None:
                        self._waiters.append(ev[1])
                else:
                    self._apply(ev)
            if self._dirty:
                self._save_runs_file()
            if self.tracking_uri and self._pending() and time.monotonic() >= next_try:
                try:
                    if client is None:
                        client = mlflow_client(self.tracking_uri)
                    self._sync(client)
                    if failures:
                        logger.warning("MLflow is reachable again; pending metrics written")
                    failures, next_try = 0, 0.0
                except Exception as err:  # noqa: BLE001 - keep the trials running, retry later
                    self.errors += 1
                    self.last_error = f"{type(err).__name__}: {err}"
                    if failures == 0:
                        logger.warning("MLflow logging failed (%s); retrying in the background", self.last_error)
                    failures += 1
                    next_try = time.monotonic() + min(30.0, 0.5 * 2 ** failures)
            pending = self.tracking_uri is not None and self._pending()
            if not pending and self._queue.empty():
                for w in self._waiters:
                    w.set()
                self._waiters.clear()
            if stopping and (not pending or time.monotonic() >= self._deadline):
                if pending and not self.dropped_metrics:
                    self.dropped_metrics = sum(len(s.metrics) for s in self._trials.values())
                    logger.warning("MLflow: gave up on %d metric values (%s); they are still in Ray's results",
                                   self.dropped_metrics, self.last_error)
                self._save_runs_file()
                for w in self._waiters:
                    w.set()
                return
            if stopping:
                next_try = min(next_try, self._deadline)

    def _state(self, trial_id: str) -> _TrialState:
        state = self._trials.get(trial_id)
        if state is None:
            state = self._trials[trial_id] = _TrialState(trial_id)
            entry = self._runs.get(trial_id)
            if entry and entry.get("run_id"):
                state.run_id = entry["run_id"]
        return state

    def _apply(self, ev: tuple) -> None:
        self.num_events += 1
        kind, trial_id = ev[0], ev[1]
        state = self._state(trial_id)
        with self._lock:
            entry = self._runs.setdefault(trial_id, {"run_id": state.run_id, "status": TrialStatus.RUNNING.value,
                                                     "epochs": 0})
        self._dirty = True
        if kind == "start":
            config, name = ev[2], ev[3]
            try:
                state.params = dict(self.decode(config)) if self.decode else dict(config)
            except Exception:  # noqa: BLE001 - log the raw config rather than nothing
                state.params = dict(config)
            state.name = name
            state.started = True
            state.reopen = state.run_id is not None
            state.end = None
            entry["params"] = {k: v for k, v in state.params.items()}
        elif kind == "result":
            step, result, ts = ev[2], ev[3], ev[4]
            from mlflow.entities import Metric
            metrics = numeric_metrics(result)
            step = int(step or metrics.get("epoch") or 0)
            state.metrics.extend(Metric(k, v, ts, step) for k, v in metrics.items())
            node_ip, node_id = result.get("node_ip"), result.get("node_id")
            if node_ip and node_ip != state.node_ip:
                state.node_ip = node_ip
                state.tags["losstune.node_ip"] = str(node_ip)
            if node_id and node_id != state.node_id:
                state.node_id = node_id
                state.tags["losstune.node_id"] = str(node_id)
            for key in DATA_PARAMS:
                if key in metrics and key not in state.data_params_logged:
                    state.data_params[key] = int(metrics[key])
            entry["epochs"] = max(int(entry.get("epochs") or 0), step)
            for k in ("composite", "ssim", "mse", "gradient_match"):
                if k in metrics:
                    entry[k] = metrics[k]
        elif kind == "end":
            state.end = ev[2]
        elif kind == "artifacts":
            step, files, ts = ev[2], dict(ev[3]), ev[4]
            thumbnail = files.pop(THUMBNAIL_FILE, None)
            if "predictions.png" in files:
                state.images.append((step, ts, files["predictions.png"], thumbnail))
                del state.images[:-MAX_PENDING_IMAGES]  # the server is down for long: keep the newest
                if not state.images_tagged:  # goes out with the next batch of metrics
                    state.tags[LOGGED_IMAGES_TAG] = "True"
                    state.images_tagged = True
            state.files.update(files)
        elif kind == "recover":
            state.restarts += 1
            state.tags["losstune.restarts"] = str(state.restarts)
        elif kind == "interrupt":  # ("interrupt", trial id, status): mark_interrupted / mark_lost set the status
            status = ev[2]
            if entry.get("status") == status and (status != TrialStatus.LOST or state.run_id is not None):
                state.end = status  # ends the child run (a lost trial that never got one gets none now)

    def _pending(self) -> bool:
        # state.files alone is not pending: they are written when the trial ends (state.end)
        return any(s.metrics or s.tags or s.data_params or s.end or s.images or (s.started and s.run_id is None)
                   for s in self._trials.values())

    def _save_runs_file(self) -> None:
        try:
            with self._lock:
                self._dirty = False
                data = {k: dict(v) for k, v in self._runs.items()}
            write_json_atomic(Path(self.sweep_dir) / RUNS_FILE, data)
        except OSError as err:
            logger.warning("cannot write %s: %s", RUNS_FILE, err)

    def _find_run(self, client, trial_id: str) -> str | None:
        filt = f"tags.`losstune.trial_id` = '{trial_id}'"
        if self.parent_run_id:
            filt += f" and tags.`mlflow.parentRunId` = '{self.parent_run_id}'"
        runs = client.search_runs([self.experiment_id], filter_string=filt, max_results=1)
        return runs[0].info.run_id if runs else None

    def _sync(self, client) -> None:
        from mlflow.entities import Param, RunTag
        for state in list(self._trials.values()):
            if state.run_id is None and (state.started or state.metrics or state.end):
                run_id = self._find_run(client, state.trial_id)
                if run_id is None:
                    tags = {"losstune.trial_id": state.trial_id, STAGE_TAG: "search", **self.tags}
                    if self.parent_run_id:
                        tags["mlflow.parentRunId"] = self.parent_run_id
                    run_id = client.create_run(self.experiment_id, run_name=state.name, tags=tags).info.run_id
                    if state.params:
                        log_batch_chunked(client, run_id, params=[Param(k, param_value(v))
                                                                  for k, v in state.params.items()])
                else:
                    state.reopen = True
                state.run_id = run_id
                with self._lock:
                    self._runs.setdefault(state.trial_id, {})["run_id"] = run_id
                self._save_runs_file()
            if state.run_id is None:
                continue
            if state.reopen:
                if state.end is None:
                    client.update_run(state.run_id, status="RUNNING")
                    client.set_tag(state.run_id, "losstune.status", TrialStatus.RUNNING.value)
                state.reopen = False
            if state.data_params:  # the same value on every result of a trial: logged once
                log_batch_chunked(client, state.run_id, params=[Param(k, str(v)) for k, v in state.data_params.items()])
                state.data_params_logged.update(state.data_params)
                state.data_params = {}
            if state.metrics or state.tags:
                log_batch_chunked(client, state.run_id, metrics=state.metrics,
                                  tags=[RunTag(k, v) for k, v in state.tags.items()])
                self.num_batches += 1
                state.metrics, state.tags = [], {}
            # the image series every epoch; the newest predictions.png / config.yaml once, when the trial ends
            if state.images:
                self._log_images(client, state)
            if state.files and state.end:
                self._log_files(client, state)
            if state.end:
                client.set_tag(state.run_id, "losstune.status", state.end.value)
                client.set_terminated(state.run_id, status=state.end.run_status)
                state.end = None
                state.started = False

    def _log_images(self, client, state: _TrialState) -> None:
        """The pending images as MLflow's image series, in one artifact upload.

        The files are named as ``MlflowClient.log_image(key=..., step=...)`` names them (the UI's image chart
        reads that layout), but the trial's PNG bytes go as they are and its thumbnail is used when it sent
        one: ``log_image`` would decode, re-encode (~20 ms) and make the thumbnail (~10 ms) per image here.
        """
        import tempfile
        import uuid
        images = list(state.images)
        with tempfile.TemporaryDirectory(prefix="losstune-images-") as tmp:
            for step, ts, png, thumbnail in images:
                stem = os.path.join(tmp, f"{IMAGE_KEY}+step+{step}+timestamp+{ts}+{uuid.uuid4()}")
                try:
                    webp = thumbnail if thumbnail is not None else _thumbnail_of(png)
                except (ImportError, OSError, ValueError) as err:  # an unreadable image: skip it, not the run
                    logger.warning("trial %s: predictions image of step %s not logged: %s", state.trial_id, step, err)
                    continue
                with open(stem + ".png", "wb") as f:
                    f.write(png)
                with open(stem + "+compressed.webp", "wb") as f:
                    f.write(webp)
            client.log_artifacts(state.run_id, tmp, artifact_path="images")
        del state.images[:len(images)]

    def _log_files(self, client, state: _TrialState) -> None:
        import tempfile
        files = dict(state.files)
        if state.config_logged:
            files.pop("config.yaml", None)
        if files:
            with tempfile.TemporaryDirectory(prefix="losstune-artifacts-") as tmp:
                for name, data in files.items():
                    path = os.path.join(tmp, name)
                    with open(path, "wb") as f:
                        f.write(data)
                    client.log_artifact(state.run_id, path)
        state.config_logged = state.config_logged or "config.yaml" in files
        state.files = {}

    # ----- driver API ------------------------------------------------------------------------------
    def mark_interrupted(self, trial_ids: Iterable[str] | None = None) -> None:
        """Child runs of trials that did not end: status ``interrupted`` (KILLED) until ``--resume``."""
        with self._lock:
            ids = list(trial_ids) if trial_ids is not None else list(self._runs)
            for trial_id in ids:
                entry = self._runs.get(trial_id)
                if entry is not None and not _ended_or_lost(entry):
                    entry["status"] = TrialStatus.INTERRUPTED.value
        self._dirty = True
        for trial_id in ids:
            self._put(("interrupt", trial_id, TrialStatus.INTERRUPTED))

    def mark_lost(self, known_trial_ids: Iterable[str]) -> list[str]:
        """On a resume: trials that had not ended and that the restored Tune state does not know become
        ``lost`` (child run KILLED, if one was made); returns their ids."""
        self._start_thread()  # loads mlflow_runs.json
        known = set(known_trial_ids)
        with self._lock:
            lost = sorted(t for t, e in self._runs.items() if t not in known and not _ended_or_lost(e))
            for trial_id in lost:
                self._runs[trial_id]["status"] = TrialStatus.LOST.value
        self._dirty = True
        for trial_id in lost:
            self._put(("interrupt", trial_id, TrialStatus.LOST))
        return lost

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is written (or ``timeout`` s); True when all was written."""
        if self._thread is None or not self._thread.is_alive():
            return not self._pending()
        done = threading.Event()
        self._queue.put(("flush", done))
        return done.wait(self.flush_timeout if timeout is None else timeout) and not self._pending()

    def close(self, timeout: float | None = None) -> dict[str, dict[str, Any]]:
        """Write what is pending (retrying up to ``timeout`` s while the server is down), stop the thread."""
        if self._thread is not None and self._thread.is_alive():
            self._deadline = time.monotonic() + (self.flush_timeout if timeout is None else timeout)
            self._queue.put(("stop", None))
            self._thread.join(max(0.0, self._deadline - time.monotonic()) + 1.0)
            if self._thread.is_alive():  # stuck in a call to a dead server: leave it (daemon thread)
                self.dropped_metrics = sum(len(s.metrics) for s in list(self._trials.values()))
                logger.warning("MLflow: gave up waiting for the tracking server; %d metric values not "
                               "written (they are still in Ray's results)", self.dropped_metrics)
        self._save_runs_file()
        return self.runs()

    def statuses(self) -> dict[str, str]:
        """trial id -> losstune status, as known to the driver right now."""
        with self._lock:
            return {k: v.get("status", TrialStatus.RUNNING.value) for k, v in self._runs.items()}

    def runs(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(v) for k, v in self._runs.items()}


class ProgressCallback(tune.Callback):
    """One line per trial start / end on stdout (Tune's own tables are switched off)."""

    def __init__(self, max_epochs: int, decode=None, total: int | None = None):
        self.max_epochs, self.decode, self.total = max_epochs, decode, total

    @staticmethod
    def _done(trials, trial) -> int:
        ended = ("TERMINATED", "ERROR")
        return sum(t.status in ended for t in trials) + (trial.status not in ended)

    def _params(self, trial) -> str:
        try:
            values = self.decode(trial.config) if self.decode else trial.config
        except Exception:  # noqa: BLE001
            values = trial.config
        return " ".join(f"{k}={format_value(v)}" for k, v in values.items())

    def on_trial_start(self, iteration, trials, trial, **info):
        print(f"[losstune] start  {trial.trial_id}  {self._params(trial)}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        iters = int(last.get("training_iteration") or 0)
        status = TrialStatus.of_completed(last, self.max_epochs)
        of = f"/{self.total}" if self.total else ""
        print(f"[losstune] {status.label:<13} {trial.trial_id}  epochs {iters}/{self.max_epochs}  "
              f"composite {format_value(last.get('composite'))}  ssim {format_value(last.get('ssim'))}  "
              f"mse {format_value(last.get('mse'))}  ({self._done(trials, trial)}{of} done)", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[losstune] FAILED {trial.trial_id}: see {trial.path}/error.txt", flush=True)
