"""Driver CPU per trial as a sweep grows: the same small trials, 8 / 40 / 100 of them, 2 at a time.

A sweep's driver should cost about the same per trial however many trials the sweep has. What grows
with the sweep is Tune's experiment snapshot: each one re-writes and copies the state of *every* trial
(``experiment_state-*.json``, ~14 KB per trial with losstune's metrics: Tune keeps min / max / mean / last
of every reported number, the trial's config, last result and checkpoint list). Tune forces a snapshot
whenever a trial has checkpointed ``num_to_keep`` times since the last one; losstune keeps 2 checkpoints
per trial (``search.tuner.CHECKPOINTS_KEPT``) and forces one more after each trial's last checkpoint (so a
resumed sweep re-trains nothing it had checkpointed), so a trial of 4 epochs forces ~2 snapshots, each
costing in proportion to the number of trials.

Measured as :mod:`benchmarks.overhead` measures the driver (``getrusage`` of the process running
``losstune sweep`` in-process, Ray started before), with MLflow off, so the rows differ only in the
number of trials; the size of the last experiment snapshot is reported beside.
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common, overhead

NAME = "driver_scaling"


def settings_for(quick: bool) -> dict[str, Any]:
    return dict(overhead.settings_for(True), epochs=2 if quick else 4,
                sizes=[4, 8] if quick else [8, 40, 100])


def main(argv=None) -> dict[str, Any]:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    started = time.perf_counter()
    overhead.prepare_process()
    s = settings_for(args.quick)
    rows, results = [], {"sizes": {}}
    with tempfile.TemporaryDirectory(prefix="losstune-bench-scaling-") as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "warm_up").mkdir()
        overhead.run_losstune(dict(s, num_samples=2, epochs=1), tmp / "warm_up", io.StringIO(), mlflow=False)
        for n in s["sizes"]:
            (tmp / f"n{n}").mkdir()
            r = overhead.run_losstune(dict(s, num_samples=n), tmp / f"n{n}", io.StringIO(), mlflow=False)
            state = sorted((tmp / f"n{n}" / "res").rglob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
            kb = state[-1].stat().st_size / 1024 if state else float("nan")
            ms = 1000 * r["driver_cpu_s"] / max(1, r["num_trials"])
            results["sizes"][n] = {"driver_cpu_ms_per_trial": ms, "experiment_state_kb": kb,
                                   "sweep_wall_s": r["sweep_wall_s"], "num_trials": r["num_trials"]}
            rows.append([n, r["num_trials"], ms, kb, r["sweep_wall_s"]])
    first, last = s["sizes"][0], s["sizes"][-1]
    growth = results["sizes"][last]["driver_cpu_ms_per_trial"] / results["sizes"][first]["driver_cpu_ms_per_trial"]
    results["growth"] = growth
    text = common.table(["trials", "finished", "driver CPU ms / trial", "experiment snapshot KB", "sweep wall s"],
                        rows)
    print(f"\nDriver CPU per trial vs sweep size (MLflow off, {s['epochs']} epochs per trial, 2 at a time)"
          f"{' (QUICK: not meaningful)' if args.quick else ''}")
    print(text)
    print(f"driver CPU per trial, {last} trials ÷ {first} trials: {growth:.2f} (1.0 = a driver whose cost per "
          "trial does not depend on the sweep's size)")
    path = common.write_result(NAME, args.out, quick=args.quick, settings=s, results=results, goals=[],
                               table_text=text, started=started,
                               notes=["MLflow off; the same trials as benchmarks/overhead's --quick sweep, more of them"])
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    from benchmarks.driver_scaling import main as _main  # the module's functions pickle by reference for Ray
    _main()
