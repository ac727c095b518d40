"""An MoE LM trained with experts sharded over real gloo processes equals the single-process run.

The plain ``torch.distributed`` loop: every rank builds the same LM (seeded), the plan
shards the routed experts over ``mesh["ep"]`` and DDP replicates the rest, ignoring the
shards; each rank trains on its slice of the same global batch of Tiny Shakespeare.
Losses (mean over the global batch) and the final weights (shards gathered) equal the
single-process run on the global batch, gradient clipping included (its norm spans
every rank's shards). SGD with momentum, not Adam: Adam's per-weight normalisation
turns float rounding in near-zero gradients into full-size steps, which would hide
what is compared (the Lightning test below runs the configured AdamW). A run that
lets DDP average the shards' gradients (the naive wiring) must differ.

The ``mtl train ... trainer=ddp model.moe.expert_parallel=2`` path is a slow test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from mtl.data.tokenizers import CharTokenizer
from mtl.models.lm import MoEFFN, TransformerLM
from mtl.moe import SwiGLUExperts, TopKGate
from mtl.moe.expert_parallel import ExpertShard, gather_experts
from mtl.moe.expert_parallel_plan import ExpertParallelPlan, set_ddp_ignore
from tests.conftest import shared_data

ROOT = Path(__file__).resolve().parents[3]
STEPS, GLOBAL_BATCH, BLOCK, CLIP = 4, 8, 32, 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def corpus() -> torch.Tensor:
    text = shared_data("tinyshakespeare/input.txt").read_text()[:100_000]
    return CharTokenizer.fit(text).encode(text)


def batches(tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        starts = torch.randint(0, len(tokens) - BLOCK - 1, (GLOBAL_BATCH,), generator=gen)
        idx = torch.stack([tokens[s : s + BLOCK + 1] for s in starts.tolist()])
        out.append((idx[:, :-1], idx[:, 1:]))
    return out


def make_lm(vocab: int, expert_parallel: int) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(
        vocab_size=vocab,
        d_model=16,
        n_layers=2,
        n_heads=2,
        d_ff=32,
        max_seq_len=BLOCK,
        moe=MoEFFN(
            num_experts=8,
            gate=partial(TopKGate, k=2),
            experts=partial(SwiGLUExperts, d_hidden=8),
            aux_loss_weights={"load_balance": 0.05, "z_loss": 0.01},
            expert_parallel=expert_parallel,
        ),
    )


def train_single() -> tuple[list[float], dict[str, torch.Tensor]]:
    tokens = corpus()
    lm = make_lm(int(tokens.max()) + 1, 1)
    opt = torch.optim.SGD(lm.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for x, y in batches(tokens):
        out = lm(x, y)
        (out.loss + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
    return losses, lm.state_dict()


def _worker(rank: int, world: int, ep: int, modes: list[str], port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        for mode in modes:
            result = _train_rank(rank, world, ep, naive=mode == "naive")
            if rank == 0:
                torch.save(result, Path(out_dir) / f"{mode}.pt")
        if "exact" in modes:
            torch.save(_validation_guard(rank, ep), Path(out_dir) / f"guard{rank}.pt")
    finally:
        dist.destroy_process_group()


def _validation_guard(rank: int, ep: int) -> dict[str, str | None]:
    """LMModule refuses ranks with different numbers of validation batches (else: a hang)."""
    from mtl.training.lm_module import LMModule

    module = LMModule(net=make_lm(11, ep))
    module.configure_model()  # no trainer: the plan and the shards only
    assert module.expert_plan is not None
    out: dict[str, str | None] = {}
    for name, batches in (("equal", [3]), ("uneven", [3 + rank])):
        module._trainer = SimpleNamespace(num_val_batches=batches, strategy=None)
        try:
            module.on_validation_start()
            out[name] = None
        except RuntimeError as err:
            out[name] = str(err)
    return out


def _train_rank(rank: int, world: int, ep: int, *, naive: bool) -> dict:
    tokens = corpus()
    lm = make_lm(int(tokens.max()) + 1, ep)
    plan = ExpertParallelPlan(expert_parallel=ep, device_type="cpu")
    names = plan.apply(lm)
    if not naive:
        set_ddp_ignore(lm, names)
    ddp = DistributedDataParallel(lm)
    opt = torch.optim.SGD(lm.parameters(), lr=0.5, momentum=0.9)
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    losses = []
    for x, y in batches(tokens):
        out = ddp(x[rows], y[rows])
        (out.loss + out.aux_loss).backward()
        if not naive:
            plan.reduce_expert_grads_(lm)
        plan.clip_grad_norm_(lm, CLIP)
        opt.step()
        opt.zero_grad()
        ce = out.loss.detach().clone()
        dist.all_reduce(ce)
        losses.append(float(ce) / world)
    state = lm.state_dict()
    for name, module in lm.named_modules():
        if isinstance(module, ExpertShard):
            full = gather_experts(module, plan.mesh["ep"])
            for key in [k for k in state if k.startswith(f"{name}.local.")]:
                del state[key]
            state.update({f"{name}.{k}": v for k, v in full.state_dict().items()})
    return {"losses": losses, "state": state}


def train_distributed(
    out_dir: Path, world: int, ep: int, modes: tuple[str, ...] = ("exact",)
) -> dict[str, dict]:
    corpus()  # skip before starting processes when the data is missing
    mp.spawn(
        _worker, args=(world, ep, list(modes), free_port(), str(out_dir)), nprocs=world, join=True
    )
    got = {m: torch.load(out_dir / f"{m}.pt", weights_only=True) for m in modes}
    if "exact" in modes:
        got |= {f"guard{r}": torch.load(out_dir / f"guard{r}.pt") for r in range(world)}
    return got


@pytest.fixture(scope="module")
def single() -> tuple[list[float], dict[str, torch.Tensor]]:
    return train_single()


@pytest.fixture(scope="module")
def two_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """One start of 2 processes: the exact wiring, then the naive one."""
    return train_distributed(tmp_path_factory.mktemp("ep2"), 2, 2, ("exact", "naive"))


def assert_same_run(got: dict, single: tuple[list[float], dict[str, torch.Tensor]]) -> None:
    losses, state = single
    assert got["losses"] == pytest.approx(losses, rel=1e-5)
    assert sorted(got["state"]) == sorted(state)
    for key, value in state.items():
        torch.testing.assert_close(
            got["state"][key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}"
        )


def test_two_process_expert_parallel_training_equals_single_process(two_process, single) -> None:
    assert_same_run(two_process["exact"], single)
    assert single[0][-1] < single[0][0]  # it trains


def test_uneven_validation_batches_are_refused(two_process) -> None:
    guards = [two_process[f"guard{r}"] for r in range(2)]
    assert all(g["equal"] is None for g in guards)
    assert all("3 to 4" in g["uneven"] for g in guards)  # every rank raises, none waits


def test_ddp_averaging_the_shards_differs(two_process, single) -> None:
    """Negative control: shards left to DDP (broadcast from rank 0, averaged) diverge."""
    with pytest.raises(AssertionError):
        assert_same_run(two_process["naive"], single)


@pytest.mark.slow
def test_four_processes_two_expert_groups_equal_single_process(tmp_path, single) -> None:
    """EP=2 inside DP=2: shard gradients are also summed over the replicas holding them."""
    got = train_distributed(tmp_path, 4, 2)
    assert_same_run(got["exact"], single)


TINY_OLMOE = [
    "experiment=lm_olmoe",
    "model.d_model=16",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.moe.num_experts=8",
    "model.moe.gate.k=2",
    "model.moe.experts.d_hidden=8",
    "data.block_size=16",
    "data.steps_per_epoch=3",
    "trainer.enable_progress_bar=false",
    "generate.max_new_tokens=5",
    "num_threads=1",
]


def _mtl_train(out_dir: Path, extra: list[str]) -> subprocess.CompletedProcess[str]:
    # The real command line: Lightning's launcher re-runs it for rank 1 with LOCAL_RANK=1.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "NODE_RANK")}
    cmd = [sys.executable, "-m", "mtl.cli", "train", *TINY_OLMOE, *extra, f"output_dir={out_dir}"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _last(out_dir: Path) -> dict:
    (ckpt,) = out_dir.rglob("last.ckpt")
    return torch.load(ckpt, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_mtl_train_ddp_expert_parallel_equals_single_process(tmp_path) -> None:
    """``mtl train experiment=lm_olmoe trainer=ddp trainer.devices=2 model.moe.expert_parallel=2``.

    Two ranks of batch 4 read the single-process batch 8 (the text loader's sharding).
    The expert-parallel run trains 6 steps, is resumed (expert-parallel again) to step 9,
    and its final weights and AdamW moments equal a single-process 9-step run's:
    gradient clipping at 1.0, the load-balance and z-losses, and the checkpoint's
    gathering (save) and slicing (resume) of the shards and their moments included.
    """
    ep_run = ["trainer=ddp", "trainer.devices=2", "model.moe.expert_parallel=2"]
    ep_run += ["data.batch_size=4", "trainer.max_steps=6"]
    run = _mtl_train(tmp_path / "ep", ep_run)
    assert "rank 1 holds experts [4, 8) of 8 in 1 MoE layers" in run.stderr
    # the checkpoint holds the whole bank under the unsharded names, and its moments
    first = _last(tmp_path / "ep")
    assert first["state_dict"]["net.layers.0.ffn.experts.w_up"].shape[0] == 8
    assert not any(".local." in k for k in first["state_dict"])
    moments = [s["exp_avg"].shape[0] for s in first["optimizer_states"][0]["state"].values()]
    assert 8 in moments and 4 not in moments
    _mtl_train(tmp_path / "ep", [*ep_run[:-1], "trainer.max_steps=9", "resume=last"])
    _mtl_train(tmp_path / "one", ["data.batch_size=8", "trainer.max_steps=9"])
    got, want = _last(tmp_path / "ep"), _last(tmp_path / "one")
    assert got["global_step"] == want["global_step"] == 9
    assert sorted(got["state_dict"]) == sorted(want["state_dict"])
    for key, value in want["state_dict"].items():
        torch.testing.assert_close(
            got["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}"
        )
    # the whole model's parameter count, though each rank holds half the experts
    counts = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ep", "one")]
    assert counts[0]["params"] == counts[1]["params"]
    got_opt, want_opt = got["optimizer_states"][0]["state"], want["optimizer_states"][0]["state"]
    assert sorted(got_opt) == sorted(want_opt)
    for i, state in want_opt.items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got_opt[i][name], state[name], rtol=1e-3, atol=1e-7)
