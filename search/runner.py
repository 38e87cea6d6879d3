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
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from losstune.search import space as sp
from losstune.search.config import Sweep, SweepConfigError, load_sweep
from losstune.search.interrupts import first_ctrl_c_sets_event
from losstune.search.internals import RAY_AUTH_PROBE, RAY_AUTH_REFUSED, RAY_TOKEN_AUTH_LOGGER, ray_session_root
from losstune.search.status import TrialStatus
from losstune.search.tracking import (ProgressCallback, SweepTracker, TrackingCallback, TrackingUnavailable,
                             backfill_runs, best_effort, check_tracking, flatten, set_retry_defaults, write_json_atomic)
from losstune.search.study import open_storage, remove_study, study_file
from losstune.search.trials import SWEEP_CONFIG, SWEEP_FILE, ResultsError, SweepResults, format_table, load_results, \
    write_reports
from losstune.search.tune_state import TuneStateDamaged, known_trial_ids
from losstune.search.tune_state import repair as repair_tune_state

logger = logging.getLogger("losstune")


RESUME_WITH_OVERRIDES = ("KEY=VALUE overrides cannot change a sweep being resumed (--resume continues it as "
                         "it was started); start a new sweep with them instead")


class SweepInputError(ValueError):
    """Bad input discovered before anything starts (exit code 2)."""


class SweepRuntimeError(RuntimeError):
    """The sweep ran but failed (exit code 1)."""


class RayTokenRefused(RuntimeError):
    """The Ray cluster uses token authentication and refused this driver (no token, or not its token)."""


@dataclass
class SweepOutcome:
    sweep_dir: Path
    status: str  # finished | interrupted | failed
    results: SweepResults | None = None
    exported: list[Path] = field(default_factory=list)
    parent_run_id: str | None = None
    tracking_stats: dict[str, Any] = field(default_factory=dict)
    result_grid: Any = None
    verification: Any = None  # search.verify.VerifyOutcome when the config's verify: section ran


def trial_dirname(trial) -> str:
    """Short, stable trial folder names (``trial_<id>``)."""
    return f"trial_{trial.trial_id}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def decoder(sweep: Sweep) -> Callable[[dict], dict]:
    return functools.partial(sp.decode, sweep.params)


def quiet_ray() -> None:
    """losstune prints its own progress: Tune's tables and checkpoint-snapshot warnings off (env overrides)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def probe_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a ``host:port`` (or ``ray://host:port``) nobody listens on: ray.init would wait minutes."""
    import socket
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or address == "auto":
        return
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return
    except OSError as err:
        raise ConnectionError(f"nothing answers at {address} ({err})") from None


RAY_TOKEN_HINT = ("set RAY_AUTH_MODE=token and the cluster's token: RAY_AUTH_TOKEN=<`ray get-auth-token` on the "
                  "head> (or RAY_AUTH_TOKEN_PATH=<a file holding it>)")


