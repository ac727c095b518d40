"""Batch norm under ``trainer=ddp`` (``sync_batchnorm: false``): what is and is not synchronised.

``conf/trainer/ddp.yaml`` states: each rank normalises with its own batch, and DDP
broadcasts rank 0's running statistics (``broadcast_buffers``, on by default in torch
and Lightning) at the start of every training forward, so the running statistics a
run saves (rank 0 writes checkpoints) are rank 0's. Two real gloo processes check it
against references written here: the gradients are the mean of the per-half-batch
gradients (not the full batch's), and the final running statistics follow rank 0's
halves only. torch's ``SyncBatchNorm`` refuses CPU tensors, and the config check says
so before any process starts.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
STEPS, HALF = 3, 16


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=0.3), nn.ReLU(), nn.Linear(6, 1)
    )


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    # Rank halves with different means, so per-half statistics differ from the full batch's.
    out = []
    for _ in range(STEPS):
        x = torch.randn(2 * HALF, 4, generator=gen)
        x[HALF:] += 1.5
        out.append((x, torch.randn(2 * HALF, 1, generator=gen)))
    return out


def _sgd_step(model: nn.Module, grads: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads, strict=True):
            p -= 0.1 * g


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]


def _ddp_worker(rank: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = nn.parallel.DistributedDataParallel(_model())  # broadcast_buffers=True
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in _batches():
            half = slice(rank * HALF, (rank + 1) * HALF)
            opt.zero_grad()
            nn.functional.mse_loss(model(x[half]), y[half]).backward()
            opt.step()
        state = {k: v.clone() for k, v in model.module.state_dict().items()}
        # SyncBatchNorm on CPU: torch refuses in the first training forward.
        sync = nn.SyncBatchNorm(6)
        try:
            sync(torch.randn(4, 6))
            state["sync_error"] = ""  # type: ignore[assignment]
        except ValueError as err:
            state["sync_error"] = str(err)  # type: ignore[assignment]
        torch.save(state, Path(out_dir) / f"rank{rank}.pt")
        # Both ranks done, and DDP's reducer gone, before the group is: tearing gloo down
        # under a live reducer can abort a process at exit.
        del model, opt
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Results are on disk: leave without the interpreter's teardown, where the order in
    # which torch's C++ statics are destroyed can still abort a gloo worker ("terminate
    # called without an active exception", pytorch/pytorch#90549). Failures raise above.
    os._exit(0)


def test_ddp_batch_norm_is_per_rank_and_saves_rank_zero_statistics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))  # the workers import this module by name
    mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    # References in one process: per-half (what the yaml states) and full batch (what it is not).
    per_half, full = _model(), _model()
    rank0_stats = copy.deepcopy(per_half[1])  # running statistics fed with rank 0's halves only
    for x, y in _batches():
        halves = [
            _grads(per_half, x[r * HALF : (r + 1) * HALF], y[r * HALF : (r + 1) * HALF])
            for r in range(2)
        ]
        # per_half's own running stats saw both halves: follow rank 0's chain apart, on
        # the batch norm's input (the first layer's output at this step's weights)
        with torch.no_grad():
            rank0_stats.train()(per_half[0](x[:HALF]))
        _sgd_step(per_half, [(a + b) / 2 for a, b in zip(*halves, strict=True)])
        _sgd_step(full, _grads(full, x, y))

    weights = [k for k in got[0] if not k.startswith("1.running") and k != "1.num_batches_tracked"]
    weights.remove("sync_error")
    ref = dict(per_half.state_dict())
    for key in weights:  # both ranks hold the same weights: the mean of the half-batch gradients
        for rank in range(2):
            torch.testing.assert_close(got[rank][key], ref[key], rtol=1e-5, atol=1e-6, msg=key)
    assert any(  # and not the full-batch gradient (the statistics differ between the halves)
        not torch.allclose(got[0][k], full.state_dict()[k], rtol=1e-3, atol=1e-5) for k in weights
    )
    # Running statistics: rank 0's chain of its own halves (broadcast to rank 1 before each
    # forward, then moved by rank 1's half), so the checkpoint rank 0 writes holds rank 0's.
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(
            got[0][f"1.{name}"], getattr(rank0_stats, name), rtol=1e-5, atol=1e-6
        )
        assert not torch.allclose(got[1][f"1.{name}"], got[0][f"1.{name}"])
    assert int(got[0]["1.num_batches_tracked"]) == STEPS

    for rank in range(2):
        assert "SyncBatchNorm expected input tensor to be on GPU" in got[rank]["sync_error"]


def test_sync_batchnorm_on_cpu_is_refused_by_the_config_check() -> None:
    from omegaconf import OmegaConf

    from mtl.training.config import ConfigError
    from mtl.training.config_checks import check_distributed

    cfg = OmegaConf.create(
        {"kind": "rec", "trainer": {"accelerator": "cpu", "sync_batchnorm": True}}
    )
    with pytest.raises(ConfigError, match=r"trainer.sync_batchnorm=true needs GPUs"):
        check_distributed(cfg)
    cfg.trainer.sync_batchnorm = False
    check_distributed(cfg)
    cfg.trainer.accelerator = "gpu"
    cfg.trainer.sync_batchnorm = True
    check_distributed(cfg)  # GPUs: SyncBatchNorm normalises with the global batch


def test_ddp_config_composes_with_per_rank_batch_norm() -> None:
    from mtl.training.config import ConfigError, compose_config
    from mtl.training.config_checks import check_distributed

    cfg = compose_config("train", ["trainer=ddp", "model.expert_norm=true"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.sync_batchnorm is False
    check_distributed(cfg)
    with pytest.raises(ConfigError, match="sync_batchnorm"):
        check_distributed(compose_config("train", ["trainer=ddp", "trainer.sync_batchnorm=true"]))
