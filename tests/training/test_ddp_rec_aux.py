"""Rankers' gate auxiliary losses under DDP, with two real CPU processes (gloo).

A load-balance loss is a product of two batch means (``E * sum_i f_i * P_i``), so the
mean of the ranks' losses on their halves is not the loss of the global batch. Under
data parallelism :meth:`~mtl.training.rec_module.RecModule.configure_model` makes the
gates of every multi-gate mixture count over the ranks
(:func:`~mtl.moe.group_counts.count_routing_over`): the ranks' aux losses then average
to the single-process aux loss of the global batch and DDP's mean of the gradients is
its gradient. The negative control (``rank_counts``) leaves each rank its own counts.

The splits may be uneven: a rank's task loss is scaled by ``R * B_r / B`` in the test so
that the task losses average to the global batch's too, and the per-token aux losses
(z-loss, entropy) are each rank's share of the global mean. With uneven halves one rank
may fold the embedding into the model's first layer (``forward_projected``) and the
other not: both paths count, so the collectives match.
"""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]
ROWS = 16  # the global batch
# name -> (rows of rank 0, rank 1 gets the rest)
CASES = {
    "mmoe_topk_load_balance": 8,
    "ple_masked_topk": 11,  # top-k gates masked to shared + own experts
    "mmoe_dense_projected": 12,  # rank 0 folds the embedding (12 rows), rank 1 (4) does not
}


def _spec() -> Any:
    from mtl.data.spec import CategoricalFeature, FeatureSpec, NumericFeature, TaskSpec

    return FeatureSpec(
        categorical=[CategoricalFeature("item", 3, 4)],
        numeric=[NumericFeature("age", 0.0, 1.0), NumericFeature("price", 0.0, 1.0)],
        tasks=[TaskSpec("click", "binary"), TaskSpec("like", "binary")],
    )


def _module(case: str, aux: bool = True) -> Any:
    """The case's RecModule, seeded: every process builds the same weights."""
    from mtl.models.rec import PLE, MMoE
    from mtl.models.rec.embedding import FeatureEmbedding
    from mtl.models.rec.ranker import Ranker
    from mtl.moe import TopKGate
    from mtl.training.rec_module import RecModule

    torch.manual_seed(0)
    spec = _spec()
    d_in = 4 + 2
    common = {"d_in": d_in, "tasks": spec.task_names, "expert_hidden": [8], "tower_hidden": [4]}
    if case == "mmoe_topk_load_balance":
        weights = {"load_balance": 0.01}
        model = MMoE(**common, num_experts=4, gate=partial(TopKGate, k=2), sparse_compute=False)
    elif case == "ple_masked_topk":
        weights = {"load_balance": 0.01, "z_loss": 1e-3}
        model = PLE(
            **common,
            num_levels=2,
            num_shared_experts=2,
            num_task_experts=2,
            gate=partial(TopKGate, k=2),
            sparse_compute=False,
        )
    else:
        weights = {"z_loss": 0.01, "entropy": 0.01}
        model = MMoE(**common, num_experts=4)
    model.aux_loss_weights = weights if aux else {}
    return RecModule(net=Ranker(embedding=FeatureEmbedding(spec=spec), model=model))


def _batch(rows: slice | None = None) -> Any:
    from mtl.data.tabular import RecBatch

    gen = torch.Generator().manual_seed(1)
    batch = RecBatch(
        cat=torch.randint(0, 4, (ROWS, 1), generator=gen),
        num=torch.randn(ROWS, 2, generator=gen),
        labels=torch.randint(0, 2, (ROWS, 2), generator=gen).float(),
    )
    if rows is None:
        return batch
    return RecBatch(cat=batch.cat[rows], num=batch.num[rows], labels=batch.labels[rows])


def _step(module: Any, batch: Any, run: Any = None, num_ranks: int = 1) -> dict[str, torch.Tensor]:
    """Aux loss and gradients of one training step; ``run``: the DDP wrapper, if any."""
    module.train()
    out = (run or module)(batch)
    total, _ = module.compute_loss(out, batch.labels)
    task = total - out.aux_loss
    # this rank's share of the global batch's mean task loss (1 in one process)
    share = num_ranks * batch.batch_size / ROWS
    (task * share + out.aux_loss).backward()
    return {"aux": out.aux_loss.detach().float()} | {
        n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None
    }


