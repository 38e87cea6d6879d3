"""The trial's reporting pipeline (search/trainable.py): epoch k+1 trains while Tune handles epoch k.

A real ``Trainer`` on the tiny microstructure task in real threads; in place of ``tune.report`` (which
needs a running Tune trial) a callable that, like Tune's driver, holds the trial for a while before it
asks for the next result, or raises ``SystemExit`` the way Tune stops a trial. The same code runs in the
real sweeps of test_sweep.py / test_reliability.py / test_report.py.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from losstune.search.trainable import _PipelinedTrial
from losstune.trainables.loop import STATE_FILE, Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = {"task": "microstructure", "batch_size": 4, "lr": 3e-3, "epochs": 3, "seed": 0,
          "data": {"size": 16, "num_sequences": 4, "frames": 6, "seq_length": 2},
          "model": {"hidden_channels": [4, 8]}}


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Checkpoint folders (tempfile.mkdtemp) go to a folder of this test, to check that none is left."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _checkpoint_dirs(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith("losstune-ckpt-")]


def _helpers_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "losstune-train"]


def test_next_epoch_trains_while_the_report_is_with_tune(private_tmp):
    trainer = Trainer(CONFIG)
    per_epoch = trainer.steps_per_epoch
    seen = []

    def report(metrics, checkpoint=None):  # Tune's driver: takes 0.4 s before it wants the next result
        state = torch.load(Path(checkpoint.path) / STATE_FILE, weights_only=True)
        assert (Path(checkpoint.path) / "predictions.png").is_file()
        # the images are encoded while the next epoch trains, but show the model of the reported epoch
        with np.load(Path(checkpoint.path) / "predictions.npz") as saved:
            shown_epoch, shown = int(saved["epoch"]), saved["prediction"].astype(np.float32)
        again = Trainer(CONFIG)
        again.load(checkpoint.path)
        expected = again.predict_val(len(shown))["prediction"].numpy().astype(np.float16).astype(np.float32)
        seen.append({"epoch": metrics["epoch"], "state_epoch": state["epoch"], "path": checkpoint.path,
                     "history": [h["composite"] for h in state["history"]], "composite": metrics["composite"],
                     "shown_epoch": shown_epoch, "shown_matches": bool(np.allclose(shown, expected, atol=1e-3))})
        time.sleep(0.4)
        seen[-1]["steps_when_answered"] = trainer.step

    _PipelinedTrial(trainer, None, report=report).run()

    assert [s["epoch"] for s in seen] == [1.0, 2.0, 3.0]
    for s in seen:
        k = int(s["epoch"])
        # the checkpoint is the state after epoch k, not after whatever trained since
        assert s["state_epoch"] == k and len(s["history"]) == k and s["history"][-1] == s["composite"]
        assert s["shown_epoch"] == k and s["shown_matches"]
        assert not Path(s["path"]).exists()  # removed once reported
    for s in seen[:-1]:  # while epoch k was with Tune, epoch k+1 trained (and no further)
        k = int(s["epoch"])
        assert k * per_epoch < s["steps_when_answered"] <= (k + 1) * per_epoch, (s, per_epoch)
    assert trainer.epoch == 3 and not _helpers_alive()
    assert _checkpoint_dirs(private_tmp) == []


def test_a_stop_from_tune_ends_training_before_the_next_step(private_tmp):
    trainer = Trainer({**CONFIG, "epochs": 50})
    reported = []

    def report(metrics, checkpoint=None):  # Tune stops the trial after its first result (ASHA, say)
        reported.append(metrics["epoch"])
        time.sleep(0.2)
        raise SystemExit(0)

    with pytest.raises(SystemExit):
        _PipelinedTrial(trainer, None, report=report).run()
    assert reported == [1.0]
    assert trainer.epoch <= 2  # at most the epoch that overlapped the report, never a third
    assert not _helpers_alive()
    assert _checkpoint_dirs(private_tmp) == []  # the unreported epoch's checkpoint folder is gone too


def test_a_training_error_reaches_tunes_thread(private_tmp):
    trainer = Trainer(CONFIG)
    inner = trainer.task.training_step

    def failing_step(model, batch, step):
        if step == trainer.steps_per_epoch + 1:  # in the second epoch
            raise RuntimeError("boom in the training step")
        return inner(model, batch, step)

    trainer.task.training_step = failing_step
    reported = []
    with pytest.raises(RuntimeError, match="boom in the training step"):
        _PipelinedTrial(trainer, None, report=lambda metrics, checkpoint=None: reported.append(metrics["epoch"])).run()
    assert reported == [1.0]
    assert not _helpers_alive()
    assert _checkpoint_dirs(private_tmp) == []


def test_a_diverged_epoch_is_reported_without_checkpoint_and_ends_the_trial(private_tmp):
    trainer = Trainer({**CONFIG, "lr": 1e6, "epochs": 4})
    reported = []
    _PipelinedTrial(trainer, "node-1", report=lambda metrics, checkpoint=None: reported.append(
        (metrics["diverged"], metrics["node_id"], checkpoint))).run()
    assert reported and reported[-1] == (1.0, "node-1", None)
    assert len(reported) < 4 and all(d == 0.0 for d, _, _ in reported[:-1])
    assert _checkpoint_dirs(private_tmp) == []


def test_a_worker_being_stopped_prints_no_traceback_but_other_errors_still_show(monkeypatch):
    """Ray's SIGTERM handler raises SystemExit; landing in a finalizer, Python would print it (and Ray would
    forward it to the sweep's console). The trial's hook drops exactly those."""
    import gc
    import sys

    from losstune.search.trainable import quiet_exit_in_finalizers

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_type))
    quiet_exit_in_finalizers()
    quiet_exit_in_finalizers()  # once per process, however many trials it runs

    class Finalizer:
        def __init__(self, error):
            self.error = error

        def __del__(self):
            raise self.error

    Finalizer(SystemExit(1))
    Finalizer(ValueError("a real bug"))
    gc.collect()
    assert seen == [ValueError]


_EXIT_WHILE_TRAINING = """
import sys, threading, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
from losstune.search.trainable import _PipelinedTrial
from losstune.trainables.loop import Trainer

