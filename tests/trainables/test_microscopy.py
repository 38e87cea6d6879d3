"""The microscopy task: synthetic data, paired-folder loader, UNet, conditional DDPM, task factory."""

import math
import time

import numpy as np
import pytest
import torch

from losstune.trainables.config import ConfigError, TrainConfig
from losstune.trainables.data.microscopy import make_synthetic
from losstune.trainables.data.paired_folder import load_paired_folders, percentile_normalize, read_image
from losstune.trainables.models.ddpm import ConditionalDDPM, ddim_timesteps, make_betas, to_model_space
from losstune.trainables.models.unet import UNet


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mean_gradient(x: torch.Tensor) -> float:
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return float(dx + dy) / 2


# ----- synthetic data ------------------------------------------------------------------------------
def test_synthetic_is_deterministic_fast_and_in_range():
    make_synthetic(2, 8, seed=0)  # the first call pays one-off start-up (lazy imports): not what is measured
    start = time.process_time()  # this process's CPU: the check holds on a machine busy with other work
    wf, tp = make_synthetic(64, 32, seed=5)
    assert time.process_time() - start < 1.0
    assert wf.shape == tp.shape == (64, 1, 32, 32)
    assert wf.dtype == tp.dtype == torch.float32
    for x in (wf, tp):
        assert x.min() >= 0 and x.max() <= 1 and torch.isfinite(x).all()
    again_wf, again_tp = make_synthetic(64, 32, seed=5)
    assert torch.equal(wf, again_wf) and torch.equal(tp, again_tp)
    other_wf, other_tp = make_synthetic(64, 32, seed=6)
    assert not torch.equal(tp, other_tp) and not torch.equal(wf, other_wf)
    assert (tp > 0).float().mean() > 0.05, "the specimens should not be empty"


def test_synthetic_target_is_quantised_and_wf_is_blurry_and_noisy():
    wf, tp = make_synthetic(32, 32, seed=1, levels=4)
    clean_wf, clean_tp = make_synthetic(32, 32, seed=1, levels=4, noise=False)
    assert torch.equal(tp, clean_tp)  # noise only touches the input
    levels = torch.unique(tp)
    assert len(levels) <= 5 and set(levels.tolist()) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    assert (tp == 0).float().mean() > 0.5, "2P target: low (zero) background"
    # optics: the widefield image is blurrier than the optical section
    assert _mean_gradient(clean_wf) < 0.9 * _mean_gradient(tp)
    # out-of-focus haze and background: WF is bright where the target is dark
    assert wf[tp == 0].mean() > 0.1
    # Poisson–Gaussian noise: noisy and clean differ by a zero-mean residual of sizeable spread
    residual = wf - clean_wf
    assert residual.std() > 0.02
    assert abs(float(residual.mean())) < 0.05


# ----- paired folders ------------------------------------------------------------------------------
def _write_pairs(tmp_path, names=("a", "b", "c"), shape=(40, 48)):
    from PIL import Image
    import tifffile

    rng = np.random.default_rng(0)
    inp, tgt = tmp_path / "wf", tmp_path / "tp"
    inp.mkdir()
    tgt.mkdir()
    for name in names:
        img8 = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(img8).save(inp / f"{name}.png")
        # the same image as 16-bit TIFF: percentile normalisation is scale-free, so crops must agree
        tifffile.imwrite(tgt / f"{name}.tif", img8.astype(np.uint16) * 257)
    return inp, tgt


def test_paired_folder_reads_png_and_tiff_and_crops_the_same_window(tmp_path):
    inp, tgt = _write_pairs(tmp_path)
    assert read_image(tgt / "a.tif").max() > 255  # really 16-bit
    train, val = load_paired_folders(inp, tgt, crop_size=32, crops_per_image=2, seed=0, val_fraction=0.34)
    assert train["input"].shape == (4, 1, 32, 32) and val["input"].shape == (2, 1, 32, 32)
    for split in (train, val):
        assert split["input"].dtype == torch.float32
        assert split["input"].min() >= 0 and split["input"].max() <= 1
        torch.testing.assert_close(split["input"], split["target"], atol=1e-5, rtol=0)
    again, _ = load_paired_folders(inp, tgt, crop_size=32, crops_per_image=2, seed=0, val_fraction=0.34)
    assert torch.equal(again["input"], train["input"])
    other, _ = load_paired_folders(inp, tgt, crop_size=32, crops_per_image=2, seed=1, val_fraction=0.34)
    assert not torch.equal(other["input"], train["input"])


