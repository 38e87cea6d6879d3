"""End-to-end sweeps on a real local Ray (2 CPUs), real Optuna and MLflow on sqlite in tmp_path.

Tiny microstructure configs (16 px, 4 sequences, hidden [4, 8], <= 4 epochs) keep the file in a
few minutes on 2 cores.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import yaml

from losstune.search.cli import main
from losstune.search.study import load_study
from losstune.search.trials import load_results, pareto_front

REPO = Path(__file__).resolve().parents[2]
SMOKE = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
LOOP_METRICS = {"loss", "loss_pixel", "val_loss", "ssim", "mse", "psnr", "gradient_match", "sharpness_ratio",
                "histogram_distance", "composite", "num_val",
                # the microstructure task's evaluation region (where the frame changes): the objective's by default
                "ssim_active", "mse_active", "gradient_match_active", "composite_full", "composite_active"}

pytestmark = pytest.mark.slow


def _sweep(tmp_path: Path, cfg: dict, name: str, *extra: str) -> tuple[int, Path, str]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(["sweep", str(path), "--results-dir", str(tmp_path / "res"), "--tracking-uri", uri, *extra])
    return rc, tmp_path / "res" / cfg["name"], uri


def test_smoke_sweep_end_to_end(tmp_path, ray_local, clean_env, capsys, mlflow_runs):
    # the child runs written through the MLflow helper process (the other sweeps here write them in the driver
    # on a machine with < 4 cores, mlflow.store_process: auto)
    rc, sweep_dir, uri = _sweep(tmp_path, SMOKE, "smoke", "mlflow.store_process=true")
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "top trials" in out
    n = SMOKE["search"]["num_samples"]
    epochs = SMOKE["train"]["epochs"]

    # results folder
    for name in ("sweep.json", "sweep.yaml", "optuna.journal", "best.yaml", "trials.csv", "mlflow_runs.json"):
        assert (sweep_dir / name).is_file(), name
    info = json.loads((sweep_dir / "sweep.json").read_text())
    assert info["status"] == "finished" and info["parent_run_id"]
    # the tracking callback's own cost per result stays tiny
    assert info["tracking"]["num_results"] == n * epochs
    assert info["tracking"]["per_result_ms"] < 1.0, info["tracking"]
    assert info["tracking"]["dropped_metrics"] == 0
    assert info["tracking"]["store_process_cpu_s"] > 0  # the helper did the store's work

    # the Optuna study is persisted and reloadable
    study = load_study(sweep_dir, "smoke")
    assert len(study.trials) == n
    assert study.trials[0].params["gradient_weight"] == 0.0  # the hand-set point ran first

    # MLflow: one parent, one child per trial, params + per-epoch metrics
    runs = mlflow_runs(uri, "losstune-smoke")
    parents = [r for r in runs if r.data.tags.get("losstune.kind") == "sweep"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == info["parent_run_id"] and parent.info.status == "FINISHED"
    assert parent.data.params["train.data.size"] == "16"
    assert "best_composite" in parent.data.metrics
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == n
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    trial_ids = set()
    for child in children:
        # the sampled values, and the size of the validation set the metrics average over
        assert set(child.data.params) == {"gradient_weight", "lr", "model.hidden_channels", "num_val"}
        assert int(child.data.params["num_val"]) == child.data.metrics["num_val"] > 0
        assert child.data.params["model.hidden_channels"] in ("[4, 8]", "[8, 8]")
        assert child.data.tags["losstune.task"] == "microstructure"
        assert child.data.tags["losstune.status"] == "finished" and child.info.status == "FINISHED"
        assert child.data.tags.get("losstune.node_ip")
        assert LOOP_METRICS <= set(child.data.metrics), set(child.data.metrics)
        history = client.get_metric_history(child.info.run_id, "composite")
        assert sorted(m.step for m in history) == list(range(1, epochs + 1))
        trial_ids.add(child.data.tags["losstune.trial_id"])

    # trials table / CSV agree with MLflow
    results = load_results(sweep_dir)
    assert set(results.table["trial_id"]) == trial_ids
    assert (results.table["status"] == "finished").all()
    assert (results.table["epochs"] == epochs).all()
    assert (results.table["composite"] == results.table["composite_active"]).all()  # objective region: auto = active
    assert results.table["composite_full"].notna().all() and results.table["gradient_match_active"].notna().all()
    csv = pd.read_csv(sweep_dir / "trials.csv")
    assert len(csv) == n

    # best.yaml: a complete training config + provenance, the best composite
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    prov = best.pop("provenance")
    from losstune.trainables.config import TrainConfig
    assert set(best) == set(TrainConfig.model_fields)
    assert prov["score"] == pytest.approx(results.table["composite"].max())
    assert prov["mlflow"]["parent_run_id"] == parent.info.run_id
    assert prov["mlflow"]["run_id"] in {c.info.run_id for c in children}
    assert prov["trial_id"] in trial_ids

    # export --top-k
    assert main(["export", str(sweep_dir), "--top-k", "2", "--out", str(tmp_path / "exp" / "best.yaml")]) == 0
    assert (tmp_path / "exp" / "best.yaml").is_file() and (tmp_path / "exp" / "best_2.yaml").is_file()
    second = yaml.safe_load((tmp_path / "exp" / "best_2.yaml").read_text())["provenance"]
    assert second["rank"] == 2 and second["score"] <= prov["score"]

    # trials command
    capsys.readouterr()
    assert main(["trials", str(sweep_dir), "--sort", "mse", "--csv", str(tmp_path / "t.csv")]) == 0
    table = capsys.readouterr().out
    assert "trial_id" in table and "composite" in table and all(t in table for t in trial_ids)
    assert len(pd.read_csv(tmp_path / "t.csv")) == n

    # final training from best.yaml, logged under the sweep's parent run
    assert main(["train", str(sweep_dir / "best.yaml"), "--epochs", "1", "--no-progress"]) == 0
    model = sweep_dir / "final" / "model.pt"
    assert model.is_file() and (sweep_dir / "final" / "config.yaml").is_file()
    saved = torch.load(model, weights_only=False)
    assert saved["config"]["epochs"] == 1 and saved["state_dict"]
    finals = [r for r in mlflow_runs(uri, "losstune-smoke") if r.data.tags.get("losstune.final") == "true"]
    assert len(finals) == 1
    final = finals[0]
    assert final.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert final.info.status == "FINISHED"
    assert "composite" in final.data.metrics and final.data.params["epochs"] == "1"

    # the same --name again without --resume: refused, nothing clobbered (without --name the sweep would
    # run as smoke-2: tests/e2e/test_cli.py)
    rc, _, _ = _sweep(tmp_path, SMOKE, "smoke", "--name", "smoke")
    assert rc == 2 and (sweep_dir / "best.yaml").is_file() and not (sweep_dir.parent / "smoke-2").exists()


def test_asha_stops_bad_trials_early(tmp_path, ray_local, clean_env, capsys, mlflow_runs):
    cfg = yaml.safe_load(yaml.safe_dump(SMOKE))
    cfg["name"] = "asha"
    cfg["train"]["epochs"] = 4
    # a learning-rate range whose upper part is clearly bad after one epoch (composite ~ -0.1 vs 0.55)
    cfg["space"] = {"lr": {"type": "loguniform", "low": 1e-3, "high": 1.0},
                    "gradient_weight": {"type": "uniform", "low": 0.0, "high": 0.2}}
    cfg["search"] = {"sampler": "tpe", "seed": 1, "num_samples": 6, "max_concurrent": 2,
                     "points_to_evaluate": [{"lr": 3e-3}, {"lr": 3e-3, "gradient_weight": 0.1},
                                            {"lr": 1.0}, {"lr": 0.5}]}
    cfg["scheduler"] = {"type": "asha", "grace_period": 1, "reduction_factor": 2}
    rc, sweep_dir, uri = _sweep(tmp_path, cfg, "asha")
    out = capsys.readouterr().out
    assert rc == 0, out
    results = load_results(sweep_dir)
    table = results.table
    assert len(table) == 6
    stopped = table[table["epochs"] < 4]
    assert len(stopped) >= 1, table
    assert set(stopped["status"]) == {"stopped_early"}
    assert (table[table["epochs"] == 4]["status"] == "finished").all()
    # the best trial is not one of the clearly bad ones
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert best["lr"] < 0.1 and best["provenance"]["score"] > 0
    # MLflow mirrors ASHA's decision
    runs = {r.data.tags.get("losstune.trial_id"): r for r in mlflow_runs(uri, "losstune-smoke")}
    for trial_id in stopped["trial_id"]:
        run = runs[trial_id]
        assert run.data.tags["losstune.status"] == "stopped_early" and run.info.status == "KILLED"
    assert any(line.startswith("[losstune] stopped ") and "epochs 4/4" not in line for line in out.splitlines()), out


def test_pareto_sweep_saves_its_front(tmp_path, ray_local, clean_env, capsys):
    cfg = yaml.safe_load(yaml.safe_dump(SMOKE))
    cfg["name"] = "pareto"
    cfg["space"] = {"gradient_weight": {"type": "uniform", "low": 0.0, "high": 1.0},
                    "lr": {"type": "loguniform", "low": 1e-3, "high": 3e-2}}
    cfg["search"] = {"sampler": "nsga2", "seed": 0, "num_samples": 4, "max_concurrent": 2}
    cfg["objective"] = {"type": "pareto"}
    rc, sweep_dir, _ = _sweep(tmp_path, cfg, "pareto")
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "pareto front" in out
    front = pd.read_csv(sweep_dir / "pareto.csv")
    assert 1 <= len(front) <= 4
    results = load_results(sweep_dir)
    metrics = {"ssim": "max", "mse": "min", "gradient_match": "max"}
    # every trial off the front is dominated by one on it, and no front member dominates another
    assert set(front["trial_id"]) == set(pareto_front(results.ranked(), metrics)["trial_id"])
    for _, row in results.table.iterrows():
        if row["trial_id"] in set(front["trial_id"]):
            continue
        assert any(f["ssim"] >= row["ssim"] and f["mse"] <= row["mse"] and
                   f["gradient_match"] >= row["gradient_match"] for _, f in front.iterrows())
    # Optuna ran a 3-objective study
    study = load_study(sweep_dir, "pareto")
    assert len(study.directions) == 3 and study.best_trials
    assert all(math.isfinite(v) for t in study.best_trials for v in t.values)
    assert (sweep_dir / "best.yaml").is_file()


# ----- the tracking callback on its own (no Ray trials): cheap hooks, no duplicate runs, a dead server
class _FakeTrial:
    def __init__(self, trial_id: str, config: dict):
        self.trial_id, self.config, self.last_result, self.status = trial_id, config, {}, "RUNNING"
        self.path = "/nowhere"

    def __str__(self) -> str:
        return f"losstune_trial_{self.trial_id}"


def _drive(cb, trial: _FakeTrial, epochs: range, end: str | None = "complete") -> None:
    cb.on_trial_start(0, [trial], trial)
    for epoch in epochs:
        result = {"training_iteration": epoch, "epoch": float(epoch), "composite": 0.1 * epoch, "ssim": 0.5,
                  "mse": 0.01, "loss": 1.0 / epoch, "diverged": 0.0, "node_ip": "10.0.0.1", "time_total_s": 1.0,
                  "config": trial.config, "done": False}
        trial.last_result = result
        cb.on_trial_result(0, [trial], trial, result)
    if end == "complete":
        cb.on_trial_complete(0, [trial], trial)


def test_tracking_callback_resume_reuses_runs(tmp_path, mlflow_uri, mlflow_runs):
    from losstune.search.tracking import SweepTracker, TrackingCallback, read_runs_file

    tracker = SweepTracker(mlflow_uri, "cbtest")
    parent = tracker.start("cb", {"train.lr": 0.001}, {})
    make = lambda: TrackingCallback(tmp_path, mlflow_uri, tracker.experiment_id, parent, max_epochs=3,  # noqa: E731
                                    decode=lambda c: {"w": c["w"]}, tags={"losstune.task": "t"},
                                    flush_interval=0.05)
    cb = make()
    cb.setup()
    a, b = _FakeTrial("aaa", {"w": 0.1}), _FakeTrial("bbb", {"w": 0.2})
    _drive(cb, a, range(1, 4))             # finished
    _drive(cb, b, range(1, 2), end=None)    # interrupted after one epoch
    assert cb.flush(timeout=30)
    assert cb.stats()["per_result_ms"] < 1.0
    cb.mark_interrupted()
    cb.close(timeout=30)
    assert read_runs_file(tmp_path)["bbb"]["status"] == "interrupted"

    # "--resume": a new callback (as Tune unpickles it) continues b in the same child run
    cb2 = make()
    cb2.setup()
    _drive(cb2, b, range(2, 4))
    cb2.close(timeout=30)
    runs = [r for r in mlflow_runs(mlflow_uri, "cbtest") if r.data.tags.get("mlflow.parentRunId") == parent]
    assert sorted(r.data.tags["losstune.trial_id"] for r in runs) == ["aaa", "bbb"]
    from mlflow.tracking import MlflowClient
    client = MlflowClient(mlflow_uri)
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["losstune.status"] == "finished"
        assert run.data.tags["losstune.node_ip"] == "10.0.0.1"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "composite")]
        assert sorted(steps) == [1, 2, 3]
    assert {r.data.params["w"] for r in runs} == {"0.1", "0.2"}
    statuses = read_runs_file(tmp_path)
    assert {k: v["status"] for k, v in statuses.items()} == {"aaa": "finished", "bbb": "finished"}


def test_tracking_callback_finds_the_run_a_killed_driver_made_but_did_not_save(tmp_path, mlflow_uri, mlflow_runs):
    """A trial the runs file names without a run id (the driver died between saving the entry and saving the
    run id) is looked up by its tags and continues in that run; a trial new to the sweep gets a new run."""
    from losstune.search.tracking import SweepTracker, TrackingCallback, read_runs_file, write_json_atomic

    tracker = SweepTracker(mlflow_uri, "found")
    parent = tracker.start("f", {}, {})
    made = tracker.client.create_run(tracker.experiment_id, tags={"mlflow.parentRunId": parent,
                                                                  "losstune.trial_id": "old"}).info.run_id
    write_json_atomic(tmp_path / "mlflow_runs.json", {"old": {"run_id": None, "status": "running", "epochs": 0}})
    cb = TrackingCallback(tmp_path, mlflow_uri, tracker.experiment_id, parent, max_epochs=2, flush_interval=0.05)
    cb.setup()
    for trial_id in ("old", "new"):
        _drive(cb, _FakeTrial(trial_id, {"w": 1}), range(1, 3))
    cb.close(timeout=30)
    runs = [r for r in mlflow_runs(mlflow_uri, "found") if r.data.tags.get("mlflow.parentRunId") == parent]
    assert sorted(r.data.tags["losstune.trial_id"] for r in runs) == ["new", "old"]
    assert read_runs_file(tmp_path)["old"]["run_id"] == made
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["losstune.status"] == "finished"
        assert run.data.metrics["epoch"] == 2.0


def test_tracking_callback_logs_the_image_series_as_mlflow_does(tmp_path, mlflow_uri, mlflow_runs):
    """Per epoch: the trial's PNG as it is + a WebP thumbnail (the trial's, else made from the PNG), named as
    MlflowClient.log_image(key="predictions", step=...) names them, and the loggedImages tag."""
    import io
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient
    from PIL import Image

    from losstune.search import artifacts
    from losstune.search.tracking import SweepTracker, TrackingCallback

    tracker = SweepTracker(mlflow_uri, "imgtest")
    parent = tracker.start("img", {}, {})
    cb = TrackingCallback(tmp_path, mlflow_uri, tracker.experiment_id, parent, max_epochs=2, flush_interval=0.05)
    cb.setup()
    grid = Image.new("RGB", (300, 120), "white")
    pngs = {}
    for name, with_thumb in (("thumbed", True), ("plain", False)):
        trial = _FakeTrial(name, {"w": 0.1})
        cb.on_trial_start(0, [trial], trial)
        for epoch in (1, 2):
            ckpt = tmp_path / f"{name}{epoch}"
            ckpt.mkdir()
            grid.save(ckpt / artifacts.PREDICTIONS_PNG, compress_level=1)
            pngs[(name, epoch)] = (ckpt / artifacts.PREDICTIONS_PNG).read_bytes()
            if with_thumb:
                artifacts.save_thumbnail(grid, ckpt / artifacts.PREDICTIONS_THUMB)
            trial.last_result = {"training_iteration": epoch, "epoch": float(epoch), "composite": 0.5}
            cb.on_trial_result(0, [trial], trial, trial.last_result)
            cb.on_checkpoint(0, [trial], trial, SimpleNamespace(path=str(ckpt)))
        cb.on_trial_complete(0, [trial], trial)
    cb.close(timeout=30)
    client = MlflowClient(mlflow_uri)
    runs = [r for r in mlflow_runs(mlflow_uri, "imgtest") if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(runs) == 2
    for run in runs:
        name = run.data.tags["losstune.trial_id"]
        assert run.data.tags["mlflow.loggedImages"] == "True"
        files = sorted(a.path for a in client.list_artifacts(run.info.run_id, "images"))
        assert len(files) == 4, files
        for epoch in (1, 2):
            png = next(f for f in files if f.startswith(f"images/predictions+step+{epoch}+timestamp+")
                       and f.endswith(".png"))
            local = client.download_artifacts(run.info.run_id, png, str(tmp_path / "dl" / name))
            assert Path(local).read_bytes() == pngs[(name, epoch)]  # not re-encoded
            thumb = client.download_artifacts(run.info.run_id, png[:-4] + "+compressed.webp",
                                              str(tmp_path / "dl" / name))
            with Image.open(io.BytesIO(Path(thumb).read_bytes())) as image:
                assert image.format == "WEBP" and image.size == (256, 102)


def test_tracking_callback_survives_a_dead_server(tmp_path, monkeypatch):
    import socket
    import time

    from losstune.search.tracking import TrackingCallback, read_runs_file

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cb = TrackingCallback(tmp_path, f"http://127.0.0.1:{port}", "0", "parent", max_epochs=2, flush_interval=0.05)
    cb.setup()
    trial = _FakeTrial("ccc", {"w": 1})
    t0 = time.perf_counter()
    _drive(cb, trial, range(1, 3))
    # the hooks never wait for the server: one MLflow call against it would take its 2 s timeout; the margin
    # below that is for a loaded CI machine
    assert time.perf_counter() - t0 < 1.5
    t0 = time.perf_counter()
    cb.close(timeout=3)
    assert time.perf_counter() - t0 < 20
    stats = cb.stats()
    assert stats["errors"] >= 1 and stats["dropped_metrics"] > 0
    assert read_runs_file(tmp_path)["ccc"]["status"] == "finished"  # statuses do not depend on MLflow


def test_sweep_record_writes_sweep_json_as_readers_expect(tmp_path):
    """sweep.json: every field once set up, the optional ones only when set, keys of other versions kept."""
    from losstune.search.sweep_record import SweepRecord

    record = SweepRecord(name="s", status="running", params=["edge_weight"], max_epochs=3)
    record.write(tmp_path)
    written = json.loads((tmp_path / "sweep.json").read_text())
    assert not set(SweepRecord.OPTIONAL) & set(written) and written["updated_at"]
    assert written["name"] == "s" and written["params"] == ["edge_weight"] and written["tracking_uri"] is None

    written.update(parent_run_id="p1", overrides={"search.num_samples": 4}, tracking={}, from_elsewhere=1)
    (tmp_path / "sweep.json").write_text(json.dumps(written))
    again = SweepRecord.read(tmp_path)
    assert again.parent_run_id == "p1" and again.overrides == {"search.num_samples": 4}
    again.status = "finished"
    again.write(tmp_path)
    rewritten = json.loads((tmp_path / "sweep.json").read_text())
    assert rewritten == {**written, "status": "finished", "updated_at": rewritten["updated_at"]}


def test_unschedulable_trials_are_refused(tmp_path, ray_local, clean_env, capsys):
    cfg = yaml.safe_load(yaml.safe_dump(SMOKE))
    cfg["resources"] = {"cpu": 64, "gpu": 0}
    rc, sweep_dir, _ = _sweep(tmp_path, cfg, "toobig")
    assert rc == 2 and "resources" in capsys.readouterr().err
    assert not sweep_dir.exists() and not (tmp_path / "mlflow.db").exists()


_START_LOCAL_RAY = """
import sys
sys.path.insert(0, {repo!r})
import ray
from losstune.search.config import validate_sweep
from losstune.search.internals import ray_auth_mode
from losstune.search.ray_session import init_ray
sweep = validate_sweep({config!r}, source="<test>", deep=False)
assert init_ray(sweep)
print("auth mode:", ray_auth_mode())
ray.shutdown()
"""


@pytest.mark.parametrize("preset, expected", [(None, "TOKEN"), ("disabled", "DISABLED")])
def test_local_ray_starts_with_token_auth_and_no_warning(tmp_path, preset, expected):
    """Ray 2.60 enables token authentication for a new local cluster and says so with a WARNING on every sweep;
    losstune drops that notice only: auth still on. A user's RAY_AUTH_MODE=disabled is respected."""
    import os
    import subprocess
    import sys

    cfg = {**SMOKE, "results_dir": str(tmp_path), "ray": {"num_cpus": 1, "num_gpus": 0}}
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    if preset:
        env["RAY_AUTH_MODE"] = preset
    proc = subprocess.run([sys.executable, "-c", _START_LOCAL_RAY.format(repo=str(REPO), config=cfg)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"auth mode: {expected}" in proc.stdout
    assert "Token authentication is" not in proc.stdout + proc.stderr


def test_only_tunes_no_results_yet_warning_is_dropped():
    """Ctrl-C while the trials' processes still start: Tune warns that it found no results for them (losstune's
    summary says so); a trial whose results cannot be read for another reason still gets the warning."""
    import logging

    from losstune.search.ray_session import NO_RESULTS_YET, without_ray_notices

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    tune_logger = logging.getLogger(NO_RESULTS_YET[0])
    tune_logger.addHandler(handler)
    missing = ("- losstune_trial_{0}: FileNotFoundError('Could not fetch metrics for losstune_trial_{0}: both "
               "result.json and progress.csv were not found at /r/trial_{0}')")
    try:
        with without_ray_notices(NO_RESULTS_YET):
            tune_logger.warning("Failed to fetch metrics for 2 trial(s):\n" + missing.format("a") + "\n"
                                + missing.format("b"))
            tune_logger.warning("Failed to fetch metrics for 2 trial(s):\n" + missing.format("a")
                                + "\n- losstune_trial_c: JSONDecodeError('Expecting value: line 3')")
        tune_logger.warning("Failed to fetch metrics for 1 trial(s):\n" + missing.format("a"))  # after the block
    finally:
        tune_logger.removeHandler(handler)
    assert len(seen) == 2 and "JSONDecodeError" in seen[0] and seen[1].startswith("Failed to fetch metrics for 1")


def test_ctrl_c_during_set_up_is_not_lost_and_leaves_no_half_made_sweep(tmp_path, clean_env, mlflow_uri,
                                                                        mlflow_runs, capfd):
    """Before Tune takes Ctrl-C over, a KeyboardInterrupt raised anywhere landed in SQLAlchemy's finalizers,
    where Python swallows it (the sweep then ran on). Now the first Ctrl-C is remembered (and the next one
    interrupts at once); a new sweep stopped at the end of its set-up leaves no folder (the same command
    starts it again) and a KILLED parent run."""
    import os
    import signal

    from losstune.search.config import validate_sweep
    from losstune.search.interrupts import CTRL_C_NOTICE, first_ctrl_c_sets_event
    from losstune.search.runner import prepare, run_prepared

    with first_ctrl_c_sets_event(CTRL_C_NOTICE) as pressed:
        os.kill(os.getpid(), signal.SIGINT)  # first press: remembered, nothing raised
        for _ in range(100):
            if pressed.is_set():
                break
            time.sleep(0.01)
        assert pressed.is_set() and "press it again to stop at once" in capfd.readouterr().err
        with pytest.raises(KeyboardInterrupt):  # second press: at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored

    cfg = {**SMOKE, "results_dir": str(tmp_path / "res"),
           "mlflow": {"experiment": "setup-ctrl-c", "tracking_uri": mlflow_uri}}
    sweep = validate_sweep(cfg, source="<test>", overrides={"results_dir": str(tmp_path / "res")}, deep=False)
    run = prepare(sweep, out=lambda s: None)
    run.ctrl_c = pressed  # pressed during the set-up
    with pytest.raises(KeyboardInterrupt):
        run_prepared(run)
    assert not sweep.sweep_dir.exists()
    assert [r.info.status for r in mlflow_runs(mlflow_uri, "setup-ctrl-c")] == ["KILLED"]
