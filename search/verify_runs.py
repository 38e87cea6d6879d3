"""Train a verification's planned runs as Ray Tune trials and read their results back from disk.

The runs train through :func:`search.trainable.make_trainable` (the sweep's trainable: same resources,
cluster, checkpointing and fault tolerance). Each ``losstune verify`` call that has runs to train starts a
new Tune experiment, ``<tune_dir>/verify/round_<n>``, holding only the runs no earlier round finished. A
round stopped by Ctrl-C or a killed driver is continued by the next call like a sweep's ``--resume``:
Tune restores it, its runs go on from their last checkpoints in the same MLflow child runs. Each run is an
MLflow child run of the sweep's parent run tagged ``stage: verify``; its trial folder is ``<key>_<trial id>``
(the key is the run's config hash and seed).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from losstune.search.status import TrialStatus
from losstune.search.tracking import STAGE_TAG, numeric_metrics, read_runs_file
from losstune.search.trials import fs_and_path, read_results, read_text
from losstune.search.verify_plan import PlannedRun
from losstune.trainables.terms import shaping_weight_names

ROUND_RE = re.compile(r"^round_(\d+)$")
CONFIGS_FILE = "configs.json"  # key -> training config of every run of a round (what a restore trains)
VERIFY_STAGE = "verify"


def tune_root(sweep_dir: Path, tune_dir: str | None) -> str:
    """Where the verification's Tune experiments live: beside the sweep's trials (``tune_dir``, else the sweep
    folder), on the same storage."""
    return f"{str(tune_dir or sweep_dir).rstrip('/')}/verify"


def round_names(root: str) -> list[str]:
    import pyarrow.fs as pafs
    fs, base = fs_and_path(root)
    entries = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    rounds = [e.base_name for e in entries if e.type == pafs.FileType.Directory and ROUND_RE.match(e.base_name)]
    return sorted(rounds, key=lambda n: int(ROUND_RE.match(n).group(1)))


def finished_runs(root: str, local_root: Path, epochs: int) -> dict[str, dict[str, Any]]:
    """key -> the finished run (all ``epochs`` trained, or diverged): its last epoch's ``metrics``, ``round``,
    ``trial_id``, ``path`` and MLflow ``run_id``. The newest round wins where a key finished twice."""
    import pyarrow.fs as pafs
    fs, base = fs_and_path(root)
    found: dict[str, dict[str, Any]] = {}
    for name in round_names(root):
        runs_file = read_runs_file(local_root / name)
        for entry in fs.get_file_info(pafs.FileSelector(f"{base}/{name}", allow_not_found=True)):
            if entry.type != pafs.FileType.Directory:
                continue
            params = read_text(fs, f"{entry.path}/params.json")
            last = (read_results(read_text(fs, f"{entry.path}/result.json")) or [None])[-1]
            try:
                key = json.loads(params)["run"] if params else None
            except (ValueError, KeyError, TypeError):
                key = None
            if key is None or last is None:
                continue
            diverged = float(last.get("diverged") or 0) >= 1
            if int(last.get("training_iteration") or 0) < epochs and not diverged:
                continue
            trial_id = str(last.get("trial_id") or "")
            found[key] = {"key": key, "metrics": numeric_metrics(last), "diverged": diverged, "round": name,
                          "trial_id": trial_id, "path": entry.path,
                          "run_id": (runs_file.get(trial_id) or {}).get("run_id")}
    return found


def next_round(root: str) -> str:
    rounds = round_names(root)
    return f"round_{int(ROUND_RE.match(rounds[-1]).group(1)) + 1 if rounds else 1}"


def run_dirname(trial) -> str:
    return f"{trial.config.get('run', 'run')}_{trial.trial_id}"


def describe_run(runs: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any]) -> dict[str, Any]:
    """A Tune trial's config ({"run": key}) -> what its MLflow child run and progress line show."""
    return dict(runs.get(config.get("run"), {"run": config.get("run")}))


def make_verify_trainable(configs: Mapping[str, Mapping[str, Any]], cpus: float | None, cwd: str | None = None
                          ) -> Callable[[dict], None]:
    """One function trainable for every planned run: it trains ``configs[config["run"]]`` with the sweep's
    trainable (a search space of no parameters over the run's full config)."""
    from losstune.search.trainable import make_trainable
    trainables = {key: make_trainable(config, {}, cpus, cwd) for key, config in configs.items()}

    def losstune_verify_run(config: dict) -> None:
        trainables[config["run"]]({})

    return losstune_verify_run


