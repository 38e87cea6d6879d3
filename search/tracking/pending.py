"""What each trial's child run is still owed: Tune's events turned into pending MLflow writes.

:class:`PendingWrites` is touched only by the writer thread. Applying an event costs no MLflow call:
metrics, tags and images pile up per trial until the writer's next sync sends them in batches.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from losstune.search.status import TrialStatus
from losstune.search.tracking.events import (CheckpointFiles, TrialEnded, TrialEvent, TrialMarked, TrialRecovered,
                                             TrialResult, TrialStarted)
from losstune.search.tracking.runs_file import RunsBook
from losstune.search.tracking.store import numeric_metrics

# small files of each checkpoint that the child run keeps (written by search.artifacts.write_trial_artifacts)
ARTIFACT_FILES = ("predictions.png", "config.yaml")
THUMBNAIL_FILE = "predictions.webp"  # the image series' thumbnail, made by the trial beside predictions.png
LOGGED_IMAGES_TAG = "mlflow.loggedImages"  # what MlflowClient.log_image sets: the UI then looks for images/
MAX_PENDING_IMAGES = 100  # per trial, while the server is down: the newest are kept
# numbers a trial reports with every result that describe its data, not its progress: also child-run params
DATA_PARAMS = ("num_val",)  # the validation samples the trial's metrics average over


class TrialState:
    """One trial's child run and what it is still owed."""

    __slots__ = ("trial_id", "run_id", "artifact_uri", "params", "params_pending", "name", "metrics", "written_at",
                 "tags", "end", "started", "reopen", "node_ip", "node_id", "restarts", "images", "images_tagged",
                 "files", "config_logged", "data_params", "data_params_logged", "create_tried")

    def __init__(self, trial_id: str, run_id: str | None):
        self.trial_id = trial_id
        self.run_id = run_id
        self.artifact_uri: str | None = None      # the run's, once known from creating or finding it
        self.params: dict[str, Any] | None = None
        self.params_pending: dict[str, str] = {}   # not yet in the run: logged with its next batch
        self.name = trial_id
        self.metrics: list = []                    # mlflow.entities.Metric, not yet logged
        self.written_at = -math.inf                # monotonic time the run was made or last got a batch
        self.tags: dict[str, str] = {}
        self.end: TrialStatus | None = None        # the run is to end with this status
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
        self.create_tried = False  # a create_run was sent: it may have made the run even if it raised

    def pending(self) -> bool:
        """Something is to be written now (``files`` alone are not: they are written when the trial ends)."""
        return bool(self.metrics or self.tags or self.params_pending or self.data_params or self.end or self.images
                    or (self.started and self.run_id is None))


class PendingWrites:
    """Every trial's :class:`TrialState`; :meth:`apply` records an event there and in the runs book.

    ``mlflow=False`` (tracking off): events reach the runs book only; nothing piles up for MLflow.
    """

    def __init__(self, book: RunsBook, decode: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
                 mlflow: bool = True):
        self.book = book
        self.decode = decode
        self.mlflow = mlflow
        self.trials: dict[str, TrialState] = {}

    def state(self, trial_id: str) -> TrialState:
        state = self.trials.get(trial_id)
        if state is None:
            state = self.trials[trial_id] = TrialState(trial_id, self.book.run_id(trial_id))
        return state

    def any(self) -> bool:
        return any(s.pending() for s in self.trials.values())

    def num_metrics(self) -> int:
        """Metric values not yet written."""
        return sum(len(s.metrics) for s in list(self.trials.values()))

    def apply(self, event: TrialEvent) -> None:
        """Record ``event`` (a TypeError for anything that is not a trial event)."""
        handler = self._HANDLERS.get(type(event))
        if handler is None:
            raise TypeError(f"not a trial event: {event!r}")
        if self.mlflow:
            handler(self, self.state(event.trial_id), event)
        elif isinstance(event, TrialStarted):
            self.book.record_start(event.trial_id, self._params(event))
        elif isinstance(event, TrialResult):
            metrics = numeric_metrics(event.result)
            self.book.record_result(event.trial_id, self._step(event, metrics), metrics)
        else:
            self.book.touch(event.trial_id)

    def _params(self, event: TrialStarted) -> dict[str, Any]:
        """The child run's params: the decoded config (the raw one when it cannot be decoded)."""
        try:
            return dict(self.decode(event.config)) if self.decode else dict(event.config)
        except Exception:  # noqa: BLE001 - log the raw config rather than nothing
            return dict(event.config)

    @staticmethod
    def _step(event: TrialResult, metrics: Mapping[str, float]) -> int:
        return int(event.step or metrics.get("epoch") or 0)

    def _start(self, state: TrialState, event: TrialStarted) -> None:
        state.params = self._params(event)
        state.name = event.name
        state.started = True
        state.reopen = state.run_id is not None
        state.end = None
        self.book.record_start(state.trial_id, state.params)

    def _result(self, state: TrialState, event: TrialResult) -> None:
        from mlflow.entities import Metric
        result, ts = event.result, event.timestamp_ms
        metrics = numeric_metrics(result)
        step = self._step(event, metrics)
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
        self.book.record_result(state.trial_id, step, metrics)

    def _files(self, state: TrialState, event: CheckpointFiles) -> None:
        self.book.touch(state.trial_id)
        files = dict(event.files)
        thumbnail = files.pop(THUMBNAIL_FILE, None)
        if "predictions.png" in files:
            state.images.append((event.step, event.timestamp_ms, files["predictions.png"], thumbnail))
            del state.images[:-MAX_PENDING_IMAGES]  # the server is down for long: keep the newest
            if not state.images_tagged:  # goes out with the next batch of metrics
                state.tags[LOGGED_IMAGES_TAG] = "True"
                state.images_tagged = True
        state.files.update(files)

    def _end(self, state: TrialState, event: TrialEnded) -> None:
        self.book.touch(state.trial_id)
        state.end = event.status

    def _recover(self, state: TrialState, event: TrialRecovered) -> None:
        self.book.touch(state.trial_id)
        state.restarts += 1
        state.tags["losstune.restarts"] = str(state.restarts)

    def _mark(self, state: TrialState, event: TrialMarked) -> None:
        # mark_interrupted / mark_lost set the status first; a later status (the trial went on) wins
        if self.book.status(state.trial_id) == event.status and (
                event.status is not TrialStatus.LOST or state.run_id is not None):
            state.end = event.status  # ends the child run (a lost trial that never got one gets none now)

    _HANDLERS: dict[type, Callable[["PendingWrites", TrialState, Any], None]] = {
        TrialStarted: _start, TrialResult: _result, CheckpointFiles: _files, TrialEnded: _end,
        TrialRecovered: _recover, TrialMarked: _mark,
    }
