"""Every use of Ray's and Optuna's private internals, behind one small named function each.

losstune relies on a few things these libraries do not promise: the attributes of Ray's
``OptunaSearch`` that map Tune trials to Optuna trials, the storage behind an Optuna study, the
folder of the local Ray node's session, the name of the logger Ray's token-authentication
notice comes from, and Ray's GCS client, the one way to ask a cluster whether it accepts this
driver's token without ``ray.init``, the authentication mode Ray uses, the window averages a Tune
trial keeps of every reported number, and the rule by which Tune forces an experiment snapshot after a trial
checkpoint. Each assumption has its own test in tests/search/test_internals.py, so a Ray or Optuna
upgrade that changes one fails there, and only there (pyproject.toml caps both versions for this).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# the logger of Ray's "Token authentication is enabled" notice (a private module of Ray)
RAY_TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def searcher_trials(searcher: Any) -> dict[str, Any]:
    """Ray ``OptunaSearch``: Tune trial id -> the ``optuna.Trial`` it asked for (live mapping)."""
    return searcher._ot_trials


def searcher_completed(searcher: Any) -> set[str]:
    """Ray ``OptunaSearch``: the Tune trial ids it has already told Optuna the end of (live set)."""
    return searcher._completed_trials


def is_finished_in_storage(searcher: Any, trial: Any) -> bool:
    """Whether the study's storage holds a finished state for ``trial`` (an ``optuna.Trial`` of ``searcher``).

    Read from the storage, not the trial object: after a resume the object may be stale.
    """
    return searcher._ot_study._storage.get_trial(trial._trial_id).state.is_finished()


def drop_metric_windows(trial: Any) -> None:
    """Tune trial: keep no last-5 / last-10 window of each reported number, only its min / max / mean / last.

    Tune keeps both windows for every number a trial reports (``trial.run_metadata``) and writes them into
    every experiment snapshot, each window cloudpickled (its ``deque`` is not JSON); with losstune's ~40
    numbers per result they are about half of a trial's entry (~29 KB with them, ~14 KB without, measured by
    benchmarks/driver_scaling), and a snapshot follows every other trial checkpoint (``num_to_keep=2``) and
    re-writes every trial's entry. Only ``ExperimentAnalysis`` scopes ``last-5-avg`` / ``last-10-avg`` read the
    windows; losstune never uses them. Windows already kept (a trial restored from an older snapshot) are dropped
    too.
    """
    meta = trial.run_metadata
    meta._n_steps = ()
    meta.metric_n_steps = {}
    for summary in meta.metric_analysis.values():
        for key in [k for k in summary if k.startswith("last-")]:
            del summary[key]
    meta.invalidate_cache()


def snapshot_after_last_checkpoints() -> None:
    """Tune: an experiment snapshot also follows every trial checkpoint whose result is ``done`` (the trial's
    last: the scheduler or the stop criterion ended it there), not only every ``num_to_keep``-th one.

    Tune forces a snapshot once a trial has checkpointed ``num_to_keep`` times since the last one
    (``_ExperimentCheckpointManager.on_trial_checkpoint`` sets ``_should_force_sync_up``, read at the next
    snapshot call of the same step). With ``num_to_keep`` > 1 a trial's last checkpoint would then wait for the
    next timed snapshot, and a driver killed in between would make ``--resume`` train the trial's last epochs
    again. Patches the class once per process; every Tune run of losstune wants this.
    """
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    original = _ExperimentCheckpointManager.on_trial_checkpoint
    if getattr(original, "losstune_last_checkpoint", False):
        return

    def on_trial_checkpoint(self, trial) -> None:
        original(self, trial)
        if self._sync_every_n_trial_checkpoints and trial.last_result.get("done"):
            self._should_force_sync_up = True

    on_trial_checkpoint.losstune_last_checkpoint = True
    _ExperimentCheckpointManager.on_trial_checkpoint = on_trial_checkpoint


def ray_session_root() -> Path | None:
    """The folder of this machine's Ray session folders (``/tmp/ray`` unless set), None without a local node."""
    import ray

    node = ray._private.worker._global_node
    if node is None:
        return None
    return Path(node.get_session_dir_path()).parent


def ray_auth_mode() -> str:
    """The authentication mode this process's Ray uses: ``"TOKEN"``, ``"DISABLED"`` (or Ray's name of another)."""
    from ray._raylet import AuthenticationMode, get_authentication_mode

    mode = get_authentication_mode()
    return {AuthenticationMode.TOKEN: "TOKEN", AuthenticationMode.DISABLED: "DISABLED"}.get(mode, str(mode))


# A script (run as ``python -c RAY_AUTH_PROBE ADDRESS``) that asks the cluster's GCS for one key with Ray's
# private GcsClient; exit 3: the cluster refused this process's (missing or wrong) token, 0: anything else.
# A separate process, so that Ray's C++ warning line about a refused token stays out of the driver's output.
RAY_AUTH_PROBE = r"""
import sys
from ray._raylet import GcsClient
from ray.exceptions import AuthenticationError
try:
    GcsClient(address=sys.argv[1]).internal_kv_get(b"session_name", namespace=b"session", timeout=10)
except AuthenticationError:
    sys.exit(3)
except Exception:
    sys.exit(0)  # any other trouble: ray.init reports it
"""
RAY_AUTH_REFUSED = 3  # RAY_AUTH_PROBE's exit status when the cluster refused the token
