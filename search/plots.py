"""The figures of ``losstune report`` (matplotlib, Agg): one function per figure, each returning a
``matplotlib.figure.Figure``; and the gradient-difference maps of its image panel. A trial's own pictures
are written by :mod:`search.artifacts`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from losstune.search.artifacts import to_display
from losstune.search.formatting import format_value


def gradient_magnitude(images: np.ndarray) -> np.ndarray:
    """|∇x| (forward differences, channel mean) of N×C×H×W images -> N×(H−1)×(W−1)."""
    x = np.asarray(images, dtype=np.float32)
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    return np.sqrt(dx ** 2 + dy ** 2).mean(axis=-3)


def gradient_difference(prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    """|∇pred| − |∇target|: > 0 where the prediction is sharper than the target, < 0 where it is blurred."""
    return gradient_magnitude(prediction) - gradient_magnitude(target)


# ----- report figures (matplotlib) ------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _log_x(ax) -> None:
    """A log x axis with plain labels at 1, 2, 5 × 10^k (readable over narrow ranges too)."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _tidy(ax, nbins: int = 5, x: bool = True, y: bool = True, rotate: bool = True) -> None:
    """Few ticks, no cryptic offset labels, slanted x labels: readable over tiny ranges too."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter
    for axis, on in ((ax.xaxis, x), (ax.yaxis, y)):
        if on and axis.get_scale() == "linear":
            axis.set_major_locator(MaxNLocator(nbins=nbins))
            fmt = ScalarFormatter(useOffset=False)
            fmt.set_scientific(False)
            axis.set_major_formatter(fmt)
    if x and rotate:
        ax.tick_params(axis="x", labelrotation=25)


def leaderboard_figure(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], title: str):
    """The leaderboard as a table image (rows already formatted or raw values)."""
    plt = _plt()
    cells = [[format_value(r.get(c)) for c in columns] for r in rows] or [["(no trials)"] + [""] * (len(columns) - 1)]
    width = max(6.0, 0.2 + sum(max(len(str(c)), *(len(row[j]) for row in cells)) for j, c in enumerate(columns))
                * 0.085)
    fig, ax = plt.subplots(figsize=(min(width, 22.0), 0.5 + 0.3 * (len(cells) + 1)))
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=list(columns), loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.auto_set_column_width(list(range(len(columns))))
    table.scale(1, 1.25)
    for (r, _c), cell in table.get_celld().items():
        if r == 0:
            cell.set_facecolor("#dde6f0")
            cell.set_text_props(weight="bold")
        elif r == 1:
            cell.set_facecolor("#fff3c4")  # the best trial
    ax.set_title(title, fontsize=11, loc="left")
    fig.tight_layout()
    return fig


def importance_figure(importances: Mapping[str, Mapping[str, float]], title: str = "Parameter importance (fANOVA)"):
    """Horizontal bars; ``importances``: objective name -> {param: importance}."""
    plt = _plt()
    objectives = list(importances)
    params = sorted({p for imp in importances.values() for p in imp},
                    key=lambda p: -max(imp.get(p, 0.0) for imp in importances.values()))
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.5 * len(params) * max(1, len(objectives)) ** 0.5))
    height = 0.8 / max(1, len(objectives))
    y = np.arange(len(params))
    for i, obj in enumerate(objectives):
        values = [importances[obj].get(p, 0.0) for p in params]
        bars = ax.barh(y + (i - (len(objectives) - 1) / 2) * height, values, height=height, label=obj)
        for bar, v in zip(bars, values):
            ax.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2, f"{v:.2f}", va="center", fontsize=8)
    ax.set_yticks(y, params)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("importance (share of the objective's variance)")
    ax.set_title(title, fontsize=11, loc="left")
    if len(objectives) > 1:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def history_figure(values: Mapping[str, Sequence[tuple[int, float]]], directions: Mapping[str, str],
                   title: str = "Optimisation history"):
    """Objective value per Optuna trial number with the best-so-far line; one panel per objective."""
    plt = _plt()
    names = list(values)
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        pts = sorted(values[name])
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        ax.scatter(xs, ys, s=28, color="#1f77b4", label="trial", zorder=3)
        best, run = [], None
        better = max if directions.get(name, "max") == "max" else min
        for v in ys:
            run = v if run is None else better(run, v)
            best.append(run)
        if xs:
            ax.step(xs, best, where="post", color="#d62728", label=f"best so far ({directions.get(name, 'max')})")
        ax.set_xlabel("trial number (order Optuna suggested them)")
        ax.set_ylabel(name)
        _tidy(ax, x=False)
        _integer_x(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, x=0.01, ha="left", fontsize=11)
    fig.tight_layout()
    return fig


def slice_figure(table, params: Sequence[str], log_params: Sequence[str] = (), score: str = "composite",
                 highlight: Mapping[str, str] | None = None, title: str = "Loss weights vs score (slice plots)",
                 order: Mapping[str, int] | None = None):
    """One panel per parameter: value vs ``score`` of every trial; categorical values as labelled positions.

    ``table`` is the trials DataFrame (decoded values); ``highlight`` maps trial ids to a label (best, MSE-only);
    ``order`` maps trial ids to their start order (the colour; default: row order).
    """
    plt = _plt()
    params = list(params)
    ncols = min(3, max(1, len(params)))
    nrows = max(1, math.ceil(len(params) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols + 1.0, 3.4 * nrows), squeeze=False, sharey=True,
                             layout="constrained")
    ids = list(table["trial_id"])
    order = np.asarray([(order or {}).get(t, i) for i, t in enumerate(ids)], dtype=float)
    for k, param in enumerate(params):
        ax = axes[k // ncols][k % ncols]
        raw = list(table[param])
        y = np.asarray(table[score], dtype=float)
        numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                      for v in raw if v is not None)
        if numeric:
            x = np.asarray([np.nan if v is None else float(v) for v in raw])
        else:
            labels = sorted({str(v) for v in raw}, key=str)
            x = np.asarray([labels.index(str(v)) for v in raw], dtype=float)
            ax.set_xticks(range(len(labels)), labels, fontsize=8)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        sc = ax.scatter(x, y, c=order, cmap="viridis", s=34, zorder=3, edgecolors="none")
        for tid, label in (highlight or {}).items():
            hit = np.flatnonzero(np.asarray(table["trial_id"]) == tid)
            if hit.size:
                i = hit[0]
                ax.scatter([x[i]], [y[i]], s=120, facecolors="none", edgecolors="#d62728" if label == "best"
                           else "#ff7f0e", linewidths=1.8, zorder=4)
                ax.annotate(label, (x[i], y[i]), textcoords="offset points", xytext=(6, 6), fontsize=8)
        if numeric and param in log_params:
            _log_x(ax)
        _tidy(ax, 5, x=numeric and param not in log_params)
        ax.set_xlabel(param)
        if k % ncols == 0:
            ax.set_ylabel(score)
        ax.grid(alpha=0.3)
    for k in range(len(params), nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    if params:
        cbar = fig.colorbar(sc, ax=axes.ravel().tolist(), shrink=0.8, pad=0.02)
        if len(table) > 1:
            from matplotlib.ticker import MaxNLocator
            cbar.locator = MaxNLocator(integer=True)
            cbar.update_ticks()
        cbar.set_label("trial (start order)")
    fig.suptitle(title, x=0.01, ha="left", fontsize=11)
    return fig


def pareto_figure(table, front_ids: Sequence[str], metrics: Mapping[str, str],
                  title: str = "Pareto front"):
    """Pairwise panels of the objective metrics; non-dominated trials highlighted and labelled."""
    plt = _plt()
    names = [m for m in metrics if m in table.columns]
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    fig, axes = plt.subplots(1, max(1, len(pairs)), figsize=(4.8 * max(1, len(pairs)), 4.0), squeeze=False)
    on = np.asarray(table["trial_id"].isin(list(front_ids)))
    for ax, (a, b) in zip(axes[0], pairs):
        x, y = np.asarray(table[a], float), np.asarray(table[b], float)
        if (~on).any():
            ax.scatter(x[~on], y[~on], s=30, color="#9aa5b1", label="dominated", zorder=2)
        ax.scatter(x[on], y[on], s=70, color="#d62728", edgecolors="black", linewidths=0.6,
                   label="non-dominated", zorder=3)
        for xi, yi, tid in zip(x[on], y[on], np.asarray(table["trial_id"])[on]):
            ax.annotate(str(tid), (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.set_xlabel(f"{a} ({'higher' if metrics[a] == 'max' else 'lower'} is better)")
        ax.set_ylabel(f"{b} ({'higher' if metrics[b] == 'max' else 'lower'} is better)")
        _tidy(ax, 4)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, x=0.01, ha="left", fontsize=11)
    fig.tight_layout()
    return fig


def curves_figure(histories: Mapping[str, Sequence[Mapping[str, Any]]], labels: Mapping[str, str],
                  keys: Sequence[str] = ("composite", "loss", "val_loss"), title: str = "Learning curves"):
    """Per-epoch curves of the given trials (one line per trial, one panel per metric)."""
    plt = _plt()
    keys = [k for k in keys if any(k in r for h in histories.values() for r in h)]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.8 * max(1, len(keys)), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for tid, hist in histories.items():
            pts = [(float(r.get("training_iteration") or r.get("epoch") or i + 1), float(r[key]))
                   for i, r in enumerate(hist) if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=labels.get(tid, tid))
        ax.set_xlabel("epoch")
        _tidy(ax, x=False)
        _integer_x(ax)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if key.endswith("loss"):  # log scale when the losses span more than a decade
            vals = [float(r[key]) for h in histories.values() for r in h
                    if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if vals and min(vals) > 0 and max(vals) / min(vals) > 10:
                ax.set_yscale("log")
    fig.suptitle(title, x=0.01, ha="left", fontsize=11)
    fig.tight_layout()
    if keys:  # one legend for all panels, below them (out of the data's way)
        handles, names = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(2, len(names)),
                   fontsize=8, frameon=False)
    return fig


def panel_figure(columns: Sequence[tuple[str, np.ndarray]], diffs: Sequence[tuple[str, np.ndarray]],
                 title: str = "Validation samples"):
    """Rows = samples; image columns (label, N×C×H×W in [0, 1]) then gradient-difference maps (label, N×H×W).

    The difference maps share one symmetric colour scale (diverging ``RdBu_r``: red = sharper than the
    target, blue = smoother).
    """
    plt = _plt()
    n = min([len(a) for _, a in columns] + [len(d) for _, d in diffs])
    ncols = len(columns) + len(diffs)
    fig, axes = plt.subplots(n, ncols, figsize=(1.9 * ncols + (0.8 if diffs else 0), 1.9 * n + 0.7), squeeze=False)
    vmax = max([float(np.nanmax(np.abs(d[:n]))) for _, d in diffs] + [1e-6])
    im = None
    for i in range(n):
        for j, (label, arr) in enumerate(columns):
            ax = axes[i][j]
            img = to_display(arr[i])
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            if i == 0:
                ax.set_title(label, fontsize=8)
        for j, (label, d) in enumerate(diffs, start=len(columns)):
            ax = axes[i][j]
            im = ax.imshow(d[i], cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
            if i == 0:
                ax.set_title(label, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, x=0.01, ha="left", fontsize=10)
    fig.tight_layout()
    if im is not None:
        cbar = fig.colorbar(im, ax=axes[:, len(columns):].ravel().tolist(), shrink=0.85, pad=0.03)
        cbar.set_label("|∇pred| − |∇target|  (red: sharper, blue: blurrier)", fontsize=8)
    return fig


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    plt = _plt()
    path = Path(path)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path
