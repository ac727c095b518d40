"""Training throughput of the MoE language-model presets against the dense baseline.

Every preset in ``conf/model/lm_*.yaml`` (Mixtral, OLMoE, Switch, DeepSeekMoE,
DeepSeek-V3, top-p, expert choice) is trained next to ``lm_dense``, whose
SwiGLU FFN has the same active parameters per token, on character-level Tiny
Shakespeare (``../shared/data/tinyshakespeare/input.txt`` relative to the repo
root; the embedded corpus when absent) with the presets' own sizes, batch 32 x
128 tokens, AdamW. A step is forward + cross-entropy + router losses +
backward + optimizer step. Steps are interleaved across presets in rounds (a
few steps of each preset per round) so that all presets share the machine's
load; tokens/s = tokens per step / median step time.

``--compile`` adds a ``torch.compile``d twin of every model (same initial
weights, compiled in place as ``mtl train compile=true`` does), timed in the
same rounds: the table then also gives each compiled model against its eager
twin, and each compiled preset against the compiled dense model. The first
calls, which compile, are warm-up and not timed; their time is in the JSON
(``warmup_s``).

Usage::

    python benchmarks/lm_train.py            # every preset
    python benchmarks/lm_train.py --quick    # mixtral, olmoe, switch vs dense
    python benchmarks/lm_train.py --compile  # ... and each one torch.compile'd
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO_ROOT,
    base_parser,
    environment,
    fmt_num,
    markdown_table,
    median,
    report_written,
    setup_process,
    write_json,
)

from mtl.data.text import TextDataModule
from mtl.training.build import build_lm
from mtl.training.compile import compile_model
from mtl.training.gate_config import model_config

CORPUS = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
CONF_DIR = REPO_ROOT / "conf" / "model"
BLOCK, BATCH = 128, 32
QUICK_PRESETS = ["lm_mixtral", "lm_olmoe", "lm_switch"]


def presets() -> list[str]:
    """Every LM preset name but the dense baseline, from ``conf/model``."""
    return sorted(p.stem for p in CONF_DIR.glob("lm_*.yaml") if p.stem != "lm_dense")


def variant_key(preset: str, compiled: bool) -> str:
    """The name a model is timed under: its preset, ``+compile`` for the compiled twin."""
    return f"{preset}+compile" if compiled else preset


def build(name: str, vocab_size: int) -> nn.Module:
    """The preset's model, exactly as ``mtl train model=<name>`` builds it."""
    cfg: dict[str, Any] = model_config(name)  # with the gate its defaults list picks
    cfg["max_seq_len"] = BLOCK
    torch.manual_seed(0)
    return build_lm(cfg, vocab_size=vocab_size)


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="*", default=None, help="presets to compare")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per preset")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time a torch.compile'd twin of every model (inductor defaults)",
    )
    args = parser.parse_args()
    process = setup_process(args)
    names = args.presets or (QUICK_PRESETS if args.quick else presets())
    steps = args.steps or (10 if args.quick else 20)
    per_round = 2
    dm = TextDataModule(
        path=str(CORPUS) if CORPUS.exists() else None,
        block_size=BLOCK,
        batch_size=BATCH,
        steps_per_epoch=4 * steps + 8,
    )
    dm.setup("fit")
    env = environment(torch.device("cpu"))
    env.update(process)
    print(
        f"# lm_train on {env['cpu']}, torch {env['torch']}, {env['torch_threads']} threads, "
        f"corpus {dm.source}, batch {BATCH}x{BLOCK}, load avg {env['load_avg_1m_start']:.1f}",
        flush=True,
    )
    batches = list(dm.train_dataloader())
    # variant key -> (preset, compiled); a compiled twin starts from the same weights
    variants = {
        variant_key(n, c): (n, c)
        for c in ([False, True] if args.compile else [False])
        for n in ["lm_dense", *names]
    }
    models: dict[str, nn.Module] = {}
    for key, (preset, compiled) in variants.items():
        models[key] = build(preset, dm.vocab_size)
        if compiled:
            compile_model(models[key], True)
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-3) for n, m in models.items()}
    losses: dict[str, float] = {}
    warmup_s: dict[str, float] = {}

    def step(name: str, i: int) -> None:
        model, opt = models[name], opts[name]
        inputs, targets = batches[i % len(batches)]
        out = model(inputs, targets)  # the cross-entropy of LMModule's step, in the model
        ce = out.loss
        assert ce is not None
        loss = ce + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses[name] = float(ce.detach())

    for n in models:  # warm-up (a compiled model compiles here)
        t = time.perf_counter()
        for i in range(2):
            step(n, i)
        warmup_s[n] = time.perf_counter() - t
    times: dict[str, list[float]] = {n: [] for n in models}
    order = list(models)
    for r in range(steps // per_round):
        shift = r % len(order)
        for n in order[shift:] + order[:shift]:
            for j in range(per_round):
                t = time.perf_counter()
                step(n, 2 + r * per_round + j)
                times[n].append(time.perf_counter() - t)
    tokens = BATCH * BLOCK
    rows = []
    for key, model in models.items():
        preset, compiled = variants[key]
        counts = model.parameter_counts()  # type: ignore[operator]
        tps = tokens / median(times[key])
        dense_key = variant_key("lm_dense", compiled)
        row: dict[str, Any] = {
            "preset": preset,
            "compiled": compiled,
            "params_total": counts["total"],
            "params_active": counts["active"],
            "median_step_s": median(times[key]),
            "tokens_per_s": tps,
            "vs_dense": tps / (tokens / median(times[dense_key])),
            "step_times_s": times[key],
            "warmup_s": warmup_s[key],
            "last_train_ce": losses[key],
        }
        if compiled:
            row["vs_eager"] = median(times[variant_key(preset, False)]) / median(times[key])
        rows.append(row)
    head = ["preset", "variant", "params", "active", "step ms", "tokens/s", "vs dense"]
    if args.compile:
        head.append("vs eager")
    table = markdown_table(
        head,
        [
            [
                r["preset"],
                "compiled" if r["compiled"] else "eager",
                fmt_num(r["params_total"]),
                fmt_num(r["params_active"]),
                f"{r['median_step_s'] * 1e3:.0f}",
                fmt_num(r["tokens_per_s"]),
                f"{r['vs_dense']:.2f}x",
                *([f"{r['vs_eager']:.2f}x" if r["compiled"] else "-"] if args.compile else []),
            ]
            for r in rows
        ],
    )
    print(table)
    path = write_json(
        "lm_train",
        {
            "env": env,
            "config": {
                "block": BLOCK,
                "batch": BATCH,
                "steps": steps,
                "corpus": dm.source,
                "compile": args.compile,
            },
            "results": rows,
        },
        args.out,
    )
    report_written(path, args)


if __name__ == "__main__":
    main()
