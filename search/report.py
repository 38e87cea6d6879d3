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

The predictions come from the trials' last checkpoints (``predictions.npz``, written by every trial at
every epoch, see :mod:`search.trainable`); for sweeps run before that, they are recomputed from the
checkpoint's ``state.pt``. The folder is then logged to the sweep's parent MLflow run (``report/``).
Anything that cannot be drawn (too few trials for the importance, no MSE-only trial ...) becomes a note
in the page instead of an error.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import math
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from losstune.search import artifacts, plots
from losstune.search.formatting import format_value
from losstune.search.study import OPTUNA_JOURNAL
from losstune.search.trials import SweepResults, load_results
from losstune.trainables.config import ConfigError
from losstune.trainables.terms import BUILTIN_TERMS, shaping_weight_names
from losstune.search.verify import read_summary
from losstune.search.verify_stats import BASELINE, TUNED
from losstune.search.verify_verdict import interval_text, is_loss_value

logger = logging.getLogger("losstune.report")

REPORT_DIR = "report"
REPORT_HTML = "report.html"
METRICS = ("composite", "ssim", "mse", "psnr", "gradient_match")
MIN_IMPORTANCE_TRIALS = 2
FIGURES = ("leaderboard", "importance", "history", "slice", "pareto", "curves", "panel", "verification")
VERIFICATION_METRICS = 4  # the objective and the next metrics in the interval plot (the table has them all)


class ReportError(RuntimeError):
    """The report was written but could not be logged to MLflow (exit code 1)."""


@dataclass
class Section:
    key: str
    title: str
    text: str = ""
    image: Path | None = None
    notes: list[str] = field(default_factory=list)
    html: str = ""
    inline: bool = True  # show ``image`` in the page (the leaderboard is there as an HTML table already)


@dataclass
class ReportOutcome:
    out_dir: Path
    html: Path
    images: dict[str, Path]
    notes: list[str]
    parent_run_id: str | None = None
    logged: bool = False


# ----- finding the trials' predictions ------------------------------------------------------------------
def is_mse_only(config: Mapping[str, Any]) -> bool:
    """Every shaping loss weight of the config's task (:mod:`trainables.terms`) 0 and an MSE pixel loss."""
    try:
        shaping = shaping_weight_names(config)
    except ConfigError:  # the plug-in task does not import here: the built-in shaping weights
        shaping = [term.weight_key for term in BUILTIN_TERMS if term.shaping]
    return (all(float(config.get(k) or 0.0) == 0.0 for k in shaping)
            and str(config.get("pixel_loss", "mse")) == "mse")


def _fs_for(results: SweepResults):
    from losstune.search.trials import fs_and_path
    return fs_and_path(results.info.get("tune_dir") or str(results.sweep_dir))[0]


