"""The training loop and the metrics on a GPU: precision, host syncs, streamed batches, resume.

Skipped where CUDA is absent (CI has no GPU). On a CUDA machine: ``python -m pytest tests/trainables/test_cuda.py``.
``LOSSTUNE_TEST_DEVICE`` runs them on another device instead (``cpu`` checks the tests themselves; the
host-sync test needs CUDA and is skipped elsewhere).
"""

import math
import os
import warnings

import pytest
import torch

from losstune.losses import metrics as M
from losstune.trainables.loop import Trainer
from tiny import TINY

DEVICE = os.environ.get("LOSSTUNE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
pytestmark = pytest.mark.skipif(not DEVICE, reason="no CUDA device (set LOSSTUNE_TEST_DEVICE to run elsewhere)")
CUDA = DEVICE.startswith("cuda")

# the microstructure task with every shaping term on, so the GPU runs the perceptual network and the weighting too
TASKS = {**TINY, "microstructure": {**TINY["microstructure"], "gradient_weight": 0.2, "perceptual_weight": 0.05,
                                    "solidification_weighting": True}}
PRECISIONS = ["off", "bf16", "fp16"] if CUDA else ["off", "bf16"]


def config(name, **overrides):
    return {**TASKS[name], "device": DEVICE, "epochs": 2, "seed": 0, **overrides}


def test_auto_picks_the_gpu_and_a_half_precision():
    if not CUDA:
        pytest.skip("device auto means CUDA")
    trainer = Trainer(config("microscopy-unet", device="auto", amp="auto"))
    assert trainer.device.type == "cuda" and trainer.preloaded
    assert trainer.amp_dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert next(trainer.model.parameters()).device.type == "cuda"


def test_metrics_on_the_device_match_the_cpu():
    """float32 on the device, also under autocast and with cuDNN's default TF32 switched on."""
    g = torch.Generator().manual_seed(0)
    t = torch.rand(4, 3, 64, 64, generator=g)
    t[:2] = 0.5 + 0.01 * t[:2]  # nearly flat: SSIM's variances are tiny differences of large moments
    p = (t + 0.03 * torch.randn(t.shape, generator=g)).clamp(0, 1)
    mask = torch.rand(4, 1, 64, 64, generator=g) > 0.7
    args = {"mse_ref": 0.01, "mse_ref_active": 0.02}
    ref = M.evaluate_all(p.double(), t.double(), mask=mask, **args)  # upcast inputs, float32 arithmetic
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            on_device = M.evaluate_all(p.to(DEVICE), t.to(DEVICE), mask=mask.to(DEVICE), **args)
        assert torch.backends.cudnn.allow_tf32  # the caller's setting is restored
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert set(on_device) == set(ref)
    for key, value in ref.items():
        assert on_device[key] == pytest.approx(value, rel=2e-5, abs=2e-6), key


@pytest.mark.parametrize("amp", PRECISIONS)
@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_trains_on_the_device_in_each_precision(name, amp):
    trainer = Trainer(config(name, amp=amp))
    assert trainer.amp_dtype == {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    before = trainer.evaluate()["composite"]
    result = trainer.fit()
    assert result.status == "finished" and result.epochs_completed == 2
    for key in ("loss", "val_loss", "ssim", "mse", "gradient_match", "sharpness_ratio", "composite"):
        assert math.isfinite(result.metrics[key]), key
    assert result.metrics["composite"] > before, (before, result.history)


def test_the_device_trains_like_the_cpu_in_float32():
    """Same seed, same data, same initial weights: the GPU's first epochs follow the CPU's closely.

    (The diffusion model draws its noise on the device, so only the deterministic task is compared.)"""
    gpu = Trainer(config("microstructure", amp="off")).fit().history
    cpu = Trainer(config("microstructure", amp="off", device="cpu")).fit().history
    for a, b in zip(gpu, cpu):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
        assert a["composite"] == pytest.approx(b["composite"], abs=2e-3)


def _sync_warnings(trainer):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.run_epoch()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message).splitlines()[0] for w in seen if "synchroniz" in str(w.message)]


@pytest.mark.parametrize("amp", PRECISIONS)
@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("preload", [True, False])
def test_training_steps_never_wait_for_the_host(name, amp, preload):
    """An epoch syncs with the host a fixed number of times (its loss, the validation metrics), however
    many steps it has: 8 or 10 steps per epoch sync exactly as often as 2."""
    if not CUDA:
        pytest.skip("sync debugging is CUDA's")
    sizes = (10, 2) if name == "microstructure" else (24, 6)  # 20 and 48 training samples
    trainers = [Trainer(config(name, amp=amp, preload=preload, batch_size=size)) for size in sizes]
    assert trainers[1].steps_per_epoch >= 4 * trainers[0].steps_per_epoch
    for trainer in trainers:
        _sync_warnings(trainer)  # the first epoch: cuDNN's algorithm search, allocator growth
    counts = [_sync_warnings(trainer) for trainer in trainers]
    assert len(counts[1]) == len(counts[0]), counts


def test_streamed_batches_train_like_preloaded_ones():
    """``preload: false`` (data bigger than the GPU's share) gathers each batch on the host and copies it."""
    preloaded = Trainer(config("microstructure", amp="off"))
    streamed = Trainer(config("microstructure", amp="off", preload=False))
    assert preloaded.preloaded and not streamed.preloaded
    assert streamed.train_data["target"].device.type == "cpu"
    a, b = preloaded.fit().history, streamed.fit().history
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
        assert x["composite"] == pytest.approx(y["composite"], abs=1e-4)


@pytest.mark.parametrize("amp", PRECISIONS)
def test_a_state_saved_on_the_device_resumes_there_and_on_the_cpu(tmp_path, amp):
    uninterrupted = Trainer(config("microstructure", amp=amp, epochs=3))
    uninterrupted.fit()
    first = Trainer(config("microstructure", amp=amp, epochs=3))
    first.run_epoch()
    first.save(tmp_path)
    resumed = Trainer(config("microstructure", amp=amp, epochs=3))
    resumed.load(tmp_path)
    assert resumed.epoch == 1 and next(resumed.model.parameters()).device.type == torch.device(DEVICE).type
    resumed.fit()
    for a, b in zip(uninterrupted.history[1:], resumed.history[1:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
    on_cpu = Trainer(config("microstructure", amp="off", epochs=3, device="cpu"))
    on_cpu.load(tmp_path)  # a GPU run continued on a machine without one
    assert on_cpu.epoch == 1
    assert all(v.device.type == "cpu" for s in on_cpu.optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))
    on_cpu.fit()
    assert math.isfinite(on_cpu.history[-1]["loss"])