config = {config!r}
trainer = Trainer(config)
reported = threading.Event()

def report(metrics, checkpoint=None):  # Tune tears the process down and never asks for the next result
    reported.set()
    threading.Event().wait()

threading.Thread(target=_PipelinedTrial(trainer, None, report=report).run, daemon=True).start()
assert reported.wait(120)
time.sleep(0.3)  # the helper is inside epoch 2 (inside torch) when the interpreter exits
print("steps", trainer.step, "of", trainer.steps_per_epoch, "per epoch", flush=True)
"""


def test_a_process_exiting_while_the_helper_trains_exits_cleanly(tmp_path):
    """Tune does not wait for a trial's function when it tears the trial process down; a helper thread still
    inside torch when the interpreter finalises used to abort the process (SIGABRT, crash dump on the sweep's
    console at the end of a sweep). The process must now exit 0, the helper stopped before its next step."""
    import subprocess
    import sys

    repo = str(Path(__file__).resolve().parents[2])
    # ~30 steps of ~50+ ms: an epoch long enough that the exit lands inside one
    config = {**CONFIG, "epochs": 50, "batch_size": 2,
              "data": {"size": 48, "num_sequences": 12, "frames": 8, "seq_length": 3},
              "model": {"hidden_channels": [16, 16]}}
    script = tmp_path / "exit_while_training.py"
    script.write_text(_EXIT_WHILE_TRAINING.format(repo=repo, config=config))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    steps, per_epoch = (int(w) for w in proc.stdout.split()[1::2][:2])
    assert per_epoch < steps < 2 * per_epoch  # it did exit in the middle of the second epoch
    assert "Fatal Python error" not in proc.stderr
