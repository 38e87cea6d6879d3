"""Conditional DDPM (ε-prediction) with deterministic DDIM sampling.

The clean image ``x0`` and the condition (the widefield image) are given in the data range
[0, 1] and scaled to [-1, 1] internally (:func:`to_model_space`). The denoiser is a
:class:`~trainables.models.unet.UNet` that sees ``cat[x_t, cond]`` and the timestep.

Device-agnostic: the schedule tensors are registered buffers (``.to(device)`` moves them), noise
is drawn on the batch's device, and the sampler never synchronises with the host (no ``.item()``);
autocast is fine (the sampler does its arithmetic in float32).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import nn

from losstune.trainables.models.unet import UNet

Schedule = Literal["linear", "cosine"]


def to_model_space(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return x * 2.0 - 1.0


def to_data_space(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]."""
    return (x + 1.0) * 0.5


def make_betas(timesteps: int, schedule: Schedule = "linear") -> torch.Tensor:
    """β_t for t = 0 … T-1 (float64), each in (0, 0.999].

    ``linear``: Ho et al. 2020, 1e-4 … 0.02 at T = 1000, rescaled by 1000 / T so that shorter chains
    still end near pure noise (as in Nichol & Dhariwal 2021). ``cosine``: Nichol & Dhariwal 2021,
    ᾱ(t) = cos²((t/T + s) / (1 + s) · π/2) with s = 0.008.
    """
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    if schedule == "linear":
        scale = 1000.0 / timesteps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    elif schedule == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    else:
        raise ValueError(f"schedule must be 'linear' or 'cosine', got {schedule!r}")
    return betas.clamp(1e-8, 0.999)


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """The DDIM timesteps, descending from T-1 to 0 (``steps`` of them, fewer if T < steps)."""
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    if steps == 1:
        return [timesteps - 1]
    values = {round((timesteps - 1) * (1 - i / (steps - 1))) for i in range(steps)}
    return sorted(values, reverse=True)


class DiffusionOutputs(NamedTuple):
    """One training forward pass: ε predicted and drawn, the timesteps, and x0 predicted (in [0, 1])."""

    eps_pred: torch.Tensor
    eps: torch.Tensor
    t: torch.Tensor
    x0_pred: torch.Tensor


class ConditionalDDPM(nn.Module):
    """p(x0 | cond) by ε-prediction; the denoiser sees ``cat[x_t, cond]`` (both in [-1, 1]) and t.

    ``forward(x_t, t, cond) -> ε̂`` (model space), ``q_sample``, ``predict_x0``,
    ``training_outputs(x0, cond)`` (data space in and out), ``sample(cond, steps, seed=…)``.
    """

    def __init__(self, base_channels: int = 16, depth: int = 2, timesteps: int = 200,
                 schedule: Schedule = "linear", sampling_steps: int = 10, *,
                 channels: int = 1, cond_channels: int = 1):
        super().__init__()
        self.timesteps = timesteps
        self.schedule = schedule
        self.sampling_steps = sampling_steps
        self.channels = channels
        self.denoiser = UNet(channels + cond_channels, channels, base_channels, depth,
                             time_embedding=True, zero_init_output=True)
        betas = make_betas(timesteps, schedule)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        for name, value in (("betas", betas), ("alphas_cumprod", alphas_cumprod),
                            ("sqrt_alphas_cumprod", alphas_cumprod.sqrt()),
                            ("sqrt_one_minus_alphas_cumprod", (1 - alphas_cumprod).sqrt())):
            self.register_buffer(name, value.float())

    @staticmethod
    def _at(buffer: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return buffer[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t · x0 + √(1-ᾱ_t) · ε (model space)."""
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, clip: bool = True) -> torch.Tensor:
        """x0 = (x_t - √(1-ᾱ_t) · ε) / √ᾱ_t (model space), clamped to [-1, 1] if ``clip``."""
        x0 = (x_t - self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / self._at(self.sqrt_alphas_cumprod, t, x_t)
        return x0.clamp(-1.0, 1.0) if clip else x0

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """ε predicted from x_t and the condition, both in model space [-1, 1].

        ``ε̂ = √(1-ᾱ_t) · x_t + √ᾱ_t · F(x_t, cond, t)``: the denoiser F has a skip path, like the
        ``c_skip``/``c_out`` preconditioning of Karras et al. 2022 (F plays the role of -v in
        v-prediction, Salimans & Ho 2022). The objective is unchanged (ε-MSE), but ε̂ starts
        right at high noise, x0̂ = √ᾱ_t · x_t - √(1-ᾱ_t) · F stays bounded there (no 1/√ᾱ_t blow-up
        of the x0-based loss terms), and a small model learns in a few steps.
        """
        f = self.denoiser(torch.cat([x_t, cond.to(x_t.dtype)], dim=1), t).float()
        return self._at(self.sqrt_one_minus_alphas_cumprod, t, f) * x_t + self._at(self.sqrt_alphas_cumprod, t, f) * f

    def training_outputs(self, x0: torch.Tensor, cond: torch.Tensor) -> DiffusionOutputs:
        """Draw t ~ U{0 … T-1} and ε ~ N(0, 1) from torch's RNG on the batch's device; predict ε and x0.

        ``x0`` (target) and ``cond`` are in [0, 1]; the returned ``x0_pred`` is in [0, 1] too.
        """
        x0m = to_model_space(x0.float())
        t = torch.randint(0, self.timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0m)
        x_t = self.q_sample(x0m, t, noise)
        eps_pred = self(x_t, t, to_model_space(cond.float()))
        x0_pred = to_data_space(self.predict_x0(x_t, t, eps_pred, clip=True))
        return DiffusionOutputs(eps_pred, noise, t, x0_pred)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, steps: int | None = None, *, seed: int | None = 0,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Deterministic DDIM (η = 0) in ``steps`` steps (default ``sampling_steps``); returns x0 in [0, 1].

        The starting noise is ``noise`` if given, else drawn from ``generator``, else from a fresh
        generator on ``cond``'s device seeded with ``seed`` (same seed, same samples), else (seed None)
        from torch's global RNG.
        """
        c = to_model_space(cond.float())
        n, _, height, width = c.shape
        if noise is None:
            if generator is None and seed is not None:
                generator = torch.Generator(device=c.device).manual_seed(seed)
            noise = torch.randn((n, self.channels, height, width), generator=generator, device=c.device)
        x = noise.to(device=c.device, dtype=torch.float32)
        schedule = ddim_timesteps(self.timesteps, steps or self.sampling_steps)
        for i, step in enumerate(schedule):
            a_t = self.alphas_cumprod[step]
            a_prev = self.alphas_cumprod[schedule[i + 1]] if i + 1 < len(schedule) else None
            t = torch.full((n,), step, device=c.device, dtype=torch.long)
            eps = self(x, t, c).float()
            x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1.0, 1.0)
            if a_prev is None:
                x = x0
                break
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()  # ε consistent with the clipped x0
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return to_data_space(x).clamp(0.0, 1.0)
