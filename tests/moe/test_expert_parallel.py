"""Expert-parallel MoE layer with 2 and 4 real gloo processes against the single-process layer.

Each case builds the same full layer (seeded) in every process and in the test; every
rank keeps its shard of the experts and routes its own tokens. The single-process
``MoELayer`` (dropless) runs on all ranks' tokens concatenated in rank order. Compared:
outputs, gradients of the inputs, of the router (summed over ranks, as DDP's sum before
its average) and of the expert weights (the rank's slice of the full gradient), the
load-balance loss (the mean over ranks with equal batches equals the single-process
loss: ``f`` from the group's counts, ``P`` averaged) and the routing statistics
(:func:`reduce_routing_stats`).

The load-balance, z- and entropy losses are global for uneven batches too: the mean of
the ranks' losses equals the single-process loss, a rank without tokens contributing 0.
A 2-layer LM with either ``aux_loss_pooling`` gives the single-process auxiliary losses
and router gradients.

The objective is ``sum(out * g) + aux_loss / R`` per rank, so that the sum over ranks is
the single-process ``sum(out * g) + aux_loss``.
"""

from __future__ import annotations

import socket
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from mtl.models.lm import MoEFFN, TransformerLM
from mtl.moe import DroplessDispatch, MoELayer, SwiGLUExperts, TopKGate, routing_stats
from mtl.moe.expert_parallel import (
    ExpertParallelDispatch,
    ExpertShard,
    gather_experts,
    map_expert_rows,
    parallelize_experts,
    reduce_routing_stats,
    shard_experts,
)

TOL = {"rtol": 1e-5, "atol": 1e-6}

# name -> (E, K, tokens per rank for R=2, for R=4, aux-loss weights)
CASES: dict[str, tuple[int, int, dict[int, list[int]], dict[str, float]]] = {
    "e8k2": (8, 2, {2: [6, 6], 4: [6, 6, 6, 6]}, {"load_balance": 0.5, "z_loss": 0.1}),
    # a rank with one token sends nothing to most experts; another rank has no tokens
    "e8k2_uneven": (
        8,
        2,
        {2: [0, 5], 4: [7, 0, 1, 9]},
        {"load_balance": 0.5, "z_loss": 0.1, "entropy": 0.2},
    ),
    "e64k8": (64, 8, {2: [12, 12], 4: [12, 12, 12, 12]}, {"load_balance": 0.5, "z_loss": 0.1}),
}
D, H = 8, 4
POOLINGS = ("sum_over_layers", "pooled")
# sequences of the LM's global batch per rank (a rank without any for R=4)
LM_ROWS = {2: [1, 3], 4: [1, 0, 2, 1]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_case(name: str, world: int) -> tuple[MoELayer, list[torch.Tensor], list[torch.Tensor]]:
    """The full layer and each rank's tokens and output weights, the same in every process."""
    E, K, tokens, aux = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)) + world)
    torch.manual_seed(world)
    layer = MoELayer(
        gate=TopKGate(d_model=D, num_experts=E, k=K),
        experts=SwiGLUExperts(num_experts=E, d_model=D, d_hidden=H),
        dispatch=DroplessDispatch(),
        aux_loss_weights=aux,
    )
    xs = [torch.randn(t, D, generator=gen) for t in tokens[world]]
    gs = [torch.randn(t, D, generator=gen) for t in tokens[world]]
    return layer, xs, gs


