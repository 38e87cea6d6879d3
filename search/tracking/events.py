"""What the Tune hooks tell the writer thread: one small class per kind of event.

The hooks run in Tune's driver loop, so an event only holds references to what the hook was given
(the result dict is not copied) and is made with slotted ``__init__`` — a few hundred ns each.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Mapping

from losstune.search.status import TrialStatus


@dataclass(slots=True)
class TrialStarted:
    trial_id: str
    config: Mapping[str, Any]  # Tune's config of the trial (decoded into the child run's params)
    name: str                  # the child run's name


@dataclass(slots=True)
class TrialResult:
    trial_id: str
    step: int | None             # Tune's training_iteration (the result's epoch when missing)
    result: Mapping[str, Any]    # the result as Tune reported it
    timestamp_ms: int


@dataclass(slots=True)
class TrialEnded:
    trial_id: str
    status: TrialStatus


@dataclass(slots=True)
class CheckpointFiles:
    """The small files of a checkpoint, read in the hook (Tune may delete the folder before the writer runs)."""
    trial_id: str
    step: int
    files: Mapping[str, bytes]  # file name -> content
    timestamp_ms: int


@dataclass(slots=True)
class TrialRecovered:
    """Tune restarts the trial after a failure (in the same child run)."""
    trial_id: str


@dataclass(slots=True)
class TrialMarked:
    """The driver marked a trial that will not go on in this run of the sweep (interrupted or lost)."""
    trial_id: str
    status: TrialStatus


@dataclass(slots=True)
class Flush:
    """Write what is pending now; ``done`` (if any) is set once nothing is pending."""
    done: threading.Event | None = None


@dataclass(slots=True)
class Stop:
    """Write what is pending (retrying until the writer's deadline), then end the thread."""


TrialEvent = TrialStarted | TrialResult | TrialEnded | CheckpointFiles | TrialRecovered | TrialMarked
Event = TrialEvent | Flush | Stop
