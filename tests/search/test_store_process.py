"""The MLflow helper process (search/tracking/store_process.py) against a real sqlite store: the same answers
as an in-process ``MlflowClient``, MLflow's errors passed back, Ctrl-C ignored, no helper left behind, and a
fresh helper after one died."""

from __future__ import annotations

import os
import signal
import time

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from losstune.search.tracking.store_process import StoreProcessClient, StoreProcessError


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    """One sqlite store for the module (its schema takes a while to create)."""
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    local = MlflowClient(tracking_uri=uri)
    return uri, local, local.create_experiment("e", artifact_location=str(folder / "artifacts"))


@pytest.fixture()
def store(database):
    uri, local, exp = database
    client = StoreProcessClient(uri)
    yield client, local, exp
    client.close()


def _pid(client: StoreProcessClient) -> int:
    client.get_experiment("0")  # a call: the helper is running after it
    return client.pid


def test_writes_through_the_helper_read_back_in_process(store, tmp_path):
    client, local, exp = store
    run = client.create_run(exp, run_name="trial-a", tags={"losstune.trial_id": "a"})
    rid = run.info.run_id
    client.log_batch(rid, metrics=[Metric("composite", 0.5, 1, 1), Metric("composite", 0.6, 2, 2)],
                     params=[Param("gradient_weight", "0.2")], tags=[RunTag("stage", "search")])
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "config.yaml").write_text("lr: 0.001\n")
    client.log_artifacts(rid, str(tmp_path / "files"))
    client.set_terminated(rid, status="FINISHED")
    got = local.get_run(rid)
    assert got.info.status == "FINISHED" and got.info.run_name == "trial-a"
    assert got.data.params == {"gradient_weight": "0.2"}
    assert got.data.tags["stage"] == "search" and got.data.tags["losstune.trial_id"] == "a"
    assert [(m.step, m.value) for m in local.get_metric_history(rid, "composite")] == [(1, 0.5), (2, 0.6)]
    assert [f.path for f in local.list_artifacts(rid)] == ["config.yaml"]
    found = client.search_runs([exp], filter_string="tags.`losstune.trial_id` = 'a'")
    assert [r.info.run_id for r in found] == [rid]


def test_mlflow_errors_come_back_as_mlflow_errors(store):
    client, local, _ = store
    with pytest.raises(MlflowException) as helper_err:
        client.get_run("no-such-run")
    with pytest.raises(MlflowException) as local_err:
        local.get_run("no-such-run")
    assert str(helper_err.value) == str(local_err.value)
    assert client.get_experiment("0").name == "Default"  # the helper still answers


def test_helper_ignores_ctrl_c_and_ends_with_its_pipe(store):
    client, _, _ = store
    pid = _pid(client)
    os.kill(pid, signal.SIGINT)  # what a terminal's Ctrl-C sends the whole process group
    time.sleep(0.3)
    assert client.get_experiment("0").name == "Default"
    assert client.close()["cpu_s"] > 0
    assert client.pid is None
    with pytest.raises(ProcessLookupError):  # the helper ended with its pipe (and was reaped)
        os.kill(pid, 0)


def test_a_helper_that_died_is_replaced_on_the_next_call(store):
    client, _, exp = store
    pid = _pid(client)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while client.pid is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.create_run(exp).info.status == "RUNNING"  # a fresh helper
    assert _pid(client) != pid


def test_a_helper_that_dies_during_a_call_raises(store):
    import threading

    client, _, exp = store
    pid = _pid(client)
    os.kill(pid, signal.SIGSTOP)  # the helper will not answer; then it dies mid-call
    try:
        threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
        with pytest.raises(StoreProcessError, match="ended during create_run"):
            client.create_run(exp)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
