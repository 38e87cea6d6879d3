"""Training-batch augmentation: random symmetries applied alike to every tensor of a batch.

A task hands one of these to the loop as ``Task.augment``; the loop calls it on each training batch
(never on validation) with its own CPU generator, whose state is saved in every checkpoint, so a
resumed run draws the same transforms as an uninterrupted one. The choice is drawn on the CPU and
the transform is pure indexing on the batch's device: nothing waits for the GPU.
"""

from __future__ import annotations

import torch

Batch = dict[str, torch.Tensor]


def dihedral(batch: Batch, generator: torch.Generator) -> Batch:
    """One of the 8 symmetries of the square (4 rotations by 90°, each with or without a mirror), drawn
    uniformly from ``generator`` and applied to the last two dimensions of every tensor of ``batch``.

    Every sample of the batch gets the same transform, and input and target stay aligned. Images with
    no preferred orientation (microscopy, a specimen under the objective) are as likely in any of the 8,
    so a few training images count as up to 8× as many without changing what the model is asked to do.
    Non-square tensors get only the 4 transforms that keep their shape (identity, the two mirrors and
    the half turn).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.arange(4.0).view(1, 1, 2, 2)
        >>> out = dihedral({"input": x, "target": x + 10}, g)
        >>> bool(torch.equal(out["target"] - out["input"], torch.full((1, 1, 2, 2), 10.0)))
        True
        >>> sorted(out["input"].flatten().tolist())  # the same pixels, moved
        [0.0, 1.0, 2.0, 3.0]
    """
    height, width = next(iter(batch.values())).shape[-2:]
    turns = int(torch.randint(0, 4, (), generator=generator))
    mirror = bool(torch.randint(0, 2, (), generator=generator))
    if height != width:  # a quarter turn would swap height and width: no turn or a half turn, each as likely
        turns = 2 * (turns % 2)
    return {key: _transform(value, turns, mirror) for key, value in batch.items()}


def _transform(x: torch.Tensor, turns: int, mirror: bool) -> torch.Tensor:
    x = torch.rot90(x, turns, dims=(-2, -1)) if turns else x
    return x.flip(-1) if mirror else x
