"""Sweep overhead: how much wall time a losstune sweep adds on top of the trials' own training.

    ratio = sweep wall ÷ (Σ trial training time ÷ concurrency)

* trial training time = Σ ``epoch_time_s`` the loop reports (train + validation of every epoch); the
  trial's set-up (process, imports, ``Trainer`` construction), checkpoints, reporting, scheduling,
  Optuna and MLflow are the overhead.
* the trials: a plug-in task (``benchmarks.tasks:build``, ~ms set-up) sized so one trial trains ~2 s
  (4 epochs); 16 trials, 2 at a time (1 CPU and 1 torch thread each, a local Ray with 2 CPUs), TPE, FIFO
  scheduler (every trial runs all its epochs, so the three runners train comparable trials).
* losstune: the real CLI path (``search.cli.main(["sweep", ...])``) with MLflow on sqlite in a temp dir.
  Ray is started with the product's ``search.ray_session.init_ray`` just before, so its start-up and
  shut-down are timed separately: the ratio is reported with and without them.
* bare Ray Tune: ``tune.Tuner`` + ``OptunaSearch`` (TPE, in-memory) + ``ConcurrencyLimiter``, a function
  trainable that calls ``trainables.loop.train`` and ``tune.report``s each epoch; no checkpoints, no
  logging, Tune's defaults otherwise.
* plain Python loop: ``trainables.loop.train`` on losstune's 16 trial configs, one after the other
  (concurrency 1, no Ray).

Where the time goes, as CPU seconds (the machine's cores are all busy during a sweep, so every CPU second
spent outside training lengthens it): the driver process's CPU during the sweep (``getrusage``) for
losstune, losstune with MLflow off, and bare Ray Tune, beside the CPU of the process that does the sqlite
store's MLflow work for the driver (its start-up included; ``sweep.json``'s ``tracking.store_process_cpu_s``);
and the CPU a fresh trial process spends before its
first step (interpreter, ``ray.tune``, ``torch``, the first ``torch.optim`` optimiser), measured in a
subprocess. That start-up alone puts a floor under any runner that trains in Ray worker processes:
``1 + concurrency x start-up CPU / Σ trial training time``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks import common

NAME = "overhead"
GOAL = 1.10
DRIVER_MS_GOAL = 100.0  # issue 15: the driver's CPU per trial


def settings_for(quick: bool) -> dict[str, Any]:
    if quick:
        return {"num_samples": 4, "concurrency": 2, "epochs": 2, "data": {"size": 16, "num_train": 16, "num_val": 8},
                "model": {"channels": 8, "layers": 3}, "batch_size": 8}
    return {"num_samples": 16, "concurrency": 2, "epochs": 4, "data": {"size": 32, "num_train": 112, "num_val": 16},
            "model": {"channels": 16, "layers": 3}, "batch_size": 8}


def base_train(s: dict[str, Any]) -> dict[str, Any]:
    return {"task": "benchmarks.tasks:build", "seed": 0, "epochs": s["epochs"], "batch_size": s["batch_size"],
            "lr": 1.0e-3, "device": "cpu", "amp": "off", "data": dict(s["data"]), "model": dict(s["model"])}


SPACE = {"gradient_weight": {"type": "uniform", "low": 0.0, "high": 0.3},
         "perceptual_weight": {"type": "uniform", "low": 0.01, "high": 0.1},
         "lr": {"type": "loguniform", "low": 3.0e-4, "high": 3.0e-3}}


def sweep_yaml(s: dict[str, Any], name: str, results_dir: Path, uri: str) -> dict[str, Any]:
    return {"name": name, "train": base_train(s), "space": SPACE,
            "search": {"sampler": "tpe", "seed": 0, "num_samples": s["num_samples"],
                       "max_concurrent": s["concurrency"]},
            "scheduler": {"type": "fifo"}, "objective": {"type": "composite"},
            "resources": {"cpu": 1, "gpu": 0}, "mlflow": {"tracking_uri": uri, "experiment": "bench-overhead"},
            "ray": {"num_cpus": s["concurrency"], "num_gpus": 0}, "results_dir": str(results_dir)}


def _cpu_s() -> float:
    """CPU seconds of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# what a Ray trial process runs before its first training step (Ray's worker imports ray itself)