def check_ray_token(address: str, timeout: float = 30.0) -> None:
    """A cluster with token authentication refuses a driver without its token, and ``ray.init`` then prints a
    screen of warnings: find out first, with the same environment ray.init would use, and say what to set.

    Raises :class:`RayTokenRefused` with a one-line message; any other outcome is left to ``ray.init``.
    """
    import subprocess
    import sys
    if "://" in address or address == "auto":
        return  # the Ray client (ray://) authenticates differently; "auto" is a local cluster
    try:
        proc = subprocess.run([sys.executable, "-c", RAY_AUTH_PROBE, address], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return
    if proc.returncode == RAY_AUTH_REFUSED:
        given = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
        why = "refused this driver's token" if given else "uses token authentication"
        raise RayTokenRefused(f"the cluster at {address} {why}: {RAY_TOKEN_HINT}")


@contextlib.contextmanager
def _without_ray_notices(*notices: tuple[str, Callable[[str], bool]]):
    """Drop some of Ray's log messages while the block runs: (logger name, is-the-notice(message)) pairs."""
    filters = []
    for logger_name, is_notice in notices:
        def keep(record: logging.LogRecord, is_notice=is_notice) -> bool:
            return not is_notice(record.getMessage())
        logging.getLogger(logger_name).addFilter(keep)
        filters.append((logger_name, keep))
    try:
        yield
    finally:
        for logger_name, keep in filters:
            logging.getLogger(logger_name).removeFilter(keep)


def _only_trials_without_results(message: str) -> bool:
    lines = message.splitlines()
    return lines[0].startswith("Failed to fetch metrics") and all("were not found at" in x for x in lines[1:])


# Ray 2.60 turns token authentication on for every new local cluster (good: README, Security) and says so
# with a WARNING on every sweep, which reads like something went wrong; "token authentication is disabled"
# (RAY_AUTH_MODE=disabled) still shows
_TOKEN_AUTH_NOTICE = (RAY_TOKEN_AUTH_LOGGER,
                      lambda m: m.startswith("Token authentication is enabled"))
# after Ctrl-C Tune says to resume with Tuner.restore(...); losstune prints its own --resume command instead
_TUNE_RESTORE_HINT = ("ray.tune.tune", lambda m: m.startswith("Experiment has been interrupted"))
# a Ctrl-C before a trial's first result: Tune warns it has no results (losstune's summary says so); other
# failures to read a trial's results (a damaged file) still show
_NO_RESULTS_YET = ("ray.tune.analysis.experiment_analysis", _only_trials_without_results)


CTRL_C_NOTICE = "[losstune] Ctrl-C: stopping at the next safe point (press it again to stop at once)"


def ray_address(sweep: Sweep, address: str | None = None) -> str | None:
    """The cluster to connect to (``--address`` > ray.address > $RAY_ADDRESS); None: start a local Ray."""
    address = address or sweep.file.ray.address or os.environ.get("RAY_ADDRESS") or None
    return address if address and address != "local" else None


def init_ray(sweep: Sweep, address: str | None = None) -> bool:
    """Connect to (``address`` / config / $RAY_ADDRESS) or start a local Ray; True if we started it."""
    import ray
    remote = ray_address(sweep, address)
    if remote:
        probe_address(remote)  # a dead address is an input error, whatever runs in this process
    if remote and not ray.is_initialized():
        check_ray_token(remote)
    if ray.is_initialized():  # API use inside a process that already runs Ray: use that one
        if remote:
            logger.warning("Ray is already initialised in this process; address %s is not used", remote)
        return False
    if remote:
        ray.init(address=remote, logging_level=logging.WARNING, log_to_driver=True)
    else:
        with _without_ray_notices(_TOKEN_AUTH_NOTICE):
            ray.init(num_cpus=sweep.file.ray.num_cpus, num_gpus=sweep.file.ray.num_gpus, include_dashboard=False,
                     logging_level=logging.WARNING)
    return True


def _parent_params(sweep: Sweep) -> dict[str, Any]:
    params = {f"train.{k}": v for k, v in flatten(sweep.base_train).items() if k not in sweep.params}
    params.update({f"space.{k}": v for k, v in sp.describe(sweep.params).items()})
    params.update({f"search.{k}": v for k, v in sweep.search.model_dump(exclude={"points_to_evaluate"}).items()})
    params["search.points_to_evaluate"] = len(sweep.points)
    params.update({f"scheduler.{k}": v for k, v in sweep.scheduler.model_dump().items()})
    params.update({f"objective.{k}": v for k, v in sweep.objective.model_dump().items() if v is not None})
    params.update({f"resources.{k}": v for k, v in sweep.resources.model_dump().items()})
    return params


def _comparable(sweep: Sweep) -> dict[str, Any]:
    """What a --resume must not silently change (paths and addresses may differ)."""
    return sweep.file.model_dump(exclude={"results_dir", "mlflow", "ray"})


def _write_info(sweep_dir: Path, info: dict[str, Any]) -> None:
    info["updated_at"] = _now()
    write_json_atomic(sweep_dir / SWEEP_FILE, info)


def overrides_text(overrides: dict[str, Any]) -> str:
    """KEY=VALUE overrides as one would type them (the MLflow parent run's ``losstune.overrides`` tag)."""
    def text(value: Any) -> str:
        dumped = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6)
        return dumped.strip().removesuffix("...").strip()
    return " ".join(f"{key}={text(value)}" for key, value in overrides.items())


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


