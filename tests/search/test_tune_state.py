"""search/tune_state.py: a Tune state cut off or left stale in storage is replaced by the driver's last
intact staging snapshot.

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

from losstune.search.tune_state import PATTERNS, TuneStateDamaged, damaged, repair

STAMP = "2026-11-25_09-20-43"


def _write_state(folder: Path, trials: list[str], marker: str, last_result: float = 100.0) -> None:
    """Tune's four state files (experiment state as Tune writes it: [trial json, run metadata json] per trial)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = [[json.dumps({"trial_id": t, "status": "RUNNING"}), json.dumps({"last_result_time": last_result})]
            for t in trials]
    (folder / f"experiment_state-{STAMP}.json").write_text(json.dumps({"trial_data": data, "marker": marker}))
    for name in (f"search_gen_state-{STAMP}.json", f"searcher-state-{STAMP}.pkl", f"callback-states-{STAMP}.pkl"):
        (folder / name).write_bytes(pickle.dumps({"file": name, "marker": marker, "pad": list(range(200))}))
    for trial in trials:
        (folder / f"trial_{trial}").mkdir(exist_ok=True)


def _marker(folder: Path) -> str:
    return json.loads((folder / f"experiment_state-{STAMP}.json").read_text())["marker"]


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
    _write_state(old, ["a", "b"], "older", last_result=50.0)
    newest = _staging(root, "2", "sw")
    _write_state(newest, ["a", "b"], "killed driver")
    past = time.time() - 100
    for p in old.iterdir():
        os.utime(p, (past, past))
    broken = _staging(root, "3", "sw")  # the resumed session's download of the cut-off state: skipped
    _write_state(broken, ["a", "b"], "download")
    (broken / f"searcher-state-{STAMP}.pkl").write_bytes(b"")

    assert repair(tune_dir, "sw", root) == (newest, "was cut off when the driver died")
    assert damaged(tune_dir) == []
    for pattern in PATTERNS:  # the whole set comes from one snapshot
        (stored,) = tune_dir.glob(pattern)
        assert stored.read_bytes() == next(newest.glob(pattern)).read_bytes()
    assert _marker(tune_dir) == "killed driver"
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


def test_a_stored_snapshot_older_than_the_drivers_last_is_replaced(tmp_path):
    """The driver died before Tune uploaded its last snapshot: storage is intact but stale (it misses trial c,
    and may point at a checkpoint already deleted). The staging snapshot knows every stored trial: taken."""
    tune_dir = tmp_path / "res" / "sw"
    _write_state(tune_dir, ["a", "b"], "stored", last_result=100.0)
    root = tmp_path / "ray"
    last = _staging(root, "1", "sw")
    _write_state(last, ["a", "b", "c"], "last snapshot", last_result=105.0)
    # trial a ended after the stored snapshot; its last result row had not been uploaded either
    state = last / f"experiment_state-{STAMP}.json"
    doc = json.loads(state.read_text())
    doc["trial_data"][0][0] = json.dumps({"trial_id": "a", "status": "TERMINATED"})
    state.write_text(json.dumps(doc))
    (last / "trial_a" / "result.json").write_text('{"training_iteration": 1}\n{"training_iteration": 2}\n')
    (tune_dir / "trial_a" / "result.json").write_text('{"training_iteration": 1}\n')
    (last / "trial_b" / "result.json").write_text('{"training_iteration": 1}\n{"training_iteration": 2}\n')
    (tune_dir / "trial_b" / "result.json").write_text('{"training_iteration": 1}\n')
    assert repair(tune_dir, "sw", root) == (last, "was older than the last one the driver saved")
    assert _marker(tune_dir) == "last snapshot"
    assert (tune_dir / "trial_a" / "result.json").read_text().count("\n") == 2  # ended: its rows completed
    assert (tune_dir / "trial_b" / "result.json").read_text().count("\n") == 1  # still running: it reports again


@pytest.mark.parametrize("case", ["same", "older", "other sweep"])
def test_an_up_to_date_stored_snapshot_is_kept(tmp_path, case):
    tune_dir = tmp_path / "res" / "sw"
    _write_state(tune_dir, ["a", "b"], "stored", last_result=100.0)
    root = tmp_path / "ray"
    trials, t = {"same": (["a", "b"], 100.0), "older": (["a"], 90.0), "other sweep": (["x", "y", "z"], 500.0)}[case]
    _write_state(_staging(root, "1", "sw"), trials, case, last_result=t)
    assert repair(tune_dir, "sw", root) is None
    assert _marker(tune_dir) == "stored"


@pytest.mark.parametrize("stored_state", ["cut off", "older"])
def test_a_trial_started_after_the_drivers_last_snapshot_does_not_block_the_repair(tmp_path, stored_state):
    """The driver died just after starting trial c: c's folder is in storage, but no snapshot knows c (the
    resume marks it lost). The driver's last snapshot is still this sweep's and must be taken."""
    tune_dir = tmp_path / "res" / "sw"
    _write_state(tune_dir, ["a", "b"], "stored", last_result=100.0)
    (tune_dir / "trial_c").mkdir()
    if stored_state == "cut off":
        (tune_dir / f"searcher-state-{STAMP}.pkl").write_bytes(b"")
    root = tmp_path / "ray"
    last = _staging(root, "1", "sw")
    _write_state(last, ["a", "b"], "killed driver", last_result=105.0)
    why = ("was cut off when the driver died" if stored_state == "cut off"
           else "was older than the last one the driver saved")
    assert repair(tune_dir, "sw", root) == (last, why)
    assert _marker(tune_dir) == "killed driver" and damaged(tune_dir) == []


def test_an_unreadable_experiment_state_is_repaired_from_a_copy_that_knows_the_trial_folders(tmp_path):
    tune_dir = tmp_path / "res" / "sw"
    _write_state(tune_dir, ["a", "b", "c"], "stored")
    (tune_dir / f"experiment_state-{STAMP}.json").write_text('{"trial_data": [')
    root = tmp_path / "ray"
    _write_state(_staging(root, "1", "sw"), ["x", "y"], "other sweep", last_result=900.0)
    mine = _staging(root, "2", "sw")
    _write_state(mine, ["a", "b"], "killed driver")
    assert repair(tune_dir, "sw", root) == (mine, "was cut off when the driver died")
    assert _marker(tune_dir) == "killed driver"
