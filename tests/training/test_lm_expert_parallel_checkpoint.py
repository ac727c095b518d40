"""Expert-parallel checkpoints on 2 real gloo processes: gathered on save, sliced on resume.

Each rank holds half of every expert bank (and half of AdamW's per-expert moments).
Saving gathers the whole banks under the unsharded names, so the file loads into a
single-process model; resuming slices each rank's experts back out, weights and moments.
The gathered banks are checked against the ranks' own shards, concatenated in rank order.
"""

from __future__ import annotations

import copy
import socket
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtl.models.lm import MoEFFN, TransformerLM
from mtl.moe import SwiGLUExperts, TopKGate
from mtl.training.lm_expert_parallel import (
    expert_shards,
    gather_expert_checkpoint,
    slice_expert_checkpoint,
)
from mtl.training.lm_module import LMModule

E, VOCAB = 4, 11


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_lm(expert_parallel: int) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(
        vocab_size=VOCAB,
        d_model=8,
        n_layers=1,
        n_heads=2,
        d_ff=16,
        max_seq_len=6,
        moe=MoEFFN(
            num_experts=E,
            gate=partial(TopKGate, k=2),
            experts=partial(SwiGLUExperts, d_hidden=8),
            expert_parallel=expert_parallel,
        ),
    )


def _moments(states: dict, width: int) -> dict[int, torch.Tensor]:
    """AdamW's first moments of the expert tensors (leading dimension ``width``)."""
    return {
        i: s["exp_avg"].clone()
        for i, s in states["state"].items()
        if s["exp_avg"].dim() == 3 and s["exp_avg"].shape[0] == width
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        module = LMModule(net=make_lm(2))
        module.configure_model()  # no trainer: the plan and the shards
        assert module.expert_plan is not None
        opt = module.configure_optimizers()["optimizer"]
        ids = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(rank))
        out = module(ids, ids)
        (out.loss + out.aux_loss).backward()
        module.expert_plan.reduce_expert_grads_(module.net)
        opt.step()
        local = {k: v.clone() for k, v in module.state_dict().items() if ".local." in k}
        checkpoint = {"state_dict": module.state_dict(), "optimizer_states": [opt.state_dict()]}
        local_moments = _moments(checkpoint["optimizer_states"][0], E // 2)
        params = module._optimizer_params()
        gather_expert_checkpoint(checkpoint, module.net, module.expert_plan, params)
        resumed = copy.deepcopy(checkpoint)
        slice_expert_checkpoint(resumed, module.net, module.expert_plan, params)
        sliced = {k: v for k, v in resumed["state_dict"].items() if ".local." in k}
        (shard,) = expert_shards(module.net).values()
        torch.save(
            {
                "first_expert": shard.first_expert,
                "local": local,
                "local_moments": local_moments,
                "gathered": checkpoint["state_dict"],
                "gathered_moments": _moments(checkpoint["optimizer_states"][0], E),
                "sliced": sliced,
                "sliced_moments": _moments(resumed["optimizer_states"][0], E // 2),
                "live_moments": _moments(opt.state_dict(), E // 2),
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ep_ckpt")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_saved_banks_are_the_ranks_shards_in_order(ranks: list[dict]) -> None:
    assert [r["first_expert"] for r in ranks] == [0, E // 2]
    gathered = ranks[0]["gathered"]
    assert not any(".local." in k for k in gathered)
    for local_key, value in ranks[0]["local"].items():
        key = local_key.replace(".local.", ".")
        whole = torch.cat([value, ranks[1]["local"][local_key]])
        assert whole.shape[0] == E
        assert torch.equal(gathered[key], whole), key
        assert torch.equal(ranks[1]["gathered"][key], whole)  # every rank gathers the same


def test_saved_moments_are_whole_and_ranks_moments_in_order(ranks: list[dict]) -> None:
    gathered, (m0, m1) = ranks[0]["gathered_moments"], (r["local_moments"] for r in ranks)
    assert sorted(gathered) == sorted(m0) == sorted(m1) and len(gathered) == 3
    for i, whole in gathered.items():
        assert torch.equal(whole, torch.cat([m0[i], m1[i]])), i
    # the optimiser's live state keeps its shards (the checkpoint got new dicts)
    for r in ranks:
        assert all(torch.equal(r["live_moments"][i], r["local_moments"][i]) for i in gathered)


def test_resume_slices_each_ranks_experts_back(ranks: list[dict]) -> None:
    for r in ranks:
        assert sorted(r["sliced"]) == sorted(r["local"])
        for key, value in r["local"].items():
            assert torch.equal(r["sliced"][key], value), key
        assert sorted(r["sliced_moments"]) == sorted(r["local_moments"])
        for i, value in r["local_moments"].items():
            assert torch.equal(r["sliced_moments"][i], value)


def test_saved_state_loads_into_a_single_process_model(ranks: list[dict]) -> None:
    single = LMModule(net=make_lm(1))
    single.load_state_dict(ranks[0]["gathered"], strict=True)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    experts = single.net.layers[0].ffn.experts
    for key, value in ranks[0]["gathered"].items():
        if key.startswith("net.layers.0.ffn.experts."):
            assert torch.equal(getattr(experts, key.rsplit(".", 1)[1]), value)
    assert torch.isfinite(single(ids, ids).loss)
