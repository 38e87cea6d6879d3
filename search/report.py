"""``losstune report RESULTS_DIR``: one self-contained HTML page (+ the PNGs) about a sweep.

Written to ``RESULTS_DIR/report/`` (or ``--out``):

    report.html       everything below, images inlined as base64; no external JS/CSS, opens offline
    leaderboard.png   the top trials: loss weights and metrics (also an HTML table in the page)
    importance.png    Optuna's parameter importance (fANOVA) on the persisted study (optuna.journal)
    history.png       the optimisation history (objective per Optuna trial, best so far)
    slice.png         every searched parameter vs the composite score
    pareto.png        pareto sweeps: pairwise panels of the objectives, non-dominated trials highlighted
    curves.png        learning curves (composite, loss, val_loss per epoch) of the top trials
    panel.png         validation samples: input, baseline, best trial, an MSE-only trial, target and
                      the gradient-difference maps |∇pred| − |∇target| (the "visualise sharpness" view);
                      after a verification: the verified winner against its matched baseline (same lr,
                      same seed, every shaping weight 0)
    verification.png  after ``losstune verify``: each verified config's mean and 95 % interval per metric,
                      its matched baseline beside it (also a table and the verdict in the page)
    report.json       the best and MSE-only trial, whether it is verified, the figures and the notes

The content is typed data (:mod:`search.report_data`) built from the sweep by :mod:`search.report_builder`;
:mod:`search.report_figures` draws its figures, and the page is rendered from ``report.html.j2`` (beside this module).
The folder is then logged to the sweep's parent MLflow run (``report/``). Anything that cannot be drawn
(too few trials for the importance, no MSE-only trial ...) becomes a note in the page instead of an error.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import jinja2

from losstune.search.formatting import format_value
from losstune.search.report_study import MIN_IMPORTANCE_TRIALS, load_study, objective_names, param_importances
from losstune.search.predictions import run_predictions, trial_predictions
from losstune.search.report_builder import METRICS, build_report_data, is_mse_only
from losstune.search.report_data import ReportData
from losstune.search.report_figures import FIGURES, draw_figures
from losstune.search.trials import SweepResults, load_results
from losstune.search.verify_verdict import interval_text

# the report's names for its callers (cli, tests), wherever they are defined
__all__ = ["FIGURES", "METRICS", "MIN_IMPORTANCE_TRIALS", "REPORT_DIR", "REPORT_HTML", "ReportError",
           "ReportOutcome", "build_report", "is_mse_only", "load_study", "objective_names", "param_importances",
           "render_page", "run_predictions", "trial_predictions"]

REPORT_DIR = "report"
REPORT_HTML = "report.html"
TEMPLATE = "report.html.j2"


class ReportError(RuntimeError):
    """The report was written but could not be logged to MLflow (exit code 1)."""


@dataclass
class ReportOutcome:
    out_dir: Path
    html: Path
    images: dict[str, Path]
    notes: list[str]
    parent_run_id: str | None = None
    logged: bool = False


def mean_interval_text(d: Mapping[str, Any] | None) -> str:
    """``0.8123 [0.8011, 0.8235]`` (just the mean when there is no interval; ``-`` without a mean)."""
    if not d or not isinstance(d.get("mean"), (int, float)):
        return "-"
    if d.get("low") is None or d.get("high") is None:
        return f"{d['mean']:.4g}"
    return f"{d['mean']:.4g} [{d['low']:.4g}, {d['high']:.4g}]"


def render_page(data: ReportData) -> str:
    """The HTML page of the report (its figures already drawn: they are inlined)."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("losstune.search", "."),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters.update(fmt=format_value, mean_ci=mean_interval_text, interval=interval_text,
                       png_base64=lambda path: base64.b64encode(Path(path).read_bytes()).decode("ascii"))
    return env.get_template(TEMPLATE).render(data=data)


def build_report(sweep_dir: str | Path, out: str | Path | None = None, *, top_k: int = 10, curves_k: int = 5,
                 log_mlflow: bool = True, echo: Callable[[str], None] = print) -> ReportOutcome:
    """Write the report of a sweep folder and log it to the sweep's parent MLflow run.

    Raises :class:`~search.trials.ResultsError` (not a sweep folder; exit 2) and :class:`ReportError`
    (written, but MLflow refused it; exit 1).
    """
    if top_k < 1:
        raise ValueError("--top-k must be >= 1")
    results = load_results(sweep_dir)
    out_dir = Path(out).expanduser().resolve() if out else results.sweep_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:  # no stale figure from an earlier report
        (out_dir / f"{name}.png").unlink(missing_ok=True)
    data = build_report_data(results, top_k, curves_k)
    images = draw_figures(data, out_dir)
    notes = data.all_notes()
    html_path = out_dir / REPORT_HTML
    tmp = html_path.with_name(html_path.name + ".tmp")
    tmp.write_text(render_page(data), encoding="utf-8")
    tmp.replace(html_path)
    (out_dir / "report.json").write_text(json.dumps(
        {"sweep": results.name, "best_trial": data.best_id, "mse_only_trial": data.mse_id,
         "verified": data.verified, "images": {k: p.name for k, p in images.items()}, "notes": notes}, indent=1))
    outcome = ReportOutcome(out_dir, html_path, images, notes, results.info.parent_run_id)
    if log_mlflow:
        outcome.logged = _log_to_parent(results, out_dir, echo)
    return outcome


def _log_to_parent(results: SweepResults, out_dir: Path, echo: Callable[[str], None]) -> bool:
    uri, run_id = results.info.tracking_uri, results.info.parent_run_id
    if not uri or not run_id:
        echo("[losstune] MLflow was off for this sweep: the report is not logged to a run")
        return False
    from losstune.search.tracking import mlflow_client, set_retry_defaults
    set_retry_defaults()
    try:
        mlflow_client(uri).log_artifacts(run_id, str(out_dir), REPORT_DIR)
    except Exception as err:  # noqa: BLE001
        raise ReportError(f"the report is in {out_dir}, but logging it to MLflow run {run_id} at {uri} failed: "
                          f"{type(err).__name__}: {err}") from err
    echo(f"[losstune] report logged to MLflow run {run_id} (artifacts: {REPORT_DIR}/)")
    return True
