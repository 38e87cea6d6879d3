"""Verification end to end: a real small sweep (real Ray, Optuna, MLflow on sqlite) whose ``verify:`` section
re-trains the best config and its matched baseline on 2 fresh seeds, then ``losstune verify --top-k 2`` adds the
runner-up, reusing every finished run, through a Ctrl-C. Plug-in denoising task (tests/plugin_task.py, its slow
variant), 16 px, 1 epoch.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from losstune.search.cli import main

pytestmark = pytest.mark.slow

SWEEP = {
    "name": "verified",
    # ~1 s per run (3 steps of 0.3 s): the Ctrl-C test interrupts a round of 4 runs half-way
    "train": {"task": "plugin_task:build_slow", "epochs": 1, "batch_size": 12, "lr": 0.01, "device": "cpu",
              "amp": "off", "data": {"size": 16, "step_sleep": 0.3}},
    "space": {"gradient_weight": {"type": "uniform", "low": 0.1, "high": 0.5},
              "lr": {"type": "loguniform", "low": 0.005, "high": 0.02}},
    "search": {"sampler": "random", "seed": 0, "num_samples": 3, "max_concurrent": 2},
    "scheduler": {"type": "fifo"},
    "objective": {"type": "composite"},
    "resources": {"cpu": 1, "gpu": 0},
    "mlflow": {"experiment": "losstune-verify"},
    "verify": {"top_k": 1, "seeds": 2},
}


def _verify_runs(runs, parent_id):
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id
            and r.data.tags.get("stage") == "verify"]


@pytest.fixture(scope="module")
def verified(tmp_path_factory, ray_local):
    """A finished sweep whose verify: section ran (the top config x 2 seeds x 2 arms)."""
    import contextlib
    import io
    tmp_path = tmp_path_factory.mktemp("verified")
    path = tmp_path / "verified.yaml"
    path.write_text(yaml.safe_dump(SWEEP, sort_keys=False))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["sweep", str(path), "--results-dir", str(tmp_path / "res"), "--tracking-uri", uri])
    assert rc == 0, buf.getvalue()
    return tmp_path / "res" / "verified", uri, buf.getvalue()


def _files(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in folder.rglob("*")} if folder.exists() else {}


def test_sweep_verifies_its_winners(verified, mlflow_runs):
    sweep_dir, uri, out = verified
    verify_dir = sweep_dir / "verify"
    for name in ("summary.json", "verdict.txt", "runs.csv"):
        assert (verify_dir / name).is_file(), name
    summary = json.loads((verify_dir / "summary.json").read_text())
    assert len(summary["configs"]) == 1 and len(summary["seeds"]) == 2
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
    assert len(verify) == 1 * 2 * 2
    assert all(r.info.status == "FINISHED" and "composite" in r.data.metrics for r in verify)
    arms = sorted(r.data.params["verify.arm"] for r in verify)
    assert arms == ["baseline"] * 2 + ["tuned"] * 2
    assert all(float(r.data.params["gradient_weight"]) == 0.0
               for r in verify if r.data.params["verify.arm"] == "baseline")
    assert parent.data.tags["losstune.verdict"] == verdict.strip()

    # best.yaml: the best verified mean objective, with its verification block
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    block = best["provenance"]["verification"]
    winner = summary["configs"][0]
    assert best["provenance"]["trial_id"] == winner["trial_id"]
    assert block["seeds"] == summary["seeds"]
    assert block["means"]["composite"]["mean"] == pytest.approx(winner["tuned"]["composite"]["mean"], rel=1e-5)
    assert block["paired_differences"]["composite"]["low"] is not None and block["verdict"]

    # an export beyond the verified configs: the third is the sweep's own choice, marked unverified
    assert main(["export", str(sweep_dir), "--out", str(sweep_dir.parent / "x.yaml"), "--top-k", "3"]) == 0
    third = yaml.safe_load((sweep_dir.parent / "x_3.yaml").read_text())["provenance"]
    assert third["verification"] == "none"
    assert third["trial_id"] not in {c["trial_id"] for c in summary["configs"]}

    # the report: a Verification section (table, interval plot), the panel shows the winner vs its baseline
    assert main(["report", str(sweep_dir), "--no-mlflow"]) == 0
    report = json.loads((sweep_dir / "report" / "report.json").read_text())
    assert report["verified"] and {"verification", "panel"} <= set(report["images"])
    page = (sweep_dir / "report" / "report.html").read_text()
    assert "Verification: fresh seeds against the matched baseline" in page
    assert f"The verified winner <b>{winner['trial_id']}</b> against its matched baseline" in page

    # the runs' numbers in runs.csv are the ones the statistics used
    rows = list(csv.DictReader((verify_dir / "runs.csv").open()))
    tuned = [float(r["composite"]) for r in rows if r["trial_id"] == winner["trial_id"] and r["arm"] == "tuned"]
    assert sorted(tuned) == pytest.approx(sorted(winner["tuned"]["composite"]["values"]))



@pytest.mark.parametrize("args, message", [
    (["--seeds", "1"], "--seeds: 1 seed gives no confidence interval; use at least 2"),
    (["--top-k", "4"], "--top-k: 4 is more than the 3 trial(s) of the sweep with a result"),
    (["--top-k", "0"], "--top-k: must be >= 1"),
])
def test_bad_requests_exit_2_and_write_nothing(verified, capsys, args, message):
    sweep_dir = verified[0]
    before = _files(sweep_dir)
    assert main(["verify", str(sweep_dir), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("losstune: error: " + message) and len(err.strip().splitlines()) == 1, err
    assert _files(sweep_dir) == before


def test_verify_on_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    assert main(["verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a losstune sweep folder (no sweep.json)" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def _losstune() -> list[str]:
    exe = Path(sys.executable).with_name("losstune")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "losstune.search.cli"]


def test_ctrl_c_keeps_finished_runs_and_a_rerun_continues(verified, mlflow_runs, capsys):
    """One more config (the runner-up x 2 seeds x 2 arms = 4 new runs): Ctrl-C after the first new run
    finished; the rerun continues the interrupted round (same MLflow child runs) and only then concludes."""
    sweep_dir, uri, _ = verified
    summary = json.loads((sweep_dir / "verify" / "summary.json").read_text())
    tests = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(tests), str(tests.parent)])
    log = sweep_dir.parent / "ctrl_c.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(_losstune() + ["verify", str(sweep_dir), "--top-k", "2"], stdout=f,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "(1/4 done)" not in log.read_text():  # the driver saw the round's first run finish
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    text = log.read_text()
    assert proc.returncode == 130, text[-4000:]
    assert "Continue it with: losstune verify" in text and "Traceback" not in text, text[-4000:]
    # the earlier verification stays what it was until the extension is complete
    assert json.loads((sweep_dir / "verify" / "summary.json").read_text()) == summary

    assert main(["verify", str(sweep_dir), "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    reused = int(re.search(r"; (\d+) runs already finished", out).group(1))
    assert 4 < reused < 8 and "continuing the interrupted" in out, out  # the 4 old ones + what ended before Ctrl-C
    summary2 = json.loads((sweep_dir / "verify" / "summary.json").read_text())
    assert summary2["seeds"] == summary["seeds"] and len(summary2["configs"]) == 2
    runs = mlflow_runs(uri, "losstune-verify")
    parent_id = json.loads((sweep_dir / "sweep.json").read_text())["parent_run_id"]
    verify = _verify_runs(runs, parent_id)
    assert sum(r.info.status == "FINISHED" for r in verify) == 2 * 2 * 2
    assert len(verify) == 2 * 2 * 2, [(r.data.params, r.info.status) for r in verify]  # no duplicate child run
    best = summary["configs"][0]
    again = next(c for c in summary2["configs"] if c["trial_id"] == best["trial_id"])
    assert again["tuned"]["composite"]["values"] == best["tuned"]["composite"]["values"]  # the same runs, reused