def run_sweep(sweep: Sweep, *, resume: bool = False, address: str | None = None,
              out: Callable[[str], None] = print, flush_timeout: float | None = None,
              new_name_if_taken: bool = True) -> SweepOutcome:
    """Run (or, with ``resume``, continue) a sweep to the end; see the module docstring for the outputs.

    A new sweep whose name is taken runs as ``NAME-2``, ``NAME-3`` ... (see :func:`choose_name`;
    ``new_name_if_taken=False`` refuses instead). Raises :class:`SweepInputError` (name taken and no new
    name wanted / nothing to resume / tracking unreachable) before anything starts,
    :class:`SweepRuntimeError` when the sweep cannot run.
    """
    sweep_dir = sweep.sweep_dir
    info_path = sweep_dir / SWEEP_FILE
    if resume and sweep.overrides:
        raise SweepInputError(RESUME_WITH_OVERRIDES)
    if resume:
        if not info_path.is_file():
            raise SweepInputError(f"{sweep_dir}: nothing to resume (no {SWEEP_FILE}); start it without --resume")
        saved = sweep_dir / SWEEP_CONFIG
        try:
            resumed = load_sweep(saved, deep=False, check_paths=False)
        except SweepConfigError as err:
            raise SweepInputError(f"cannot resume: {err}") from None
        if _comparable(resumed) != _comparable(sweep):
            out(f"[losstune] --resume continues the sweep as it was started ({saved}); "
                "changes in the given config are ignored")
        sweep = resumed
        info = json.loads(info_path.read_text())
    else:
        sweep = choose_name(sweep, new_name_if_taken, out)
        sweep_dir = sweep.sweep_dir
        info = {"overrides": sweep.overrides} if sweep.overrides else {}

    tracking = sweep.file.mlflow.enabled
    uri = sweep.tracking_uri if tracking else None
    if tracking:
        try:
            check_tracking(uri)
        except TrackingUnavailable as err:
            raise SweepInputError(str(err)) from None
        set_retry_defaults()

    quiet_ray()
    # until Tune takes SIGINT over (in fit), the set-up stops at safe points: after Ray started, at the end of
    # the set-up, just before Tune starts
    with first_ctrl_c_sets_event(CTRL_C_NOTICE) as ctrl_c:
        try:
            started_ray = init_ray(sweep, address)
        except RayTokenRefused as err:  # the cluster wants a token this driver lacks
            raise SweepInputError(f"Ray: {err}") from None
        except Exception as err:  # noqa: BLE001 - e.g. no cluster at the address
            where = address or sweep.file.ray.address or os.environ.get("RAY_ADDRESS") or "a local Ray"
            raise SweepInputError(f"Ray: cannot start or connect to {where}: {type(err).__name__}: {err}") from None
        watchdog = start_watchdog() if started_ray else None
        try:
            _stop_if_requested(ctrl_c)
            _check_resources(sweep, address, out)
            return _run_started(sweep, sweep_dir, info, resume, uri, tracking, out, flush_timeout, ctrl_c)
        finally:
            if started_ray:
                import ray
                ray.shutdown()
            if watchdog is not None:
                stop_watchdog(watchdog)


# A local Ray started by the driver must not outlive it. Ray's head processes share the driver's fate,
# but its agents (dashboard / runtime-env agent) wait up to a minute on the dead GCS before they exit
# when the driver is SIGKILLed. This small watcher (a separate process, psutil from Ray's
# thirdparty_files) remembers the driver's descendants and kills them once the driver is gone.
_WATCHDOG = r"""
import os, sys, time
sys.path.insert(0, sys.argv[2])
import psutil
me, known = os.getpid(), {}
try:
    driver = psutil.Process(int(sys.argv[1]))
    while driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE:
        for p in driver.children(recursive=True):
            if p.pid != me:
                known.setdefault(p.pid, p)
        time.sleep(0.5)
except psutil.Error:
    pass
targets = []
for p in known.values():
    try:
        if p.is_running():  # psutil checks the start time: a reused pid is not ours
            targets += [p] + p.children(recursive=True)
    except psutil.Error:
        pass
for p in targets:
    try:
        p.kill()
    except psutil.Error:
        pass
"""


def start_watchdog():
    """Start the watcher of this driver's local Ray processes (None where psutil is not available)."""
    import subprocess
    import sys

    import ray
    thirdparty = Path(ray.__file__).parent / "thirdparty_files"
    try:
        return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(thirdparty)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    except OSError as err:  # pragma: no cover
        logger.warning("no watchdog for the local Ray processes: %s", err)
        return None


