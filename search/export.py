"""Export the best trial(s) of a sweep as complete training YAMLs that ``losstune train`` accepts.

Each file holds every ``TrainConfig`` field (task, data, model, training settings, the chosen loss
weights) and a ``provenance:`` block (sweep, trial id, score, metrics, MLflow run ids, time, and
``verification``: the trial's fresh-seed numbers against its matched baseline, or ``none``).
Reads the trials from disk (:mod:`search.trials`), so it works after the sweep's driver died.

After a verification (``<sweep>/verify/summary.json``) the verified configs come first, best verified mean
objective first; the sweep's own ranking orders the rest.
"""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Any

import yaml

from losstune.search import space as sp
from losstune.search.trials import ResultsError, SweepResults, load_results
from losstune.search.verify import read_summary
from losstune.search.verify_verdict import is_loss_value
from losstune.trainables.config import ConfigError, parse_train_config

REPORTED = ("composite", "ssim", "mse", "psnr", "gradient_match", "sharpness_ratio", "histogram_distance",
            "val_loss", "loss")


class ExportError(RuntimeError):
    """No trial can be exported (all failed or diverged, or none ran)."""


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        try:
            return _clean(value.item())
        except (TypeError, ValueError):
            pass
    return value


def _rounded(value: Any, digits: int = 6) -> Any:
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else None
    return value


def verification_block(summary: dict[str, Any] | None, trial_id: str) -> dict[str, Any] | str:
    """The trial's verification for its provenance: seeds, means and intervals of the config and of its
    matched baseline, the paired differences, the verdict; ``"none"`` where it was not verified."""
    config = next((c for c in (summary or {}).get("configs", []) if c["trial_id"] == trial_id), None)
    if config is None:
        return "none"

    def numbers(per_metric: dict[str, Any]) -> dict[str, Any]:  # loss values differ by construction: left out
        return {m: {k: _rounded(d.get(k)) for k in ("mean", "low", "high")} for m, d in per_metric.items()
                if not is_loss_value(m)}

    return {
        "seeds": list(config["seeds"]),
        "epochs": summary.get("epochs"),
        "objective": summary.get("objective"),
        "confidence": summary.get("confidence"),
        "means": numbers(config["tuned"]),
        "baseline_means": numbers(config["baseline"]),
        "paired_differences": numbers(config["difference"]),
        "ranks": {str(k): v for k, v in (config.get("ranks") or {}).items()},
        "verdict": (summary.get("verdicts") or {}).get(trial_id),
        "verified_at": summary.get("verified_at"),
    }


def trial_document(results: SweepResults, trial_id: str, rank: int,
                   summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """The exported YAML (as a mapping) of one trial."""
    row = results.table.set_index("trial_id").loc[trial_id]
    try:
        config = parse_train_config(results.trial_config(trial_id)).model_dump()
    except ConfigError as err:  # pragma: no cover - the sweep validated every point
        raise ExportError(f"trial {trial_id}: its config is invalid: {err}") from None
    history = results.histories.get(trial_id) or [{}]
    last = history[-1]
    info = results.info
    sampled = sp.decode(results.sweep.params, results.configs.get(trial_id, {})) if results.sweep else {}
    provenance = {
        "sweep": results.name,
        "sweep_dir": str(results.sweep_dir),
        "trial_id": trial_id,
        "rank": rank,
        "score": _clean(float(row["composite"])),
        "objective": (info.objective or {}).get("type", "composite"),
        "status": row["status"],
        "epochs_trained": int(row["epochs"]),
        "metrics": {k: _clean(float(last[k])) for k in REPORTED if isinstance(last.get(k), (int, float))},
        "best_composite": _clean(row["best_composite"]),
        "params": {k: _clean(v) for k, v in sampled.items()},
        "mlflow": {
            "tracking_uri": info.tracking_uri,
            "experiment": info.experiment,
            "parent_run_id": info.parent_run_id,
            "run_id": _clean(row["run_id"]) if isinstance(row["run_id"], str) else None,
        },
        "sweep_config": info.config_path,
        "overrides": info.overrides or {},  # KEY=VALUE given on the command line
        "verification": verification_block(summary, trial_id),
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return {**config, "provenance": provenance}


def _header(doc: dict[str, Any], path: Path) -> str:
    p = doc["provenance"]
    verified = p["verification"]
    checked = (f"# verified: {verified['verdict']}\n" if isinstance(verified, dict) and verified.get("verdict")
               else "# not verified: losstune verify " + p["sweep_dir"] + "\n")
    return (f"# losstune: trial {p['trial_id']} of sweep {p['sweep']!r} (rank {p['rank']}, "
            f"composite {p['score']:.4f})\n" + checked +
            f"# train it:  losstune train {path}  [--epochs N]\n")


def export(sweep_dir: str | Path, out: str | Path | None = None, top_k: int = 1,
           results: SweepResults | None = None) -> list[Path]:
    """Write the best ``top_k`` trials: ``best.yaml`` (or ``out``), then ``best_2.yaml`` ... beside it."""
    if top_k < 1:
        raise ValueError("--top-k must be >= 1")
    results = results or load_results(sweep_dir)
    if results.sweep is None:
        raise ResultsError(f"{results.sweep_dir}: the sweep config (sweep.yaml) is missing or invalid")
    ranked = results.ranked()
    if ranked.empty:
        raise ExportError(f"{results.sweep_dir}: no trial to export (every trial failed, diverged or has "
                          "no result yet)")
    first = Path(out).expanduser() if out else results.sweep_dir / "best.yaml"
    first.parent.mkdir(parents=True, exist_ok=True)
    summary = read_summary(results.sweep_dir)
    verified = [c["trial_id"] for c in (summary or {}).get("configs", []) if c["trial_id"] in set(ranked["trial_id"])]
    order = verified + [t for t in ranked["trial_id"] if t not in verified]
    paths = []
    for rank, trial_id in enumerate(order[:top_k], start=1):
        path = first if rank == 1 else first.with_name(f"{first.stem}_{rank}{first.suffix or '.yaml'}")
        doc = trial_document(results, trial_id, rank, summary)
        text = _header(doc, path) + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        paths.append(path)
    return paths
