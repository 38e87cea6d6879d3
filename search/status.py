"""One vocabulary for how a trial stands: the word stored (``mlflow_runs.json``, ``trials.csv``, the
``losstune.status`` tag), the MLflow run status it maps to, and the word the console prints.

A sweep and a final training end with words of the same vocabulary (finished, interrupted, failed,
diverged), mapped to MLflow the same way.

>>> TrialStatus.of_completed({"training_iteration": 2, "diverged": 0.0}, max_epochs=4)
<TrialStatus.STOPPED_EARLY: 'stopped_early'>
>>> TrialStatus.STOPPED_EARLY.run_status, TrialStatus.STOPPED_EARLY.label, TrialStatus.STOPPED_EARLY.ended
('KILLED', 'stopped', True)
>>> TrialStatus("finished") == "finished"
True
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Mapping


class TrialStatus(str, Enum):
    """How a trial stands. A ``str``: a member equals (and prints as) its stored word."""

    PENDING = "pending"              # Tune has not started it
    RUNNING = "running"
    FINISHED = "finished"            # trained every epoch
    STOPPED_EARLY = "stopped_early"  # the scheduler (ASHA) stopped it before the last epoch
    DIVERGED = "diverged"            # a NaN/inf loss ended it
    FAILED = "failed"                # it raised (retries exhausted)
    INTERRUPTED = "interrupted"      # the sweep stopped before it ended; --resume continues it
    LOST = "lost"                    # started after Tune's last snapshot, then the driver died: never run again
    UNKNOWN = "unknown"              # read back from a sweep that is still running elsewhere, or cut off

    def __str__(self) -> str:
        return self.value

    @classmethod
    def _missing_(cls, value: object) -> TrialStatus | None:
        # the training loop's word for a run its caller stopped before the last epoch
        return cls.STOPPED_EARLY if value == "stopped" else None

    @classmethod
    def of_completed(cls, last_result: Mapping[str, Any] | None, max_epochs: int) -> TrialStatus:
        """A trial that ended without raising: diverged, stopped before ``max_epochs``, or finished."""
        last = last_result or {}
        if float(last.get("diverged") or 0) >= 1:
            return cls.DIVERGED
        if int(last.get("training_iteration") or 0) < max_epochs:
            return cls.STOPPED_EARLY
        return cls.FINISHED

    @property
    def ended(self) -> bool:
        """The trial is over and counts towards ``num_samples`` (never run again, even on ``--resume``)."""
        return self in ENDED

    @property
    def run_status(self) -> str:
        """The MLflow run status of a run in this state."""
        return RUN_STATUS[self]

    @property
    def label(self) -> str:
        """The console's word."""
        return "stopped" if self is TrialStatus.STOPPED_EARLY else self.value


ENDED = frozenset({TrialStatus.FINISHED, TrialStatus.STOPPED_EARLY, TrialStatus.DIVERGED, TrialStatus.FAILED})
RUN_STATUS = {
    TrialStatus.PENDING: "SCHEDULED",
    TrialStatus.RUNNING: "RUNNING",
    TrialStatus.FINISHED: "FINISHED",
    TrialStatus.STOPPED_EARLY: "KILLED",
    TrialStatus.DIVERGED: "FAILED",
    TrialStatus.FAILED: "FAILED",
    TrialStatus.INTERRUPTED: "KILLED",
    TrialStatus.LOST: "KILLED",
    TrialStatus.UNKNOWN: "KILLED",
}
