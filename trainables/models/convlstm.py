"""ConvLSTM encoder-decoder for next-frame prediction (``N×T×C×H×W`` in, ``N×out×H×W`` in [0, 1] out).

Encoder: one ConvLSTM layer per entry of ``hidden_channels``, each at half the resolution of the
one before (stride-2 convolution between levels), run over the whole input sequence. Decoder:
from the deepest layer's last hidden state, upsample x2, concatenate the next-finer layer's last
hidden state (skip connection), two 3×3 convolutions, and so on up to full resolution.

Output: with ``copy_gate`` (default) the prediction is a per-pixel blend
``m * last + (1 - m) * sigmoid(colour)`` of the last input frame's first ``out_channels``
channels and a generated colour, with ``m = sigmoid(gate)``: most of a microstructure does not
change from one frame to the next, so the network learns where it changes and into what. Without
it the output is ``sigmoid(colour)``. Either way it lies in [0, 1] and is computed in float32 at
the end (fine under ``torch.autocast``). Device-agnostic: states are created like the input.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

# initial bias of the copy gate: sigmoid(3) ~ 0.95 of the last frame at the start
COPY_GATE_BIAS = 3.0


class ConvLSTMCell(nn.Module):
    """One convolutional LSTM cell (Shi et al. 2015, without peepholes)."""

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int = 3):
        super().__init__()
        self.hidden_channels = hidden_channels
        self.conv = nn.Conv2d(in_channels + hidden_channels, 4 * hidden_channels, kernel_size,
                              padding=kernel_size // 2)
        with torch.no_grad():  # forget gate open at the start
            self.conv.bias[hidden_channels:2 * hidden_channels].fill_(1.0)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        i, f, o, g = self.conv(torch.cat([x, h.to(x.dtype)], dim=1)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c

    def run(self, seq: torch.Tensor) -> torch.Tensor:
        """``seq`` N×T×C×H×W -> hidden states N×T×hidden×H×W."""
        n, t, _, height, width = seq.shape
        h = seq.new_zeros(n, self.hidden_channels, height, width)
        c = torch.zeros_like(h, dtype=torch.float32)  # the cell state accumulates: keep it float32
        outputs = []
        for step in range(t):
            h, c = self(seq[:, step], (h, c))
            outputs.append(h)
        return torch.stack(outputs, dim=1)


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.LeakyReLU(0.1),
                         nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.LeakyReLU(0.1))


class ConvLSTMNet(nn.Module):
    """ConvLSTM encoder-decoder with skip connections; see the module docstring."""

    def __init__(self, in_channels: int = 4, out_channels: int = 3,
                 hidden_channels: Sequence[int] = (16, 32, 64), kernel_size: int = 3, copy_gate: bool = True):
        super().__init__()
        hidden = [int(h) for h in hidden_channels]
        if not hidden or min(hidden) < 1:
            raise ValueError(f"model.hidden_channels must be a non-empty list of positive ints, got {hidden_channels}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"model.kernel_size must be a positive odd int, got {kernel_size}")
        if copy_gate and in_channels < out_channels:
            raise ValueError(f"copy_gate needs the first {out_channels} input channels to be the image "
                             f"(in_channels={in_channels})")
        self.hidden = hidden
        self.out_channels = out_channels
        self.copy_gate = copy_gate
        self.cells = nn.ModuleList()
        self.down = nn.ModuleList()
        prev = in_channels
        for level, h in enumerate(hidden):
            if level > 0:
                self.down.append(nn.Sequential(nn.Conv2d(prev, prev, 3, stride=2, padding=1), nn.LeakyReLU(0.1)))
            self.cells.append(ConvLSTMCell(prev, h, kernel_size))
            prev = h
        self.up = nn.ModuleList(_conv_block(hidden[level + 1] + hidden[level], hidden[level])
                                for level in range(len(hidden) - 1))
        self.head = nn.Conv2d(hidden[0], out_channels + (1 if copy_gate else 0), 1)
        if copy_gate:
            with torch.no_grad():
                self.head.bias[-1].fill_(COPY_GATE_BIAS)

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.hidden) - 1)

    def check_size(self, height: int, width: int) -> None:
        m = self.size_multiple
        if height % m or width % m:
            raise ValueError(f"model.hidden_channels={self.hidden} has {len(self.hidden)} levels, so the image "
                             f"size (data.size) must be divisible by 2**{len(self.hidden) - 1}={m}; "
                             f"got {height}×{width}")

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.dim() != 5:
            raise ValueError(f"ConvLSTMNet expects N×T×C×H×W input, got shape {tuple(frames.shape)}")
        n, t, _, height, width = frames.shape
        self.check_size(height, width)
        seq, skips = frames, []
        for level, cell in enumerate(self.cells):
            if level > 0:
                flat = self.down[level - 1](seq.flatten(0, 1))
                seq = flat.unflatten(0, (n, t))
            seq = cell.run(seq)
            skips.append(seq[:, -1])
        x = skips[-1]
        for level in range(len(self.hidden) - 2, -1, -1):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = self.up[level](torch.cat([x, skips[level].to(x.dtype)], dim=1))
        out = self.head(x).float()
        colour = torch.sigmoid(out[:, :self.out_channels])
        if not self.copy_gate:
            return colour
        keep = torch.sigmoid(out[:, self.out_channels:])
        last = frames[:, -1, :self.out_channels].float().clamp(0.0, 1.0)
        return keep * last + (1.0 - keep) * colour
