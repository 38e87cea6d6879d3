"""One test per assumption losstune makes about Ray's and Optuna's private internals (search/internals.py).

A Ray or Optuna release that changes one of them fails here, with the assumption in the test's name.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from losstune.search import internals
from losstune.search.study import open_storage

SPACE = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}


@pytest.fixture
def searcher(tmp_path):
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return OptunaSearch(space=SPACE, metric="score", mode="max", sampler=optuna.samplers.RandomSampler(seed=0),
                        study_name="internals", storage=open_storage(tmp_path))  # the sweep's storage


def test_optuna_search_maps_tune_trials_to_optuna_trials(searcher):
    params = searcher.suggest("trial_a")
    trials = internals.searcher_trials(searcher)
    assert isinstance(trials["trial_a"], optuna.Trial)
    assert trials["trial_a"].params == params
    trials["trial_a"].set_user_attr("tune_trial_id", "trial_a")  # what TrialIdOptunaSearch does with it
    assert searcher.suggest("trial_b") is not None and set(trials) == {"trial_a", "trial_b"}  # the live mapping


def test_optuna_search_records_the_trials_it_completed(searcher):
    searcher.suggest("trial_a")
    assert "trial_a" not in internals.searcher_completed(searcher)
    searcher.on_trial_complete("trial_a", result={"score": 0.5})
    assert "trial_a" in internals.searcher_completed(searcher)


def test_study_storage_tells_whether_a_trial_finished(searcher):
    searcher.suggest("trial_a")
    trial = internals.searcher_trials(searcher)["trial_a"]
    assert not internals.is_finished_in_storage(searcher, trial)
    searcher.on_trial_complete("trial_a", result={"score": 0.5})
    assert internals.is_finished_in_storage(searcher, trial)


def test_ray_session_root_without_a_local_node_is_none():
    code = "from losstune.search.internals import ray_session_root; print(ray_session_root())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "None"


def test_ray_session_root_holds_the_session_folders(ray_local):
    root = internals.ray_session_root()
    assert isinstance(root, Path) and root.is_dir()
    assert any(p.name.startswith("session_") for p in root.iterdir())


def test_token_auth_notice_comes_from_the_named_logger():
    spec = importlib.util.find_spec(internals.RAY_TOKEN_AUTH_LOGGER)
    assert spec is not None, internals.RAY_TOKEN_AUTH_LOGGER
    module = importlib.import_module(internals.RAY_TOKEN_AUTH_LOGGER)
    assert module.logger is logging.getLogger(internals.RAY_TOKEN_AUTH_LOGGER)
    assert "Token authentication is enabled" in inspect.getsource(module)


def test_gcs_client_probe_tells_an_accepted_from_a_refused_token(ray_local):
    """``RAY_AUTH_PROBE`` (Ray's private GcsClient): 0 for this machine's token, 3 for a wrong one."""
    import os

    address = ray_local.get_runtime_context().gcs_address
    token_on = os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled"
    ok = subprocess.run([sys.executable, "-c", internals.RAY_AUTH_PROBE, address], timeout=60)
    assert ok.returncode == 0
    if token_on:  # a local cluster of Ray 2.60 has token authentication on unless it was turned off
        env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 32)
        refused = subprocess.run([sys.executable, "-c", internals.RAY_AUTH_PROBE, address], env=env, timeout=60,
                                 stderr=subprocess.DEVNULL)
        assert refused.returncode == internals.RAY_AUTH_REFUSED


def test_ray_auth_mode_is_read_from_ray(ray_local):
    """Ray still exposes its authentication mode where ray_auth_mode reads it (which mode a new local
    cluster gets is tests/e2e/test_sweep.py's test_local_ray_starts_with_token_auth_and_no_warning)."""
    assert internals.ray_auth_mode() in {"TOKEN", "DISABLED"}


def _reported(trial, values):
    for step, value in enumerate(values, start=1):
        trial.update_last_result({"score": value, "training_iteration": step, "parts": {"ssim": value / 2}})


def test_tune_trial_keeps_no_metric_windows_once_dropped():
    """A Tune trial's ``run_metadata``: its last-n windows go, min / max / mean / last stay (and stay correct),
    and its snapshot entry carries no cloudpickled window (``deque``)."""
    from ray.tune.experiment import Trial

    kept = Trial("__fake", stub=True)
    _reported(kept, [1.0, 3.0])
    assert "last-5-avg" in kept.run_metadata.metric_analysis["score"]  # Tune's default, so the test can fail
    assert "CLOUDPICKLE_FALLBACK" in kept.get_json_state()[1].split('"checkpoint_manager"')[0]

    trial = Trial("__fake", stub=True)
    _reported(trial, [1.0])  # a trial restored from an older snapshot: windows already kept
    internals.drop_metric_windows(trial)
    _reported(trial, [1.0, 3.0, 2.0])
    meta = trial.run_metadata
    assert meta.metric_analysis["score"] == {"max": 3.0, "min": 1.0, "avg": 2.0, "last": 2.0}
    assert meta.metric_analysis["parts/ssim"]["last"] == 1.0
    assert not any(meta.metric_n_steps.values())
    assert "CLOUDPICKLE_FALLBACK" not in trial.get_json_state()[1].split('"checkpoint_manager"')[0]
    assert len(trial.get_json_state()[1]) < len(kept.get_json_state()[1])


def test_tune_forces_a_snapshot_every_num_to_keep_checkpoints_and_after_a_trials_last_one():
    """Tune's rule (a trial's ``num_to_keep``-th checkpoint since the last snapshot forces the next one, reset by
    that snapshot's sync) and losstune's addition (a checkpoint whose result is ``done`` forces it too)."""
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager
    from ray.tune.experiment import Trial

    internals.snapshot_after_last_checkpoints()
    wrapped = _ExperimentCheckpointManager.on_trial_checkpoint
    internals.snapshot_after_last_checkpoints()  # idempotent: one wrapper, not two
    assert _ExperimentCheckpointManager.on_trial_checkpoint is wrapped

    def checkpoint(manager, trial, iteration, done=False):
        trial.update_last_result({"training_iteration": iteration, "done": done})
        manager.on_trial_checkpoint(trial)
        forced = manager._should_force_sync_up
        if forced:  # what the snapshot's sync does (sync_up_experiment_state)
            manager._trial_num_checkpoints_since_last_sync.clear()
            manager._should_force_sync_up = False
        return forced

    trial = Trial("__fake", stub=True)
    keep2 = _ExperimentCheckpointManager(storage=None, checkpoint_period=10.0, sync_every_n_trial_checkpoints=2)
    assert [checkpoint(keep2, trial, i) for i in (1, 2, 3)] == [False, True, False]  # Tune's own rule
    assert checkpoint(keep2, trial, 4, done=True)  # the trial's last checkpoint, the 1st since the snapshot
    keep_all = _ExperimentCheckpointManager(storage=None, checkpoint_period=10.0, sync_every_n_trial_checkpoints=None)
    assert not checkpoint(keep_all, Trial("__fake", stub=True), 1, done=True)  # num_to_keep=None: time only
