"""The one trial-status vocabulary (search/status.py) and the places that decide a trial's status with it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from losstune.search.progress import classify
from losstune.search.status import TrialStatus
from losstune.search.trials import status_from_results


@pytest.mark.parametrize("last, expected", [
    ({"training_iteration": 4, "diverged": 0.0}, TrialStatus.FINISHED),
    ({"training_iteration": 2}, TrialStatus.STOPPED_EARLY),
    ({"training_iteration": 1, "diverged": 1.0}, TrialStatus.DIVERGED),
    ({"training_iteration": 4, "diverged": 1.0}, TrialStatus.DIVERGED),
    (None, TrialStatus.STOPPED_EARLY),
])
def test_a_completed_trial_is_diverged_stopped_early_or_finished(last, expected):
    assert TrialStatus.of_completed(last, max_epochs=4) is expected


def test_mlflow_and_console_mapping():
    assert {s.value: s.run_status for s in TrialStatus if s.ended} == {
        "finished": "FINISHED", "stopped_early": "KILLED", "diverged": "FAILED", "failed": "FAILED"}
    assert TrialStatus.INTERRUPTED.run_status == TrialStatus.LOST.run_status == "KILLED"
    assert not TrialStatus.INTERRUPTED.ended and not TrialStatus.LOST.ended and not TrialStatus.RUNNING.ended
    assert [s.label for s in TrialStatus if s.label != s.value] == ["stopped"]
    assert TrialStatus("stopped") is TrialStatus.STOPPED_EARLY  # the training loop's word
    with pytest.raises(ValueError):
        TrialStatus("stoped")


def test_tune_trials_are_classified_with_the_same_words():
    trial = lambda status, **last: SimpleNamespace(status=status, last_result=last)  # noqa: E731
    assert classify(trial("ERROR"), 4) is TrialStatus.FAILED
    assert classify(trial("PAUSED"), 4) is TrialStatus.RUNNING
    assert classify(trial("PENDING"), 4) is TrialStatus.PENDING
    assert classify(trial("TERMINATED", training_iteration=2), 4) is TrialStatus.STOPPED_EARLY
    assert classify(trial("TERMINATED", training_iteration=4, diverged=1.0), 4) is TrialStatus.DIVERGED


def test_status_from_results_on_disk():
    done = [{"training_iteration": 4, "done": True}]
    assert status_from_results([], errored=False, max_epochs=4, sweep_ended=True) is TrialStatus.PENDING
    assert status_from_results([], errored=True, max_epochs=4, sweep_ended=True) is TrialStatus.FAILED
    assert status_from_results(done, errored=False, max_epochs=4, sweep_ended=False) is TrialStatus.FINISHED
    assert status_from_results([{"training_iteration": 2}], False, 4, sweep_ended=True) is TrialStatus.STOPPED_EARLY
    assert status_from_results([{"training_iteration": 2}], False, 4, sweep_ended=False) is TrialStatus.UNKNOWN
    assert status_from_results([{"training_iteration": 2}], True, 4, sweep_ended=True) is TrialStatus.FAILED
    assert status_from_results([{"training_iteration": 2, "diverged": 1.0}], True, 4, True) is TrialStatus.DIVERGED
