"""Read a sweep's trials back from disk (works after the driver died): Tune's per-trial
``result.json`` / ``params.json``, plus ``sweep.json`` and ``mlflow_runs.json`` written by losstune.

The table has one row per trial: ``trial_id``, ``status``, the sampled params (real values),
``composite`` (last epoch; what Optuna was told: the objective region's), ``best_composite``, ``ssim``,
``mse``, ``psnr``, ``gradient_match`` (whole frame), ``composite_full``, ``composite_active``,
``ssim_active``, ``mse_active``, ``gradient_match_active`` (the task's evaluation region, e.g. where the
image changes; empty for a task without one), ``num_val`` (validation samples), ``epochs``, ``time_s``,
``run_id``.

Statuses are the words of :class:`search.status.TrialStatus`; a trial that is ``running`` in the tracker's
record of a sweep that ended, or that the tracker never recorded, is judged from its results on disk.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from losstune.search import space as sp
from losstune.search.config import PARETO_METRICS
from losstune.search.status import TrialStatus
from losstune.search.sweep_record import SWEEP_FILE, SweepRecord
from losstune.search.tracking import RUNS_FILE, read_runs_file
from losstune.trainables.loop import DIVERGED_SCORE  # what a diverged trial scores (the worst composite)

SWEEP_CONFIG = "sweep.yaml"
METRIC_COLUMNS = ["composite", "best_composite", "ssim", "mse", "psnr", "gradient_match"]
# the statuses a trial can be ranked (and exported) with, given a finite composite
ELIGIBLE = tuple(s.value for s in (TrialStatus.FINISHED, TrialStatus.STOPPED_EARLY, TrialStatus.RUNNING,
                                   TrialStatus.INTERRUPTED, TrialStatus.UNKNOWN))
REGION_COLUMNS = ["composite_full", "composite_active", "ssim_active", "mse_active", "gradient_match_active"]
ASCENDING = {"mse", "val_loss", "loss", "histogram_distance", "trial_id", "time_s", "status"}


class ResultsError(ValueError):
    """The folder is not (or not yet) a losstune sweep's results."""


@dataclass
class SweepResults:
    sweep_dir: Path
    info: SweepRecord  # sweep.json
    sweep: Any  # search.config.Sweep, or None when its config cannot be loaded
    table: pd.DataFrame
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # Tune's (encoded) trial configs
    param_names: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.info.name or self.sweep_dir.name

    def ranked(self) -> pd.DataFrame:
        """Trials that may be exported, best composite first (diverged / failed / empty excluded)."""
        df = self.table
        if df.empty:
            return df
        ok = df["status"].isin(ELIGIBLE) & df["composite"].notna() & (df["composite"] > DIVERGED_SCORE)
        ok &= df["composite"].map(lambda v: isinstance(v, (int, float)) and math.isfinite(v))
        return df[ok].sort_values(["composite", "trial_id"], ascending=[False, True])

    @property
    def is_pareto(self) -> bool:
        """A sweep with a pareto objective (as sweep.json records it; else its config's ``Sweep.is_pareto``)."""
        objective = self.info.objective
        if objective is None and self.sweep is not None:
            return self.sweep.is_pareto
        return (objective or {}).get("type") == "pareto"

    def objective_metrics(self) -> dict[str, str]:
        if self.is_pareto:
            return dict((self.info.objective or {}).get("metrics") or PARETO_METRICS)
        return {"composite": "max"}

    def pareto_front(self) -> pd.DataFrame:
        return pareto_front(self.ranked(), self.objective_metrics())

    def trial_config(self, trial_id: str) -> dict[str, Any]:
        """The full training config of a trial (base config + its sampled values)."""
        if self.sweep is None:
            raise ResultsError(f"{self.sweep_dir}: cannot rebuild trial configs without {SWEEP_CONFIG}")
        return sp.trial_config(self.sweep.base_train, self.sweep.params, self.configs.get(trial_id, {}))


def pareto_front(df: pd.DataFrame, metrics: Mapping[str, str]) -> pd.DataFrame:
    """The non-dominated rows for ``metrics`` ({column: "max"|"min"})."""
    if df.empty:
        return df
    cols = [c for c in metrics if c in df.columns]
    signs = [1.0 if metrics[c] == "max" else -1.0 for c in cols]
    values = [[s * float(row[c]) for c, s in zip(cols, signs)] for _, row in df.iterrows()]
    keep = []
    for i, a in enumerate(values):
        dominated = any(all(bj >= ai for ai, bj in zip(a, b)) and any(bj > ai for ai, bj in zip(a, b))
                        for j, b in enumerate(values) if j != i)
        keep.append(not dominated)
    return df[keep]


