"""What picks and stops a sweep's trials: the Optuna sampler, Ray's ``OptunaSearch`` around it, the
scheduler (ASHA / FIFO), and the Optuna side of a resume (trials a killed driver took with it).

Imported lazily (it imports Ray Tune and Optuna): ``losstune trials`` / ``export`` do not need it.
"""

from __future__ import annotations

import warnings

import optuna
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from losstune.search import space as sp
from losstune.search.config import Sweep
from losstune.search.internals import is_finished_in_storage, searcher_completed, searcher_trials

# user attribute of every Optuna trial: the Tune trial it belongs to (also handy in optuna-dashboard)
TUNE_TRIAL_ATTR = "tune_trial_id"


def make_sampler(sweep: Sweep):
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    s = sweep.search
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.sampler == "nsga2":
        population = s.population_size or max(4, min(50, s.num_samples // 2))
        return optuna.samplers.NSGAIISampler(seed=s.seed, population_size=population)
    startup = s.n_startup_trials
    if startup is None:  # the hand-set points count as start-up trials; leave TPE room to work
        startup = max(len(sweep.points) + 1, min(10, max(2, s.num_samples // 3)))
    return optuna.samplers.TPESampler(seed=s.seed, multivariate=s.multivariate, constant_liar=s.constant_liar,
                                      n_startup_trials=startup)


class TrialIdOptunaSearch(OptunaSearch):
    """Ray's ``OptunaSearch`` that also stores the Tune trial id on each Optuna trial it asks for, so a
    resume can tell which Optuna trials belonged to trials Tune no longer knows (:func:`fail_lost_trials`).

    After a resume, the trials it knew from Tune's snapshot may have ended in the study since that snapshot:
    for those (and only those: a trial asked for in this process cannot have) each result reads the study's
    storage first and leaves a finished Optuna trial alone.
    """

    _restored: frozenset[str] = frozenset()  # the Tune trial ids this searcher got from a snapshot

    def restore(self, checkpoint_path: str):
        super().restore(checkpoint_path)
        self._restored = frozenset(searcher_trials(self))

    def _ended_in_storage(self, trial_id: str) -> bool:
        ot_trial = searcher_trials(self).get(trial_id)
        return trial_id in self._restored and ot_trial is not None and is_finished_in_storage(self, ot_trial)

    def suggest(self, trial_id: str):
        trials = searcher_trials(self)
        new = trial_id not in trials
        params = super().suggest(trial_id)
        if new and trial_id in trials:
            trials[trial_id].set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # a resume from a snapshot older than a trial's end trains its last epochs again from an earlier
        # checkpoint; Optuna already has that trial's final value, and a finished Optuna trial takes no reports
        if not self._ended_in_storage(trial_id):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False):
        # a resume from a snapshot taken between a trial's last checkpoint and its end completes it again
        # (from that checkpoint, training nothing): Optuna has its value already, telling twice only warns
        completed = searcher_completed(self)
        if trial_id not in completed and self._ended_in_storage(trial_id):
            completed.add(trial_id)
            return
        super().on_trial_complete(trial_id, result=result, error=error)


def make_searcher(sweep: Sweep, storage: optuna.storages.BaseStorage):
    """TPE (or the configured sampler) over the sweep's space, its study kept in ``storage``
    (``search.study.open_storage``), at most ``max_concurrent`` trials in flight."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    metric, mode = sweep.metric_mode()
    searcher = TrialIdOptunaSearch(
        space=sp.distributions(sweep.params), metric=metric, mode=mode,
        points_to_evaluate=[sp.encode_point(sweep.params, p) for p in sweep.points] or None,
        sampler=make_sampler(sweep), study_name=sweep.name,
        storage=storage)
    return ConcurrencyLimiter(searcher, max_concurrent=sweep.search.max_concurrent)


def make_scheduler(sweep: Sweep):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    sch = sweep.scheduler
    if sch.type == "fifo":
        return FIFOScheduler()
    extra = {"metric": "composite", "mode": "max"} if sweep.is_pareto else {}
    return ASHAScheduler(time_attr="training_iteration", max_t=sweep.epochs, grace_period=sch.grace_period,
                         reduction_factor=sch.reduction_factor, brackets=sch.brackets, **extra)


def fail_lost_trials(storage: optuna.storages.BaseStorage, study_name: str, known_trial_ids: set[str]) -> list[int]:
    """Mark FAIL the RUNNING Optuna trials of Tune trials that the restored Tune state does not know.

    A driver killed between two of Tune's snapshots takes the trials started since the last one with it:
    Tune will not run them again, so their Optuna trials would stay RUNNING forever. Returns their numbers.
    """
    study = optuna.load_study(study_name=study_name, storage=storage)
    lost = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        tune_id = trial.user_attrs.get(TUNE_TRIAL_ATTR)
        if tune_id is not None and tune_id not in known_trial_ids:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            lost.append(trial.number)
    return lost
