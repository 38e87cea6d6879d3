"""The validation predictions a trial or a verification run left in its checkpoints (``predictions.npz``,
written at every epoch, see :mod:`search.trainable`), read through the sweep's storage (local or URI); for
a trial of a sweep run before trials saved them, recomputed from the newest checkpoint's ``state.pt``."""

from __future__ import annotations

import io
import logging
import tempfile
from pathlib import Path

import numpy as np

from losstune.search import artifacts
from losstune.search.trials import SweepResults, fs_and_path

logger = logging.getLogger("losstune.report")


def run_predictions(results: SweepResults, run_path: str | None) -> tuple[dict[str, np.ndarray] | None, str]:
    """(arrays, where) of a verification run's last checkpoint (``predictions.npz``), or (None, why not)."""
    if not run_path:
        return None, "no run folder"
    fs = _storage(results)
    found = _newest_predictions(fs, _checkpoints(fs, run_path))
    return found if found is not None else (None, "no predictions.npz in its checkpoints")


def trial_predictions(results: SweepResults, trial_id: str, recompute: bool = True
                      ) -> tuple[dict[str, np.ndarray] | None, str]:
    """(arrays, where they came from) of a trial's last checkpoint, or (None, why not)."""
    row = results.table.set_index("trial_id").loc[trial_id]
    path = row.get("path")
    if not isinstance(path, str) or not path:
        return None, "no trial folder"
    fs = _storage(results)
    ckpts = _checkpoints(fs, path)
    if not ckpts:
        return None, "no checkpoint"
    found = _newest_predictions(fs, ckpts)
    if found is not None:
        return found
    if not recompute:
        return None, "no predictions.npz in its checkpoints"
    # an older sweep: rebuild the model from the newest checkpoint's state.pt
    state = _read_bytes(fs, f"{ckpts[0]}/state.pt")
    if state is None:
        return None, "no predictions.npz or state.pt in its checkpoints"
    try:
        from losstune.trainables.loop import Trainer
        with tempfile.TemporaryDirectory(prefix="losstune-report-") as tmp:
            (Path(tmp) / "state.pt").write_bytes(state)
            trainer = Trainer(results.trial_config(trial_id))
            trainer.load(tmp)
            arrays = {k: v.numpy() for k, v in trainer.predict_val(artifacts.NUM_SAMPLES).items()}
        return arrays, f"recomputed from {ckpts[0]}/state.pt"
    except Exception as err:  # noqa: BLE001 - a report must not fail on one trial
        return None, f"cannot recompute from state.pt ({type(err).__name__}: {err})"


def _storage(results: SweepResults):
    return fs_and_path(results.info.tune_dir or str(results.sweep_dir))[0]


def _checkpoints(fs, trial_path: str) -> list[str]:
    """The trial's checkpoint folders, newest first."""
    import pyarrow.fs as pafs
    try:
        entries = fs.get_file_info(pafs.FileSelector(trial_path, allow_not_found=True))
    except OSError:
        return []
    dirs = [e for e in entries if e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint_")]
    return [e.path for e in sorted(dirs, key=lambda e: e.base_name, reverse=True)]


def _read_bytes(fs, path: str) -> bytes | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (FileNotFoundError, OSError):
        return None


def _newest_predictions(fs, ckpts: list[str]) -> tuple[dict[str, np.ndarray], str] | None:
    """(arrays, where) of the newest readable ``predictions.npz`` among ``ckpts`` (newest first), or None."""
    for ckpt in ckpts:
        data = _read_bytes(fs, f"{ckpt}/{artifacts.PREDICTIONS_NPZ}")
        if data is not None:
            try:
                return artifacts.load_predictions(io.BytesIO(data)), f"{ckpt}/{artifacts.PREDICTIONS_NPZ}"
            except (OSError, ValueError) as err:
                logger.warning("%s/%s unreadable: %s", ckpt, artifacts.PREDICTIONS_NPZ, err)
    return None
