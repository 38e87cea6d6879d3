"""Tune's saved experiment state, checked (and repaired) before ``--resume`` hands it to ``Tuner.restore``.

Tune writes its state (``experiment_state-*.json``, the searcher's and search generator's pickles, the
callbacks' pickle) into a staging folder on the driver, ``<ray temp>/session_*/artifacts/*/<name>/driver_artifacts``,
each file atomically, then copies that folder to the sweep's storage in a background thread, file by
file. A driver killed during that copy leaves an empty or cut-off file in storage, and ``Tuner.restore``
then does not fail: with an unreadable searcher it waits for trials forever.

So before a resume: when a stored file is damaged, the newest complete set in a staging folder of this
machine (the killed driver's Ray session folder is still there) replaces the stored set as a whole, so
the files stay consistent with each other; without one, :class:`TuneStateDamaged` names the file.
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


def _staging_copies(session_root: Path, experiment: str) -> list[Path]:
    """Staging folders of this experiment in every Ray session under ``session_root``, newest first."""
    folders = [p for p in session_root.glob(f"session_*/artifacts/*/{experiment}/driver_artifacts") if p.is_dir()]

    def saved_at(folder: Path) -> float:
        files = state_files(folder)
        return max((p.stat().st_mtime for p in files.values()), default=0.0)

    return sorted(folders, key=saved_at, reverse=True)


def repair(tune_dir: Path, experiment: str, session_root: Path | None) -> Path | None:
    """Make ``tune_dir``'s state intact before a resume; returns the staging folder copied from, or None
    when nothing was damaged. Only a copy whose trials all have folders in ``tune_dir`` is used."""
    bad = damaged(tune_dir)
    if not bad:
        return None
    trial_dirs = {p.name for p in tune_dir.glob("trial_*") if p.is_dir()}
    for copy in _staging_copies(session_root, experiment) if session_root and session_root.is_dir() else []:
        if damaged(copy) or not {p.name for p in copy.glob("trial_*")} <= trial_dirs:
            continue
        for pattern in PATTERNS:  # the whole set, so the files agree with each other
            for stale in tune_dir.glob(pattern):
                stale.unlink()
            source = state_files(copy)[pattern]
            tmp = tune_dir / f".{source.name}.tmp"
            shutil.copyfile(source, tmp)
            os.replace(tmp, tune_dir / source.name)
        return copy
    names = ", ".join(f"{p.name} ({'missing' if not p.exists() else 'damaged'})" for p in bad)
    raise TuneStateDamaged(
        f"{tune_dir}: Tune's saved state is damaged ({names}), most likely the driver was killed while "
        "saving it, and no intact copy is left on this machine; the sweep cannot be resumed exactly. "
        "Its finished trials stay in that folder (losstune trials/export work); start the sweep again "
        "under a new --name to continue searching")
