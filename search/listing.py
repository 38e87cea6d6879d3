"""``losstune ls``: the sweeps under a results root, one summary each (read from disk only).

A sweep folder is one holding ``sweep.json``. Its summary: name, status (as the sweep last wrote it:
``running`` also for a driver that was killed), trials (count per trial status), the best composite
and its trial, and ``verified``: whether ``<sweep_dir>/verify/summary.json`` exists (the verification
stage writes it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from losstune.search.trials import SWEEP_FILE, ResultsError, load_results, read_info

VERIFY_SUMMARY = Path("verify") / "summary.json"


def summarize_sweep(sweep_dir: Path) -> dict[str, Any]:
    """One sweep's summary (see the module docstring); unreadable parts are ``None``."""
    summary: dict[str, Any] = {"name": sweep_dir.name, "path": str(sweep_dir), "status": None,
                               "created_at": None, "trials": None, "trial_statuses": {},
                               "best_composite": None, "best_trial": None,
                               "verified": (sweep_dir / VERIFY_SUMMARY).is_file()}
    try:
        info = read_info(sweep_dir)
    except ResultsError:
        summary["status"] = "unreadable"
        return summary
    summary.update(status=info.status, created_at=info.created_at)
    try:
        results = load_results(sweep_dir)
    except ResultsError:
        return summary
    table = results.table
    summary["trials"] = int(len(table))
    if not table.empty:
        summary["trial_statuses"] = {str(k): int(v) for k, v in table["status"].value_counts().items()}
    ranked = results.ranked()
    if not ranked.empty:
        best = ranked.iloc[0]
        summary.update(best_composite=float(best["composite"]), best_trial=str(best["trial_id"]))
    return summary


def list_sweeps(root: str | Path) -> list[dict[str, Any]]:
    """The summaries of the sweep folders directly under ``root``, oldest first."""
    dirs = [p.parent for p in Path(root).glob(f"*/{SWEEP_FILE}")]
    summaries = [summarize_sweep(d) for d in dirs]
    return sorted(summaries, key=lambda s: (s["created_at"] or "", s["name"]))


def format_listing(summaries: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`list_sweeps`'s summaries."""
    header = ("NAME", "STATUS", "TRIALS", "BEST", "BEST TRIAL", "VERIFIED", "CREATED")
    rows = [header]
    for s in summaries:
        statuses = ", ".join(f"{n} {k}" for k, n in sorted(s["trial_statuses"].items()))
        trials = "-" if s["trials"] is None else f"{s['trials']}" + (f" ({statuses})" if statuses else "")
        best = "-" if s["best_composite"] is None else f"{s['best_composite']:.4f}"
        rows.append((s["name"], s["status"] or "-", trials, best, s["best_trial"] or "-",
                     "yes" if s["verified"] else "no", s["created_at"] or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