# ----- reading ----------------------------------------------------------------------------------
def fs_and_path(path: str):
    """(pyarrow filesystem, path within it) of a local folder or a storage URI (``s3://...``)."""
    import pyarrow.fs as pafs
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def read_text(fs, path: str) -> str | None:
    """A file of ``fs`` as text, or None when it is missing or unreadable."""
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode("utf-8", errors="replace")
    except (FileNotFoundError, OSError):
        return None


def read_results(text: str | None) -> list[dict[str, Any]]:
    """The results of a Tune ``result.json`` (one JSON object a line); a line cut short is skipped."""
    rows = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a crash
            continue
    return rows


def read_info(sweep_dir: str | Path) -> SweepRecord:
    """The sweep's ``sweep.json`` (:class:`ResultsError` when the folder has none or it is unreadable)."""
    path = Path(sweep_dir) / SWEEP_FILE
    try:
        return SweepRecord.read(Path(sweep_dir))
    except FileNotFoundError:
        sweeps = sorted(p.parent.name for p in Path(sweep_dir).glob(f"*/{SWEEP_FILE}"))
        hint = f"; sweeps in it: {', '.join(sweeps)}" if sweeps else ""
        raise ResultsError(f"{sweep_dir}: not a losstune sweep folder (no {SWEEP_FILE}){hint}") from None
    except (OSError, ValueError) as err:
        raise ResultsError(f"{path}: unreadable: {err}") from None


def load_sweep_of(sweep_dir: Path):
    from losstune.search.config import SweepConfigError, load_sweep
    path = sweep_dir / SWEEP_CONFIG
    if not path.is_file():
        return None
    try:
        return load_sweep(path, deep=False, check_task=False, check_paths=False)
    except SweepConfigError:
        return None


def load_results(sweep_dir: str | Path) -> SweepResults:
    sweep_dir = Path(sweep_dir).expanduser().resolve()
    if not sweep_dir.is_dir():
        raise ResultsError(f"{sweep_dir}: no such results folder")
    info = read_info(sweep_dir)
    sweep = load_sweep_of(sweep_dir)
    tune_dir = info.tune_dir or str(sweep_dir)
    runs = read_runs_file(sweep_dir)
    max_epochs = int(info.max_epochs or (sweep.epochs if sweep else 0) or 0)
    param_names = list(info.params or (list(sweep.params) if sweep else []))
    sweep_ended = info.status in (TrialStatus.FINISHED, TrialStatus.FAILED)

    fs, base = fs_and_path(tune_dir)
    import pyarrow.fs as pafs
    try:
        entries = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except OSError as err:
        raise ResultsError(f"{tune_dir}: cannot list trials: {err}") from None
    rows, histories, configs = [], {}, {}
    for entry in sorted(entries, key=lambda e: e.path):
        if entry.type != pafs.FileType.Directory:
            continue
        params_text = read_text(fs, f"{entry.path}/params.json")
        history = read_results(read_text(fs, f"{entry.path}/result.json"))
        if params_text is None and not history:
            continue
        try:
            config = json.loads(params_text) if params_text else (history[-1].get("config") or {})
        except ValueError:
            config = history[-1].get("config", {}) if history else {}
        trial_id = (history[-1].get("trial_id") if history else None) or entry.base_name.removeprefix("trial_")
        errored = any(fs.get_file_info(f"{entry.path}/{n}").type == pafs.FileType.File
                      for n in ("error.txt", "error.pkl"))
        histories[trial_id], configs[trial_id] = history, config
        rows.append(_row(trial_id, config, history, runs.get(trial_id, {}), errored, max_epochs, sweep,
                         sweep_ended, entry.path))
    # trials known to the tracker but without a folder yet
    for trial_id, entry in runs.items():
        if trial_id not in histories:
            histories[trial_id], configs[trial_id] = [], {}
            rows.append({"trial_id": trial_id, "status": entry.get("status", TrialStatus.PENDING.value), "epochs": 0,
                         "run_id": entry.get("run_id"), **{k: entry.get("params", {}).get(k) for k in param_names}})
    table = pd.DataFrame(rows)
    columns = ["trial_id", "status", *param_names, *METRIC_COLUMNS, *REGION_COLUMNS, "num_val", "epochs", "time_s",
               "run_id", "path"]
    for c in columns:
        if c not in table.columns:
            table[c] = None
    extra = [c for c in table.columns if c not in columns]
    table = table[columns + extra]
    for c in METRIC_COLUMNS + REGION_COLUMNS + ["num_val", "time_s"]:
        table[c] = pd.to_numeric(table[c], errors="coerce")
    table["epochs"] = pd.to_numeric(table["epochs"], errors="coerce").fillna(0).astype(int)
    return SweepResults(sweep_dir, info, sweep, table, histories, configs, param_names)