def stop_watchdog(proc) -> None:
    """Ray was shut down normally: end the watcher we started (by its pid)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except Exception:  # noqa: BLE001
            proc.kill()


def _check_resources(sweep: Sweep, address: str | None, out: Callable[[str], None]) -> None:
    """A trial that can never be scheduled would leave Tune waiting forever: refuse it up front."""
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


def _stop_if_requested(ctrl_c: threading.Event | None) -> None:
    if ctrl_c is not None and ctrl_c.is_set():
        raise KeyboardInterrupt


def _run_started(sweep: Sweep, sweep_dir: Path, info: dict[str, Any], resume: bool, uri: str | None,
                 tracking: bool, out: Callable[[str], None], flush_timeout: float | None,
                 ctrl_c: threading.Event | None = None) -> SweepOutcome:
    created = False
    tracker: SweepTracker | None = None
    try:
        if not resume:
            sweep_dir.mkdir(parents=True, exist_ok=False)
            created = True
            saved = dict(sweep.raw, results_dir=str(sweep.results_dir))  # absolute: --resume from anywhere
            if uri:  # resolved: a resume tracks to the same place whatever the environment says then
                saved["mlflow"] = {**(saved.get("mlflow") or {}), "tracking_uri": uri, "experiment": sweep.experiment}
            (sweep_dir / SWEEP_CONFIG).write_text(
                f"# the effective sweep config of {sweep.name!r} (from {sweep.source}); --resume reads it\n"
                + yaml.safe_dump(saved, sort_keys=False, default_flow_style=None))
        tune_dir = f"{sweep.storage_path.rstrip('/')}/{sweep.name}"
        info.update({"name": sweep.name, "status": "running", "config_path": str(Path(sweep.source).resolve())
                     if sweep.source and not resume else info.get("config_path"),
                     "sweep_config": SWEEP_CONFIG, "tune_dir": tune_dir, "storage_path": sweep.storage_path,
                     "tracking_uri": uri, "experiment": sweep.experiment,
                     "objective": sweep.objective.model_dump(), "max_epochs": sweep.epochs,
                     "params": list(sweep.params), "num_samples": sweep.search.num_samples,
                     "optuna_storage": str(study_file(sweep_dir)), "optuna_study": sweep.name})
        info.setdefault("created_at", _now())
        if resume:
            info["resumed_at"] = _now()
        if tracking:
            tracker = SweepTracker(uri, sweep.experiment)
            tags = {"losstune.task": str(sweep.base_train["task"]), "losstune.sweep_dir": str(sweep_dir)}
            if info.get("overrides"):
                tags["losstune.overrides"] = overrides_text(info["overrides"])
            parent = tracker.start(sweep.name, _parent_params(sweep), tags, resume_run_id=info.get("parent_run_id"))
            info.update({"parent_run_id": parent, "experiment_id": tracker.experiment_id})
            out(f"[losstune] MLflow: experiment {sweep.experiment!r}, parent run {parent} at {uri}")
        _write_info(sweep_dir, info)
        if tracker is not None and not resume:
            tracker.log_artifact(sweep_dir / SWEEP_CONFIG)
            if sweep.source and Path(sweep.source).is_file():
                tracker.log_artifact(sweep.source, "source")
            tracker.log_text(json.dumps({"params": sp.describe(sweep.params), "fixed": sweep.fixed,
                                         "points_to_evaluate": sweep.points}, indent=1, default=str),
                             "search_space.json")
        _stop_if_requested(ctrl_c)
    except SweepInputError:
        raise
    except (Exception, KeyboardInterrupt) as err:  # nothing ran: a new sweep leaves no folder behind
        if created:
            shutil.rmtree(sweep_dir, ignore_errors=True)
        if tracker is not None and tracker.run_id:
            try:
                tracker.finish((TrialStatus.INTERRUPTED if isinstance(err, KeyboardInterrupt)
                                else TrialStatus.FAILED).run_status)
            except Exception:  # noqa: BLE001
                pass
        if isinstance(err, KeyboardInterrupt):
            raise
        raise SweepRuntimeError(f"cannot set up the sweep: {type(err).__name__}: {err}") from err

    status = "failed"
    callback: TrackingCallback | None = None
    grid = None
    try:
        grid, callback = _fit(sweep, sweep_dir, tune_dir, info, resume, uri, flush_timeout, out, ctrl_c)
    except KeyboardInterrupt:
        out("[losstune] interrupted")
    except TuneStateDamaged as err:  # nothing ran: the sweep stays as the killed run left it
        if tracker is not None:
            best_effort(lambda: tracker.finish(TrialStatus.INTERRUPTED.run_status), out)
        raise SweepInputError(str(err)) from None
    except Exception as err:
        info["status"] = "failed"
        info["error"] = f"{type(err).__name__}: {err}"
        _write_info(sweep_dir, info)
        callback = callback or TrackingCallback.for_sweep(sweep_dir)
        if callback is not None:
            callback.close(timeout=10)
        if tracker is not None:
            best_effort(lambda: tracker.finish(TrialStatus.FAILED.run_status), out)
        raise SweepRuntimeError(f"the sweep failed: {type(err).__name__}: {err}") from err

    callback = callback or TrackingCallback.for_sweep(sweep_dir)
    results = _safe_results(sweep_dir)
    unfinished = []
    if results is not None:
        statuses = callback.statuses() if callback is not None else {}
        ended = {t for t, st in statuses.items() if TrialStatus(st).ended}
        unfinished = [t for t in results.table["trial_id"] if t not in ended]
        n_ended = len(ended)
    else:
        n_ended = 0
    interrupted = n_ended < sweep.search.num_samples
    if callback is not None:
        if interrupted:
            callback.mark_interrupted(unfinished)
        stats = callback.stats()
        callback.close(timeout=_flush_timeout(flush_timeout))
        stats.update(callback.stats())
    else:
        stats = {}
    results = _safe_results(sweep_dir)
    if resume and uri and callback is not None and results is not None:
        # a SIGKILLed driver may have lost its last queued MLflow writes: fill them in from Ray's results
        counts = best_effort(lambda: backfill_runs(uri, callback.runs(), results.histories), out)
        if counts is not None:
            stats["backfilled_metrics"] = counts["metrics"]
            if counts["metrics"] or counts["statuses"]:
                out(f"[losstune] MLflow: filled in {counts['metrics']} metric values and {counts['statuses']} "
                    f"statuses lost by the interrupted run, from Ray's results")
    outcome = SweepOutcome(sweep_dir, "failed", results, [], info.get("parent_run_id"), stats, grid)

    if results is not None:
        write_reports(results)
        if not results.ranked().empty:
            from losstune.search.export import export
            outcome.exported = export(sweep_dir, results=results)
            status = "interrupted" if interrupted else "finished"
        else:
            status = "interrupted" if interrupted else "failed"
        _print_summary(results, outcome.exported, out)
    outcome.status = status
    info["status"] = status
    info["tracking"] = {k: v for k, v in stats.items()}
    _write_info(sweep_dir, info)
    if tracker is not None:
        best_effort(lambda: _finish_parent(tracker, results, outcome, status), out)
    if status == "finished" and sweep.verify is not None:
        from losstune.search.verify import verify_after_sweep
        outcome.verification = verify_after_sweep(sweep_dir, out)
    if status == "interrupted":
        out(f"[losstune] the sweep did not finish ({n_ended}/{sweep.search.num_samples} trials ended); "
            f"continue it with: losstune sweep --resume {sweep_dir}")
    return outcome


def _ray_session_root() -> Path | None:
    """The folder holding this machine's Ray session folders (``/tmp/ray`` unless Ray was told otherwise)."""
    try:
        return ray_session_root()
    except Exception:  # noqa: BLE001 - not a local node: no staging copies to look at
        return None


