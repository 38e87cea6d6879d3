"""The runner's Tune phases: build the sweep's ``tune.Tuner`` (or, on ``--resume``, restore it), then fit it.

A new sweep: ``OptunaSearch`` (study in ``<sweep>/optuna.journal``, :mod:`search.study`) + ASHA / FIFO, ``FailureConfig(max_failures=2)``,
``reuse_actors=True``, losstune's callbacks (MLflow tracking, progress, the status line, CSV + JSON loggers).
A resume: ``Tuner.restore`` after repairing Tune's saved state where a killed driver left it damaged
(:mod:`search.tune_state`); trials the restored state does not know are settled as ``lost``.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Callable

from ray import tune

from losstune.search import space as sp
from losstune.search.config import Sweep
from losstune.search.internals import drop_metric_windows, snapshot_after_last_checkpoints
from losstune.search.progress import ProgressCallback
from losstune.search.ray_session import (NO_RESULTS_YET, TUNE_RESTORE_HINT, local_session_root, no_tensorboard_logger,
                                         startup_objects_frozen, without_ray_notices)
from losstune.search.sweep_record import SweepRun
from losstune.search.study import open_storage, remove_study
from losstune.search.tracking import TrackingCallback
from losstune.search.tune_state import known_trial_ids
from losstune.search.tune_state import repair as repair_tune_state

# Tune takes an experiment snapshot (synchronously, in the driver) as soon as one trial has checkpointed
# ``num_to_keep`` times since the last snapshot, so that the saved state never names a deleted checkpoint and a
# resume always finds the checkpoints it restores; losstune adds one after each trial's last checkpoint
# (:func:`tune_run_config`), so a resume never trains a finished trial again. Keeping 2 checkpoints per trial
# instead of 1 halves the snapshots in between (driver CPU per trial in benchmarks/overhead ~148 -> ~108 ms,
# 3 paired runs; keeping 4 gained nothing more) for one more checkpoint folder per trial on disk.
CHECKPOINTS_KEPT = 2


class LeanTrialState(tune.Callback):
    """From its start on, a trial keeps min / max / mean / last of each reported number and no last-n windows
    (:func:`search.internals.drop_metric_windows`): Tune re-writes every trial's entry at every experiment
    snapshot, and the windows, which losstune never reads, were half of that entry."""

    def on_trial_start(self, iteration, trials, trial, **info):
        drop_metric_windows(trial)


def trial_dirname(trial) -> str:
    """Short, stable trial folder names (``trial_<id>``)."""
    return f"trial_{trial.trial_id}"


def decoder(sweep: Sweep) -> Callable[[dict], dict]:
    """Optuna's sampled values -> the trial's parameter values (encoded choices decoded)."""
    return functools.partial(sp.decode, sweep.params)


def status_line(sweep: Sweep) -> list:
    """The callbacks that print the periodic one-line sweep status (a list: benchmarks add their own)."""
    from losstune.search.progress import SweepStatus
    return [SweepStatus(total=sweep.search.num_samples, max_epochs=sweep.epochs,
                        max_concurrent=sweep.search.max_concurrent)]


def build_or_restore(run: SweepRun) -> tuple[Any, TrackingCallback | None]:
    """The Tuner of ``run`` and its tracking callback (None: a restored sweep without one)."""
    from losstune.search.trainable import make_trainable

    sweep, res = run.sweep, run.sweep.resources
    trainable = tune.with_resources(make_trainable(sweep.base_train, sweep.params, res.cpu),
                                    {"cpu": res.cpu, "gpu": res.gpu})
    tune_dir = run.record.tune_dir
    if run.resume and tune.Tuner.can_restore(tune_dir):
        return _restore(run, trainable, tune_dir)
    if run.resume:  # the first run died before Tune saved anything: start over in the same folder
        remove_study(run.sweep_dir)
    return _build(run, trainable)


def _restore(run: SweepRun, trainable, tune_dir: str) -> tuple[Any, TrackingCallback | None]:
    sweep, out = run.sweep, run.out
    if "://" not in sweep.storage_path:  # a killed driver may have left a cut-off or stale state (tune_state.py)
        repaired = repair_tune_state(Path(tune_dir), sweep.name, local_session_root())
        if repaired is not None:
            out(f"[losstune] Tune's saved state in {tune_dir} {repaired[1]}; using the driver's last "
                f"snapshot from {repaired[0]}")
    out(f"[losstune] resuming {sweep.name} from {tune_dir}")
    snapshot_after_last_checkpoints()  # the restored RunConfig keeps the rest of tune_run_config
    tuner = tune.Tuner.restore(tune_dir, trainable=trainable, resume_unfinished=True, restart_errored=True)
    callback = TrackingCallback.for_sweep(run.sweep_dir)
    if callback is not None:
        callback.parent_run_id = run.record.parent_run_id or callback.parent_run_id
        callback.tracking_uri = run.tracking_uri
        callback.experiment_id = run.record.experiment_id or callback.experiment_id
    settle_lost_trials(run, tune_dir, callback)
    return tuner, callback


def _build(run: SweepRun, trainable) -> tuple[Any, TrackingCallback]:
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from losstune.search.algorithms import make_scheduler, make_searcher

    sweep = run.sweep
    callback = TrackingCallback(
        run.sweep_dir, run.tracking_uri, run.record.experiment_id, run.record.parent_run_id, sweep.epochs,
        decode=decoder(sweep), tags={"losstune.task": str(sweep.base_train["task"]), "losstune.sweep": sweep.name},
        flush_timeout=run.flush_timeout, store_process=sweep.file.mlflow.store_process)
    metric, mode = sweep.metric_mode()
    single = isinstance(metric, str)
    tune_config = tune.TuneConfig(
        search_alg=make_searcher(sweep, open_storage(run.sweep_dir)), scheduler=make_scheduler(sweep),
        num_samples=sweep.search.num_samples, metric=metric if single else None,
        mode=mode if single else None, trial_dirname_creator=trial_dirname,
        # one worker process per concurrent slot, not per trial: starting a process and importing
        # torch costs ~1-3 s, as much as a short trial trains (benchmarks/overhead.py)
        reuse_actors=True)
    run_config = tune_run_config(
        sweep.name, sweep.storage_path, sweep.epochs,
        [LeanTrialState(), callback, ProgressCallback(sweep.epochs, decoder(sweep), sweep.search.num_samples),
         *status_line(sweep), CSVLoggerCallback(), JsonLoggerCallback()])
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config), callback


def tune_run_config(name: str, storage_path: str, epochs: int, callbacks: list) -> tune.RunConfig:
    """The ``RunConfig`` of every Tune run of losstune (sweeps and verification rounds): failed trials are
    retried twice, each keeps its newest ``CHECKPOINTS_KEPT`` checkpoints, and a trial's last epoch is marked
    ``done`` by the stop criterion (as ASHA marks it at ``max_t``), so that an experiment snapshot follows
    its last checkpoint (:func:`search.internals.snapshot_after_last_checkpoints`)."""
    snapshot_after_last_checkpoints()
    return tune.RunConfig(
        name=name, storage_path=storage_path, failure_config=tune.FailureConfig(max_failures=2),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
        stop={"training_iteration": epochs}, callbacks=callbacks, verbose=0)


def settle_lost_trials(run: SweepRun, tune_dir: str, callback: TrackingCallback | None) -> None:
    """Trials started after Tune's last snapshot died with the driver: Tune does not know them and
    will not run them again. Their entries become ``lost`` (child run KILLED) and their Optuna trials
    FAIL, so no trial hangs as running forever and the table holds only the sweep's real trials."""
    known = known_trial_ids(tune_dir)
    if known is None:  # no readable state: nothing to compare with
        return
    from losstune.search.algorithms import fail_lost_trials
    lost = callback.mark_lost(known) if callback is not None else []
    numbers = fail_lost_trials(open_storage(run.sweep_dir), run.sweep.name, known)
    if lost or numbers:
        run.out(f"[losstune] lost with the killed driver (started after Tune's last snapshot, not run again): "
                f"trials {', '.join(lost) or '-'}, Optuna trials {', '.join(map(str, numbers)) or '-'}; "
                f"marked lost / FAIL")


def fit(run: SweepRun, tuner) -> Any:
    """Print what runs, then run the Tuner to its end (Tune's ``ResultGrid``); from the last Ctrl-C safe
    point of the set-up on, Tune handles Ctrl-C itself (and saves its state)."""
    sweep, out = run.sweep, run.out
    out(f"[losstune] sweep {sweep.name}: {sweep.search.num_samples} trials x {sweep.epochs} epochs, "
        f"{sweep.search.sampler} sampler, {sweep.scheduler.type} scheduler, objective {sweep.objective.type}; "
        f"results in {run.sweep_dir}")
    for warning in sweep.warnings:  # e.g. a validation set too small to separate configs
        out(f"[losstune] {warning}")
    t0 = time.perf_counter()
    run.stop_if_requested()
    with no_tensorboard_logger(), startup_objects_frozen(), without_ray_notices(TUNE_RESTORE_HINT, NO_RESULTS_YET):
        grid = tuner.fit()
    out(f"[losstune] Tune finished in {time.perf_counter() - t0:.1f}s")
    return grid
