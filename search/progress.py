"""What a sweep prints while it runs: two ``ray.tune.Callback`` classes (Tune's own tables are switched off).

:class:`ProgressCallback`: one line per trial start and end. :class:`SweepStatus`, a compact live status line:

    [losstune] 3/8 done (2 finished, 1 stopped, 0 diverged) · 2 running · best composite 0.5514 (dc66737a) · ETA ~1m10s

Printed at most every ``interval`` seconds (``$LOSSTUNE_PROGRESS_INTERVAL``, default 10; ``0`` turns the
line off) when the counts or the best score changed, else once a minute; once more when the sweep ends. The ETA
is the mean wall time of the trials that ended × the trials left ÷ the trials running at once (before
the first trial ends: the running trials' mean epoch time × the epochs left). Each hook only does a few
comparisons unless a line is due, so the driver's loop stays fast.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable, Iterable

from ray import tune

from losstune.search.formatting import format_duration, format_value
from losstune.search.status import TrialStatus

DEFAULT_INTERVAL = 10.0
QUIET_REPRINT_S = 60.0
# what the status line counts
COUNTED = (TrialStatus.RUNNING, TrialStatus.PENDING, TrialStatus.FINISHED, TrialStatus.STOPPED_EARLY,
           TrialStatus.DIVERGED, TrialStatus.FAILED, TrialStatus.INTERRUPTED)


class ProgressCallback(tune.Callback):
    """One line per trial start / end on stdout."""

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


def progress_interval(default: float = DEFAULT_INTERVAL) -> float:
    try:
        return max(0.0, float(os.environ.get("LOSSTUNE_PROGRESS_INTERVAL", default)))
    except ValueError:
        return default


def classify(trial, max_epochs: int) -> TrialStatus:
    """How a Tune trial stands: pending, running, failed, or (terminated) as :meth:`TrialStatus.of_completed`."""
    status = getattr(trial, "status", "PENDING")
    if status == "ERROR":
        return TrialStatus.FAILED
    if status == "TERMINATED":
        return TrialStatus.of_completed(getattr(trial, "last_result", None), max_epochs)
    if status in ("RUNNING", "PAUSED"):
        return TrialStatus.RUNNING
    return TrialStatus.PENDING


class SweepStatus(tune.Callback):
    """Prints the status line; see the module docstring."""

    def __init__(self, total: int, max_epochs: int, max_concurrent: int | None = None,
                 interval: float | None = None, out: Callable[[str], None] | None = None):
        self.total = int(total)
        self.max_epochs = int(max_epochs)
        self.max_concurrent = max_concurrent
        self.interval = progress_interval() if interval is None else float(interval)
        self.out = out
        self._init_runtime()

    def __getstate__(self) -> dict:  # Tune pickles callbacks (tuner.pkl); the printer is process-local
        return {k: self.__dict__[k] for k in ("total", "max_epochs", "max_concurrent", "interval")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.out = None
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._started = time.monotonic()
        self._last_print = -math.inf
        self._last_line = ""
        self._last_key: Any = None
        self._best: tuple[float, str] | None = None
        self._ended_times: dict[str, float] = {}
        self._live: set[str] = set()       # trials this process saw running
        self._completed: set[str] = set()  # ... and that Tune then completed (ended, stopped or failed)
        self.lines = 0

    # ----- hooks ----------------------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        self._live.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._live.add(trial.trial_id)
        score = result.get("composite")
        if isinstance(score, (int, float)) and math.isfinite(score) and float(result.get("diverged") or 0) < 1:
            if self._best is None or score > self._best[0]:
                self._best = (float(score), trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._completed.add(trial.trial_id)
        self._ended(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._completed.add(trial.trial_id)
        self._ended(trial)

    def on_step_end(self, iteration, trials, **info):
        if self.interval <= 0:
            return
        now = time.monotonic()
        if now - self._last_print < self.interval:
            return
        trials = list(trials)
        key = (tuple(sorted(self.counts(trials).items())), self._best)
        if key != self._last_key or now - self._last_print >= QUIET_REPRINT_S:
            self._emit(self.status_line(trials))
            self._last_key = key
            self._last_print = now

    def on_experiment_end(self, trials, **info):
        if self.interval > 0:
            self._emit(self.status_line(trials, final=True))

    # ----- the line ----------------------------------------------------------------------------------
    def _ended(self, trial) -> None:
        last = getattr(trial, "last_result", None) or {}
        t = last.get("time_total_s")
        if isinstance(t, (int, float)) and math.isfinite(t):
            self._ended_times[trial.trial_id] = float(t)

    def counts(self, trials: Iterable[Any]) -> dict[TrialStatus, int]:
        counts = dict.fromkeys(COUNTED, 0)
        for t in trials:
            kind = classify(t, self.max_epochs)
            # Ctrl-C: Tune terminates the running (or starting) trials without completing them; --resume
            # continues them. A trial completed in an earlier run of the sweep was never seen running here.
            if kind in (TrialStatus.FINISHED, TrialStatus.STOPPED_EARLY) and t.trial_id not in self._completed and (
                    t.trial_id in self._live or not (getattr(t, "last_result", None) or {}).get("training_iteration")):
                kind = TrialStatus.INTERRUPTED
            counts[kind] += 1
        return counts

    def eta(self, trials: list, counts: dict[TrialStatus, int]) -> float | None:
        ended = sum(n for status, n in counts.items() if status.ended)
        left = max(0, self.total - ended)
        if left == 0:
            return 0.0
        parallel = max(1, counts[TrialStatus.RUNNING], min(self.max_concurrent or 1, left))
        if self._ended_times:
            mean = sum(self._ended_times.values()) / len(self._ended_times)
            # the running ones are partly done: count their remaining share
            running_left = 0.0
            for t in trials:
                if classify(t, self.max_epochs) is TrialStatus.RUNNING:
                    done = float((getattr(t, "last_result", None) or {}).get("time_total_s") or 0.0)
                    running_left += max(0.0, mean - done)
            queued = max(0, left - counts[TrialStatus.RUNNING])
            return (running_left + queued * mean) / parallel
        # nothing ended yet: per-epoch time of the running trials
        per_epoch, epochs_done = [], []
        for t in trials:
            last = getattr(t, "last_result", None) or {}
            iters = int(last.get("training_iteration") or 0)
            if classify(t, self.max_epochs) is TrialStatus.RUNNING and iters > 0:
                per_epoch.append(float(last.get("time_total_s") or 0.0) / iters)
                epochs_done.append(iters)
        if not per_epoch:
            return None
        mean_epoch = sum(per_epoch) / len(per_epoch)
        remaining_epochs = sum(self.max_epochs - e for e in epochs_done) + (left - len(per_epoch)) * self.max_epochs
        return mean_epoch * remaining_epochs / parallel

    def status_line(self, trials, final: bool = False) -> str:
        trials = list(trials)
        c = self.counts(trials)
        ended = sum(n for status, n in c.items() if status.ended)
        always = (TrialStatus.FINISHED, TrialStatus.STOPPED_EARLY, TrialStatus.DIVERGED)
        done = [f"{c[s]} {s.label}" for s in always]
        done += [f"{c[s]} {s.label}" for s in (TrialStatus.FAILED, TrialStatus.INTERRUPTED) if c[s]]
        parts = [f"{ended}/{self.total} done ({', '.join(done)})"]
        if not final:
            running, pending = c[TrialStatus.RUNNING], c[TrialStatus.PENDING]
            parts.append(f"{running} running" + (f", {pending} pending" if pending else ""))
        if self._best is not None:
            parts.append(f"best composite {self._best[0]:.4f} ({self._best[1]})")
        elapsed = time.monotonic() - self._started
        if final:
            parts.append(f"took {format_duration(elapsed)}")
        else:
            parts.append(f"elapsed {format_duration(elapsed)}, ETA ~{format_duration(self.eta(trials, c))}")
        return "[losstune] " + " · ".join(parts)

    def _emit(self, line: str) -> None:
        self._last_line = line
        self.lines += 1
        if self.out is not None:
            self.out(line)
        else:
            print(line, file=sys.stdout, flush=True)
