"""The training loop on real tasks: improvement, plug-ins, resume, divergence, sharpness."""

import math
import time

import pytest
import torch

from losstune.trainables.config import ConfigError
from losstune.trainables.loop import DIVERGED_SCORE, Trainer, train
from tiny import TINY


@pytest.mark.parametrize("name", sorted(TINY))
def test_builtin_task_trains_and_improves(name):
    start = time.perf_counter()
    trainer = Trainer({**TINY[name], "epochs": 2, "seed": 1})
    before = trainer.evaluate()["composite"]
    result = trainer.fit()
    elapsed = time.perf_counter() - start
    assert result.status == "finished" and result.epochs_completed == 2
    assert result.metrics["composite"] > before, (before, result.history)
    for key in ("loss", "val_loss", "ssim", "mse", "psnr", "gradient_match", "sharpness_ratio",
                "histogram_distance", "composite", "lr", "epoch_time_s"):
        assert math.isfinite(result.metrics[key]), key
    assert elapsed < 40, f"{name} took {elapsed:.1f}s"


def test_plugin_task_by_module_path():
    result = train({"task": "plugin_task:build", "epochs": 2, "gradient_weight": 0.1, "lr": 1e-2})
    assert result.status == "finished"
    assert {"loss_pixel", "loss_gradient"} <= set(result.metrics)
    assert result.metrics["composite"] > result.history[0]["composite"] - 0.05


def test_unknown_task_names_the_field():
    with pytest.raises(ConfigError, match="task"):
        Trainer({"task": "no_such_task"})
    with pytest.raises(ConfigError, match="no_such_module"):
        Trainer({"task": "no_such_module:build"})


@pytest.mark.parametrize("name", ["microstructure", "microscopy-unet"])  # microscopy: with random flips and turns
def test_resume_gives_the_same_next_epoch(tmp_path, name):
    config = {**TINY[name], "epochs": 3, "seed": 3, "gradient_weight": 0.1}
    uninterrupted = train(config)

    def save_after_first(report):
        report.trainer.save(tmp_path)
        return report.epoch == 1  # stop: the "interrupted" run

    first = train(config, on_epoch=save_after_first)
    assert first.status == "stopped" and first.epochs_completed == 1
    resumed = train(config, resume_from=tmp_path)
    assert resumed.epochs_completed == 3
    for a, b in zip(uninterrupted.history[1:], resumed.history[1:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
        assert a["composite"] == pytest.approx(b["composite"], rel=1e-6, abs=1e-7)


def test_nan_loss_ends_as_diverged():
    seen = []
    result = train({"task": "plugin_task:build_poisoned", "epochs": 5, "data": {"poison_step": 10}},
                   on_epoch=lambda report: seen.append(report.status))
    assert result.status == "diverged"
    assert seen[-1] == "diverged" and result.epochs_completed < 5
    assert result.metrics["composite"] == DIVERGED_SCORE


def test_gradient_weight_sharpens_microstructure_predictions():
    """The seed's blur complaint: pure MSE gives blurry frames; a gradient term keeps them sharper."""
    base = {**TINY["microstructure"], "epochs": 4, "seed": 0, "lr": 3e-3}
    mse_only = train({**base, "gradient_weight": 0.0}).metrics["sharpness_ratio"]
    with_gradient = train({**base, "gradient_weight": 1.0}).metrics["sharpness_ratio"]
    assert abs(1 - with_gradient) < abs(1 - mse_only), (mse_only, with_gradient)
    assert with_gradient > mse_only


def test_cpu_threads_and_device_resolution():
    threads = torch.get_num_threads()
    try:
        trainer = Trainer({"task": "plugin_task:build", "epochs": 1, "device": "cpu"}, num_threads=1)
        assert trainer.device == torch.device("cpu") and trainer.amp_dtype is None
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_unquoted_yaml_amp_off_means_off():
    import yaml

    from losstune.trainables.config import TrainConfig

    raw = yaml.safe_load("task: microstructure\namp: off\n")
    assert raw["amp"] is False  # YAML 1.1 reads it as a boolean
    assert TrainConfig(**raw).amp == "off"
    assert TrainConfig(**yaml.safe_load("task: microstructure\namp: on\n")).amp == "auto"