def status_from_results(history: list[dict[str, Any]], errored: bool, max_epochs: int,
                        sweep_ended: bool) -> TrialStatus:
    """How a trial stands judged from its results on disk (``errored``: Tune left an error file)."""
    if not history:
        return TrialStatus.FAILED if errored else TrialStatus.PENDING
    last = history[-1]
    completed = TrialStatus.of_completed(last, max_epochs)
    if completed is TrialStatus.DIVERGED:
        return completed
    if errored and not last.get("done"):
        return TrialStatus.FAILED
    if max_epochs and completed is TrialStatus.FINISHED:
        return completed
    return TrialStatus.STOPPED_EARLY if sweep_ended else TrialStatus.UNKNOWN


def _row(trial_id: str, config: Mapping[str, Any], history: list[dict[str, Any]], run: Mapping[str, Any],
         errored: bool, max_epochs: int, sweep, sweep_ended: bool, path: str) -> dict[str, Any]:
    last = history[-1] if history else {}
    epochs = int(last.get("training_iteration") or 0)
    status = run.get("status")
    if status is None or (status == TrialStatus.RUNNING and sweep_ended):
        status = status_from_results(history, errored, max_epochs, sweep_ended).value
    if sweep is not None:
        try:
            params = sp.decode(sweep.params, config)
        except (ValueError, KeyError):
            params = dict(config)
    else:
        params = dict(config)
    composites = [float(r["composite"]) for r in history
                  if isinstance(r.get("composite"), (int, float)) and math.isfinite(r["composite"])]
    row = {"trial_id": trial_id, "status": status,
           **{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in params.items()},
           "composite": last.get("composite"), "best_composite": max(composites) if composites else None,
           "ssim": last.get("ssim"), "mse": last.get("mse"), "psnr": last.get("psnr"),
           "gradient_match": last.get("gradient_match"), **{k: last.get(k) for k in REGION_COLUMNS},
           "num_val": last.get("num_val"), "epochs": epochs,
           "time_s": last.get("time_total_s"), "run_id": run.get("run_id"), "path": path}
    return row


def sort_table(df: pd.DataFrame, column: str | None) -> pd.DataFrame:
    column = column or "composite"
    if column not in df.columns:
        raise ResultsError(f"--sort: no column {column!r}; columns: {', '.join(df.columns)}")
    return df.sort_values(column, ascending=column in ASCENDING, na_position="last", kind="stable")


def format_table(df: pd.DataFrame, max_rows: int | None = None) -> str:
    # the region columns of a task without an evaluation region are empty: not shown
    empty = [c for c in REGION_COLUMNS if c in df.columns and df[c].isna().all()]
    shown = df.drop(columns=[c for c in ("path",) if c in df.columns] + empty)
    if max_rows is not None:
        shown = shown.head(max_rows)
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 40,
                           "display.float_format", lambda v: f"{v:.4g}"):
        return shown.to_string(index=False)


def write_reports(results: SweepResults) -> dict[str, Path]:
    """trials.csv (and pareto.csv for a pareto objective) in the sweep folder."""
    out = {}
    path = results.sweep_dir / "trials.csv"
    results.table.drop(columns=["path"]).to_csv(path, index=False)
    out["trials"] = path
    if results.is_pareto:
        path = results.sweep_dir / "pareto.csv"
        results.pareto_front().drop(columns=["path"]).to_csv(path, index=False)
        out["pareto"] = path
    return out


__all__ = ["SweepResults", "ResultsError", "load_results", "pareto_front", "sort_table", "format_table",
           "write_reports", "RUNS_FILE", "SWEEP_FILE", "SWEEP_CONFIG"]
