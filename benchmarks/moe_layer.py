"""Forward + backward throughput and peak memory of one sparse MoE layer.

Variants, all SwiGLU experts ``D -> H -> D`` with Mixtral routing (softmax,
top-k, renormalised), measured side by side on the same input:

* ``mtl``          -- :class:`mtl.moe.MoELayer` with :class:`~mtl.moe.SwiGLUExperts`
  and :class:`~mtl.moe.DroplessDispatch`.
* ``dense``        -- one dense SwiGLU FFN of hidden size ``k * H``: the same
  active parameters and FLOPs per token, no routing (the ideal a sparse layer
  can reach).
* ``loop``         -- the per-expert loop with ``index_add_`` of HF
  transformers' original Mixtral block (written here as the reference, one
  ``nn.Linear`` triple per expert).
* ``hf_eager``     -- transformers' own ``MixtralSparseMoeBlock`` (default
  "eager" experts: the same loop over stacked weights), when installed.
* ``hf_grouped_mm``-- the same block with ``experts_implementation="grouped_mm"``.
* ``experts_only`` -- ``mtl``'s experts alone on rows already routed, gathered and
  sorted by expert (``mtl``'s routing of the same input, computed once): the
  three grouped matmuls and the SwiGLU, then each token's ``k`` rows summed. No
  routing, gather or scatter: the floor that no dropless dispatch over these
  experts can beat with this grouped-matmul kernel.

Every MoE variant gets the same weights and is checked against ``mtl`` before
timing. fp32 on CPU; bf16 on CUDA when a GPU is present.

Usage::

    python benchmarks/moe_layer.py            # full: T = 4096 and 16384
    python benchmarks/moe_layer.py --quick    # T = 2048, fewer repeats, no memory
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    MemoryResult,
    base_parser,
    calls_for,
    environment,
    fmt_num,
    markdown_table,
    median,
    peak_memory,
    pick_device,
    report_written,
    setup_process,
    time_interleaved,
    write_json,
)

from mtl.moe import DroplessDispatch, MoELayer, SwiGLUExperts, TopKGate

SHAPES = [(8, 2, 512, 1024), (64, 8, 512, 256)]  # (E, k, D, H)


@dataclass(frozen=True)
class Shape:
    """One benchmark point."""

    E: int
    k: int
    D: int
    H: int
    T: int

    @property
    def label(self) -> str:
        return f"E={self.E} k={self.k} D={self.D} H={self.H} T={self.T}"


class DenseSwiGLU(nn.Module):
    """LLaMA-style SwiGLU FFN ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)
        self.w3 = nn.Linear(d_model, d_hidden, bias=False)
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LoopMoE(nn.Module):
    """Per-expert loop with ``index_add_``, as in HF transformers' Mixtral block (v4).

    The router is a bias-free linear layer; routing weights are the softmax
    probabilities of the top-k experts, renormalised to sum to 1. Experts are
    visited one by one; each gathers its tokens, runs its FFN, scales by the
    routing weight and ``index_add_``-s the result into the output.
    """

    def __init__(self, num_experts: int, k: int, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.k = k
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(DenseSwiGLU(d_model, d_hidden) for _ in range(num_experts))

    def forward(self, x_TD: Tensor) -> Tensor:
        probs_TE = torch.softmax(self.gate(x_TD).float(), dim=-1)
        w_TK, idx_TK = torch.topk(probs_TE, self.k, dim=-1)
        w_TK = (w_TK / w_TK.sum(-1, keepdim=True)).to(x_TD.dtype)
        out_TD = torch.zeros_like(x_TD)
        mask_EKT = F.one_hot(idx_TK, len(self.experts)).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            slot, tok = torch.where(mask_EKT[e])
            if tok.numel() == 0:
                continue
            y = expert(x_TD[tok]) * w_TK[tok, slot, None]
            out_TD.index_add_(0, tok, y)
        return out_TD

    @torch.no_grad()
    def load_from(self, layer: MoELayer) -> None:
        """Copy the router and expert weights of an ``mtl`` layer."""
        self.gate.weight.copy_(layer.gate.proj.weight)
        bank = layer.experts
        for e, expert in enumerate(self.experts):
            expert.w1.weight.copy_(bank.w_gate[e].T)
            expert.w3.weight.copy_(bank.w_up[e].T)
            expert.w2.weight.copy_(bank.w_down[e].T)


class ExpertsOnly(nn.Module):
    """``layer``'s experts on pre-routed rows (the ``experts_only`` variant).

    The rows ``x[token of slot]`` sorted by expert are gathered once, from the
    first input seen, and kept as a leaf that receives gradients: every step
    then runs only the experts' grouped computation and the per-token sum.
    """

    def __init__(self, layer: MoELayer, k: int) -> None:
        super().__init__()
        self.layer = layer
        self.k = k
        self._rows: tuple[Tensor, Tensor, Tensor] | None = None  # (input, rows_ND, counts_E)

    def forward(self, x_TD: Tensor) -> Tensor:
        if self._rows is None or self._rows[0] is not x_TD:
            with torch.no_grad():
                experts_TK = self.layer.gate(x_TD).experts_TK
                order_N = torch.argsort(experts_TK.reshape(-1), stable=True)
                counts_E = torch.bincount(
                    experts_TK.reshape(-1), minlength=self.layer.experts.num_experts
                )
                rows_ND = x_TD.detach()[order_N // self.k].clone().requires_grad_(True)
            self._rows = (x_TD, rows_ND, counts_E)
        _, rows_ND, counts_E = self._rows
        y_ND = self.layer.experts.forward_grouped(rows_ND, counts_E)
        return y_ND.view(x_TD.shape[0], self.k, -1).sum(1)


def build_hf_block(layer: MoELayer, shape: Shape, implementation: str) -> nn.Module | None:
    """transformers' ``MixtralSparseMoeBlock`` with ``layer``'s weights, or None if absent."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    cfg = MixtralConfig(
        hidden_size=shape.D,
        intermediate_size=shape.H,
        num_local_experts=shape.E,
        num_experts_per_tok=shape.k,
        router_jitter_noise=0.0,
        experts_implementation=implementation,
    )
    block = MixtralSparseMoeBlock(cfg)
    bank = layer.experts
    with torch.no_grad():
        block.gate.weight.copy_(layer.gate.proj.weight)
        # gate_up_proj: (E, 2H, D) = [W_gate^T; W_up^T]; down_proj: (E, D, H) = W_down^T
        w13 = torch.cat([bank.w_gate, bank.w_up], dim=-1).transpose(1, 2)
        block.experts.gate_up_proj.copy_(w13)
        block.experts.down_proj.copy_(bank.w_down.transpose(1, 2))
    return block


def hf_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return str(transformers.__version__)


Forward = Callable[[Tensor], Tensor]


def build_variants(
    shape: Shape,
    device: torch.device,
    dtype: torch.dtype,
    only: list[str] | None = None,
) -> dict[str, tuple[nn.Module, Forward]]:
    """``{name: (module, forward(x_TD) -> (T, D))}`` for every variant of one shape."""
    torch.manual_seed(0)
    layer = MoELayer(
        gate=TopKGate(d_model=shape.D, num_experts=shape.E, k=shape.k, renormalize=True),
        experts=SwiGLUExperts(num_experts=shape.E, d_model=shape.D, d_hidden=shape.H),
        dispatch=DroplessDispatch(),
    )
    loop = LoopMoE(shape.E, shape.k, shape.D, shape.H)
    loop.load_from(layer)
    dense = DenseSwiGLU(shape.D, shape.k * shape.H)
    variants: dict[str, tuple[nn.Module, Callable[[nn.Module, Tensor], Tensor]]] = {
        "mtl": (layer, lambda m, x: m(x).output),
        "dense": (dense, lambda m, x: m(x)),
        "loop": (loop, lambda m, x: m(x)),
        "experts_only": (ExpertsOnly(layer, shape.k), lambda m, x: m(x)),
    }
    for impl in ("eager", "grouped_mm"):
        block = build_hf_block(layer, shape, impl)
        if block is not None:
            variants[f"hf_{impl}"] = (block, lambda m, x: m(x.unsqueeze(0)).squeeze(0))
    out: dict[str, tuple[nn.Module, Forward]] = {}
    for name, (module, call) in variants.items():
        if only and name not in only and name != "mtl":
            continue
        module.to(device=device, dtype=dtype).train()
        out[name] = (module, lambda x, m=module, c=call: c(m, x))
    return out


def check_agreement(variants: dict[str, tuple[nn.Module, Forward]], x: Tensor) -> dict[str, float]:
    """Max abs difference of each MoE variant's output from ``mtl`` on ``x``."""
    with torch.no_grad():
        ref = variants["mtl"][1](x).float()
        return {
            n: float((f(x).float() - ref).abs().max())
            for n, (_, f) in variants.items()
            if n not in ("mtl", "dense", "experts_only")
        }


def bench_shape(
    shape: Shape,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    only: list[str] | None = None,
    memory: bool = True,
) -> dict[str, Any]:
    """Time and measure every variant at one shape."""
    fwd = build_variants(shape, device, dtype, only)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape.T, shape.D, generator=g).to(device=device, dtype=dtype)
    grad_out = torch.randn(shape.T, shape.D, generator=g).to(device=device, dtype=dtype)
    agreement = check_agreement(fwd, x[:512])
    x.requires_grad_(True)

    def step_of(module: nn.Module, f: Forward) -> Callable[[], None]:
        def step() -> None:
            module.zero_grad(set_to_none=True)
            x.grad = None
            (f(x) * grad_out).sum().backward()

        return step

    steps = {name: step_of(m, f) for name, (m, f) in fwd.items()}
    for step in steps.values():  # first call: one-time allocations, thread pools
        step()
    mem = {
        name: peak_memory(step, device) if memory else MemoryResult(None, "skipped")
        for name, step in steps.items()
    }
    # GPU: a few untimed steps (kernel selection, allocator) and several steps per round
    warmup = 3 if device.type == "cuda" else 0
    for step in steps.values():
        for _ in range(warmup):
            step()
    calls = calls_for(steps, device)
    times = time_interleaved(steps, repeats=repeats, warmup=0, device=device, calls=calls)
    results = {
        name: {
            "median_s": median(ts),
            "tokens_per_s": shape.T / median(ts),
            "times_s": ts,
            "calls_per_round": calls[name],
            "peak_mem_bytes": mem[name].peak_bytes,
            "mem_method": mem[name].method,
        }
        for name, ts in times.items()
    }
    return {
        "shape": shape.__dict__,
        "max_abs_diff_vs_mtl": agreement,
        "variants": results,
        "ratios": ratios(results),
    }


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Throughput of ``mtl`` relative to each other variant."""
    ours = results["mtl"]["tokens_per_s"]
    return {f"mtl_vs_{n}": ours / r["tokens_per_s"] for n, r in results.items() if n != "mtl"}


def report(points: list[dict[str, Any]]) -> str:
    """Throughput, ratio and memory tables."""
    names = list(points[0]["variants"])
    head = ["shape", *[f"{n} tok/s" for n in names]]
    rows = []
    for p in points:
        s = Shape(**p["shape"])
        rows.append([s.label, *[fmt_num(p["variants"][n]["tokens_per_s"]) for n in names]])
    ratio_names = [n for n in names if n != "mtl"]
    head2 = ["shape", *[f"mtl / {n}" for n in ratio_names]]
    rows2 = [
        [Shape(**p["shape"]).label, *[f"{p['ratios'][f'mtl_vs_{n}']:.2f}x" for n in ratio_names]]
        for p in points
    ]
    head3 = ["shape", *[f"{n} MiB" for n in names]]
    rows3 = []
    for p in points:
        cells = []
        for n in names:
            b = p["variants"][n]["peak_mem_bytes"]
            cells.append("-" if b is None else fmt_num(b / 2**20))
        rows3.append([Shape(**p["shape"]).label, *cells])
    return "\n\n".join(
        [
            "Forward+backward throughput (tokens/s, median):\n" + markdown_table(head, rows),
            "Speed of mtl relative to each variant:\n" + markdown_table(head2, rows2),
            "Peak memory growth during one forward+backward:\n" + markdown_table(head3, rows3),
        ]
    )


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="*", default=None, help="token counts T")
    parser.add_argument(
        "--variants", nargs="*", default=None, help="compare mtl with these variants only"
    )
    parser.add_argument(
        "--shapes", nargs="*", default=None, help="shapes as E,k,D,H (default: both)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    args = parser.parse_args()
    process = setup_process(args)
    device = pick_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = args.tokens or ([2048] if args.quick else [4096, 16384])
    repeats = args.repeats or (3 if args.quick else 5)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    memory = not (args.quick or args.no_memory)
    env = environment(device)
    env.update(process)
    env["transformers"] = hf_version()
    print(
        f"# moe_layer on {env['cpu'] if device.type == 'cpu' else env.get('gpu')}, "
        f"torch {env['torch']}, {env['torch_threads']} threads, dtype {dtype}, "
        f"load avg {env['load_avg_1m_start']:.1f}",
        flush=True,
    )
    points = []
    for E, k, D, H in shapes:
        for T in tokens:
            shape = Shape(E, k, D, H, T)
            print(f"  {shape.label} ...", flush=True)
            points.append(bench_shape(shape, device, dtype, repeats, args.variants, memory))
    text = report(points)
    print(text)
    path = write_json(
        "moe_layer",
        {
            "env": env,
            "config": {
                "dtype": str(dtype),
                "repeats": repeats,
                "tokens": tokens,
                "quick": args.quick,
            },
            "memory_method": points[0]["variants"]["mtl"]["mem_method"],
            "points": points,
        },
        args.out,
    )
    report_written(path, args)


if __name__ == "__main__":
    main()
