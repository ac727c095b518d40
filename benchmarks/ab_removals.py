"""A/B of mtl's CPU-only speed paths against their plain equivalents, end to end.

Each setting trains the same model from the same initial weights on the same
batches twice side by side: ``on`` runs the code as shipped, ``off`` swaps one
speed path for the plain computation it stands for (monkeypatched at run time,
or at construction where the path is fixed then). A step is forward + loss +
backward + Adam step at batch 1024 (the LM: 32 x 128 tokens; the MoE layer:
forward + backward of 4096 tokens). The paths:

* ``fold_buckets`` -- the folded first layer pads the features of a table in up
  to ``MAX_FOLD_BUCKETS = 4`` buckets picked by a dynamic program
  (``_row_buckets``); off: one bucket per table, its features in column order
  (``_row_buckets`` returns one group). ``MAX_FOLD_BUCKETS = 1`` is not that:
  its one group is sorted by row count, and ``_project_folded`` multiplies a
  bucket holding every feature of a table by the weight blocks in column order,
  so that product is wrong whenever the counts differ (a case the dynamic
  program never produces with four buckets).
* ``fold`` -- the embedding folded into the first layer
  (``FeatureEmbedding.project``); off: ``fold=False`` (gather, then multiply).
* ``norm_act`` -- batch norm, ReLU and dropout of expert and tower hidden layers
  as one autograd node (``mtl/moe/norm_act.py``); off: the modules one by one.
* ``gate_routing`` -- alike dense gates routed together (``route_dense_gates``,
  one batch norm over all gates' logits); off: ``routes_together`` is False,
  each gate routes its own logits.
* ``softmax`` -- ``softmax_over_experts`` (softmax of the transposed logits);
  off: ``torch.softmax(logits, -1)``.
* ``fast_dropout`` -- 16-bit-lane dropout masks; off:
  ``torch.nn.functional.dropout`` wherever ``fast_dropout`` is called (experts,
  towers, the LM's residual dropout). On the rechub layout both arms run
  without the ``norm_act`` node, whose mask is its own.
* ``all`` -- ``fold_buckets``, ``norm_act``, ``gate_routing``, ``softmax`` and
  ``fast_dropout`` off together (folding stays on, with one bucket).
* ``malloc`` -- ``mtl.training.cpu_memory.reuse_freed_memory()`` against glibc's
  defaults. It is process-wide, so every round starts one fresh process per
  arm, which times the Census models and the E=64 MoE layer.
* ``swiglu_layout`` -- the sparse SwiGLU layer (E=64, k=8, D=512, H=256,
  T=4096) with ``DroplessDispatch`` as shipped (fused, chunked, padded) against
  the sorted grouped-matmul layout (``max_padding = -1``) and against a dense
  SwiGLU FFN of hidden size ``k * H`` (the same active parameters).

Models: ``mmoe`` is ``conf/experiment/census_mmoe.yaml``'s MMoE (8 experts of
64, towers of 32, tower dropout 0.1); ``rechub`` is the same in torch-rechub's
layout (batch norm in experts, gates and towers, expert dropout 0.1), as
``rec_train.py`` builds it. Data: Census-Income (``census-income.test.gz``,
train split) and the synthetic CTR log, encoded by mtl's data layer.

Rounds are interleaved setting by setting: round ``r`` times ``--steps``
consecutive steps of every arm of every setting, arm order rotated from round
to round, after ``--warmup`` untimed steps of each arm. A round's figure is the
mean step of its steps; the table gives the median over rounds, the range over
rounds, and the range of the per-round ratio. The load average is recorded
before every round. Before timing, every ``on``/``off`` pair runs one training
step from copies with dropout set to zero and must agree in loss and gradients
(float rounding): the ``off`` arm computes the same function.

On a machine shared with other work, run with ``OMP_WAIT_POLICY=PASSIVE``: with
more runnable threads than cores, OpenMP's spinning threads slow every parallel
region of a 2-thread step by 10x and more. The JSON records the variable.

The speed paths exist only in the code before their removal: run the script
with that code first on the path (it stops with a message otherwise)::

    git worktree add /tmp/before 0b786e2
    PYTHONPATH=/tmp/before python benchmarks/ab_removals.py [--rounds 7] [--steps 30]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BENCH_DIR = Path(__file__).resolve().parent
OUT_PATH = BENCH_DIR / "out" / "ab_removals.json"
SHARED = BENCH_DIR.parent.parent / "shared" / "data"
CENSUS_PATH = SHARED / "census-income-kdd" / "census-income.test.gz"
BATCH_SIZE = 1024
LR = 1e-3
EMBED_INIT_STD = 1e-4  # as rec_train.py (torch-rechub's initialiser)
N_BATCHES = 64
MMOE: dict[str, Any] = {
    "name": "mmoe",
    "num_experts": 8,
    "expert_hidden": [64],
    "tower_hidden": [32],
    "dropout": 0.1,
}
RECHUB: dict[str, Any] = {
    **MMOE,
    "expert_norm": True,
    "tower_norm": True,
    "gate_norm": True,
    "expert_dropout": 0.1,
}
MODELS = {"mmoe": MMOE, "rechub": RECHUB}
LM_BATCH, LM_BLOCK, LM_VOCAB, LM_DROPOUT = 32, 128, 65, 0.1
MOE_SHAPE = {"E": 64, "k": 8, "D": 512, "H": 256, "T": 4096}

REQUIRED = {
    "mtl.models.rec.embedding": ["MAX_FOLD_BUCKETS", "_row_buckets", "FeatureEmbedding"],
    "mtl.moe.norm_act": ["fuses", "batch_norm_relu_dropout", "fast_dropout"],
    "mtl.models.rec.towers": ["MLP", "batch_norm_relu_dropout"],
    "mtl.moe.multi_gate": ["routes_together"],
    "mtl.moe.gates.dense": ["route_dense_gates", "routes_together", "softmax_over_experts"],
    "mtl.moe.dropout": ["fast_dropout", "FastDropout"],
    "mtl.moe.experts": ["fast_dropout"],
    "mtl.moe.dispatch": ["DroplessDispatch", "fused_swiglu_moe"],
    "mtl.training.cpu_memory": ["reuse_freed_memory"],
}
"""Module: names the A/B patches. All exist before the speed paths were removed."""


def require_old_internals() -> None:
    """Exit with a message unless the imported mtl still has every speed path measured here."""
    missing = []
    for module, names in REQUIRED.items():
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            missing.append(f"{module} ({e})")
            continue
        missing += [f"{module}.{n}" for n in names if not hasattr(mod, n)]
    if missing:
        import mtl

        sys.exit(
            f"ab_removals.py measures speed paths this mtl ({Path(mtl.__file__).parent}) does "
            f"not have: {', '.join(missing)}.\nRun it on the code before they were removed:\n"
            "    git worktree add /tmp/before 0b786e2\n"
            "    PYTHONPATH=/tmp/before python benchmarks/ab_removals.py"
        )


# ----------------------------------------------------------------------- patches
Patch = tuple[Any, str, Any]
"""``(object, attribute, value)`` set while an arm runs."""


@contextlib.contextmanager
def patched(patches: Sequence[Patch]) -> Iterator[None]:
    """Set each attribute for the duration of the block, then restore it."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def plain_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``fast_dropout``'s signature, ``F.dropout``'s mask."""
    return F.dropout(x, p, training)