def _fit(sweep: Sweep, sweep_dir: Path, tune_dir: str, info: dict, resume: bool, uri: str | None,
         flush_timeout: float | None, out: Callable[[str], None], ctrl_c: threading.Event | None = None):
    from ray import tune

    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from losstune.search.algorithms import make_scheduler, make_searcher
    from losstune.search.trainable import make_trainable

    res = sweep.resources
    trainable = tune.with_resources(make_trainable(sweep.base_train, sweep.params, res.cpu),
                                    {"cpu": res.cpu, "gpu": res.gpu})
    if resume and tune.Tuner.can_restore(tune_dir):
        if "://" not in sweep.storage_path:  # a killed driver may have left a cut-off or stale state (tune_state.py)
            repaired = repair_tune_state(Path(tune_dir), sweep.name, _ray_session_root())
            if repaired is not None:
                out(f"[losstune] Tune's saved state in {tune_dir} {repaired[1]}; using the driver's last "
                    f"snapshot from {repaired[0]}")
        out(f"[losstune] resuming {sweep.name} from {tune_dir}")
        tuner = tune.Tuner.restore(tune_dir, trainable=trainable, resume_unfinished=True, restart_errored=True)
        callback = TrackingCallback.for_sweep(sweep_dir)
        if callback is not None:
            callback.parent_run_id = info.get("parent_run_id") or callback.parent_run_id
            callback.tracking_uri = uri
            callback.experiment_id = info.get("experiment_id") or callback.experiment_id
        _settle_lost_trials(sweep, sweep_dir, tune_dir, callback, out)
    else:
        if resume:  # the first run died before Tune saved anything: start over in the same folder
            remove_study(sweep_dir)
        callback = TrackingCallback(
            sweep_dir, uri, info.get("experiment_id"), info.get("parent_run_id"), sweep.epochs,
            decode=decoder(sweep), tags={"losstune.task": str(sweep.base_train["task"]),
                                         "losstune.sweep": sweep.name},
            flush_timeout=_flush_timeout(flush_timeout))
        metric, mode = sweep.metric_mode()
        single = isinstance(metric, str)
        tune_config = tune.TuneConfig(
            search_alg=make_searcher(sweep, open_storage(sweep_dir)), scheduler=make_scheduler(sweep),
            num_samples=sweep.search.num_samples, metric=metric if single else None,
            mode=mode if single else None, trial_dirname_creator=trial_dirname,
            # one worker process per concurrent slot, not per trial: starting a process and importing
            # torch costs ~1-3 s, as much as a short trial trains (benchmarks/overhead.py)
            reuse_actors=True)
        run_config = tune.RunConfig(
            name=sweep.name, storage_path=sweep.storage_path,
            failure_config=tune.FailureConfig(max_failures=2),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[callback, ProgressCallback(sweep.epochs, decoder(sweep), sweep.search.num_samples),
                       *_status_line(sweep), CSVLoggerCallback(), JsonLoggerCallback()],
            verbose=0)
        tuner = tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)
    out(f"[losstune] sweep {sweep.name}: {sweep.search.num_samples} trials x {sweep.epochs} epochs, "
        f"{sweep.search.sampler} sampler, {sweep.scheduler.type} scheduler, objective {sweep.objective.type}; "
        f"results in {sweep_dir}")
    for warning in sweep.warnings:  # e.g. a validation set too small to separate configs
        out(f"[losstune] {warning}")
    t0 = time.perf_counter()
    _stop_if_requested(ctrl_c)  # from here on Tune handles Ctrl-C (and saves its state)
    with no_tensorboard_logger(), _without_ray_notices(_TUNE_RESTORE_HINT, _NO_RESULTS_YET):
        grid = tuner.fit()
    out(f"[losstune] Tune finished in {time.perf_counter() - t0:.1f}s")
    return grid, callback


