"""Issue 7, reliability and security, on real processes: a real local Ray, real Optuna, MLflow on sqlite
or a real ``mlflow server`` on 127.0.0.1, and real SIGKILLs.

* a trial's worker process killed mid-training -> the trial restarts from its last checkpoint;
* the driver (``losstune sweep``) killed mid-sweep -> ``--resume`` finishes it without re-running or
  re-reporting completed trials, without duplicate MLflow runs, with the Optuna history kept;
* a NaN loss -> the trial ends ``diverged`` with the worst score, and the sweep goes on;
* the MLflow server dies mid-sweep -> the trials finish, ``losstune export`` works;
* tracking credentials come only from the environment and end up nowhere on disk or in the output;
  a local sweep starts no dashboard listener.

The trials run ``build_slow`` below (the README's plug-in example, slowed down so that there is
time to kill things); Ray workers import it as ``test_reliability:build_slow`` (``tests/`` is on
their PYTHONPATH).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from losstune.search.study import load_study

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]  # tests/: plugin_task, verify_tasks, conftest

pytestmark = pytest.mark.slow


# ----- the plug-in task of these trials ----------------------------------------------------------
def build_slow(config):
    """``plugin_task:build`` sleeping ``data.step_sleep`` s per training step.

    With ``data.pid_dir`` set, each process that trains the task writes
    ``<pid_dir>/<trial_id>-<pid>`` = ``"<trial_id> <first global step it trained> <pid>"``, so a test
    knows whom to kill and whether a restarted trial began at step 0 or from its checkpoint.
    With ``data.hold_after: k`` too, a trial that starts after k other trials waits in its first step
    (before any result or checkpoint) until ``<pid_dir>/release`` exists.
    """
    import plugin_task

    task = plugin_task.build(config)
    sleep = float(config.data.get("step_sleep", 0.05))
    pid_dir = config.data.get("pid_dir")
    hold_after = config.data.get("hold_after")
    inner = task.training_step
    first: list[int] = []

    def training_step(model, batch, step):
        if not first and model.training:
            first.append(step)
            if pid_dir:
                from ray import tune
                trial_id = tune.get_context().get_trial_id()
                path = Path(pid_dir) / f"{trial_id}-{os.getpid()}"
                path.write_text(f"{trial_id} {step} {os.getpid()}\n")
                others = {p.name.split("-")[0] for p in Path(pid_dir).glob("*-*")} - {trial_id}
                if hold_after is not None and len(others) >= int(hold_after):
                    while not (Path(pid_dir) / "release").exists():
                        time.sleep(0.05)
        time.sleep(sleep)
        return inner(model, batch, step)

    task.training_step = training_step
    return task


# ----- helpers -----------------------------------------------------------------------------------------
def _config(name: str, pid_dir: Path, *, epochs: int = 3, num_samples: int = 3, max_concurrent: int = 2,
            step_sleep: float = 0.15, **extra) -> dict:
    cfg = {
        "name": name,
        "train": {"task": "test_reliability:build_slow", "epochs": epochs, "batch_size": 12, "device": "cpu",
                  "amp": "off", "data": {"size": 16, "step_sleep": step_sleep, "pid_dir": str(pid_dir)}},
        "space": {"lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2},
                  "gradient_weight": {"type": "uniform", "low": 0.0, "high": 0.2}},
        "search": {"sampler": "tpe", "seed": 0, "num_samples": num_samples, "max_concurrent": max_concurrent},
        "scheduler": {"type": "fifo"},
        "resources": {"cpu": 1},
        "ray": {"num_cpus": 2},
        "mlflow": {"experiment": f"rel-{name}"},
    }
    cfg.update(extra)
    return cfg


def _write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS") and not k.startswith("MLFLOW_TRACKING_")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(Path(__file__).resolve().parent), str(REPO)])
    env.setdefault("RAY_DEDUP_LOGS", "0")
    env.update(extra)
    return env


def _losstune() -> list[str]:
    exe = Path(sys.executable).with_name("losstune")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "losstune.search.cli"]


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep ended (rc {proc.returncode}) before {what}:\n"
                                 + (log.read_text()[-4000:] if log else ""))
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                         + (":\n" + log.read_text()[-4000:] if log else ""))


def _rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def _iterations(trial_dir: Path) -> list[int]:
    """The training_iteration of every result Tune recorded for a trial (its result.json lines)."""
    out = []
    path = trial_dir / "result.json"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                out.append(int(json.loads(line)["training_iteration"]))
    return out


def _epochs_reported(trial_dir: Path) -> list[int]:
    path = trial_dir / "result.json"
    return [int(json.loads(line)["epoch"]) for line in path.read_text().splitlines() if line.strip()]


def _pid_files(pid_dir: Path) -> list[tuple[str, int, int]]:
    """(trial_id, first step trained, pid) per process that trained a trial, oldest first."""
    out = []
    for path in sorted(pid_dir.iterdir(), key=lambda p: p.stat().st_mtime):
        parts = path.read_text().split()
        if len(parts) == 3:
            out.append((parts[0], int(parts[1]), int(parts[2])))
    return out


def _runs_file(sweep_dir: Path) -> dict:
    try:
        return json.loads((sweep_dir / "mlflow_runs.json").read_text())
    except (OSError, ValueError):
        return {}


def _children(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    parents = [r for r in runs if r.data.tags.get("losstune.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")
                and r.data.tags.get("losstune.final") != "true"]
    return client, parents, children


def _descendants(pid: int) -> list:
    import ray  # noqa: F401 - Ray ships psutil (ray/thirdparty_files) and puts it on sys.path
    import psutil
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill_driver(proc: subprocess.Popen) -> list:
    """SIGKILL the driver only (its Ray processes share its fate); returns the processes it had started, for
    :func:`_reap`."""
    ray_procs = _descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    return ray_procs


def _kill_if_running(proc: subprocess.Popen) -> None:
    """Kill ``proc`` if it still runs (a test that failed before its own kill)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def _reap(processes: list, timeout: float = 10.0) -> None:
    """Give processes we started (directly or through Ray) ``timeout`` s to exit, then SIGKILL them by pid."""
    import psutil
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def _alive(pid: int) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ----- a trial's worker killed mid-training ---------------------------------------------------------------
def test_killed_trial_worker_resumes_from_its_checkpoint(tmp_path, ray_local, clean_env):
    from losstune.search.cli import main
    from losstune.search.trials import load_results

    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    epochs = 4
    cfg = _config("killtrial", pid_dir, epochs=epochs, num_samples=2, max_concurrent=2, step_sleep=0.15)
    path = _write(tmp_path, cfg)
    sweep_dir = tmp_path / "res" / "killtrial"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    killed: list[tuple[str, int]] = []
    stop = threading.Event()

    def kill_after_first_checkpoint() -> None:
        # as soon as the driver has recorded a checkpointed epoch of some trial, SIGKILL its process
        while not stop.is_set():
            for trial_id, _, pid in _pid_files(pid_dir):
                trial_dir = sweep_dir / f"trial_{trial_id}"
                if list(trial_dir.glob("checkpoint_*")) and len(_rows(trial_dir / "progress.csv")) >= 1:
                    os.kill(pid, signal.SIGKILL)
                    killed.append((trial_id, pid))
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    try:
        rc = main(["sweep", str(path), "--results-dir", str(tmp_path / "res"), "--tracking-uri", uri])
    finally:
        stop.set()
        watcher.join(5)
    assert killed, "no trial was killed (did the trials checkpoint?)"
    victim, victim_pid = killed[0]
    assert rc == 0

    # the killed trial ran again in a new process, starting from its checkpoint, not from step 0
    runs = [(first, pid) for trial, first, pid in _pid_files(pid_dir) if trial == victim]
    assert len(runs) == 2, runs
    (first_a, pid_a), (first_b, pid_b) = runs
    steps_per_epoch = 3  # 36 training images / batch_size 12
    assert pid_a == victim_pid and pid_b != victim_pid
    assert first_a == 0 and first_b >= steps_per_epoch and first_b % steps_per_epoch == 0, runs

    # Tune: the iteration count and the epochs continue; nothing is reported twice, nothing missing
    trial_dir = sweep_dir / f"trial_{victim}"
    assert _iterations(trial_dir) == list(range(1, epochs + 1))
    assert _epochs_reported(trial_dir) == list(range(1, epochs + 1))
    assert [int(float(r["epoch"])) for r in _rows(trial_dir / "progress.csv")] == list(range(1, epochs + 1))

    # every trial is kept and finished
    results = load_results(sweep_dir)
    assert len(results.table) == 2
    assert set(results.table["status"]) == {"finished"}
    assert (results.table["epochs"] == epochs).all()

    # MLflow: one child per trial; the restarted trial continued its run (no duplicate, steps once each)
    client, parents, children = _children(uri, "rel-killtrial")
    assert len(parents) == 1 and len(children) == 2
    by_trial = {c.data.tags["losstune.trial_id"]: c for c in children}
    assert set(by_trial) == set(results.table["trial_id"])
    run = by_trial[victim]
    assert run.info.status == "FINISHED" and run.data.tags["losstune.status"] == "finished"
    assert run.data.tags.get("losstune.restarts") == "1"
    for metric in ("epoch", "composite", "loss"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, metric))
        assert steps == list(range(1, epochs + 1)), (metric, steps)

    # Optuna: two complete trials, nothing failed
    import optuna
    study = load_study(sweep_dir, "killtrial")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2


