"""MLflow cost per logged epoch result: losstune's ``TrackingCallback`` vs Ray's ``MLflowLoggerCallback``.

Synthetic Tune results (the keys a real losstune trial reports, plus Tune's own keys and ``config``)
are fed straight into each callback's hooks, as Tune's driver would: N trials start, each reports E
epochs (interleaved, epoch by epoch), then they complete. Both write to the same SQLite store
(created up front, so its one-time schema migration is not counted), each to its own experiment.

* driver time per result: time spent inside ``on_trial_result`` (what blocks Tune's event loop);
  also all hooks (start + results + complete [+ checkpoint]) ÷ results.
* end-to-end per result: from the first hook call until every result is in the store (losstune:
  until ``close()`` has flushed its background writer; Ray's callback writes synchronously) ÷ results.
* "losstune + artifacts" also feeds ``on_checkpoint`` with each epoch's ``predictions.png``, its
  ``predictions.webp`` thumbnail and ``config.yaml`` as real trials do (logged as an MLflow image series
  + files).

The store is then read back to check every metric value arrived.
"""

from __future__ import annotations

import io
import os
import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from benchmarks import common

NAME = "mlflow_cost"
GOAL_MS = 10.0
LOOP_KEYS = ("loss", "loss_pixel", "loss_gradient", "loss_perceptual", "val_loss", "ssim", "mse", "psnr",
             "gradient_match", "sharpness_ratio", "histogram_distance", "composite", "baseline_mse", "lr",
             "metrics_time_s", "eval_time_s", "epoch_time_s", "epoch", "diverged")


class FakeTrial:
    """The attributes of ``ray.tune.experiment.Trial`` the two callbacks read."""

    def __init__(self, trial_id: str, config: dict[str, Any], path: str):
        self.trial_id = trial_id
        self.config = config
        self.local_path = self.path = path
        self.last_result: dict[str, Any] = {}
        self.status = "RUNNING"

    def __str__(self) -> str:
        return f"losstune_trial_{self.trial_id}"


def make_result(trial: FakeTrial, epoch: int, rng: random.Random) -> dict[str, Any]:
    result: dict[str, Any] = {k: rng.random() for k in LOOP_KEYS}
    result.update({"epoch": float(epoch), "diverged": 0.0, "training_iteration": epoch,
                   "time_this_iter_s": 1.0, "time_total_s": float(epoch), "time_since_restore": float(epoch),
                   "iterations_since_restore": epoch, "timestamp": int(time.time()), "done": False,
                   "trial_id": trial.trial_id, "date": time.strftime("%Y-%m-%d_%H-%M-%S"), "pid": os.getpid(),
                   "hostname": "bench", "node_ip": "127.0.0.1", "checkpoint_dir_name": f"checkpoint_{epoch:06d}",
                   "config": dict(trial.config)})
    return result


def _artifact_dir(root: Path) -> Path:
    """A checkpoint-like folder with a real predictions.png grid, its thumbnail and config.yaml (as trials write
    them in ``search.artifacts.write_trial_artifacts``)."""
    import numpy as np

    from losstune.search.artifacts import PREDICTIONS_THUMB, prediction_grid, save_thumbnail
    root.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    arrays = {k: g.random((4, 3, 32, 32), dtype=np.float32) for k in ("input", "baseline", "prediction", "target")}
    image = prediction_grid(arrays, title="bench")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    (root / "predictions.png").write_bytes(buf.getvalue())
    save_thumbnail(image, root / PREDICTIONS_THUMB)
    (root / "config.yaml").write_text("task: microstructure\nepochs: 20\ngradient_weight: 0.1\n")
    return root


def _trials(n: int, tmp: Path, prefix: str) -> list[FakeTrial]:
    rng = random.Random(0)
    return [FakeTrial(f"{prefix}{i:05d}", {"gradient_weight": rng.random() * 0.3, "perceptual_weight": rng.random() * 0.1,
                                         "lr": 10 ** rng.uniform(-3.5, -2.5), "warmup_steps": rng.randrange(0, 200, 10)},
                      str(tmp / f"{prefix}{i}")) for i in range(n)]


