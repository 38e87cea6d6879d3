"""Issue 7, bad input: a table of malformed sweep inputs, each refused by ``losstune sweep`` with exit
code 2 and a message naming the field or file, before anything starts.

"Nothing started" is checked on disk for every case: no results folder (neither the one passed with
``--results-dir`` nor ``./results`` of the working directory), no MLflow store (the sqlite file is
never created) and no file a YAML tag could have executed. Data problems (missing folders, unpaired or
corrupt images, bad ``.npz`` files) are found by the driver's validation, which builds the task once
before Ray or MLflow is touched. No Ray is started in this file.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from losstune.search.cli import main
from losstune.search.config import SweepConfigError, load_sweep, validate_sweep

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]  # tests/: plugin_task, verify_tasks, conftest

TINY = {  # a valid, tiny microstructure sweep; every case breaks one thing in it
    "name": "badin",
    "train": {"task": "microstructure", "epochs": 2, "batch_size": 4, "device": "cpu", "amp": "off",
              "data": {"size": 16, "num_sequences": 4, "frames": 6, "seq_length": 2},
              "model": {"hidden_channels": [4, 8]}},
    "space": {"gradient_weight": {"type": "uniform", "low": 0.0, "high": 0.3},
              "lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}},
    "search": {"num_samples": 2, "max_concurrent": 1},
    "scheduler": {"type": "fifo"},
}
MICROSCOPY = {  # the same, on the microscopy task with paired folders (paths filled in per case)
    "name": "badfolders",
    "train": {"task": "microscopy", "epochs": 1, "batch_size": 4, "device": "cpu", "amp": "off",
              "data": {"size": 16, "crops_per_image": 1},
              "model": {"name": "unet", "base_channels": 4, "depth": 1}},
    "space": {"gradient_weight": {"type": "uniform", "low": 0.0, "high": 0.3}},
    "search": {"num_samples": 2},
    "scheduler": {"type": "fifo"},
}
SECRET = "pw-7f3a9c-never-echo"


def _set(cfg: dict, path: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    node = cfg
    parts = path.split("/")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return cfg


def _png(path: Path, size: int = 24, seed: int = 0) -> Path:
    from PIL import Image
    arr = (np.random.default_rng(seed).random((size, size)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _folders(root: Path, inputs: list[str], targets: list[str]) -> tuple[Path, Path]:
    wf, tp = root / "wf", root / "tp"
    wf.mkdir(parents=True)
    tp.mkdir(parents=True)
    for i, name in enumerate(inputs):
        _png(wf / name, seed=i)
    for i, name in enumerate(targets):
        _png(tp / name, seed=100 + i)
    return wf, tp


def _microscopy(wf: Path, tp: Path) -> dict:
    cfg = copy.deepcopy(MICROSCOPY)
    cfg["train"]["data"].update(input_dir=str(wf), target_dir=str(tp))
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----- the cases: each builds its input in `root` and returns (config file, extra CLI args, expected) ----
# `expected` are substrings the error message must contain (the field and/or the file).
def _yaml(root: Path, cfg) -> Path:
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _text(root: Path, text: str) -> Path:
    path = root / "sweep.yaml"
    path.write_text(text)
    return path


def case_yaml_syntax(root):
    path = _text(root, "name: broken\ntrain: {task: microstructure, epochs: [1, 2\n")
    return path, [], [str(path), "invalid YAML", "line"]


def case_yaml_tabs(root):
    path = _text(root, "name: tabs\ntrain:\n\ttask: microstructure\n")
    return path, [], [str(path), "invalid YAML"]


def case_python_tag(root):
    marker = root / "PWNED"
    path = _text(root, f"name: tag\ntrain: !!python/object/apply:os.system ['touch {marker}']\n")
    return path, [], [str(path), "invalid YAML", "python/object"]


def case_top_level_list(root):
    path = _text(root, "- name: x\n- train: {}\n")
    return path, [], [str(path), "expected a mapping"]


def case_empty_file(root):
    path = _text(root, "")
    return path, [], [str(path), "empty"]


def case_comment_only_file(root):
    path = _text(root, "# nothing but a comment\n")
    return path, [], [str(path), "empty"]


def case_missing_config(root):
    return root / "no_such_sweep.yaml", [], [str(root / "no_such_sweep.yaml"), "no such file"]


def case_config_is_a_folder(root):
    (root / "folder.yaml").mkdir()
    return root / "folder.yaml", [], [str(root / "folder.yaml"), "not a file"]


def case_unknown_top_key(root):
    return _yaml(root, _set(TINY, "trials", 5)), [], ["trials", "unknown key"]


def case_unknown_train_key(root):
    return _yaml(root, _set(TINY, "train/gradient_wieght", 0.1)), [], ["train.gradient_wieght"]


def case_unknown_data_key(root):
    return _yaml(root, _set(TINY, "train/data/sise", 16)), [], ["train.data.sise"]


def case_wrong_type(root):
    return _yaml(root, _set(TINY, "search/num_samples", "many")), [], ["search.num_samples"]


def case_wrong_type_train(root):
    return _yaml(root, _set(TINY, "train/batch_size", "eight")), [], ["train.batch_size"]


def case_low_above_high(root):
    cfg = _set(TINY, "space/gradient_weight", {"type": "uniform", "low": 0.5, "high": 0.1})
    return _yaml(root, cfg), [], ["space.gradient_weight", "low"]


def case_log_range_zero(root):
    cfg = _set(TINY, "space/lr", {"type": "loguniform", "low": 0.0, "high": 1e-2})
    return _yaml(root, cfg), [], ["space.lr.low"]


def case_log_range_negative(root):
    cfg = _set(TINY, "space/lr", {"type": "loguniform", "low": -1e-3, "high": 1e-2})
    return _yaml(root, cfg), [], ["space.lr.low"]


def case_unknown_task(root):
    return _yaml(root, _set(TINY, "train/task", "segmentation")), [], ["train.task", "segmentation"]


def case_plugin_module_missing(root):
    return _yaml(root, _set(TINY, "train/task", "no_such_pkg.tasks:build")), [], ["train.task", "no_such_pkg"]


def case_plugin_function_missing(root):
    return _yaml(root, _set(TINY, "train/task", "plugin_task:no_such_build")), [], ["train.task", "no_such_build"]


def case_unknown_augmentation(root):
    cfg = _set(_microscopy(*_folders(root, ["a.png", "b.png"], ["a.png", "b.png"])), "train/data/augment", "rotate")
    return _yaml(root, cfg), [], ["train.data.augment", "dihedral"]


def case_missing_data_folder(root):
    cfg = _microscopy(root / "nope_wf", root / "nope_tp")
    return _yaml(root, cfg), [], ["train.data.input_dir", str(root / "nope_wf"), "does not exist"]


def case_empty_data_folder(root):
    (root / "wf").mkdir()
    (root / "tp").mkdir()
    return _yaml(root, _microscopy(root / "wf", root / "tp")), [], ["train.data.input_dir", "no images"]


def case_unpaired_files(root):
    wf, tp = _folders(root, ["a.png", "b.png", "c.png"], ["a.png", "b.png", "d.png"])
    return _yaml(root, _microscopy(wf, tp)), [], ["input_dir", "target_dir", "c.png", "d.png"]


def case_corrupt_image(root):
    wf, tp = _folders(root, ["a.png", "b.png", "c.png"], ["a.png", "b.png", "c.png"])
    (tp / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not a png" * 10)
    return _yaml(root, _microscopy(wf, tp)), [], ["train", str(tp / "b.png"), "cannot read image"]


def case_image_shape_mismatch(root):
    wf, tp = _folders(root, ["a.png", "b.png", "c.png"], ["a.png", "b.png"])
    _png(tp / "c.png", size=32)
    return _yaml(root, _microscopy(wf, tp)), [], ["train", str(tp / "c.png"), "shape mismatch"]


def case_image_smaller_than_crop(root):
    wf, tp = _folders(root, ["a.png", "b.png"], ["a.png", "b.png"])
    cfg = _set(_microscopy(wf, tp), "train/data/size", 64)
    return _yaml(root, cfg), [], ["data.crop_size", str(wf), "smaller"]


def _npz(root: Path, **arrays) -> Path:
    path = root / "seq.npz"
    np.savez(path, **arrays)
    return path


def case_npz_wrong_shapes(root):
    path = _npz(root, micro=np.zeros((5, 32, 32), np.float32), temperature=np.zeros((5, 32, 32), np.float32))
    cfg = _set(TINY, "train/data", {"npz": str(path), "seq_length": 2})
    return _yaml(root, cfg), [], ["train.data.npz", str(path), "micro"]


def case_npz_missing_key(root):
    path = _npz(root, micro=np.zeros((2, 6, 16, 16, 3), np.float32))
    cfg = _set(TINY, "train/data", {"npz": str(path), "seq_length": 2})
    return _yaml(root, cfg), [], ["train.data.npz", str(path), "temperature"]


def case_npz_not_a_zip(root):
    path = root / "seq.npz"
    path.write_bytes(b"definitely not an npz archive")
    cfg = _set(TINY, "train/data", {"npz": str(path), "seq_length": 2})
    return _yaml(root, cfg), [], ["train.data.npz", str(path)]


def case_npz_missing_file(root):
    cfg = _set(TINY, "train/data", {"npz": str(root / "gone.npz"), "seq_length": 2})
    return _yaml(root, cfg), [], ["train.data.npz", str(root / "gone.npz")]


def case_zero_trials(root):
    return _yaml(root, _set(TINY, "search/num_samples", 0)), [], ["search.num_samples"]


def case_zero_trials_flag(root):
    return _yaml(root, TINY), ["--num-samples", "0"], ["--num-samples"]


def case_zero_epochs(root):
    return _yaml(root, _set(TINY, "train/epochs", 0)), [], ["train.epochs"]


def case_negative_cpu(root):
    return _yaml(root, _set(TINY, "resources/cpu", -1)), [], ["resources.cpu"]


def case_negative_gpu(root):
    return _yaml(root, _set(TINY, "resources/gpu", -0.5)), [], ["resources.gpu"]


def case_fractional_gpu_above_one(root):
    return _yaml(root, _set(TINY, "resources/gpu", 1.5)), [], ["resources.gpu"]


def case_no_resources(root):
    return _yaml(root, _set(TINY, "resources", {"cpu": 0, "gpu": 0})), [], ["resources", "cpu"]


def case_bad_name(root):
    return _yaml(root, _set(TINY, "name", "../escape")), [], ["name"]


def case_credentials_in_tracking_uri(root):
    cfg = _set(TINY, "mlflow", {"tracking_uri": f"http://alice:{SECRET}@127.0.0.1:5000"})
    return _yaml(root, cfg), ["--no-tracking-override"], ["mlflow.tracking_uri", "credentials"]


def case_credentials_in_tracking_flag(root):
    return _yaml(root, TINY), ["--tracking-uri", f"https://alice:{SECRET}@mlflow.example"], \
        ["mlflow.tracking_uri", "credentials"]


def case_file_tracking_store(root):
    return _yaml(root, TINY), ["--tracking-uri", f"file://{root / 'mlruns'}"], ["mlflow.tracking_uri", "file store"]


def case_unreachable_tracking_server(root):
    port = _free_port()
    return _yaml(root, TINY), ["--tracking-uri", f"http://127.0.0.1:{port}"], \
        [f"http://127.0.0.1:{port}", "unreachable"]


def case_results_dir_outside_cwd(root):
    cfg = _set(TINY, "results_dir", "../elsewhere")
    return _yaml(root, cfg), ["--no-results-override"], ["results_dir", "outside"]


def case_results_dir_absolute_elsewhere(root):
    cfg = _set(TINY, "results_dir", str(root / "abs_elsewhere"))
    return _yaml(root, cfg), ["--no-results-override"], ["results_dir", "outside"]


def case_grace_period_above_epochs(root):
    cfg = _set(TINY, "scheduler", {"type": "asha", "grace_period": 5})
    return _yaml(root, cfg), [], ["scheduler.grace_period"]


def case_point_outside_space(root):
    cfg = _set(TINY, "search/points_to_evaluate", [{"gradient_weight": 0.9}])
    return _yaml(root, cfg), [], ["search.points_to_evaluate[0].gradient_weight"]


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]
assert len(CASES) >= 20


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A clean working directory (``./results`` would land here) with no ambient MLflow/Ray settings."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def _cli_args(path: Path, extra: list[str], root: Path) -> list[str]:
    args = ["sweep", str(path)]
    extra = list(extra)
    if "--no-results-override" in extra:
        extra.remove("--no-results-override")
    else:
        args += ["--results-dir", str(root / "res")]
    if "--no-tracking-override" in extra:
        extra.remove("--no-tracking-override")
    elif "--tracking-uri" not in extra:
        args += ["--tracking-uri", f"sqlite:///{root / 'mlflow.db'}"]
    return args + extra


def _assert_nothing_left(root: Path) -> None:
    assert not (root / "res").exists(), "a results folder was created"
    assert not (root / "work" / "results").exists(), "./results was created"
    assert not (root / "elsewhere").exists() and not (root / "abs_elsewhere").exists()
    assert not (root / "mlflow.db").exists(), "an MLflow store was created"
    assert not (root / "work" / "mlruns").exists() and not (root / "mlruns").exists()
    assert not (root / "PWNED").exists() and not (root / "work" / "PWNED").exists(), "a YAML tag ran code"


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.removeprefix("case_") for c in CASES])
def test_bad_input_exits_2_names_the_problem_and_leaves_nothing(case, workdir, capsys):
    root = workdir.parent
    path, extra, expected = case(root)
    rc = main(_cli_args(path, extra, root))
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 2, (rc, captured.out, err)
    assert err.startswith("losstune: error: "), err
    for part in expected:
        assert part in err, (part, err)
    assert SECRET not in err + captured.out, "a password was echoed"
    assert "Traceback" not in err
    assert "train./" not in err, err  # a file path is not a train.<field>
    _assert_nothing_left(root)


@pytest.mark.parametrize("case", [case_python_tag, case_missing_config, case_corrupt_image],
                         ids=["python_tag", "missing_config", "corrupt_image"])
def test_bad_input_real_exit_status(case, tmp_path):
    """The installed console script (a real process) exits 2 too, with only the message on stderr."""
    (tmp_path / "work").mkdir()
    path, extra, expected = case(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO)])
    exe = Path(sys.executable).with_name("losstune")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "losstune.search.cli"]
    proc = subprocess.run(cmd + _cli_args(path, extra, tmp_path), capture_output=True, text=True,
                          cwd=tmp_path / "work", env=env, timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert all(part in proc.stderr for part in expected), proc.stderr
    assert "Traceback" not in proc.stderr
    _assert_nothing_left(tmp_path)


def test_the_api_raises_a_typed_error(tmp_path):
    """The same problems through the Python API: :class:`SweepConfigError` (a ``ValueError``)."""
    with pytest.raises(SweepConfigError, match=r"space\.lr\.low"):
        validate_sweep(_set(TINY, "space/lr", {"type": "loguniform", "low": 0, "high": 1}), source="x.yaml")
    path, _, _ = case_corrupt_image(tmp_path)
    with pytest.raises(SweepConfigError, match="cannot read image") as info:
        load_sweep(path)
    assert isinstance(info.value, ValueError) and str(path) in str(info.value)


def test_results_outside_the_working_directory_only_when_asked(workdir):
    """A config's results_dir may not leave the working directory unless asked for: ``--results-dir``
    (an explicit override) or ``allow_outside: true`` in the config."""
    root = workdir.parent
    outside = _set(TINY, "results_dir", "../elsewhere")
    with pytest.raises(SweepConfigError, match="results_dir"):
        validate_sweep(outside, source="x.yaml", deep=False)
    # asked for: the flag ...
    sweep = validate_sweep(outside, source="x.yaml", deep=False, overrides={"results_dir": str(root / "flag")})
    assert sweep.results_dir == root / "flag"
    # ... or the setting
    sweep = validate_sweep(_set(outside, "allow_outside", True), source="x.yaml", deep=False)
    assert sweep.results_dir == root / "elsewhere"
    # inside the working directory needs nothing
    assert validate_sweep(_set(TINY, "results_dir", "out/sweeps"), deep=False).results_dir == workdir / "out" / "sweeps"
    assert validate_sweep(TINY, deep=False).results_dir == workdir / "results"
    assert not (root / "elsewhere").exists() and not (root / "flag").exists()