def run_layer(layer: MoELayer, x: torch.Tensor, g: torch.Tensor, scale: float) -> dict:
    x = x.clone().requires_grad_(True)
    out = layer(x)
    ((out.output * g).sum() + out.aux_loss * scale).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return {
        "out": out.output.detach(),
        "x_grad": x.grad,
        "grads": grads,
        "aux": {k: v.detach() for k, v in out.aux_losses.items()},
        "stats": out.stats,
    }


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        results = {}
        for name in CASES:
            layer, xs, gs = make_case(name, world)
            full_bank = layer.experts
            # the first case names its group by a 1-D device mesh, the others by a ProcessGroup
            group = init_device_mesh("cpu", (world,)) if name == "e8k2" else dist.group.WORLD
            layer.experts = shard_experts(full_bank, shard=rank, num_shards=world)
            layer.dispatch = ExpertParallelDispatch(group=group)
            res = run_layer(layer, xs[rank], gs[rank], 1.0 / world)
            router = res["grads"]["gate.proj.weight"]
            dist.all_reduce(router)
            res["stats"] = reduce_routing_stats(res["stats"], group)
            gathered = gather_experts(layer.experts, group)
            res["gathered_equal"] = all(
                torch.equal(a, b)
                for a, b in zip(gathered.parameters(), full_bank.parameters(), strict=True)
            )
            results[name] = res
        for pooling in POOLINGS:
            lm = make_lm(pooling)
            parallelize_experts(lm, group=dist.group.WORLD)
            results[pooling] = run_lm(lm, lm_rows(world)[rank], 1.0 / world)
            dist.all_reduce(results[pooling]["router_grad"])
        # negative control: shards in the wrong order (rank r holds the experts of shard R-1-r)
        layer, xs, gs = make_case("e8k2", world)
        wrong = shard_experts(layer.experts, shard=world - 1 - rank, num_shards=world)
        layer.experts = ExpertShard(local=wrong.local, num_experts=wrong.num_experts, shard=rank)
        layer.dispatch = ExpertParallelDispatch()
        results["wrong_order"] = run_layer(layer, xs[rank], gs[rank], 1.0 / world)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# 4 processes start in ~30 s on a loaded 2-core machine: slow; 2 processes run by default
