"""losstune's search layer: sweep config -> Optuna (TPE/random/NSGA-II) on Ray Tune (ASHA/FIFO) -> MLflow.

Modules (imported lazily; ``import search`` itself is cheap):

* :mod:`search.config`    sweep YAML -> validated :class:`~search.config.Sweep` (``SweepConfigError`` names the field);
                          the sections and ``Sweep`` are defined in :mod:`search.config_schema`
* :mod:`search.space`     the space section -> parameter specs (:mod:`search.param_specs`: Optuna distributions,
                          encoded choices), dotted paths into the trial's training config
* :mod:`search.trainable` the Tune function trainable around ``trainables.loop`` (per-epoch report + checkpoint)
* :mod:`search.runner`    ``run_sweep``: results folder, resume; its phases in :mod:`search.sweep_setup`,
  :mod:`search.tuner` (Tuner + OptunaSearch + ASHA) and :mod:`search.sweep_finish`
* :mod:`search.ray_session` the driver's Ray (join a cluster or start a local one, then stop it)
* :mod:`search.tracking`  MLflow parent/child runs via a non-blocking ``ray.tune.Callback``
* :mod:`search.trials`    read a sweep's trials back from disk (table, pareto front)
* :mod:`search.export`    best trial(s) -> complete training YAML(s) with provenance
* :mod:`search.final`     ``losstune train``: final training of an exported config
* :mod:`search.report`    ``losstune report``: data (:mod:`search.report_builder`) -> figures -> HTML template
* :mod:`search.cli`       the ``losstune`` command
"""
