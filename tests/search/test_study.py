"""The sweep's Optuna study on disk (search/study.py): the journal file, sweeps with an earlier sqlite study,
a line cut off by a killed driver."""

from __future__ import annotations

import optuna

from losstune.search.study import LEGACY_OPTUNA_DB, OPTUNA_JOURNAL, load_study, open_storage, remove_study, \
    study_file

SPACE = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}


def _study_with_trials(storage, name: str, values: list[float]) -> None:
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    for v in values:
        trial = study.ask(fixed_distributions=SPACE)
        trial.report(v / 2, 1)
        study.tell(trial, v)


def test_a_new_sweep_keeps_its_study_in_a_journal_that_load_study_reads(tmp_path):
    assert load_study(tmp_path) is None  # no study yet
    _study_with_trials(open_storage(tmp_path), "demo", [0.1, 0.7])
    assert study_file(tmp_path) == tmp_path / OPTUNA_JOURNAL and (tmp_path / OPTUNA_JOURNAL).is_file()
    study = load_study(tmp_path)
    assert study.study_name == "demo" and [t.value for t in study.trials] == [0.1, 0.7]
    assert study.best_value == 0.7 and study.trials[0].intermediate_values == {1: 0.05}
    assert load_study(tmp_path, "demo").best_value == 0.7


def test_a_sweep_written_with_the_earlier_sqlite_study_is_read_from_it(tmp_path):
    _study_with_trials(optuna.storages.RDBStorage(f"sqlite:///{tmp_path / LEGACY_OPTUNA_DB}"), "old", [0.3])
    assert study_file(tmp_path).name == LEGACY_OPTUNA_DB
    assert [t.value for t in load_study(tmp_path).trials] == [0.3]
    _study_with_trials(open_storage(tmp_path), "old-continued", [0.4])  # resume writes where it read
    assert not (tmp_path / OPTUNA_JOURNAL).exists()
    assert load_study(tmp_path, "old-continued").best_value == 0.4


def test_a_line_cut_off_by_a_killed_driver_is_skipped(tmp_path):
    _study_with_trials(open_storage(tmp_path), "cut", [0.2, 0.5])
    with open(tmp_path / OPTUNA_JOURNAL, "ab") as f:
        f.write(b'{"op_code": 4, "worker_id": "x", "tri')  # a write interrupted half way
    assert [t.value for t in load_study(tmp_path).trials] == [0.2, 0.5]


def test_starting_over_removes_the_study(tmp_path):
    _study_with_trials(open_storage(tmp_path), "gone", [0.2])
    remove_study(tmp_path)
    assert load_study(tmp_path) is None and not any(tmp_path.iterdir())


def test_a_file_with_several_studies_needs_the_name(tmp_path):
    for n in ("a", "b"):
        _study_with_trials(open_storage(tmp_path), n, [0.1])
    assert load_study(tmp_path) is None
    assert load_study(tmp_path, "b").study_name == "b"
