"""Perceptual (feature-reconstruction) loss with a frozen, randomly initialised CNN.

Johnson, Alahi & Fei-Fei, "Perceptual losses for real-time style transfer and
super-resolution", ECCV 2016: compare images in the feature space of a CNN at several scales.
No pretrained weights can be downloaded here, so the default extractor is a small multi-scale
CNN with seeded random weights: random-weight networks already give useful perceptual features
(Liu et al., "Generic perceptual loss for modeling structured output dependencies", CVPR 2021).
Features are unit-normalised over channels at every pixel and compared with a mean squared
distance per layer, as in LPIPS (Zhang et al., CVPR 2018) with uniform channel weights.
``weights_path`` loads a local ``state_dict`` for the extractor instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from losstune.losses._checks import check_pair

DEFAULT_CHANNELS = (16, 32, 64)


class RandomFeatureExtractor(nn.Module):
    """A VGG-like multi-scale CNN: per stage two 3×3 conv + ReLU, 2× average pooling between.

    Weights are drawn from a private ``torch.Generator(seed)`` (He-normal, zero bias), so the
    same seed gives the same network on every machine and the global RNG is untouched.
    ``forward`` returns the feature map at the end of every stage (one per scale).
    """

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = DEFAULT_CHANNELS, seed: int = 0):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels: must be >= 1, got {in_channels}")
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"channels: need at least one positive width, got {tuple(channels)}")
        self.in_channels = in_channels
        stages, prev = [], in_channels
        with torch.random.fork_rng(devices=[]):  # nn.Conv2d's default init would draw from the global RNG
            for width in channels:
                stages.append(nn.Sequential(nn.Conv2d(prev, width, 3, padding=1, padding_mode="reflect"),
                                            nn.ReLU(),
                                            nn.Conv2d(width, width, 3, padding=1, padding_mode="reflect"),
                                            nn.ReLU()))
                prev = width
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AvgPool2d(2, ceil_mode=True)
        self._init_weights(seed)

    @torch.no_grad()
    def _init_weights(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                std = math.sqrt(2.0 / fan_in)
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                module.bias.zero_()

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.pool(x)
            x = stage(x)
            features.append(x)
        return features


def _unit_normalise(f: Tensor, eps: float = 1e-10) -> Tensor:
    """Divide each pixel's feature vector by its L2 norm over channels (LPIPS)."""
    return f / torch.sqrt(f.square().sum(dim=1, keepdim=True) + eps)


def _load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights_path: no such file {os.fspath(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors: name the file
        raise ValueError(f"weights_path: {os.fspath(path)!r} is not a readable torch state_dict ({exc})") from exc
    if not isinstance(state, dict):
        raise ValueError(f"weights_path: {os.fspath(path)!r} holds a {type(state).__name__}, not a state_dict")
    prefix = "extractor."  # also accept the state_dict of a whole PerceptualLoss
    if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


class PerceptualLoss(nn.Module):
    """Multi-scale feature loss ``mean_l mean_{n,h,w} Σ_c (φ̂_l(pred) − φ̂_l(target))²``.

    ``φ̂_l`` are the extractor's features at scale ``l``, unit-normalised over channels. The loss
    is 0 for identical images, at most 4, and grows with blur, noise and structural differences.

    Args:
        in_channels: channels of the images (1 for grey, 3 for RGB, any other count works);
            grey inputs given to an extractor with more channels are repeated across channels.
        seed: seed of the random extractor weights.
        weights_path: optional file with a ``state_dict`` for :attr:`extractor` (saved with
            ``torch.save(loss.extractor.state_dict(), path)``); ``FileNotFoundError`` if it
            does not exist, ``ValueError`` if its keys or shapes do not match.
        channels: widths of the extractor stages (one scale per stage).

    The extractor is frozen (``requires_grad=False``, eval mode) but moves with ``.to(device)``;
    gradients flow to ``pred`` only.

    >>> loss = PerceptualLoss(in_channels=1)
    >>> x = torch.rand(2, 1, 16, 16)
    >>> loss(x, x).item(), bool(loss(x, torch.rand(2, 1, 16, 16)) > 0)
    (0.0, True)
    """

    def __init__(self, in_channels: int = 3, seed: int = 0, weights_path: str | os.PathLike | None = None,
                 channels: Sequence[int] = DEFAULT_CHANNELS):
        super().__init__()
        self.extractor = RandomFeatureExtractor(in_channels, channels, seed)
        if weights_path is not None:
            state = _load_state_dict(weights_path)
            try:
                self.extractor.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise ValueError(f"weights_path: {os.fspath(weights_path)!r} does not fit the extractor "
                                 f"(in_channels={in_channels}, channels={tuple(channels)}): {exc}") from exc
        self.extractor.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        """Always stays in eval mode: the extractor is frozen."""
        return super().train(False)

    def _match_channels(self, x: Tensor) -> Tensor:
        want = self.extractor.in_channels
        if x.shape[1] == want:
            return x
        if x.shape[1] == 1:
            return x.expand(-1, want, -1, -1)
        raise ValueError(f"pred: has {x.shape[1]} channels but the perceptual extractor expects {want} "
                         f"(set PerceptualLoss(in_channels={x.shape[1]}))")

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        check_pair(pred, target, min_ndim=4, max_ndim=4)
        dtype = self.extractor.stages[0][0].weight.dtype
        # one pass over the concatenated batch; the target half needs no graph
        x = self._match_channels(torch.cat([pred, target.detach()]).to(dtype))
        n = pred.shape[0]
        losses = []
        for f in self.extractor(x):
            f = _unit_normalise(f.float())
            losses.append((f[:n] - f[n:]).square().sum(dim=1).mean())
        return torch.stack(losses).mean()