_STARTUP_SNIPPET = """
import time
import ray.tune, torch
import losstune.search.trainable, losstune.trainables.loop
torch.set_num_threads(1)
model = torch.nn.Conv2d(3, 3, 3)
torch.optim.Adam(model.parameters(), lr=1e-3)  # imports torch._dynamo, as every torch.optim optimiser does
print(time.process_time())
"""


def trial_process_startup_cpu(repeats: int = 2) -> float:
    """CPU seconds a fresh Python process spends importing what a trial needs (min over ``repeats``)."""
    cpu = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", _STARTUP_SNIPPET], cwd=common.REPO, capture_output=True,
                             text=True, check=True)
        cpu.append(float(out.stdout.strip().splitlines()[-1]))
    return min(cpu)


def _epoch_sums(histories: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    epoch = sum(float(r.get("epoch_time_s") or 0) for h in histories.values() for r in h)
    it = sum(float(r.get("time_this_iter_s") or 0) for h in histories.values() for r in h)
    first = [h[0] for h in histories.values() if h]
    setup = sum(float(r.get("time_this_iter_s") or 0) - float(r.get("epoch_time_s") or 0) for r in first)
    n_results = sum(len(h) for h in histories.values())
    return {"sum_epoch_time_s": epoch, "sum_iter_time_s": it, "trial_first_iter_extra_s": setup,
            "num_results": n_results, "num_trials": len(histories)}


# ----- losstune -----------------------------------------------------------------------------------
def _phase_timer():
    """A passive ``tune.Callback`` noting when Tune starts, the first trial runs and the last one ends."""
    from ray import tune

    class PhaseTimer(tune.Callback):
        def __init__(self):
            self.t: dict[str, float] = {}

        def _mark(self, key: str, last: bool = False) -> None:
            if last or key not in self.t:
                self.t[key] = time.perf_counter()

        def setup(self, **info):
            self._mark("tune_setup")

        def on_trial_start(self, iteration, trials, trial, **info):
            self._mark("first_trial_start")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._mark("first_result")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._mark("last_trial_end", last=True)

    return PhaseTimer()


def run_losstune(s: dict[str, Any], tmp: Path, log: io.StringIO, mlflow: bool = True,
                 store_process: bool | str = "auto") -> dict[str, Any]:
    import ray

    from losstune.search import tuner
    from losstune.search.cli import main as cli_main
    from losstune.search.config import load_sweep
    from losstune.search.ray_session import init_ray
    from losstune.search.trials import load_results

    name = "bench-overhead"
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg_path = tmp / "sweep.yaml"
    config = sweep_yaml(s, name, tmp / "res", uri)
    if not mlflow:
        config["mlflow"] = {"enabled": False}
    else:
        config["mlflow"]["store_process"] = store_process
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    _prepare_mlflow_store(uri)
    cli_args = ["sweep", str(cfg_path), "--results-dir", str(tmp / "res")]
    sweep = load_sweep(cfg_path, {"results_dir": str(tmp / "res")})
    timer = _phase_timer()
    status_line = tuner.status_line  # benchmark-only instrumentation: one passive callback more
    tuner.status_line = lambda sw: [*status_line(sw), timer]
    t0 = time.perf_counter()
    init_ray(sweep)
    t1, cpu1 = time.perf_counter(), _cpu_s()
    try:
        with contextlib.redirect_stdout(log):
            rc = cli_main(cli_args)
    finally:
        tuner.status_line = status_line
    t2, cpu2 = time.perf_counter(), _cpu_s()
    ray.shutdown()
    t3 = time.perf_counter()
    if rc != 0:
        raise RuntimeError(f"losstune sweep exited {rc}:\n{log.getvalue()[-3000:]}")
    results = load_results(tmp / "res" / name)
    info = json.loads((tmp / "res" / name / "sweep.json").read_text())
    out = {"ray_start_s": t1 - t0, "sweep_wall_s": t2 - t1, "ray_shutdown_s": t3 - t2, "total_wall_s": t3 - t0,
           "driver_cpu_s": cpu2 - cpu1,
           "tune_fit_s": _tune_fit_seconds(log.getvalue()), "tracking": info.get("tracking", {}),
           **_epoch_sums(results.histories)}
    p = timer.t
    if {"tune_setup", "first_trial_start", "first_result", "last_trial_end"} <= set(p):
        out["phases_s"] = {"before_tune": p["tune_setup"] - t1,
                           "tune_start_to_first_trial_running": p["first_trial_start"] - p["tune_setup"],
                           "first_trial_running_to_first_result": p["first_result"] - p["first_trial_start"],
                           "first_result_to_last_trial_end": p["last_trial_end"] - p["first_result"],
                           "after_last_trial": t2 - p["last_trial_end"]}
    out["configs"] = [dict(results.configs[t]) for t in sorted(results.configs)]
    out["sweep"] = sweep
    return out


def _tune_fit_seconds(text: str) -> float:
    for line in text.splitlines():
        if "Tune finished in" in line:
            try:
                return float(line.rsplit("in", 1)[1].strip().rstrip("s"))
            except ValueError:
                pass
    return math.nan


def _prepare_mlflow_store(uri: str) -> None:
    """Create the sqlite store's schema up front (a one-time migration, not a per-sweep cost)."""
    from mlflow.tracking import MlflowClient
    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


# ----- bare Ray Tune --------------------------------------------------------------------------------
def bare_trial(config: dict[str, Any], base: dict[str, Any]) -> None:
    from ray import tune

    from losstune.trainables.loop import train

    cfg = dict(base)
    cfg.update(config)

    def on_epoch(report) -> None:
        tune.report({k: float(v) for k, v in report.metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)})

    train(cfg, on_epoch=on_epoch, num_threads=1)


