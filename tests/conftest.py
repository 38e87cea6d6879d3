"""Shared fixtures: a local Ray (2 CPUs, no dashboard) for the session, an MLflow store in tmp_path.

Keep them general: other test files use them too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

# Every Ray these tests start (the session's, a sweep subprocess's local one, a cluster's nodes) inherits
# this: without it Ray starts one idle worker process per CPU when the first driver connects, which no
# trial uses (Tune's trial actors get workers of their own), and on a 2-core machine those start-ups
# compete with the driver's set-up and the trials' own.
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module of tiny-tensor tests: faster than two, and steady on a
    busy, shared CPU. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs for the whole session (started on first use, shut down at the end).

    ``tests/``, ``tests/e2e/`` and the repository root are put on the workers' PYTHONPATH so plug-in tasks
    such as ``plugin_task:build`` and ``test_reliability:build_slow`` import inside trials.
    """
    import ray

    paths = [str(TESTS), str(TESTS / "e2e"), str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    for p in (str(TESTS), str(REPO)):
        if p not in sys.path:
            sys.path.insert(0, p)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="WARNING",
                 configure_logging=True)
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path: Path) -> str:
    """An empty MLflow store (sqlite) in the test's tmp_path; absolute URI."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def clean_env(monkeypatch):
    """No ambient MLflow / Ray settings leak into a test."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def _mlflow_runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture
def mlflow_runs():
    """``mlflow_runs(uri, experiment)`` -> all runs of the experiment (mlflow Run objects), [] if none."""
    return _mlflow_runs


@pytest.fixture
def one_finished_trial():
    """``one_finished_trial(folder, png=b"png") -> (RunsBook, PendingWrites)``: what the tracking writer owes
    MLflow for a trial ``t1`` that started (its runs-file entry saved, as the writer saves it), reported epoch 1,
    filed one prediction image (``png`` and a thumbnail) and finished."""
    def make(folder: Path, png: bytes = b"png"):
        from losstune.search.status import TrialStatus
        from losstune.search.tracking import RunsBook
        from losstune.search.tracking.events import CheckpointFiles, TrialEnded, TrialResult, TrialStarted
        from losstune.search.tracking.pending import PendingWrites

        book = RunsBook(folder)
        pending = PendingWrites(book, None, mlflow=True)
        pending.apply(TrialStarted("t1", {"gradient_weight": 0.2}, "trial_t1"))
        book.save()
        pending.apply(TrialResult("t1", 1, {"training_iteration": 1, "composite": 0.1}, 1001))
        pending.apply(CheckpointFiles("t1", 1, {"predictions.png": png, "predictions.webp": b"webp"}, 1000))
        pending.apply(TrialEnded("t1", TrialStatus.FINISHED))
        return book, pending
    return make
