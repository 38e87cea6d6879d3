"""Synthetic widefield (WF) → two-photon-like (2P) image pairs, deterministic from a seed.

A specimen is a small 3-D volume (``planes`` z planes, the focal plane in the middle) of

* filaments: random smooth curves (integrated random heading, uniform arc length) splatted
  onto the grid and blurred by a thin Gaussian line profile, and
* blobs / nuclei: soft-edged ellipses,

each object lying in one plane at one of a few brightness levels.

* 2P target: the sharp in-focus optical section, zero background, quantised to ``levels`` + 1
  grey levels (0, 1/levels, …, 1).
* WF input: every plane blurred by a Gaussian PSF whose width grows with defocus |z| (FFT,
  zero-padded), summed (the out-of-focus haze), plus a background offset, Poisson (shot)
  and Gaussian (read) noise; then percentile-normalised per image to [0, 1].

Everything is vectorised over images and objects (torch, CPU); 64 images of 32×32 take ~50 ms.
"""

from __future__ import annotations

import math

import torch

FOCUS_FRACTION = 0.55   # share of objects that lie in the focal plane


def percentile_normalize_batch(x: torch.Tensor, low: float = 1.0, high: float = 99.8) -> torch.Tensor:
    """Per-image percentile normalisation of N×C×H×W (over C, H, W) to [0, 1], clipped."""
    flat = x.reshape(x.shape[0], -1).float()
    q = torch.quantile(flat, torch.tensor([low / 100, high / 100], dtype=flat.dtype), dim=1)  # 2×N
    lo, hi = q[0].view(-1, 1, 1, 1), q[1].view(-1, 1, 1, 1)
    return ((x - lo) / (hi - lo).clamp_min(1e-8)).clamp(0.0, 1.0)


def _uniform(g: torch.Generator, shape, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=g)


def _gaussian_blur_fft(planes: torch.Tensor, sigmas: torch.Tensor, pad: int) -> torch.Tensor:
    """Blur N×Z×H×W with an isotropic Gaussian of width ``sigmas[z]`` per plane (zero padding ``pad``)."""
    n, z, h, w = planes.shape
    padded = torch.nn.functional.pad(planes, (pad, pad, pad, pad))
    fy = torch.fft.fftfreq(h + 2 * pad).view(-1, 1)
    fx = torch.fft.rfftfreq(w + 2 * pad).view(1, -1)
    freq2 = fy ** 2 + fx ** 2
    transfer = torch.exp(-2 * math.pi ** 2 * sigmas.view(-1, 1, 1) ** 2 * freq2)  # Z×Hp×Wf
    blurred = torch.fft.irfft2(torch.fft.rfft2(padded) * transfer, s=padded.shape[-2:])
    return blurred[..., pad:pad + h, pad:pad + w]


def _render_filaments(g: torch.Generator, n: int, size: int, planes: int, max_count: int, count_range,
                      levels: torch.Tensor, plane_of, line_sigma: float, focus: int) -> torch.Tensor:
    """N×Z×H×W planes of thin filaments, each at its level (a flat-topped Gaussian line profile).

    The first filament of every image lies in the focal plane, so no target is blank.
    """
    step = 0.5  # px between samples along a curve
    num_levels = len(levels)
    length = _uniform(g, (n, max_count, 1), 0.5 * size, 1.3 * size)
    num_samples = int(math.ceil(1.3 * size / step))
    s = torch.linspace(0, 1, num_samples).view(1, 1, -1)
    heading = (_uniform(g, (n, max_count, 1), 0, 2 * math.pi)
               + _uniform(g, (n, max_count, 1), -math.pi, math.pi) * (s - 0.5)
               + _uniform(g, (n, max_count, 1), 0, 0.7)
               * torch.sin(2 * math.pi * _uniform(g, (n, max_count, 1), 0.5, 2.0) * s
                           + _uniform(g, (n, max_count, 1), 0, 2 * math.pi)))
    ds = length / num_samples
    ys = torch.cumsum(ds * torch.sin(heading), dim=-1)
    xs = torch.cumsum(ds * torch.cos(heading), dim=-1)
    centre = _uniform(g, (2, n, max_count, 1), 0.1 * size, 0.9 * size)
    ys = ys - ys.mean(-1, keepdim=True) + centre[0]
    xs = xs - xs.mean(-1, keepdim=True) + centre[1]

    count = torch.randint(count_range[0], count_range[1] + 1, (n, 1), generator=g)
    active = (torch.arange(max_count).view(1, -1) < count).float()                   # N×K
    level_idx = torch.randint(0, num_levels, (n, max_count), generator=g)            # N×K
    plane = plane_of((n, max_count))                                                  # N×K
    plane[:, 0] = focus
    # line density so that the blurred line peaks at 1: λ = √(2π)·σ_eff (bilinear splat adds ~1/6 px²)
    sigma_eff = math.sqrt(line_sigma ** 2 + 1 / 6)
    weight = (active * math.sqrt(2 * math.pi) * sigma_eff).unsqueeze(-1) * ds       # N×K×1

    # bilinear splat of every sample point into N×Z×levels×H×W (one channel per level, so that
    # each filament keeps its own level where it is drawn)
    y0, x0 = ys.floor(), xs.floor()
    fy, fx = ys - y0, xs - x0
    base = (((torch.arange(n).view(-1, 1) * planes + plane) * num_levels + level_idx) * size * size).unsqueeze(-1)
    density = torch.zeros(n * planes * num_levels * size * size)
    for dy, dx, wgt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        yy, xx = (y0 + dy).long(), (x0 + dx).long()
        inside = (yy >= 0) & (yy < size) & (xx >= 0) & (xx < size)
        idx = base + yy.clamp(0, size - 1) * size + xx.clamp(0, size - 1)
        density.index_add_(0, idx.reshape(-1), (wgt * weight * inside).reshape(-1))
    density = density.view(n, planes * num_levels, size, size)
    profile = _gaussian_blur_fft(density, torch.full((planes * num_levels,), line_sigma), pad=0)
    # gain 1.6: a flat top ~1.5 px wide, so a thin line keeps its level wherever it falls on the grid
    profile = (1.6 * profile).clamp(0.0, 1.0).view(n, planes, num_levels, size, size)
    return (profile * levels.view(1, 1, -1, 1, 1)).amax(dim=2)


