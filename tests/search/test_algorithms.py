"""The searcher of a sweep (search/algorithms.py) across a resume from an older snapshot of Tune's state."""

from __future__ import annotations

import optuna

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
