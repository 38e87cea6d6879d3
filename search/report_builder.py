"""The report's data (:mod:`search.report_data`) built from a sweep: its results (:mod:`search.trials`),
its Optuna study (:mod:`search.report_study`), the trials' predictions (:mod:`search.predictions`) and the
verification summary (``verify/summary.json``), before anything is drawn or written.

Anything that cannot be shown (too few trials for the importance, no MSE-only trial ...) is a note of its
section, never an error: a section that fails to build becomes a note, the others are still there.
"""

from __future__ import annotations

import datetime as _dt
import logging
from typing import Any, Callable, Mapping

from losstune.search.formatting import format_value
from losstune.search.report_study import load_study, objective_history, objective_names, param_importances
from losstune.search.predictions import run_predictions, trial_predictions
from losstune.search.report_data import (BestTrial, Curves, Header, History, Importance, Leaderboard,
                                         LeaderboardRow, ParetoFront, ReportData, Section, SectionContent, Slices,
                                         TrialsPanel, Verification, VerificationRow, VerifiedPanel)
from losstune.search.study import study_file
from losstune.search.trials import SweepResults
from losstune.search.verify import read_summary
from losstune.search.verify_stats import BASELINE, TUNED
from losstune.search.verify_verdict import is_loss_value
from losstune.trainables.config import ConfigError
from losstune.trainables.terms import BUILTIN_TERMS, shaping_weight_names

logger = logging.getLogger("losstune.report")

METRICS = ("composite", "ssim", "mse", "psnr", "gradient_match")  # the leaderboard's metric columns
VERIFICATION_METRICS = 4  # the objective and the next metrics in the interval plot (the table has them all)


def is_mse_only(config: Mapping[str, Any]) -> bool:
    """Every shaping loss weight of the config's task (:mod:`trainables.terms`) 0 and an MSE pixel loss."""
    try:
        shaping = shaping_weight_names(config)
    except ConfigError:  # the plug-in task does not import here: the built-in shaping weights
        shaping = [term.weight_key for term in BUILTIN_TERMS if term.shaping]
    return (all(float(config.get(k) or 0.0) == 0.0 for k in shaping)
            and str(config.get("pixel_loss", "mse")) == "mse")


def _short_params(row: Mapping[str, Any], names: list[str], limit: int = 3) -> str:
    return ", ".join(f"{k.split('.')[-1]}={format_value(row.get(k))}" for k in names[:limit])


def build_report_data(results: SweepResults, top_k: int = 10, curves_k: int = 5) -> ReportData:
    """Every section of the report of ``results`` (the figures not drawn yet)."""
    return _Builder(results, top_k, curves_k).build()


