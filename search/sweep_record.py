"""What one run of a sweep (its start or a ``--resume``) keeps while the runner's phases pass it on.

* :class:`SweepRecord`: ``sweep.json``, the sweep folder's own account of its sweep (written by the runner;
  read back by :mod:`search.trials` as ``SweepResults.info``, ``losstune ls``, the verification and ``--resume``).
* :class:`SweepRun`: the run's context: the sweep, its folder, its record, how to print, Ctrl-C, the parent run.
* :class:`SweepOutcome`: what :func:`search.runner.run_sweep` returns.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from losstune.search.tracking import write_json_atomic

SWEEP_FILE = "sweep.json"

if TYPE_CHECKING:
    from losstune.search.config import Sweep
    from losstune.search.tracking import SweepTracker
    from losstune.search.trials import SweepResults


def now() -> str:
    """The time as sweep.json records it (UTC, ISO 8601, seconds)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class SweepRecord:
    """``sweep.json``. Every field is written once the sweep is set up, except the optional ones
    (:attr:`OPTIONAL`), which are written only when they are not None. Keys this version does not
    know (written by another losstune version) are kept in :attr:`unknown` and written back unchanged."""

    name: str | None = None
    status: str | None = None  # running | finished | interrupted | failed
    config_path: str | None = None  # the config file the sweep was started from (absolute)
    sweep_config: str | None = None  # the effective config in the sweep folder (sweep.yaml)
    tune_dir: str | None = None  # Tune's experiment folder (a path or a URI)
    storage_path: str | None = None
    tracking_uri: str | None = None  # None: MLflow off
    experiment: str | None = None
    objective: dict[str, Any] | None = None
    max_epochs: int | None = None
    params: list[str] = field(default_factory=list)  # the searched parameters
    num_samples: int | None = None
    optuna_storage: str | None = None
    optuna_study: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    resumed_at: str | None = None  # the last --resume
    overrides: dict[str, Any] | None = None  # the KEY=VALUE overrides the sweep was started with
    parent_run_id: str | None = None
    experiment_id: str | None = None
    error: str | None = None  # why the sweep failed
    tracking: dict[str, Any] | None = None  # the tracking callback's counters at the end
    unknown: dict[str, Any] = field(default_factory=dict)

    OPTIONAL = ("resumed_at", "overrides", "parent_run_id", "experiment_id", "error", "tracking")

    @classmethod
    def read(cls, sweep_dir: Path) -> SweepRecord:
        """``<sweep_dir>/sweep.json`` (raises ``OSError`` / ``ValueError`` when missing or unreadable)."""
        return cls.from_json(json.loads((Path(sweep_dir) / SWEEP_FILE).read_text()))

    @classmethod
    def from_json(cls, data: Any) -> SweepRecord:
        """The record of a parsed ``sweep.json`` (``ValueError`` when it is not a JSON object)."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"unknown"}
        return cls(**{k: v for k, v in data.items() if k in names},
                   unknown={k: v for k, v in data.items() if k not in names})

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "unknown"}
        for name in self.OPTIONAL:
            if data[name] is None:
                del data[name]
        return {**self.unknown, **data}

    def write(self, sweep_dir: Path) -> None:
        """Write ``sweep.json`` (atomically), stamped ``updated_at``."""
        self.updated_at = now()
        write_json_atomic(Path(sweep_dir) / SWEEP_FILE, self.to_json())


@dataclass
class SweepRun:
    """One run of a sweep as the runner's phases share it (see :mod:`search.runner`)."""

    sweep: Sweep
    sweep_dir: Path
    record: SweepRecord
    resume: bool
    tracking_uri: str | None  # None: MLflow off
    out: Callable[[str], None]
    flush_timeout: float  # seconds to keep retrying pending MLflow writes at the end
    ctrl_c: threading.Event | None = None  # set by a first Ctrl-C before Tune takes SIGINT over
    tracker: SweepTracker | None = None  # the MLflow parent run, once started

    def stop_if_requested(self) -> None:
        """A safe point of the set-up: raise KeyboardInterrupt if Ctrl-C was pressed."""
        if self.ctrl_c is not None and self.ctrl_c.is_set():
            raise KeyboardInterrupt

    def write_record(self) -> None:
        self.record.write(self.sweep_dir)


@dataclass
class SweepOutcome:
    """How a run of a sweep ended, with what it left: results, exported configs, tracking counters."""

    sweep_dir: Path
    status: str  # finished | interrupted | failed
    results: SweepResults | None = None
    exported: list[Path] = field(default_factory=list)
    parent_run_id: str | None = None
    tracking_stats: dict[str, Any] = field(default_factory=dict)
    result_grid: Any = None
    verification: Any = None  # search.verify.VerifyOutcome when the config's verify: section ran