def test_paired_folder_reads_npy_rgb_and_explicit_validation(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    dirs = {k: tmp_path / k for k in ("wf", "tp", "vwf", "vtp")}
    for d in dirs.values():
        d.mkdir()
    for i in range(2):
        np.save(dirs["wf"] / f"img{i}.npy", rng.normal(100, 10, (36, 36)))
        np.save(dirs["tp"] / f"img{i}.npy", rng.random((36, 36)).astype(np.float32))
    Image.fromarray(rng.integers(0, 256, (33, 34, 3), dtype=np.uint8), "RGB").save(dirs["vwf"] / "v.png")
    np.save(dirs["vtp"] / "v.npy", rng.random((33, 34)))
    (dirs["wf"] / "notes.txt").write_text("ignored")
    train, val = load_paired_folders(dirs["wf"], dirs["tp"], crop_size=32, crops_per_image=3,
                                     val_input_dir=dirs["vwf"], val_target_dir=dirs["vtp"])
    assert train["input"].shape == (6, 1, 32, 32) and val["target"].shape == (3, 1, 32, 32)
    assert 0 <= float(val["input"].min()) and float(val["input"].max()) <= 1


def test_percentile_normalisation_range():
    rng = np.random.default_rng(0)
    img = rng.normal(1000, 50, (64, 64))
    img[0, :5] = 1e6  # hot pixels
    out = percentile_normalize(img, 1.0, 99.8)
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    assert 0.005 < (out == 0).mean() < 0.02  # ~1 % clipped low
    assert (out == 1).mean() < 0.005         # ~0.2 % clipped high
    assert 0.3 < out.mean() < 0.7            # the outliers do not squash the range
    assert percentile_normalize(np.full((8, 8), 3.0)).max() == 0  # constant image: no division by zero
    wide = percentile_normalize(img, 0.0, 100.0)
    assert wide.max() == 1 and wide[0, 0] == 1


def test_paired_folder_errors_name_the_problem(tmp_path):
    from PIL import Image

    inp, tgt = _write_pairs(tmp_path, names=("a", "b", "c"))
    with pytest.raises(ValueError, match="does not exist"):
        load_paired_folders(tmp_path / "nowhere", tgt, crop_size=32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_paired_folders(tmp_path / "empty", tgt, crop_size=32)
    with pytest.raises(ValueError, match="smaller than crop_size 64"):
        load_paired_folders(inp, tgt, crop_size=64)
    # names in one folder only: both sides listed
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(inp / "extra_in.png")
    np.save(tgt / "extra_tp.npy", np.zeros((40, 48)))
    with pytest.raises(ValueError, match="extra_in") as err:
        load_paired_folders(inp, tgt, crop_size=32)
    assert "extra_tp" in str(err.value)
    (inp / "extra_in.png").unlink()
    (tgt / "extra_tp.npy").unlink()
    # corrupt file
    (tgt / "b.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(ValueError, match=r"b\.tif"):
        load_paired_folders(inp, tgt, crop_size=32)
    # shape mismatch
    np.save(tgt / "b.npy", np.zeros((40, 40)))
    (tgt / "b.tif").unlink()
    with pytest.raises(ValueError, match="shape mismatch.*b"):
        load_paired_folders(inp, tgt, crop_size=32)


# ----- models --------------------------------------------------------------------------------------
def test_unet_as_regressor_and_as_denoiser():
    torch.manual_seed(0)
    regressor = UNet(1, 1, base_channels=8, depth=2, out_activation="sigmoid")
    out = regressor(torch.rand(3, 1, 32, 32))
    assert out.shape == (3, 1, 32, 32) and 0 < out.min() and out.max() < 1
    assert regressor(torch.rand(2, 1, 30, 27)).shape == (2, 1, 30, 27)  # sizes not a multiple of 4
    denoiser = UNet(2, 1, base_channels=8, depth=2, time_embedding=True)
    x = torch.randn(3, 2, 32, 32)
    eps_a = denoiser(x, torch.tensor([0, 0, 0]))
    eps_b = denoiser(x, torch.tensor([50, 50, 50]))
    assert eps_a.shape == (3, 1, 32, 32)
    assert not torch.allclose(eps_a, eps_b), "the timestep must change the output"
    with pytest.raises(ValueError):
        denoiser(x)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_noise_schedules_are_valid(schedule):
    for timesteps in (10, 200, 1000):
        betas = make_betas(timesteps, schedule)
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        assert betas.shape == (timesteps,) and (betas > 0).all() and (betas < 1).all()
        assert (alphas_cumprod > 0).all() and (alphas_cumprod < 1).all()
        assert (alphas_cumprod[1:] < alphas_cumprod[:-1]).all()
        assert alphas_cumprod[0] > 0.9 and alphas_cumprod[-1] < 0.01
    assert ddim_timesteps(200, 10)[0] == 199 and ddim_timesteps(200, 10)[-1] == 0
    assert len(ddim_timesteps(200, 10)) == 10 and ddim_timesteps(200, 1) == [199]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_q_sample_inverts_exactly_with_known_noise(schedule):
    model = ConditionalDDPM(base_channels=8, depth=1, timesteps=100, schedule=schedule)
    g = torch.Generator().manual_seed(0)
    x0 = to_model_space(torch.rand(6, 1, 16, 16, generator=g))
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 20, 50, 80, 99])
    x_t = model.q_sample(x0, t, noise)
    recovered = model.predict_x0(x_t, t, noise, clip=False)
    # float32 error is amplified by 1/√ᾱ_t at the noisy end
    tolerance = 1e-5 / model.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    assert ((recovered - x0).abs() <= tolerance).all()
    assert model.predict_x0(x_t, t, noise + 5.0).abs().max() <= 1.0  # clamped to the data range


def test_ddim_sampling_shape_range_determinism():
    torch.manual_seed(0)
    model = ConditionalDDPM(base_channels=8, depth=1, timesteps=50, sampling_steps=4).eval()
    for p in model.denoiser.head.parameters():  # a non-trivial denoiser (the output layer starts at zero)
        torch.nn.init.normal_(p, std=0.1)
    cond = torch.rand(3, 1, 16, 16)
    a = model.sample(cond, seed=7)
    assert a.shape == (3, 1, 16, 16) and a.min() >= 0 and a.max() <= 1 and torch.isfinite(a).all()
    assert torch.equal(a, model.sample(cond, seed=7))
    assert not torch.equal(a, model.sample(cond, seed=8))
    assert not torch.equal(a, model.sample(cond, steps=2, seed=7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b = model.sample(cond, seed=7)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()


# ----- the task ------------------------------------------------------------------------------------
def _config(**overrides) -> TrainConfig:
    raw = {"task": "microscopy", "seed": 0, "data": {"size": 32, "num_train": 16, "num_val": 4},
           "model": {"name": "unet", "base_channels": 8}}
    raw.update(overrides)
    return TrainConfig.model_validate(raw)


def _used_weights(config: TrainConfig) -> set[str]:
    """The weights of the terms the registry declares for the microscopy task's model in ``config``."""
    from losstune.trainables.terms import loss_terms, model_name
    return {t.weight_key for t in loss_terms("microscopy") if t.used_by(model_name(config.model_dump()))}


def _batch(task, n=4):
    return {k: v[:n] for k, v in task.train.items()}


def test_build_unet_task():
    from losstune.trainables.tasks.microscopy import build

    config = _config(gradient_weight=0.5, intensity_weight=0.2, pixel_loss="charbonnier")
    task = build(config)
    assert task.num_train == 16 and task.num_val == 4
    assert task.train["input"].shape == task.train["target"].shape == (16, 1, 32, 32)
    torch.manual_seed(0)
    model = task.build_model()
    batch = _batch(task)
    total, components = task.training_step(model, batch, 0)
    assert total.ndim == 0 and torch.isfinite(total) and total.requires_grad
    assert {"pixel", "gradient", "intensity"} <= set(components)
    assert "perceptual" not in components and not task.loss_modules
    assert float(total.detach()) == pytest.approx(float(sum(components.values())), rel=1e-5)
    pred = task.predict(model, batch)
    assert pred.shape == batch["target"].shape and 0 <= pred.min() and pred.max() <= 1
    assert torch.equal(task.baseline(batch), batch["input"])
    assert torch.equal(task.inputs_for_display(batch), batch["input"])
    assert {"gradient_weight", "pixel_weight"} <= _used_weights(config)


def test_build_unet_task_with_perceptual_term():
    from losstune.trainables.tasks.microscopy import build

    task = build(_config(perceptual_weight=0.1))
    assert len(task.loss_modules) == 1
    total, components = task.training_step(task.build_model(), _batch(task, 2), 0)
    assert "perceptual" in components and torch.isfinite(total)


def test_build_ddpm_task_and_intensity_warmup():
    from losstune.trainables.tasks.microscopy import build

    config = _config(model={"name": "ddpm", "base_channels": 8, "timesteps": 50, "sampling_steps": 3},
                     intensity_weight=0.5, gradient_weight=0.1, warmup_steps=10)
    task = build(config)
    assert {"diffusion_weight", "intensity_weight"} <= _used_weights(config)
    torch.manual_seed(0)
    model = task.build_model()
    batch = _batch(task)
    total, components = task.training_step(model, batch, 0)
    assert torch.isfinite(total) and total.requires_grad
    assert {"diffusion", "intensity", "gradient"} <= set(components)
    assert float(components.get("intensity", torch.zeros(()))) == 0.0  # warm-up starts at 0
    _, later = task.training_step(model, batch, 10)
    assert float(later["intensity"]) > 0.0 and math.isfinite(float(later["intensity"]))
    # training randomness comes from torch's RNG: restoring its state reproduces the step exactly
    state = torch.get_rng_state()
    first = task.training_step(model, batch, 10)[0]
    torch.set_rng_state(state)
    assert torch.equal(first, task.training_step(model, batch, 10)[0])
    # evaluation is deterministic DDIM sampling in [0, 1], independent of torch's RNG
    with torch.no_grad():
        pred = task.predict(model.eval(), batch)
        torch.manual_seed(123)
        assert torch.equal(pred, task.predict(model, batch))
    assert pred.shape == batch["target"].shape and 0 <= pred.min() and pred.max() <= 1


def test_model_and_data_config_errors_name_the_field(tmp_path):
    from losstune.trainables.tasks.microscopy import build

    with pytest.raises(ConfigError, match=r"model\.name"):
        build(_config(model={"name": "transformer"}))
    with pytest.raises(ConfigError, match=r"data\.bogus"):
        build(_config(data={"bogus": 1}))
    with pytest.raises(ConfigError, match=r"data\.input_dir"):
        build(_config(data={"input_dir": str(tmp_path / "missing"), "target_dir": str(tmp_path)}))


def test_build_from_paired_folders(tmp_path):
    from losstune.trainables.tasks.microscopy import build

    inp, tgt = _write_pairs(tmp_path, names=("a", "b", "c", "d", "e"))
    task = build(_config(data={"input_dir": str(inp), "target_dir": str(tgt), "crop_size": 32,
                               "crops_per_image": 2, "val_fraction": 0.2, "min_val_crops": 1}))
    assert task.num_train == 8 and task.num_val == 2
    assert task.train["input"].shape[1:] == (1, 32, 32)
    # by default the one validation image gives at least 32 crops (data.min_val_crops)
    task = build(_config(data={"input_dir": str(inp), "target_dir": str(tgt), "crop_size": 32,
                               "crops_per_image": 2, "val_fraction": 0.2}))
    assert task.num_train == 8 and task.num_val == 32


def test_paired_folder_splits_by_image_with_a_minimum_of_validation_crops(tmp_path):
    inp, tgt = _write_pairs(tmp_path, names=("a", "b", "c", "d", "e", "f"))
    train, val = load_paired_folders(inp, tgt, crop_size=32, crops_per_image=2, seed=0, val_fraction=0.34,
                                     min_val_crops=15)
    assert train["input"].shape[0] == 4 * 2 and val["input"].shape[0] == 2 * 8  # ceil(15 / 2) crops per image
    # no crop is in both: the images are split, not the crops
    flat_train = {tuple(x.flatten()[:16].tolist()) for x in train["target"]}
    assert not any(tuple(x.flatten()[:16].tolist()) in flat_train for x in val["target"])


def test_evaluation_region_is_the_targets_foreground_or_none():
    from losstune.trainables.tasks.microscopy import build

    task = build(_config())
    mask = task.eval_mask(task.val)
    assert mask.shape == (task.num_val, 1, *task.val["target"].shape[-2:]) and mask.dtype == torch.bool
    target = task.val["target"]
    # the region is brighter than the rest, and neither empty nor the whole frame
    assert 0.05 < float(mask.float().mean()) < 0.95
    assert float(target[mask.expand_as(target)].mean()) > float(target[~mask.expand_as(target)].mean())
    assert build(_config(data={"eval_region": "none"})).eval_mask is None


def test_tiny_optimisation_lowers_the_loss():
    from losstune.trainables.tasks.microscopy import build

    task = build(_config(gradient_weight=0.1, intensity_weight=0.1))
    torch.manual_seed(0)
    model = task.build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = task.train
    with torch.no_grad():
        before = float(task.training_step(model, batch, 0)[0])
    for step in range(30):
        total, _ = task.training_step(model, batch, step)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(task.training_step(model, batch, 30)[0])
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("model", ["unet", "ddpm"])
def test_training_reports_whole_frame_and_foreground_metrics(model):
    from losstune.trainables.loop import train

    arch = {"name": model, "base_channels": 4, "depth": 1}
    if model == "ddpm":
        arch.update(timesteps=10, sampling_steps=2)
    metrics = train({"task": "microscopy", "epochs": 1, "batch_size": 8, "device": "cpu", "amp": "off",
                     "data": {"size": 16, "num_train": 8, "num_val": 8}, "model": arch}, num_threads=1).metrics
    for name in ("ssim", "mse", "gradient_match", "sharpness_ratio", "composite"):
        assert math.isfinite(metrics[name]) and math.isfinite(metrics[f"{name}_active"] if name != "composite"
                                                               else metrics["composite_active"])
    assert metrics["composite"] == metrics["composite_active"] and 0 < metrics["active_fraction"] < 1
