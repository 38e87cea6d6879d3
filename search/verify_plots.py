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
    """One panel per metric; x = the verified configs (best verified mean first), each with its baseline."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    configs = summary["configs"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(3.2, 0.9 * len(configs) + 1.6) * len(metrics), 3.4),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, config in enumerate(configs):
            for arm, shift in ((TUNED, -0.15), (BASELINE, 0.15)):
                d = config[arm].get(metric) or {}
                if not _finite(d.get("mean")):
                    continue
                x = i + shift
                low, high = d.get("low"), d.get("high")
                if _finite(low) and _finite(high):
                    ax.errorbar([x], [d["mean"]], yerr=[[d["mean"] - low], [high - d["mean"]]], fmt="o",
                                color=COLOURS[arm], capsize=3, label=LABELS[arm] if i == 0 else None)
                else:
                    ax.plot([x], [d["mean"]], "o", color=COLOURS[arm], label=LABELS[arm] if i == 0 else None)
                values = [v for v in d.get("values") or [] if _finite(v)]
                ax.plot([x + 0.07] * len(values), values, ".", color=COLOURS[arm], alpha=0.45, markersize=4)
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels([c["trial_id"] for c in configs], fontsize=7)
        ax.set_xlim(-0.6, len(configs) - 0.4)
        ax.set_title(metric, fontsize=9)
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.tick_params(axis="y", labelsize=7)
    axes[0][0].legend(fontsize=7, loc="best")
    n = len(summary.get("seeds") or [])
    fig.suptitle(f"Verification: mean and {100 * summary.get('confidence', 0.95):.0f} % interval over {n} fresh "
                 "seeds (dots: the seeds)", x=0.01, ha="left", fontsize=10)
    fig.tight_layout()
    return fig
