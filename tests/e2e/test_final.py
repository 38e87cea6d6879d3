"""``losstune train`` is resumable: Ctrl-C loses at most the epoch in progress, ``--resume`` continues it.

A real Ctrl-C (SIGINT to the process group of a ``losstune train`` subprocess), then ``--resume`` in this
process; the result must be the same model as an uninterrupted training of the same config (CPU, one
thread: bit for bit), in the same MLflow run (sqlite in tmp_path) with every epoch logged once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from losstune.search.cli import main

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 20
# ~0.2 s per epoch: long enough for the Ctrl-C to land well before the end
CONFIG = {"task": "microstructure", "seed": 0, "epochs": EPOCHS, "batch_size": 4, "lr": 3.0e-3, "device": "cpu",
          "amp": "off", "num_threads": 1, "gradient_weight": 0.1, "lr_schedule": "cosine",
          "data": {"size": 32, "num_sequences": 8, "frames": 8, "seq_length": 3},
          "model": {"hidden_channels": [8, 16]}}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _losstune() -> list[str]:
    exe = Path(sys.executable).with_name("losstune")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "losstune.search.cli"]


def _progress(out: Path) -> dict:
    try:
        return json.loads((out / "train.json").read_text())
    except (OSError, ValueError):
        return {}


def _interrupted_training(tmp_path: Path, uri: str) -> tuple[Path, Path, str]:
    """Start ``losstune train``, Ctrl-C it after its 3rd saved epoch; (config, out dir, console output)."""
    config, out = tmp_path / "final.yaml", tmp_path / "resumed"
    config.write_text(yaml.safe_dump(CONFIG))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    cmd = _losstune() + ["train", str(config), "--out", str(out), "--tracking-uri", uri, "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
                            start_new_session=True)  # its own process group, as a terminal's job
    try:
        deadline = time.monotonic() + 120
        while _progress(out).get("epoch", 0) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0] if proc.poll() else ""
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)
        console, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, console
    return config, out, console


def test_ctrl_c_then_resume_gives_the_uninterrupted_model_in_one_mlflow_run(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config, out, console = _interrupted_training(tmp_path, uri)
    saved = _progress(out)
    assert saved["status"] == "interrupted" and 3 <= saved["epoch"] < EPOCHS - 5, console
    assert (out / "state.pt").is_file() and not (out / "model.pt").exists()
    assert f"interrupted after epoch {saved['epoch']}/{EPOCHS}" in console
    assert "--resume" in console and "Traceback" not in console
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(saved["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["losstune.status"] == "interrupted"

    # the same command again must not start over the unfinished training; another config must not resume it
    base = ["train", str(config), "--out", str(out), "--tracking-uri", uri, "--no-progress"]
    assert main(base) == 2
    assert "unfinished training" in capsys.readouterr().err
    assert main(base + ["--epochs", str(EPOCHS + 1), "--resume"]) == 2
    assert "differs from the one of the interrupted training in epochs" in capsys.readouterr().err

    assert main(base + ["--resume"]) == 0
    resumed = torch.load(out / "model.pt", weights_only=True)
    assert _progress(out)["status"] == "finished" and not (out / "state.pt").exists()
    run = client.get_run(saved["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["losstune.status"] == "finished"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "composite"))
    assert steps == list(range(1, EPOCHS + 1))  # every epoch once: none lost, none logged twice
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert main(base + ["--resume"]) == 2  # finished: nothing to resume
    assert "nothing to resume" in capsys.readouterr().err

    # the same training without the interruption: the same model, bit for bit
    assert main(["train", str(config), "--out", str(tmp_path / "straight"), "--tracking-uri", uri,
                 "--no-progress"]) == 0
    straight = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    scores = lambda m: {k: v for k, v in m.items() if not k.endswith("time_s")}  # noqa: E731
    assert scores(resumed["metrics"]) == scores(straight["metrics"])
    assert all(torch.equal(resumed["state_dict"][k], v) for k, v in straight["state_dict"].items())
