"""The sweep's Optuna study on disk: one append-only journal file per sweep.

Every trial costs the driver a few study writes (ask, one parameter each, one value per epoch, tell).
Optuna's journal storage appends each as one JSON line (file-locked, fsync'd), which costs ~10 ms of CPU
per trial; the same operations through SQLAlchemy on sqlite cost ~80 ms (TPE, 3 parameters, 4 epochs:
the driver's CPU per trial is measured in benchmarks/overhead.py). A line cut off by a killed driver is
skipped when the journal is read. Sweeps written before the journal keep their sqlite ``optuna.db``: they
are read and resumed from it.

Open a sweep's study from Python::

    from losstune.search.study import load_study
    study = load_study("results/quickstart")

or with Optuna alone (``optuna-dashboard results/quickstart/optuna.journal`` serves it too)::

    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    storage = JournalStorage(JournalFileBackend("results/quickstart/optuna.journal"))
    study = optuna.load_study(study_name="quickstart", storage=storage)
"""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

OPTUNA_JOURNAL = "optuna.journal"  # the study of a sweep (Optuna's journal file format)
LEGACY_OPTUNA_DB = "optuna.db"  # the study of a sweep written before the journal (sqlite)
STUDY_FILES = (OPTUNA_JOURNAL, LEGACY_OPTUNA_DB)


def study_file(sweep_dir: str | Path) -> Path:
    """The file that holds the sweep's study: the journal, or a sweep's earlier ``optuna.db`` if only that exists.

    >>> study_file("/tmp/no-such-sweep").name
    'optuna.journal'
    """
    sweep_dir = Path(sweep_dir)
    legacy = sweep_dir / LEGACY_OPTUNA_DB
    journal = sweep_dir / OPTUNA_JOURNAL
    return legacy if legacy.is_file() and not journal.exists() else journal


def open_storage(sweep_dir: str | Path) -> BaseStorage:
    """The storage of the sweep's study, created (empty) if the sweep has none yet."""
    path = study_file(sweep_dir)
    if path.name == LEGACY_OPTUNA_DB:
        return RDBStorage(f"sqlite:///{path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def remove_study(sweep_dir: str | Path) -> None:
    """Delete the sweep's study (a sweep that starts over in the same folder starts a fresh study)."""
    for name in STUDY_FILES:
        for path in (Path(sweep_dir) / name, Path(sweep_dir) / f"{name}.lock"):
            path.unlink(missing_ok=True)


def load_study(sweep_dir: str | Path, study_name: str | None = None) -> optuna.Study | None:
    """The sweep's persisted study; None if the sweep has none (or several and ``study_name`` names none).

    ``study_name`` defaults to the only study in the file (a sweep's study is named after the sweep).
    """
    if not study_file(sweep_dir).is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(sweep_dir)
    names = [s.study_name for s in storage.get_all_studies()]
    if study_name not in names:
        if len(names) != 1:
            return None
        study_name = names[0]
    return optuna.load_study(study_name=study_name, storage=storage)