def feed(callback, trials: list[FakeTrial], epochs: int, checkpoint_dir: Path | None, on_complete) -> dict[str, float]:
    """Drive the hooks like Tune's driver; returns the seconds spent in each kind of hook."""
    rng = random.Random(1)
    t_start = t_result = t_ckpt = t_complete = 0.0
    all_trials = list(trials)
    for i, trial in enumerate(trials):
        t0 = time.perf_counter()
        callback.on_trial_start(iteration=i, trials=all_trials, trial=trial)
        t_start += time.perf_counter() - t0
    for epoch in range(1, epochs + 1):
        for trial in trials:
            result = make_result(trial, epoch, rng)
            trial.last_result = result
            t0 = time.perf_counter()
            callback.on_trial_result(iteration=epoch, trials=all_trials, trial=trial, result=result)
            t_result += time.perf_counter() - t0
            if checkpoint_dir is not None:
                t0 = time.perf_counter()
                callback.on_checkpoint(iteration=epoch, trials=all_trials, trial=trial,
                                       checkpoint=SimpleNamespace(path=str(checkpoint_dir)))
                t_ckpt += time.perf_counter() - t0
    for trial in trials:
        trial.status = "TERMINATED"
        t0 = time.perf_counter()
        on_complete(trial, all_trials)
        t_complete += time.perf_counter() - t0
    return {"start_s": t_start, "result_s": t_result, "checkpoint_s": t_ckpt, "complete_s": t_complete}


def run_ray(uri: str, tmp: Path, n: int, epochs: int, rep: int) -> dict[str, Any]:
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    experiment = f"ray-mlflow-logger-{rep}"
    trials = _trials(n, tmp, f"r{rep}_")
    t0 = time.perf_counter()
    cb = MLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment, save_artifact=False)
    cb.setup()
    t_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    hooks = feed(cb, trials, epochs, None,
                 lambda trial, all_trials: cb.on_trial_complete(iteration=0, trials=all_trials, trial=trial))
    end_to_end = time.perf_counter() - t0
    return {"experiment": experiment, "setup_s": t_setup, "end_to_end_s": end_to_end, **hooks}


def run_losstune(uri: str, tmp: Path, n: int, epochs: int, rep: int, artifacts: bool) -> dict[str, Any]:
    from losstune.search.tracking import SweepTracker, TrackingCallback

    experiment = f"losstune{'-artifacts' if artifacts else ''}-{rep}"
    sweep_dir = tmp / experiment
    sweep_dir.mkdir(parents=True)
    trials = _trials(n, tmp, f"l{rep}{'a' if artifacts else ''}_")
    t0 = time.perf_counter()
    tracker = SweepTracker(uri, experiment)
    parent = tracker.start("bench", {"x": 1}, {})
    cb = TrackingCallback(sweep_dir, uri, tracker.experiment_id, parent, max_epochs=epochs,
                          tags={"losstune.task": "bench"})
    cb.setup()
    t_setup = time.perf_counter() - t0
    ckpt = _artifact_dir(tmp / f"ckpt-{experiment}") if artifacts else None
    t0 = time.perf_counter()
    hooks = feed(cb, trials, epochs, ckpt,
                 lambda trial, all_trials: cb.on_trial_complete(iteration=0, trials=all_trials, trial=trial))
    t_fed = time.perf_counter() - t0
    cb.close(timeout=120)
    end_to_end = time.perf_counter() - t0
    tracker.finish()
    stats = cb.stats()
    return {"experiment": experiment, "setup_s": t_setup, "end_to_end_s": end_to_end, "fed_s": t_fed,
            "close_s": end_to_end - t_fed, "writer_batches": stats.get("batches"), "writer_errors": stats.get("errors"),
            "dropped_metrics": stats.get("dropped_metrics"), **hooks}


