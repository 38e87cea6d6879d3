"""The verification stage: are the sweep's winning loss weights better than pixel-only at the same lr?

For each of the top-k configs of a sweep it trains, on fresh seeds, the config itself and its matched
baseline (every shaping weight 0; same lr, warm-up, model, epochs), then writes to ``<sweep_dir>/verify/``:

    summary.json   the statistics (search.verify_stats), the plan (configs, seeds, epochs) and every run
    verdict.txt    the verdict in words (search.verify_verdict)
    runs.csv       one row per (config, arm, seed): its run key, MLflow run id and last-epoch metrics
    round_<n>/     the Tune experiments of the runs (search.verify_runs)

and re-exports ``best.yaml`` as the config with the best verified mean objective (search.export). The
verdict also goes to the sweep's parent MLflow run (tag ``losstune.verdict``, artifacts ``verify/``).
``summary.json`` is written only once every planned run has finished: its presence means "verified".
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from losstune.search.trials import ResultsError, SweepResults, load_results
from losstune.search.verify_plan import (PlannedRun, VerifyInputError, fresh_seeds, plan, shaping_weights,
                                         top_trials)
from losstune.search.verify_runs import finished_runs, resumable_round, run_metrics, train_round, tune_root
from losstune.search.verify_stats import summarize
from losstune.search.verify_verdict import config_verdict, verdict

VERIFY_DIR = "verify"
SUMMARY_FILE = "summary.json"
VERDICT_FILE = "verdict.txt"
RUNS_CSV = "runs.csv"
VERDICT_TAG = "losstune.verdict"
MAX_TAG_CHARS = 5000


@dataclass
class VerifyOutcome:
    status: str  # verified | interrupted | failed
    verify_dir: Path
    summary: dict[str, Any] | None = None
    verdict: str | None = None
    exported: list[Path] = field(default_factory=list)
    missing: int = 0


def read_summary(sweep_dir: str | Path) -> dict[str, Any] | None:
    """The sweep's verification summary, or None where none has finished."""
    try:
        return json.loads((Path(sweep_dir) / VERIFY_DIR / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None


def _json_ready(value: Any) -> Any:
    """NaN / inf -> None (summary.json stays strict JSON); numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def settings(results: SweepResults, top_k: int | None, seeds: int | None) -> tuple[int, int, int]:
    """(top_k, seeds, epochs): the arguments, else the sweep's ``verify:`` section, else its defaults;
    checked against the sweep (raises :class:`VerifyInputError`, nothing written)."""
    from losstune.search.config import VerifySection
    if results.sweep is None:
        raise VerifyInputError(f"{results.sweep_dir}: the sweep config (sweep.yaml) is missing or invalid")
    section = results.sweep.file.verify or VerifySection()
    top_k = section.top_k if top_k is None else top_k
    seeds = section.seeds if seeds is None else seeds
    if top_k < 1:
        raise VerifyInputError(f"--top-k: must be >= 1 (got {top_k})")
    if seeds < 2:
        raise VerifyInputError(f"--seeds: {seeds} seed gives no confidence interval; use at least 2")
    top_trials(results, top_k)
    return top_k, seeds, section.epochs or results.sweep.epochs


def run_verification(results: SweepResults, top_k: int, n_seeds: int, epochs: int,
                     out: Callable[[str], None] = print) -> VerifyOutcome:
    """Train what is missing (Ray must be up), then write the summary, verdict and best.yaml."""
    sweep, info = results.sweep, results.info
    trial_ids = top_trials(results, top_k)
    seeds = fresh_seeds(results, n_seeds)
    planned = plan(results, trial_ids, seeds, epochs)
    verify_dir = results.sweep_dir / VERIFY_DIR
    root = tune_root(results.sweep_dir, info.tune_dir)
    done = finished_runs(root, verify_dir, epochs)
    todo = list({r.key: r for r in planned if r.key not in done}.values())
    reused = len({r.key for r in planned}) - len(todo)
    out(f"[losstune] verify {results.name}: top {top_k} configs x {n_seeds} fresh seeds {seeds} x (tuned, "
        f"matched baseline), {epochs} epochs" + (f"; {reused} runs already finished" if reused else ""))
    round_info: dict[str, Any] = {}
    options = {"root": root, "local_root": verify_dir, "epochs": epochs, "resources": sweep.resources.model_dump(),
               "max_concurrent": sweep.search.max_concurrent, "out": out,
               "tracking": {"uri": info.tracking_uri, "experiment_id": info.experiment_id,
                            "parent_run_id": info.parent_run_id, "store_process": sweep.file.mlflow.store_process,
                            "tags": {"losstune.task": str(sweep.base_train["task"]), "losstune.sweep": results.name}}}
    unfinished = resumable_round(root, verify_dir, set(done)) if todo else None
    if unfinished:
        round_info = train_round([], restore=unfinished, **options)
        done = finished_runs(root, verify_dir, epochs)
        todo = [r for r in todo if r.key not in done]
    if todo and not round_info.get("interrupted"):
        round_info = train_round(todo, **options)
        done = finished_runs(root, verify_dir, epochs)
    missing = [r for r in planned if r.key not in done]
    if missing:
        again = (f"losstune verify {results.sweep_dir} --top-k {top_k} --seeds {n_seeds}")
        status = "interrupted" if round_info.get("interrupted") else "failed"
        what = "was interrupted" if status == "interrupted" else "has failed runs (see their error.txt)"
        out(f"[losstune] the verification {what}: {len(missing)} of {len(planned)} planned runs have no result; "
            f"finished runs are kept. Continue it with: {again}")
        return VerifyOutcome(status, verify_dir, missing=len(missing))
    return _conclude(results, planned, done, top_k, seeds, epochs, verify_dir, out)


def _conclude(results: SweepResults, planned: list[PlannedRun], done: Mapping[str, Mapping[str, Any]],
              top_k: int, seeds: list[int], epochs: int, verify_dir: Path,
              out: Callable[[str], None]) -> VerifyOutcome:
    records = [{"trial_id": r.trial_id, "arm": r.arm, "seed": r.seed, "metrics": run_metrics(done[r.key])}
               for r in planned]
    stats = summarize(records, objective="composite", higher_is_better=True)
    weights = {tid: shaping_weights(results.trial_config(tid)) for tid in dict.fromkeys(r.trial_id for r in planned)}
    scores = {tid: float(v) for tid, v in zip(results.table["trial_id"], results.table["composite"])}
    text = verdict(stats, weights, scores)
    summary = {
        "sweep": results.name, "sweep_dir": str(results.sweep_dir), "top_k": top_k, "epochs": epochs,
        **stats,
        "weights": weights,
        "sweep_scores": {tid: scores.get(tid) for tid in weights},
        "verdicts": {c["trial_id"]: config_verdict(c, stats["objective"], weights[c["trial_id"]])
                     for c in stats["configs"]},
        "verdict": text,
        "runs": [{"trial_id": r.trial_id, "arm": r.arm, "seed": r.seed, "key": r.key,
                  "run_id": done[r.key].get("run_id"), "path": done[r.key].get("path"),
                  "diverged": done[r.key].get("diverged", False)} for r in planned],
        "verified_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    verify_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(verify_dir / RUNS_CSV, _runs_csv(planned, done))
    _write_atomic(verify_dir / VERDICT_FILE, text + "\n")
    _write_atomic(verify_dir / SUMMARY_FILE, json.dumps(_json_ready(summary), indent=1))  # last: "verified"
    out("[losstune] verification:\n" + "\n".join(f"  {line}" for line in text.splitlines()))
    outcome = VerifyOutcome("verified", verify_dir, summary, text)
    from losstune.search.export import ExportError, export
    try:
        outcome.exported = export(results.sweep_dir)
        out(f"[losstune] best config (best verified mean composite): {outcome.exported[0]}")
    except (ExportError, ResultsError) as err:
        out(f"[losstune] best.yaml not updated: {err}")
    _log_to_parent(results, verify_dir, text, outcome.exported, out)
    return outcome


def _runs_csv(planned: list[PlannedRun], done: Mapping[str, Mapping[str, Any]]) -> str:
    names = list(dict.fromkeys(k for r in planned for k in done[r.key]["metrics"]))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["trial_id", "arm", "seed", "key", "run_id", *names])
    for r in planned:
        run = done[r.key]
        writer.writerow([r.trial_id, r.arm, r.seed, r.key, run.get("run_id") or "",
                         *[run["metrics"].get(n, "") for n in names]])
    return buf.getvalue()


def _log_to_parent(results: SweepResults, verify_dir: Path, text: str, exported: list[Path],
                   out: Callable[[str], None]) -> None:
    uri, run_id = results.info.tracking_uri, results.info.parent_run_id
    if not uri or not run_id:
        return
    from mlflow import MlflowClient

    from losstune.search.tracking import set_retry_defaults
    set_retry_defaults()
    try:
        client = MlflowClient(uri)
        client.set_tag(run_id, VERDICT_TAG, text[:MAX_TAG_CHARS])
        for name in (SUMMARY_FILE, VERDICT_FILE, RUNS_CSV):
            client.log_artifact(run_id, str(verify_dir / name), VERIFY_DIR)
        for path in exported:  # replaces the sweep's unverified best.yaml
            client.log_artifact(run_id, str(path))
    except Exception as err:  # noqa: BLE001 - the verdict is on disk; MLflow is a copy
        out(f"[losstune] warning: the verdict is in {verify_dir}, but MLflow run {run_id} did not take it: "
            f"{type(err).__name__}: {err}")


def verify_after_sweep(sweep_dir: Path, out: Callable[[str], None] = print) -> VerifyOutcome | None:
    """The sweep's ``verify:`` section, run at the end of a finished sweep (Ray still up). Fewer ranked
    trials than ``top_k`` verify what there is; a failure is reported, the sweep's results stay."""
    try:
        results = load_results(sweep_dir)
        section = results.sweep.verify if results.sweep is not None else None
        if section is None:
            return None
        top_k = min(section.top_k, len(results.ranked()))
        if top_k < 1:
            out("[losstune] verify: no trial with a result to verify")
            return None
        if top_k < section.top_k:
            out(f"[losstune] verify: only {top_k} trial(s) with a result; verifying those (verify.top_k "
                f"{section.top_k})")
        return run_verification(results, top_k, section.seeds, section.epochs or results.sweep.epochs, out)
    except Exception as err:  # noqa: BLE001 - the sweep itself finished; its results stay usable
        out(f"[losstune] the verification failed: {type(err).__name__}: {err}; rerun it with: "
            f"losstune verify {sweep_dir}")
        return VerifyOutcome("failed", Path(sweep_dir) / VERIFY_DIR)


def verify_sweep(sweep_dir: str | Path, top_k: int | None = None, seeds: int | None = None, *,
                 address: str | None = None, out: Callable[[str], None] = print) -> VerifyOutcome:
    """``losstune verify``: check the request (:class:`VerifyInputError` / ``ResultsError``: exit 2, nothing
    written), start or join Ray like a sweep does, run the verification."""
    from losstune.search.interrupts import CTRL_C_NOTICE, first_ctrl_c_sets_event
    from losstune.search.ray_session import RaySession
    from losstune.search.tracking import TrackingUnavailable, check_tracking

    results = load_results(sweep_dir)
    top_k, seeds, epochs = settings(results, top_k, seeds)
    uri = results.info.tracking_uri
    if uri:
        try:
            check_tracking(uri)
        except TrackingUnavailable as err:
            raise VerifyInputError(str(err)) from None
    with first_ctrl_c_sets_event(CTRL_C_NOTICE) as ctrl_c:
        try:
            ray_session = RaySession.open(results.sweep, address)
        except Exception as err:  # noqa: BLE001
            raise VerifyInputError(f"Ray: cannot start or connect: {type(err).__name__}: {err}") from None
        with ray_session:
            if ctrl_c.is_set():
                raise KeyboardInterrupt
            return run_verification(results, top_k, seeds, epochs, out)
