"""The Tune side of tracking: :class:`TrackingCallback` turns Tune's hooks into events for the writer.

Each hook only records a status in the runs book and puts one small event on the writer's queue (a
few µs; :meth:`TrackingCallback.stats` reports the time spent in the hooks): it never waits for MLflow.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Iterable, Mapping

from ray import tune

from losstune.search.status import TrialStatus
from losstune.search.tracking.events import (CheckpointFiles, Event, Flush, TrialEnded, TrialRecovered, TrialResult,
                                             TrialStarted)
from losstune.search.tracking.pending import ARTIFACT_FILES, THUMBNAIL_FILE
from losstune.search.tracking.runs_file import RunsBook
from losstune.search.tracking.store import now_ms
from losstune.search.tracking.store_process import wanted
from losstune.search.tracking.writer import TrackingWriter


class TrackingCallback(tune.Callback):
    """Driver-side MLflow logging for a sweep: one child run per trial under the parent run, written by
    a :class:`TrackingWriter` thread, and ``<sweep_dir>/mlflow_runs.json``.

    Args:
        sweep_dir: local results folder of the sweep (``mlflow_runs.json`` lives there).
        tracking_uri / experiment_id / parent_run_id: where the child runs go; ``tracking_uri=None``
            keeps only the status file (MLflow disabled). Read when the writer starts (the first hook,
            :meth:`mark_lost` or :meth:`mark_interrupted`), so a resumed sweep may set them before.
        max_epochs: ``train.epochs``; a trial that ends earlier without diverging was stopped early.
        decode: ``config -> {param: value}`` for the child run's params (the sampled values).
        tags: extra tags of every child run (task, sweep).
        flush_interval: seconds the background thread collects events before writing a batch.
        flush_timeout: seconds :meth:`close` keeps retrying pending writes while the server is down.
        store_process: ``mlflow.store_process`` (true / false / "auto"): a database store's work in a helper
            process (:mod:`losstune.search.tracking.store_process`).
    """

    _instances: "weakref.WeakValueDictionary[str, TrackingCallback]" = weakref.WeakValueDictionary()

    def __init__(self, sweep_dir: str | Path, tracking_uri: str | None, experiment_id: str | None,
                 parent_run_id: str | None, max_epochs: int, decode=None, tags: Mapping[str, str] | None = None,
                 flush_interval: float = 0.5, flush_timeout: float = 60.0, store_process: bool | str = "auto"):
        self.sweep_dir = str(sweep_dir)
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.max_epochs = int(max_epochs)
        self.decode = decode
        self.tags = dict(tags or {})
        self.flush_interval = flush_interval
        self.flush_timeout = flush_timeout
        self.store_process = store_process
        self._init_runtime()

    # Tune pickles callbacks into tuner.pkl and restores them on Tuner.restore: keep only the settings
    _SETTINGS = ("sweep_dir", "tracking_uri", "experiment_id", "parent_run_id", "max_epochs", "decode", "tags",
                 "flush_interval", "flush_timeout", "store_process")

    def __getstate__(self) -> dict:
        return {k: self.__dict__[k] for k in self._SETTINGS}

    def __setstate__(self, state: dict) -> None:
        self.store_process = "auto"  # absent from the state of sweeps started before the setting existed
        self.__dict__.update(state)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self.book = RunsBook(self.sweep_dir)
        self._writer: TrackingWriter | None = None
        self._writer_lock = threading.Lock()
        self.callback_time_s = 0.0
        self.checkpoint_time_s = 0.0
        self.num_results = 0
        TrackingCallback._instances[self.sweep_dir] = self

    @classmethod
    def for_sweep(cls, sweep_dir: str | Path) -> "TrackingCallback | None":
        """The live callback of a sweep (on --resume: the one Tune restored from tuner.pkl)."""
        return cls._instances.get(str(sweep_dir))

    def writer(self) -> TrackingWriter:
        """The writer thread of this callback, started on first use (it reads ``mlflow_runs.json`` then)."""
        if self._writer is None:
            with self._writer_lock:
                if self._writer is None:
                    writer = TrackingWriter(self.book, self.tracking_uri, self.experiment_id, self.parent_run_id,
                                            self.tags, self.decode, self.flush_interval, self.flush_timeout,
                                            store_process=wanted(self.store_process, self.tracking_uri))
                    writer.start()
                    self._writer = writer
        return self._writer

    def _put(self, event: Event) -> None:
        (self._writer or self.writer()).put(event)

    # ----- Tune's hooks: cheap, never block --------------------------------------------------------
    def setup(self, **info) -> None:
        self.writer()

    def on_trial_start(self, iteration, trials, trial, **info):
        t0 = time.perf_counter()
        self.book.set_status(trial.trial_id, TrialStatus.RUNNING)
        self._put(TrialStarted(trial.trial_id, dict(trial.config), str(trial)))
        self.callback_time_s += time.perf_counter() - t0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        t0 = time.perf_counter()
        self._put(TrialResult(trial.trial_id, result.get("training_iteration"), result, now_ms()))
        self.num_results += 1
        self.callback_time_s += time.perf_counter() - t0

    def _ended(self, trial, status: TrialStatus) -> None:
        iters = int((trial.last_result or {}).get("training_iteration") or 0)
        self.book.set_status(trial.trial_id, status, iters)
        self._put(TrialEnded(trial.trial_id, status))

    def on_trial_complete(self, iteration, trials, trial, **info):
        t0 = time.perf_counter()
        self._ended(trial, TrialStatus.of_completed(trial.last_result, self.max_epochs))
        self.callback_time_s += time.perf_counter() - t0

    def on_trial_error(self, iteration, trials, trial, **info):
        t0 = time.perf_counter()
        self._ended(trial, TrialStatus.FAILED)
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
            self._put(CheckpointFiles(trial.trial_id, step, files, now_ms()))
        self.checkpoint_time_s += time.perf_counter() - t0

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._put(TrialRecovered(trial.trial_id))

    def on_experiment_end(self, trials, **info):
        self._put(Flush())

    def get_state(self) -> dict | None:
        # called at every experiment snapshot (after every other trial checkpoint and each trial's last): it must stay
        # cheap, and must not flush the writer, which would undo its batching; what MLflow lacks when a killed
        # driver resumes is written from Ray's results (backfill)
        return {"runs": self.book.runs()}

    def set_state(self, state: dict) -> None:
        self.book.merge((state or {}).get("runs", {}))

    # ----- the driver's API ------------------------------------------------------------------------
    def mark_interrupted(self, trial_ids: Iterable[str] | None = None) -> None:
        """Child runs of trials that did not end: status ``interrupted`` (KILLED) until ``--resume``."""
        self.writer().mark_interrupted(trial_ids)

    def mark_lost(self, known_trial_ids: Iterable[str]) -> list[str]:
        """On a resume: trials that had not ended and that the restored Tune state does not know become
        ``lost`` (child run KILLED, if one was made); returns their ids."""
        return self.writer().mark_lost(known_trial_ids)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is written (or ``timeout`` s); True when all was written."""
        return self._writer.flush(timeout) if self._writer is not None else True

    def close(self, timeout: float | None = None) -> dict[str, dict[str, Any]]:
        """Write what is pending (retrying up to ``timeout`` s while the server is down), stop the writer;
        returns the runs book (trial id -> run id, status, ...)."""
        if self._writer is not None:
            self._writer.close(timeout)
        else:  # never started: the file on disk completes what Tune restored, rather than being cut to it
            self.book.load()
            self.book.save()
        return self.book.runs()

    def statuses(self) -> dict[str, str]:
        """trial id -> losstune status, as known to the driver right now."""
        return self.book.statuses()

    def runs(self) -> dict[str, dict[str, Any]]:
        return self.book.runs()

    def stats(self) -> dict[str, float]:
        """Time spent inside Tune's hooks (the driver's cost of tracking) and the writer's counters."""
        writer = self._writer.stats() if self._writer is not None else {"batches": 0, "errors": 0,
                                                                          "dropped_metrics": 0}
        return {"callback_time_s": self.callback_time_s, "num_results": self.num_results,
                "per_result_ms": 1000 * self.callback_time_s / max(1, self.num_results),
                "checkpoint_hook_time_s": self.checkpoint_time_s, **writer}
