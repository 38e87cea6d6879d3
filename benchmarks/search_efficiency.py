"""Search efficiency on the microstructure task: TPE + ASHA vs random search vs the seed's hand-set scenarios.

Equal budget of trial-epochs per method and seed. Running hundreds of tiny trials through Ray would
measure Ray, not the search, so the trials run in-process with the real ``trainables.loop.Trainer``,
driven by losstune's own search objects: the searcher is ``search.algorithms.make_searcher`` (Ray's
``OptunaSearch`` with the sampler of ``search.algorithms.make_sampler``: TPE multivariate + constant liar,
n_startup_trials auto, the four hand-set points (pure MSE and the seed's three scenarios) enqueued first; or ``RandomSampler``) behind its
``ConcurrencyLimiter``, on an Optuna sqlite study in a temp dir; the scheduler is
``search.algorithms.make_scheduler`` (Ray's ``ASHAScheduler``: grace period, reduction factor, max_t =
epochs). The driver calls them exactly as Tune's controller does (``suggest`` / ``on_trial_result`` /
``on_trial_complete``; scheduler ``on_trial_add`` / ``on_trial_result`` / ``on_trial_complete``),
with ``max_concurrent`` trials in flight, advanced one epoch each in turn. Random search runs every
trial to the end (FIFO). Nothing is cached: every trial builds its own Trainer (data, model).

Per method and seed: the best composite reached (max over every reported epoch) and the trial-epochs
spent until the running best first reached random search's final best of the same seed.
Goal: TPE + ASHA needs ≤ 50 % of the epochs random search needed to find its own best (median over 5 seeds).
The objective is the trials' ``composite`` on the task's default region (microstructure: where the frame
changes, see README "The objective").

Two controls run on the same budget and seeds: random search with the hand-set points first, and TPE + ASHA
without them; they tell whether a gain comes from the searcher or from where it starts. And one config (pure
MSE) is trained with 5 model seeds on the same data: the range of its best composite is the scale below which
differences between configs mean nothing.

Also per seed, a lower bound for any searcher under this protocol: the trial-epochs needed if the first
trial were the best config that either method found (``oracle_epochs``); with trials advanced side by
side, even that trial reaches the target only after its own k epochs, i.e. (k - 1) · in-flight + 1.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common

NAME = "search_efficiency"
GOAL = 0.5
# pure MSE as the reference, then the seed project's three scenarios (as in configs/microstructure.yaml)
HAND_SET = [{"gradient_weight": 0.0, "perceptual_weight": 0.0},
            {"gradient_weight": 0.2, "perceptual_weight": 0.0},
            {"gradient_weight": 0.1, "perceptual_weight": 0.05},
            {"gradient_weight": 0.5, "perceptual_weight": 0.1}]
HAND_NAMES = ["pure MSE", "(1) grad 0.2 / perc 0", "(2) grad 0.1 / perc 0.05", "(3) grad 0.5 / perc 0.1"]


def settings_for(quick: bool) -> dict[str, Any]:
    if quick:
        return {"seeds": [0], "epochs": 4, "budget": 16, "max_concurrent": 2, "grace_period": 1,
                "reduction_factor": 2, "num_samples": 16, "batch_size": 4,
                "data": {"size": 16, "num_sequences": 4, "frames": 6, "seq_length": 2}, "hidden": [4, 8]}
    # 24 sequences (18 for training: 90 windows, batch 4). With 8 (30 training windows) the model's seed
    # alone moves a config's composite by ~0.06 (blur_sensitivity's budget scan: 0.059 at 40 windows), more
    # than the best configs differ, so the searches compared luck
    return {"seeds": [0, 1, 2, 3, 4], "epochs": 8, "budget": 80, "max_concurrent": 4, "grace_period": 2,
            "reduction_factor": 2, "num_samples": 24, "batch_size": 4,
            "data": {"size": 32, "num_sequences": 24, "frames": 8, "seq_length": 3}, "hidden": [8, 16]}


# method -> (sampler, ASHA, the hand-set points run first). The goal compares the first two, as losstune's
# microstructure config runs the search and as a user runs random search; the other two are controls that
# tell whether a gain comes from TPE + ASHA or from the hand-set points.
METHODS = {
    "tpe+asha": ("tpe", True, True),
    "random": ("random", False, False),
    "random + hand-set first": ("random", False, True),
    "tpe+asha, no hand-set": ("tpe", True, False),
}
CONTROLS = tuple(m for m in METHODS if m not in ("tpe+asha", "random"))


def sweep_dict(s: dict[str, Any], method: str, seed: int, results_dir: str) -> dict[str, Any]:
    """The microstructure study of configs/microstructure.yaml scaled down to run in minutes on a CPU (the model
    size is fixed here instead of searched: the loss weights, lr and warm-up are)."""
    sampler, asha, hand_set = METHODS[method]
    return {
        "name": f"eff-{sampler}-{int(asha)}{int(hand_set)}-{seed}",
        "train": {"task": "microstructure", "seed": 0, "epochs": s["epochs"], "batch_size": s["batch_size"],
                  "lr": 1.0e-3,
                  "lr_schedule": "cosine", "device": "cpu", "amp": "off", "pixel_loss": "mse",
                  "gradient_mode": "match", "solidification_weighting": True, "num_threads": 1,
                  "data": dict(s["data"]), "model": {"hidden_channels": s["hidden"]}},
        "space": {"gradient_weight": {"type": "uniform", "low": 0.0, "high": 0.6},
                  "perceptual_weight": {"type": "uniform", "low": 0.0, "high": 0.15},
                  "lr": {"type": "loguniform", "low": 3.0e-4, "high": 3.0e-3},
                  "warmup_steps": {"type": "int", "low": 0, "high": 200, "step": 10}},
        "search": {"sampler": sampler, "seed": seed, "num_samples": s["num_samples"],
                   "max_concurrent": s["max_concurrent"],
                   "points_to_evaluate": HAND_SET if hand_set else []},
        "scheduler": ({"type": "asha", "grace_period": s["grace_period"], "reduction_factor": s["reduction_factor"]}
                      if asha else {"type": "fifo"}),
        "objective": {"type": "composite"},
        "resources": {"cpu": 1, "gpu": 0},
        "mlflow": {"enabled": False},
        "results_dir": results_dir,
    }


def validated_sweep(s: dict[str, Any], method: str, seed: int, results_dir: str):
    """:func:`sweep_dict` through losstune's own validation, as ``losstune sweep`` reads a config."""
    from losstune.search.config import validate_sweep
    return validate_sweep(sweep_dict(s, method, seed, results_dir), source="<search_efficiency>",
                          overrides={"results_dir": results_dir}, deep=False)


