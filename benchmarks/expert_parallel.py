"""Expert parallelism: tokens/s and bytes exchanged per step for 1, 2 and 4 processes.

One sparse MoE layer (SwiGLU experts, OLMoE routing shape: E=64, k=8, softmax
top-k, load-balance and z-loss) trained forward + backward, its experts
sharded over ``W`` processes with :class:`mtl.moe.expert_parallel.ExpertParallelDispatch`;
each process routes its own ``T`` tokens (weak scaling: the global batch is
``W * T``). Rows:

* ``W=1 dropless`` -- the single-process :class:`~mtl.moe.DroplessDispatch` (no exchange);
* ``W=1, 2, 4``    -- the expert-parallel dispatch over ``W`` ranks (``W=1``: the
  exchange's plumbing on a one-rank group).

Per row: the step time (median over rounds of the slowest rank), global tokens/s,
and the bytes one step moves between ranks: the routed rows each rank sends to
other ranks and their outputs coming back, forward and backward, plus the
per-expert counts (rows a rank keeps for its own experts do not cross). Every
row is checked against the single-process layer on the same tokens first
(``max_abs_diff``).

Backend: nccl with one GPU per process where ``torch.cuda.device_count() >= W``,
else gloo on CPU (where more processes than cores only measure the plumbing,
not a speed-up). Every process of every row gets ``--threads / max(--procs)``
intra-op threads (at least one).

Usage::

    python benchmarks/expert_parallel.py                 # W = 1, 2, 4 at T = 1024 per rank
    python benchmarks/expert_parallel.py --quick         # small shapes, 2 rounds
"""

from __future__ import annotations

import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    base_parser,
    environment,
    fmt_num,
    markdown_table,
    median,
    report_written,
    setup_process,
    write_json,
)

from mtl.moe import DroplessDispatch, MoELayer, SwiGLUExperts, TopKGate
from mtl.moe.expert_parallel import ExpertParallelDispatch, shard_experts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _layer(cfg: dict[str, Any]) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(
        gate=TopKGate(d_model=cfg["D"], num_experts=cfg["E"], k=cfg["k"], renormalize=False),
        experts=SwiGLUExperts(num_experts=cfg["E"], d_model=cfg["D"], d_hidden=cfg["H"]),
        dispatch=DroplessDispatch(),
        aux_loss_weights={"load_balance": 0.01, "z_loss": 0.001},
    )


