"""The world size and the sum over processes that the Lightning modules read from their trainer."""

from __future__ import annotations

from types import SimpleNamespace

import pytorch_lightning as pl
import torch
from torch import Tensor

from mtl.training.ranks import rank_sum, trainer_world_size


class _InPlaceSumStrategy:
    """A strategy of ``ranks`` equal processes that, as Lightning's DDP, reduces in place."""

    def __init__(self, ranks: int) -> None:
        self.ranks = ranks
        self.ops: list[str] = []

    def reduce(self, t: Tensor, reduce_op: str) -> Tensor:
        self.ops.append(reduce_op)
        return t.mul_(self.ranks)


def _attached(ranks: int) -> tuple[pl.LightningModule, _InPlaceSumStrategy]:
    module = pl.LightningModule()
    strategy = _InPlaceSumStrategy(ranks)
    module.trainer = SimpleNamespace(world_size=ranks, strategy=strategy)  # type: ignore[assignment]
    return module, strategy


def test_world_size_is_the_trainers_or_one_without_a_trainer() -> None:
    assert trainer_world_size(pl.LightningModule()) == 1
    assert trainer_world_size(_attached(3)[0]) == 3


def test_rank_sum_sums_with_the_strategy_and_leaves_its_input_alone() -> None:
    module, strategy = _attached(4)
    x = torch.tensor([1.0, 2.5, -3.0])
    kept = x.clone()
    total = rank_sum(module)(x)
    # four equal processes: four times each entry, computed here without the strategy
    torch.testing.assert_close(total, torch.tensor([4.0, 10.0, -12.0]))
    torch.testing.assert_close(x, kept)  # the in-place reduce worked on a copy
    assert strategy.ops == ["sum"]


def test_rank_sum_reads_the_trainer_when_called() -> None:
    module = pl.LightningModule()
    reduce_sum = rank_sum(module)  # made before the trainer is attached (as in a hook)
    module.trainer = SimpleNamespace(world_size=2, strategy=_InPlaceSumStrategy(2))  # type: ignore[assignment]
    torch.testing.assert_close(reduce_sum(torch.ones(2)), torch.full((2,), 2.0))
