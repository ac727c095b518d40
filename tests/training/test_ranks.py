"""The world size and the sum over processes that the Lightning modules read from their trainer,
and whether the default process group spans several processes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from mtl.training.ranks import is_multi_process, rank_sum, trainer_world_size

ROOT = Path(__file__).resolve().parents[2]


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


def _multi_process_worker(rank: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        (Path(out_dir) / f"rank{rank}.txt").write_text(str(is_multi_process()))
    finally:
        dist.destroy_process_group()


def test_multi_process_only_with_a_process_group_of_several_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not dist.is_initialized()
    assert is_multi_process() is False
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert is_multi_process() is False
    finally:
        dist.destroy_process_group()
    monkeypatch.syspath_prepend(str(ROOT))  # the workers import this module by name
    mp.spawn(_multi_process_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["True", "True"]
