"""The tracking package's parts: pickling, the runs book, typed events; a lost create_run (real sqlite)."""

from __future__ import annotations

import pickle

import pytest


class _Trial:
    def __init__(self, trial_id: str, last_result=None):
        self.trial_id, self.config, self.last_result = trial_id, {"w": 0.1}, last_result

    def __str__(self) -> str:
        return f"trial_{self.trial_id}"


def test_callback_pickles_its_settings_only_and_tune_state_restores_the_runs(tmp_path):
    from losstune.search.tracking import TrackingCallback, read_runs_file

    cb = TrackingCallback(tmp_path, None, None, None, max_epochs=2, tags={"losstune.task": "t"}, flush_interval=0.01)
    cb.on_trial_start(0, [], _Trial("a"))
    cb.on_trial_result(0, [], _Trial("a"), {"training_iteration": 1, "composite": 0.5})
    cb.on_trial_complete(0, [], _Trial("a", {"training_iteration": 2, "diverged": 0.0}))
    assert cb.flush(timeout=10)
    state = cb.get_state()
    restored = pickle.loads(pickle.dumps(cb))  # as Tune keeps it in tuner.pkl
    assert restored.runs() == {}  # the runtime (runs book, writer thread) is not pickled
    assert {k: restored.__dict__[k] for k in TrackingCallback._SETTINGS} == \
        {k: cb.__dict__[k] for k in TrackingCallback._SETTINGS}
    assert TrackingCallback.for_sweep(tmp_path) is restored
    restored.set_state(state)
    assert restored.statuses() == {"a": "finished"}
    cb.close(timeout=10)
    restored.close(timeout=10)
    entry = read_runs_file(tmp_path)["a"]
    assert entry["status"] == "finished" and entry["epochs"] == 2 and entry["composite"] == 0.5
    assert entry["params"] == {"w": 0.1}


def test_runs_book_marks_only_trials_that_would_run_again(tmp_path):
    from losstune.search.status import TrialStatus
    from losstune.search.tracking import RunsBook

    book = RunsBook(tmp_path)
    book.merge({"done": {"status": "finished"}, "lost": {"status": "lost"}, "going": {"status": "running"},
                "later": {"status": "interrupted"}})
    assert book.mark_lost(["done", "going"]) == ["later"]
    assert book.mark_interrupted() == ["going"]
    assert book.statuses() == {"done": "finished", "lost": "lost", "going": "interrupted", "later": "lost"}
    book.set_status("going", TrialStatus.RUNNING, epochs=3)
    book.save()
    assert not book.dirty
    again = RunsBook(tmp_path)
    again.load()
    assert again.runs() == book.runs()


def test_pending_writes_take_typed_events_only(tmp_path):
    from losstune.search.status import TrialStatus
    from losstune.search.tracking import RunsBook
    from losstune.search.tracking.events import TrialEnded, TrialResult, TrialStarted
    from losstune.search.tracking.pending import PendingWrites

    pending = PendingWrites(RunsBook(tmp_path), decode=lambda c: {"decoded": c["w"]})
    pending.apply(TrialStarted("a", {"w": 1}, "run-a"))
    pending.apply(TrialResult("a", 1, {"training_iteration": 1, "loss": 2.0, "num_val": 8, "node_ip": "h"}, 5))
    pending.apply(TrialEnded("a", TrialStatus.FINISHED))
    state = pending.trials["a"]
    assert state.params == {"decoded": 1} and state.name == "run-a" and state.end is TrialStatus.FINISHED
    assert sorted((m.key, m.value, m.step) for m in state.metrics) == [("loss", 2.0, 1), ("num_val", 8.0, 1)]
    assert state.data_params == {"num_val": 8} and state.tags == {"losstune.node_ip": "h"}
    with pytest.raises(TypeError):
        pending.apply(("result", "a", 1, {}, 0))


