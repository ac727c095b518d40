"""``mtl train experiment=lm_olmoe trainer=ddp`` with two real CPU processes (gloo).

Same global batch: each rank reads its own ``B`` windows of every global batch of
``2B`` (:class:`~mtl.data.text.RandomBlockLoader`), and DDP averages the two
gradients. The OLMoE load-balance loss is a product of two batch means, not a mean
over tokens; the router losses count every rank's tokens
(:func:`~mtl.moe.group_counts.count_routing_over`: per-expert and token counts summed
over the ranks), so the ranks' losses average to the global batch's. The
single-process reference is therefore one process reading the global batch of ``2B``:
the same windows, the same optimizer steps, the same losses and weights.

Validation: the loss is a token-weighted torchmetrics mean and the routing
statistics and expert loads are summed over the ranks
(:mod:`mtl.training.routing_totals`), so they equal the single-process values over
the same val blocks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Light imports only at the top: the spawned workers import this module (mtl.data.text
# and the runner import Lightning, which would double the workers' start-up time).
from mtl.moe import CapacityDispatch, DroplessDispatch, MoELayer, SwiGLUExperts, TopKGate
from mtl.training.routing_totals import RoutingTotals, sum_over_ranks

ROOT = Path(__file__).resolve().parents[2]
B = 4  # per rank; the global batch is 2 * B
STEPS = 10  # DDP batches per epoch (the single-process run reads 2 * STEPS of B)
VAL_BATCH = 8  # per rank; the single-process run validates the same blocks in batches of 16
LM = [
    "experiment=lm_olmoe",
    "model.d_model=16",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.d_ff=32",
    "model.moe.num_experts=16",  # top-8 of 16
    "model.moe.experts.d_hidden=8",
    "data.block_size=16",
    f"data.batch_size={B}",
    "trainer.limit_val_batches=3",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=5",
    "scheduler.warmup_steps=4",
    "generate.max_new_tokens=4",
    "num_threads=1",
]
DDP = ["trainer=ddp", "trainer.devices=2", f"data.steps_per_epoch={STEPS}"]
DDP += [f"data.val_batch_size={VAL_BATCH}"]
# one process, the global batch
SINGLE = [f"data.batch_size={2 * B}", f"data.steps_per_epoch={STEPS}"]
SINGLE += [f"data.val_batch_size={2 * VAL_BATCH}"]


# ----------------------------------------------------------------- data sharding
@pytest.mark.parametrize("steps", [5, 40])  # 40 * 2 * 4 > 300 windows: a second permutation
def test_ranks_read_disjoint_parts_of_each_global_batch(steps: int) -> None:
    from mtl.data.text import RandomBlockLoader

    tokens = torch.arange(316)  # 300 windows of 16 + 1: offset == first token
    kw = {"tokens": tokens, "block_size": 16, "seed": 7}

    def starts(loader: Any, epoch: int) -> list[list[int]]:
        loader.set_epoch(epoch)
        return [batch.inputs[:, 0].tolist() for batch in loader]

    for epoch in range(2):
        ranks = [
            starts(RandomBlockLoader(**kw, batch_size=B, steps=steps, rank=r, world_size=2), epoch)
            for r in range(2)
        ]
        full = starts(RandomBlockLoader(**kw, batch_size=2 * B, steps=steps), epoch)
        micro = starts(RandomBlockLoader(**kw, batch_size=B, steps=2 * steps), epoch)
        assert len(ranks[0]) == len(ranks[1]) == steps
        for s in range(steps):  # global batch s = rank 0's batch s + rank 1's batch s
            assert ranks[0][s] + ranks[1][s] == full[s]
            assert [ranks[0][s], ranks[1][s]] == micro[2 * s : 2 * s + 2]
        read = [w for r in ranks for batch in r for w in batch]
        if steps * 2 * B <= 300:  # no window read twice within the epoch, by any rank
            assert len(set(read)) == len(read)
        else:  # each window once before any window twice
            counts = torch.bincount(torch.tensor(read), minlength=300)
            assert counts.max() - counts.min() <= 1
    assert starts(RandomBlockLoader(**kw, batch_size=B, steps=steps), 1) != micro


def test_text_datamodule_gives_each_rank_its_part() -> None:
    from mtl.data.text import TextDataModule

    loaders = []
    for rank in range(2):
        dm = TextDataModule(path=None, block_size=16, batch_size=B, steps_per_epoch=50)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)  # type: ignore[assignment]
        loaders.append(dm.train_dataloader())
        assert (loaders[-1].rank, loaders[-1].world_size) == (rank, 2)
    # Identical text may recur in the corpus: compare where windows start.
    starts = [loader.offsets(0).flatten() for loader in loaders]
    assert not set(starts[0].tolist()) & set(starts[1].tolist())
    assert len(set(starts[0].tolist())) == len(starts[0]) == 50 * B
    for loader, first in zip(loaders, starts, strict=True):  # the batches are those windows
        batch = next(iter(loader))
        torch.testing.assert_close(
            batch.inputs, torch.stack([dm.tokens("train")[o : o + 16] for o in first[:B].tolist()])
        )


def test_rank_outside_world_size_is_refused() -> None:
    from mtl.data.text import RandomBlockLoader

    with pytest.raises(ValueError, match="rank must be in"):
        RandomBlockLoader(
            tokens=torch.arange(40), block_size=4, batch_size=2, steps=1, rank=2, world_size=2
        )


# ------------------------------------------------------- routing over the ranks
def _layer(capacity: bool) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(
        gate=TopKGate(d_model=8, num_experts=8, k=2),
        experts=SwiGLUExperts(num_experts=8, d_model=8, d_hidden=4),
        dispatch=CapacityDispatch(capacity_factor=1.0) if capacity else DroplessDispatch(),
    )


def _tokens() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(40, 8, generator=gen)


def _routing_worker(rank: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)

    def reduce_sum(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    try:
        layer, x = _layer(capacity=False), _tokens()
        half = x[rank * 20 : (rank + 1) * 20]
        step = sum_over_ranks({0: layer(half).stats}, reduce_sum)
        # A pass of uneven batches; rank 1 sees none for layer 3 and takes part with zeros.
        totals = RoutingTotals()
        for start in range(0, 20, 7):
            totals.update({0: layer(half[start : start + 7]).stats})
            if rank == 0:
                totals.update({3: layer(half[start : start + 7]).stats})
        totals.reduce(reduce_sum, {0: 8, 3: 8}, torch.device("cpu"))
        torch.save({"step": step, "pass": totals.stats()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _as_numbers(stats: object) -> dict[str, object]:
    d = {k: float(v) for k, v in stats.as_dict().items()}  # type: ignore[attr-defined]
    return d | {
        "tokens_per_expert": stats.tokens_per_expert_E.tolist(),  # type: ignore[attr-defined]
        "mean_weight": stats.mean_weight_E.tolist(),  # type: ignore[attr-defined]
        "num_tokens": float(stats.num_tokens),  # type: ignore[attr-defined]
    }


def _close(got: object, want: object) -> None:
    g, w = _as_numbers(got), _as_numbers(want)
    assert g.keys() == w.keys()
    for key in w:
        assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), key


def test_routing_statistics_over_two_processes_equal_one_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))  # the workers import this module by name
    mp.spawn(_routing_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    layer, x = _layer(capacity=False), _tokens()
    with torch.no_grad():
        want = layer(x).stats  # one process, one batch of all 40 tokens
        want_layer3 = layer(x[:20]).stats  # only rank 0's tokens reached layer 3
        rank0 = layer(x[:20]).stats
    assert float(rank0.as_dict()["load_max_over_mean"]) != pytest.approx(
        float(want.as_dict()["load_max_over_mean"])
    )  # a rank alone differs
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        _close(got["step"][0], want)
        _close(got["pass"][0], want)
        _close(got["pass"][3], want_layer3)


def test_routing_totals_of_batches_equal_one_batch_with_drops() -> None:
    # Capacity dropping: drops depend on the batch, so the reference is the sum of
    # per-batch counts, and the means weighted by tokens.
    layer, x = _layer(capacity=True), _tokens()
    totals, parts = RoutingTotals(), []
    with torch.no_grad():
        for start in range(0, 40, 15):
            st = layer(x[start : start + 15]).stats
            totals.update({0: st})
            parts.append(st)
    got = totals.stats()[0]
    n = torch.stack([p.num_tokens for p in parts])
    assert float(got.dropped_slots) == sum(float(p.dropped_slots) for p in parts) > 0
    assert float(got.dropped_tokens) == sum(float(p.dropped_tokens) for p in parts)
    load_E = sum(p.tokens_per_expert_E for p in parts)
    torch.testing.assert_close(got.tokens_per_expert_E, load_E)
    entropy = float((torch.stack([p.entropy for p in parts]) * n).sum() / n.sum())
    assert float(got.entropy) == pytest.approx(entropy, rel=1e-6)
    ratio = float(load_E.max() / load_E.mean())
    assert float(got.as_dict()["load_max_over_mean"]) == pytest.approx(ratio, rel=1e-6)


# ------------------------------------------- router losses of the global batch
POOLINGS = ("sum_over_layers", "pooled")


def _tiny_lm(pooling: str) -> Any:
    from mtl.models.lm import MoEFFN, TransformerLM

    torch.manual_seed(0)
    moe = MoEFFN(
        num_experts=8,
        gate=partial(TopKGate, k=2),
        experts=partial(SwiGLUExperts, d_hidden=8),
        aux_loss_weights={"load_balance": 1.0, "z_loss": 0.1},
    )
    return TransformerLM(
        vocab_size=30, d_model=8, n_layers=2, n_heads=2, d_ff=16, moe=moe, aux_loss_pooling=pooling
    )


def _lm_batch() -> torch.Tensor:
    return torch.randint(0, 30, (4, 12), generator=torch.Generator().manual_seed(1))


def _lm_grads(lm: Any, ids: torch.Tensor, run: Any = None) -> dict[str, torch.Tensor]:
    """Aux loss and gradients of ``lm`` after a step on ``ids`` through ``run`` (e.g. DDP)."""
    out = (run or lm)(ids, ids)
    (out.loss + out.aux_loss).backward()
    return {"aux": out.aux_loss.detach()} | {
        n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None
    }


def _ddp_worker(rank: int, store: str, out_dir: str, counted: bool) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from mtl.moe.group_counts import count_routing_over

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        results = {}
        for pooling in POOLINGS:
            lm = _tiny_lm(pooling)
            if counted:
                count_routing_over(lm, dist.group.WORLD)
            rows = _lm_batch()[2 * rank : 2 * rank + 2]
            got = _lm_grads(lm, rows, DistributedDataParallel(lm))
            dist.all_reduce(got["aux"])
            got["aux"] /= 2
            if rank == 0:  # rank 0 alone in eval (sampling): no collective, no hang
                with torch.no_grad():
                    lm.eval()(_lm_batch()[:1])
            results[pooling] = got
        dist.barrier()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("counted", [True, False], ids=["global_counts", "rank_counts"])
def test_ddp_router_losses_equal_one_process_on_the_global_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counted: bool
) -> None:
    """Counts summed over the ranks: DDP's losses and gradients are the global batch's.

    Negative control (``rank_counts``): each rank's own counts give a different objective.
    """
    monkeypatch.syspath_prepend(str(ROOT))  # the workers import this module by name
    args = (str(tmp_path / "store"), str(tmp_path), counted)
    mp.spawn(_ddp_worker, args=args, nprocs=2, join=True)
    got = torch.load(tmp_path / "rank0.pt", weights_only=False)
    for pooling in POOLINGS:
        want = _lm_grads(_tiny_lm(pooling), _lm_batch())
        assert got[pooling].keys() == want.keys()
        same = all(
            torch.allclose(got[pooling][k], v, rtol=1e-5, atol=1e-6) for k, v in want.items()
        )
        assert same == counted, pooling


# ------------------------------------------------------------- the real command
def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def _column(out_dir: Path, name: str) -> list[float]:
    lines = (out_dir / "csv" / "metrics.csv").read_text().splitlines()
    col = lines[0].split(",").index(name)
    return [float(row.split(",")[col]) for row in lines[1:] if row.split(",")[col]]


def _cli(out_dir: Path, extra: list[str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "NODE_RANK")}
    cmd = [sys.executable, "-m", "mtl.cli", "train", *LM, *extra, f"output_dir={out_dir}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _last(out_dir: Path) -> Path:
    # A resumed run names its newest checkpoint in metrics.json (last.ckpt may be taken).
    return Path(json.loads((out_dir / "metrics.json").read_text())["last_ckpt"])


def _assert_same_weights(got_dir: Path, want_dir: Path) -> None:
    want, got = _weights(_last(want_dir)), _weights(_last(got_dir))
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_two_process_lm_run_equals_one_process_and_resumes_both_ways(tmp_path: Path) -> None:
    from mtl.training.config import compose_config
    from mtl.training.train import train

    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    done = _cli(ddp_dir, [*DDP, "trainer.max_steps=20"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in done.stderr  # two processes really ran
    single = train(
        compose_config("train", [*LM, *SINGLE, "trainer.max_steps=20", f"output_dir={single_dir}"])
    )
    ddp = json.loads((ddp_dir / "metrics.json").read_text())

    assert ddp["global_step"] == single["global_step"] == 20
    assert _column(ddp_dir, "val/loss") == pytest.approx(_column(single_dir, "val/loss"), rel=1e-5)
    _assert_same_weights(ddp_dir, single_dir)
    # Perplexity, routing statistics and expert loads over every rank's tokens.
    for key in ("val_loss", "val_ppl"):
        assert ddp[key] == pytest.approx(single[key], rel=1e-5), key
    assert ddp["routing"].keys() == single["routing"].keys()
    for key, value in single["routing"].items():
        assert ddp["routing"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    load = single["routing"]["val/moe/layer0/tokens_per_expert"]
    assert sum(load) == 8 * 3 * 2 * VAL_BATCH * 16  # k=8 slots of every val token
    assert max(load) > min(load)  # a real routing, not every expert for every token

    # Checkpoints written once, by rank 0: the same files as one process writes.
    names = sorted(p.name for p in (ddp_dir / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (single_dir / "checkpoints").iterdir())

    # Resume in the other mode, 10 more steps each: both continue as one process does.
    more = ["trainer.max_steps=30", "resume=last"]
    runs = {name: tmp_path / name for name in ("ddp_to_one", "one_to_one", "one_to_ddp")}
    shutil.copytree(ddp_dir, runs["ddp_to_one"])
    for name in ("one_to_one", "one_to_ddp"):
        shutil.copytree(single_dir, runs[name])
    for name in ("ddp_to_one", "one_to_one"):
        train(compose_config("train", [*LM, *SINGLE, *more, f"output_dir={runs[name]}"]))
    done = _cli(runs["one_to_ddp"], [*DDP, *more])
    assert done.returncode == 0, done.stderr[-3000:]
    for name in runs:
        assert json.loads((runs[name] / "metrics.json").read_text())["global_step"] == 30
    _assert_same_weights(runs["ddp_to_one"], runs["one_to_one"])
    _assert_same_weights(runs["one_to_ddp"], runs["one_to_one"])
