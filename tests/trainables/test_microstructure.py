"""The microstructure task: synthetic solidification data, .npz loader, ConvLSTM model, task factory."""

import time

import numpy as np
import pytest
import torch

from losstune.trainables.config import ConfigError, TrainConfig
from losstune.trainables.data.npz_sequences import load_npz_sequences
from losstune.trainables.data.solidification import LIQUID_COLOUR, generate_sequences
from losstune.trainables.models.convlstm import ConvLSTMNet
from losstune.trainables.tasks.microstructure import build

T_SOL, T_LIQ = 1600.0, 1700.0
TINY_DATA = {"size": 32, "num_sequences": 4, "frames": 7, "seq_length": 3}
TINY_MODEL = {"hidden_channels": [8, 16]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def seqs():
    start = time.perf_counter()
    out = generate_sequences(6, 12, 32, seed=3)
    return out, time.perf_counter() - start


def _is_liquid(micro: np.ndarray) -> np.ndarray:
    return (micro == np.asarray(LIQUID_COLOUR, np.float32)).all(-1)


def _colours(img: np.ndarray) -> set:
    return set(map(tuple, img.reshape(-1, 3).round(5).tolist()))


def _tiny_config(**overrides) -> TrainConfig:
    raw = {"task": "microstructure", "seed": 0, "data": dict(TINY_DATA), "model": dict(TINY_MODEL)}
    raw.update(overrides)
    return TrainConfig(**raw)


# ----- synthetic generator ---------------------------------------------------------------------

def test_generator_is_deterministic_and_fast(seqs):
    (micro, temperature), seconds = seqs
    assert seconds < 2.0, f"default test set took {seconds:.2f}s"
    again = generate_sequences(6, 12, 32, seed=3)
    assert np.array_equal(again.micro, micro) and np.array_equal(again.temperature, temperature)
    other = generate_sequences(6, 12, 32, seed=4)
    assert not np.array_equal(other.micro, micro) and not np.array_equal(other.temperature, temperature)
    # each sequence has its own stream: fewer sequences give the same first ones
    prefix = generate_sequences(2, 12, 32, seed=3)
    assert np.array_equal(prefix.micro, micro[:2]) and np.array_equal(prefix.temperature, temperature[:2])


def test_generator_shapes_and_ranges(seqs):
    (micro, temperature), _ = seqs
    assert micro.shape == (6, 12, 32, 32, 3) and micro.dtype == np.float32
    assert temperature.shape == (6, 12, 32, 32) and temperature.dtype == np.float32
    assert micro.min() >= 0 and micro.max() <= 1
    assert np.isfinite(temperature).all()
    assert 250 < temperature.min() < 600  # preheated substrate, kelvin
    assert temperature.max() > T_LIQ  # the laser melts
    rect = generate_sequences(2, 5, (32, 48), seed=0)
    assert rect.micro.shape == (2, 5, 32, 48, 3) and rect.temperature.shape == (2, 5, 32, 48)


def test_grains_melt_and_regrow(seqs):
    (micro, temperature), _ = seqs
    liquid = _is_liquid(micro)
    # liquid wherever the temperature is above the liquidus, and nothing liquid far below the solidus
    assert liquid[temperature >= T_LIQ].all()
    assert not liquid[temperature < T_SOL - 50].any()
    # the melt pool moves: the liquid fraction changes, and every sequence melts somewhere
    frac = liquid.mean(axis=(2, 3))
    assert (frac.max(axis=1) > 0.01).all() and (frac.std(axis=1) > 0).all()
    # pixels molten at some time are solid again at the end, mostly in grains seen before (epitaxy)
    remelted = liquid.any(axis=1) & ~liquid[:, -1]
    assert remelted.sum() > 100
    changed = (micro[:, -1] != micro[:, 0]).any(-1)
    assert changed.sum() > 100
    seen_before = [_colours(micro[s, 0]) for s in range(6)]
    regrown = [tuple(c) for s in range(6) for c in micro[s, -1][remelted[s]].round(5).tolist()]
    epitaxial = np.mean([c in seen_before[s] for s, c in zip(np.repeat(np.arange(6), remelted.sum((1, 2))), regrown)])
    assert epitaxial > 0.7, epitaxial
    # the set of grain colours changes over time (grains consumed by others, nuclei appear)
    counts = [[len(_colours(micro[s, f]) - {tuple(np.round(LIQUID_COLOUR, 5))}) for f in range(12)] for s in range(6)]
    assert any(len(set(c)) > 1 for c in counts), counts


# ----- .npz loader --------------------------------------------------------------------------------

def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_npz_round_trip_kelvin_and_celsius(tmp_path, seqs):
    (micro, temperature), _ = seqs
    m, t = micro[0], temperature[0]  # one sequence [T,H,W,3] / [T,H,W]
    kelvin = load_npz_sequences(_write(tmp_path / "k.npz", micro=m, temperature=t))  # guessed K
    assert kelvin.micro.shape == (1, *m.shape) and np.array_equal(kelvin.micro[0], m)
    assert np.array_equal(kelvin.temperature[0], t)
    celsius = t - 273.15
    guessed = load_npz_sequences(_write(tmp_path / "c.npz", micro=m, temperature=celsius))  # min < 250: °C
    np.testing.assert_allclose(guessed.temperature[0], t, atol=1e-3)
    # a strongly preheated °C field would be guessed as K: the explicit unit wins
    hot = celsius + 300
    explicit = load_npz_sequences(_write(tmp_path / "c2.npz", micro=m, temperature=hot, temperature_unit="C"))
    np.testing.assert_allclose(explicit.temperature[0], hot + 273.15, atol=1e-3)
    as_k = load_npz_sequences(_write(tmp_path / "k2.npz", micro=micro[:2], temperature=temperature[:2],
                                     temperature_unit=np.array("kelvin")))
    assert as_k.micro.shape == micro[:2].shape and np.array_equal(as_k.temperature, temperature[:2])
    as_u8 = load_npz_sequences(_write(tmp_path / "u8.npz", micro=(m * 255).round().astype(np.uint8), temperature=t))
    np.testing.assert_allclose(as_u8.micro[0], m, atol=1 / 255)


@pytest.mark.parametrize("arrays, key", [
    (lambda m, t: {"micro": m[..., 0], "temperature": t}, "'micro' must have shape [T,H,W,3]"),
    (lambda m, t: {"micro": m}, "'temperature'"),
    (lambda m, t: {"micro": m * 2, "temperature": t}, "'micro' values must lie in [0, 1]"),
    (lambda m, t: {"micro": m, "temperature": t[:, :16]}, "'temperature' must have shape"),
    (lambda m, t: {"micro": m, "temperature": t, "temperature_unit": "F"}, "'temperature_unit'"),
    (lambda m, t: {"micro": m, "temperature": t - 1000, "temperature_unit": "K"}, "below 0 K"),
])
def test_bad_npz_names_file_and_key(tmp_path, seqs, arrays, key):
    (micro, temperature), _ = seqs
    path = _write(tmp_path / "bad.npz", **arrays(micro[0], temperature[0]))
    with pytest.raises(ValueError) as err:
        load_npz_sequences(path)
    assert key in str(err.value) and str(path) in str(err.value) and str(err.value).startswith("data.npz: ")
    with pytest.raises(ConfigError, match="data.npz"):  # the task reports it as a config error
        build(_tiny_config(data={"npz": str(path), "seq_length": 3}))


def test_task_from_npz_single_sequence_splits_in_time(tmp_path, seqs):
    (micro, temperature), _ = seqs
    path = _write(tmp_path / "one.npz", micro=micro[0], temperature=temperature[0] - 273.15, temperature_unit="C")
    task = build(_tiny_config(data={"npz": str(path), "seq_length": 3}))
    # 12 frames: val = last 4 frames (1 window), train = first 8 (5 windows); no frame shared
    assert task.num_train == 5 and task.num_val == 1
    assert torch.equal(task.val["target"][0], torch.from_numpy(micro[0, -1]).permute(2, 0, 1))
    torch.testing.assert_close(task.val["temperature"][0, 0], torch.from_numpy(temperature[0, -1]), atol=0.05, rtol=0)
    assert task.train["frames"].shape == (5, 3, 4, 32, 32)


# ----- model --------------------------------------------------------------------------------------

@pytest.mark.parametrize("copy_gate", [True, False])
def test_model_shape_range_and_backward(copy_gate):
    torch.manual_seed(0)
    model = ConvLSTMNet(4, 3, hidden_channels=[8, 16, 16], copy_gate=copy_gate)
    frames = torch.rand(2, 3, 4, 32, 16)
    out = model(frames)
    assert out.shape == (2, 3, 32, 16) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(frames).dtype == torch.float32
    with pytest.raises(ValueError, match=r"model\.hidden_channels.*data\.size"):
        model(torch.rand(1, 2, 4, 30, 32))


# ----- task ---------------------------------------------------------------------------------------

def test_build_task_and_training_step_components():
    config = _tiny_config(pixel_weight=1.0, gradient_weight=0.5, perceptual_weight=0.2, warmup_steps=0)
    task = build(config)
    assert task.name == "microstructure"
    from losstune.trainables.terms import loss_terms
    assert [t.weight_key for t in loss_terms("microstructure")] == ["pixel_weight", "gradient_weight",
                                                                    "perceptual_weight"]
    # 4 sequences -> 3 train, 1 val; 7 frames, seq_length 3 -> 4 windows each
    assert task.num_train == 12 and task.num_val == 4
    assert task.train["frames"].shape == (12, 3, 4, 32, 32)
    assert task.train["target"].shape == (12, 3, 32, 32) and task.train["temperature"].shape == (12, 1, 32, 32)
    assert all(v.dtype == torch.float32 for v in (*task.train.values(), *task.val.values()))
    assert len(task.loss_modules) == 1  # the perceptual network follows the model to the device
    # the baseline is the last input frame; the target is the frame after it
    assert torch.equal(task.baseline(task.train)[1], task.train["target"][0])
    torch.manual_seed(0)
    model = task.build_model()
    batch = {k: v[:4] for k, v in task.train.items()}
    total, components = task.training_step(model, batch, 0)
    assert torch.isfinite(total) and set(components) >= {"pixel", "gradient", "perceptual"}
    assert all(torch.isfinite(c) and c > 0 for c in components.values())
    total.backward()
    pred = task.predict(model, batch)
    assert pred.shape == task.target(batch).shape and 0 <= pred.min() and pred.max() <= 1
    # without a perceptual weight there is no perceptual network
    assert build(_tiny_config(perceptual_weight=0.0)).loss_modules == []


def test_evaluation_region_is_where_the_frame_changes():
    task = build(_tiny_config())
    batch = task.val
    mask = task.eval_mask(batch)
    assert mask.shape == (task.num_val, 1, 32, 32) and mask.dtype == torch.bool
    changed = ((batch["target"] - batch["frames"][:, -1, :3]).abs() > 0.05).any(1, keepdim=True)
    window = (batch["temperature"] >= T_SOL) & (batch["temperature"] <= T_LIQ)
    assert bool((mask >= changed).all()) and bool((mask >= window).all())  # changes and the window are in
    assert changed.any() and 0.02 < float(mask.float().mean()) < 0.9  # most of the frame is copied through
    # a prediction that copies the last frame is perfect outside the region, and far off inside it
    from losstune.losses.metrics import evaluate_all
    copy = task.baseline(batch)
    v = evaluate_all(copy, batch["target"], mask=mask)
    assert v["mse_active"] > 2 * v["mse"] and v["ssim_active"] < v["ssim"]


def test_solidification_weighting_changes_the_loss():
    plain = build(_tiny_config())
    weighted = build(_tiny_config(solidification_weighting=True))
    assert torch.equal(plain.train["target"], weighted.train["target"])
    torch.manual_seed(0)
    model = plain.build_model()
    batch = plain.train  # all windows: some contain the solidification window
    with torch.no_grad():
        a = plain.training_step(model, batch, 0)[0]
        b = weighted.training_step(model, batch, 0)[0]
    assert torch.isfinite(b) and not torch.isclose(a, b, rtol=1e-3), (a, b)


@pytest.mark.parametrize("section, raw, name", [
    ("data", {"colour": "red"}, "data.colour"),
    ("model", {"depth": 3}, "model.depth"),
    ("data", {"size": 8}, "data.size"),
    ("data", {"frames": 3, "seq_length": 3}, "data.frames"),
    ("data", {"size": 18}, "model.hidden_channels"),  # 3 levels need a multiple of 4
    ("model", {"kernel_size": 4}, "model.kernel_size"),
    ("model", "unet", "model.name"),
])
def test_bad_config_names_the_key(section, raw, name):
    base = {"data": {"size": 32, "num_sequences": 2, "frames": 5, "seq_length": 2}, "model": {}}
    if isinstance(raw, dict):
        base[section] = {**base[section], **raw}
    else:
        base[section] = raw
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        build(TrainConfig(task="microstructure", **base))


def test_tiny_optimisation_lowers_the_training_loss():
    task = build(_tiny_config(data={**TINY_DATA, "seed": 1}))
    torch.manual_seed(0)
    model = task.build_model()
    batch = {k: v[:8] for k, v in task.train.items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    baseline_mse = (task.baseline(batch) - task.target(batch)).square().mean().item()
    losses = []
    for step in range(30):
        total, _ = task.training_step(model, batch, step)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert losses[-1] < baseline_mse, (losses[-1], baseline_mse)  # better than copying the last frame


def test_training_reports_whole_frame_and_region_metrics_and_scores_the_chosen_region(caplog, monkeypatch):
    from losstune.trainables import loop
    from losstune.trainables.loop import train

    monkeypatch.setattr(loop, "_WARNED", set())  # the small-validation warning is given once per process

    base = {"task": "microstructure", "epochs": 1, "batch_size": 4, "device": "cpu", "amp": "off",
            "data": {"size": 16, "num_sequences": 4, "frames": 6, "seq_length": 2}, "model": {"hidden_channels": [4, 8]}}
    auto = train(base, num_threads=1).metrics
    for name in ("ssim", "mse", "psnr", "gradient_match", "sharpness_ratio", "histogram_distance"):
        assert name in auto and f"{name}_active" in auto
    assert auto["composite"] == auto["composite_active"] != auto["composite_full"]  # auto = active for this task
    assert auto["num_val"] == 4 and auto["baseline_mse_active"] > auto["baseline_mse"]
    full = train({**base, "objective_region": "full"}, num_threads=1).metrics
    assert full["composite"] == full["composite_full"] == pytest.approx(auto["composite_full"], abs=1e-6)
    warnings = [r for r in caplog.records if "validation set has only 4 samples" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"


def test_an_active_objective_needs_a_task_region():
    from losstune.trainables.loop import Trainer

    with pytest.raises(ConfigError, match="objective_region"):
        Trainer({"task": "microscopy", "epochs": 1, "device": "cpu", "objective_region": "active",
                 "data": {"size": 16, "num_train": 4, "num_val": 8, "eval_region": "none"},
                 "model": {"base_channels": 4, "depth": 1}})