def count_logged(uri: str, experiment: str) -> dict[str, int]:
    """Runs and 'composite' values in the store (each run should hold one per epoch)."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = [r for r in runs if r.data.tags.get("losstune.kind") != "sweep"]
    values = sum(len(client.get_metric_history(r.info.run_id, "composite")) for r in children)
    return {"runs": len(children), "composite_values": values}


def main(argv=None) -> dict[str, Any]:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    started = time.perf_counter()
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    n, epochs, reps = (4, 5, 1) if args.quick else (10, 20, 1)  # Ray's callback needs ~2 min for 200 results
    total = n * epochs
    variants: dict[str, list[dict[str, Any]]] = {"ray": [], "losstune": [], "losstune_artifacts": []}
    with tempfile.TemporaryDirectory(prefix="losstune-bench-mlflow-") as tmpdir:
        tmp = Path(tmpdir)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        from mlflow.tracking import MlflowClient
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # schema migration, not timed
        for rep in range(reps):  # alternate the order: the store grows, the machine is noisy
            order = ["ray", "losstune", "losstune_artifacts"] if rep % 2 == 0 else \
                ["losstune_artifacts", "losstune", "ray"]
            for v in order:
                if v == "ray":
                    r = run_ray(uri, tmp, n, epochs, rep)
                else:
                    r = run_losstune(uri, tmp, n, epochs, rep, artifacts=v == "losstune_artifacts")
                r.update(count_logged(uri, r["experiment"]))
                variants[v].append(r)

    results: dict[str, Any] = {"num_results": total, "trials": n, "epochs": epochs, "repeats": reps}
    rows = []
    labels = {"ray": "ray.air MLflowLoggerCallback", "losstune": "losstune TrackingCallback",
              "losstune_artifacts": "losstune TrackingCallback + per-epoch artifacts"}
    for v, runs in variants.items():
        per_result_ms = common.median(1000 * r["result_s"] / total for r in runs)
        hooks_ms = common.median(1000 * (r["start_s"] + r["result_s"] + r["checkpoint_s"] + r["complete_s"]) / total
                                 for r in runs)
        e2e_ms = common.median(1000 * r["end_to_end_s"] / total for r in runs)
        complete = all(r["composite_values"] == total and r["runs"] == n for r in runs)
        results[v] = {"driver_ms_per_result": per_result_ms, "driver_all_hooks_ms_per_result": hooks_ms,
                      "end_to_end_ms_per_result": e2e_ms, "all_values_logged": complete, "runs": runs}
        rows.append([labels[v], per_result_ms, hooks_ms, e2e_ms, complete])
    headers = ["callback", "driver ms/result (on_trial_result)", "driver ms/result (all hooks)",
               "end-to-end ms/result (until in store)", "all values in store"]
    text = common.table(headers, rows)
    print(f"\nMLflow cost: {n} trials x {epochs} epochs = {total} results per callback, SQLite store, "
          f"median of {reps} run(s){' (QUICK)' if args.quick else ''}")
    print(text)
    lt = results["losstune"]
    ratio = results["ray"]["end_to_end_ms_per_result"] / lt["end_to_end_ms_per_result"]
    results["ray_vs_losstune_end_to_end"] = ratio
    print(f"Ray's callback costs {ratio:.1f}x losstune's per result end to end")
    goals = [common.goal("losstune driver ms per result", lt["driver_ms_per_result"], GOAL_MS),
             common.goal("losstune end-to-end ms per result (metrics)", lt["end_to_end_ms_per_result"], GOAL_MS),
             common.goal("losstune end-to-end ms per result (metrics + per-epoch artifacts)",
                         results["losstune_artifacts"]["end_to_end_ms_per_result"], GOAL_MS)]
    common.print_goals(goals)
    path = common.write_result(NAME, args.out, quick=args.quick, settings={"trials": n, "epochs": epochs, "repeats": reps},
                               results=results, goals=goals, table_text=text, started=started)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
