"""Run a sweep: Ray Tune (ASHA or FIFO) + Optuna (TPE / random / NSGA-II) + MLflow tracking.

Layout of ``<results_dir>/<name>/`` (the sweep folder, also Tune's experiment folder unless
``ray.storage_path`` puts Tune's part on shared storage):

    sweep.json        name, status, config path, parent MLflow run id, Tune folder ...
    sweep.yaml        the effective sweep config (after CLI overrides); --resume reads this one
    optuna.journal    the Optuna study (losstune.search.study.load_study(<sweep dir>); Optuna's journal format)
    mlflow_runs.json  trial id -> MLflow child run id, status, epochs
    trial_<id>/       Tune's trial folders (result.json, params.json, checkpoint_*/)
    trials.csv        one row per trial;  pareto.csv  the non-dominated trials (pareto objective)
    best.yaml         the best trial as a training config (``losstune train best.yaml``)

Multi-node: every node must reach Tune's storage (``ray.storage_path`` / ``results_dir``): a shared
file system or ``s3://...`` (checkpoints of trials on other nodes are written there). On one machine
running several Ray nodes, a local path works.

:func:`run_sweep` runs in phases, each in its own module, passing one :class:`~search.sweep_record.SweepRun`:

1. prepare (here): the sweep to run (a free name, or the saved config of the sweep being resumed), its
   ``sweep.json`` record, the tracking store checked; then Ray joined or started (:mod:`search.ray_session`);
2. set-up (:mod:`search.sweep_setup`): the folder, ``sweep.yaml``, ``sweep.json``, the MLflow parent run;
3. build or restore, then fit (:mod:`search.tuner`): the ``tune.Tuner``, run to its end;
4. finish (:mod:`search.sweep_finish`): reports, best config, summary, the parent run closed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from losstune.search.config import Sweep, SweepConfigError, load_sweep
from losstune.search.interrupts import CTRL_C_NOTICE, first_ctrl_c_sets_event
from losstune.search.ray_session import RaySession, RayTokenRefused
from losstune.search.status import TrialStatus
from losstune.search.sweep_finish import end_parent_run, finish, record_failure
from losstune.search.sweep_record import SweepOutcome, SweepRecord, SweepRun
from losstune.search.sweep_setup import set_up_sweep
from losstune.search.tracking import TrackingUnavailable, check_tracking, set_retry_defaults
from losstune.search.trials import SWEEP_CONFIG, SWEEP_FILE
from losstune.search.tune_state import TuneStateDamaged
from losstune.search.tuner import build_or_restore, fit

__all__ = ["run_sweep", "SweepOutcome", "SweepInputError", "SweepRuntimeError", "RayTokenRefused", "choose_name",
           "sweep_to_resume", "prepare", "run_prepared", "RESUME_WITH_OVERRIDES"]

RESUME_WITH_OVERRIDES = ("KEY=VALUE overrides cannot change a sweep being resumed (--resume continues it as "
                         "it was started); start a new sweep with them instead")


class SweepInputError(ValueError):
    """Bad input discovered before anything starts (exit code 2)."""


class SweepRuntimeError(RuntimeError):
    """The sweep ran but failed (exit code 1)."""


def _name_taken(sweep: Sweep) -> bool:
    """A results folder, or (local ``ray.storage_path`` elsewhere) a Tune folder, of that name exists."""
    if sweep.sweep_dir.exists():
        return True
    return "://" not in sweep.storage_path and (Path(sweep.storage_path) / sweep.name).exists()


def choose_name(sweep: Sweep, new_name_if_taken: bool = True, out: Callable[[str], None] = print) -> Sweep:
    """The sweep under a name whose results folder is free.

    A taken name (an earlier run of the same config) becomes ``NAME-2``, ``NAME-3``, ... (printed, with
    the command that continues the earlier one) when ``new_name_if_taken``; otherwise (a name the user
    chose with ``--name``) :class:`SweepInputError` names both ways on: ``--resume`` or a free name.
    """
    if not _name_taken(sweep):
        return sweep
    n = 2
    while _name_taken(candidate := sweep.renamed(f"{sweep.name}-{n}")):
        n += 1
    if not new_name_if_taken:
        raise SweepInputError(f"{sweep.sweep_dir} already exists: continue it with "
                              f"`losstune sweep --resume {sweep.sweep_dir}`, or start a new sweep with "
                              f"--name {candidate.name} (free)")
    out(f"[losstune] {sweep.sweep_dir} exists (continue it with: losstune sweep --resume {sweep.sweep_dir}); "
        f"this sweep is {candidate.name!r}")
    return candidate


def sweep_to_resume(sweep_dir: Path) -> Sweep:
    """The sweep of the folder ``sweep_dir`` as it was started (its ``sweep.yaml``); :class:`SweepInputError`
    where there is nothing to resume."""
    if not (sweep_dir / SWEEP_FILE).is_file():
        raise SweepInputError(f"{sweep_dir}: nothing to resume (no {SWEEP_FILE}); start it without --resume")
    try:
        return load_sweep(sweep_dir / SWEEP_CONFIG, deep=False, check_paths=False)
    except SweepConfigError as err:
        raise SweepInputError(f"cannot resume: {err}") from None


def _comparable(sweep: Sweep) -> dict[str, Any]:
    """What a --resume must not silently change (paths and addresses may differ)."""
    return sweep.file.model_dump(exclude={"results_dir", "mlflow", "ray"})


def _flush_timeout(value: float | None = None) -> float:
    """Seconds to keep retrying pending MLflow writes at the end: ``value``, else
    $LOSSTUNE_MLFLOW_FLUSH_TIMEOUT, else 30."""
    if value is not None:
        return value
    try:
        return float(os.environ.get("LOSSTUNE_MLFLOW_FLUSH_TIMEOUT", "30"))
    except ValueError:
        return 30.0


def prepare(sweep: Sweep, *, resume: bool = False, out: Callable[[str], None] = print,
            flush_timeout: float | None = None, new_name_if_taken: bool = True) -> SweepRun:
    """The run's first phase, before anything starts or is written: the sweep under a free name (or, with
    ``resume``, as it was started, with its ``sweep.json``), and the tracking store checked.
    Raises :class:`SweepInputError`."""
    sweep_dir = sweep.sweep_dir
    if resume and sweep.overrides:
        raise SweepInputError(RESUME_WITH_OVERRIDES)
    if resume:
        resumed = sweep_to_resume(sweep_dir)
        if _comparable(resumed) != _comparable(sweep):
            out(f"[losstune] --resume continues the sweep as it was started ({sweep_dir / SWEEP_CONFIG}); "
                "changes in the given config are ignored")
        sweep, record = resumed, SweepRecord.read(sweep_dir)
    else:
        sweep = choose_name(sweep, new_name_if_taken, out)
        sweep_dir = sweep.sweep_dir
        record = SweepRecord(overrides=sweep.overrides or None)

    uri = sweep.tracking_uri if sweep.file.mlflow.enabled else None
    if uri:
        try:
            check_tracking(uri)
        except TrackingUnavailable as err:
            raise SweepInputError(str(err)) from None
        set_retry_defaults()
    return SweepRun(sweep, sweep_dir, record, resume, uri, out, _flush_timeout(flush_timeout))


def open_ray(sweep: Sweep, address: str | None = None) -> RaySession:
    """Ray for the sweep (see :class:`~search.ray_session.RaySession`); :class:`SweepInputError` when the
    cluster refuses this driver or Ray cannot start or be reached."""
    try:
        return RaySession.open(sweep, address)
    except RayTokenRefused as err:  # the cluster wants a token this driver lacks
        raise SweepInputError(f"Ray: {err}") from None
    except Exception as err:  # noqa: BLE001 - e.g. no cluster at the address
        where = address or sweep.file.ray.address or os.environ.get("RAY_ADDRESS") or "a local Ray"
        raise SweepInputError(f"Ray: cannot start or connect to {where}: {type(err).__name__}: {err}") from None


def run_sweep(sweep: Sweep, *, resume: bool = False, address: str | None = None,
              out: Callable[[str], None] = print, flush_timeout: float | None = None,
              new_name_if_taken: bool = True) -> SweepOutcome:
    """Run (or, with ``resume``, continue) a sweep to the end; see the module docstring for the outputs.

    A new sweep whose name is taken runs as ``NAME-2``, ``NAME-3`` ... (see :func:`choose_name`;
    ``new_name_if_taken=False`` refuses instead). Raises :class:`SweepInputError` (name taken and no new
    name wanted / nothing to resume / tracking unreachable) before anything starts,
    :class:`SweepRuntimeError` when the sweep cannot run.
    """
    run = prepare(sweep, resume=resume, out=out, flush_timeout=flush_timeout, new_name_if_taken=new_name_if_taken)
    # until Tune takes SIGINT over (in fit), the set-up stops at safe points: after Ray started, at the end of
    # the set-up, just before Tune starts
    with first_ctrl_c_sets_event(CTRL_C_NOTICE) as ctrl_c:
        run.ctrl_c = ctrl_c
        with open_ray(run.sweep, address):
            run.stop_if_requested()
            check_resources(run.sweep, address, out)
            return run_prepared(run)


def check_resources(sweep: Sweep, address: str | None, out: Callable[[str], None]) -> None:
    """A trial that can never be scheduled would leave Tune waiting forever: refuse it up front (a local
    Ray: :class:`SweepInputError`), or warn (a cluster may still grow)."""
    import ray
    total = ray.cluster_resources()
    res = sweep.resources
    missing = [f"{name} {need:g} > {total.get(key, 0):g}" for name, key, need in
               (("cpu", "CPU", res.cpu), ("gpu", "GPU", res.gpu)) if need > total.get(key, 0)]
    if not missing:
        return
    msg = f"resources: a trial asks for more than the Ray cluster has ({', '.join(missing)})"
    if address or sweep.file.ray.address or os.environ.get("RAY_ADDRESS"):
        out(f"[losstune] warning: {msg}; trials wait until the cluster grows")
    else:
        raise SweepInputError(msg)


def run_prepared(run: SweepRun) -> SweepOutcome:
    """The phases after :func:`prepare`, with Ray running: set-up, build or restore, fit, finish.

    Raises :class:`SweepRuntimeError` when the set-up or Tune fails, :class:`SweepInputError` when Tune's
    saved state cannot be resumed, KeyboardInterrupt for a Ctrl-C during the set-up (nothing left of it).
    """
    try:
        set_up_sweep(run)
    except Exception as err:  # nothing ran (and set_up_sweep undid its part); a KeyboardInterrupt goes up as is
        raise SweepRuntimeError(f"cannot set up the sweep: {type(err).__name__}: {err}") from err

    grid, callback = None, None
    try:
        tuner, callback = build_or_restore(run)
        grid = fit(run, tuner)
    except KeyboardInterrupt:
        run.out("[losstune] interrupted")
    except TuneStateDamaged as err:  # nothing ran: the sweep stays as the killed run left it
        end_parent_run(run, TrialStatus.INTERRUPTED)
        raise SweepInputError(str(err)) from None
    except Exception as err:
        record_failure(run, err)
        raise SweepRuntimeError(f"the sweep failed: {type(err).__name__}: {err}") from err
    return finish(run, grid, callback)
