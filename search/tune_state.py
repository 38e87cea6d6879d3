"""Tune's saved experiment state, checked (and brought up to date) before ``--resume`` hands it to ``Tuner.restore``.

Tune writes its state (``experiment_state-*.json``, the searcher's and search generator's pickles, the
callbacks' pickle) into a staging folder on the driver, ``<ray temp>/session_*/artifacts/*/<name>/driver_artifacts``,
then copies that folder to the sweep's storage in a background thread, file by file. A driver killed
around that copy leaves the storage with either a cut-off file (``Tuner.restore`` then waits for trials
forever) or an older snapshot than the last one Tune took: that one may point at checkpoints already
deleted (Tune keeps a trial's newest 2; the trial then fails three restores) and miss the newest trials (their
Optuna trials stay RUNNING forever). Both happened in tests/e2e/test_reliability.py.

So before a resume, the newest intact snapshot of this experiment found in this machine's Ray session
folders (the killed driver's session folder is still there) replaces the stored set as a whole, so the
files stay consistent with each other, when the stored set is damaged or older. A damaged set with no
intact copy is :class:`TuneStateDamaged`, naming the file.
"""

from __future__ import annotations

import json
import os
import pickletools
import shutil
from pathlib import Path

PATTERNS = ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl", "callback-states-*.pkl")


class TuneStateDamaged(RuntimeError):
    """Tune's saved state is damaged and no intact copy was found."""


def _readable(path: Path) -> bool:
    """Complete JSON (experiment state) or a complete pickle stream (the others; nothing is unpickled)."""
    try:
        data = path.read_bytes()
        if not data:
            return False
        if path.name.startswith("experiment_state"):
            json.loads(data)
        else:
            for _ in pickletools.genops(data):  # raises on a cut-off stream
                pass
        return True
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def state_files(folder: Path) -> dict[str, Path]:
    """The newest file of each pattern in ``folder`` (pattern -> path); missing patterns are left out."""
    out = {}
    for pattern in PATTERNS:
        found = sorted(folder.glob(pattern), key=lambda p: (p.stat().st_mtime, p.name))
        if found:
            out[pattern] = found[-1]
    return out


def damaged(folder: Path) -> list[Path]:
    """The state files in ``folder`` that are missing, empty or unreadable ([] = intact)."""
    files = state_files(folder)
    missing = [folder / pattern for pattern in PATTERNS if pattern not in files]
    return missing + [p for p in files.values() if not _readable(p)]


def _trials(folder: Path) -> list[tuple[dict, dict]] | None:
    """(trial, run metadata) of every trial in the newest experiment state in ``folder``; None when unreadable."""
    path = state_files(folder).get(PATTERNS[0])
    if path is None:
        return None
    try:
        return _trial_data(path.read_bytes())
    except OSError:
        return None


def _trial_data(data: bytes) -> list[tuple[dict, dict]] | None:
    try:
        return [tuple(json.loads(x) if isinstance(x, str) else x for x in entry)
                for entry in json.loads(data)["trial_data"]]
    except (ValueError, TypeError, KeyError):
        return None