def plain_softmax(logits_TE: Tensor) -> Tensor:
    return torch.softmax(logits_TE, dim=-1)


def never_together(gates: object) -> bool:
    return False


def patches_for(trick: str) -> list[Patch]:
    """The run-time patches that turn ``trick`` off (``all``: every rec trick)."""
    from mtl.models.rec import towers
    from mtl.moe import dropout, experts, multi_gate, norm_act
    from mtl.moe.gates import dense

    table: dict[str, list[Patch]] = {
        "norm_act": [
            (norm_act, "fuses", lambda *a: False),
            (towers.MLP, "forward", nn.Sequential.forward),
        ],
        "gate_routing": [(multi_gate, "routes_together", never_together)],
        "softmax": [(dense, "softmax_over_experts", plain_softmax)],
        "fast_dropout": [
            (dropout, "fast_dropout", plain_dropout),
            (experts, "fast_dropout", plain_dropout),
            (norm_act, "fast_dropout", plain_dropout),
        ],
        "fold_buckets": [],
        "fold": [],
    }
    if trick == "all":
        return [
            p for t in ("norm_act", "gate_routing", "softmax", "fast_dropout") for p in table[t]
        ]
    return table[trick]


# ----------------------------------------------------------------------- rec arms
@dataclass
class Arm:
    """One side of a comparison: a step and the patches active while it runs."""

    name: str
    step: Callable[[], None]
    patches: list[Patch] = field(default_factory=list)
    module: nn.Module | None = None
    times: list[float] = field(default_factory=list)
    """Mean seconds per step, one entry per round."""

    def run(self, steps: int) -> float:
        with patched(self.patches):
            t0 = time.perf_counter()
            for _ in range(steps):
                self.step()
            return (time.perf_counter() - t0) / steps