def _render_blobs(g: torch.Generator, n: int, size: int, planes: int, max_count: int, count_range,
                  levels: torch.Tensor, plane_of) -> torch.Tensor:
    """N×Z×H×W planes of soft-edged ellipses (nuclei) at their level."""
    if max_count == 0:
        return torch.zeros(n, planes, size, size)
    shape = (n, max_count, 1, 1)
    cy, cx = _uniform(g, shape, 0.1 * size, 0.9 * size), _uniform(g, shape, 0.1 * size, 0.9 * size)
    a, b = _uniform(g, shape, 0.06 * size, 0.16 * size), _uniform(g, shape, 0.05 * size, 0.12 * size)
    angle = _uniform(g, shape, 0, math.pi)
    yy = torch.arange(size, dtype=torch.float32).view(1, 1, -1, 1) - cy
    xx = torch.arange(size, dtype=torch.float32).view(1, 1, 1, -1) - cx
    u = xx * torch.cos(angle) + yy * torch.sin(angle)
    v = -xx * torch.sin(angle) + yy * torch.cos(angle)
    r = torch.sqrt((u / a) ** 2 + (v / b) ** 2)
    mask = torch.sigmoid((1 - r) * torch.minimum(a, b) / 0.6)                           # ~1 px soft edge
    count = torch.randint(count_range[0], count_range[1] + 1, (n, 1), generator=g)
    active = (torch.arange(max_count).view(1, -1) < count).float()
    level = levels[torch.randint(0, len(levels), (n, max_count), generator=g)] * active  # N×B
    onehot = torch.nn.functional.one_hot(plane_of((n, max_count)), planes).float()       # N×B×Z
    per_plane = (mask * level.view(n, max_count, 1, 1)).unsqueeze(2) * onehot.view(n, max_count, planes, 1, 1)
    return per_plane.amax(dim=1)


def make_synthetic(n: int, size: int = 64, seed: int = 0, *, planes: int = 5, levels: int = 4,
                   filaments: tuple[int, int] = (2, 6), blobs: tuple[int, int] = (1, 3),
                   line_sigma: float = 0.7, psf_sigma: float = 1.4, defocus_sigma: float = 2.5,
                   noise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` synthetic pairs ``(wf, tp)``, each N×1×size×size float32 in [0, 1].

    Args:
        planes: z planes of the specimen (the focal plane is the middle one).
        levels: the 2P target is quantised to ``levels + 1`` grey levels (0 … 1).
        filaments / blobs: (min, max) object counts per image.
        line_sigma: filament profile width (px) in the target.
        psf_sigma, defocus_sigma: WF PSF width (px) = psf_sigma + defocus_sigma · |z - focus|.
        noise: add background-dependent Poisson and Gaussian read noise to the WF image.
    """
    if n < 1 or size < 4 or planes < 1 or levels < 1 or not 1 <= filaments[0] <= filaments[1] \
            or not 0 <= blobs[0] <= blobs[1]:
        raise ValueError(f"make_synthetic: need n >= 1, size >= 4, planes >= 1, levels >= 1, "
                         f"1 <= filaments[0] <= filaments[1], 0 <= blobs[0] <= blobs[1] (got n={n}, "
                         f"size={size}, planes={planes}, levels={levels}, filaments={filaments}, blobs={blobs})")
    g = torch.Generator().manual_seed(int(seed))
    focus = planes // 2
    object_levels = torch.arange(1, levels + 1, dtype=torch.float32) / levels
    object_levels = object_levels[max(0, levels // 4):]  # no objects dimmer than ~1/4 of the range

    def plane_of(shape) -> torch.Tensor:
        in_focus = torch.rand(shape, generator=g) < FOCUS_FRACTION
        if planes == 1:
            return torch.zeros(shape, dtype=torch.long)
        other = torch.randint(0, planes - 1, shape, generator=g)
        other = other + (other >= focus).long()  # any plane but the focal one
        return torch.where(in_focus, torch.full(shape, focus), other)

    volume = torch.maximum(
        _render_filaments(g, n, size, planes, filaments[1], filaments, object_levels, plane_of, line_sigma,
                          focus),
        _render_blobs(g, n, size, planes, blobs[1], blobs, object_levels, plane_of))

    tp = torch.round(volume[:, focus:focus + 1] * levels) / levels

    sigmas = psf_sigma + defocus_sigma * (torch.arange(planes, dtype=torch.float32) - focus).abs()
    wf = _gaussian_blur_fft(volume, sigmas, pad=int(math.ceil(3 * float(sigmas.max())))).sum(1, keepdim=True)
    wf = wf.clamp_min(0.0) + _uniform(g, (n, 1, 1, 1), 0.05, 0.2)   # background offset
    if noise:
        photons = _uniform(g, (n, 1, 1, 1), 40.0, 200.0)            # photons at intensity 1
        read_noise = _uniform(g, (n, 1, 1, 1), 0.5, 2.0)            # read noise (photon units)
        counts = torch.poisson(wf * photons, generator=g) + read_noise * torch.randn(wf.shape, generator=g)
        wf = counts / photons
    wf = percentile_normalize_batch(wf)
    return wf.float().contiguous(), tp.float().contiguous()