def _worker(rank: int, store: str, out_dir: str, counted: bool) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from mtl.moe.group_counts import _CountOverGroup

    torch.set_num_threads(1)
    # a collective on one rank only fails after a minute instead of hanging the suite
    timeout = timedelta(seconds=60)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timeout
    )
    try:
        results: dict[str, Any] = {}
        for case, split in CASES.items():
            module = _module(case)
            if counted:
                module.configure_model()
            rows = slice(0, split) if rank == 0 else slice(split, ROWS)
            got = _step(module, _batch(rows), DistributedDataParallel(module), num_ranks=2)
            dist.all_reduce(got["aux"])
            got["aux"] /= 2
            got["folds"] = module.net.folds(_batch(rows).batch_size)
            if rank == 0:  # rank 0 alone evaluates: no collective, no hang
                module.eval()(_batch())
                with torch.no_grad():
                    module.train()(_batch())
            results[case] = got
        # a model without gate losses gets no hooks (its counts would go unused)
        plain = _module("mmoe_topk_load_balance", aux=False)
        plain.configure_model()
        hooks = [h for m in plain.modules() for h in m._forward_hooks.values()]
        results["plain_hooks"] = sum(isinstance(h, _CountOverGroup) for h in hooks)
        dist.barrier()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("counted", [True, False], ids=["global_counts", "rank_counts"])
def test_ddp_gate_aux_losses_equal_one_process_on_the_global_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counted: bool
) -> None:
    """Counts summed over the ranks: DDP's aux losses and gradients are the global batch's.

    Negative control (``rank_counts``): each rank's own counts give a different objective.
    """
    monkeypatch.syspath_prepend(str(ROOT))  # the workers import this module by name
    args = (str(tmp_path / "store"), str(tmp_path), counted)
    mp.spawn(_worker, args=args, nprocs=2, join=True)
    got = torch.load(tmp_path / "rank0.pt", weights_only=False)
    other = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert got["plain_hooks"] == 0
    assert other["mmoe_dense_projected"]["folds"] is False  # 4 rows: the plain path
    assert got["mmoe_dense_projected"]["folds"] is True  # 12 rows: projected
    for case in CASES:
        want = _step(_module(case), _batch())
        assert float(want["aux"]) > 0
        results = {k: v for k, v in got[case].items() if k != "folds"}
        assert results.keys() == want.keys(), case
        same = {k: torch.allclose(results[k], v, rtol=1e-5, atol=1e-7) for k, v in want.items()}
        if counted:
            assert all(same.values()), (case, [k for k, ok in same.items() if not ok])
        else:  # the aux loss and the gates' gradients differ
            assert not same["aux"], case
            assert not all(same.values()), case


# ------------------------------------------------------------- the real command
CLI_RUN = [
    "data.source_kwargs.n=4000",
    "data.source_kwargs.n_users=100",
    "data.source_kwargs.n_items=50",
    "model.num_experts=4",
    "model.expert_hidden=[8]",
    "model.tower_hidden=[4]",
    "model.dropout=0.0",
    "model.gate=top_k",
    "model.gate.k=2",
    "model.sparse_compute=false",
    "model.aux_loss_weights={load_balance:0.5}",  # large: per-rank counts move weights ~1e-2
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "num_threads=1",
]


@pytest.mark.slow
def test_two_process_ranker_run_with_load_balance_equals_one_process(tmp_path: Path) -> None:
    """``mtl train trainer=ddp`` of a top-k MMoE with a load-balance loss: the weights of
    one process on the global batch (``RecModule.configure_model`` counts over the ranks)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "NODE_RANK")}
    runs = {
        "ddp": ["trainer=ddp", "trainer.devices=2", "data.batch_size=128"],
        "single": ["data.batch_size=256"],
    }
    for name, extra in runs.items():
        cmd = [sys.executable, "-m", "mtl.cli", "train", *CLI_RUN, *extra]
        done = subprocess.run(
            [*cmd, f"output_dir={tmp_path / name}"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    got, want = (
        torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for name in runs
    )
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)
