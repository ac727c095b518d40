"""Epoch means and expert diagnostics synced over two processes (gloo on CPU) equal
the values of one process that saw every batch."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from mtl.training.diagnostics import DiagnosticsAccumulator
from mtl.training.step_logging import EpochMeans

TASKS = ["a", "b"]
KINDS = ["shared", "shared", "task:a", "task:b"]
SIZES = [16, 9, 16, 3, 16, 12]  # uneven batch sizes: the means must weigh by them


def _batches() -> list[tuple[dict[str, Tensor], Any]]:
    """Loss values and model outputs of six batches, the same in every process.

    The outputs carry what the accumulator reads of a ``MultiTaskOutput``; building
    them without ``mtl.models`` keeps the spawned processes' imports short."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for B in SIZES:
        losses = {"loss": torch.rand((), generator=gen), "aux": torch.rand((), generator=gen)}
        gates = {}
        for g, task in enumerate(TASKS):
            logits_BE = torch.randn(B, len(KINDS), generator=gen)
            logits_BE[:, 3 - g] = -torch.inf  # the other task's expert is masked off
            gates[task] = logits_BE.softmax(-1)
        y_EBH = torch.randn(len(KINDS), B, 4, generator=gen).relu()
        y_EBH[1] = 0.0
        output = SimpleNamespace(
            batch_size=B,
            gate_weights=gates,
            expert_outputs=y_EBH,
            expert_kinds=KINDS,
        )
        out.append((losses, output))
    return out


def _results(batches: list[tuple[dict[str, Tensor], Any]]) -> dict[str, Any]:
    means = EpochMeans()
    diag = DiagnosticsAccumulator(tasks=TASKS)
    for losses, output in batches:
        means.update(losses, output.batch_size)
        diag.update(output)
    return {
        "means": {k: float(v) for k, v in means.compute().items()},
        "diagnostics": diag.compute().to_dict(),
    }


def _worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        batches = _batches()
        half = len(batches) // world_size
        mine = batches[rank * half : (rank + 1) * half]
        torch.save(_results(mine), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _assert_same(got: Any, want: Any, where: str = "") -> None:
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            _assert_same(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7, nan_ok=True), where
    else:
        assert got == want, where


def test_two_processes_with_half_the_batches_each_equal_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The spawned processes import this module by name from the repository root.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    world_size = 2
    mp.spawn(
        _worker,
        args=(world_size, str(tmp_path / "store"), str(tmp_path)),
        nprocs=world_size,
        join=True,
    )
    want = _results(_batches())
    halves = [_results(_batches()[:3]), _results(_batches()[3:])]
    assert halves[0]["means"] != pytest.approx(want["means"])  # each half alone differs
    for rank in range(world_size):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        _assert_same(got, want, f"rank{rank}")
    # the masked experts and the dead one make the statistics non-trivial
    assert want["diagnostics"]["allowed"] == [[True, True, True, False], [True, True, False, True]]
    assert want["diagnostics"]["zero_frac"][1] == 1.0