@dataclass
class Setting:
    """Arms compared side by side; the first is the code as shipped."""

    trick: str
    workload: str
    arms: list[Arm]
    steps: int = 0
    warmup: int = 0
    check: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_batches(dataset: str) -> tuple[Any, list[Any]]:
    """The dataset's feature spec and :data:`N_BATCHES` shuffled training batches of 1024 rows."""
    from mtl.data.datamodule import RecDataModule
    from mtl.data.tabular import RecBatch

    if dataset == "census":
        kw: dict[str, Any] = {"source": "census_income", "path": str(CENSUS_PATH)}
    else:
        kw = {"source": "synthetic_ctr"}
    dm = RecDataModule(batch_size=BATCH_SIZE, eval_batch_size=8192, embed_dim=16, **kw)
    dm.setup("fit")
    t = dm.tensors("train")
    order = torch.randperm(len(t), generator=torch.Generator().manual_seed(0))
    batches = []
    for i in range(N_BATCHES):
        b = t.select(order[(i * BATCH_SIZE) % (len(t) - BATCH_SIZE) :][:BATCH_SIZE])
        batches.append(RecBatch(cat=b.cat_BF, num=b.num_BF, labels=b.labels_BT))
    return dm.spec, batches


def one_bucket(counts: list[int], max_buckets: int) -> list[list[int]]:
    """``_row_buckets``'s plain equivalent: all of a table's features in one bucket, in order."""
    return [list(range(len(counts)))]


def rec_module(
    spec: Any, model: str, *, fold: bool = True, one_bucket_per_table: bool = False
) -> Any:
    """A seeded RecModule (Adam as shipped) over ``spec``, optionally folding in one bucket per table."""
    from mtl.models.rec import embedding
    from mtl.training.rec_module import RecModule

    with patched([(embedding, "_row_buckets", one_bucket)] if one_bucket_per_table else []):
        torch.manual_seed(0)
        return RecModule(
            spec=spec,
            model=MODELS[model],
            optim={"name": "adam", "lr": LR},
            embedding={"init_std": EMBED_INIT_STD, "fold": fold},
            seed=0,
            diagnostics=False,
        )