def _tokens(cfg: dict[str, Any], rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(cfg["T"], cfg["D"], generator=gen)


def _bytes_per_step(layer: MoELayer, x: torch.Tensor, rank: int, world: int) -> float:
    """Bytes this rank sends per step: rows to other ranks' experts and outputs back, fwd + bwd."""
    with torch.no_grad():
        experts_S = layer.gate(x).experts_TK.reshape(-1)
    owner_S = experts_S // (layer.num_experts // world)
    crossing = int((owner_S != rank).sum())
    row = x.shape[-1] * x.element_size()
    # forward: rows out + outputs back; backward: output grads out + input grads back
    rows_bytes = 4 * crossing * row
    counts_bytes = 2 * layer.num_experts * 8  # counts all-to-all + group counts all-reduce
    return float(rows_bytes + counts_bytes)


def _worker(rank: int, world: int, port: int, cfg: dict[str, Any], out: str) -> None:
    cuda = cfg["backend"] == "nccl"
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(cfg["threads"])
    dist.init_process_group(
        cfg["backend"], init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        layer = _layer(cfg).to(device)
        x = _tokens(cfg, rank).to(device)
        want = layer(x).output.detach()
        bytes_step = _bytes_per_step(layer, x, rank, world) if cfg["ep"] else 0.0
        if cfg["ep"]:
            layer.experts = shard_experts(layer.experts, shard=rank, num_shards=world)
            layer.dispatch = ExpertParallelDispatch()
        x.requires_grad_(True)

        def step() -> torch.Tensor:
            out = layer(x)
            (out.output.square().mean() + out.aux_loss).backward()
            return out.output

        diff = (step().detach() - want).abs().max().reshape(1).float()
        for _ in range(cfg["warmup"]):
            step()
        times = []
        for _ in range(cfg["repeats"]):
            layer.zero_grad(set_to_none=True)
            x.grad = None
            dist.barrier()
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        # a step lasts as long as its slowest rank
        slowest = torch.tensor(times, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        sent = torch.tensor([bytes_step], device=device, dtype=torch.float64)
        dist.all_reduce(sent)
        if rank == 0:
            torch.save(
                {"times": slowest.cpu().tolist(), "diff": float(diff), "bytes": float(sent)},
                Path(out) / "result.pt",
            )
    finally:
        dist.destroy_process_group()


def run_point(world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Spawn ``world`` processes for one row; returns its figures."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, _free_port(), cfg, tmp), nprocs=world, join=True)
        res = torch.load(Path(tmp) / "result.pt", weights_only=True)
    step_s = median(res["times"])
    return {
        "processes": world,
        "dispatch": "expert_parallel" if cfg["ep"] else "dropless",
        "backend": cfg["backend"],
        "threads_per_process": cfg["threads"],
        "step_s": step_s,
        "step_s_rounds": res["times"],
        "tokens_per_s": world * cfg["T"] / step_s,
        "bytes_per_step": res["bytes"],
        "bytes_per_token": res["bytes"] / (world * cfg["T"]),
        "max_abs_diff_vs_single": res["diff"],
    }


def report(rows: list[dict[str, Any]], cfg: dict[str, Any]) -> str:
    head = ["processes", "dispatch", "backend", "step ms", "tokens/s", "MiB sent/step", "B/token"]
    body = [
        [
            str(r["processes"]),
            r["dispatch"],
            r["backend"],
            fmt_num(1000 * r["step_s"], 1),
            fmt_num(r["tokens_per_s"]),
            fmt_num(r["bytes_per_step"] / 2**20, 2),
            fmt_num(r["bytes_per_token"]),
        ]
        for r in rows
    ]
    shape = f"E={cfg['E']} k={cfg['k']} D={cfg['D']} H={cfg['H']}, T={cfg['T']} tokens per process"
    return f"{shape}\n" + markdown_table(head, body)


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, nargs="*", default=[1, 2, 4], help="process counts W")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per process T")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=None)
    parser.add_argument("--d-hidden", type=int, default=None)
    args = parser.parse_args()
    process = setup_process(args)
    gpus = torch.cuda.device_count()
    env = environment(torch.device("cuda" if gpus else "cpu"))
    env.update(process)
    env["gpus"] = gpus
    base = {
        "E": args.experts,
        "k": args.k,
        "D": args.d_model or (64 if args.quick else 256),
        "H": args.d_hidden or (32 if args.quick else 128),
        "T": args.tokens or (256 if args.quick else 1024),
        "warmup": 1,
        "repeats": args.repeats or (2 if args.quick else 5),
    }
    print(
        f"# expert_parallel on {env.get('gpu') or env['cpu']}, torch {env['torch']}, "
        f"{gpus} GPUs, load avg {env['load_avg_1m_start']:.1f}",
        flush=True,
    )
    points = [(1, False)] + [(w, True) for w in args.procs]
    # the same intra-op threads in every process of every row: more runnable threads
    # than cores would slow the small-W rows (OpenMP spinning), not measure them
    threads = max(1, args.threads // max(args.procs))
    rows = []
    for world, ep in points:
        backend = "nccl" if gpus >= world else "gloo"
        if gpus and backend == "gloo":
            print(f"  W={world}: more processes than GPUs ({gpus}), on CPU with gloo", flush=True)
        cfg = {**base, "ep": ep, "backend": backend, "threads": threads}
        print(f"  W={world} {'expert_parallel' if ep else 'dropless'} ...", flush=True)
        rows.append(run_point(world, cfg))
        if rows[-1]["max_abs_diff_vs_single"] > 1e-3:
            raise SystemExit(f"W={world}: output differs from the single-process layer: {rows[-1]}")
    print(report(rows, base))
    path = write_json(
        "expert_parallel",
        {"env": env, "config": {**base, "quick": args.quick}, "rows": rows},
        args.out,
    )
    report_written(path, args)


if __name__ == "__main__":
    main()
