"""Statistics of a verification: per-config means with 95 % t-intervals over seeds, paired differences to
the matched baseline with their paired-t intervals, and the rank of each config per seed (scipy.stats).

Input: one record per finished run, ``{"trial_id", "arm" ("tuned" | "baseline"), "seed", "metrics": {...}}``.
Every numeric metric the runs report is summarised (bookkeeping values such as the epoch, the learning
rate or timings are not metrics); a metric missing or non-finite in a run leaves that run out of that
metric's numbers only, and its ``n`` says how many seeds remain.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
TUNED, BASELINE = "tuned", "baseline"
ARMS = (TUNED, BASELINE)
# per-epoch bookkeeping the trials report beside their metrics
BOOKKEEPING = {"epoch", "lr", "diverged", "baseline_mse", "training_iteration"}


@dataclass
class Interval:
    """A mean and its two-sided ``CONFIDENCE`` t-interval over ``n`` values (low = high = mean when the
    values are identical; None bounds when n < 2)."""
    mean: float
    low: float | None
    high: float | None
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def is_metric(name: str) -> bool:
    """Whether a reported number is a metric to summarise (not bookkeeping or a timing)."""
    return name not in BOOKKEEPING and not name.endswith("_time_s")


def _finite(values: Iterable[Any]) -> np.ndarray:
    return np.array([float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)], dtype=float)


def _interval(mean: float, ci, n: int) -> Interval:
    low, high = (float(ci.low), float(ci.high)) if n >= 2 else (None, None)
    return Interval(float(mean), low, high, n)


def mean_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and t-interval of the mean (``scipy.stats.ttest_1samp(...).confidence_interval``).

    >>> ci = mean_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2 dof) = 4.3027: 2 -/+ 4.3027 / sqrt(3)
    >>> round(ci.mean, 4), round(ci.low, 4), round(ci.high, 4), ci.n
    (2.0, -0.4841, 4.4841, 3)
    """
    x = _finite(values)
    if len(x) == 0:
        return Interval(math.nan, None, None, 0)
    if len(x) < 2:
        return Interval(float(x[0]), None, None, 1)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = stats.ttest_1samp(x, 0.0).confidence_interval(confidence)
    return _interval(x.mean(), ci, len(x))


def paired_difference(tuned: Iterable[float], baseline: Iterable[float],
                      confidence: float = CONFIDENCE) -> Interval:
    """Mean of ``tuned - baseline`` (pairs with a finite value on both sides) and its paired-t interval
    (``scipy.stats.ttest_rel(...).confidence_interval``)."""
    pairs = [(float(a), float(b)) for a, b in zip(tuned, baseline)
             if isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 2:
        diffs = [a - b for a, b in pairs]
        return Interval(diffs[0] if diffs else math.nan, None, None, len(diffs))
    a, b = np.array(pairs).T
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = stats.ttest_rel(a, b).confidence_interval(confidence)
    return _interval((a - b).mean(), ci, len(pairs))


def ranks_per_seed(values: Mapping[str, Mapping[int, float]],
                   higher_is_better: bool = True) -> dict[str, dict[int, float]]:
    """``{config: {seed: objective}}`` -> ``{config: {seed: rank}}``; rank 1 is the best of that seed, ties share
    the better rank (``scipy.stats.rankdata(method="min")``); a config without a finite value on a seed gets none."""
    seeds = sorted({s for per_seed in values.values() for s in per_seed})
    ranks: dict[str, dict[int, float]] = {c: {} for c in values}
    for seed in seeds:
        entries = [(c, v[seed]) for c, v in values.items()
                   if isinstance(v.get(seed), (int, float)) and math.isfinite(v[seed])]
        if not entries:
            continue
        scores = np.array([x for _, x in entries], dtype=float)
        order = stats.rankdata(-scores if higher_is_better else scores, method="min")
        for (config, _), rank in zip(entries, order):
            ranks[config][seed] = float(rank)
    return ranks


def summarize(records: Iterable[Mapping[str, Any]], objective: str = "composite",
              higher_is_better: bool = True, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """The statistics of a verification (JSON-ready; see the module docstring for ``records``).

    Returns ``{"objective", "confidence", "seeds", "metrics", "configs": [...]}``; each config entry holds
    ``trial_id``, ``seeds``, ``tuned`` / ``baseline`` / ``difference`` (metric -> Interval as a dict, plus the
    per-seed ``values``), ``ranks`` (seed -> rank among the configs) and ``mean_rank``, in the order of the
    best tuned mean objective first.
    """
    records = list(records)
    by_config: dict[str, dict[str, dict[int, Mapping[str, float]]]] = {}
    metric_names: list[str] = []
    for r in records:
        by_config.setdefault(str(r["trial_id"]), {arm: {} for arm in ARMS})[r["arm"]][int(r["seed"])] = r["metrics"]
        for name, value in r["metrics"].items():
            if is_metric(name) and isinstance(value, (int, float)) and name not in metric_names:
                metric_names.append(name)
    if objective in metric_names:  # the objective first, the rest in the order the runs report them
        metric_names.insert(0, metric_names.pop(metric_names.index(objective)))

    configs = []
    for trial_id, arms in by_config.items():
        seeds = sorted(set(arms[TUNED]) | set(arms[BASELINE]))
        entry: dict[str, Any] = {"trial_id": trial_id, "seeds": seeds, TUNED: {}, BASELINE: {}, "difference": {}}
        for name in metric_names:
            for arm in ARMS:
                values = [arms[arm].get(s, {}).get(name) for s in seeds]
                entry[arm][name] = {**asdict(mean_interval(values, confidence)), "values": values}
            tuned = [arms[TUNED].get(s, {}).get(name, math.nan) for s in seeds]
            base = [arms[BASELINE].get(s, {}).get(name, math.nan) for s in seeds]
            diff = paired_difference(tuned, base, confidence)
            entry["difference"][name] = {**asdict(diff), "excludes_zero": diff.excludes_zero,
                                         "values": [a - b for a, b in zip(tuned, base)]}
        configs.append(entry)

    objective_values = {c["trial_id"]: dict(zip(c["seeds"], c[TUNED].get(objective, {}).get("values", [])))
                        for c in configs}
    ranks = ranks_per_seed(objective_values, higher_is_better)
    for c in configs:
        c["ranks"] = ranks.get(c["trial_id"], {})
        c["mean_rank"] = float(np.mean(list(c["ranks"].values()))) if c["ranks"] else None

    def order(c: Mapping[str, Any]) -> tuple[float, str]:
        mean = c[TUNED].get(objective, {}).get("mean", math.nan)
        score = mean if isinstance(mean, float) and math.isfinite(mean) else -math.inf
        return (-score if higher_is_better else score, c["trial_id"])

    configs.sort(key=order)
    seeds = sorted({int(r["seed"]) for r in records})
    return {"objective": objective, "higher_is_better": higher_is_better, "confidence": confidence,
            "seeds": seeds, "metrics": metric_names, "configs": configs}