def rec_arm(name: str, module: Any, batches: list[Any], patches: list[Patch]) -> Arm:
    """An arm training ``module`` on ``batches`` in turn."""
    opt = module.configure_optimizers()
    module.train()
    i = [0]

    def step() -> None:
        batch = batches[i[0] % len(batches)]
        i[0] += 1
        loss, _ = module.compute_loss(module(batch), batch.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return Arm(name, step, patches, module)


def rec_setting(trick: str, dataset: str, model: str, data: dict[str, Any]) -> Setting:
    spec, batches = data[dataset]
    on = rec_module(spec, model)
    base: list[Patch] = (
        patches_for("norm_act") if (trick, model) == ("fast_dropout", "rechub") else []
    )
    off = rec_module(
        spec,
        model,
        fold=trick != "fold",
        one_bucket_per_table=trick in ("fold_buckets", "all"),
    )
    arms = [
        rec_arm("on", on, batches, base),
        rec_arm("off", off, batches, base + patches_for(trick)),
    ]
    s = Setting(trick, f"{dataset}/{model}", arms)
    s.check = same_function(arms, batches[0])
    emb = on.embedding
    s.extra["folds"] = {
        a.name: [
            list(a.module.embedding.bucket_folds(t, BATCH_SIZE)) for t in range(len(emb.tables))
        ]
        for a in arms
    }
    if trick in ("fold_buckets", "all"):
        s.extra["padded_rows"] = {a.name: a.module.embedding._padded_rows for a in arms}
    return s


def zero_dropout(module: nn.Module) -> None:
    """Set every dropout probability in ``module`` to 0 (in place)."""
    for m in module.modules():
        if hasattr(m, "p") and isinstance(m.p, float):
            m.p = 0.0
        if isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0


def same_function(arms: list[Arm], batch: Any) -> dict[str, float]:
    """Loss and gradient differences of one step of each arm from copies without dropout.

    Raises if the ``off`` arm does not compute the ``on`` arm's function.
    """
    results = []
    for arm in arms:
        m = copy.deepcopy(arm.module)
        zero_dropout(m)
        m.train()
        with patched(arm.patches):
            loss, _ = m.compute_loss(m(batch), batch.labels)
            loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        results.append((float(loss.detach()), grads))
    (loss0, g0), (loss1, g1) = results
    if set(g0) != set(g1):
        raise RuntimeError(f"the arms' gradients cover different parameters: {set(g0) ^ set(g1)}")
    grad_diff = max(float((g0[n] - g1[n]).abs().max()) for n in g0)
    grad_scale = max(float(g.abs().max()) for g in g0.values())
    out = {
        "loss_abs_diff": abs(loss0 - loss1),
        "grad_max_abs_diff": grad_diff,
        "grad_max_abs": grad_scale,
    }
    if out["loss_abs_diff"] > 1e-4 or grad_diff > 1e-3 * grad_scale:
        raise RuntimeError(f"the off arm computes another function: {out}")
    return out


# ----------------------------------------------------------------------- LM and MoE layer
def lm_setting() -> Setting:
    """lm_mixtral (as ``conf/model/lm_mixtral.yaml``) with residual and attention dropout 0.1."""
    from omegaconf import OmegaConf

    import mtl
    from mtl.training.lm_module import build_lm

    conf = Path(mtl.__file__).resolve().parent.parent / "conf" / "model" / "lm_mixtral.yaml"
    cfg: dict[str, Any] = OmegaConf.to_container(OmegaConf.load(conf), resolve=False)  # type: ignore[assignment]
    cfg.update(max_seq_len=LM_BLOCK, dropout=LM_DROPOUT)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, LM_VOCAB, (LM_BATCH, LM_BLOCK + 1), generator=g) for _ in range(8)]
    arms = []
    for name, patches in (("on", []), ("off", patches_for("fast_dropout"))):
        torch.manual_seed(0)
        model = build_lm(cfg, vocab_size=LM_VOCAB).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        i = [0]

        def step(model: nn.Module = model, opt: Any = opt, i: list[int] = i) -> None:
            tokens = batches[i[0] % len(batches)]
            i[0] += 1
            out = model(tokens[:, :-1])
            ce = F.cross_entropy(
                out.logits.reshape(-1, LM_VOCAB).float(), tokens[:, 1:].reshape(-1)
            )
            opt.zero_grad(set_to_none=True)
            (ce + out.aux_loss).backward()
            opt.step()

        arms.append(Arm(name, step, patches, model))
    return Setting("fast_dropout", f"lm_mixtral {LM_BATCH}x{LM_BLOCK}", arms)


class DenseSwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``: the dense FFN with a sparse layer's active parameters."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)
        self.w3 = nn.Linear(d_model, d_hidden, bias=False)
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def moe_layers() -> dict[str, tuple[nn.Module, Callable[[Tensor], Tensor]]]:
    """The shipped sparse layer, the same weights on the sorted layout, and the dense FFN."""
    from mtl.moe import DroplessDispatch, ExpertBank, MoELayer, TopKGate

    E, k, D, H = (MOE_SHAPE[c] for c in "EkDH")
    torch.manual_seed(0)
    layer = MoELayer(
        gate=TopKGate(d_model=D, num_experts=E, k=k, renormalize=True),
        experts=ExpertBank.swiglu(num_experts=E, d_model=D, d_hidden=H),
        dispatch=DroplessDispatch(),
    )
    sorted_layer = MoELayer(gate=layer.gate, experts=layer.experts, dispatch=DroplessDispatch())
    sorted_layer.dispatch.max_padding = -1.0  # never pad: one grouped matmul per projection
    dense = DenseSwiGLU(D, k * H)
    return {
        "fused": (layer, lambda x: layer(x).output),
        "sorted": (sorted_layer, lambda x: sorted_layer(x).output),
        "dense": (dense, dense),
    }


def moe_label() -> str:
    return "E={E} k={k} D={D} H={H} T={T}".format(**MOE_SHAPE)


def moe_steps() -> tuple[dict[str, Callable[[], None]], dict[str, Any]]:
    """Forward + backward of each layer on one input, and checks of which path each takes."""
    from mtl.moe import dispatch

    variants = moe_layers()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(MOE_SHAPE["T"], MOE_SHAPE["D"], generator=g)
    grad_out = torch.randn(MOE_SHAPE["T"], MOE_SHAPE["D"], generator=g)
    calls = [0]
    real = dispatch.fused_swiglu_moe

    def counting(*a: Any, **kw: Any) -> Tensor:
        calls[0] += 1
        return real(*a, **kw)

    info: dict[str, Any] = {"fused_path_calls": {}}
    with torch.no_grad(), patched([(dispatch, "fused_swiglu_moe", counting)]):
        outs = {}
        for name in ("fused", "sorted"):
            calls[0] = 0
            outs[name] = variants[name][1](x)
            info["fused_path_calls"][name] = calls[0]
    info["max_abs_diff_sorted_vs_fused"] = float((outs["sorted"] - outs["fused"]).abs().max())
    if info["fused_path_calls"] != {"fused": 1, "sorted": 0}:
        raise RuntimeError(f"the layers did not take the layouts compared: {info}")
    x.requires_grad_(True)

    def step_of(module: nn.Module, f: Callable[[Tensor], Tensor]) -> Callable[[], None]:
        def step() -> None:
            module.zero_grad(set_to_none=True)
            x.grad = None
            (f(x) * grad_out).sum().backward()

        return step

    return {n: step_of(m, f) for n, (m, f) in variants.items()}, info


def moe_setting() -> Setting:
    steps, info = moe_steps()
    s = Setting("swiglu_layout", moe_label(), [Arm(n, f) for n, f in steps.items()])
    s.extra.update(info)
    return s


# ----------------------------------------------------------------------- malloc (subprocesses)
def child(args: argparse.Namespace) -> None:
    """One process of the malloc A/B: time the Census models and the MoE layer, print JSON."""
    torch.set_num_threads(args.threads)
    if args.child_malloc == "on":
        from mtl.training.cpu_memory import reuse_freed_memory

        if not reuse_freed_memory():
            sys.exit("reuse_freed_memory() did not apply (not glibc)")
    spec, batches = torch.load(args.child_data, weights_only=False)
    out = {}
    arms = {m: rec_arm(m, rec_module(spec, m), batches, []) for m in MODELS}
    moe, _ = moe_steps()
    arms["moe_layer"] = Arm("moe_layer", moe["fused"])
    for name, arm in arms.items():
        steps = args.moe_steps if name == "moe_layer" else args.steps
        arm.run(1 if name == "moe_layer" else args.warmup)
        out[name] = arm.run(steps)
    print(json.dumps(out))


