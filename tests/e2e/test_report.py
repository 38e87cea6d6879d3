"""The sweep report, the trials' prediction artifacts and the live status line.

One real smoke sweep (local Ray, Optuna, MLflow on sqlite in a tmp dir) for the module, then
``losstune report`` on it; a pareto variant (MLflow off, 1 epoch) for the pareto figure. The rest are
unit tests without Ray.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import yaml
from PIL import Image

from losstune.search import artifacts, plots
from losstune.search.cli import main
from losstune.search.progress import SweepStatus, format_duration
from losstune.search.report import FIGURES, is_mse_only, param_importances
from losstune.search.trials import load_results

REPO = Path(__file__).resolve().parents[2]
SMOKE = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "RAY_ADDRESS")


def _run_sweep(tmp: Path, cfg: dict, uri: str | None) -> tuple[int, Path, str]:
    path = tmp / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    args = ["sweep", str(path), "--results-dir", str(tmp / "res")]
    if uri:
        args += ["--tracking-uri", uri]
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        for var in ENV:
            mp.delenv(var, raising=False)
        mp.setenv("LOSSTUNE_PROGRESS_INTERVAL", "2")
        rc = main(args)
    return rc, tmp / "res" / cfg["name"], out.getvalue()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    t0 = time.perf_counter()
    rc, sweep_dir, out = _run_sweep(tmp, SMOKE, uri)
    assert rc == 0, out
    return SimpleNamespace(dir=sweep_dir, uri=uri, out=out, tmp=tmp, seconds=time.perf_counter() - t0)


def _valid_png(path: Path, min_size: int = 50) -> tuple[int, int]:
    assert path.is_file(), path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert min(im.size) >= min_size, (path, im.size)
        return im.size


def _children(uri: str, parent_id: str):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], max_results=100)
    return client, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id
                    and r.data.tags.get("losstune.kind") != "final"]


@pytest.mark.slow
def test_trials_leave_their_predictions_in_the_last_checkpoint(smoke):
    import torch
    results = load_results(smoke.dir)
    assert len(results.table) == SMOKE["search"]["num_samples"]
    for trial_id, path in zip(results.table["trial_id"], results.table["path"]):
        ckpts = sorted(Path(path).glob("checkpoint_*"))
        assert ckpts, path
        last = ckpts[-1]
        # the kept checkpoint is the state of the last reported epoch (the trial trains the next epoch while
        # Tune handles a report, so this would catch a checkpoint taken one epoch late)
        reported = results.histories[trial_id]
        state = torch.load(last / "state.pt", weights_only=True)
        assert state["epoch"] == len(reported) == int(reported[-1]["training_iteration"]), trial_id
        assert [h["composite"] for h in state["history"]] == pytest.approx([r["composite"] for r in reported])
        arrays = artifacts.load_predictions(last / artifacts.PREDICTIONS_NPZ)
        assert int(arrays["epoch"]) == state["epoch"]
        assert set(artifacts.PRED_KEYS) <= set(arrays)
        shapes = {arrays[k].shape for k in artifacts.PRED_KEYS}
        assert len(shapes) == 1 and next(iter(shapes))[0] == artifacts.NUM_SAMPLES
        assert all(0 <= arrays[k].min() and arrays[k].max() <= 1 for k in artifacts.PRED_KEYS)
        _valid_png(last / artifacts.PREDICTIONS_PNG)
        config = yaml.safe_load((last / artifacts.TRIAL_CONFIG).read_text())
        assert config["task"] == "microstructure" and "gradient_weight" in config


@pytest.mark.slow
def test_child_runs_carry_predictions_png_and_config(smoke):
    info = json.loads((smoke.dir / "sweep.json").read_text())
    client, children = _children(smoke.uri, info["parent_run_id"])
    assert len(children) == SMOKE["search"]["num_samples"]
    for child in children:
        names = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"predictions.png", "config.yaml", "images"} <= names, names
        images = [a.path for a in client.list_artifacts(child.info.run_id, "images")]
        # MLflow's image-series layout: one PNG + one WebP thumbnail per reported epoch, steps 1..epochs
        pngs = sorted(p for p in images if p.endswith(".png"))
        steps = sorted(int(p.split("+step+")[1].split("+")[0]) for p in pngs)
        epochs = len(client.get_metric_history(child.info.run_id, "composite"))
        assert steps == list(range(1, epochs + 1)), images
        assert all(p.startswith("images/predictions+step+") for p in pngs), images
        assert {p[:-4] + "+compressed.webp" for p in pngs} == {p for p in images if p.endswith(".webp")}, images
        assert child.data.tags.get("mlflow.loggedImages") == "True"
        thumb = Path(client.download_artifacts(child.info.run_id, pngs[-1][:-4] + "+compressed.webp",
                                               str(smoke.tmp / child.info.run_id)))
        with Image.open(thumb) as image:
            assert image.format == "WEBP" and max(image.size) == artifacts.THUMB_SIZE
        local = Path(client.download_artifacts(child.info.run_id, "config.yaml", str(smoke.tmp / child.info.run_id)))
        cfg = yaml.safe_load(local.read_text())
        assert float(cfg["gradient_weight"]) == pytest.approx(float(child.data.params["gradient_weight"]))


@pytest.mark.slow
def test_sweep_prints_a_status_line(smoke):
    lines = [ln for ln in smoke.out.splitlines() if " done (" in ln and "best composite" in ln]
    assert lines, smoke.out
    n = SMOKE["search"]["num_samples"]
    assert f"{n}/{n} done ({n} finished, 0 stopped, 0 diverged)" in lines[-1]


@pytest.mark.slow
def test_report_command(smoke, capsys):
    t0 = time.perf_counter()
    assert main(["report", str(smoke.dir)]) == 0
    elapsed = time.perf_counter() - t0
    out_dir = smoke.dir / "report"
    html = (out_dir / "report.html").read_text(encoding="utf-8")
    assert "logged to MLflow run" in capsys.readouterr().out

    # self-contained: no external script / stylesheet / image, images inlined
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.I)
    assert not re.search(r"<script|<link\b|@import|url\(\s*['\"]?https?:", html, re.I)
    inlined = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(inlined) >= 5  # panel, curves, importance, history, slice (the leaderboard is a table)
    for data in inlined:
        import base64
        Image.open(io.BytesIO(base64.b64decode(data))).verify()

    # leaderboard: every trial with its weights and metrics
    results = load_results(smoke.dir)
    table = re.search(r'<table class="lb" id="leaderboard">(.*?)</table>', html, re.S).group(1)
    for tid in results.table["trial_id"]:
        assert tid in table
    for col in ("gradient_weight", "lr", "composite", "ssim", "mse", "gradient_match"):
        assert f"<th>{col}</th>" in table
    assert "MSE-only" in table  # the hand-set point gradient_weight 0 is marked

    # the PNGs
    for name in ("leaderboard", "importance", "history", "slice", "curves", "panel"):
        _valid_png(out_dir / f"{name}.png")
    assert not (out_dir / "pareto.png").exists()
    w, h = _valid_png(out_dir / "panel.png")
    assert w > h  # input, baseline, best, MSE-only, target, 2 gradient maps side by side
    meta = json.loads((out_dir / "report.json").read_text())
    assert meta["best_trial"] == results.ranked()["trial_id"].iloc[0]
    assert meta["mse_only_trial"] and meta["notes"] == []

    # logged to the sweep's parent run
    info = json.loads((smoke.dir / "sweep.json").read_text())
    from mlflow.tracking import MlflowClient
    client = MlflowClient(smoke.uri)
    logged = {a.path for a in client.list_artifacts(info["parent_run_id"], "report")}
    assert {"report/report.html", "report/panel.png", "report/leaderboard.png"} <= logged, logged
    print(f"report took {elapsed:.1f}s; the smoke sweep {smoke.seconds:.1f}s")


@pytest.mark.slow
def test_report_recomputes_predictions_of_older_sweeps(smoke, tmp_path):
    """A sweep whose checkpoints hold only state.pt (run before trials saved predictions): rebuilt."""
    from losstune.search.report import build_report
    moved = []
    try:
        for npz in smoke.dir.glob(f"trial_*/checkpoint_*/{artifacts.PREDICTIONS_NPZ}"):
            npz.rename(npz.with_suffix(".hidden"))
            moved.append(npz)
        assert moved
        outcome = build_report(smoke.dir, tmp_path / "rep", log_mlflow=False, echo=lambda s: None)
    finally:
        for npz in moved:
            npz.with_suffix(".hidden").rename(npz)
    assert outcome.notes == [] and not outcome.logged
    w, h = _valid_png(outcome.images["panel"])
    assert w > h


@pytest.mark.slow
def test_report_of_a_pareto_sweep_without_mlflow(tmp_path, ray_local, capsys):
    cfg = yaml.safe_load(yaml.safe_dump(SMOKE))
    cfg.update(name="pareto_report", objective={"type": "pareto"}, mlflow={"enabled": False})
    cfg["train"]["epochs"] = 1
    cfg["space"] = {"gradient_weight": {"type": "uniform", "low": 0.0, "high": 1.0},
                    "lr": {"type": "loguniform", "low": 1e-3, "high": 3e-2}}
    cfg["search"] = {"sampler": "nsga2", "seed": 0, "num_samples": 3, "max_concurrent": 2}
    rc, sweep_dir, out = _run_sweep(tmp_path, cfg, None)
    assert rc == 0, out
    assert main(["report", str(sweep_dir), "--out", str(tmp_path / "rep")]) == 0
    assert "MLflow was off" in capsys.readouterr().out
    _valid_png(tmp_path / "rep" / "pareto.png")
    html = (tmp_path / "rep" / "report.html").read_text()
    assert 'id="pareto"' in html and "Pareto front" in html
    # no point was hand-set to MSE-only here: a note, not an error
    assert "No MSE-only trial" in html
    _valid_png(tmp_path / "rep" / "panel.png")


def test_report_of_a_missing_folder_is_an_input_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such results folder" in capsys.readouterr().err


# ----- units (no Ray) --------------------------------------------------------------------------------
def test_importance_with_too_few_trials_is_a_note():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"gradient_weight": 0.1})
    study.optimize(lambda t: t.suggest_float("gradient_weight", 0, 1), n_trials=1)
    imps, notes = param_importances(study, ["composite"])
    assert imps == {} and "at least 2 complete trials" in notes[0] and "has 1" in notes[0]
    study.optimize(lambda t: t.suggest_float("gradient_weight", 0, 1), n_trials=4)
    imps, notes = param_importances(study, ["composite"])
    assert set(imps["composite"]) == {"gradient_weight"} and not notes


def test_mse_only_and_gradient_difference():
    assert is_mse_only({"gradient_weight": 0.0, "perceptual_weight": 0, "pixel_loss": "mse"})
    assert not is_mse_only({"gradient_weight": 0.1})
    assert not is_mse_only({"gradient_weight": 0.0, "pixel_loss": "l1"})
    target = np.zeros((1, 1, 8, 8), np.float32)
    target[..., 4:] = 1.0  # a vertical edge
    blurred = np.clip(np.linspace(0, 1, 8, dtype=np.float32)[None, None, None, :].repeat(8, 2), 0, 1)
    diff = plots.gradient_difference(blurred, target)
    assert diff.shape == (1, 7, 7)
    assert diff[0, :, 3].max() < 0  # at the edge the blurred prediction is flatter: negative (blue)
    assert diff[0, :, 0].min() > 0  # away from it the ramp adds gradient the target lacks: positive


def test_prediction_grid_handles_grey_and_rgb(tmp_path):
    rng = np.random.default_rng(0)
    for c in (1, 3):
        arrays = {k: rng.random((2, c, 10, 12), dtype=np.float32) for k in artifacts.PRED_KEYS}
        grid = artifacts.prediction_grid(arrays, title="t")
        assert grid.mode == "RGB" and grid.size[0] > 4 * 64 and grid.size[1] > 2 * 50


def _trial(tid, status, iters=0, composite=None, t=0.0, diverged=0.0):
    return SimpleNamespace(trial_id=tid, status=status,
                           last_result={"training_iteration": iters, "composite": composite, "time_total_s": t,
                                        "diverged": diverged})


def test_status_line_counts_best_and_eta():
    lines = []
    cb = SweepStatus(total=6, max_epochs=4, max_concurrent=2, interval=0.0001, out=lines.append)
    done = _trial("a", "TERMINATED", 4, 0.5, 10.0)
    stopped = _trial("b", "TERMINATED", 1, 0.1, 2.5)
    diverged = _trial("c", "TERMINATED", 1, -1.0, 3.0, diverged=1.0)
    running = _trial("d", "RUNNING", 2, 0.6, 5.0)
    pending = _trial("e", "PENDING")
    trials = [done, stopped, diverged, running, pending]
    for t in trials[:4]:
        cb.on_trial_result(0, trials, t, t.last_result)
    for t in trials[:3]:
        cb.on_trial_complete(0, trials, t)
    time.sleep(0.001)
    cb.on_step_end(0, trials)
    assert len(lines) == 1
    line = lines[0]
    assert "3/6 done (1 finished, 1 stopped, 1 diverged)" in line
    assert "1 running, 1 pending" in line and "best composite 0.6000 (d)" in line
    # mean trial time (10 + 2.5 + 3) / 3 s; d ran 5 s of it, 2 more queued; 2 at a time
    mean = 15.5 / 3
    assert cb.eta(trials, cb.counts(trials)) == pytest.approx((mean - 5.0 + 2 * mean) / 2)
    assert "ETA ~5s" in line
    cb.on_step_end(0, trials)  # too soon / unchanged: nothing printed
    assert len(lines) == 1
    cb.on_experiment_end(trials)
    assert "took" in lines[-1] and "ETA" not in lines[-1]
    assert format_duration(75) == "1m15s" and format_duration(7300) == "2h01m" and format_duration(None) == "?"


def test_status_line_counts_trials_interrupted_by_ctrl_c():
    """Ctrl-C: Tune terminates the running trials without completing them; they are not 'done'. A trial that
    was already over when a resumed sweep restored it (never seen running here) still counts as done."""
    lines = []
    cb = SweepStatus(total=4, max_epochs=4, max_concurrent=2, interval=0.0001, out=lines.append)
    restored = _trial("a", "TERMINATED", 4, 0.5, 10.0)
    stopped, cut = _trial("b", "RUNNING", 1, 0.4, 2.0), _trial("c", "RUNNING", 2, 0.6, 5.0)
    never = _trial("e", "PENDING")  # still starting: no result yet
    trials = [restored, stopped, cut, _trial("d", "PENDING"), never]
    for t in (stopped, cut):
        cb.on_trial_start(0, trials, t)
        cb.on_trial_result(0, trials, t, t.last_result)
    stopped.status = "TERMINATED"  # ASHA: completed, then terminated
    cb.on_trial_complete(0, trials, stopped)
    cut.status = never.status = "TERMINATED"  # Ctrl-C: terminated, never completed
    cb.on_experiment_end(trials)
    assert "2/4 done (1 finished, 1 stopped, 0 diverged, 2 interrupted)" in lines[-1], lines[-1]


def test_status_line_before_any_trial_ended():
    cb = SweepStatus(total=4, max_epochs=4, max_concurrent=2, interval=1.0, out=lambda s: None)
    trials = [_trial("a", "RUNNING", 1, 0.2, 3.0), _trial("b", "RUNNING", 2, 0.3, 6.0)]
    # 3 s/epoch; a: 3 left, b: 2 left, 2 queued x 4 epochs -> 13 epochs x 3 s / 2 in parallel
    assert cb.eta(trials, cb.counts(trials)) == pytest.approx(13 * 3.0 / 2)
    assert "ETA ~20s" in cb.status_line(trials)


def test_figures_are_listed():
    assert set(FIGURES) >= {"leaderboard", "importance", "history", "slice", "pareto", "curves", "panel"}