def _checkpoints(fs, trial_path: str) -> list[str]:
    """The trial's checkpoint folders, newest first."""
    import pyarrow.fs as pafs
    try:
        entries = fs.get_file_info(pafs.FileSelector(trial_path, allow_not_found=True))
    except OSError:
        return []
    dirs = [e for e in entries if e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint_")]
    return [e.path for e in sorted(dirs, key=lambda e: e.base_name, reverse=True)]


def _read_bytes(fs, path: str) -> bytes | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (FileNotFoundError, OSError):
        return None


def run_predictions(results: SweepResults, run_path: str | None) -> tuple[dict[str, np.ndarray] | None, str]:
    """(arrays, where) of a verification run's last checkpoint (``predictions.npz``), or (None, why not)."""
    if not run_path:
        return None, "no run folder"
    fs = _fs_for(results)
    found = _newest_predictions(fs, _checkpoints(fs, run_path))
    return found if found is not None else (None, "no predictions.npz in its checkpoints")


def _newest_predictions(fs, ckpts: list[str]) -> tuple[dict[str, np.ndarray], str] | None:
    """(arrays, where) of the newest readable ``predictions.npz`` among ``ckpts`` (newest first), or None."""
    for ckpt in ckpts:
        data = _read_bytes(fs, f"{ckpt}/{artifacts.PREDICTIONS_NPZ}")
        if data is not None:
            try:
                return artifacts.load_predictions(io.BytesIO(data)), f"{ckpt}/{artifacts.PREDICTIONS_NPZ}"
            except (OSError, ValueError) as err:
                logger.warning("%s/%s unreadable: %s", ckpt, artifacts.PREDICTIONS_NPZ, err)
    return None


def trial_predictions(results: SweepResults, trial_id: str, recompute: bool = True
                      ) -> tuple[dict[str, np.ndarray] | None, str]:
    """(arrays, where they came from) of a trial's last checkpoint, or (None, why not)."""
    row = results.table.set_index("trial_id").loc[trial_id]
    path = row.get("path")
    if not isinstance(path, str) or not path:
        return None, "no trial folder"
    fs = _fs_for(results)
    ckpts = _checkpoints(fs, path)
    if not ckpts:
        return None, "no checkpoint"
    found = _newest_predictions(fs, ckpts)
    if found is not None:
        return found
    if not recompute:
        return None, "no predictions.npz in its checkpoints"
    # an older sweep: rebuild the model from the newest checkpoint's state.pt
    state = _read_bytes(fs, f"{ckpts[0]}/state.pt")
    if state is None:
        return None, "no predictions.npz or state.pt in its checkpoints"
    try:
        from losstune.trainables.loop import Trainer
        with tempfile.TemporaryDirectory(prefix="losstune-report-") as tmp:
            (Path(tmp) / "state.pt").write_bytes(state)
            trainer = Trainer(results.trial_config(trial_id))
            trainer.load(tmp)
            arrays = {k: v.numpy() for k, v in trainer.predict_val(artifacts.NUM_SAMPLES).items()}
        return arrays, f"recomputed from {ckpts[0]}/state.pt"
    except Exception as err:  # noqa: BLE001 - a report must not fail on one trial
        return None, f"cannot recompute from state.pt ({type(err).__name__}: {err})"


# ----- the study ------------------------------------------------------------------------------------------
def load_study(results: SweepResults):
    """The persisted Optuna study of the sweep (``search.study``); None if there is none."""
    from losstune.search import study
    return study.load_study(results.sweep_dir, results.info.get("optuna_study") or results.name)


def objective_names(results: SweepResults, study) -> list[str]:
    """The study's objectives in Optuna's order (sweep.json's copy of the metrics is key-sorted: not that)."""
    if study is not None and study.metric_names:
        return list(study.metric_names)
    if results.sweep is not None:
        metric = results.sweep.metric_mode()[0]
        names = [metric] if isinstance(metric, str) else list(metric)
    else:
        names = list(results.objective_metrics())
    if study is not None and len(study.directions) != len(names):
        names = [f"objective_{i}" for i in range(len(study.directions))] if len(study.directions) > 1 \
            else ["composite"]
    return names


def param_importances(study, names: list[str]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Optuna's fANOVA importances per objective, or ({}, notes) when they cannot be computed."""
    import optuna
    from optuna.trial import TrialState
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if len(complete) < MIN_IMPORTANCE_TRIALS:
        return {}, [f"Parameter importance needs at least {MIN_IMPORTANCE_TRIALS} complete trials in the "
                    f"Optuna study; it has {len(complete)}. Run more trials (or --resume the sweep)."]
    out: dict[str, dict[str, float]] = {}
    notes = []
    multi = len(study.directions) > 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, name in enumerate(names):
            try:
                kwargs = {"target": (lambda t, i=i: t.values[i]), } if multi else {}
                imp = optuna.importance.get_param_importances(
                    study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), **kwargs)
            except Exception as err:  # noqa: BLE001 - e.g. every trial has the same params
                notes.append(f"Parameter importance for {name} could not be computed: {type(err).__name__}: {err}")
                continue
            if imp:
                out[name] = {k: float(v) for k, v in imp.items()}
            else:
                notes.append(f"Parameter importance for {name}: no parameter varies across the complete trials.")
    return out, notes


# ----- helpers ---------------------------------------------------------------------------------------------
def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _mean_ci(d: Mapping[str, Any] | None) -> str:
    if not d or not isinstance(d.get("mean"), (int, float)):
        return "-"
    if d.get("low") is None or d.get("high") is None:
        return f"{d['mean']:.4g}"
    return f"{d['mean']:.4g} [{d['low']:.4g}, {d['high']:.4g}]"


def _short(params: Mapping[str, Any], names: list[str], limit: int = 3) -> str:
    return ", ".join(f"{k.split('.')[-1]}={format_value(params.get(k))}" for k in names[:limit])


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;color:#1d2733;
padding:0 16px;line-height:1.45}
h1{font-size:1.6em;margin-bottom:4px}h2{font-size:1.2em;border-bottom:1px solid #d5dde6;padding-bottom:4px;margin-top:32px}
.meta{color:#5b6b7c;font-size:.9em}.meta code{background:#eef2f6;padding:1px 4px;border-radius:3px}
.scroll{overflow-x:auto}table.lb{border-collapse:collapse;font-size:.8em;margin:8px 0}
table.lb th,table.lb td{border:1px solid #d5dde6;padding:3px 8px;text-align:right;white-space:nowrap}
table.lb th{background:#eef2f6}table.lb td.l{text-align:left}table.lb tr.best td{background:#fff6d5}
table.lb tr.mse td.tag{color:#b35c00}
img{max-width:100%;height:auto;border:1px solid #e3e8ee;margin:6px 0}
.note{background:#fff8e6;border-left:4px solid #f0b429;padding:6px 10px;margin:8px 0;font-size:.9em}
figure{margin:0}figcaption{color:#5b6b7c;font-size:.85em}
"""


class _Builder:
    def __init__(self, results: SweepResults, out_dir: Path, top_k: int, curves_k: int):
        self.results, self.out_dir, self.top_k, self.curves_k = results, out_dir, top_k, curves_k
        self.sections: list[Section] = []
        self.images: dict[str, Path] = {}
        self.notes: list[str] = []
        self.ranked = results.ranked()
        self.params = list(results.param_names)
        self.configs: dict[str, dict[str, Any]] = {}
        for tid in results.table["trial_id"]:
            try:
                self.configs[tid] = results.trial_config(tid)
            except Exception:  # noqa: BLE001 - no sweep.yaml: fall back to the sampled values
                self.configs[tid] = dict(results.configs.get(tid) or {})
        self.best_id = self.ranked["trial_id"].iloc[0] if not self.ranked.empty else None
        mse_only = [t for t in self.ranked["trial_id"] if is_mse_only(self.configs.get(t, {}))]
        self.mse_id = mse_only[0] if mse_only else None
        self.summary = read_summary(results.sweep_dir)

    def _save(self, key: str, fig) -> Path:
        path = plots.save_figure(fig, self.out_dir / f"{key}.png")
        self.images[key] = path
        return path

    def _section(self, key: str, title: str, draw: Callable[[Section], None]) -> Section:
        sec = Section(key, title)
        try:
            draw(sec)
        except Exception as err:  # noqa: BLE001 - one broken figure must not lose the report
            logger.warning("report: %s failed: %s: %s", key, type(err).__name__, err)
            sec.notes.append(f"{title}: could not be drawn ({type(err).__name__}: {err}).")
        self.sections.append(sec)
        self.notes.extend(sec.notes)
        return sec

    # ----- sections ---------------------------------------------------------------------------------------
    def leaderboard(self, sec: Section) -> None:
        top = self.ranked.head(self.top_k)
        cols = ["rank", "trial_id", *self.params, *METRICS, "epochs", "status"]
        rows = []
        for rank, (_, r) in enumerate(top.iterrows(), start=1):
            row = {"rank": rank, **{c: r.get(c) for c in cols if c != "rank"}}
            row["trial_id"] = f"{r['trial_id']}" + (" (MSE-only)" if r["trial_id"] == self.mse_id else "")
            rows.append(row)
        title = f"Top {len(rows)} of {len(self.results.table)} trials by composite score"
        sec.image = self._save("leaderboard", plots.leaderboard_figure(rows, cols, title))
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = []
        for rank, (_, r) in enumerate(top.iterrows(), start=1):
            klass = "best" if rank == 1 else ("mse" if r["trial_id"] == self.mse_id else "")
            cells = [f"<td>{rank}</td>", f'<td class="l tag">{html.escape(str(r["trial_id"]))}'
                     + (" <small>(MSE-only)</small>" if r["trial_id"] == self.mse_id else "") + "</td>"]
            cells += [f'<td class="l">{html.escape(format_value(r.get(c)))}</td>' for c in self.params]
            cells += [f"<td>{html.escape(format_value(r.get(c)))}</td>" for c in METRICS]
            cells += [f"<td>{int(r.get('epochs') or 0)}</td>", f'<td class="l">{html.escape(str(r["status"]))}</td>']
            body.append(f'<tr class="{klass}">' + "".join(cells) + "</tr>")
        sec.html = (f'<div class="scroll"><table class="lb" id="leaderboard"><tr>{head}</tr>{"".join(body)}</table></div>'
                    '<p class="meta">The same table as an image: <a href="leaderboard.png">leaderboard.png</a> '
                    '(beside this page).</p>')
        sec.inline = False
        others = self.results.table[~self.results.table["trial_id"].isin(self.ranked["trial_id"])]
        if not others.empty:
            listed = ", ".join(f"{t} ({s})" for t, s in zip(others["trial_id"], others["status"]))
            sec.notes.append(f"Not ranked (diverged, failed or without a result): {listed}.")
        if self.ranked.empty:
            sec.notes.append("No trial has a usable score yet.")

    def importance(self, sec: Section, study) -> None:
        if study is None:
            sec.notes.append(f"No Optuna study found in {self.results.sweep_dir / OPTUNA_JOURNAL}.")
            return
        names = objective_names(self.results, study)
        imps, notes = param_importances(study, names)
        sec.notes.extend(notes)
        if imps:
            sec.image = self._save("importance", plots.importance_figure(imps))
            sec.text = ("Optuna's fANOVA importance on the persisted study: the share of the objective's variance "
                        "explained by each parameter (with few trials, a rough guide only).")

    def history(self, sec: Section, study) -> None:
        if study is None:
            sec.notes.append("No Optuna study: no optimisation history.")
            return
        from optuna.study import StudyDirection
        from optuna.trial import TrialState
        names = objective_names(self.results, study)
        values: dict[str, list[tuple[int, float]]] = {n: [] for n in names}
        for t in study.trials:
            if t.state == TrialState.COMPLETE and t.values:
                for n, v in zip(names, t.values):
                    if _num(v) is not None:
                        values[n].append((t.number, float(v)))
        if not any(values.values()):
            sec.notes.append("No complete trial in the Optuna study yet.")
            return
        directions = {n: "max" if d == StudyDirection.MAXIMIZE else "min" for n, d in zip(names, study.directions)}
        sec.image = self._save("history", plots.history_figure(values, directions))

    def slices(self, sec: Section) -> None:
        if self.ranked.empty or not self.params:
            sec.notes.append("Nothing to plot (no ranked trial or no searched parameter).")
            return
        specs = self.results.sweep.params if self.results.sweep is not None else {}
        log = [p for p, s in specs.items() if getattr(s, "log", False)]
        highlight = {}
        if self.mse_id:
            highlight[self.mse_id] = "MSE-only"
        if self.best_id:
            highlight[self.best_id] = "best"
        sec.image = self._save("slice", plots.slice_figure(self.ranked, self.params, log, highlight=highlight,
                                                           order=self.start_order()))
        sec.text = "Each searched parameter against the composite score of every ranked trial (colour: start order)."

    def start_order(self) -> dict[str, int]:
        """trial id -> rank of its first result's time (when it started, roughly)."""
        starts = {}
        for tid, hist in self.results.histories.items():
            if hist:
                first = hist[0]
                starts[tid] = float(first.get("timestamp") or 0) - float(first.get("time_this_iter_s") or 0)
        return {tid: i for i, tid in enumerate(sorted(starts, key=lambda t: (starts[t], t)))}

    def pareto(self, sec: Section) -> None:
        metrics = self.results.objective_metrics()
        order = [n for n in objective_names(self.results, None) if n in metrics]
        metrics = {n: metrics[n] for n in order + [m for m in metrics if m not in order]}
        front = self.results.pareto_front()
        sec.image = self._save("pareto", plots.pareto_figure(self.ranked, list(front["trial_id"]), metrics,
                                                             title=f"Pareto front ({len(front)} non-dominated "
                                                                   f"of {len(self.ranked)} trials)"))
        rows = "".join(f"<tr><td class='l'>{html.escape(str(r['trial_id']))}</td>"
                       + "".join(f"<td>{format_value(r.get(m))}</td>" for m in metrics)
                       + "".join(f"<td class='l'>{html.escape(format_value(r.get(p)))}</td>" for p in self.params) + "</tr>"
                       for _, r in front.iterrows())
        head = "".join(f"<th>{html.escape(c)}</th>" for c in ["trial_id", *metrics, *self.params])
        sec.html = f'<div class="scroll"><table class="lb" id="pareto"><tr>{head}</tr>{rows}</table></div>'

    def curves(self, sec: Section) -> None:
        ids = list(self.ranked["trial_id"].head(self.curves_k))
        if self.mse_id and self.mse_id not in ids:
            ids.append(self.mse_id)
        hist = {t: self.results.histories.get(t) or [] for t in ids}
        if not any(hist.values()):
            sec.notes.append("No per-epoch results to plot.")
            return
        table = self.results.table.set_index("trial_id")
        labels = {}
        for rank, t in enumerate(ids, start=1):
            tag = "MSE-only" if t == self.mse_id else f"#{rank}"
            labels[t] = f"{tag} {t} ({_short(table.loc[t], self.params, 2)})"
        sec.image = self._save("curves", plots.curves_figure(hist, labels))
        sec.text = f"Per-epoch composite score and losses of the top {min(self.curves_k, len(self.ranked))} trials" \
                   + (" and the best MSE-only trial." if self.mse_id and self.mse_id in ids[self.curves_k:] else ".")

    def verification(self, sec: Section) -> None:
        s = self.summary
        if s is None:
            sec.text = ("Not verified: nothing says yet whether the best loss weights beat pixel-only at the same lr "
                        "or are a lucky seed. Run: <code>losstune verify "
                        f"{html.escape(str(self.results.sweep_dir))}</code>")
            return
        objective = s["objective"]
        metrics = [m for m in s["metrics"] if not is_loss_value(m)]
        sec.text = (f"The top {len(s['configs'])} configs and their matched baselines (same config, every shaping "
                    f"weight 0: same lr, warm-up, model) re-trained on {len(s['seeds'])} fresh seeds "
                    f"({', '.join(map(str, s['seeds']))}) for {s.get('epochs')} epochs. Mean [95 % t-interval] "
                    "over the seeds; the difference is paired by seed (config − baseline). Verdict:<br>"
                    + "<br>".join(html.escape(line) for line in s.get("verdict", "").splitlines()))
        head = ("<tr><th>trial</th><th>metric</th><th>config</th><th>matched baseline</th>"
                "<th>difference (paired)</th><th>mean rank</th></tr>")
        rows = []
        for c in s["configs"]:
            for j, m in enumerate(metrics):
                diff = c["difference"].get(m) or {}
                mark = " <b>*</b>" if diff.get("excludes_zero") else ""
                rows.append("<tr" + (' class="best"' if c is s["configs"][0] and m == objective else "") + ">"
                            + f'<td class="l">{html.escape(c["trial_id"]) if j == 0 else ""}</td>'
                            + f'<td class="l">{html.escape(m)}</td>'
                            + "".join(f"<td>{html.escape(_mean_ci(c[arm].get(m)))}</td>" for arm in (TUNED, BASELINE))
                            + f"<td>{html.escape(interval_text(diff)) if diff else '-'}{mark}</td>"
                            + f"<td>{format_value(c.get('mean_rank')) if j == 0 else ''}</td></tr>")
        sec.html = (f'<div class="scroll"><table class="lb">{head}{"".join(rows)}</table></div>'
                    "<p class='meta'><b>*</b> the paired interval excludes 0. Loss values are not compared: they "
                    "differ between a config and its baseline by construction.</p>")
        shown = [objective] + [m for m in metrics if m != objective][:VERIFICATION_METRICS - 1]
        from losstune.search.verify_plots import interval_figure
        sec.image = self._save("verification", interval_figure(s, shown))

    def _verified_pair(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The verified winner's tuned and baseline runs of its first seed (same lr, same seed)."""
        if self.summary is None or not self.summary.get("configs"):
            return None
        winner = self.summary["configs"][0]
        seed = winner["seeds"][0]
        runs = {r["arm"]: r for r in self.summary.get("runs", [])
                if r["trial_id"] == winner["trial_id"] and r["seed"] == seed}
        return (runs[TUNED], runs[BASELINE]) if TUNED in runs and BASELINE in runs else None

    def verified_panel(self, sec: Section, tuned: Mapping[str, Any], baseline: Mapping[str, Any]) -> bool:
        ours, where = run_predictions(self.results, tuned.get("path"))
        theirs, why = run_predictions(self.results, baseline.get("path"))
        if ours is None or theirs is None:
            sec.notes.append(f"The verification runs left no predictions ({where if ours is None else why}); "
                             "showing the sweep's trials instead.")
            return False
        trial, seed = tuned["trial_id"], tuned["seed"]
        columns = [("input", ours["input"]), ("baseline", ours["baseline"]), (f"winner {trial}", ours["prediction"]),
                   ("matched baseline", theirs["prediction"]), ("target", ours["target"])]
        diffs = [(f"∇ diff winner {trial}", plots.gradient_difference(ours["prediction"], ours["target"])),
                 ("∇ diff matched baseline", plots.gradient_difference(theirs["prediction"], ours["target"]))]
        sec.image = self._save("panel", plots.panel_figure(
            columns, diffs, title=f"Validation samples (first {len(ours['target'])}), verification seed {seed}"))
        sec.text = (f"The verified winner <b>{html.escape(trial)}</b> against its matched baseline: the same config "
                    f"with every shaping weight 0, same lr and warm-up, both trained on seed {seed}. The "
                    "gradient-difference maps show |∇pred| − |∇target|: red where the prediction is sharper than the "
                    "target, blue where it is blurrier (over-smoothing).")
        return True

    def panel(self, sec: Section) -> None:
        pair = self._verified_pair()
        if pair is not None and self.verified_panel(sec, *pair):
            return
        if self.best_id is None:
            sec.notes.append("No ranked trial: no predictions to show.")
            return
        best, where = trial_predictions(self.results, self.best_id)
        if best is None:
            sec.notes.append(f"The best trial {self.best_id} left no predictions ({where}).")
            return
        columns = [("input", best["input"]), ("baseline", best["baseline"]),
                   (f"best: {self.best_id}", best["prediction"])]
        diffs = [(f"∇ diff best {self.best_id}", plots.gradient_difference(best["prediction"], best["target"]))]
        text = [f"Best trial <b>{html.escape(self.best_id)}</b> "
                f"({html.escape(_short(self.results.table.set_index('trial_id').loc[self.best_id], self.params))})."]
        if self.mse_id is None:
            sec.notes.append("No MSE-only trial in this sweep (a trial with gradient, perceptual and intensity "
                             "weights 0): add one to search.points_to_evaluate to compare against it.")
        elif self.mse_id == self.best_id:
            text.append("The best trial is itself an MSE-only trial.")
        else:
            mse, why = trial_predictions(self.results, self.mse_id)
            if mse is None:
                sec.notes.append(f"The MSE-only trial {self.mse_id} left no predictions ({why}).")
            elif mse["prediction"].shape != best["prediction"].shape:
                sec.notes.append(f"The MSE-only trial {self.mse_id} predicted different samples; not shown.")
            else:
                columns.append((f"MSE-only: {self.mse_id}", mse["prediction"]))
                diffs.append((f"∇ diff MSE-only {self.mse_id}",
                              plots.gradient_difference(mse["prediction"], best["target"])))
                text.append(f"MSE-only trial <b>{html.escape(self.mse_id)}</b> for comparison.")
        columns.append(("target", best["target"]))
        sec.image = self._save("panel", plots.panel_figure(columns, diffs, title="Validation samples (first "
                                                           f"{len(best['target'])}) at the trials' last epoch"))
        text.append("The gradient-difference maps show |∇pred| − |∇target|: red where the prediction is sharper "
                    "than the target, blue where it is blurrier (over-smoothing).")
        sec.text = " ".join(text)

    # ----- page -----------------------------------------------------------------------------------------------
    def page(self) -> str:
        r, info = self.results, self.results.info
        counts = r.table["status"].value_counts().to_dict() if not r.table.empty else {}
        objective = info.get("objective") or {}
        meta = [f"status <code>{html.escape(str(info.get('status', '?')))}</code>",
                f"{len(r.table)} trials ({html.escape(', '.join(f'{v} {k}' for k, v in sorted(counts.items())))})",
                f"objective <code>{html.escape(str(objective.get('type', 'composite')))}</code>",
                f"task <code>{html.escape(str((r.sweep.base_train.get('task') if r.sweep else '?')))}</code>",
                f"max epochs {html.escape(str(info.get('max_epochs', '?')))}"]
        mlflow = ""
        if info.get("parent_run_id"):
            mlflow = (f"<p class='meta'>MLflow: experiment <code>{html.escape(str(info.get('experiment')))}</code>, "
                      f"parent run <code>{html.escape(str(info['parent_run_id']))}</code> at "
                      f"<code>{html.escape(str(info.get('tracking_uri')))}</code></p>")
        parts = [f"<h1>losstune sweep <code>{html.escape(r.name)}</code></h1>",
                 f"<p class='meta'>{' · '.join(meta)}</p>", mlflow,
                 f"<p class='meta'>results <code>{html.escape(str(r.sweep_dir))}</code> · generated "
                 f"{_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}</p>"]
        if self.best_id:
            best = r.table.set_index("trial_id").loc[self.best_id]
            parts.append(f"<p>Best trial <b>{html.escape(self.best_id)}</b>: composite {format_value(best.get('composite'))}, "
                         f"SSIM {format_value(best.get('ssim'))}, MSE {format_value(best.get('mse'))}, gradient match "
                         f"{format_value(best.get('gradient_match'))} with "
                         f"{html.escape(_short(best, self.params, len(self.params)))}. "
                         f"Train it: <code>losstune train {html.escape(str(r.sweep_dir / 'best.yaml'))}</code></p>")
        if self.summary is not None:
            headline = (self.summary.get("verdict") or "").splitlines()[:1]
            parts.append(f"<p><b>Verified</b> (best.yaml is the best verified config): "
                         f"{html.escape(headline[0] if headline else '')}. "
                         "See <a href='#verification'>Verification</a>.</p>")
        for sec in self.sections:
            parts.append(f'<h2 id="{sec.key}">{html.escape(sec.title)}</h2>')
            if sec.text:
                parts.append(f"<p>{sec.text}</p>")
            if sec.html:
                parts.append(sec.html)
            if sec.image is not None and sec.inline:
                parts.append(f"<figure>{_img_tag(sec.image, sec.title)}<figcaption>{sec.image.name}"
                             "</figcaption></figure>")
            parts.extend(f'<div class="note">{html.escape(n)}</div>' for n in sec.notes)
        return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
                f"<title>losstune report: {html.escape(r.name)}</title><style>{CSS}</style></head><body>"
                + "\n".join(p for p in parts if p) + "</body></html>\n")


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
    b = _Builder(results, out_dir, top_k, curves_k)
    try:
        study = load_study(results)
    except Exception as err:  # noqa: BLE001 - a damaged study: the rest of the report still works
        study = None
        b.notes.append(f"Cannot open the Optuna study: {type(err).__name__}: {err}")
    b._section("leaderboard", "Leaderboard", b.leaderboard)
    if results.is_pareto:
        b._section("pareto", "Pareto front", b.pareto)
    b._section("verification", "Verification: fresh seeds against the matched baseline", b.verification)
    b._section("panel", "Predictions: verified winner vs its matched baseline" if b._verified_pair() else
               "Predictions: best vs MSE-only", b.panel)
    b._section("curves", "Learning curves", b.curves)
    b._section("importance", "Parameter importance", lambda s: b.importance(s, study))
    b._section("history", "Optimisation history", lambda s: b.history(s, study))
    b._section("slice", "Loss weights vs score", b.slices)
    html_path = out_dir / REPORT_HTML
    tmp = html_path.with_name(html_path.name + ".tmp")
    tmp.write_text(b.page(), encoding="utf-8")
    tmp.replace(html_path)
    (out_dir / "report.json").write_text(json.dumps(
        {"sweep": results.name, "best_trial": b.best_id, "mse_only_trial": b.mse_id,
         "verified": b.summary is not None,
         "images": {k: p.name for k, p in b.images.items()}, "notes": b.notes}, indent=1))
    outcome = ReportOutcome(out_dir, html_path, dict(b.images), list(b.notes), results.info.get("parent_run_id"))
    if log_mlflow:
        outcome.logged = _log_to_parent(results, out_dir, echo)
    return outcome


def _log_to_parent(results: SweepResults, out_dir: Path, echo: Callable[[str], None]) -> bool:
    uri, run_id = results.info.get("tracking_uri"), results.info.get("parent_run_id")
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
