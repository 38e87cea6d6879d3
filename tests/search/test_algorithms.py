"""The searcher of a sweep (search/algorithms.py) across a resume from an older snapshot of Tune's state."""

from __future__ import annotations

import optuna

from ray.tune.search.optuna import OptunaSearch

from losstune.search.algorithms import TUNE_TRIAL_ATTR, TrialIdOptunaSearch
from losstune.search.study import load_study, open_storage

SPACE = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}


def _searcher(sweep_dir) -> TrialIdOptunaSearch:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return TrialIdOptunaSearch(space=SPACE, metric="score", mode="max", sampler=optuna.samplers.RandomSampler(seed=0),
                               study_name="resume", storage=open_storage(sweep_dir))


def test_a_trial_trained_again_after_a_resume_leaves_its_optuna_value_alone(tmp_path):
    searcher = _searcher(tmp_path)
    searcher.suggest("trial_a")
    searcher.on_trial_result("trial_a", {"score": 0.3, "training_iteration": 1})
    searcher.save(str(tmp_path / "snapshot.pkl"))  # Tune's last snapshot before the driver died
    searcher.on_trial_result("trial_a", {"score": 0.5, "training_iteration": 2})
    searcher.on_trial_complete("trial_a", {"score": 0.5, "training_iteration": 2})

    resumed = _searcher(tmp_path)  # --resume: the searcher as the snapshot had it, the study as it is
    resumed.restore(str(tmp_path / "snapshot.pkl"))
    resumed.on_trial_result("trial_a", {"score": 0.45, "training_iteration": 2})  # epoch 2 trained again
    resumed.on_trial_complete("trial_a", {"score": 0.45, "training_iteration": 2})

    (trial,) = load_study(tmp_path).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 0.5
    assert trial.intermediate_values == {1: 0.3, 2: 0.5}
    assert trial.user_attrs[TUNE_TRIAL_ATTR] == "trial_a"


class _CountingStorage(optuna.storages.JournalStorage):
    """The sweep's journal storage, counting reads of single trials (the resume guard's read)."""
    reads = 0

    def get_trial(self, trial_id):
        _CountingStorage.reads += 1
        return super().get_trial(trial_id)


def test_only_trials_restored_from_a_snapshot_read_the_study_per_result(tmp_path):
    """A trial asked for in this process cannot have ended behind the searcher's back: its results cost no
    read of the study's storage; a trial known from a snapshot still does (the guard above)."""
    from optuna.storages.journal import JournalFileBackend

    from losstune.search.study import study_file

    def searcher(cls=TrialIdOptunaSearch, name="resume"):
        open_storage(tmp_path)  # makes the study's file
        return cls(space=SPACE, metric="score", mode="max", sampler=optuna.samplers.RandomSampler(seed=0),
                   study_name=name, storage=_CountingStorage(JournalFileBackend(str(study_file(tmp_path)))))

    def reads(call) -> int:
        before = _CountingStorage.reads
        call()
        return _CountingStorage.reads - before

    ray_s = searcher(OptunaSearch, "ray's own")  # what a report costs without any guard
    ray_s.suggest("trial_x")
    unguarded = reads(lambda: ray_s.on_trial_result("trial_x", {"score": 0.3, "training_iteration": 1}))

    first = searcher()
    first.suggest("trial_a")
    assert reads(lambda: first.on_trial_result("trial_a", {"score": 0.3, "training_iteration": 1})) == unguarded
    first.save(str(tmp_path / "snapshot.pkl"))
    first.on_trial_complete("trial_a", {"score": 0.3, "training_iteration": 1})

    resumed = searcher()
    resumed.restore(str(tmp_path / "snapshot.pkl"))
    # ended since the snapshot: the guard reads it, and Optuna gets no report
    assert reads(lambda: resumed.on_trial_result("trial_a", {"score": 0.25, "training_iteration": 1})) == 1
    resumed.suggest("trial_b")
    assert reads(lambda: resumed.on_trial_result("trial_b", {"score": 0.4, "training_iteration": 1})) == unguarded
    resumed.on_trial_complete("trial_b", {"score": 0.4, "training_iteration": 1})
    assert {t.value for t in load_study(tmp_path, "resume").trials} == {0.3, 0.4}