# ----- Tune's saved state holds every trial's last checkpoint from the step in which the trial ended ----
def _three_checkpoints(config):
    """A function trainable: 3 epochs, a checkpoint with each (its folder holds the epoch)."""
    import tempfile

    from ray import tune
    for epoch in (1, 2, 3):
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "epoch").write_text(str(epoch))
            tune.report({"score": float(epoch)}, checkpoint=tune.Checkpoint.from_directory(folder))


def test_tune_saves_a_trials_last_checkpoint_in_the_step_the_trial_ends(ray_local, tmp_path, monkeypatch):
    """With 2 checkpoints kept, Tune's own rule snapshots the experiment after a trial's 2nd checkpoint, not its
    3rd (last); losstune's run config adds the snapshot after the last one, so a driver killed after the trial
    ended leaves a state that ``--resume`` finishes without training that trial again."""
    from ray import tune

    from losstune.search.internals import ray_session_root
    from losstune.search.tune_state import PATTERNS
    from losstune.search.tuner import CHECKPOINTS_KEPT, tune_run_config

    name = "lastckpt"
    saved_at_end: dict[str, int] = {}

    class SavedStateAtTrialEnd(tune.Callback):
        """The driver's saved state at the end of the step in which a trial ended (Tune saves it, if at all,
        after handling the step's event and before ``on_step_end``): the trial's last saved iteration."""

        def __init__(self):
            self.ended: list[str] = []

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.ended.append(trial.trial_id)

        def on_step_end(self, iteration, trials, **info):
            if not self.ended:
                return
            # the staging copy Tune writes synchronously (what --resume repairs from, search/tune_state.py)
            folders = ray_session_root().glob(f"session_*/artifacts/*/{name}/driver_artifacts")
            newest = max((f for folder in folders for f in folder.glob(PATTERNS[0])),
                         key=lambda f: f.stat().st_mtime_ns)
            for entry in json.loads(newest.read_text())["trial_data"]:
                trial_state, meta = (json.loads(x) for x in entry)
                if trial_state["trial_id"] in self.ended:
                    saved_at_end[trial_state["trial_id"]] = meta["last_result"].get("training_iteration", 0)
            self.ended.clear()

    assert CHECKPOINTS_KEPT == 2  # the case this test is about: 3 epochs is not a multiple of it
    monkeypatch.setenv("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Tune would leave its Ctrl-C handler in pytest
    tuner = tune.Tuner(_three_checkpoints, param_space={"x": tune.grid_search([0, 1])},
                       tune_config=tune.TuneConfig(max_concurrent_trials=2),
                       run_config=tune_run_config(name, str(tmp_path), 3, [SavedStateAtTrialEnd()]))
    results = tuner.fit()
    assert not results.errors
    assert len(saved_at_end) == 2 and set(saved_at_end.values()) == {3}, saved_at_end
    for result in results:
        kept = sorted(Path(result.path).glob("checkpoint_*"))
        assert len(kept) == CHECKPOINTS_KEPT and (kept[-1] / "epoch").read_text() == "3", kept


# ----- the driver killed mid-sweep, then --resume ----------------------------------------------------------
@pytest.mark.parametrize("saved_state", ["as_left", "upload_cut_off"])
def test_killed_driver_then_resume_finishes_without_rerunning(tmp_path, saved_state):
    """``upload_cut_off``: as when the kill lands while Tune copies its state from the driver's staging folder
    to the results folder (it happened here): the stored searcher state is empty. The resume must take the
    intact staging copy, not wait for trials forever."""
    import optuna

    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    n, epochs = 3, 3
    cfg = _config("killdriver", pid_dir, epochs=epochs, num_samples=n, max_concurrent=2, step_sleep=0.15)
    path = _write(tmp_path, cfg)
    res, sweep_dir = tmp_path / "res", tmp_path / "res" / "killdriver"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = _losstune() + ["sweep", str(path), "--results-dir", str(res), "--tracking-uri", uri]
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path)
    try:
        def first_trial_done():
            # a trial ended (the results dir says so); kill at once, whatever Tune/MLflow saved so far
            return {t for t, e in _runs_file(sweep_dir).items() if e.get("status") == "finished"}

        _wait(first_trial_done, 150, "a finished trial", proc, log)
        # snapshot, then kill the driver (only the driver: its Ray processes share its fate)
        completed = {t for t, e in _runs_file(sweep_dir).items() if e.get("status") == "finished"}
        rows_before = {t: _iterations(sweep_dir / f"trial_{t}") for t in completed}
        ray_procs = _kill_driver(proc)
    finally:
        _kill_if_running(proc)
    # no trial keeps training behind the resumed sweep's back: the trial processes share the driver's fate
    trainers = [pid for _, _, pid in _pid_files(pid_dir)]
    _wait(lambda: not any(_alive(pid) for pid in trainers), 15, "the trial processes to exit")
    _reap(ray_procs, timeout=1)  # Ray's idle helpers (agents, starting workers) notice a little later
    assert proc.returncode == -signal.SIGKILL
    study = load_study(sweep_dir, "killdriver")
    before = {t.number: (t.params, t.state) for t in study.trials}
    completed_numbers = {num for num, (_, state) in before.items() if state == optuna.trial.TrialState.COMPLETE}
    assert completed_numbers and len(completed) >= 1
    assert len(completed) < n  # the sweep was really cut short
    if saved_state == "upload_cut_off":
        (searcher_state,) = sweep_dir.glob("searcher-state-*.pkl")
        searcher_state.write_bytes(b"")

    # resume it
    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, env=_env(), cwd=tmp_path,
                             timeout=240)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-6000:]
    assert "resuming killdriver" in out
    if saved_state == "upload_cut_off":  # (as_left may hit the same race by chance: then it is repaired too)
        assert "was cut off when the driver died" in out, out[-3000:]

    from losstune.search.trials import load_results
    results = load_results(sweep_dir)
    # a trial started after Tune's last snapshot (the kill lands right when the third one starts) may be
    # lost with the driver: then it is marked so and not counted (test_trial_started_after_last_snapshot...)
    lost = set(results.table.loc[results.table["status"] == "lost", "trial_id"])
    table = results.table[results.table["status"] != "lost"]
    assert len(table) == n, results.table
    assert set(table["status"]) <= {"finished"}, table[["trial_id", "status", "epochs"]]
    assert (sweep_dir / "best.yaml").is_file()
    info = json.loads((sweep_dir / "sweep.json").read_text())
    assert info["status"] == "finished"
    assert "backfilled_metrics" in info["tracking"]  # the resumed run checked MLflow against Ray's results

    # no completed trial re-ran or re-reported: same rows, trained by exactly one process
    for trial in completed:
        assert _iterations(sweep_dir / f"trial_{trial}") == rows_before[trial] == list(range(1, epochs + 1))
        assert len([1 for t, _, _ in _pid_files(pid_dir) if t == trial]) == 1, trial
    # and no trial reported an epoch twice (the interrupted ones continued from their checkpoints)
    for trial in table["trial_id"]:
        assert _iterations(sweep_dir / f"trial_{trial}") == list(range(1, epochs + 1)), trial
        assert _epochs_reported(sweep_dir / f"trial_{trial}") == list(range(1, epochs + 1)), trial

    # MLflow: one parent (reused), exactly n children, each epoch logged once
    client, parents, children = _children(uri, "rel-killdriver")
    assert len(parents) == 1 and parents[0].info.run_id == info["parent_run_id"]
    assert parents[0].info.status == "FINISHED"
    for child in [c for c in children if c.data.tags["losstune.trial_id"] in lost]:
        assert child.info.status == "KILLED" and child.data.tags["losstune.status"] == "lost"
    children = [c for c in children if c.data.tags["losstune.trial_id"] not in lost]
    assert len(children) == n, [c.data.tags.get("losstune.trial_id") for c in children]
    assert {c.data.tags["losstune.trial_id"] for c in children} == set(table["trial_id"])
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["losstune.status"] == "finished"
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "composite"))
        assert steps == list(range(1, epochs + 1)), (child.data.tags["losstune.trial_id"], steps)

    # Optuna: the history from before the kill is still there, and the study is complete
    study = load_study(sweep_dir, "killdriver")
    after = {t.number: (t.params, t.state) for t in study.trials}
    for num in completed_numbers:
        assert after[num] == before[num]
    for num, (params, _) in before.items():
        assert after[num][0] == params
    # every sweep trial complete; the Optuna trials of lost ones (and of trials Tune had only queued) failed
    states = {t.user_attrs.get("tune_trial_id"): t.state for t in study.trials}
    shown = [(t.number, t.user_attrs.get("tune_trial_id"), t.state) for t in study.trials]
    assert all(states.get(t) == optuna.trial.TrialState.COMPLETE for t in table["trial_id"]), shown
    assert all(s == optuna.trial.TrialState.FAIL for t, s in states.items() if t not in set(table["trial_id"])), shown