def test_with_mlflow_off_events_reach_the_runs_book_only(tmp_path):
    from losstune.search.tracking import RunsBook
    from losstune.search.tracking.events import CheckpointFiles, TrialResult, TrialStarted
    from losstune.search.tracking.pending import PendingWrites

    book = RunsBook(tmp_path)
    pending = PendingWrites(book, mlflow=False)
    pending.apply(TrialStarted("a", {"w": 1}, "run-a"))
    pending.apply(TrialResult("a", 2, {"training_iteration": 2, "composite": 0.25}, 5))
    pending.apply(CheckpointFiles("a", 2, {"predictions.png": b"png"}, 5))
    assert not pending.trials and not pending.any()
    assert book.runs() == {"a": {"run_id": None, "status": "running", "epochs": 2, "composite": 0.25,
                                 "params": {"w": 1}}}


def test_a_create_run_whose_answer_was_lost_is_found_not_made_again(tmp_path):
    """The store made the run but its answer never came (a server or helper that died mid-call): the retry
    searches for the run first, so the trial keeps one child run (real sqlite store)."""
    from mlflow.tracking import MlflowClient

    from losstune.search.tracking import RunsBook
    from losstune.search.tracking.child_runs import ChildRuns
    from losstune.search.tracking.events import TrialStarted
    from losstune.search.tracking.pending import PendingWrites

    class AnswerLostOnce(MlflowClient):
        lost = 1

        def create_run(self, *args, **kwargs):
            run = super().create_run(*args, **kwargs)
            if AnswerLostOnce.lost:
                AnswerLostOnce.lost -= 1
                raise ConnectionError("the answer was lost")
            return run

    client = AnswerLostOnce(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    book = RunsBook(tmp_path)
    pending = PendingWrites(book, None, mlflow=True)
    pending.apply(TrialStarted("t1", {"w": 0.1}, "trial_t1"))
    book.save()  # the trial is new and on disk: its first create_run needs no search
    runs = ChildRuns(client, exp, None, {}, book)
    with pytest.raises(ConnectionError):
        runs.sync(pending)
    runs.sync(pending)  # the writer's retry
    made = client.search_runs([exp])
    assert len(made) == 1
    assert book.runs()["t1"]["run_id"] == made[0].info.run_id


def _store(tmp_path, monkeypatch):
    """A real sqlite store whose client counts its calls; ``upload`` counts uploads into the local artifact
    store, whichever way they come (the client's ``log_artifacts`` or the run's artifact repository), and
    ``get_run`` the store's reads of a whole run."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking import MlflowClient

    class Counting(MlflowClient):
        calls: dict = {}

        params_sent: list = []

        def log_batch(self, *args, **kwargs):
            Counting.calls["log_batch"] = Counting.calls.get("log_batch", 0) + 1
            Counting.params_sent += [p.key for p in kwargs.get("params") or ()]
            return super().log_batch(*args, **kwargs)

    upload, get_run = LocalArtifactRepository.log_artifacts, SqlAlchemyStore.get_run

    def counted_upload(self, *args, **kwargs):
        Counting.calls["upload"] = Counting.calls.get("upload", 0) + 1
        return upload(self, *args, **kwargs)

    def counted_get_run(self, *args, **kwargs):  # the store's: MlflowClient's own calls go there too
        Counting.calls["get_run"] = Counting.calls.get("get_run", 0) + 1
        return get_run(self, *args, **kwargs)

    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", counted_upload)
    monkeypatch.setattr(SqlAlchemyStore, "get_run", counted_get_run)
    client = Counting(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    return client, exp


def test_a_trial_shorter_than_the_batch_interval_costs_one_batch_and_one_upload(tmp_path, monkeypatch):
    """Params, every result's metrics, the image series and the end go out together (real sqlite store), and the
    images go straight to the run's artifact store (no read of the run first); a running trial's batch goes out
    once METRICS_EVERY_S has passed since the run was made."""
    from losstune.search.status import TrialStatus
    from losstune.search.tracking import RunsBook
    from losstune.search.tracking import child_runs as cr
    from losstune.search.tracking.events import CheckpointFiles, TrialEnded, TrialResult, TrialStarted
    from losstune.search.tracking.pending import PendingWrites

    client, exp = _store(tmp_path, monkeypatch)
    book = RunsBook(tmp_path)
    pending = PendingWrites(book, None, mlflow=True)
    runs = cr.ChildRuns(client, exp, None, {}, book, client.tracking_uri)
    pending.apply(TrialStarted("t1", {"gradient_weight": 0.2}, "trial_t1"))
    book.save()
    runs.sync(pending)
    run_id = book.runs()["t1"]["run_id"]
    for step in (1, 2):
        pending.apply(TrialResult("t1", step, {"training_iteration": step, "composite": 0.1 * step}, 1000 + step))
        pending.apply(CheckpointFiles("t1", step, {"predictions.png": b"png", "predictions.webp": b"webp"}, 1000))
        runs.sync(pending)
    assert client.calls == {}  # held: the run was made less than METRICS_EVERY_S ago
    pending.apply(TrialEnded("t1", TrialStatus.FINISHED))
    runs.sync(pending)
    assert client.calls == {"log_batch": 1, "upload": 1}
    run = client.get_run(run_id)
    assert run.data.params == {"gradient_weight": "0.2"} and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "composite")] == [1, 2]
    assert len([a for a in client.list_artifacts(run_id, "images")]) == 4  # 2 images + their thumbnails

    monkeypatch.setattr(cr, "METRICS_EVERY_S", 0.0)  # a running trial's batch is due at once
    pending.apply(TrialStarted("t2", {"gradient_weight": 0.3}, "trial_t2"))
    book.save()
    runs.sync(pending)
    pending.apply(TrialResult("t2", 1, {"training_iteration": 1, "composite": 0.5}, 2000))
    runs.sync(pending)
    run = client.get_run(book.runs()["t2"]["run_id"])
    assert run.data.params == {"gradient_weight": "0.3"} and run.data.metrics == {"composite": 0.5}
    assert run.info.status == "RUNNING" and client.calls["log_batch"] == 2  # params went with the first metrics


def test_without_the_store_uri_a_child_runs_images_go_through_the_client(tmp_path, monkeypatch, one_finished_trial):
    """The writer's helper process is such a client: MLflow's own path (it reads the run once), same files."""
    from losstune.search.tracking.child_runs import ChildRuns

    client, exp = _store(tmp_path, monkeypatch)
    book, pending = one_finished_trial(tmp_path)
    ChildRuns(client, exp, None, {}, book).sync(pending)
    assert client.calls == {"log_batch": 1, "get_run": 1, "upload": 1}
    assert len(client.list_artifacts(book.runs()["t1"]["run_id"], "images")) == 2


def test_a_run_found_again_gets_the_params_its_first_batch_never_sent(tmp_path, monkeypatch):
    """A driver killed between a run's creation and its first batch: on resume the run continues and gets
    its params (those it has are not sent again)."""
    from losstune.search.tracking import RunsBook
    from losstune.search.tracking.child_runs import TRIAL_TAG, ChildRuns
    from losstune.search.tracking.events import TrialStarted
    from losstune.search.tracking.pending import PendingWrites

    client, exp = _store(tmp_path, monkeypatch)
    made = client.create_run(exp, run_name="trial_t1", tags={TRIAL_TAG: "t1"}).info.run_id
    client.log_param(made, "lr", "0.001")
    book = RunsBook(tmp_path)
    book.merge({"t1": {"run_id": made, "status": "running"}})
    pending = PendingWrites(book, None, mlflow=True)
    pending.apply(TrialStarted("t1", {"lr": 0.001, "gradient_weight": 0.2}, "trial_t1"))
    ChildRuns(client, exp, None, {}, book).sync(pending, everything=True)
    assert client.get_run(made).data.params == {"lr": "0.001", "gradient_weight": "0.2"}
    assert client.params_sent == ["gradient_weight"]
