"""Run every benchmark (each in its own process), then print and write the combined goal table.

    python -m benchmarks.run_all [--quick] [--only overhead,mlflow_cost] [--out results/bench]

Writes ``<out>/<name>.json`` per benchmark plus ``<out>/summary.json`` and ``<out>/summary.md`` (the
markdown table of README's Performance section).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import common

# cheapest first; the GPU one skips itself without CUDA
BENCHMARKS = ("loop_throughput", "mlflow_cost", "overhead", "driver_scaling", "blur_sensitivity", "search_efficiency",
              "gpu_path")


def headline(name: str, data: dict[str, Any]) -> list[list[Any]]:
    """Rows (benchmark, measure, value, goal, status) of one benchmark's JSON."""
    r = data.get("results", {})
    rows: list[list[Any]] = []
    status = {True: "met", False: "MISSED", None: "-"}
    for g in data.get("goals", []):
        rows.append([name, g["goal"], g["value"], f"≤ {common.fmt(g['limit'])}", status[g["met"]]])
    if name == "overhead":
        for key, label in (("bare_ray_tune", "bare Ray Tune + OptunaSearch ratio (excl. / incl. Ray start)"),
                           ("bare_ray_tune_reuse_actors", "bare Ray Tune + OptunaSearch, reuse_actors, ratio "
                                                          "(excl. / incl. Ray start)"),
                           ("plain_python_loop", "plain Python loop ratio")):
            if key in r:
                rows.append([name, label, f"{common.fmt(r[key]['ratio_excl_ray_start'])} / "
                             f"{common.fmt(r[key]['ratio_incl_ray_start'])}", "", ""])
        if "losstune" in r:
            rows.append([name, "losstune: Ray start-up s / sweep wall s / Σ trial training s",
                         f"{common.fmt(r['losstune']['ray_start_s'])} / {common.fmt(r['losstune']['sweep_wall_s'])} / "
                         f"{common.fmt(r['losstune']['sum_epoch_time_s'])}", "", ""])
        if "startup_floor_ratio" in r:
            rows.append([name, "floor for any runner in Ray worker processes: 1 + conc × start-up CPU / Σ train "
                               "(start-up CPU s per process)",
                         f"{common.fmt(r['startup_floor_ratio'])} ({common.fmt(r['trial_process_startup_cpu_s'])} s)",
                         "", ""])
        if "ratio_vs_bare_reuse" in r:
            rows.append([name, "losstune ratio ÷ bare Ray Tune (reuse_actors) ratio (what losstune adds to Tune)",
                         r["ratio_vs_bare_reuse"], "", ""])
        keys = ("losstune", "losstune_store_process", "losstune_no_mlflow", "bare_ray_tune_reuse_actors")
        if all("driver_cpu_ms_per_trial" in r.get(k, {}) for k in keys):
            rows.append([name, "driver CPU ms per trial: losstune (default) / store_process: true (+ its helper) / "
                               "MLflow off / bare Ray Tune (reuse_actors)",
                         " / ".join(f"{r[k]['driver_cpu_ms_per_trial']:.0f}"
                                    + (f" (+{r[k]['store_process_cpu_ms_per_trial']:.0f})"
                                       if r[k].get("store_process_cpu_ms_per_trial") else "") for k in keys), "", ""])
        if "losstune_store_process" in r:
            rows.append([name, "losstune ratio with mlflow.store_process: true (excl. / incl. Ray start)",
                         f"{common.fmt(r['losstune_store_process']['ratio_excl_ray_start'])} / "
                         f"{common.fmt(r['losstune_store_process']['ratio_incl_ray_start'])}", "", ""])
    elif name == "driver_scaling" and "sizes" in r:
        sizes = r["sizes"]
        rows.append([name, f"driver CPU ms per trial (MLflow off) at {' / '.join(map(str, sizes))} trials; snapshot KB",
                     " / ".join(f"{v['driver_cpu_ms_per_trial']:.0f}" for v in sizes.values()) + "; "
                     + " / ".join(f"{v['experiment_state_kb']:.0f}" for v in sizes.values()), "", ""])
    elif name == "mlflow_cost" and "ray" in r:
        rows.append([name, "ray.air MLflowLoggerCallback ms per result (driver = end-to-end)",
                     r["ray"]["end_to_end_ms_per_result"], "", ""])
    elif name == "loop_throughput" and "eval_share" in r:
        rows.append([name, "validation share of an epoch (val loss + predictions + metrics)", r["eval_share"], "", ""])
        rows.append([name, "epoch ratio incl. validation (plain: val loss only)", r["epoch_ratio_incl_validation"], "",
                     ""])
    elif name == "blur_sensitivity":
        for task, v in r.items():
            if isinstance(v, dict) and "drop_at_1px" in v:
                rows.append([name, f"{task}: objective drop at σ = 0.5 / 1 / 2 px vs seed range (std)",
                             " / ".join(f"{b['drop']:.4f}" for b in v["blurred"])
                             + f" vs {v['spread_range']:.4f} ({v['spread_std']:.4f})", "", ""])
    elif name == "search_efficiency" and "summary" in r:
        s = r["summary"]
        rows.append([name, "mean best composite: TPE+ASHA / random / best hand-set",
                     f"{s['mean_tpe_best']:.4f} / {s['mean_random_best']:.4f} / {s['best_hand_set']:.4f}", "", ""])
        if "oracle_median_ratio" in s:
            rows.append([name, "lower bound for any searcher: best config found, run first (median ratio)",
                         s["oracle_median_ratio"], "", ""])
    elif name == "gpu_path":
        if r.get("skipped"):
            rows.append([name, "AMP on/off, 1/2/4 trials per GPU", f"skipped: {r.get('reason')}", "", ""])
        else:
            for a in r.get("amp", []):
                rows.append([name, f"AMP {a['amp']}: train samples/s (speed-up vs fp32)",
                             f"{common.fmt(a['samples_per_s'])} ({common.fmt(a['speedup_vs_fp32'])}x)", "", ""])
            for p in r.get("packing", []):
                k = p.get("trials_per_gpu", p.get("processes"))  # a sweep's trials, or trainers side by side
                rows.append([name, f"{k} trial(s) per GPU: aggregate samples/s (gain)",
                             f"{common.fmt(p['samples_per_s_wall'])} ({common.fmt(p['gain_wall'])}x)", "", ""])
    return rows