@pytest.mark.parametrize("when", ["after_a_result", "before_any_result"])
def test_ctrl_c_stops_the_sweep_cleanly_and_resume_finishes_it(tmp_path, when):
    """Ctrl-C in a terminal: SIGINT to the whole process group (the driver and the local Ray it started).
    The sweep stops within seconds, says how to continue (losstune's --resume, not Tune's Tuner.restore),
    no trial process crashes on the way out, and --resume finishes the planned trials.
    ``before_any_result``: both trials wait in their first step (no result, no checkpoint) when it lands."""
    import optuna

    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    n = 3
    cfg = _config("ctrlc", pid_dir, epochs=3, num_samples=n, max_concurrent=2, step_sleep=0.15)
    if when == "before_any_result":
        cfg["train"]["data"]["hold_after"] = 0
    path = _write(tmp_path, cfg)
    res, sweep_dir = tmp_path / "res", tmp_path / "res" / "ctrlc"
    args = _losstune() + ["sweep", str(path), "--results-dir", str(res),
                          "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path,
                                start_new_session=True)  # its own process group, as a terminal's job
    try:
        if when == "after_a_result":  # a trial has reported its first epoch and is training its second
            _wait(lambda: any(_iterations(d) for d in sweep_dir.glob("trial_*")), 150, "a first result", proc, log)
            time.sleep(0.5)
        else:
            _wait(lambda: len(_pid_files(pid_dir)) == 2, 150, "two trials in their first step", proc, log)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    out = log.read_text()
    assert proc.returncode == 130, out[-4000:]  # Ctrl-C: 130 at every stage; the sweep did not finish
    assert f"continue it with: losstune sweep --resume {sweep_dir}" in out, out[-4000:]
    assert "Tuner.restore" not in out
    assert re.search(r"\d/3 done \([^)]*, [12] interrupted\)", out), out[-4000:]  # the status line: not done
    if when == "before_any_result":
        assert "0/3 done (0 finished, 0 stopped, 0 diverged, 2 interrupted)" in out, out[-4000:]
        assert "trials: 2 interrupted" in out and "Failed to fetch metrics" not in out, out[-4000:]
        (pid_dir / "release").touch()
    for crash in ("SIGABRT", "Fatal Python error", "Traceback"):
        assert crash not in out, out[-6000:]
    assert json.loads((sweep_dir / "sweep.json").read_text())["status"] != "finished"

    # the printed command: the results folder alone
    resumed = subprocess.run(_losstune() + ["sweep", "--resume", str(sweep_dir)], capture_output=True, text=True,
                             env=_env(), cwd=tmp_path, timeout=240)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-6000:]
    from losstune.search.trials import load_results
    results = load_results(sweep_dir)
    assert len(results.table) == n and set(results.table["status"]) == {"finished"}, results.table
    assert (sweep_dir / "best.yaml").is_file()
    study = load_study(sweep_dir, "ctrlc")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * n