class _Builder:
    def __init__(self, results: SweepResults, top_k: int, curves_k: int):
        self.results, self.top_k, self.curves_k = results, top_k, curves_k
        self.ranked = results.ranked()
        self.table = results.table.set_index("trial_id")
        self.params = list(results.param_names)
        configs: dict[str, dict[str, Any]] = {}
        for tid in results.table["trial_id"]:
            try:
                configs[tid] = results.trial_config(tid)
            except Exception:  # noqa: BLE001 - no sweep.yaml: fall back to the sampled values
                configs[tid] = dict(results.configs.get(tid) or {})
        self.best_id = self.ranked["trial_id"].iloc[0] if not self.ranked.empty else None
        mse_only = [t for t in self.ranked["trial_id"] if is_mse_only(configs.get(t, {}))]
        self.mse_id = mse_only[0] if mse_only else None
        self.summary = read_summary(results.sweep_dir)

    def build(self) -> ReportData:
        notes = []
        try:
            study = load_study(self.results)
        except Exception as err:  # noqa: BLE001 - a damaged study: the rest of the report still works
            study = None
            notes.append(f"Cannot open the Optuna study: {type(err).__name__}: {err}")
        pair = self.verified_pair()
        sections = [self.section("leaderboard", "Leaderboard", self.leaderboard)]
        if self.results.is_pareto:
            sections.append(self.section("pareto", "Pareto front", self.pareto))
        sections += [
            self.section("verification", "Verification: fresh seeds against the matched baseline", self.verification),
            self.section("panel", "Predictions: verified winner vs its matched baseline" if pair else
                         "Predictions: best vs MSE-only", lambda sec: self.panel(sec, pair)),
            self.section("curves", "Learning curves", self.curves),
            self.section("importance", "Parameter importance", lambda sec: self.importance(sec, study)),
            self.section("history", "Optimisation history", lambda sec: self.history(sec, study)),
            self.section("slice", "Loss weights vs score", self.slices)]
        return ReportData(self.header(), sections, self.best_id, self.mse_id, self.summary is not None, notes)

    @staticmethod
    def section(key: str, title: str, build: Callable[[Section], SectionContent | None]) -> Section:
        sec = Section(key, title)
        try:
            sec.content = build(sec)
        except Exception as err:  # noqa: BLE001 - one broken section must not lose the report
            logger.warning("report: %s failed: %s: %s", key, type(err).__name__, err)
            sec.notes.append(f"{title}: could not be drawn ({type(err).__name__}: {err}).")
        return sec

    def header(self) -> Header:
        r, info = self.results, self.results.info
        counts = r.table["status"].value_counts().to_dict() if not r.table.empty else {}
        best = None
        if self.best_id:
            row = self.table.loc[self.best_id]
            best = BestTrial(self.best_id, row, _short_params(row, self.params, len(self.params)),
                             r.sweep_dir / "best.yaml")
        headline = None
        if self.summary is not None:
            lines = (self.summary.get("verdict") or "").splitlines()[:1]
            headline = lines[0] if lines else ""
        return Header(
            name=r.name, sweep_dir=r.sweep_dir, status=str(info.status or "?"),
            status_counts=sorted(counts.items()), trials=len(r.table),
            objective=str((info.objective or {}).get("type", "composite")),
            task=str(r.sweep.base_train.get("task") if r.sweep else "?"),
            max_epochs=info.max_epochs if info.max_epochs is not None else "?",
            experiment=info.experiment, parent_run_id=info.parent_run_id,
            tracking_uri=info.tracking_uri,
            generated=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            best=best, verified_headline=headline)

    # ----- sections -------------------------------------------------------------------------------------------
    def leaderboard(self, sec: Section) -> Leaderboard:
        sec.inline = False
        rows = [LeaderboardRow(rank, r["trial_id"], r["trial_id"] == self.mse_id,
                               {c: r.get(c) for c in (*self.params, *METRICS)}, int(r.get("epochs") or 0),
                               str(r["status"]))
                for rank, (_, r) in enumerate(self.ranked.head(self.top_k).iterrows(), start=1)]
        table = self.results.table
        others = table[~table["trial_id"].isin(self.ranked["trial_id"])]
        if not others.empty:
            listed = ", ".join(f"{t} ({s})" for t, s in zip(others["trial_id"], others["status"]))
            sec.notes.append(f"Not ranked (diverged, failed or without a result): {listed}.")
        if self.ranked.empty:
            sec.notes.append("No trial has a usable score yet.")
        return Leaderboard(self.params, METRICS, rows, len(table))

    def pareto(self, sec: Section) -> ParetoFront:
        metrics = self.results.objective_metrics()
        order = [n for n in objective_names(self.results, None) if n in metrics]
        metrics = {n: metrics[n] for n in order + [m for m in metrics if m not in order]}
        return ParetoFront(metrics, self.params, self.results.pareto_front(), self.ranked)

    def verification(self, sec: Section) -> Verification:
        s = self.summary
        if s is None:
            return Verification(self.results.sweep_dir, None)
        objective = s["objective"]
        metrics = [m for m in s["metrics"] if not is_loss_value(m)]
        rows = [VerificationRow(c["trial_id"], j == 0, m, c[TUNED].get(m), c[BASELINE].get(m),
                                c["difference"].get(m) or {}, c.get("mean_rank"),
                                highlight=c is s["configs"][0] and m == objective)
                for c in s["configs"] for j, m in enumerate(metrics)]
        shown = [objective] + [m for m in metrics if m != objective][:VERIFICATION_METRICS - 1]
        return Verification(self.results.sweep_dir, s, rows, shown)

    def verified_pair(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The verified winner's tuned and baseline runs of its first seed (same lr, same seed)."""
        if self.summary is None or not self.summary.get("configs"):
            return None
        winner = self.summary["configs"][0]
        seed = winner["seeds"][0]
        runs = {r["arm"]: r for r in self.summary.get("runs", [])
                if r["trial_id"] == winner["trial_id"] and r["seed"] == seed}
        return (runs[TUNED], runs[BASELINE]) if TUNED in runs and BASELINE in runs else None

    def panel(self, sec: Section, pair) -> VerifiedPanel | TrialsPanel | None:
        if pair is not None:
            verified = self.verified_panel(sec, *pair)
            if verified is not None:
                return verified
        if self.best_id is None:
            sec.notes.append("No ranked trial: no predictions to show.")
            return None
        best, where = trial_predictions(self.results, self.best_id)
        if best is None:
            sec.notes.append(f"The best trial {self.best_id} left no predictions ({where}).")
            return None
        columns = [("input", best["input"]), ("baseline", best["baseline"]),
                   (f"best: {self.best_id}", best["prediction"])]
        compared = [(f"∇ diff best {self.best_id}", best["prediction"])]
        mse_shown = False
        if self.mse_id is None:
            sec.notes.append("No MSE-only trial in this sweep (a trial with gradient, perceptual and intensity "
                             "weights 0): add one to search.points_to_evaluate to compare against it.")
        elif self.mse_id != self.best_id:
            mse, why = trial_predictions(self.results, self.mse_id)
            if mse is None:
                sec.notes.append(f"The MSE-only trial {self.mse_id} left no predictions ({why}).")
            elif mse["prediction"].shape != best["prediction"].shape:
                sec.notes.append(f"The MSE-only trial {self.mse_id} predicted different samples; not shown.")
            else:
                columns.append((f"MSE-only: {self.mse_id}", mse["prediction"]))
                compared.append((f"∇ diff MSE-only {self.mse_id}", mse["prediction"]))
                mse_shown = True
        columns.append(("target", best["target"]))
        title = f"Validation samples (first {len(best['target'])}) at the trials' last epoch"
        return TrialsPanel(columns, compared, best["target"], title, self.best_id,
                           _short_params(self.table.loc[self.best_id], self.params), self.mse_id, mse_shown)

    def verified_panel(self, sec: Section, tuned: Mapping[str, Any], baseline: Mapping[str, Any]
                       ) -> VerifiedPanel | None:
        ours, where = run_predictions(self.results, tuned.get("path"))
        theirs, why = run_predictions(self.results, baseline.get("path"))
        if ours is None or theirs is None:
            sec.notes.append(f"The verification runs left no predictions ({where if ours is None else why}); "
                             "showing the sweep's trials instead.")
            return None
        trial, seed = tuned["trial_id"], tuned["seed"]
        columns = [("input", ours["input"]), ("baseline", ours["baseline"]), (f"winner {trial}", ours["prediction"]),
                   ("matched baseline", theirs["prediction"]), ("target", ours["target"])]
        compared = [(f"∇ diff winner {trial}", ours["prediction"]),
                    ("∇ diff matched baseline", theirs["prediction"])]
        title = f"Validation samples (first {len(ours['target'])}), verification seed {seed}"
        return VerifiedPanel(columns, compared, ours["target"], title, trial, seed)

    def curves(self, sec: Section) -> Curves | None:
        ids = list(self.ranked["trial_id"].head(self.curves_k))
        if self.mse_id and self.mse_id not in ids:
            ids.append(self.mse_id)
        hist = {t: self.results.histories.get(t) or [] for t in ids}
        if not any(hist.values()):
            sec.notes.append("No per-epoch results to plot.")
            return None
        labels = {}
        for rank, t in enumerate(ids, start=1):
            tag = "MSE-only" if t == self.mse_id else f"#{rank}"
            labels[t] = f"{tag} {t} ({_short_params(self.table.loc[t], self.params, 2)})"
        return Curves(hist, labels, min(self.curves_k, len(self.ranked)),
                      bool(self.mse_id and self.mse_id in ids[self.curves_k:]))

    def importance(self, sec: Section, study) -> Importance | None:
        if study is None:
            sec.notes.append(f"No Optuna study found in {study_file(self.results.sweep_dir)}.")
            return None
        imps, notes = param_importances(study, objective_names(self.results, study))
        sec.notes.extend(notes)
        return Importance(imps) if imps else None

    def history(self, sec: Section, study) -> History | None:
        if study is None:
            sec.notes.append("No Optuna study: no optimisation history.")
            return None
        values, directions = objective_history(study, objective_names(self.results, study))
        if not any(values.values()):
            sec.notes.append("No complete trial in the Optuna study yet.")
            return None
        return History(values, directions)

    def slices(self, sec: Section) -> Slices | None:
        if self.ranked.empty or not self.params:
            sec.notes.append("Nothing to plot (no ranked trial or no searched parameter).")
            return None
        specs = self.results.sweep.params if self.results.sweep is not None else {}
        log = [p for p, s in specs.items() if getattr(s, "log", False)]
        highlight = {}
        if self.mse_id:
            highlight[self.mse_id] = "MSE-only"
        if self.best_id:
            highlight[self.best_id] = "best"
        return Slices(self.ranked, self.params, log, highlight, self.start_order())

    def start_order(self) -> dict[str, int]:
        """trial id -> rank of its first result's time (when it started, roughly)."""
        starts = {}
        for tid, hist in self.results.histories.items():
            if hist:
                first = hist[0]
                starts[tid] = float(first.get("timestamp") or 0) - float(first.get("time_this_iter_s") or 0)
        return {tid: i for i, tid in enumerate(sorted(starts, key=lambda t: (starts[t], t)))}