def run_bare_tune(s: dict[str, Any], tmp: Path, reuse_actors: bool = False) -> dict[str, Any]:
    import functools

    import optuna
    import ray
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    space = {"gradient_weight": tune.uniform(0.0, 0.3), "perceptual_weight": tune.uniform(0.01, 0.1),
             "lr": tune.loguniform(3.0e-4, 3.0e-3)}
    searcher = ConcurrencyLimiter(
        OptunaSearch(metric="composite", mode="max", sampler=optuna.samplers.TPESampler(seed=0)),
        max_concurrent=s["concurrency"])
    t0 = time.perf_counter()
    ray.init(num_cpus=s["concurrency"], num_gpus=0, include_dashboard=False, logging_level="WARNING")
    t1 = time.perf_counter()
    tuner = tune.Tuner(
        tune.with_resources(functools.partial(bare_trial, base=base_train(s)), {"cpu": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=s["num_samples"], metric="composite",
                                    mode="max", reuse_actors=reuse_actors),
        run_config=tune.RunConfig(name="bare", storage_path=str(tmp / f"bare{int(reuse_actors)}"), verbose=0))
    cpu1 = _cpu_s()
    grid = tuner.fit()
    t2, cpu2 = time.perf_counter(), _cpu_s()
    ray.shutdown()
    t3 = time.perf_counter()
    histories = {}
    for r in grid:
        df = r.metrics_dataframe
        histories[r.metrics.get("trial_id", str(len(histories)))] = df.to_dict("records") if df is not None else []
    errors = sum(1 for r in grid if r.error)
    return {"ray_start_s": t1 - t0, "sweep_wall_s": t2 - t1, "ray_shutdown_s": t3 - t2, "total_wall_s": t3 - t0,
            "driver_cpu_s": cpu2 - cpu1, "errors": errors, **_epoch_sums(histories)}


# ----- plain loop -----------------------------------------------------------------------------------
def run_plain(configs: list[dict[str, Any]], sweep) -> dict[str, Any]:
    from losstune.search import space as sp
    from losstune.trainables.loop import train

    histories = {}
    t0 = time.perf_counter()
    for i, config in enumerate(configs):
        res = train(sp.trial_config(sweep.base_train, sweep.params, config), num_threads=1)
        histories[str(i)] = [{**h, "time_this_iter_s": h.get("epoch_time_s", 0.0)} for h in res.history]
    wall = time.perf_counter() - t0
    return {"sweep_wall_s": wall, "total_wall_s": wall, "ray_start_s": 0.0, "ray_shutdown_s": 0.0,
            **_epoch_sums(histories)}


def store_process_auto() -> bool:
    from losstune.search.tracking.store_process import wanted
    return wanted("auto", "sqlite:///x.db")


# ----- main -------------------------------------------------------------------------------------------
def _ratio(r: dict[str, Any], wall_key: str, c: int) -> float:
    return r[wall_key] / (r["sum_epoch_time_s"] / c) if r["sum_epoch_time_s"] > 0 else math.nan


def prepare_process() -> None:
    """This process set up to run sweeps as the benchmark does: the repository importable by Ray's workers, one
    torch thread, no progress line, Ray's worker logs not deduplicated."""
    common.ensure_repo_on_path()
    common.set_single_thread()
    os.environ.setdefault("LOSSTUNE_PROGRESS_INTERVAL", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def main(argv=None) -> dict[str, Any]:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    started = time.perf_counter()
    prepare_process()
    s = settings_for(args.quick)
    conc, n = s["concurrency"], s["num_samples"]
    half = dict(s, num_samples=max(1, n // 2))
    log = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="losstune-bench-overhead-") as tmpdir:
        tmp = Path(tmpdir)
        for sub in ("warm_up", "losstune", "losstune_half", "losstune_no_mlflow", "losstune_store_process"):
            (tmp / sub).mkdir()
        # a tiny sweep first: the driver's lazy imports (MLflow, Tune, Optuna's TPE) and the OS file cache then
        # cost every timed run the same (the first run used to pay them alone, which inflated the marginal ratio)
        run_losstune(dict(settings_for(True), num_samples=2, epochs=1), tmp / "warm_up", io.StringIO())
        lt = run_losstune(s, tmp / "losstune", log)
        configs, sweep = lt.pop("configs"), lt.pop("sweep")
        lt_half = run_losstune(half, tmp / "losstune_half", io.StringIO())
        lt_half.pop("configs"), lt_half.pop("sweep")
        lt_nomlflow = run_losstune(s, tmp / "losstune_no_mlflow", io.StringIO(), mlflow=False)
        lt_nomlflow.pop("configs"), lt_nomlflow.pop("sweep")
        lt_helper = run_losstune(s, tmp / "losstune_store_process", io.StringIO(), store_process=True)
        lt_helper.pop("configs"), lt_helper.pop("sweep")
        bare = run_bare_tune(s, tmp)
        bare_reuse = run_bare_tune(s, tmp, reuse_actors=True)
        plain = run_plain(configs, sweep)
    startup_cpu = trial_process_startup_cpu()

    rows, results = [], {}
    for key, label, r, c in (
            ("losstune", "losstune (CLI sweep, MLflow sqlite)", lt, conc),
            ("bare_ray_tune", "bare Ray Tune + OptunaSearch (defaults)", bare, conc),
            ("bare_ray_tune_reuse_actors", "bare Ray Tune + OptunaSearch, reuse_actors", bare_reuse, conc),
            ("plain_python_loop", "plain Python loop", plain, 1),
            ("losstune_half", f"losstune, {half['num_samples']} trials (for the marginal cost)", lt_half, conc),
            ("losstune_no_mlflow", "losstune, MLflow off", lt_nomlflow, conc),
            ("losstune_store_process", "losstune, mlflow.store_process: true", lt_helper, conc)):
        r["concurrency"] = c
        r["ratio_excl_ray_start"] = _ratio(r, "sweep_wall_s", c)
        r["ratio_incl_ray_start"] = _ratio(r, "total_wall_s", c)
        r["mean_trial_train_s"] = r["sum_epoch_time_s"] / max(1, r["num_trials"])
        rows.append([label, c, r["num_trials"], r["mean_trial_train_s"], r["sum_epoch_time_s"], r["ray_start_s"],
                     r["sweep_wall_s"], r["total_wall_s"], r["ratio_excl_ray_start"], r["ratio_incl_ray_start"]])
        results[key] = r
    # what each extra trial costs, without the fixed costs (worker start-up and imports, sweep set-up, reports)
    d_train = lt["sum_epoch_time_s"] - lt_half["sum_epoch_time_s"]
    marginal = (lt["sweep_wall_s"] - lt_half["sweep_wall_s"]) / (d_train / conc) if d_train > 0 else math.nan
    fixed = lt["sweep_wall_s"] - marginal * lt["sum_epoch_time_s"] / conc if math.isfinite(marginal) else math.nan
    results["losstune_marginal_ratio"] = marginal
    results["losstune_fixed_cost_s"] = fixed
    # where the CPU goes: a trial process's start-up, and the driver's own work per trial
    floor = 1 + conc * startup_cpu / lt["sum_epoch_time_s"] if lt["sum_epoch_time_s"] > 0 else math.nan
    results["trial_process_startup_cpu_s"] = startup_cpu
    results["startup_floor_ratio"] = floor
    # ratio ÷ ratio, not wall ÷ wall: the machine's speed drifts between runs (Σ train differs for the same work)
    results["ratio_vs_bare_reuse"] = lt["ratio_excl_ray_start"] / bare_reuse["ratio_excl_ray_start"]
    cpu_rows = []
    for key, label in (("losstune", f"losstune (store_process: auto = {store_process_auto()})"),
                       ("losstune_store_process", "losstune, mlflow.store_process: true"),
                       ("losstune_no_mlflow", "losstune, MLflow off"),
                       ("bare_ray_tune_reuse_actors", "bare Ray Tune + OptunaSearch, reuse_actors")):
        r = results[key]
        r["driver_cpu_ms_per_trial"] = 1000 * r["driver_cpu_s"] / max(1, r["num_trials"])
        # a database store's MLflow work runs in the writer's helper process (its CPU, start-up included)
        r["store_process_cpu_s"] = float(r.get("tracking", {}).get("store_process_cpu_s") or 0.0)
        r["store_process_cpu_ms_per_trial"] = 1000 * r["store_process_cpu_s"] / max(1, r["num_trials"])
        cpu_rows.append([label, r["driver_cpu_s"], r["driver_cpu_ms_per_trial"],
                         r["driver_cpu_s"] / r["sum_epoch_time_s"] if r["sum_epoch_time_s"] > 0 else math.nan,
                         r["store_process_cpu_ms_per_trial"]])
    headers = ["runner", "conc", "trials", "train s/trial", "Σ train s", "ray start s", "sweep wall s",
               "wall incl. ray s", "ratio (excl. ray start)", "ratio (incl. ray start+stop)"]
    text = common.table(headers, rows)
    cpu_text = common.table(["runner", "driver CPU s (sweep)", "driver CPU ms / trial", "÷ Σ train s",
                             "MLflow helper process CPU ms / trial"], cpu_rows)
    phases = lt.get("phases_s", {})
    phase_text = common.table(["losstune sweep phase", "s"], [[k.replace("_", " "), v] for k, v in phases.items()])
    print(f"\nSweep overhead: {n} trials x {s['epochs']} epochs, concurrency {conc}"
          f"{' (QUICK: not meaningful)' if args.quick else ''}")
    print("ratio = wall ÷ (Σ trial training time ÷ concurrency); training time = Σ epoch_time_s (train + val)")
    print(text)
    print(phase_text)
    print(cpu_text)
    print(f"a fresh trial process spends {startup_cpu:.2f} CPU s before its first step (imports of ray.tune, torch, "
          f"torch._dynamo by the optimiser); with {conc} such processes the ratio cannot go below {floor:.3f}")
    print(f"losstune ratio ÷ bare Ray Tune (reuse_actors) ratio: {results['ratio_vs_bare_reuse']:.3f}")
    print(f"marginal ratio (wall added per added trial, {half['num_samples']} -> {n} trials): {marginal:.3f}; "
          f"fixed cost of a sweep ≈ {fixed:.1f} s (set-up, worker start-up + imports, reports, export)")
    goals = [common.goal("losstune sweep ratio, Ray start-up excluded", lt["ratio_excl_ray_start"], GOAL),
             common.goal("losstune sweep ratio, Ray start-up + shut-down included", lt["ratio_incl_ray_start"], GOAL),
             common.goal("losstune marginal ratio (per added trial; fixed start-up costs excluded)", marginal, GOAL),
             common.goal("driver CPU ms per trial (losstune, default settings)",
                         results["losstune"]["driver_cpu_ms_per_trial"], DRIVER_MS_GOAL)]
    common.print_goals(goals)
    notes = ["sweep wall (excl.) = search.cli.main(['sweep', ...]) with Ray already started by "
             "search.ray_session.init_ray: config validation, MLflow parent run, Tune (worker start-up and imports, trials, Optuna on sqlite, "
             "checkpoints every epoch, MLflow child runs), reports, export",
             "incl. = + Ray cluster start-up and shut-down; the Python interpreter start and imports of the CLI "
             "process are not included",
             "marginal = (wall of the full sweep - wall of the half sweep) / ((Σ train full - Σ train half) / concurrency)",
             "Ray runs trial workers at nice 15: on a machine shared with other work, trials get less CPU than the "
             "plain loop (which runs at nice 0), so the per-trial training times differ between runners"]
    path = common.write_result(NAME, args.out, quick=args.quick, settings=s, results=results, goals=goals,
                               table_text=text + "\n" + phase_text + "\n" + cpu_text, started=started,
                               notes=notes)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    from benchmarks.overhead import main as _main  # the module's functions pickle by reference for Ray
    _main()