class _Trial:
    """What Ray's scheduler reads of a trial."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id

    def __hash__(self) -> int:
        return hash(self.trial_id)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Trial) and other.trial_id == self.trial_id


def run_search(s: dict[str, Any], method: str, seed: int) -> dict[str, Any]:
    """One search with an epoch budget; returns its trajectory (cumulative epochs -> composite)."""
    common.set_single_thread()
    import optuna
    from ray.tune.schedulers import TrialScheduler

    from losstune.search import space as sp
    from losstune.search.algorithms import make_scheduler, make_searcher
    from losstune.search.study import open_storage
    from losstune.trainables.loop import Trainer

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="losstune-bench-eff-") as tmp:
        sweep = validated_sweep(s, method, seed, tmp)
        searcher = make_searcher(sweep, open_storage(tmp))
        scheduler = make_scheduler(sweep)
        scheduler.set_search_properties("composite", "max")
        budget, max_t = s["budget"], sweep.epochs
        used, n_started = 0, 0
        running: list[dict[str, Any]] = []
        trajectory: list[tuple[int, float]] = []  # (cumulative epochs, composite of that epoch)
        trials: list[dict[str, Any]] = []
        t0 = time.perf_counter()

        def finish(entry: dict[str, Any], stopped: bool) -> None:
            searcher.on_trial_complete(entry["id"], result=entry["last"])
            scheduler.on_trial_complete(None, entry["trial"], entry["last"])
            entry["trainer"] = None
            entry["stopped_early"] = stopped
            running.remove(entry)

        while used < budget:
            # fill the free slots (Tune asks the searcher until the limiter says no)
            while len(running) < sweep.search.max_concurrent and n_started < sweep.search.num_samples:
                trial_id = f"t{n_started:04d}"
                config = searcher.suggest(trial_id)
                if config is None:
                    break
                n_started += 1
                values = sp.decode(sweep.params, config)
                entry = {"id": trial_id, "trial": _Trial(trial_id), "values": values, "epochs": 0, "best": -math.inf,
                         "history": [],
                         "trainer": Trainer(sp.trial_config(sweep.base_train, sweep.params, config), num_threads=1),
                         "last": None, "stopped_early": False}
                scheduler.on_trial_add(None, entry["trial"])
                running.append(entry)
                trials.append(entry)
            if not running:
                break
            for entry in list(running):  # one epoch each, in turn
                if used >= budget:
                    break
                report = entry["trainer"].run_epoch()
                used += 1
                entry["epochs"] += 1
                composite = float(report.metrics["composite"])
                entry["best"] = max(entry["best"], composite)
                entry["history"].append(composite)
                trajectory.append((used, composite))
                result = {**{k: float(v) for k, v in report.metrics.items()}, "training_iteration": entry["epochs"]}
                entry["last"] = result
                searcher.on_trial_result(entry["id"], result)
                action = scheduler.on_trial_result(None, entry["trial"], result)
                if report.status == "diverged" or entry["epochs"] >= max_t:
                    finish(entry, stopped=False)
                elif action == TrialScheduler.STOP:
                    finish(entry, stopped=True)
        for entry in list(running):  # the budget ran out: cut off what still runs
            finish(entry, stopped=True)
        best = max((c for _, c in trajectory), default=math.nan)
        return {"method": method, "seed": seed, "epochs_used": used,
                "trials": len(trials), "stopped_early": sum(t["stopped_early"] for t in trials), "best": best,
                "trajectory": trajectory, "wall_s": time.perf_counter() - t0,
                "trial_summary": [{"values": t["values"], "epochs": t["epochs"], "best": t["best"],
                                   "history": t["history"]} for t in trials]}


def run_hand_set(s: dict[str, Any]) -> dict[str, Any]:
    """Pure MSE and the seed project's three scenarios, each trained for the full epochs (lr etc. at the base values)."""
    common.set_single_thread()
    from losstune.search import space as sp
    from losstune.trainables.loop import train

    with tempfile.TemporaryDirectory(prefix="losstune-bench-eff-") as tmp:
        sweep = validated_sweep(s, "tpe+asha", 0, tmp)
        out = []
        t0 = time.perf_counter()
        for point, name in zip(sweep.points, HAND_NAMES):  # points completed to every param, as the sweep runs them
            res = train(sp.apply_values(sweep.base_train, point), num_threads=1)
            out.append({"name": name, "values": point, "epochs": res.epochs_completed, "best": res.best_composite,
                        "final": res.metrics.get("composite")})
        return {"method": "hand-set", "scenarios": out, "wall_s": time.perf_counter() - t0}


