"""Training-batch augmentation: the dihedral transform, and the loop applying a task's augmentation."""

import collections

import pytest
import torch

from losstune.trainables.config import ConfigError, TrainConfig
from losstune.trainables.data.augment import dihedral
from losstune.trainables.loop import Trainer
from tests.trainables.tiny import TINY

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _draw(x: torch.Tensor, n: int, seed: int = 0) -> collections.Counter:
    generator = torch.Generator().manual_seed(seed)
    return collections.Counter(tuple(dihedral({"x": x}, generator)["x"].flatten().tolist()) for _ in range(n))


def test_dihedral_draws_each_of_the_8_symmetries_about_equally():
    counts = _draw(torch.arange(9.0).view(1, 1, 3, 3), 4000)
    assert len(counts) == 8  # all distinct images of an asymmetric 3×3: 4 turns × mirror
    assert min(counts.values()) > 400 and max(counts.values()) < 600  # 500 each expected; binomial sd ~21


def test_dihedral_keeps_a_non_square_shape_with_4_symmetries():
    generator = torch.Generator().manual_seed(0)
    x = torch.arange(6.0).view(1, 1, 2, 3)
    assert all(dihedral({"x": x}, generator)["x"].shape == x.shape for _ in range(50))
    counts = _draw(x, 2000)
    assert len(counts) == 4 and min(counts.values()) > 400


def test_dihedral_moves_every_tensor_of_a_batch_alike_and_repeats_with_the_seed():
    x = torch.rand(5, 2, 8, 8)
    batch = {"input": x, "target": 2 * x, "mask": x > 0.5}
    outs = [dihedral(batch, torch.Generator().manual_seed(s)) for s in range(6)]
    for out in outs:
        assert torch.equal(out["target"], 2 * out["input"]) and torch.equal(out["mask"], out["input"] > 0.5)
        # each sample's channel keeps its own pixels, only moved
        assert torch.equal(out["input"].flatten(2).sort(-1)[0], x.flatten(2).sort(-1)[0])
    assert len({tuple(o["input"].flatten()[:8].tolist()) for o in outs}) > 1  # the seed changes the draw
    again = dihedral(batch, torch.Generator().manual_seed(3))
    assert torch.equal(again["input"], outs[3]["input"])


def _trainer(augment: str, seed: int = 0) -> Trainer:
    config = {**TINY["microscopy-unet"], "seed": seed, "epochs": 1}
    return Trainer({**config, "data": {**config["data"], "augment": augment}}, warn_small_val=False)


def test_the_loop_augments_training_batches_only():
    plain, augmented = _trainer("none"), _trainer("dihedral")
    assert plain.task.augment is None and augmented.task.augment is dihedral
    # same data and initial weights: validation is not augmented
    before = [{k: v for k, v in t.evaluate().items() if k != "metrics_time_s"} for t in (plain, augmented)]
    assert before[0] == before[1]
    seen = []

    def recording(batch, generator):
        seen.append(batch["input"])
        return dihedral(batch, generator)

    augmented.task.augment = recording
    plain.run_epoch()
    augmented.run_epoch()
    assert len(seen) == augmented.steps_per_epoch
    assert sum(b.shape[0] for b in seen) == augmented.task.num_train
    weights = [dict(t.model.named_parameters())["head.weight"] for t in (plain, augmented)]
    assert not torch.equal(*weights), "the augmented run trained on other batches"


def test_augment_setting_is_checked():
    from losstune.trainables.tasks.microscopy import build

    raw = {**TINY["microscopy-unet"], "data": {**TINY["microscopy-unet"]["data"], "augment": "rotate"}}
    with pytest.raises(ConfigError, match=r"data\.augment"):
        build(TrainConfig.model_validate(raw))