def malloc_round(
    data_path: Path, args: argparse.Namespace, first: str
) -> dict[str, dict[str, float]]:
    """One fresh process per arm, ``first`` first; per arm, seconds per step of each workload."""
    res = {}
    for arm in (first, "off" if first == "on" else "on"):
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child-malloc",
            arm,
            "--child-data",
            str(data_path),
            "--threads",
            str(args.threads),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--moe-steps",
            str(args.moe_steps),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"malloc child ({arm}) failed:\n{done.stderr[-3000:]}")
        res[arm] = json.loads(done.stdout.strip().splitlines()[-1])
    return res


# ----------------------------------------------------------------------- harness
def git_state(path: Path) -> dict[str, Any]:
    def run(*a: str) -> str | None:
        try:
            return subprocess.run(
                ["git", *a], cwd=path, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = run("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": run("rev-parse", "--short", "HEAD"),
        "dirty": None if status is None else bool(status),
    }


def summarize(times: list[float]) -> dict[str, float]:
    return {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "max_ms": 1e3 * max(times),
    }


def row_of(
    trick: str, workload: str, ref: list[float], alt: list[float], alt_name: str, steps: int
) -> dict[str, Any]:
    by_round = [b / a for a, b in zip(ref, alt, strict=True)]
    return {
        "trick": trick,
        "workload": workload,
        "off": alt_name,
        "on_ms": summarize(ref),
        "off_ms": summarize(alt),
        "off_over_on": statistics.median(alt) / statistics.median(ref),
        "off_over_on_by_round": by_round,
        "rounds": len(ref),
        "steps_per_round": steps,
        "on_s_by_round": ref,
        "off_s_by_round": alt,
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = [
        "setting",
        "workload",
        "on ms/step",
        "off ms/step",
        "off/on",
        "off/on by round",
        "rounds x steps",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        on, off, by = r["on_ms"], r["off_ms"], r["off_over_on_by_round"]
        trick = r["trick"] if r["off"] == "off" else f"{r['trick']} ({r['off']})"
        lines.append(
            f"| {trick} | {r['workload']} "
            f"| {on['median_ms']:.2f} ({on['min_ms']:.2f}-{on['max_ms']:.2f}) "
            f"| {off['median_ms']:.2f} ({off['min_ms']:.2f}-{off['max_ms']:.2f}) "
            f"| {r['off_over_on']:.3f} | {min(by):.2f}-{max(by):.2f} "
            f"| {r['rounds']} x {r['steps_per_round']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (interleaved)")
    parser.add_argument("--steps", type=int, default=30, help="rec steps per arm and round")
    parser.add_argument("--lm-steps", type=int, default=4, help="LM steps per arm and round")
    parser.add_argument(
        "--moe-steps", type=int, default=2, help="MoE-layer steps per arm and round"
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed rec steps per arm first")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument(
        "--skip", nargs="*", default=[], help="settings to leave out (malloc, swiglu_layout, ...)"
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's defaults in this process (default: reuse_freed_memory, as shipped)",
    )
    parser.add_argument("--out", type=Path, default=OUT_PATH, help="JSON output path")
    parser.add_argument("--child-malloc", choices=["on", "off"], help=argparse.SUPPRESS)
    parser.add_argument("--child-data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    require_old_internals()
    if args.child_malloc:
        child(args)
        return
    from mtl.training.cpu_memory import reuse_freed_memory

    import mtl

    started = time.time()
    torch.set_num_threads(args.threads)
    malloc = False if args.default_malloc else reuse_freed_memory()
    mtl_root = Path(mtl.__file__).resolve().parent.parent
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mtl_path": str(mtl_root),
        "mtl_git": git_state(mtl_root),
        "script_git": git_state(BENCH_DIR),
        "reuse_freed_memory": malloc,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "pythonpath": os.environ.get("PYTHONPATH"),
        "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "MKL_"))},
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_avg_start": os.getloadavg(),
    }
    print(
        f"# ab_removals: mtl from {mtl_root} ({env['mtl_git']['commit']}), torch {torch.__version__}, "
        f"{args.threads} threads, reuse_freed_memory {malloc}, load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    data = {d: load_batches(d) for d in ("census", "synthetic")}
    plan = [
        ("fold_buckets", "census", "mmoe"),
        ("fold_buckets", "synthetic", "mmoe"),
        ("fold", "census", "mmoe"),
        ("fold", "synthetic", "mmoe"),
        ("norm_act", "census", "rechub"),
        ("gate_routing", "census", "mmoe"),
        ("gate_routing", "census", "rechub"),
        ("softmax", "census", "mmoe"),
        ("softmax", "census", "rechub"),
        ("fast_dropout", "census", "mmoe"),
        ("fast_dropout", "census", "rechub"),
        ("all", "census", "mmoe"),
        ("all", "census", "rechub"),
        ("all", "synthetic", "rechub"),
    ]
    settings = [rec_setting(*p, data) for p in plan if p[0] not in args.skip]
    for s in settings:
        s.steps, s.warmup = args.steps, args.warmup
    if "fast_dropout" not in args.skip:
        settings.append(lm_setting())
        settings[-1].steps, settings[-1].warmup = args.lm_steps, 1
    if "swiglu_layout" not in args.skip:
        settings.append(moe_setting())
        settings[-1].steps, settings[-1].warmup = args.moe_steps, 1
    for s in settings:
        print(f"  {s.trick} / {s.workload}: {s.check or s.extra}", flush=True)
        for arm in s.arms:
            arm.run(s.warmup)
    malloc_runs: list[dict[str, dict[str, float]]] = []
    tmp = tempfile.TemporaryDirectory()
    data_path = Path(tmp.name) / "census.pt"
    torch.save(data["census"], data_path)
    loads = []
    for r in range(args.rounds):
        loads.append(os.getloadavg())
        t0 = time.perf_counter()
        for s in settings:
            order = s.arms[r % len(s.arms) :] + s.arms[: r % len(s.arms)]
            for arm in order:
                arm.times.append(arm.run(s.steps))
        if "malloc" not in args.skip:
            malloc_runs.append(malloc_round(data_path, args, "on" if r % 2 == 0 else "off"))
        print(
            f"  round {r}: {time.perf_counter() - t0:.0f}s, load {loads[-1][0]:.2f}",
            flush=True,
        )
    tmp.cleanup()
    rows = []
    for s in settings:
        ref = s.arms[0]
        for alt in s.arms[1:]:
            rows.append(
                row_of(s.trick, s.workload, ref.times, alt.times, alt.name, s.steps)
                | {"check": s.check, **s.extra}
            )
    for w in malloc_runs[0]["on"] if malloc_runs else []:
        steps = args.moe_steps if w == "moe_layer" else args.steps
        workload = "census/" + w if w in MODELS else moe_label()
        rows.append(
            row_of(
                "malloc",
                workload,
                [m["on"][w] for m in malloc_runs],
                [m["off"][w] for m in malloc_runs],
                "off",
                steps,
            )
        )
    print(table(rows))
    moe = next((s for s in settings if s.trick == "swiglu_layout"), None)
    if moe is not None:
        T = MOE_SHAPE["T"]
        tps = {a.name: T / statistics.median(a.times) for a in moe.arms}
        print(
            "\nSwiGLU layer tokens/s (forward + backward): "
            + ", ".join(f"{n} {v:,.0f}" for n, v in tps.items())
            + f"; fused / dense {tps['fused'] / tps['dense']:.2f}x, sorted / dense {tps['sorted'] / tps['dense']:.2f}x"
        )
    env.update(
        ended=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        wall_s=time.time() - started,
        load_avg_end=os.getloadavg(),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "env": env,
        "config": {
            "batch_size": BATCH_SIZE,
            "rounds": args.rounds,
            "steps": args.steps,
            "lm_steps": args.lm_steps,
            "moe_steps": args.moe_steps,
            "warmup": args.warmup,
            "models": MODELS,
            "moe_shape": MOE_SHAPE,
            "lm": {
                "preset": "lm_mixtral",
                "batch": LM_BATCH,
                "block": LM_BLOCK,
                "dropout": LM_DROPOUT,
            },
        },
        "load_avg_by_round": loads,
        "rows": rows,
    }
    args.out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out} in {env['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