def main(argv=None) -> int:
    args = common.parse_args(__doc__.splitlines()[0], argv, extra=[
        (("--only",), {"help": "comma-separated benchmark names (default: all)"})])
    started = time.perf_counter()
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; known: {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    durations, failed = {}, []
    for name in names:
        cmd = [sys.executable, "-m", f"benchmarks.{name}", "--out", str(out)] + (["--quick"] if args.quick else [])
        print(f"\n=== {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=common.REPO)
        durations[name] = time.perf_counter() - t0
        if rc != 0:
            failed.append(name)
            print(f"=== {name} FAILED (exit {rc})", flush=True)
    rows = []
    for name in names:
        path = out / f"{name}.json"
        if name in failed or not path.is_file():
            rows.append([name, "(failed)", "-", "", ""])
            continue
        rows.extend(headline(name, json.loads(path.read_text())))
    headers = ["benchmark", "measure", "value", "goal", "status"]
    mode = "quick" if args.quick else "full"
    print(f"\n=== Summary ({mode} mode, {time.perf_counter() - started:.0f} s)")
    print(common.table(headers, rows))
    md = common.table(headers, rows, markdown=True)
    command = f".venv/bin/python -m benchmarks.run_all{' --quick' if args.quick else ''}"
    meta = common.machine_info()
    header = (f"`{command}` ({mode} mode) on {meta.get('cpu_count')} CPU cores"
              f"{', GPU ' + meta['gpu'] if meta.get('gpu') else ', no GPU'}, torch {meta.get('torch')}, "
              f"ray {meta.get('ray')}, optuna {meta.get('optuna')}, mlflow {meta.get('mlflow')}; "
              f"git {common.git_rev()}, {time.strftime('%Y-%m-%d')}, {time.perf_counter() - started:.0f} s in all.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(header + "\n\n" + md + "\n")
    common.write_result("summary", out, quick=args.quick, settings={"benchmarks": names},
                        results={"durations_s": durations, "failed": failed, "rows": rows, "markdown": md,
                                 "header": header},
                        goals=[], table_text=md, started=started, module="benchmarks.run_all")
    print(f"wrote {out / 'summary.md'} and {out / 'summary.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