@pytest.mark.parametrize("storage", ["local", "uri"])
def test_trial_started_after_last_snapshot_is_marked_lost_on_resume(tmp_path, storage):
    """Tune saves its experiment state at each trial checkpoint and otherwise only every ~10 s (here:
    never, TUNE_GLOBAL_CHECKPOINT_S=3600). A trial that starts after the last save and the driver is
    killed before it checkpoints: the resumed Tune does not know it and will not run it. It must not
    stay "running" forever: it is marked ``lost`` (not counted, not ranked), its MLflow child run
    KILLED, its Optuna trial FAIL, and the sweep still runs ``num_samples`` real trials."""
    import optuna

    from losstune.search.trials import load_results
    from losstune.search.tune_state import known_trial_ids

    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    n, epochs = 3, 2
    cfg = _config("lost", pid_dir, epochs=epochs, num_samples=n, max_concurrent=1, step_sleep=0.02)
    cfg["train"]["data"]["hold_after"] = 1  # the second trial waits in its first step: no result, no checkpoint
    tune_dir = tmp_path / "res" / "lost"
    if storage == "uri":  # Tune's part on storage given by URI (as s3://... on a cluster)
        cfg["ray"]["storage_path"] = (tmp_path / "storage").as_uri()
        tune_dir = tmp_path / "storage" / "lost"
    path = _write(tmp_path, cfg)
    res, sweep_dir = tmp_path / "res", tmp_path / "res" / "lost"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = _losstune() + ["sweep", str(path), "--results-dir", str(res), "--tracking-uri", uri]
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env=_env(TUNE_GLOBAL_CHECKPOINT_S="3600"))
    try:
        def second_trial_held():
            runs = _runs_file(sweep_dir)
            finished = [t for t, e in runs.items() if e.get("status") == "finished"]
            held = [t for t, _, _ in _pid_files(pid_dir) if t not in finished]
            # its child run exists too, so the test sees what happens to it
            return held and held[0] in runs and runs[held[0]].get("run_id") and finished and held[0]

        second = _wait(second_trial_held, 150, "a finished trial and a second one held", proc, log)
        ray_procs = _kill_driver(proc)
    finally:
        _kill_if_running(proc)
    _reap(ray_procs, timeout=10)
    known = known_trial_ids(tune_dir.as_uri() if storage == "uri" else tune_dir)
    assert known and second not in known, "precondition: Tune's saved state must not know the trial"

    (pid_dir / "release").write_text("")
    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, env=_env(), cwd=tmp_path,
                             timeout=240)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-6000:]
    assert "lost with the killed driver" in out and second in out, out[-3000:]

    results = load_results(sweep_dir)
    table = results.table.set_index("trial_id")
    assert table.loc[second, "status"] == "lost", table
    real = table.drop(index=second)
    assert len(real) == n and set(real["status"]) == {"finished"}, table
    assert second not in set(results.ranked()["trial_id"])
    info = json.loads((sweep_dir / "sweep.json").read_text())
    assert info["status"] == "finished"
    assert "lost" in (sweep_dir / "trials.csv").read_text()

    _, _, children = _children(uri, "rel-lost")
    by_trial = {c.data.tags["losstune.trial_id"]: c for c in children}
    assert set(by_trial) == set(table.index)
    assert by_trial[second].info.status == "KILLED" and by_trial[second].data.tags["losstune.status"] == "lost"
    assert all(by_trial[t].info.status == "FINISHED" for t in real.index)

    study = load_study(sweep_dir, "lost")
    states = {t.user_attrs["tune_trial_id"]: t.state for t in study.trials}
    assert states == {**{t: optuna.trial.TrialState.COMPLETE for t in real.index},
                      second: optuna.trial.TrialState.FAIL}, states


