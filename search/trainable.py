"""The Tune trainable: one trial = one training run of ``trainables.loop`` with sampled loss weights.

Each epoch is reported with ``tune.report`` together with a checkpoint (``Trainer.save`` plus the
validation predictions ``predictions.npz``/``.png``/``.webp`` and ``config.yaml`` of
:func:`search.artifacts.write_trial_artifacts`), so a restarted trial (node failure, ``--resume``) continues
from its last epoch via ``tune.get_checkpoint``.

Tune's function trainables report synchronously: ``tune.report`` uploads the checkpoint and then blocks
until the driver has handled the result and asks for the next one (so a scheduler can stop the trial in
between). To keep the device busy meanwhile, the training runs in a helper thread: epoch k+1 trains
while Tune's thread reports epoch k. The model's state and predictions of epoch k are taken before epoch
k+1 starts (the images are encoded in Tune's thread, beside the training), at
most one finished epoch waits for Tune, and when Tune stops the trial the helper stops before its next
step and is joined before the function returns (or, when Tune tears the process down without waiting
for the function, before the interpreter exits: :func:`_stop_live_trials`).
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import shutil
import sys
import tempfile
import threading
from typing import Any, Callable, Mapping

from ray import tune

from losstune.search import space as sp


def report_metrics(metrics: Mapping[str, Any], diverged: bool) -> dict[str, float]:
    """The loop's numbers plus ``diverged`` (0/1), as floats (Tune, Optuna and MLflow read these)."""
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out["diverged"] = 1.0 if diverged else float(out.get("diverged", 0.0))
    return out


def capture_artifacts(trainer) -> dict[str, Any] | None:
    """The validation predictions and config of the model as it is now, for :func:`write_artifacts`; a
    failure here never fails the trial (None: no artifacts this epoch)."""
    try:
        from losstune.search.artifacts import capture_trial_artifacts
        return capture_trial_artifacts(trainer)
    except ImportError:  # pragma: no cover - the plotting module is optional
        return None
    except Exception as err:  # noqa: BLE001
        logging.getLogger("losstune").warning("cannot save the trial's prediction artifacts: %s", err)
        return None


def write_artifacts(directory: str, captured: Mapping[str, Any] | None) -> None:
    """predictions.npz / .png / .webp and config.yaml beside the model's state in its checkpoint (for the
    report and the child run's images); a failure here never fails the trial."""
    if captured is None:
        return
    try:
        from losstune.search.artifacts import write_trial_artifacts
        write_trial_artifacts(directory, captured)
    except Exception as err:  # noqa: BLE001
        logging.getLogger("losstune").warning("cannot save the trial's prediction artifacts: %s", err)


def _node_id() -> str | None:
    try:
        import ray
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray (plain calls in tests)
        return None


def quiet_exit_in_finalizers() -> None:
    """Drop the "Exception ignored in ... SystemExit" tracebacks of a worker being stopped.

    Ray stops a trial process with SIGTERM, which its handler turns into ``SystemExit`` in the main thread.
    When that lands in a finalizer or weakref callback, Python cannot raise it and prints it with a traceback
    (the process goes on exiting), and Ray forwards that to the driver's console at the end of a sweep.
    Only those are dropped; every other unraisable exception goes to the previous hook. Idempotent.
    """
    previous = sys.unraisablehook
    if getattr(previous, "losstune_quiet_exit", False):
        return

    def hook(unraisable) -> None:
        if unraisable.exc_type is SystemExit:
            return
        previous(unraisable)

    hook.losstune_quiet_exit = True
    sys.unraisablehook = hook


# the helper threads of the trials of this process, stopped and joined when the interpreter exits
_LIVE_TRIALS: set["_PipelinedTrial"] = set()
_LIVE_LOCK = threading.Lock()
EXIT_JOIN_TIMEOUT_S = 30.0


def _stop_live_trials() -> None:
    """Stop the training helpers still running when the process exits (``atexit``, so before the
    interpreter finalises).

    When Tune tears a trial process down it does not wait for the trial's function (``cleanup`` finishes
    its session with ``timeout=0``), so the interpreter can start finalising while the helper is inside
    torch (e.g. ``backward``). A daemon thread that then wants the GIL back is ended with ``pthread_exit``,
    whose unwinding through torch's C++ frames aborts the process: SIGABRT and a crash dump on the sweep's
    console. Stopping the helper here ends it cleanly before its next step.
    """
    with _LIVE_LOCK:
        trials = list(_LIVE_TRIALS)
    for trial in trials:
        trial.stop.set()
    for trial in trials:
        if trial.helper is not None:
            trial.helper.join(EXIT_JOIN_TIMEOUT_S)


atexit.register(_stop_live_trials)