NOISE_SEEDS = (0, 1, 2, 3, 4)


def run_seed_noise(s: dict[str, Any]) -> dict[str, Any]:
    """Pure MSE trained with 5 model seeds on the searches' data: how far one config's best composite moves by
    the seed alone, the scale on which differences between configs can mean anything."""
    common.set_single_thread()
    from losstune.search import space as sp
    from losstune.trainables.loop import train

    with tempfile.TemporaryDirectory(prefix="losstune-bench-eff-") as tmp:
        sweep = validated_sweep(s, "tpe+asha", 0, tmp)
        config = sp.apply_values(sweep.base_train, sweep.points[0])
        data = {**config["data"], "seed": config["data"].get("seed", config["seed"])}
        values = []
        for seed in NOISE_SEEDS:  # the data stay those of the searches; only the model's seed varies
            values.append(train({**config, "seed": seed, "data": data}, num_threads=1).best_composite)
        return {"method": "seed noise", "config": HAND_NAMES[0], "seeds": list(NOISE_SEEDS), "best": values,
                "range": max(values) - min(values)}


def _job(args: tuple) -> dict[str, Any]:
    kind, s, seed = args
    if kind == "hand":
        return run_hand_set(s)
    return run_seed_noise(s) if kind == "noise" else run_search(s, kind, seed)


