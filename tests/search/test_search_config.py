"""Sweep config validation, the search space (Optuna distributions, dotted paths, encoded choices) and
the CLI's input errors: everything here runs without Ray."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from losstune.search import space as sp
from losstune.search.cli import main
from losstune.search.config import SweepConfigError, load_sweep, resolve_tracking_uri, validate_sweep

REPO = Path(__file__).resolve().parents[2]

GOOD = {
    "name": "cfgtest",
    "train": {"task": "microstructure", "epochs": 2, "batch_size": 4, "device": "cpu",
              "data": {"size": 16, "num_sequences": 4, "frames": 6, "seq_length": 2},
              "model": {"hidden_channels": [4, 8]}},
    "space": {
        "gradient_weight": {"type": "uniform", "low": 0.0, "high": 0.3},
        "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "warmup_steps": {"type": "int", "low": 0, "high": 100, "step": 10},
        "model.hidden_channels": {"type": "choice", "values": [[4, 8], [8, 16]]},
        "pixel_loss": "l1",
    },
    "search": {"num_samples": 3, "points_to_evaluate": [{"gradient_weight": 0.0}]},
    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
}


def _with(path: str, value, base=GOOD) -> dict:
    cfg = copy.deepcopy(base)
    node = cfg
    parts = path.split("/")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    if value is _DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return cfg


_DELETE = object()

# (change "a/b/c" -> value, the dotted field the error must name)
BAD = [
    ("bogus", 1, "bogus"),
    ("search/foo", 1, "search.foo"),
    ("search/num_samples", "many", "search.num_samples"),
    ("search/num_samples", 0, "search.num_samples"),
    ("search/sampler", "cmaes", "search.sampler"),
    ("search/max_concurrent", 0, "search.max_concurrent"),
    ("space/gradient_weight", {"type": "uniform", "low": 0.3, "high": 0.3}, "space.gradient_weight.high"),
    ("space/gradient_weight", {"type": "uniform", "low": 0.5, "high": 0.1}, "space.gradient_weight.high"),
    ("space/lr", {"type": "loguniform", "low": 0.0, "high": 1e-2}, "space.lr.low"),
    ("space/lr", {"type": "loguniform", "low": -1e-3, "high": 1e-2}, "space.lr.low"),
    ("space/lr", {"type": "loguniform", "low": 1e-4}, "space.lr.high"),
    ("space/lr", {"type": "uniform", "low": "a", "high": 1}, "space.lr.low"),
    ("space/lr", {"type": "normal", "low": 0, "high": 1}, "space.lr.type"),
    ("space/lr", {"type": "uniform", "low": 0.1, "high": 0.2, "q": 1}, "space.lr.q"),
    ("space/warmup_steps", {"type": "int", "low": -10, "high": 10}, "space.warmup_steps"),
    ("space/warmup_steps", {"type": "int", "low": 0.5, "high": 10}, "space.warmup_steps.low"),
    ("space/not_a_field", {"type": "uniform", "low": 0, "high": 1}, "space.not_a_field"),
    ("space/lr.inner", 1.0, "space.lr.inner"),
    ("space/model", {"type": "choice", "values": [{}]}, "space.model"),
    ("space/epochs", {"type": "int", "low": 1, "high": 5}, "space.epochs"),
    ("space/task", "microscopy", "space.task"),
    ("space/model.hidden_channels", {"type": "choice", "values": []}, "space.model.hidden_channels.values"),
    ("space/pixel_loss", "huber", "space.pixel_loss"),
    ("space/gradient_mode", {"type": "choice", "values": ["match", "blur"]}, "space.gradient_mode"),
    ("train/batch_size", 0, "train.batch_size"),
    ("train/nope", 1, "train.nope"),
    ("train/task", "no_such_task", "train.task"),
    ("train/task", "no_such_module:build", "train.task"),
    ("train/data/size", 8, "train.data.size"),
    ("train/model/kernel_size", 2, "train.model.kernel_size"),
    ("train/model/name", "transformer", "train.model.name"),
    ("resources/cpu", -1, "resources.cpu"),
    ("resources/gpu", -0.5, "resources.gpu"),
    ("resources/gpu", 1.5, "resources.gpu"),
    ("resources/tpu", 1, "resources.tpu"),
    ("mlflow/tracking_uri", "http://alice:secret@mlflow.example:5000", "mlflow.tracking_uri"),
    ("mlflow/tracking_uri", "https://token@mlflow.example", "mlflow.tracking_uri"),
    ("mlflow/tracking_uri", "file:///tmp/mlruns", "mlflow.tracking_uri"),
    ("mlflow/tracking_uri", "./mlruns", "mlflow.tracking_uri"),
    ("mlflow/store_process", "sometimes", "mlflow.store_process"),
    ("scheduler", {"type": "hyperband"}, "scheduler"),
    ("scheduler/grace_period", 5, "scheduler.grace_period"),
    ("scheduler/reduction_factor", 1, "scheduler.reduction_factor"),
    ("scheduler/max_t", 3, "scheduler.max_t"),
    ("objective", {"type": "composite", "weights": {"ssim": 1, "lpips": 1}}, "objective.weights"),
    ("objective", {"type": "pareto", "metrics": {"ssim": "max"}}, "objective.metrics"),
    ("objective", {"type": "pareto", "metrics": {"ssim": "up", "mse": "min"}}, "objective.metrics.ssim"),
    ("search/points_to_evaluate", [{"gradient_weight": 0.9}], "search.points_to_evaluate[0].gradient_weight"),
    ("search/points_to_evaluate", [{"gradient_weight": 0.0}, {"perceptual_weight": 0.1}],
     "search.points_to_evaluate[1].perceptual_weight"),
    ("search/points_to_evaluate", [{"model.hidden_channels": [2, 2]}],
     "search.points_to_evaluate[0].model.hidden_channels"),
    ("name", "a/b", "name"),
    ("name", _DELETE, "name"),
    ("ray/address", 5, "ray.address"),
]


@pytest.mark.parametrize("change,value,field", BAD, ids=[f"{c}={v!r}"[:60] for c, v, _ in BAD])
def test_bad_config_names_file_and_field(change, value, field):
    with pytest.raises(SweepConfigError) as info:
        validate_sweep(_with(change, value), source="bad.yaml")
    msg = str(info.value)
    assert msg.startswith("bad.yaml: "), msg
    assert f" {field}" in msg or f"\n{field}" in msg, (field, msg)


@pytest.mark.parametrize("value", [True, False, "auto"])
def test_store_process_takes_yaml_booleans_and_auto(value):
    assert validate_sweep(_with("mlflow/store_process", value)).file.mlflow.store_process == value
    assert validate_sweep(GOOD).file.mlflow.store_process == "auto"


def test_good_config_resolves():
    sweep = validate_sweep(GOOD, source="good.yaml")
    assert list(sweep.params) == ["gradient_weight", "lr", "warmup_steps", "model.hidden_channels"]
    assert sweep.fixed == {"pixel_loss": "l1"}
    assert sweep.base_train["pixel_loss"] == "l1"  # fixed space values go into every trial
    # the point is completed: unnamed params take the base value when inside the space, else the midpoint
    assert sweep.points == [{"gradient_weight": 0.0, "lr": 1e-3, "warmup_steps": 0, "model.hidden_channels": [4, 8]}]
    assert sweep.metric_mode() == ("composite", "max")


@pytest.mark.parametrize("name", ["smoke", "quickstart", "microstructure", "microscopy"])
def test_shipped_configs_are_valid(name):
    sweep = load_sweep(REPO / "configs" / f"{name}.yaml", deep=False)
    assert sweep.name == name
    if name in ("quickstart", "microstructure"):
        # pure MSE as the reference, then the seed project's three scenarios as it wrote them, inside the space
        pts = [(p["gradient_weight"], p["perceptual_weight"]) for p in sweep.points]
        assert pts == [(0.0, 0.0), (0.2, 0.0), (0.1, 0.05), (0.5, 0.1)]
        assert sweep.params["gradient_weight"].high >= 0.5 and sweep.params["perceptual_weight"].high >= 0.1
    if name == "microscopy":
        pts = [(p["gradient_weight"], p["perceptual_weight"]) for p in sweep.points]
        assert pts == [(0.0, 0.0), (0.1, 0.05), (0.2, 0.1)]


def test_objective_region_reaches_the_trials_training_config():
    sweep = validate_sweep({**GOOD, "objective": {"type": "composite", "region": "full"}}, source="good.yaml")
    assert sweep.base_train["objective_region"] == "full"
    assert validate_sweep(GOOD, source="good.yaml").base_train["objective_region"] == "auto"
    with pytest.raises(SweepConfigError, match="objective.region"):
        validate_sweep({**GOOD, "objective": {"type": "composite", "region": "middle"}}, source="good.yaml")
    with pytest.raises(SweepConfigError, match="objective.region"):
        validate_sweep({**GOOD, "train": {**GOOD["train"], "objective_region": "active"},
                        "objective": {"type": "composite", "region": "full"}}, source="good.yaml")


def test_a_small_validation_set_is_a_sweep_warning():
    small = load_sweep(REPO / "configs" / "smoke.yaml")  # 4 validation windows
    assert len(small.warnings) == 1 and "validation set has only 4 samples" in small.warnings[0]
    assert load_sweep(REPO / "configs" / "smoke.yaml", deep=False).warnings == []
    big = _with("train/data", {"size": 16, "num_sequences": 8, "frames": 8, "seq_length": 2})  # 2 × 6 windows
    assert validate_sweep(big, source="good.yaml").warnings == []


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: x\nspace: {lr: [1, 2\n")
    with pytest.raises(SweepConfigError, match=r"broken\.yaml: invalid YAML \(line"):
        load_sweep(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(SweepConfigError, match="broken.yaml: expected a mapping"):
        load_sweep(bad)
    with pytest.raises(SweepConfigError, match="missing.yaml: no such file"):
        load_sweep(tmp_path / "missing.yaml")


def test_cli_overrides_are_validated():
    with pytest.raises(SweepConfigError, match="search.num_samples"):
        validate_sweep(GOOD, source="x.yaml", overrides={"num_samples": 0})
    with pytest.raises(SweepConfigError, match="mlflow.tracking_uri"):
        validate_sweep(GOOD, source="x.yaml", overrides={"tracking_uri": "http://u:p@h"})
    sweep = validate_sweep(GOOD, source="x.yaml", overrides={"name": "other", "num_samples": 7})
    assert sweep.name == "other" and sweep.search.num_samples == 7


# ----- the space ------------------------------------------------------------------------------
def test_space_to_optuna_distributions():
    params, fixed = sp.parse_space(GOOD["space"])
    dists = sp.distributions(params)
    D = optuna.distributions
    assert dists["gradient_weight"] == D.FloatDistribution(0.0, 0.3)
    assert dists["lr"] == D.FloatDistribution(1e-4, 1e-2, log=True)
    assert dists["warmup_steps"] == D.IntDistribution(0, 100, step=10)
    assert dists["model.hidden_channels"] == D.CategoricalDistribution(["0:[4, 8]", "1:[8, 16]"])
    assert fixed == {"pixel_loss": "l1"}
    # primitive choices stay as they are
    prim, _ = sp.parse_space({"gradient_mode": {"type": "choice", "values": ["match", "sharpen"]}})
    assert sp.distributions(prim)["gradient_mode"] == D.CategoricalDistribution(["match", "sharpen"])
    assert sp.describe(params)["lr"] == "loguniform[0.0001, 0.01]"


def test_dotted_paths_apply_without_touching_the_base():
    base = {"lr": 1e-3, "model": {"hidden_channels": [4, 8], "kernel_size": 3}, "data": {"size": 16}}
    out = sp.apply_values(base, {"model.hidden_channels": [8, 16], "data.extra.deep": 1, "lr": 2e-3})
    assert out == {"lr": 2e-3, "model": {"hidden_channels": [8, 16], "kernel_size": 3},
                   "data": {"size": 16, "extra": {"deep": 1}}}
    assert base["model"]["hidden_channels"] == [4, 8] and "extra" not in base["data"]
    assert sp.get_path(out, "data.extra.deep") == 1 and sp.get_path(out, "model.missing", "d") == "d"


def test_choice_of_lists_round_trips_through_optuna():
    values = [[4, 8], [8, 16], {"a": [1, 2]}, None, "mse", 3]
    params, _ = sp.parse_space({"model.hidden_channels": {"type": "choice", "values": values}})
    spec = params["model.hidden_channels"]
    assert spec.encoded
    for v in values:
        label = spec.encode(v)
        assert isinstance(label, str)
        assert spec.decode(label) == v
    # a real study: enqueued (encoded) points come back first, sampled labels decode to real values
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(sp.encode_point(params, {"model.hidden_channels": [8, 16]}))
    dists = sp.distributions(params)
    seen = []
    for _ in range(12):
        trial = study.ask(fixed_distributions=dists)
        decoded = sp.decode(params, trial.params)["model.hidden_channels"]
        assert decoded in values
        seen.append(decoded)
        study.tell(trial, 0.0)
    assert seen[0] == [8, 16]
    base = validate_sweep(GOOD, deep=False).base_train
    config = sp.trial_config(base, params, {"model.hidden_channels": spec.encode([8, 16])})
    assert config["model"]["hidden_channels"] == [8, 16]
    with pytest.raises(ValueError):
        spec.encode([1, 2, 3])


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    assert resolve_tracking_uri("sqlite:///x/m.db") == f"sqlite:///{tmp_path / 'x' / 'm.db'}"
    assert resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5999"
    with pytest.raises(ValueError, match="credentials"):
        resolve_tracking_uri("http://u:p@127.0.0.1:5999")


# ----- the CLI: bad input exits 2 and starts nothing ------------------------------------------
def _write(tmp_path: Path, cfg: dict, name="cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _nothing_started(tmp_path: Path) -> None:
    assert not (tmp_path / "res").exists(), "a results folder was created"
    assert not (tmp_path / "mlflow.db").exists(), "an MLflow store was created"


@pytest.mark.parametrize("change,value,field", [
    ("space/lr", {"type": "loguniform", "low": 0, "high": 1}, "space.lr.low"),
    ("train/task", "no_such_task", "train.task"),
    ("search/sampler", "grid", "search.sampler"),
])
def test_cli_sweep_bad_config_exits_2(tmp_path, capsys, clean_env, change, value, field):
    path = _write(tmp_path, _with(change, value))
    rc = main(["sweep", str(path), "--results-dir", str(tmp_path / "res"),
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(path) in err and field in err, err
    _nothing_started(tmp_path)


def test_cli_sweep_bad_config_exits_2_subprocess(tmp_path):
    path = _write(tmp_path, _with("resources/gpu", 2.5))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    exe = Path(sys.executable).with_name("losstune")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "losstune.search.cli"]
    proc = subprocess.run(cmd + ["sweep", str(path), "--results-dir", str(tmp_path / "res"),
                                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "resources.gpu" in proc.stderr and str(path) in proc.stderr
    _nothing_started(tmp_path)
    assert not (tmp_path / "results").exists()


def test_cli_refuses_to_clobber_and_to_resume_nothing(tmp_path, capsys, clean_env):
    path = _write(tmp_path, GOOD)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    existing = tmp_path / "res" / "cfgtest"
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("precious")
    # a --name the user chose is never reused: both ways on are named
    rc = main(["sweep", str(path), "--results-dir", str(tmp_path / "res"), "--tracking-uri", uri,
               "--name", "cfgtest"])
    err = capsys.readouterr().err
    assert rc == 2 and "already exists" in err and f"--resume {existing}" in err and "--name cfgtest-2" in err, err
    assert (existing / "keep.txt").read_text() == "precious"
    # the config's own name: the sweep would run as cfgtest-2
    rc = main(["sweep", str(path), "--results-dir", str(tmp_path / "res"), "--tracking-uri", uri, "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "this sweep is 'cfgtest-2'" in out and f"results: {existing}-2" in out, out
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["cfgtest"]
    rc = main(["sweep", str(path), "--results-dir", str(tmp_path / "res"), "--tracking-uri", uri,
               "--name", "never_ran", "--resume"])
    assert rc == 2 and "nothing to resume" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def test_cli_unreachable_tracking_server_exits_2(tmp_path, capsys, clean_env):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = _write(tmp_path, GOOD)
    rc = main(["sweep", str(path), "--results-dir", str(tmp_path / "res"),
               "--tracking-uri", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"MLflow tracking server at http://127.0.0.1:{port} is unreachable" in err, err
    assert not (tmp_path / "res" / "cfgtest").exists()


def test_cli_unreachable_ray_address_exits_2(tmp_path, capsys, clean_env):
    # (whether or not another test's Ray already runs in this process: the address is checked first)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = _write(tmp_path, GOOD)
    rc = main(["sweep", str(path), "--results-dir", str(tmp_path / "res"),
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--address", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"127.0.0.1:{port}" in err, err
    _nothing_started(tmp_path)


def test_cli_other_commands_bad_paths_exit_2(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope")]) == 2
    assert main(["trials", str(tmp_path)]) == 2  # a folder that is not a sweep
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    bad_train = tmp_path / "t.yaml"
    bad_train.write_text("task: microstructure\nbatch_size: -1\n")
    assert main(["train", str(bad_train)]) == 2
    err = capsys.readouterr().err
    assert "batch_size" in err and "not a losstune sweep" in err


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("sweep", "export", "train", "trials"):
        assert command in out
    assert main(["--version"]) == 0
    from importlib.metadata import version
    assert capsys.readouterr().out.strip() == f"losstune {version('losstune')}"
    assert main(["sweep", "--help"]) == 0
    assert "--resume" in capsys.readouterr().out
    assert main([]) == 2
    assert main(["nonsense"]) == 2