@pytest.fixture(
    scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)], ids=["2proc", "4proc"]
)
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"ep{world}")
    mp.spawn(_worker, args=(world, free_port(), str(out_dir)), nprocs=world, join=True)
    return world, [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def make_lm(pooling: str) -> TransformerLM:
    torch.manual_seed(0)
    moe = MoEFFN(
        num_experts=8,
        gate=partial(TopKGate, k=2),
        experts=partial(SwiGLUExperts, d_hidden=8),
        aux_loss_weights={"load_balance": 1.0, "z_loss": 0.1},
    )
    return TransformerLM(
        vocab_size=30, d_model=D, n_layers=2, n_heads=2, d_ff=16, moe=moe, aux_loss_pooling=pooling
    )


def lm_rows(world: int) -> list[torch.Tensor]:
    ids = torch.randint(0, 30, (4, 12), generator=torch.Generator().manual_seed(1))
    return list(ids.split(LM_ROWS[world]))


def run_lm(lm: TransformerLM, ids: torch.Tensor, scale: float) -> dict:
    """The LM's aux losses and the gradient of ``scale * aux_loss`` for every router."""
    out = lm(ids)
    (out.aux_loss * scale).backward()
    router = [p.grad for n, p in lm.named_parameters() if n.endswith("gate.proj.weight")]
    return {
        "aux": {k: v.detach() for k, v in out.aux_losses.items()},
        "router_grad": torch.cat([g.reshape(-1) for g in router]),
    }


def single(name: str, world: int) -> dict:
    layer, xs, gs = make_case(name, world)
    return run_layer(layer, torch.cat(xs), torch.cat(gs), 1.0)


def rank_rows(world: int, name: str) -> list[slice]:
    sizes = CASES[name][2][world]
    starts = [sum(sizes[:r]) for r in range(world)]
    return [slice(s, s + n) for s, n in zip(starts, sizes, strict=True)]


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_and_gradients_equal_single_process(ranks, name: str) -> None:
    world, results = ranks
    want = single(name, world)
    E = CASES[name][0]
    L = E // world
    for r, rows in enumerate(rank_rows(world, name)):
        got = results[r][name]
        torch.testing.assert_close(got["out"], want["out"][rows], **TOL)
        torch.testing.assert_close(got["x_grad"], want["x_grad"][rows], **TOL)
        torch.testing.assert_close(
            got["grads"]["gate.proj.weight"], want["grads"]["gate.proj.weight"], **TOL
        )
        for w in ("w_gate", "w_up", "w_down"):
            torch.testing.assert_close(
                got["grads"][f"experts.local.{w}"],
                want["grads"][f"experts.{w}"][r * L : (r + 1) * L],
                **TOL,
            )
        assert got["gathered_equal"]


def test_uneven_case_has_empty_rank_and_idle_experts(ranks) -> None:
    """The uneven case really has a rank with no tokens and a rank receiving no rows for an expert."""
    world, _ = ranks
    layer, xs, _ = make_case("e8k2_uneven", world)
    assert min(x.shape[0] for x in xs) == 0
    E = CASES["e8k2_uneven"][0]
    L = E // world
    with torch.no_grad():
        per_source = [
            torch.bincount(layer.gate(x).experts_TK.reshape(-1), minlength=E)
            if len(x)
            else torch.zeros(E, dtype=torch.long)
            for x in xs
        ]
    # rank r receives per_source[s][r*L:(r+1)*L] from rank s: some entry is zero for every r
    for r in range(world):
        recv = torch.stack([c[r * L : (r + 1) * L] for c in per_source])
        assert (recv == 0).any()


@pytest.mark.parametrize("name", list(CASES))
def test_aux_losses_are_global(ranks, name: str) -> None:
    """The ranks' per-token losses average to the single-process loss, uneven batches included."""
    world, results = ranks
    want = single(name, world)
    assert want["aux"]  # every case weighs its losses
    for key in want["aux"]:
        mean = torch.stack([results[r][name]["aux"][key] for r in range(world)]).mean()
        torch.testing.assert_close(mean, want["aux"][key], **TOL)
    for r, size in enumerate(CASES[name][2][world]):
        if size == 0:  # a rank without tokens adds nothing to the mean (not NaN)
            assert all(float(v) == 0.0 for v in results[r][name]["aux"].values())


@pytest.mark.parametrize("pooling", POOLINGS)
def test_lm_aux_losses_are_global(ranks, pooling: str) -> None:
    """A 2-layer LM's aux losses and router gradients over ranks equal the single process's."""
    world, results = ranks
    want = run_lm(make_lm(pooling), torch.cat(lm_rows(world)), 1.0)
    for key, value in want["aux"].items():
        mean = torch.stack([results[r][pooling]["aux"][key] for r in range(world)]).mean()
        torch.testing.assert_close(mean, value, **TOL)
    for r in range(world):
        torch.testing.assert_close(results[r][pooling]["router_grad"], want["router_grad"], **TOL)


@pytest.mark.parametrize("name", ["e8k2", "e64k8"])
def test_load_balance_loss_and_stats_are_global(ranks, name: str) -> None:
    world, results = ranks
    want = single(name, world)
    # a rank's own load-balance loss (its f) differs from the global one: f must be the group's
    layer, xs, _ = make_case(name, world)
    with torch.no_grad():
        local = layer(xs[0]).aux_losses["load_balance"]
    assert not torch.allclose(local, results[0][name]["aux"]["load_balance"], **TOL)
    for r in range(world):
        got, ref = results[r][name]["stats"], want["stats"]
        for field in ("tokens_per_expert_E", "mean_weight_E", "entropy", "num_tokens"):
            torch.testing.assert_close(getattr(got, field), getattr(ref, field), **TOL)
        for field in ("experts_per_token", "valid_slots", "dropped_slots", "dropped_tokens"):
            torch.testing.assert_close(getattr(got, field), getattr(ref, field), **TOL)


def test_stats_of_uneven_batches_are_global(ranks) -> None:
    world, results = ranks
    layer, xs, _ = make_case("e8k2_uneven", world)
    with torch.no_grad():
        want = routing_stats(layer.gate(torch.cat(xs)))
    got = results[0]["e8k2_uneven"]["stats"]
    torch.testing.assert_close(got.tokens_per_expert_E, want.tokens_per_expert_E)
    torch.testing.assert_close(got.entropy, want.entropy, **TOL)
    torch.testing.assert_close(got.mean_weight_E, want.mean_weight_E, **TOL)


def test_wrong_shard_order_differs(ranks) -> None:
    """Negative control: the comparison catches experts held by the wrong rank."""
    world, results = ranks
    want = single("e8k2", world)
    got = torch.cat([results[r]["wrong_order"]["out"] for r in range(world)])
    assert not torch.allclose(got, want["out"], **TOL)


def test_shard_and_dispatch_refuse_misuse() -> None:
    bank = SwiGLUExperts(num_experts=6, d_model=4, d_hidden=4)
    with pytest.raises(ValueError, match="cannot be split into 4"):
        shard_experts(bank, shard=0, num_shards=4)
    shard = shard_experts(bank, shard=0, num_shards=2)
    with pytest.raises(ValueError, match="ExpertParallelDispatch"):
        shard.forward_grouped(torch.randn(2, 4), torch.tensor([1, 1, 0, 0, 0, 0]))
    layer = MoELayer(
        gate=TopKGate(d_model=4, num_experts=6, k=2), experts=bank, dispatch=DroplessDispatch()
    )
    with pytest.raises(ValueError, match="needs an ExpertShard"):
        ExpertParallelDispatch()(torch.randn(2, 4), layer.gate(torch.randn(2, 4)), bank)


def test_shards_are_copies_of_every_stacked_tensor_that_add_up_to_the_bank() -> None:
    torch.manual_seed(0)
    # unequal experts: the hidden mask is a per-expert buffer, sharded with the weights
    bank = SwiGLUExperts(num_experts=6, d_model=4, d_hidden=4, hidden_sizes=[1, 2, 3, 4, 4, 2])
    shards = [shard_experts(bank, shard=r, num_shards=3) for r in range(3)]
    for name, want in [*bank.named_parameters(), *bank.named_buffers()]:
        parts = [
            dict([*s.local.named_parameters(), *s.local.named_buffers()])[name] for s in shards
        ]
        assert all(p.shape[0] == 2 for p in parts), name
        torch.testing.assert_close(torch.cat([p.detach() for p in parts]), want.detach())
    assert all(isinstance(s.local.w_up, torch.nn.Parameter) for s in shards)
    with torch.no_grad():
        shards[0].local.w_up.zero_()  # a copy: the bank keeps its weights
    assert bank.w_up[:2].abs().sum() > 0


def test_a_parameter_without_the_expert_dim_cannot_be_sharded() -> None:
    bank = SwiGLUExperts(num_experts=4, d_model=4, d_hidden=4)
    bank.scale = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"parameter scale of shape \(3,\) has no expert dim 4"):
        shard_experts(bank, shard=0, num_shards=2)


