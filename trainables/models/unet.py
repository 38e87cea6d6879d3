"""A small UNet (GroupNorm, SiLU, residual blocks, skip connections) with an optional timestep embedding.

The same network serves two uses in the ``microscopy`` task:

* the regressor (``model: unet``): ``UNet(1, 1, out_activation="sigmoid")(wf) -> 2P in [0, 1]``;
* the DDPM denoiser: ``UNet(2, 1, time_embedding=True)(cat[x_t, cond], t) -> ε``.

Any input size works: sizes that are not a multiple of ``2**depth`` are padded (replicate) inside
``forward`` and the output is cropped back.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F


def _groups(channels: int) -> int:
    """GroupNorm groups: about 4 channels a group, at most 8 groups."""
    return math.gcd(8, max(1, channels // 4))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. / DDPM) of integer or float timesteps ``t`` (N,) -> N×dim."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv (+ timestep projection) → GroupNorm → SiLU → conv, plus a residual path."""

    def __init__(self, in_channels: int, out_channels: int, temb_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb = nn.Linear(temb_dim, out_channels) if temb_dim else None
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.temb is not None and temb is not None:
            h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    """UNet with ``depth`` downsamplings; channels ``base_channels * 2**level``.

    Args:
        in_channels / out_channels: image channels in and out.
        base_channels: channels at full resolution.
        depth: number of 2× downsamplings (0 = no downsampling).
        time_embedding: if True, ``forward(x, t)`` takes timesteps ``t`` (N,) whose sinusoidal
            embedding (→ MLP) is added in every block.
        out_activation: ``"sigmoid"`` maps the output to (0, 1); None leaves it linear.
        zero_init_output: start with a zero output layer (the DDPM denoiser starts predicting ε = 0).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 16, depth: int = 2, *,
                 time_embedding: bool = False, out_activation: Literal["sigmoid"] | None = None,
                 zero_init_output: bool = False):
        super().__init__()
        if base_channels < 1 or depth < 0:
            raise ValueError(f"UNet: base_channels must be >= 1 and depth >= 0, got {base_channels}, {depth}")
        if out_activation not in (None, "sigmoid"):
            raise ValueError(f"UNet: out_activation must be None or 'sigmoid', got {out_activation!r}")
        self.depth = depth
        self.out_activation = out_activation
        self.time_embedding = time_embedding
        channels = [base_channels * 2 ** i for i in range(depth + 1)]

        temb_dim = None
        if time_embedding:
            self.temb_base = max(16, base_channels)
            temb_dim = 4 * base_channels
            self.time_mlp = nn.Sequential(nn.Linear(self.temb_base, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))

        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.encoder = nn.ModuleList()
        self.downsample = nn.ModuleList()
        previous = channels[0]
        for level, ch in enumerate(channels):
            self.encoder.append(ResBlock(previous, ch, temb_dim))
            previous = ch
            if level < depth:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.middle = ResBlock(channels[-1], channels[-1], temb_dim)
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in reversed(range(depth)):
            self.upsample.append(nn.Conv2d(channels[level + 1], channels[level], 3, padding=1))
            self.decoder.append(ResBlock(2 * channels[level], channels[level], temb_dim))
        self.head_norm = nn.GroupNorm(_groups(channels[0]), channels[0])
        self.head = nn.Conv2d(channels[0], out_channels, 3, padding=1)
        if zero_init_output:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        if self.time_embedding and t is None:
            raise ValueError("UNet(time_embedding=True) needs timesteps t")
        if not self.time_embedding and t is not None:
            raise ValueError("UNet(time_embedding=False) takes no timesteps")
        temb = None
        if self.time_embedding:
            t = t.expand(x.shape[0]) if t.dim() == 0 else t
            temb = self.time_mlp(timestep_embedding(t, self.temb_base))

        height, width = x.shape[-2:]
        multiple = 2 ** self.depth
        pad_h, pad_w = -height % multiple, -width % multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")

        h = self.stem(x)
        skips = []
        for level, block in enumerate(self.encoder):
            h = block(h, temb)
            if level < self.depth:
                skips.append(h)
                h = self.downsample[level](h)
        h = self.middle(h, temb)
        for up, block in zip(self.upsample, self.decoder):
            skip = skips.pop()
            h = up(F.interpolate(h, size=skip.shape[-2:], mode="nearest"))
            h = block(torch.cat([h, skip], dim=1), temb)
        out = self.head(F.silu(self.head_norm(h)))
        out = out[..., :height, :width]
        return torch.sigmoid(out) if self.out_activation == "sigmoid" else out
