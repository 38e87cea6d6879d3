"""The loss-term registry (trainables/terms.py): built-in and plug-in tasks declare their terms, a plug-in's
own weight is a valid, searchable config key, and the matched baseline zeroes the shaping weights.

The end-to-end test runs a real sweep (local Ray, Optuna, MLflow on sqlite) of the plug-in task
``plugin_task:build_with_edges``, whose ``edge`` term losstune does not know.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from losstune.search.cli import main
from losstune.search.config import SweepConfigError, validate_sweep
from losstune.search.report import is_mse_only
from losstune.trainables import terms
from losstune.trainables.config import ConfigError, TrainConfig, parse_train_config
from losstune.trainables.terms import (BUILTIN_TERMS, LossTerm, declare_terms, loss_terms, matched_baseline,
                                       shaping_weight_names)

TESTS = Path(__file__).resolve().parents[1]  # tests/: plugin_task, verify_tasks, conftest
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

PLUGIN = "plugin_task:build_with_edges"
TINY_TRAIN = {"task": PLUGIN, "epochs": 2, "batch_size": 12, "device": "cpu", "amp": "off", "data": {"size": 16}}


def test_builtin_tasks_declare_their_terms():
    assert [t.weight_key for t in loss_terms("microstructure")] == ["pixel_weight", "gradient_weight",
                                                                     "perceptual_weight"]
    assert {t.name: t.warmup for t in loss_terms("microstructure")} == {
        "pixel": False, "gradient": True, "perceptual": True}
    assert {t.name: t.warmup for t in loss_terms("microscopy")}["intensity"] is True
    # every built-in weight is a TrainConfig field whose default is the term's
    for term in BUILTIN_TERMS:
        assert TrainConfig.model_fields[term.weight_key].default == term.default_weight


def test_shaping_weights_follow_the_task_and_model():
    assert shaping_weight_names({}) == ["gradient_weight", "perceptual_weight"]  # TrainConfig's default task
    unet = shaping_weight_names({"task": "microscopy", "model": {"name": "unet"}})
    ddpm = shaping_weight_names({"task": "microscopy", "model": "ddpm"})
    assert sorted(unet) == sorted(ddpm) == ["gradient_weight", "intensity_weight", "perceptual_weight"]
    assert shaping_weight_names({"task": PLUGIN}) == ["edge_weight"]
    with pytest.raises(ConfigError, match="task"):
        shaping_weight_names({"task": "segmentation"})


def test_matched_baseline_zeroes_only_shaping_weights():
    config = parse_train_config({**TINY_TRAIN, "edge_weight": 0.4, "pixel_weight": 0.7, "lr": 0.01}).model_dump()
    baseline = matched_baseline(config)
    assert baseline["edge_weight"] == 0.0
    assert {k: v for k, v in baseline.items() if k != "edge_weight"} == {
        k: v for k, v in config.items() if k != "edge_weight"}
    assert config["edge_weight"] == 0.4  # a copy
    micro = matched_baseline({"task": "microstructure", "gradient_weight": 0.2, "perceptual_weight": 0.1})
    assert (micro["gradient_weight"], micro["perceptual_weight"]) == (0.0, 0.0)


def test_plugin_weight_is_a_config_key_of_that_task_only():
    config = parse_train_config({**TINY_TRAIN, "edge_weight": 0.25})
    assert config.edge_weight == 0.25 and config.model_dump()["edge_weight"] == 0.25
    assert parse_train_config(TINY_TRAIN).edge_weight == 0.0  # the declared default
    with pytest.raises(ConfigError, match=r"^train\.edge_weight: must be a finite number >= 0"):
        parse_train_config({**TINY_TRAIN, "edge_weight": -1}, prefix="train.")
    with pytest.raises(ConfigError, match=r"^train\.edge_wieght: unknown key"):
        parse_train_config({**TINY_TRAIN, "edge_wieght": 0.1}, prefix="train.")
    with pytest.raises(ConfigError, match=r"^edge_weight: unknown key"):  # not a weight of microstructure
        parse_train_config({"task": "microstructure", "edge_weight": 0.1})


def test_plugin_task_trains_with_its_own_term():
    from losstune.trainables.loop import train

    result = train({**TINY_TRAIN, "epochs": 1, "edge_weight": 0.5, "warmup_steps": 2})
    assert result.history[-1]["loss_edge"] > 0


def test_task_weight_names_is_deprecated_the_registry_is_the_one_place():
    import dataclasses

    from losstune.trainables.config import parse_train_config
    from losstune.trainables.registry import get_task_factory

    task = get_task_factory("microstructure")(parse_train_config({"task": "microstructure", "data": {"size": 16,
                                                                  "num_sequences": 4}, "model": {"hidden_channels": [4]}}))
    assert task.weight_names == ()  # built-in tasks declare their terms only on their factory
    with pytest.warns(DeprecationWarning, match="declare_terms"):
        dataclasses.replace(task, weight_names=("pixel_weight",))


def test_weighted_loss_reads_declared_weights_and_warmup():
    import plugin_task

    config = parse_train_config({**TINY_TRAIN, "edge_weight": 0.5, "warmup_steps": 2})
    functions = {"pixel": lambda **_: None, "edge": lambda **_: None}
    loss = terms.weighted_loss(plugin_task.build_with_edges.loss_terms, functions, config)
    assert loss.weights == {"pixel": 1.0, "edge": 0.5} and loss.warmup == {"edge": 2}
    with pytest.raises(ValueError, match="no declared term"):
        terms.weighted_loss(plugin_task.build_with_edges.loss_terms, {"blur": lambda **_: None}, config)


def test_declare_terms_refuses_duplicates_and_a_changed_builtin_default():
    with pytest.raises(ValueError, match="distinct"):
        declare_terms(LossTerm("edge"), LossTerm("edge"))
    with pytest.raises(ValueError, match="pixel_weight"):
        declare_terms(LossTerm("pixel", 0.5, shaping=False))
    with pytest.raises(ValueError, match="identifier"):
        LossTerm("edge weight")


def test_report_mse_only_reads_the_registry():
    assert is_mse_only({"task": PLUGIN, "edge_weight": 0.0, "gradient_weight": 0.3})  # gradient unused there
    assert not is_mse_only({"task": PLUGIN, "edge_weight": 0.1})


def _sweep_config(name: str, **space) -> dict:
    return {"name": name, "train": dict(TINY_TRAIN), "space": space,
            "search": {"sampler": "tpe", "seed": 0, "num_samples": 2, "max_concurrent": 2},
            "scheduler": {"type": "fifo"}, "mlflow": {"experiment": f"losstune-{name}"}, "results_dir": "results"}


def test_sweep_config_validates_plugin_weights():
    sweep = validate_sweep(_sweep_config("v", edge_weight={"type": "uniform", "low": 0.0, "high": 0.5}),
                           check_paths=False)
    assert list(sweep.params) == ["edge_weight"] and sweep.base_train["edge_weight"] == 0.0
    with pytest.raises(SweepConfigError, match=r"space\.edgy_weight: 'edgy_weight' is not a training config"):
        validate_sweep(_sweep_config("v", edgy_weight={"type": "uniform", "low": 0.0, "high": 0.5}),
                       check_paths=False)
    with pytest.raises(SweepConfigError, match=r"space\.edge_weight: value -0\.5 gives an invalid"):
        validate_sweep(_sweep_config("v", edge_weight={"type": "uniform", "low": -0.5, "high": 0.5}),
                       check_paths=False)


def test_unknown_plugin_weight_exits_2(tmp_path, capsys, clean_env):
    cfg = _sweep_config("bad")
    cfg["train"]["edgy_weight"] = 0.1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc = main(["sweep", str(path), "--results-dir", str(tmp_path / "res"),
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "train.edgy_weight: unknown key" in err, err
    assert not (tmp_path / "res").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_plugin_weight_is_searched_logged_exported_and_zeroed(tmp_path, ray_local, clean_env, capsys, mlflow_runs):
    cfg = _sweep_config("edges", edge_weight={"type": "uniform", "low": 0.05, "high": 0.5})
    cfg["train"]["epochs"] = 1
    path = tmp_path / "edges.yaml"
    path.write_text(yaml.safe_dump(cfg))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(["sweep", str(path), "--results-dir", str(tmp_path / "res"), "--tracking-uri", uri])
    out = capsys.readouterr().out
    assert rc == 0, out

    runs = mlflow_runs(uri, "losstune-edges")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(children) == 2
    searched = {float(child.data.params["edge_weight"]) for child in children}
    assert len(searched) == 2 and all(0.05 <= w <= 0.5 for w in searched)
    for child in children:  # the term was computed in training
        assert child.data.metrics["loss_edge"] > 0

    best = yaml.safe_load((tmp_path / "res" / "edges" / "best.yaml").read_text())
    assert best["task"] == PLUGIN and best["edge_weight"] in searched
    assert best["provenance"]["params"]["edge_weight"] == best["edge_weight"]
    baseline = matched_baseline({k: v for k, v in best.items() if k != "provenance"})
    assert baseline["edge_weight"] == 0.0 and baseline["pixel_weight"] == best["pixel_weight"]
    parse_train_config(baseline)  # a valid training config of the same task
