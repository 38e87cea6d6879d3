"""search/tune_state.py: a Tune state cut off in storage is replaced by the driver's intact staging copy.

Plain files in tmp folders laid out as Tune lays them out (the end-to-end case, a driver SIGKILLed while
Tune copies its state, is in test_reliability.py).
"""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import pytest

from search.tune_state import PATTERNS, TuneStateDamaged, damaged, repair

STAMP = "2026-11-25_09-20-43"


def _write_state(folder: Path, trials: list[str], marker: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"experiment_state-{STAMP}.json").write_text(json.dumps({"trial_data": trials, "marker": marker}))
    for name in (f"search_gen_state-{STAMP}.json", f"searcher-state-{STAMP}.pkl", f"callback-states-{STAMP}.pkl"):
        (folder / name).write_bytes(pickle.dumps({"file": name, "marker": marker, "pad": list(range(200))}))
    for trial in trials:
        (folder / f"trial_{trial}").mkdir(exist_ok=True)


def _staging(root: Path, session: str, name: str) -> Path:
    return root / f"session_{session}" / "artifacts" / STAMP / name / "driver_artifacts"


def test_intact_state_is_left_alone(tmp_path):
    tune_dir = tmp_path / "res" / "sw"
    _write_state(tune_dir, ["a", "b"], "stored")
    before = {p.name: p.read_bytes() for p in tune_dir.iterdir() if p.is_file()}
    assert damaged(tune_dir) == []
    assert repair(tune_dir, "sw", tmp_path / "ray") is None
    assert {p.name: p.read_bytes() for p in tune_dir.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("cut", ["empty", "half"])
def test_cut_off_searcher_state_is_replaced_by_the_newest_intact_staging_set(tmp_path, cut):
    tune_dir = tmp_path / "res" / "sw"
    _write_state(tune_dir, ["a", "b"], "stored")
    searcher = tune_dir / f"searcher-state-{STAMP}.pkl"
    data = searcher.read_bytes()
    searcher.write_bytes(b"" if cut == "empty" else data[: len(data) // 2])
    assert damaged(tune_dir) == [searcher]

    root = tmp_path / "ray"
    old = _staging(root, "1", "sw")
    _write_state(old, ["a"], "older")
    newest = _staging(root, "2", "sw")
    _write_state(newest, ["a", "b"], "killed driver")
    past = time.time() - 100
    for p in old.iterdir():
        os.utime(p, (past, past))
    broken = _staging(root, "3", "sw")  # the resumed session's download of the cut-off state: skipped
    _write_state(broken, ["a", "b"], "download")
    (broken / f"searcher-state-{STAMP}.pkl").write_bytes(b"")

    assert repair(tune_dir, "sw", root) == newest
    assert damaged(tune_dir) == []
    for pattern in PATTERNS:  # the whole set comes from one snapshot
        (stored,) = tune_dir.glob(pattern)
        assert stored.read_bytes() == next(newest.glob(pattern)).read_bytes()
    assert json.loads((tune_dir / f"experiment_state-{STAMP}.json").read_text())["marker"] == "killed driver"
    assert not list(tune_dir.glob(".*.tmp"))


def test_no_intact_copy_is_a_clear_error(tmp_path):
    tune_dir = tmp_path / "res" / "sw"
    _write_state(tune_dir, ["a", "b"], "stored")
    (tune_dir / f"experiment_state-{STAMP}.json").write_text('{"trial_data": [')
    root = tmp_path / "ray"
    other = _staging(root, "1", "sw")  # same name, but another sweep's trials: never mixed in
    _write_state(other, ["x", "y"], "other sweep")
    with pytest.raises(TuneStateDamaged, match=rf"experiment_state-{STAMP}.json \(damaged\)"):
        repair(tune_dir, "sw", root)
    with pytest.raises(TuneStateDamaged, match="cannot be resumed exactly"):
        repair(tune_dir, "sw", None)
    assert (tune_dir / f"experiment_state-{STAMP}.json").read_text() == '{"trial_data": ['  # untouched
