"""Forward + backward step of MMoE with top-k gates: sparse compute against dense compute.

Variants, the same :class:`mtl.models.rec.MMoE` (same weights, same top-k gates,
one per task) measured side by side in interleaved rounds:

* ``sparse`` -- ``sparse_compute`` on (the default with sparse gates): each expert
  runs on the rows some gate routed to it, once per row
  (:class:`~mtl.moe.multi_gate_sparse.MultiGateDroplessDispatch`).
* ``dense``  -- ``sparse_compute=False``: every expert on every row, mixed with
  the gates' sparse weights (zero for the experts a row does not use).

Both compute the same logits (checked before timing). A step is the forward,
BCE-with-logits on random labels and the backward.

Usage::

    python benchmarks/multi_gate_sparse.py                # E = 16, k = 2, B = 2048 and 8192
    python benchmarks/multi_gate_sparse.py --quick        # B = 1024, fewer rounds
    python benchmarks/multi_gate_sparse.py --experts 8 16 32 --k 1 2
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    base_parser,
    environment,
    fmt_num,
    markdown_table,
    median,
    pick_device,
    report_written,
    setup_process,
    time_interleaved,
    write_json,
)

from mtl.models.rec import MMoE
from mtl.moe import TopKGate
from mtl.moe.multi_gate_sparse import routed_pairs_ET

TASKS = ["click", "like", "buy"]
VARIANTS = ("sparse", "dense")


def build(
    E: int, k: int, d_in: int, hidden: list[int], device: torch.device
) -> dict[str, nn.Module]:
    """The two variants with identical weights."""
    gate = functools.partial(TopKGate, k=k, renormalize=True)
    models = {}
    for name in VARIANTS:
        torch.manual_seed(0)
        models[name] = MMoE(
            d_in=d_in,
            tasks=TASKS,
            num_experts=E,
            expert_hidden=hidden,
            tower_hidden=[64],
            gate=gate,
            sparse_compute=name == "sparse",
        ).to(device)
    models["dense"].load_state_dict(models["sparse"].state_dict())
    return models


def bench_point(
    E: int, k: int, B: int, d_in: int, hidden: list[int], repeats: int, device: torch.device
) -> dict[str, Any]:
    models = build(E, k, d_in, hidden, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, d_in, generator=gen).to(device)
    y = torch.randint(0, 2, (B, len(TASKS)), generator=gen).float().to(device)

    def step(model: nn.Module) -> None:
        out = model(x)
        loss = sum(
            F.binary_cross_entropy_with_logits(out.logits[t], y[:, j]) for j, t in enumerate(TASKS)
        )
        loss.backward()  # type: ignore[union-attr]

    with torch.no_grad():
        ref = models["dense"](x).logits
        got = models["sparse"](x).logits
        mixture = models["sparse"].mixture
        routings = [gate(x) for gate in mixture.gates.values()]
        pairs = int(routed_pairs_ET(routings, E).sum())  # (row, expert) pairs computed
    diff = max(float((got[t] - ref[t]).abs().max()) for t in TASKS)
    if diff > 1e-3:
        raise RuntimeError(f"sparse and dense logits differ by {diff} (E={E}, k={k}, B={B})")
    fns = {name: functools.partial(step, m) for name, m in models.items()}
    times = time_interleaved(
        fns,
        repeats=repeats,
        warmup=2,
        device=device,
        before_round=lambda name: models[name].zero_grad(set_to_none=True),
    )
    variants = {
        name: {"median_s": median(ts), "rows_per_s": B / median(ts), "times_s": ts}
        for name, ts in times.items()
    }
    per_round = [d / s for s, d in zip(times["sparse"], times["dense"], strict=True)]
    return {
        "experts": E,
        "k": k,
        "batch": B,
        "d_in": d_in,
        "expert_hidden": hidden,
        "tasks": len(TASKS),
        "max_abs_logit_diff": diff,
        "experts_per_row": pairs / B,  # sparse compute's experts per row (dense: E)
        "variants": variants,
        "speedup_sparse_vs_dense": variants["dense"]["median_s"] / variants["sparse"]["median_s"],
        "speedup_per_round": per_round,
    }


def report(points: list[dict[str, Any]]) -> str:
    head = [
        "E",
        "k",
        "B",
        "experts/row",
        "dense ms",
        "sparse ms",
        "sparse speed-up",
        "rounds' range",
    ]
    rows = []
    for p in points:
        r = p["speedup_per_round"]
        rows.append(
            [
                str(p["experts"]),
                str(p["k"]),
                str(p["batch"]),
                f"{p['experts_per_row']:.2f}",
                fmt_num(1e3 * p["variants"]["dense"]["median_s"], 1),
                fmt_num(1e3 * p["variants"]["sparse"]["median_s"], 1),
                f"{p['speedup_sparse_vs_dense']:.2f}x",
                f"{min(r):.2f}-{max(r):.2f}x",
            ]
        )
    return "MMoE forward+backward step, median over rounds:\n" + markdown_table(head, rows)


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, nargs="*", default=[16], help="expert counts E")
    parser.add_argument("--k", type=int, nargs="*", default=[2], help="experts per row")
    parser.add_argument("--batch", type=int, nargs="*", default=None, help="batch sizes B")
    parser.add_argument("--d-in", type=int, default=256, help="input width")
    parser.add_argument(
        "--hidden", type=int, nargs="*", default=[256, 128], help="expert MLP widths"
    )
    args = parser.parse_args()
    process = setup_process(args)
    device = pick_device()
    batches = args.batch or ([1024] if args.quick else [2048, 8192])
    repeats = args.repeats or (3 if args.quick else 9)
    env = environment(device)
    env.update(process)
    print(
        f"# multi_gate_sparse on {env['cpu'] if device.type == 'cpu' else env.get('gpu')}, "
        f"torch {env['torch']}, {env['torch_threads']} threads, "
        f"load avg {env['load_avg_1m_start']:.1f}",
        flush=True,
    )
    points = []
    for E in args.experts:
        for k in args.k:
            for B in batches:
                print(f"  E={E} k={k} B={B} ...", flush=True)
                points.append(bench_point(E, k, B, args.d_in, args.hidden, repeats, device))
    print(report(points))
    config = {"repeats": repeats, "batches": batches, "quick": args.quick, "tasks": TASKS}
    path = write_json(
        "multi_gate_sparse", {"env": env, "config": config, "points": points}, args.out
    )
    report_written(path, args)


if __name__ == "__main__":
    main()
