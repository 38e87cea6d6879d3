"""Loss terms, weight maps and the weighted combination (losses/)."""

import math

import pytest
import torch
import torch.nn.functional as F

from losstune.losses import (PerceptualLoss, WeightedLoss, charbonnier_loss, diffusion_loss, gradient_loss,
                    image_gradients, intensity_weighted_loss, intensity_weights, l1_loss, mse_loss,
                    solidification_weights)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----- helpers -------------------------------------------------------------------------------------

def structured(n=2, c=1, h=32, w=32):
    """Checkerboard with a textured disc: edges of several orientations and contrasts."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    img = 0.2 + 0.6 * ((xx // 8 + yy // 8) % 2)
    disc = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (h / 4) ** 2
    img = torch.where(disc, 0.5 + 0.3 * torch.sin(xx / 2), img)
    return torch.stack([img * (1 - 0.2 * k) for k in range(c)]).expand(n, c, h, w).clone()


def blur(x, sigma):
    r = max(1, int(3 * sigma + 0.5))
    g = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
    g = g / g.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def noisy(x, std, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def perceptual3():
    return PerceptualLoss(in_channels=3)


# every differentiable loss term, called as term(pred, target)
TERMS = {
    "mse": lambda p, t: mse_loss(p, t),
    "l1": lambda p, t: l1_loss(p, t),
    "charbonnier": lambda p, t: charbonnier_loss(p, t),
    "mse_weighted": lambda p, t: mse_loss(p, t, weight=torch.rand(p.shape[0], 1, *p.shape[2:])),
    "gradient_match": lambda p, t: gradient_loss(p, t),
    "gradient_sharpen": lambda p, t: gradient_loss(p, t, mode="sharpen"),
    "gradient_weighted": lambda p, t: gradient_loss(p, t, weight=torch.rand(p.shape[0], 1, *p.shape[2:])),
    "perceptual": lambda p, t: PerceptualLoss(in_channels=p.shape[1])(p, t),
    "intensity": lambda p, t: intensity_weighted_loss(p, t),
    "intensity_mse": lambda p, t: intensity_weighted_loss(p, t, kind="mse"),
    "diffusion": lambda p, t: diffusion_loss(p, t),
}


# ----- every term --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TERMS))
def test_backward_gives_finite_grad_on_pred(name):
    target = structured(c=3, h=16, w=16)
    pred = noisy(blur(target, 1.0), 0.05).requires_grad_(True)
    loss = TERMS[name](pred, target)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    assert pred.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(TERMS))
def test_identical_images_give_zero_or_minimal_loss(name):
    target = structured(c=3, h=16, w=16)
    same = TERMS[name](target.clone(), target)
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    assert float(TERMS[name](noisy(target, 0.1), target)) > 1e-4


@pytest.mark.parametrize("name", sorted(TERMS))
def test_shape_mismatch_is_a_value_error(name):
    with pytest.raises(ValueError, match="same shape"):
        TERMS[name](torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 17))


@pytest.mark.parametrize("name", sorted(TERMS))
def test_no_host_sync_on_meta_tensors(name):
    """Meta tensors have no data: any .item()/bool(tensor)/NaN check in the loss would raise."""
    pred = torch.empty(2, 3, 16, 16, device="meta", requires_grad=True)
    target = torch.empty(2, 3, 16, 16, device="meta")
    if name == "perceptual":
        loss = PerceptualLoss(in_channels=3).to("meta")(pred, target)
    elif name.endswith("weighted"):
        weight = torch.empty(2, 1, 16, 16, device="meta")
        loss = (mse_loss if name == "mse_weighted" else gradient_loss)(pred, target, weight=weight)
    else:
        loss = TERMS[name](pred, target)
    assert loss.device.type == "meta" and loss.shape == ()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_terms_accept_other_dtypes(dtype, perceptual3):
    target = structured(c=3, h=16, w=16).to(dtype)
    pred = noisy(target.float(), 0.1).to(dtype).requires_grad_(True)
    for name, term in TERMS.items():
        loss = perceptual3(pred, target) if name == "perceptual" else term(pred, target)
        # the perceptual loss computes in its extractor's dtype (float32 unless moved with .to)
        wide = dtype == torch.float64 and name != "perceptual"
        assert loss.dtype == (torch.float64 if wide else torch.float32), name
        assert torch.isfinite(loss), name
    perceptual3(pred, target).backward()
    assert torch.isfinite(pred.grad.float()).all()


# ----- pixel ---------------------------------------------------------------------------------------

def test_pixel_losses_match_reference_formulas():
    p, t = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    assert torch.allclose(mse_loss(p, t), F.mse_loss(p, t))
    assert torch.allclose(l1_loss(p, t), F.l1_loss(p, t))
    eps = 1e-2
    assert torch.allclose(charbonnier_loss(p, t, eps=eps), (torch.sqrt((p - t) ** 2 + eps**2) - eps).mean())


def test_pixel_weight_map_broadcasts_and_masks():
    t = torch.zeros(2, 3, 8, 8)
    p = t.clone()
    p[:, :, :4] = 1.0  # error only in the top half
    ones = torch.ones(2, 1, 8, 8)
    bottom = torch.zeros(2, 1, 8, 8)
    bottom[:, :, 4:] = 2.0
    for fn in (mse_loss, l1_loss, charbonnier_loss):
        assert torch.allclose(fn(p, t, weight=ones), fn(p, t))
        assert float(fn(p, t, weight=bottom)) == pytest.approx(0.0, abs=1e-7)
        assert float(fn(p, t, weight=2 * ones)) == pytest.approx(2 * float(fn(p, t)), rel=1e-6)


def test_pixel_bad_weight_shape_is_a_value_error():
    with pytest.raises(ValueError, match="weight"):
        mse_loss(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), weight=torch.rand(2, 2, 8, 8))
    with pytest.raises(ValueError, match="eps"):
        charbonnier_loss(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4), eps=0)


# ----- gradient ------------------------------------------------------------------------------------

def test_image_gradients_are_forward_differences():
    x = torch.arange(12.0).view(1, 1, 3, 4)
    dx, dy = image_gradients(x)
    assert dx.shape == (1, 1, 3, 3) and dy.shape == (1, 1, 2, 4)
    assert torch.all(dx == 1) and torch.all(dy == 4)
    with pytest.raises(ValueError):
        image_gradients(torch.rand(1, 1, 1, 4))


def test_gradient_match_is_the_gradient_difference_loss():
    p, t = torch.rand(2, 1, 6, 7), torch.rand(2, 1, 6, 7)
    pdx, pdy = image_gradients(p)
    tdx, tdy = image_gradients(t)
    expected = 0.5 * ((tdx.abs() - pdx.abs()).abs().mean() + (tdy.abs() - pdy.abs()).abs().mean())
    assert torch.allclose(gradient_loss(p, t), expected)
    # it penalises both missing edges (blur) and spurious ones (noise)
    t = structured()
    assert float(gradient_loss(blur(t, 1.5), t)) > 0.01
    assert float(gradient_loss(noisy(t, 0.1), t)) > 0.01


def test_gradient_sharpen_is_bounded_and_one_sided():
    t = structured()
    bound = 0.5 * sum(g.abs().mean() for g in image_gradients(t))
    wild = [torch.zeros_like(t), torch.full_like(t, 0.5), 1000 * torch.randn_like(t), -1e6 * t, blur(t, 3.0)]
    for p in wild:
        value = float(gradient_loss(p, t, mode="sharpen"))
        assert 0.0 <= value <= float(bound) + 1e-6
    # a flat prediction misses every edge: exactly the bound
    assert float(gradient_loss(torch.zeros_like(t), t, mode="sharpen")) == pytest.approx(float(bound), rel=1e-5)
    # blurrier -> larger; sharper than the target -> no penalty and no reward
    values = [float(gradient_loss(blur(t, s), t, mode="sharpen")) for s in (0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[0] > 0
    assert float(gradient_loss(2 * t, t, mode="sharpen")) == 0.0


def test_gradient_weight_and_mode_validation():
    t = structured()
    p = blur(t, 1.0)
    assert torch.allclose(gradient_loss(p, t, weight=torch.ones(2, 1, 32, 32)), gradient_loss(p, t))
    assert float(gradient_loss(p, t, weight=torch.zeros(2, 1, 32, 32))) == 0.0
    with pytest.raises(ValueError, match="mode"):
        gradient_loss(p, t, mode="blur")
    with pytest.raises(ValueError, match="weight"):
        gradient_loss(p, t, weight=torch.ones(2, 1, 16, 16))


# ----- perceptual ----------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
def test_perceptual_zero_for_identity_larger_for_blur_and_noise(channels):
    loss = PerceptualLoss(in_channels=channels)
    t = structured(c=channels)
    assert float(loss(t, t.clone())) == pytest.approx(0.0, abs=1e-7)
    assert float(loss(blur(t, 1.0), t)) > 1e-3
    assert float(loss(noisy(t, 0.1), t)) > 1e-3
    assert float(loss(noisy(t, 0.1), t)) > float(loss(noisy(t, 0.02), t))


def test_perceptual_is_frozen_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = PerceptualLoss(3, seed=0), PerceptualLoss(3, seed=0), PerceptualLoss(3, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(not p.requires_grad for p in a.parameters())
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    assert not a.train().training  # stays in eval mode


def test_perceptual_follows_to_and_repeats_grey_input():
    loss = PerceptualLoss(3).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in loss.parameters())
    t = structured(c=1)
    grey = float(loss(blur(t, 1.0), t))
    rgb = float(loss(blur(t, 1.0).expand(-1, 3, -1, -1), t.expand(-1, 3, -1, -1)))
    assert grey == pytest.approx(rgb, rel=1e-6) and grey > 0
    with pytest.raises(ValueError, match="channels"):
        loss(torch.rand(1, 2, 16, 16), torch.rand(1, 2, 16, 16))
    with pytest.raises(ValueError, match="dimensions"):
        loss(torch.rand(3, 16, 16), torch.rand(3, 16, 16))


def test_perceptual_weights_path_loads_a_state_dict(tmp_path):
    source = PerceptualLoss(3, seed=7)
    path = tmp_path / "extractor.pt"
    torch.save(source.extractor.state_dict(), path)
    loaded = PerceptualLoss(3, seed=0, weights_path=path)
    for ps, pl in zip(source.parameters(), loaded.parameters()):
        assert torch.equal(ps, pl)
    assert all(not p.requires_grad for p in loaded.parameters())
    t = structured(c=3)
    assert float(loaded(blur(t, 1.0), t)) == pytest.approx(float(source(blur(t, 1.0), t)))
    # a whole PerceptualLoss state_dict works too
    whole = tmp_path / "whole.pt"
    torch.save(source.state_dict(), whole)
    assert torch.equal(next(PerceptualLoss(3, weights_path=whole).parameters()), next(source.parameters()))


def test_perceptual_weights_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights_path"):
        PerceptualLoss(3, weights_path=tmp_path / "missing.pt")
    wrong_keys = tmp_path / "wrong.pt"
    torch.save({"conv.weight": torch.zeros(3, 3, 3, 3)}, wrong_keys)
    with pytest.raises(ValueError, match="weights_path"):
        PerceptualLoss(3, weights_path=wrong_keys)
    wrong_shape = tmp_path / "grey.pt"
    torch.save(PerceptualLoss(1).extractor.state_dict(), wrong_shape)
    with pytest.raises(ValueError, match="weights_path"):
        PerceptualLoss(3, weights_path=wrong_shape)


# ----- intensity -----------------------------------------------------------------------------------

def test_intensity_weights_mean_one_and_rare_intensities_weigh_more():
    target = torch.full((2, 1, 16, 16), 0.1)
    target[0, :, :2, :2] = 0.9  # 4 rare bright pixels
    target[1, :, :8] = 0.7  # half/half: balanced
    target.requires_grad_(True)
    w = intensity_weights(target)
    assert w.shape == target.shape and not w.requires_grad
    assert torch.allclose(w.mean(dim=(1, 2, 3)), torch.ones(2), atol=1e-6)
    assert float(w[0, 0, 0, 0]) > 10 * float(w[0, 0, -1, -1])
    assert torch.allclose(w[1], torch.ones_like(w[1]), atol=1e-6)
    # smoothing bounds the ratio: 1 -> uniform, 0 -> pure inverse frequency (252/4 = 63×)
    assert torch.allclose(intensity_weights(target, smoothing=1.0), torch.ones_like(w), atol=1e-6)
    ratio = intensity_weights(target, smoothing=0.0)[0, 0]
    assert float(ratio[0, 0] / ratio[-1, -1]) == pytest.approx(63.0, rel=1e-5)


def test_intensity_weights_constant_target_and_validation():
    assert torch.allclose(intensity_weights(torch.full((1, 3, 8, 8), 0.4)), torch.ones(1, 3, 8, 8))
    with pytest.raises(ValueError, match="bins"):
        intensity_weights(torch.rand(1, 1, 8, 8), bins=0)
    with pytest.raises(ValueError, match="smoothing"):
        intensity_weights(torch.rand(1, 1, 8, 8), smoothing=1.5)
    with pytest.raises(ValueError, match="kind"):
        intensity_weighted_loss(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), kind="huber")


def test_intensity_weighted_loss_emphasises_errors_on_rare_pixels():
    target = torch.full((1, 1, 16, 16), 0.1)
    target[..., :2, :2] = 0.9
    rare_err, common_err = target.clone(), target.clone()
    rare_err[..., :2, :2] -= 0.2
    common_err[..., 8:10, 8:10] += 0.2  # same size of error, on common pixels
    assert float(l1_loss(rare_err, target)) == pytest.approx(float(l1_loss(common_err, target)))
    assert float(intensity_weighted_loss(rare_err, target)) > 10 * float(intensity_weighted_loss(common_err, target))


# ----- solidification window -----------------------------------------------------------------------

def test_solidification_weights_mean_one_and_larger_in_window():
    temp = torch.linspace(1500, 1800, 32).expand(2, 16, 32).clone()
    temp[1] += 50
    w = solidification_weights(temp, 1600.0, 1700.0)
    assert w.shape == (2, 1, 16, 32)
    assert torch.allclose(w.mean(dim=(1, 2, 3)), torch.ones(2), atol=1e-6)
    inside = (temp[0] > 1620) & (temp[0] < 1680)  # clear of the smooth edges (softness 5 K)
    outside = (temp[0] < 1570) | (temp[0] > 1730)
    assert float(w[0, 0][inside].min()) > 3.5 * float(w[0, 0][outside].max())
    assert torch.equal(solidification_weights(temp.unsqueeze(1), 1600.0, 1700.0), w)


def test_solidification_weights_options_and_validation():
    temp = torch.linspace(1500, 1800, 64).view(1, 1, 8, 8)
    assert torch.allclose(solidification_weights(temp, 1600, 1700, boost=1.0), torch.ones_like(temp))
    hard = solidification_weights(temp, 1600, 1700, boost=3.0, softness=0.0)
    inside = (temp >= 1600) & (temp <= 1700)
    assert torch.allclose(hard[inside] / hard[~inside].max(), torch.full_like(hard[inside], 3.0))
    with pytest.raises(ValueError, match="t_liquidus"):
        solidification_weights(temp, 1700, 1600)
    with pytest.raises(ValueError, match="temperature"):
        solidification_weights(torch.rand(1, 2, 8, 8), 0.2, 0.4)
    with pytest.raises(ValueError, match="boost"):
        solidification_weights(temp, 1600, 1700, boost=0.0)


# ----- diffusion -----------------------------------------------------------------------------------

def test_diffusion_loss_is_eps_mse():
    eps_pred, eps = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    assert torch.allclose(diffusion_loss(eps_pred, eps), F.mse_loss(eps_pred, eps))
    with pytest.raises(ValueError, match="eps_pred"):
        diffusion_loss(eps_pred, eps[:2])


# ----- WeightedLoss --------------------------------------------------------------------------------

def _raising(**_):
    raise AssertionError("a weight-0 term must never be called")


def _pixel(pred, target, **_):
    return mse_loss(pred, target)


def _grad(pred, target, **_):
    return gradient_loss(pred, target)


def test_weighted_loss_total_and_detached_weighted_components():
    t = structured()
    p = blur(t, 1.0).requires_grad_(True)
    loss = WeightedLoss({"pixel": _pixel, "gradient": _grad}, {"pixel": 2.0, "gradient": 0.5})
    total, comps = loss(0, pred=p, target=t, unused="ignored by **_")
    assert set(comps) == {"pixel", "gradient"}
    assert torch.allclose(comps["pixel"], 2.0 * mse_loss(p, t))
    assert torch.allclose(comps["gradient"], 0.5 * gradient_loss(p, t))
    assert torch.allclose(total, comps["pixel"] + comps["gradient"])
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in comps.values())
    total.backward()
    assert p.grad is not None and torch.isfinite(p.grad).all()


def test_weighted_loss_skips_weight_zero_terms():
    t = structured()
    loss = WeightedLoss({"pixel": _pixel, "broken": _raising}, {"pixel": 1.0, "broken": 0.0},
                        warmup={"broken": 10})
    total, comps = loss(5, pred=blur(t, 1.0), target=t)
    assert loss.active == ["pixel"]
    assert float(comps["broken"]) == 0.0 and torch.allclose(total, comps["pixel"])


def test_weighted_loss_warmup_is_a_linear_ramp():
    t = structured()
    p = blur(t, 1.0)
    loss = WeightedLoss({"pixel": _pixel, "gradient": _grad}, {"pixel": 1.0, "gradient": 0.8},
                        warmup={"gradient": 100})
    expected = {0: 0.0, 25: 0.2, 50: 0.4, 99: 0.792, 100: 0.8, 1000: 0.8}
    for step, w in expected.items():
        assert loss.weight_at("gradient", step) == pytest.approx(w)
        assert loss.weight_at("pixel", step) == 1.0
        _, comps = loss(step, pred=p, target=t)
        assert float(comps["gradient"]) == pytest.approx(w * float(gradient_loss(p, t)), rel=1e-6)


def test_weighted_loss_validation():
    terms = {"pixel": _pixel, "gradient": _grad}
    with pytest.raises(ValueError, match="'perceptual'"):
        WeightedLoss(terms, {"pixel": 1.0, "gradient": 1.0, "perceptual": 0.5})
    with pytest.raises(ValueError, match="gradient"):
        WeightedLoss(terms, {"pixel": 1.0, "gradient": -0.1})
    with pytest.raises(ValueError, match="gradient"):
        WeightedLoss(terms, {"pixel": 1.0})
    with pytest.raises(ValueError, match="'intensity'"):
        WeightedLoss(terms, {"pixel": 1.0, "gradient": 1.0}, warmup={"intensity": 10})
    with pytest.raises(ValueError, match="all weights are 0"):
        WeightedLoss(terms, {"pixel": 0.0, "gradient": 0.0})
    with pytest.raises(ValueError, match="nope"):
        WeightedLoss(terms, {"pixel": 1.0, "gradient": 1.0}).weight_at("nope", 0)


def test_weighted_loss_propagates_nan_without_raising():
    t = structured()
    p = t.clone()
    p[0, 0, 0, 0] = math.nan
    total, comps = WeightedLoss({"pixel": _pixel}, {"pixel": 1.0})(0, pred=p, target=t)
    assert torch.isnan(total) and torch.isnan(comps["pixel"])
