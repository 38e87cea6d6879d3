"""The verification's interval plot: for each metric, each verified config's mean and 95 % interval over the
fresh seeds, its matched baseline (same lr, every shaping weight 0) beside it, the seeds as dots."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from losstune.search.verify_stats import BASELINE, TUNED

COLOURS = {TUNED: "#1f77b4", BASELINE: "#9aa5b1"}
LABELS = {TUNED: "config", BASELINE: "matched baseline (shaping weights 0)"}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def interval_figure(summary: Mapping[str, Any], metrics: Sequence[str]):
    """First panel: the objective's paired difference (config − matched baseline) per config with its interval
    and the 0 line; then one panel per metric; x = the verified configs (best verified mean first)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    configs = summary["configs"]
    objective = summary["objective"]
    width = max(3.0, 0.9 * len(configs) + 1.6)
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(width * (len(metrics) + 1), 3.6), squeeze=False)
    diff_ax, metric_axes = axes[0][0], axes[0][1:]
    diff_ax.axhline(0.0, color="#444", linewidth=0.8)
    for i, config in enumerate(configs):
        d = config["difference"].get(objective) or {}
        _point(diff_ax, i, d, "#d62728" if d.get("excludes_zero") else "#555", None)
    _label(diff_ax, configs, f"{objective}: config − matched baseline\n(paired by seed)")
    for ax, metric in zip(metric_axes, metrics):
        for i, config in enumerate(configs):
            for arm, shift in ((TUNED, -0.15), (BASELINE, 0.15)):
                _point(ax, i + shift, config[arm].get(metric) or {}, COLOURS[arm], LABELS[arm] if i == 0 else None)
        _label(ax, configs, metric)
    handles, labels = metric_axes[0].get_legend_handles_labels() if len(metric_axes) else ([], [])
    n = len(summary.get("seeds") or [])
    fig.suptitle(f"Verification: mean and {100 * summary.get('confidence', 0.95):.0f} % interval over {n} fresh "
                 "seeds (dots: the seeds; red difference: its interval excludes 0)", x=0.01, ha="left", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    return fig


def _point(ax, x: float, d: Mapping[str, Any], colour: str, label: str | None) -> None:
    """A mean with its interval (a plain point without one) and the per-seed values as small dots."""
    if not _finite(d.get("mean")):
        return
    low, high = d.get("low"), d.get("high")
    if _finite(low) and _finite(high):
        ax.errorbar([x], [d["mean"]], yerr=[[d["mean"] - low], [high - d["mean"]]], fmt="o", color=colour,
                    capsize=3, label=label)
    else:
        ax.plot([x], [d["mean"]], "o", color=colour, label=label)
    values = [v for v in d.get("values") or [] if _finite(v)]
    ax.plot([x + 0.07] * len(values), values, ".", color=colour, alpha=0.45, markersize=4)


def _label(ax, configs: Sequence[Mapping[str, Any]], title: str) -> None:
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([c["trial_id"] for c in configs], fontsize=7)
    ax.set_xlim(-0.6, len(configs) - 0.4)
    ax.set_title(title, fontsize=9)
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.tick_params(axis="y", labelsize=7)