def run_trial(config: Mapping[str, Any], base_train: Mapping[str, Any], params: Mapping[str, sp.ParamSpec],
              cpus: float | None = None, cwd: str | None = None) -> None:
    """Train the trial's config, reporting (and checkpointing) every epoch to Tune."""
    from losstune.trainables.loop import Trainer

    quiet_exit_in_finalizers()
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # no "Checkpoint successfully created" per epoch
    if cwd and os.path.isdir(cwd):  # relative data paths resolve like they do for the driver
        os.chdir(cwd)
    threads = max(1, int(cpus)) if cpus else None
    # the sweep warns about a small validation set once at its start, not in every trial
    trainer = Trainer(sp.trial_config(base_train, params, config), num_threads=threads, warn_small_val=False)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load(directory)
    _PipelinedTrial(trainer, _node_id()).run()


class _PipelinedTrial:
    """Trains in a helper thread and reports from Tune's thread (see the module docstring)."""

    def __init__(self, trainer, node_id: str | None, report: Callable[..., None] | None = None):
        self.trainer, self.node_id = trainer, node_id
        self.report = report or tune.report  # (metrics, checkpoint=...) -> returns when Tune wants the next one
        # ("epoch", (metrics, captured artifacts), checkpoint dir | None) / ("done" | "error", ..., None)
        self.epochs: queue.Queue = queue.Queue()
        self.free = threading.Semaphore(1)         # taken by a finished epoch until Tune has its report
        self.stop = threading.Event()
        self.helper: threading.Thread | None = None

    def run(self) -> None:
        """Report each epoch as it comes; re-raise the training's error; always join the helper."""
        self.helper = helper = threading.Thread(target=self._train, name="losstune-train", daemon=True)
        with _LIVE_LOCK:
            _LIVE_TRIALS.add(self)
        helper.start()
        try:
            while True:
                kind, payload, directory = self.epochs.get()
                if kind == "done":
                    return
                if kind == "error":
                    raise payload
                try:
                    metrics, artifacts = payload
                    checkpoint = None
                    if directory:  # the images are encoded here, while the helper trains the next epoch
                        write_artifacts(directory, artifacts)
                        checkpoint = tune.Checkpoint.from_directory(directory)
                    self.report(metrics, checkpoint=checkpoint)  # blocks until Tune asks for the next result
                finally:
                    _remove(directory)
                    self.free.release()
        finally:  # also when Tune stops the trial: tune.report raises SystemExit in this thread
            self.stop.set()
            helper.join()
            with _LIVE_LOCK:
                _LIVE_TRIALS.discard(self)
            while not self.epochs.empty():  # epochs finished after the stop: never reported
                _remove(self.epochs.get_nowait()[2])

    def _train(self) -> None:
        from losstune.trainables.loop import TrainingStopped
        try:
            self.trainer.fit(self._hand_over, stop=self.stop)
        except TrainingStopped:
            pass
        except BaseException as err:  # noqa: BLE001 - reported in Tune's thread, with its traceback
            self.epochs.put(("error", err, None))
            return
        self.epochs.put(("done", None, None))

    def _hand_over(self, report) -> bool:
        """``fit``'s per-epoch callback (helper thread): checkpoint this epoch, queue it for Tune."""
        from losstune.trainables.loop import TrainingStopped
        diverged = report.status == "diverged"
        metrics = report_metrics(report.metrics, diverged)
        if self.node_id:  # nodes of one machine share an IP: the Ray node id tells them apart
            metrics["node_id"] = self.node_id
        directory, artifacts = None, None
        if not diverged:  # a diverged epoch has nothing worth resuming from
            directory = tempfile.mkdtemp(prefix="losstune-ckpt-")
            report.trainer.save(directory)
            artifacts = capture_artifacts(report.trainer)  # the predictions now; Tune's thread encodes them
        while not self.free.acquire(timeout=0.1):  # the previous epoch is still with Tune
            if self.stop.is_set():
                _remove(directory)
                raise TrainingStopped("stopped while waiting to report")
        self.epochs.put(("epoch", (metrics, artifacts), directory))
        return diverged


def _remove(directory: str | None) -> None:
    if directory:
        shutil.rmtree(directory, ignore_errors=True)


def make_trainable(base_train: Mapping[str, Any], params: Mapping[str, sp.ParamSpec], cpus: float | None = None,
                   cwd: str | None = None) -> Callable[[dict], None]:
    """A function trainable bound to the sweep's fixed config and space (pickled to the workers)."""
    base_train, params = dict(base_train), dict(params)
    cwd = cwd or os.getcwd()

    def losstune_trial(config: dict) -> None:
        run_trial(config, base_train, params, cpus, cwd)

    return losstune_trial