def test_lost_tracking_writes_are_filled_in_from_rays_results(tmp_path):
    """What a SIGKILLed driver had still queued for MLflow (here: the last epoch, a param and the end of a
    trial) is written by the next run of the sweep from the trial's Ray results and runs file, once."""
    from mlflow.entities import Metric

    from losstune.search.tracking import SweepTracker, backfill_runs, log_batch_chunked

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = SweepTracker(uri, "backfill")
    parent = tracker.start("bf", {}, {})
    client = tracker.client
    child = client.create_run(tracker.experiment_id, tags={"mlflow.parentRunId": parent,
                                                           "losstune.trial_id": "t1"}).info.run_id
    history = [{"training_iteration": i, "epoch": float(i), "composite": 0.1 * i, "node_ip": "127.0.0.1",
                "timestamp": 1_700_000_000 + i} for i in (1, 2, 3)]
    log_batch_chunked(client, child, metrics=[Metric(k, r[k], 0, r["training_iteration"])
                                              for r in history[:2] for k in ("epoch", "composite")])
    client.log_param(child, "lr", "0.001")
    runs = {"t1": {"run_id": child, "status": "finished", "epochs": 3,
                   "params": {"lr": 0.001, "gradient_weight": 0.2}}}
    counts = backfill_runs(uri, runs, {"t1": history})
    assert counts == {"runs": 1, "metrics": 2, "params": 1, "statuses": 1}
    assert client.get_run(child).data.params == {"lr": "0.001", "gradient_weight": "0.2"}
    assert sorted(m.step for m in client.get_metric_history(child, "composite")) == [1, 2, 3]
    run = client.get_run(child)
    assert run.info.status == "FINISHED" and run.data.tags["losstune.status"] == "finished"
    assert backfill_runs(uri, runs, {"t1": history}) == {"runs": 0, "metrics": 0, "params": 0, "statuses": 0}


