"""``<sweep_dir>/mlflow_runs.json``: trial id -> child run id, status, epochs, params, last scores.

It is how a sweep finds its child runs again on ``--resume`` and after trial restarts (no run is made
twice), and what ``losstune`` reads for statuses while MLflow is down. :class:`RunsBook` is the file in
memory, shared by the driver's Tune hooks (statuses: cheap, so they are right even while the writer
waits on a dead tracking server) and the writer thread (run ids, epochs, scores), which saves it with
:func:`write_json_atomic` — a reader never sees a half-written file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from losstune.search.status import TrialStatus

logger = logging.getLogger("losstune.tracking")

RUNS_FILE = "mlflow_runs.json"
SCORES = ("composite", "ssim", "mse", "gradient_match")  # the last value of each is kept in the file
PROGRESS_SAVE_S = 10.0  # epochs and scores reach the file at least this often (Ray's results have them all)


def read_runs_file(sweep_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The sweep's ``mlflow_runs.json`` ({} when missing or unreadable)."""
    path = Path(sweep_dir) / RUNS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_json_atomic(path: Path, data: Any) -> None:
    """``data`` as JSON at ``path``, replaced in one step (a temporary file per process and thread, renamed)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def will_not_run_again(entry: Mapping[str, Any]) -> bool:
    """A trial of ``mlflow_runs.json`` that ended, or was lost with a killed driver."""
    status = TrialStatus(entry.get("status") or TrialStatus.RUNNING)
    return status.ended or status is TrialStatus.LOST


class RunsBook:
    """The runs file in memory; every method is thread-safe.

    ``dirty``: what readers of the file use (a trial, its status, run id, params) changed since the last
    :meth:`save`; the writer saves then at its next wake-up. A trial's later epochs and scores alone make the
    save :meth:`due` only every :data:`PROGRESS_SAVE_S` (each save writes every trial: O(trials)).
    """

    def __init__(self, sweep_dir: str | Path):
        self.path = Path(sweep_dir) / RUNS_FILE
        self.dirty = False
        self._progressed = False
        self._saved_at = -math.inf
        self._lock = threading.Lock()
        self._runs: dict[str, dict[str, Any]] = {}
        self._new: set[str] = set()        # trials no earlier run of the sweep knew (entries made here) ...
        self._new_saved: set[str] = set()  # ... and, of those, the ones the file on disk has

    def _entry(self, trial_id: str, status: TrialStatus = TrialStatus.RUNNING) -> dict[str, Any]:
        entry = self._runs.get(trial_id)
        if entry is None:
            entry = self._runs[trial_id] = {"run_id": None, "status": status.value, "epochs": 0}
            self._new.add(trial_id)
            self.dirty = True
        return entry

    # ----- what is known already -------------------------------------------------------------------
    def merge(self, runs: Mapping[str, Mapping[str, Any]]) -> None:
        """Add the entries of ``runs`` this book lacks (Tune's saved callback state, the file on disk), and the
        run id of an entry that has none yet."""
        with self._lock:
            for trial_id, entry in runs.items():
                mine = self._runs.setdefault(trial_id, dict(entry))
                if not mine.get("run_id") and entry.get("run_id"):
                    mine["run_id"] = entry["run_id"]
                self._new.discard(trial_id)
                self._new_saved.discard(trial_id)

    def load(self) -> None:
        """Add the entries of the file on disk this book lacks."""
        self.merge(read_runs_file(self.path.parent))

    # ----- the driver's hooks ----------------------------------------------------------------------
    def set_status(self, trial_id: str, status: TrialStatus, epochs: int | None = None) -> None:
        with self._lock:
            entry = self._entry(trial_id, status)
            entry["status"] = status.value
            if epochs is not None:
                entry["epochs"] = max(int(entry.get("epochs") or 0), epochs)
            self.dirty = True

    def mark_interrupted(self, trial_ids: Iterable[str] | None = None) -> list[str]:
        """Entries (of ``trial_ids``, default all) that will still run: ``interrupted``; returns their ids."""
        with self._lock:
            ids = list(self._runs) if trial_ids is None else list(trial_ids)
            marked = [t for t in ids if t in self._runs and not will_not_run_again(self._runs[t])]
            for trial_id in marked:
                self._runs[trial_id]["status"] = TrialStatus.INTERRUPTED.value
            self.dirty = True
        return marked

    def mark_lost(self, known_trial_ids: Iterable[str]) -> list[str]:
        """Entries that will still run but are not in ``known_trial_ids``: ``lost``; returns their ids (sorted)."""
        known = set(known_trial_ids)
        with self._lock:
            lost = sorted(t for t, e in self._runs.items() if t not in known and not will_not_run_again(e))
            for trial_id in lost:
                self._runs[trial_id]["status"] = TrialStatus.LOST.value
            self.dirty = True
        return lost

    # ----- the writer --------------------------------------------------------------------------------
    def touch(self, trial_id: str) -> None:
        """The trial has an entry (``running`` when new)."""
        with self._lock:
            self._entry(trial_id)

    def record_start(self, trial_id: str, params: Mapping[str, Any]) -> None:
        with self._lock:
            self._entry(trial_id)["params"] = dict(params)
            self.dirty = True

    def record_result(self, trial_id: str, epoch: int, metrics: Mapping[str, float]) -> None:
        with self._lock:
            entry = self._entry(trial_id)
            if not entry.get("epochs"):
                self.dirty = True  # the trial's first result: it is under way
            self._progressed = True
            entry["epochs"] = max(int(entry.get("epochs") or 0), epoch)
            for key in SCORES:
                if key in metrics:
                    entry[key] = metrics[key]

    def set_run_id(self, trial_id: str, run_id: str) -> None:
        with self._lock:
            self._entry(trial_id)["run_id"] = run_id
            self.dirty = True

    def run_id(self, trial_id: str) -> str | None:
        with self._lock:
            entry = self._runs.get(trial_id)
            return entry.get("run_id") if entry else None

    def status(self, trial_id: str) -> str | None:
        with self._lock:
            entry = self._runs.get(trial_id)
            return entry.get("status") if entry else None

    def new_and_saved(self, trial_id: str) -> bool:
        """No earlier run of the sweep knew the trial, and the file on disk has it now. Child runs are made
        only after this (:class:`~losstune.search.tracking.child_runs.ChildRuns`), so such a trial has none
        yet, in this or any earlier driver of the sweep (whose file would have named it)."""
        with self._lock:
            return trial_id in self._new_saved

    def due(self) -> bool:
        """A save is due: :attr:`dirty`, or epochs / scores changed and the last save is older than
        :data:`PROGRESS_SAVE_S`."""
        return self.dirty or (self._progressed and time.monotonic() - self._saved_at >= PROGRESS_SAVE_S)

    def save(self) -> None:
        """Write the file (atomically); when it cannot be written, a warning, and the next save tries again."""
        with self._lock:
            self.dirty = self._progressed = False
            self._saved_at = time.monotonic()
            data = {k: dict(v) for k, v in self._runs.items()}
            new = self._new.intersection(data)
        try:
            write_json_atomic(self.path, data)
        except OSError as err:
            self.dirty = True
            logger.warning("cannot write %s: %s", self.path, err)
            return
        with self._lock:
            self._new_saved.update(new & self._new)

    # ----- reading -----------------------------------------------------------------------------------
    def runs(self) -> dict[str, dict[str, Any]]:
        """A copy of every entry."""
        with self._lock:
            return {k: dict(v) for k, v in self._runs.items()}

    def statuses(self) -> dict[str, str]:
        """trial id -> status word."""
        with self._lock:
            return {k: v.get("status", TrialStatus.RUNNING.value) for k, v in self._runs.items()}
