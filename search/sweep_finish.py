"""The runner's last phase: what a sweep leaves once Tune has stopped (finished, Ctrl-C or failed).

Trials that did not end are marked interrupted, pending MLflow writes are flushed (and, after a killed
driver, filled in from Ray's results), ``trials.csv`` / ``pareto.csv`` / ``best.yaml`` written, the
summary printed, ``sweep.json`` and the parent run closed with the sweep's status.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from losstune.search.status import TrialStatus
from losstune.search.sweep_record import SweepOutcome, SweepRun
from losstune.search.tracking import SweepTracker, TrackingCallback, backfill_runs, best_effort
from losstune.search.trials import ResultsError, SweepResults, format_table, load_results, write_reports

logger = logging.getLogger("losstune")

FAILED_CLOSE_TIMEOUT_S = 10  # how long a failed sweep waits for pending MLflow writes


def record_failure(run: SweepRun, err: Exception) -> None:
    """The sweep failed while Tune ran: ``sweep.json`` says why, pending MLflow writes get a short
    while, the parent run ends FAILED."""
    run.record.status = "failed"
    run.record.error = f"{type(err).__name__}: {err}"
    run.write_record()
    callback = TrackingCallback.for_sweep(run.sweep_dir)
    if callback is not None:
        callback.close(timeout=FAILED_CLOSE_TIMEOUT_S)
    end_parent_run(run, TrialStatus.FAILED)


def end_parent_run(run: SweepRun, status: TrialStatus) -> None:
    """End the parent run (if any) with ``status``; a tracking error is printed, not raised."""
    tracker = run.tracker
    if tracker is not None:
        best_effort(lambda: tracker.finish(status.run_status), run.out)


def finish(run: SweepRun, grid: Any, callback: TrackingCallback | None) -> SweepOutcome:
    """Everything after Tune stopped (see the module docstring); ``grid``: Tune's result grid, if it
    returned one; ``callback``: the sweep's tracking callback (None: look it up)."""
    out, sweep_dir = run.out, run.sweep_dir
    num_samples = run.sweep.search.num_samples
    callback = callback or TrackingCallback.for_sweep(sweep_dir)
    results = _safe_results(sweep_dir)
    unfinished = []
    n_ended = 0
    if results is not None:
        statuses = callback.statuses() if callback is not None else {}
        ended = {t for t, st in statuses.items() if TrialStatus(st).ended}
        unfinished = [t for t in results.table["trial_id"] if t not in ended]
        n_ended = len(ended)
    interrupted = n_ended < num_samples
    stats: dict[str, Any] = {}
    if callback is not None:
        if interrupted:
            callback.mark_interrupted(unfinished)
        stats = callback.stats()
        callback.close(timeout=run.flush_timeout)
        stats.update(callback.stats())
    results = _safe_results(sweep_dir)  # again: the table reads the statuses and run ids just written
    if run.resume and run.tracking_uri and callback is not None and results is not None:
        _backfill(run, callback, results, stats)
    outcome = SweepOutcome(sweep_dir, "failed", results, [], run.record.parent_run_id, stats, grid)

    status = "failed"
    if results is not None:
        write_reports(results)
        if not results.ranked().empty:
            from losstune.search.export import export
            outcome.exported = export(sweep_dir, results=results)
            status = "interrupted" if interrupted else "finished"
        else:
            status = "interrupted" if interrupted else "failed"
        print_summary(results, outcome.exported, out)
    outcome.status = status
    run.record.status = status
    run.record.tracking = dict(stats)
    run.write_record()
    if run.tracker is not None:
        tracker = run.tracker
        best_effort(lambda: _finish_parent(tracker, results, outcome, status), out)
    if status == "finished" and run.sweep.verify is not None:
        from losstune.search.verify import verify_after_sweep
        outcome.verification = verify_after_sweep(sweep_dir, out)
    if status == "interrupted":
        out(f"[losstune] the sweep did not finish ({n_ended}/{num_samples} trials ended); "
            f"continue it with: losstune sweep --resume {sweep_dir}")
    return outcome


def _backfill(run: SweepRun, callback: TrackingCallback, results: SweepResults, stats: dict[str, Any]) -> None:
    """A SIGKILLed driver may have lost its last queued MLflow writes: fill them in from Ray's results."""
    counts = best_effort(lambda: backfill_runs(run.tracking_uri, callback.runs(), results.histories), run.out)
    if counts is not None:
        stats["backfilled_metrics"] = counts["metrics"]
        stats["backfilled_params"] = counts["params"]
        if counts["metrics"] or counts["params"] or counts["statuses"]:
            run.out(f"[losstune] MLflow: filled in {counts['metrics']} metric values, {counts['params']} params and "
                    f"{counts['statuses']} statuses lost by the interrupted run, from Ray's results")


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


def print_summary(results: SweepResults, exported: list[Path], out: Callable[[str], None]) -> None:
    """The end-of-sweep summary: trial counts, the top trials, the Pareto front, what to run next."""
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
    uri = results.info.tracking_uri
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