def _settle_lost_trials(sweep: Sweep, sweep_dir: Path, tune_dir: str,
                        callback: TrackingCallback | None, out: Callable[[str], None]) -> None:
    """Trials started after Tune's last snapshot died with the driver: Tune does not know them and
    will not run them again. Their entries become ``lost`` (child run KILLED) and their Optuna trials
    FAIL, so no trial hangs as running forever and the table holds only the sweep's real trials."""
    known = known_trial_ids(tune_dir)
    if known is None:  # no readable state: nothing to compare with
        return
    from losstune.search.algorithms import fail_lost_trials
    lost = callback.mark_lost(known) if callback is not None else []
    numbers = fail_lost_trials(open_storage(sweep_dir), sweep.name, known)
    if lost or numbers:
        out(f"[losstune] lost with the killed driver (started after Tune's last snapshot, not run again): "
            f"trials {', '.join(lost) or '-'}, Optuna trials {', '.join(map(str, numbers)) or '-'}; "
            f"marked lost / FAIL")


@contextlib.contextmanager
def no_tensorboard_logger():
    """Tune adds CSV, JSON and TensorBoard loggers unless told not to; losstune passes the two it reads
    (progress.csv, result.json) itself, and the TensorBoard one would only cost driver CPU."""
    key = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"
    old = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _status_line(sweep: Sweep) -> list:
    """The periodic one-line sweep status (search.progress), when that module is there."""
    try:
        from losstune.search.progress import SweepStatus
    except ImportError:  # pragma: no cover
        return []
    return [SweepStatus(total=sweep.search.num_samples, max_epochs=sweep.epochs,
                        max_concurrent=sweep.search.max_concurrent)]


