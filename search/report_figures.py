"""The report's figures: each section's content (:mod:`search.report_data`) drawn with :mod:`search.plots`
(the interval plot with :mod:`search.verify_plots`) and saved as ``<section key>.png`` in the report folder.
A figure that fails to draw is a note of its section; the rest of the report is still written."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from losstune.search import plots
from losstune.search.report_data import (Curves, History, Importance, Leaderboard, Panel, ParetoFront, ReportData,
                                         Section, Slices, TrialsPanel, Verification, VerifiedPanel)

logger = logging.getLogger("losstune.report")

FIGURES = ("leaderboard", "importance", "history", "slice", "pareto", "curves", "panel", "verification")


def leaderboard_figure(board: Leaderboard):
    rows = [{"rank": row.rank, "trial_id": row.trial_id + (" (MSE-only)" if row.mse_only else ""), **row.values,
             "epochs": row.epochs, "status": row.status} for row in board.rows]
    title = f"Top {len(rows)} of {board.total} trials by composite score"
    return plots.leaderboard_figure(rows, board.columns, title)


def pareto_figure(pareto: ParetoFront):
    return plots.pareto_figure(pareto.ranked, list(pareto.front["trial_id"]), pareto.metrics,
                               title=f"Pareto front ({len(pareto.front)} non-dominated of {len(pareto.ranked)} trials)")


def verification_figure(verification: Verification):
    if verification.summary is None:
        return None
    from losstune.search.verify_plots import interval_figure
    return interval_figure(verification.summary, verification.shown)


def panel_figure(panel: Panel):
    diffs = [(label, plots.gradient_difference(prediction, panel.target)) for label, prediction in panel.compared]
    return plots.panel_figure(panel.columns, diffs, title=panel.title)


def curves_figure(curves: Curves):
    return plots.curves_figure(curves.histories, curves.labels)


def importance_figure(importance: Importance):
    return plots.importance_figure(importance.importances)


def history_figure(history: History):
    return plots.history_figure(history.values, history.directions)


def slice_figure(slices: Slices):
    return plots.slice_figure(slices.ranked, slices.params, slices.log, highlight=slices.highlight,
                              order=slices.order)


DRAW: dict[type, Callable] = {Leaderboard: leaderboard_figure, ParetoFront: pareto_figure,
                              Verification: verification_figure, VerifiedPanel: panel_figure,
                              TrialsPanel: panel_figure, Curves: curves_figure, Importance: importance_figure,
                              History: history_figure, Slices: slice_figure}  # the figure of each kind of content


def draw_figures(data: ReportData, out_dir: Path) -> dict[str, Path]:
    """Draw and save the figure of every section that has content; section key -> PNG path."""
    images = {}
    for sec in data.sections:
        if sec.content is not None:
            _draw(sec, out_dir)
            if sec.image is not None:
                images[sec.key] = sec.image
    return images


def _draw(sec: Section, out_dir: Path) -> None:
    try:
        fig = DRAW[type(sec.content)](sec.content)
        if fig is not None:
            sec.image = plots.save_figure(fig, out_dir / f"{sec.key}.png")
    except Exception as err:  # noqa: BLE001 - one broken figure must not lose the report
        logger.warning("report: %s failed: %s: %s", sec.key, type(err).__name__, err)
        sec.notes.append(f"{sec.title}: could not be drawn ({type(err).__name__}: {err}).")
