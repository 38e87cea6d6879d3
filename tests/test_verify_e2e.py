"""Verification end to end: a real small sweep (real Ray, Optuna, MLflow on sqlite) whose ``verify:`` section
re-trains the top configs and their matched baselines on fresh seeds, then ``losstune verify`` extends it
with a seed, reusing every finished run. Plug-in denoising task (tests/plugin_task.py), 16 px, 1 epoch.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from losstune.search.cli import main

pytestmark = pytest.mark.slow

SWEEP = {
    "name": "verified",
    "train": {"task": "plugin_task:build", "epochs": 1, "batch_size": 12, "lr": 0.01, "device": "cpu",
              "amp": "off", "data": {"size": 16}},
    "space": {"gradient_weight": {"type": "uniform", "low": 0.1, "high": 0.5},
              "lr": {"type": "loguniform", "low": 0.005, "high": 0.02}},
    "search": {"sampler": "random", "seed": 0, "num_samples": 3, "max_concurrent": 2},
    "scheduler": {"type": "fifo"},
    "objective": {"type": "composite"},
    "resources": {"cpu": 1, "gpu": 0},
    "mlflow": {"experiment": "losstune-verify"},
    "verify": {"top_k": 2, "seeds": 2},
}


def _verify_runs(runs, parent_id):
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id
            and r.data.tags.get("stage") == "verify"]


def test_sweep_then_verify_extends(tmp_path, ray_local, clean_env, capsys, mlflow_runs):
    path = tmp_path / "verified.yaml"
    path.write_text(yaml.safe_dump(SWEEP, sort_keys=False))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(["sweep", str(path), "--results-dir", str(tmp_path / "res"), "--tracking-uri", uri])
    out = capsys.readouterr().out
    assert rc == 0, out
    sweep_dir = tmp_path / "res" / "verified"
    verify_dir = sweep_dir / "verify"
    for name in ("summary.json", "verdict.txt", "runs.csv"):
        assert (verify_dir / name).is_file(), name
    summary = json.loads((verify_dir / "summary.json").read_text())
    assert len(summary["configs"]) == 2 and len(summary["seeds"]) == 2
    assert not set(summary["seeds"]) & {0}  # the sweep trained with seed 0: the verification never does
    verdict = (verify_dir / "verdict.txt").read_text()
    assert verdict.startswith("verified winner: trial ") and "verification:" in out

    # MLflow: top_k x seeds x 2 verify runs under the parent; the sweep's trials are stage: search
    info = json.loads((sweep_dir / "sweep.json").read_text())
    runs = mlflow_runs(uri, "losstune-verify")
    parent = next(r for r in runs if r.info.run_id == info["parent_run_id"])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sum(r.data.tags.get("stage") == "search" for r in children) == 3
    verify = _verify_runs(runs, parent.info.run_id)
    assert len(verify) == 2 * 2 * 2
    assert all(r.info.status == "FINISHED" and "composite" in r.data.metrics for r in verify)
    arms = sorted(r.data.params["verify.arm"] for r in verify)
    assert arms == ["baseline"] * 4 + ["tuned"] * 4
    assert all(float(r.data.params["gradient_weight"]) == 0.0 for r in verify if r.data.params["verify.arm"] == "baseline")
    assert parent.data.tags["losstune.verdict"] == verdict.strip()

    # best.yaml: the best verified mean objective, with its verification block
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    block = best["provenance"]["verification"]
    winner = summary["configs"][0]
    assert best["provenance"]["trial_id"] == winner["trial_id"]
    assert block["seeds"] == summary["seeds"]
    assert block["means"]["composite"]["mean"] == pytest.approx(winner["tuned"]["composite"]["mean"], rel=1e-5)
    assert block["paired_differences"]["composite"]["low"] is not None and block["verdict"]

    # the runs' numbers in runs.csv are the ones the statistics used
    rows = list(csv.DictReader((verify_dir / "runs.csv").open()))
    tuned = [float(r["composite"]) for r in rows if r["trial_id"] == winner["trial_id"] and r["arm"] == "tuned"]
    assert sorted(tuned) == pytest.approx(sorted(winner["tuned"]["composite"]["values"]))

    # one more seed: only the 2 x 2 new runs train, the 8 finished ones are reused
    rc = main(["verify", str(sweep_dir), "--seeds", "3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "8 runs already finished" in out
    summary3 = json.loads((verify_dir / "summary.json").read_text())
    assert summary3["seeds"][:2] == summary["seeds"] and len(summary3["seeds"]) == 3
    assert len(_verify_runs(mlflow_runs(uri, "losstune-verify"), parent.info.run_id)) == 2 * 3 * 2
    again = [c for c in summary3["configs"] if c["trial_id"] == winner["trial_id"]][0]
    assert again["tuned"]["composite"]["values"][:2] == winner["tuned"]["composite"]["values"]