def resumable_round(root: str, local_root: Path, finished: set[str]) -> str | None:
    """The newest round when it stopped before all its runs finished (Ctrl-C, a killed driver) and Tune can
    restore it: continuing it resumes its runs from their last checkpoints, in the same MLflow child runs."""
    from ray import tune
    rounds = round_names(root)
    if not rounds:
        return None
    configs = read_round_configs(local_root / rounds[-1])
    if not configs or set(configs) <= finished or not tune.Tuner.can_restore(f"{root}/{rounds[-1]}"):
        return None
    return rounds[-1]


def read_round_configs(local_dir: Path) -> dict[str, dict[str, Any]]:
    try:
        return json.loads((local_dir / CONFIGS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def train_round(runs: Sequence[PlannedRun], *, root: str, local_root: Path, epochs: int, resources: Mapping[str, float],
                max_concurrent: int, tracking: Mapping[str, Any], out: Callable[[str], None],
                restore: str | None = None) -> dict[str, Any]:
    """Train ``runs`` (unique keys) as one new Tune experiment under ``root``, or continue the round ``restore``
    (its own runs, from ``configs.json``); returns ``{"round", "errors", "interrupted"}``. ``tracking``: ``uri``,
    ``experiment_id``, ``parent_run_id``, ``tags`` (None uri: MLflow off)."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from losstune.search.progress import ProgressCallback
    from losstune.search.tracking import TrackingCallback
    from losstune.search.internals import snapshot_after_last_checkpoints
    from losstune.search.tuner import LeanTrialState, tune_run_config

    name = restore or next_round(root)
    local_dir = local_root / name
    if restore:
        configs = read_round_configs(local_dir)
    else:
        local_dir.mkdir(parents=True, exist_ok=True)
        configs = {r.key: dict(r.config) for r in runs}
        (local_dir / CONFIGS_FILE).write_text(json.dumps(configs, indent=1, sort_keys=True, default=str))
    trainable = tune.with_resources(make_verify_trainable(configs, resources.get("cpu"), os.getcwd()),
                                    {"cpu": resources.get("cpu", 1.0), "gpu": resources.get("gpu", 0.0)})
    if restore:
        out(f"[losstune] verify: continuing the interrupted {root}/{name} ({len(configs)} runs)")
        snapshot_after_last_checkpoints()  # the restored RunConfig keeps the rest of tune_run_config
        tuner = tune.Tuner.restore(f"{root}/{name}", trainable=trainable, resume_unfinished=True,
                                   restart_errored=True)
        callback = TrackingCallback.for_sweep(local_dir)
    else:
        shown = {r.key: {"verify.trial_id": r.trial_id, "verify.arm": r.arm, "seed": r.seed, "lr": r.config.get("lr"),
                         "warmup_steps": r.config.get("warmup_steps"),
                         **{k: r.config.get(k) for k in shaping_weight_names(r.config)}} for r in runs}
        decode = functools.partial(describe_run, shown)
        callback = TrackingCallback(local_dir, tracking.get("uri"), tracking.get("experiment_id"),
                                    tracking.get("parent_run_id"), epochs, decode=decode,
                                    tags={**tracking.get("tags", {}), STAGE_TAG: VERIFY_STAGE},
                                    store_process=tracking.get("store_process", "auto"))
        tuner = tune.Tuner(
            trainable, param_space={"run": tune.grid_search(list(configs))},
            tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=max_concurrent,
                                        trial_dirname_creator=run_dirname, reuse_actors=True),
            run_config=tune_run_config(name, root, epochs, [
                LeanTrialState(), callback, ProgressCallback(epochs, decode, len(configs)), CSVLoggerCallback(),
                JsonLoggerCallback()]))
        out(f"[losstune] verify: {len(configs)} runs x {epochs} epochs in {root}/{name}")
    interrupted, errors = False, 0
    from losstune.search.ray_session import no_tensorboard_logger, startup_objects_frozen
    with no_tensorboard_logger(), startup_objects_frozen():
        try:
            errors = len(tuner.fit().errors)
        except KeyboardInterrupt:
            interrupted = True
    if callback is not None:
        unfinished = [t for t, s in callback.statuses().items() if not TrialStatus(s).ended]
        if unfinished:
            interrupted = True
            callback.mark_interrupted(unfinished)
        callback.close(timeout=30)
    return {"round": name, "errors": errors, "interrupted": interrupted}


def run_metrics(run: Mapping[str, Any]) -> dict[str, float]:
    """The finite metric values of a finished run (a diverged run's NaN metrics drop out of the numbers)."""
    return {k: v for k, v in run["metrics"].items() if isinstance(v, float) and math.isfinite(v)}