def control_entry(search: dict[str, Any], target: float, random_epochs: float) -> dict[str, float]:
    """A control search's best and its trial-epochs to ``target`` (random search's best), also ÷ random's."""
    epochs = epochs_to_reach(search["trajectory"], target)
    return {"best": search["best"], "epochs_to_random_best": epochs, "ratio": epochs / random_epochs}


def median_counting_inf(values: list[float]) -> float:
    """The median, where an inf (target never reached) counts as the largest value: the upper middle one."""
    return common.median(values) if all(math.isfinite(v) for v in values) else sorted(values)[len(values) // 2]


def epochs_to_reach(trajectory: list[tuple[int, float]], target: float) -> float:
    for used, composite in trajectory:
        if composite >= target - 1e-12:
            return float(used)
    return math.inf


def oracle_epochs(histories: list[list[float]], target: float, in_flight: int) -> float:
    """Trial-epochs a searcher would need to reach ``target`` if its very first trial were the best config
    either method found (of ``histories``, the per-epoch composites of every trial of one seed), run with
    ``in_flight`` trials advanced epoch by epoch: ``(k - 1) · in_flight + 1`` for a trial that reaches the
    target at its own epoch k. No searcher can do better under this protocol."""
    own = [next((i + 1 for i, c in enumerate(h) if c >= target - 1e-12), math.inf) for h in histories]
    k = min(own, default=math.inf)
    return (k - 1) * in_flight + 1 if math.isfinite(k) else math.inf


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation (no tie correction: composites are continuous)."""
    import numpy as np
    if len(x) < 3:
        return math.nan
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def main(argv=None) -> dict[str, Any]:
    args = common.parse_args(__doc__.splitlines()[0], argv,
                             extra=[(("--workers",), {"type": int, "default": 2, "help": "parallel processes (2)"})])
    started = time.perf_counter()
    common.ensure_repo_on_path()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    s = settings_for(args.quick)
    jobs = [("hand", s, 0), ("noise", s, 0)] + [(m, s, seed) for seed in s["seeds"] for m in METHODS]
    if args.workers > 1:
        with mp.get_context("spawn").Pool(args.workers) as pool:
            outs = pool.map(_job, jobs, chunksize=1)
    else:
        outs = [_job(j) for j in jobs]
    hand, noise = outs[0], outs[1]
    searches = outs[2:]
    rows, per_seed = [], []
    for seed in s["seeds"]:
        by_method = {o["method"]: o for o in searches if o["seed"] == seed}
        tpe, rnd = by_method["tpe+asha"], by_method["random"]
        target = rnd["best"]
        e_rnd = epochs_to_reach(rnd["trajectory"], target)
        e_tpe = epochs_to_reach(tpe["trajectory"], target)
        e_oracle = oracle_epochs([t["history"] for t in tpe["trial_summary"] + rnd["trial_summary"]], target,
                                 s["max_concurrent"])
        entry = {"seed": seed, "random_best": target, "tpe_best": tpe["best"], "random_epochs_to_best": e_rnd,
                 "tpe_epochs_to_random_best": e_tpe, "ratio_vs_random_epochs_to_best": e_tpe / e_rnd,
                 "oracle_epochs_to_random_best": e_oracle, "oracle_ratio": e_oracle / e_rnd,
                 "ratio_vs_random_budget": e_tpe / rnd["epochs_used"], "tpe_trials": tpe["trials"],
                 "tpe_stopped_early": tpe["stopped_early"], "random_trials": rnd["trials"],
                 "controls": {m: control_entry(o, target, e_rnd) for m, o in by_method.items()
                              if m in CONTROLS}}
        per_seed.append(entry)
        rows.append([f"TPE + ASHA (seed {seed})", tpe["epochs_used"], tpe["trials"], tpe["best"], e_tpe,
                     entry["ratio_vs_random_epochs_to_best"]])
        rows.append([f"random (seed {seed})", rnd["epochs_used"], rnd["trials"], rnd["best"], e_rnd, 1.0])
        for m, c in entry["controls"].items():
            rows.append([f"control: {m} (seed {seed})", by_method[m]["epochs_used"], by_method[m]["trials"], c["best"],
                         c["epochs_to_random_best"], c["ratio"]])
        rows.append([f"bound: best config first (seed {seed})", "-", 1, "-", e_oracle, entry["oracle_ratio"]])
    for sc in hand["scenarios"]:
        rows.append([f"hand-set {sc['name']}", sc["epochs"], 1, sc["best"], "-", "-"])
    headers = ["method", "trial-epochs", "trials", "best composite", "epochs to random's best",
               "÷ random's epochs to its best"]
    text = common.table(headers, rows)
    ratios = [e["ratio_vs_random_epochs_to_best"] for e in per_seed]
    median_ratio = median_counting_inf(ratios)
    control_medians = {m: median_counting_inf([e["controls"][m]["ratio"] for e in per_seed])
                       for m in CONTROLS}
    oracle = sorted(e["oracle_ratio"] for e in per_seed)
    oracle_median = oracle[len(oracle) // 2] if len(oracle) % 2 else common.median(oracle)
    best_hand = max(sc["best"] for sc in hand["scenarios"])
    # why ASHA can or cannot help: does a trial's composite at the first rung predict its best? (random trials
    # run every epoch, so they show the full curves)
    full = [t for o in searches if o["method"] == "random" for t in o["trial_summary"] if len(t["history"]) >= s["epochs"]]
    rung = s["grace_period"]
    rho = spearman([t["history"][rung - 1] for t in full], [t["best"] for t in full])
    summary = {"median_ratio": median_ratio,
               "mean_tpe_best": sum(e["tpe_best"] for e in per_seed) / len(per_seed),
               "mean_random_best": sum(e["random_best"] for e in per_seed) / len(per_seed),
               "best_hand_set": best_hand,
               "tpe_beats_best_hand_set": sum(e["tpe_best"] > best_hand for e in per_seed),
               "random_beats_best_hand_set": sum(e["random_best"] > best_hand for e in per_seed),
               "spearman_first_rung_vs_best": rho, "first_rung_epoch": rung, "curves": len(full),
               "oracle_median_ratio": oracle_median, "control_median_ratios": control_medians,
               "seed_range_one_config": noise["range"],
               "best_of_every_search": [min(o["best"] for o in searches), max(o["best"] for o in searches)]}
    print(f"\nSearch efficiency: microstructure {s['data']}, {s['epochs']} epochs max per trial, budget "
          f"{s['budget']} trial-epochs per method and seed, seeds {s['seeds']}, {s['max_concurrent']} trials in flight"
          f"{' (QUICK: not meaningful)' if args.quick else ''}")
    print("in-process driver with losstune's make_searcher/make_sampler/make_scheduler objects and the real "
          "Trainer (not through Ray workers)")
    print(text)
    print(f"mean best composite: TPE+ASHA {summary['mean_tpe_best']:.4f}, random {summary['mean_random_best']:.4f}, "
          f"best hand-set {best_hand:.4f}")
    print(f"rank correlation (Spearman) of a trial's composite at ASHA's first rung (epoch {rung}) with its best over "
          f"{s['epochs']} epochs: {rho:.2f} ({len(full)} random-search trials)")
    print(f"one config ({noise['config']}) trained with {len(noise['seeds'])} model seeds: best composite "
          + " / ".join(f"{v:.4f}" for v in noise["best"]) + f", range {noise['range']:.4f}")
    for m, v in control_medians.items():
        print(f"control {m}: median ratio {v:.2f}")
    print(f"lower bound for any searcher (its first trial = the best config either method found, "
          f"{s['max_concurrent']} in flight): median ratio {oracle_median:.2f}")
    goals = [common.goal("TPE+ASHA epochs to random's best ÷ random's epochs to its best (median over seeds)",
                         median_ratio, GOAL)]
    common.print_goals(goals)
    results = {"per_seed": per_seed, "summary": summary, "hand_set": hand, "seed_noise": noise, "searches": searches}
    notes = ["trials run in-process (not in Ray workers) with losstune's searcher/scheduler objects; "
             "the epoch counts are what a Ray sweep with the same settings would spend"]
    path = common.write_result(NAME, args.out, quick=args.quick, settings=s, results=results, goals=goals,
                               table_text=text, started=started, notes=notes)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    from benchmarks.search_efficiency import main as _main  # pool workers import the module by name
    _main()