# ----- NaN / inf loss ---------------------------------------------------------------------------------------
def test_diverged_trial_gets_the_worst_score_and_the_sweep_goes_on(tmp_path, ray_local, clean_env):
    import optuna

    from losstune.search.cli import main
    from losstune.search.trials import load_results
    from losstune.trainables.loop import DIVERGED_SCORE

    cfg = {
        "name": "nan",
        "train": {"task": "plugin_task:build_poisoned", "epochs": 2, "batch_size": 12, "device": "cpu",
                  "amp": "off", "data": {"size": 16}},
        # poison_step 2: the loss is NaN from the third step on (in epoch 1); 10**6: never
        "space": {"data.poison_step": {"type": "choice", "values": [2, 1000000]},
                  "lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}},
        # one at a time, the diverging one first: the sweep has to go on after it
        "search": {"sampler": "tpe", "seed": 0, "num_samples": 2, "max_concurrent": 1,
                   "points_to_evaluate": [{"data.poison_step": 2}, {"data.poison_step": 1000000}]},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources": {"cpu": 1},
        "mlflow": {"experiment": "rel-nan"},
    }
    path = _write(tmp_path, cfg)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(["sweep", str(path), "--results-dir", str(tmp_path / "res"), "--tracking-uri", uri])
    assert rc == 0
    sweep_dir = tmp_path / "res" / "nan"
    table = load_results(sweep_dir).table
    assert len(table) == 2
    diverged = table[table["status"] == "diverged"]
    assert len(diverged) == 1, table
    assert set(diverged["trial_id"]) == set(table[table["data.poison_step"] == 2]["trial_id"])
    assert (diverged["composite"] == DIVERGED_SCORE).all() and (diverged["epochs"] == 1).all()
    assert (table[table["status"] != "diverged"]["composite"] > DIVERGED_SCORE).all()
    assert "finished" in set(table["status"])  # the sweep went on

    # best.yaml is never a diverged trial
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert best["provenance"]["trial_id"] not in set(diverged["trial_id"])
    assert best["data"]["poison_step"] == 1000000

    # MLflow: status tag, FAILED run, the worst composite logged
    client, _, children = _children(uri, "rel-nan")
    by_trial = {c.data.tags["losstune.trial_id"]: c for c in children}
    assert len(by_trial) == 2
    for trial_id in diverged["trial_id"]:
        run = by_trial[trial_id]
        assert run.data.tags["losstune.status"] == "diverged" and run.info.status == "FAILED"
        assert run.data.metrics["composite"] == DIVERGED_SCORE and run.data.metrics["diverged"] == 1.0

    # Optuna is told, deliberately as COMPLETE with the worst value (DIVERGED_SCORE = -1.0 is the
    # composite's lower bound), so TPE learns to avoid the region; a FAIL would be ignored by TPE.
    study = load_study(sweep_dir, "nan")
    assert len(study.trials) == 2
    poisoned_trials = [t for t in study.trials if t.params["data.poison_step"] == 2]
    assert poisoned_trials
    for t in poisoned_trials:
        assert t.state == optuna.trial.TrialState.COMPLETE and t.value == DIVERGED_SCORE
    assert study.best_trial.params["data.poison_step"] == 1000000


# ----- the MLflow server dies mid-sweep; credentials; listeners ---------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_mlflow_server(tmp_path: Path) -> tuple[subprocess.Popen, str, Path]:
    port = _free_port()
    db = tmp_path / "server" / "mlflow.db"
    db.parent.mkdir()
    mlflow_exe = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_exe), "server", "--backend-store-uri", f"sqlite:///{db}", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1", "--artifacts-destination", str(tmp_path / "server" / "artifacts")]
    env = _env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log = open(tmp_path / "server" / "server.log", "w")
    # its own session: the server and its worker processes are killed together (its process group)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path / "server",
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    _wait(healthy, 90, "the MLflow server", proc, tmp_path / "server" / "server.log")
    return proc, uri, db


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def _listeners(processes: list) -> list[tuple[int, str, str, int]]:
    import psutil
    out = []
    for p in processes:
        try:
            cmd = " ".join(p.cmdline()[:2])  # the program (and the script of a python process)
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.append((p.pid, cmd, c.laddr.ip, c.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def test_tracking_server_dies_mid_sweep_and_credentials_stay_secret(tmp_path):
    import secrets

    secret = "pw-" + secrets.token_hex(12)
    server, uri, server_db = _start_mlflow_server(tmp_path)
    try:
        pid_dir = tmp_path / "pids"
        pid_dir.mkdir()
        # trials long enough that the server dies while they run: a run's first batch goes out ~5 s after it
        # was made (METRICS_EVERY_S), the rest of its epochs and its end after the server died
        n, epochs = 2, 8
        cfg = _config("srvdies", pid_dir, epochs=epochs, num_samples=n, max_concurrent=2, step_sleep=1.0)
        path = _write(tmp_path, cfg)
        res, sweep_dir = tmp_path / "res", tmp_path / "res" / "srvdies"
        env = _env(MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD=secret,
                   MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="3",
                   LOSSTUNE_MLFLOW_FLUSH_TIMEOUT="3")
        log = tmp_path / "sweep.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(_losstune() + ["sweep", str(path), "--results-dir", str(res),
                                                   "--tracking-uri", uri],
                                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            def first_result_logged():  # read in the server's own store
                try:
                    with contextlib.closing(sqlite3.connect(server_db)) as db:
                        return db.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] > 0
                except sqlite3.Error:  # no table yet, or locked for a moment
                    return False

            _wait(first_result_logged, 150, "the first trial result in MLflow", proc, log)
            # while Ray runs: no dashboard is listening anywhere (a local sweep starts none)
            listening = _listeners(_descendants(proc.pid))
            assert not [x for x in listening if "dashboard" in x[1].lower()], listening
            assert not [x for x in listening if x[3] == 8265], listening
            _stop(server)  # the tracking server dies mid-sweep
            proc.wait(240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        output = log.read_text()
        assert proc.returncode == 0, output[-6000:]
    finally:
        _stop(server)

    # every trial completed, and Ray's results are complete
    from losstune.search.cli import main
    from losstune.search.trials import load_results
    table = load_results(sweep_dir).table
    assert len(table) == n and set(table["status"]) == {"finished"}, table
    for trial in table["trial_id"]:
        assert _iterations(sweep_dir / f"trial_{trial}") == list(range(1, epochs + 1))
    info = json.loads((sweep_dir / "sweep.json").read_text())
    assert info["status"] == "finished"
    assert info["tracking"]["errors"] >= 1, info["tracking"]  # it did notice the dead server
    assert "MLflow" in output and "warning" in output.lower()

    # export works from Ray's results alone
    (sweep_dir / "best.yaml").unlink(missing_ok=True)
    assert main(["export", str(sweep_dir)]) == 0
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert best["provenance"]["trial_id"] in set(table["trial_id"])

    # what reached MLflow before the server died is there (read its store directly)
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{server_db}")
    exp = client.get_experiment_by_name("rel-srvdies")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert any(r.data.tags.get("losstune.kind") == "sweep" for r in runs)
    assert any(r.data.metrics for r in runs if r.data.tags.get("losstune.trial_id"))

    # the password: only in the environment; in no output, param, tag, artifact or file
    assert secret not in output
    for run in runs:
        values = list(run.data.params.values()) + list(run.data.tags.values()) + [run.info.run_name or ""]
        assert not any(secret in str(v) for v in values), run.info.run_id
    for file in tmp_path.rglob("*"):
        if file.is_file() and not file.is_symlink():
            assert secret.encode() not in file.read_bytes(), file


def test_a_child_runs_images_reach_a_tracking_servers_artifact_store(tmp_path, one_finished_trial):
    """With an ``mlflow server`` that serves artifacts (``mlflow-artifacts:`` URIs), the writer uploads a run's
    images straight to the run's artifact repository (without reading the run first): they land in the
    server's artifact folder, and the server lists them."""
    from mlflow.tracking import MlflowClient

    from losstune.search.tracking.child_runs import ChildRuns

    server, uri, _ = _start_mlflow_server(tmp_path)
    try:
        client = MlflowClient(tracking_uri=uri)
        exp = client.create_experiment("images")
        book, pending = one_finished_trial(tmp_path, png=b"png-bytes")
        ChildRuns(client, exp, None, {}, book, uri).sync(pending)
        run_id = book.runs()["t1"]["run_id"]
        assert client.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:")
        listed = sorted(a.path for a in client.list_artifacts(run_id, "images"))
    finally:
        _stop(server)
    assert len(listed) == 2 and {p.rsplit(".", 1)[1] for p in listed} == {"png", "webp"}, listed
    on_disk = list((tmp_path / "server" / "artifacts").rglob("predictions+step+1+*.png"))
    assert [p.read_bytes() for p in on_disk] == [b"png-bytes"]
