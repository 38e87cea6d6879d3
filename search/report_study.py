"""The persisted Optuna study of a sweep (:mod:`search.study`) as the report reads it: the study, its
objectives in Optuna's order, fANOVA parameter importances and the objective values per trial."""

from __future__ import annotations

import math
import warnings
from typing import Any

from losstune.search.study import load_study as load_sweep_study
from losstune.search.trials import SweepResults

MIN_IMPORTANCE_TRIALS = 2


def load_study(results: SweepResults):
    """The persisted Optuna study of the sweep (:mod:`search.study`); None if there is none."""
    return load_sweep_study(results.sweep_dir, results.info.optuna_study or results.name)


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


def objective_history(study, names: list[str]) -> tuple[dict[str, list[tuple[int, float]]], dict[str, str]]:
    """(objective -> [(Optuna trial number, finite value)] of the complete trials, objective -> "max" | "min")."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState
    values: dict[str, list[tuple[int, float]]] = {n: [] for n in names}
    for t in study.trials:
        if t.state == TrialState.COMPLETE and t.values:
            for n, v in zip(names, t.values):
                if _is_finite(v):
                    values[n].append((t.number, float(v)))
    directions = {n: "max" if d == StudyDirection.MAXIMIZE else "min" for n, d in zip(names, study.directions)}
    return values, directions


def _is_finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