def _flush_timeout(value: float | None) -> float:
    """Seconds to keep retrying pending MLflow writes at the end ($LOSSTUNE_MLFLOW_FLUSH_TIMEOUT, 30)."""
    if value is not None:
        return value
    try:
        return float(os.environ.get("LOSSTUNE_MLFLOW_FLUSH_TIMEOUT", "30"))
    except ValueError:
        return 30.0


def _safe_results(sweep_dir: Path) -> SweepResults | None:
    try:
        return load_results(sweep_dir)
    except ResultsError as err:
        logger.warning("cannot read the trials: %s", err)
        return None


def _finish_parent(tracker: SweepTracker, results: SweepResults | None, outcome: SweepOutcome,
                   status: str) -> None:
    if results is not None:
        counts = results.table["status"].value_counts().to_dict()
        metrics = {f"trials_{k}": v for k, v in counts.items()}
        ranked = results.ranked()
        tags: dict[str, Any] = {"losstune.status": status}
        if not ranked.empty:
            best = ranked.iloc[0]
            for k in ("composite", "best_composite", "ssim", "mse", "psnr", "gradient_match"):
                if best.get(k) is not None and best.get(k) == best.get(k):
                    metrics[f"best_{k}"] = float(best[k])
            tags["losstune.best_trial_id"] = best["trial_id"]
            if isinstance(best.get("run_id"), str):
                tags["losstune.best_run_id"] = best["run_id"]
        metrics.update({f"tracking_{k}": v for k, v in outcome.tracking_stats.items()
                        if isinstance(v, (int, float))})
        tracker.log_metrics(metrics)
        tracker.set_tags(tags)
        for name in ("trials.csv", "pareto.csv"):
            if (outcome.sweep_dir / name).is_file():
                tracker.log_artifact(outcome.sweep_dir / name)
    for path in outcome.exported:
        tracker.log_artifact(path)
    tracker.finish(TrialStatus(status).run_status)  # a sweep ends finished, interrupted or failed


def _print_summary(results: SweepResults, exported: list[Path], out: Callable[[str], None]) -> None:
    ranked = results.ranked()
    counts = results.table["status"].value_counts().to_dict()
    out("[losstune] trials: " + (", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none has a result yet"))
    if not ranked.empty:
        out("[losstune] top trials:\n" + format_table(ranked, max_rows=10))
    if results.is_pareto:
        front = results.pareto_front()
        out(f"[losstune] pareto front ({', '.join(f'{k} {v}' for k, v in results.objective_metrics().items())}):\n"
            + format_table(front))
        out(f"[losstune] pareto front saved to {results.sweep_dir / 'pareto.csv'}")
    if exported:
        out(f"[losstune] best config: {exported[0]}\n"
            f"[losstune] train it:    losstune train {exported[0]} --epochs N")
    out(f"[losstune] all trials:  losstune trials {results.sweep_dir}")
    out(f"[losstune] report:      losstune report {results.sweep_dir}")
    uri = results.info.get("tracking_uri")
    if uri:
        out(f"[losstune] compare them in MLflow: mlflow ui --backend-store-uri {_ui_uri(uri)}"
            if uri.startswith("sqlite:") else f"[losstune] compare them in MLflow: {uri}")


def _ui_uri(uri: str) -> str:
    """The sqlite URI as the user would type it: relative to the working directory where it lies below it."""
    path = Path(uri.removeprefix("sqlite:///"))
    try:
        return f"sqlite:///{path.resolve().relative_to(Path.cwd().resolve())}"
    except ValueError:
        return uri