def test_a_buffer_without_the_expert_dim_is_copied_whole_into_every_shard() -> None:
    bank = SwiGLUExperts(num_experts=4, d_model=4, d_hidden=4)
    bank.register_buffer("scale_D", torch.arange(3.0))
    for r in range(2):
        torch.testing.assert_close(
            shard_experts(bank, shard=r, num_shards=2).local.scale_D, torch.tensor([0.0, 1.0, 2.0])
        )


def test_map_expert_rows_replaces_only_tensors_leading_with_the_expert_dim() -> None:
    moments_E = torch.arange(24.0).view(6, 4)
    step, mask = torch.tensor(5.0), torch.ones(3, 6)
    state = {"exp_avg": moments_E, "step": step, "count": 7, "mask": mask, "unset": None}
    seen: list[torch.Tensor] = []

    def rows(t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        return t[2:4] * 10

    out = map_expert_rows(state, 6, rows)
    assert len(seen) == 1 and seen[0] is moments_E  # scalars, other shapes, non-tensors: untouched
    torch.testing.assert_close(
        out["exp_avg"], torch.tensor([[80.0, 90, 100, 110], [120, 130, 140, 150]])
    )
    assert out["step"] is step and out["count"] == 7 and out["mask"] is mask
    assert out["unset"] is None and list(out) == list(state)
    assert out is not state and state["exp_avg"] is moments_E  # a new dict, the input as it was
    assert map_expert_rows(state, 3, lambda t: t[:1])["mask"].shape == (1, 6)
