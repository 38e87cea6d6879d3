"""The benchmarks are not part of the test run; this only checks that the cheapest ones still run.

``python -m benchmarks.loop_throughput --quick`` (a few tiny microstructure epochs, no Ray, no MLflow)
must write its JSON with the expected keys and finite numbers.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_loop_throughput_quick_writes_json(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.loop_throughput", "--quick", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "train-phase ratio" in proc.stdout

    data = json.loads((tmp_path / "loop_throughput.json").read_text())
    assert {"benchmark", "mode", "timestamp", "git_rev", "machine", "settings", "results", "goals", "table",
            "command", "duration_s"} <= set(data)
    assert data["benchmark"] == "loop_throughput" and data["mode"] == "quick"
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["torch"]

    res = data["results"]
    for key in ("train_phase_ratio", "epoch_ratio_incl_validation", "metrics_share", "eval_share"):
        assert _finite(res[key]) and res[key] > 0, (key, res[key])
    assert res["metrics_share"] < 1 and res["eval_share"] < 1
    for key in ("trainer_wall_s", "trainer_train_s", "trainer_eval_s", "trainer_metrics_s", "plain_train_s",
                "plain_val_s"):
        assert _finite(res["median"][key]) and res["median"][key] >= 0, key
    assert res["epochs_measured"] >= 1

    assert [g["goal"] for g in data["goals"]] == ["Trainer train phase ÷ plain loop",
                                                 "metric evaluation share of an epoch"]
    for g in data["goals"]:
        assert _finite(g["value"]) and _finite(g["limit"]) and g["met"] in (True, False)


def test_search_efficiency_lower_bound_counts_interleaved_epochs():
    from benchmarks.search_efficiency import epochs_to_reach, oracle_epochs

    histories = [[0.60, 0.61, 0.62], [0.60, 0.70, 0.80], [0.60, 0.65, 0.75]]
    # 0.75 is first reached at a trial's own epoch 3 (second and third trial): 2 full rounds of 4 before it
    assert oracle_epochs(histories, 0.75, in_flight=4) == 2 * 4 + 1
    assert oracle_epochs(histories, 0.70, in_flight=4) == 1 * 4 + 1   # second trial, own epoch 2
    assert oracle_epochs(histories, 0.60, in_flight=2) == 1
    assert oracle_epochs(histories, 0.90, in_flight=2) == math.inf
    assert epochs_to_reach([(1, 0.5), (2, 0.7), (3, 0.6)], 0.7) == 2.0


def test_overhead_startup_probe_measures_a_fresh_trial_process():
    from benchmarks.overhead import trial_process_startup_cpu

    cpu = trial_process_startup_cpu(repeats=1)
    # a new interpreter importing ray.tune and torch and building an optimiser cannot be free, nor take minutes
    assert _finite(cpu) and 0.2 < cpu < 120, cpu


def test_gpu_path_packs_trainer_processes_side_by_side():
    """``--packing processes`` on the CPU (tiny): two spawned trainers, timed together after the barrier."""
    from benchmarks.gpu_path import measure_packing_processes

    (row,) = measure_packing_processes("cpu", quick=True, dry=True, ks=(2,), amps=("off",))
    assert row["processes"] == 2 and row["epochs"] == 2 and row["amp"] == "off"
    # both trained their epochs in the timed window: 2 processes × 2 epochs × the task's training samples
    assert _finite(row["wall_s"]) and row["wall_s"] > 0
    assert row["median_epoch_s"] <= row["wall_s"]
    assert math.isclose(row["samples_per_s_wall"] * row["wall_s"] / (2 * 2), row["samples_per_s_epochs"]
                        * row["median_epoch_s"] / 2, rel_tol=1e-6)
    assert math.isnan(row["gain_wall"])  # no k = 1 row to compare with


@pytest.mark.parametrize("model", ["unet", "ddpm"])
def test_gpu_path_measures_amp_of_the_microscopy_models(model):
    """``--model unet / ddpm`` on the CPU (tiny): each precision trains and is timed; ``--set`` reaches the config."""
    from benchmarks.gpu_path import measure_amp, train_config

    config = train_config("cpu", "off", quick=True, dry=True, model=model, sets={"data.size": 24, "lr": 2e-4})
    assert (config["task"], config["model"]["name"], config["data"]["size"], config["lr"]) == (
        "microscopy", model, 24, 2e-4)
    rows = measure_amp("cpu", quick=True, dry=True, model=model, sets={"data.size": 24})
    assert [r["amp"] for r in rows] == ["off", "bf16", "fp16"]
    assert all(_finite(r["samples_per_s"]) and r["samples_per_s"] > 0 for r in rows)
    assert rows[0]["speedup_vs_fp32"] == 1.0


def test_blur_sensitivity_quick_writes_json(tmp_path):
    """The README's blur table comes from this benchmark: a code change that breaks it fails here."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.blur_sensitivity", "--quick", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((tmp_path / "blur_sensitivity.json").read_text())
    assert data["benchmark"] == "blur_sensitivity" and data["mode"] == "quick"
    res = data["results"]
    assert len(res["folder_images"]) >= 5  # scikit-image's bundled images written as 16-bit TIFF pairs
    for task in ("microstructure", "microscopy_synthetic", "microscopy_folder"):
        r = res[task]
        assert r["region"] == "active" and len(r["seed_objectives"]) == 3
        assert [b["sigma"] for b in r["blurred"]] == [0.5, 1.0, 2.0]
        assert all(_finite(b[k]) for b in r["blurred"] for k in ("composite", "drop", "ssim", "gradient_match"))
        # blurring by 2 px costs more than by 0.5 px even for barely trained models
        assert r["blurred"][-1]["drop"] > r["blurred"][0]["drop"]
    assert len(data["goals"]) == 6
