"""Shared helpers of the benchmarks: argument parsing, machine info, tables, JSON output."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "results" / "bench"


def parse_args(description: str, argv: Sequence[str] | None = None,
               extra: Iterable[tuple[tuple, dict]] = ()) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a short run (smoke-sized; numbers not meaningful)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"folder of the JSON result (default {DEFAULT_OUT})")
    for args, kwargs in extra:
        parser.add_argument(*args, **kwargs)
    return parser.parse_args(argv)


def ensure_repo_on_path() -> None:
    """The repository root importable here and in every process started from here (Ray workers)."""
    root = str(REPO)
    if root not in sys.path:
        sys.path.insert(0, root)
    paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))


def git_rev() -> str:
    """The current commit (read-only git call) with ``+dirty`` when the working tree has changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
    }
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    for module in ("torch", "ray", "optuna", "mlflow"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - a missing package is just not reported
            pass
    try:
        import torch
        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return info


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def median(values: Iterable[float]) -> float:
    values = [v for v in values if finite(v)]
    return statistics.median(values) if values else math.nan


def fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}g}"
    if value is None:
        return "-"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False) -> str:
    """A plain (or GitHub-markdown) table of ``rows``."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    if markdown:
        lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
                 "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    else:
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def goal(name: str, value: float, limit: float, met: bool | None = None, note: str = "") -> dict[str, Any]:
    """One goal line: ``value <= limit`` unless ``met`` says otherwise (None = not measurable here)."""
    if met is None and isinstance(value, (int, float)) and not math.isnan(value):
        met = value <= limit  # inf (never reached) is a miss
    return {"goal": name, "value": value, "limit": limit, "met": met, "note": note}


def write_result(name: str, out_dir: str | Path, *, quick: bool, settings: dict[str, Any], results: dict[str, Any],
                 goals: list[dict[str, Any]], table_text: str, started: float, notes: Sequence[str] = (),
                 module: str | None = None) -> Path:
    """``<out_dir>/<name>.json`` with machine info, timestamp and git revision; returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "benchmark": name, "mode": "quick" if quick else "full",
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_rev": git_rev(), "machine": machine_info(), "duration_s": time.perf_counter() - started,
        "command": " ".join(["python", "-m", module or f"benchmarks.{name}", *sys.argv[1:]]),
        "settings": settings, "results": results, "goals": goals, "notes": list(notes), "table": table_text,
    }
    path = out / f"{name}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=_jsonable, allow_nan=True))
    os.replace(tmp, path)
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def print_goals(goals: list[dict[str, Any]]) -> None:
    rows = [[g["goal"], g["value"], f"<= {fmt(g['limit'])}", {True: "MET", False: "MISSED", None: "n/a"}[g["met"]],
             g.get("note", "")] for g in goals]
    print(table(["goal", "value", "limit", "status", "note"], rows))


def set_single_thread() -> None:
    """One intra-op thread (2 shared cores: keep processes from fighting over them)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
