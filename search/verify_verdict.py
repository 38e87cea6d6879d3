"""The verdict of a verification in words, from :func:`search.verify_stats.summarize`'s numbers.

A config's loss weights are called significant only when the paired interval of the objective's
difference to its matched baseline (same config, every shaping weight 0) excludes 0; otherwise the words
say "no significant difference". Other metrics are named only where their own paired interval excludes 0.
Loss values (``loss``, ``val_loss``, ``loss_<term>``) are left out of the words: they differ between a
config and its baseline by construction (the baseline does not compute the shaping terms).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from losstune.search.verify_stats import TUNED

NO_DIFFERENCE = ("no significant difference from pixel-only at the same lr: the sweep's gain comes from "
                 "lr / warm-up / model")
# metrics where lower is better (the rest: higher is better); a variant such as mse_active follows its stem
LOWER_IS_BETTER = ("mse", "histogram_distance")


def lower_is_better(metric: str) -> bool:
    return any(metric == stem or metric.startswith(stem + "_") for stem in LOWER_IS_BETTER)


def is_loss_value(metric: str) -> bool:
    return metric in ("loss", "val_loss") or metric.startswith("loss_")


def _signed(v: float) -> str:
    return f"{v:+.4g}"


def interval_text(d: Mapping[str, Any]) -> str:
    """``+0.012 [+0.004, +0.020]`` (just the mean when there is no interval)."""
    if d.get("low") is None or d.get("high") is None:
        return _signed(d["mean"])
    return f"{_signed(d['mean'])} [{_signed(d['low'])}, {_signed(d['high'])}]"


def _better(metric: str, diff: Mapping[str, Any]) -> bool:
    return (diff["mean"] < 0) if lower_is_better(metric) else (diff["mean"] > 0)


def _weights_text(weights: Mapping[str, float]) -> str:
    shown = [f"{k} {v:.3g}" for k, v in weights.items() if v]
    return f" ({', '.join(shown)})" if shown else ""


def config_verdict(config: Mapping[str, Any], objective: str, weights: Mapping[str, float]) -> str:
    """One sentence about one verified config; ``weights``: its shaping weights (name -> value)."""
    trial, n = config["trial_id"], len(config["seeds"])
    seeds = f"{n} seeds"
    if not any(weights.values()):
        return (f"trial {trial} is pixel-only itself (every shaping weight 0): it is its own matched baseline, "
                f"there is nothing to compare ({seeds})")
    diff = config["difference"].get(objective)
    if diff is None or diff.get("low") is None:
        return f"trial {trial}: no interval for {objective} (fewer than 2 seeds with a result on both sides)"
    others = [f"{m} {interval_text(d)}" for m, d in config["difference"].items()
              if m != objective and not is_loss_value(m) and d.get("excludes_zero")]
    also = f"; other metrics whose paired interval excludes 0: {', '.join(others)}" if others else ""
    if diff["excludes_zero"] and _better(objective, diff):
        return (f"loss weights of trial {trial}{_weights_text(weights)} improve {objective} by "
                f"{interval_text(diff)} over pixel-only at the same lr ({seeds}){also}")
    if diff["excludes_zero"]:
        return (f"loss weights of trial {trial}{_weights_text(weights)} make {objective} worse by "
                f"{interval_text(diff)} than pixel-only at the same lr ({seeds}){also}")
    return (f"trial {trial}{_weights_text(weights)}: {NO_DIFFERENCE} ({objective} {interval_text(diff)}, "
            f"{seeds}){also}")


def verdict(summary: Mapping[str, Any], weights: Mapping[str, Mapping[str, float]],
            sweep_scores: Mapping[str, float] | None = None) -> str:
    """The whole verdict: the verified winner (best mean objective), then one line per config.

    ``weights``: trial id -> its shaping weights; ``sweep_scores``: trial id -> the objective the sweep saw.
    """
    objective = summary["objective"]
    configs = summary["configs"]
    if not configs:
        return "nothing was verified"
    win = configs[0]
    mean = win[TUNED][objective]
    n = len(win["seeds"])
    ranks = win.get("ranks") or {}
    first = sum(1 for r in ranks.values() if r == 1)
    lines = [f"verified winner: trial {win['trial_id']}, {objective} {mean['mean']:.4g} "
             f"[{_num(mean.get('low'))}, {_num(mean.get('high'))}] over {n} fresh seeds"
             + (f" (the sweep saw {sweep_scores[win['trial_id']]:.4g})"
                if sweep_scores and isinstance(sweep_scores.get(win["trial_id"]), float) else "")
             + (f", best of the {len(configs)} configs on {first} of {len(ranks)} seeds" if len(configs) > 1 else "")]
    lines += [config_verdict(c, objective, weights.get(c["trial_id"], {})) for c in configs]
    if len(configs) > 1:
        confidence = summary.get("confidence", 0.95)
        chance = 1 - confidence ** len(configs)  # independent intervals, none truly different
        lines.append(f"(each interval is {100 * confidence:.0f} % on its own: with "
                     f"{len(configs)} configs, one of them excluding 0 by chance alone has a probability of up "
                     f"to {100 * chance:.0f} %)")
    return "\n".join(lines)


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"


def significant(summary: Mapping[str, Any], trial_id: str) -> bool:
    """Whether the config's objective differs from its matched baseline beyond its interval, for the better."""
    objective = summary["objective"]
    for c in summary["configs"]:
        if c["trial_id"] == trial_id:
            d = c["difference"].get(objective)
            return bool(d and d.get("excludes_zero") and _better(objective, d))
    return False