def _snapshot(folder: Path) -> tuple[set[str], tuple[float, int, int]] | None:
    """(trial ids, freshness) of the newest experiment state in ``folder``; None when unreadable.
    Freshness = (newest result time of any trial, number of trials, number of terminated trials)."""
    trials = _trials(folder)
    if trials is None:
        return None
    try:
        ids, newest, ended = set(), float("-inf"), 0
        for trial, meta in trials:
            ids.add(trial["trial_id"])
            ended += trial.get("status") == "TERMINATED"
            t = meta.get("last_result_time")
            if isinstance(t, (int, float)) and t == t and abs(t) != float("inf"):
                newest = max(newest, float(t))
        return ids, (newest, len(ids), ended)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def known_trial_ids(tune_dir: str | Path) -> set[str] | None:
    """The trial ids of the newest experiment state in ``tune_dir`` (a folder or a storage URI such as
    ``s3://...``): the trials a resume will know. None when there is none or it is unreadable."""
    if "://" not in str(tune_dir):
        snap = _snapshot(Path(tune_dir))
        return snap[0] if snap is not None else None
    import pyarrow.fs as pafs
    try:
        fs, base = pafs.FileSystem.from_uri(str(tune_dir))
        found = [f for f in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
                 if f.type == pafs.FileType.File and Path(f.base_name).match(PATTERNS[0])]
        if not found:
            return None
        newest = max(found, key=lambda f: (f.mtime_ns or 0, f.base_name))
        with fs.open_input_stream(newest.path) as stream:
            trials = _trial_data(stream.read())
        return {trial["trial_id"] for trial, _ in trials} if trials is not None else None
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _copy_atomic(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _copy_final_trial_logs(copy: Path, tune_dir: Path) -> None:
    """The logs (result.json, progress.csv, ...) of trials the snapshot has as TERMINATED, where the staging
    copy is longer: such a trial is not run again, so rows Tune had not uploaded yet would be lost."""
    for trial, _ in _trials(copy) or []:
        if trial.get("status") != "TERMINATED":
            continue
        source_dir, target_dir = copy / f"trial_{trial['trial_id']}", tune_dir / f"trial_{trial['trial_id']}"
        if not source_dir.is_dir():
            continue
        target_dir.mkdir(exist_ok=True)
        for source in source_dir.iterdir():
            target = target_dir / source.name
            if source.is_file() and (not target.exists() or source.stat().st_size > target.stat().st_size):
                _copy_atomic(source, target)


def _staging_copies(session_root: Path | None, experiment: str) -> list[tuple[Path, tuple[set[str], tuple]]]:
    """Intact staging snapshots of ``experiment`` in every Ray session under ``session_root``, freshest first."""
    if session_root is None or not session_root.is_dir():
        return []
    found = []
    for folder in session_root.glob(f"session_*/artifacts/*/{experiment}/driver_artifacts"):
        snap = _snapshot(folder) if folder.is_dir() and not damaged(folder) else None
        if snap is not None:
            found.append((folder, snap))
    return sorted(found, key=lambda item: item[1][1], reverse=True)


def repair(tune_dir: Path, experiment: str, session_root: Path | None) -> tuple[Path, str] | None:
    """Make ``tune_dir``'s state intact and current before a resume: returns (staging folder copied from,
    why) or None when the stored set is intact and no fresher snapshot exists.

    A snapshot is only taken when it is this sweep's: it knows every trial of the stored state (when that
    is readable) and some of the trial folders. It need not know them all: a trial started after the
    driver's last snapshot has a folder but is in no snapshot (the resume marks it lost)."""
    bad = damaged(tune_dir)
    stored = _snapshot(tune_dir)
    stored_ids = stored[0] if stored else set()
    folders = {p.name[len("trial_"):] for p in tune_dir.glob("trial_*") if p.is_dir()}
    for copy, (ids, fresh) in _staging_copies(session_root, experiment):
        if not (stored_ids or folders) or not stored_ids <= ids or (folders and not folders & ids):
            continue  # nothing tells which sweep it is, an older snapshot, or another sweep of the same name
        if not bad and stored is not None and fresh <= stored[1]:
            return None  # the freshest matching copy is not newer than what is stored
        for pattern in PATTERNS:  # the whole set, so the files agree with each other
            for stale in tune_dir.glob(pattern):
                stale.unlink()
            source = state_files(copy)[pattern]
            _copy_atomic(source, tune_dir / source.name)
        _copy_final_trial_logs(copy, tune_dir)
        return copy, ("was cut off when the driver died" if bad else "was older than the last one the driver saved")
    if not bad:
        return None
    names = ", ".join(f"{p.name} ({'missing' if not p.exists() else 'damaged'})" for p in bad)
    raise TuneStateDamaged(
        f"{tune_dir}: Tune's saved state is damaged ({names}), most likely the driver was killed while "
        "saving it, and no intact copy is left on this machine; the sweep cannot be resumed exactly. "
        "Its finished trials stay in that folder (losstune trials/export work); start the sweep again "
        "under a new --name to continue searching")
