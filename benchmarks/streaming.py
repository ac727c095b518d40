"""Data larger than memory: ``mtl prepare`` + streaming MMoE training against the in-memory path.

1. A generator writes a Criteo-like log: 26 categorical columns (skewed ids, 3 to
   ~100k categories), 13 numeric columns (counts and log-normal amounts) and two
   labels (click, and a conversion only after a click), ``--rows`` rows in Parquet
   files of ``--chunk-rows`` rows (the generator holds one chunk at a time).
2. ``mtl prepare`` (:func:`mtl.data.shards.prepare.prepare`) encodes all of it into
   shards, timed; and the first ``--subset-rows`` rows separately.
3. On the subset, one epoch of MMoE is trained by the in-memory path (``data=table``:
   the table read, split and encoded into tensors) and by the streaming path
   (``data=shards`` on the subset's shards), alternating for ``--repeats`` rounds; each
   run is its own process, so its peak resident memory (``VmHWM``) is its own. Both
   runs use the same plain training loop (RecModule forward, loss, Adam) over their
   data module's train loader: the difference is the data path.
4. One epoch of MMoE over the full shards, in its own process: samples/s and peak RSS.

Samples/s = train rows / the epoch's wall time (the data module's setup excluded;
it is reported apart). Run ``python benchmarks/streaming.py --rows 20000000``;
``--rows 20000 --subset-rows 10000`` is a smoke run.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from common import OUT_DIR, base_parser, environment, markdown_table, write_json

N_CATEGORICAL = 26
N_NUMERIC = 13
# Categories per column: a few tiny, most mid-sized, a few large (Criteo's spread, smaller).
CARDINALITY = [
    3, 4, 10, 15, 25, 80, 300, 600, 1_000, 2_000, 3_000, 5_000, 5_000,
    10_000, 10_000, 20_000, 30_000, 40_000, 50_000, 50_000, 60_000, 70_000, 80_000,
    90_000, 100_000, 100_000,
]  # fmt: skip
CAT = [f"c{i}" for i in range(N_CATEGORICAL)]
NUM = [f"n{i}" for i in range(N_NUMERIC)]
LABELS = ["click", "conversion"]


def generate(folder: Path, rows: int, chunk_rows: int, seed: int = 0) -> list[Path]:
    """Write ``rows`` generated rows as ``folder/part-*.parquet`` of ``chunk_rows`` each."""
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "_complete.json"
    if done.is_file() and json.loads(done.read_text()) == {"rows": rows, "chunk": chunk_rows}:
        return sorted(folder.glob("part-*.parquet"))
    for old in folder.glob("part-*.parquet"):
        old.unlink()
    files = []
    for k, start in enumerate(range(0, rows, chunk_rows)):
        n = min(chunk_rows, rows - start)
        rng = np.random.default_rng([seed, k])
        cols: dict[str, np.ndarray] = {}
        for name, card in zip(CAT, CARDINALITY, strict=True):
            # skewed ids: u**3 puts most rows on the small ids, as real id logs do
            cols[name] = (card * rng.random(n) ** 3).astype(np.int32)
        for i, name in enumerate(NUM):
            if i % 2:
                cols[name] = rng.poisson(2.0 + i, n).astype(np.float32)
            else:
                cols[name] = rng.lognormal(1.0, 1.0, n).astype(np.float32)
        logit = (
            0.6 * np.log1p(cols["n0"])
            - 0.4 * np.log1p(cols["n2"])
            + 0.8 * (cols["c5"] % 7 == 0)
            - 0.5 * (cols["c2"] % 3 == 0)
            - 1.2
        )
        click = rng.random(n) < 1 / (1 + np.exp(-logit))
        conv = click & (rng.random(n) < 1 / (1 + np.exp(-(0.5 * cols["n4"] / 3 - 1.5))))
        cols["click"], cols["conversion"] = click.astype(np.int8), conv.astype(np.int8)
        path = folder / f"part-{k:05d}.parquet"
        pl.DataFrame(cols).write_parquet(path, row_group_size=100_000)
        files.append(path)
        print(f"generated {path.name}: {start + n:,} of {rows:,} rows", flush=True)
    done.write_text(json.dumps({"rows": rows, "chunk": chunk_rows}))
    return files


def subset(files: list[Path], rows: int, chunk_rows: int, folder: Path) -> Path:
    """A folder of links to the first files holding ``rows`` rows (whole chunks)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for f in files[: max(1, -(-rows // chunk_rows))]:
        (folder / f.name).symlink_to(f.resolve())
    return folder


def data_config(path: Path, args: Any) -> dict[str, Any]:
    """The ``data=table`` keys both paths are built from."""
    return {
        "path": str(path),
        "labels": LABELS,
        "categorical": CAT,
        "numeric": NUM,
        "split": [0.98, 0.01, 0.01],
        "min_count": args.min_count,
        "batch_size": args.batch_size,
        "eval_batch_size": 8192,
    }


def _overrides(data: dict[str, Any]) -> list[str]:
    def fmt(v: Any) -> str:
        return "[" + ",".join(map(str, v)) + "]" if isinstance(v, list) else str(v)

    return [f"data.{k}={fmt(v)}" for k, v in data.items()]


def child(args: Any) -> None:
    """One epoch of MMoE on one data path, in this process; prints a JSON line."""
    from mtl.training.build import build, build_module
    from mtl.training.config import compose_config

    torch.set_num_threads(args.threads)
    spec = json.loads(args.child)
    if spec["kind"] == "prepare":
        from mtl.data.shards.prepare import prepare

        start = time.perf_counter()
        manifest = prepare(
            spec["data"],
            spec["out"],
            force=True,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
        print(json.dumps({"prepare_s": time.perf_counter() - start, "peak_rss_bytes": _peak_rss(),
                          "train_rows": manifest["splits"]["train"]["rows"]}))  # fmt: skip
        return
    if spec["kind"] == "shards":
        overrides = ["data=shards", f"data.path={spec['path']}",
                     f"data.batch_size={args.batch_size}", f"data.buffer_rows={args.buffer_rows}",
                     f"data.num_workers={args.num_workers}"]  # fmt: skip
    else:
        overrides = ["data=table", *_overrides(spec["data"])]
    cfg = compose_config("train", ["model=mmoe", *args.model, *overrides])
    start = time.perf_counter()
    dm = build(cfg.data, what="data")
    dm.setup("fit")
    setup_s = time.perf_counter() - start
    torch.manual_seed(0)
    module = build_module(cfg, dm)
    opt = module.configure_optimizers()["optimizer"]
    loader = dm.train_dataloader()
    rows, losses = 0, []
    module.train()
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        out = module(batch)
        loss, _ = module.compute_loss(out, batch.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rows += batch.batch_size
        if step % 100 == 0:
            losses.append(float(loss.detach()))
        if args.progress and step % 2000 == 0:
            print(f"  step {step:,}: {rows:,} rows, {rows / (time.perf_counter() - start):,.0f}/s",
                  file=sys.stderr, flush=True)  # fmt: skip
    epoch_s = time.perf_counter() - start
    hwm = _peak_rss()
    print(json.dumps({
        "kind": spec["kind"], "rows": rows, "setup_s": setup_s, "epoch_s": epoch_s,
        "samples_per_s": rows / epoch_s, "peak_rss_bytes": hwm,
        "loss_first": losses[0], "loss_last": float(np.mean(losses[-5:])),
        "params": sum(p.numel() for p in module.parameters()),
    }))  # fmt: skip


def _peak_rss() -> int:
    """This process's peak resident set size (``VmHWM``), in bytes."""
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def run_child(spec: dict[str, Any], args: Any) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        json.dumps(spec),
        "--threads",
        str(args.threads),
        "--batch-size",
        str(args.batch_size),
        "--buffer-rows",
        str(args.buffer_rows),
        "--num-workers",
        str(args.num_workers),
        "--model",
        *args.model,
    ]
    cmd += ["--progress"] if args.progress else []
    done = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    if done.returncode != 0:
        raise RuntimeError(f"{spec['kind']} run failed:\n{done.stderr[-4000:]}")
    if args.progress:
        sys.stderr.write(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000_000, help="rows generated")
    parser.add_argument(
        "--subset-rows", type=int, default=2_000_000, help="rows of the side-by-side"
    )
    parser.add_argument("--chunk-rows", type=int, default=1_000_000, help="rows per generated file")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--buffer-rows", type=int, default=200_000)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--min-count", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=OUT_DIR / "streaming_data")
    parser.add_argument("--skip-full", action="store_true", help="only the side-by-side subset")
    parser.add_argument("--skip-subset", action="store_true", help="only the full-size run")
    parser.add_argument("--progress", action="store_true", help="show training progress")
    parser.add_argument(
        "--model",
        nargs="*",
        default=["model.num_experts=4", "model.expert_hidden=[64]", "model.tower_hidden=[32]"],
        help="overrides of conf/model/mmoe.yaml (default: a small MMoE, so that the data "
        "path is a larger share of each step)",
    )
    parser.add_argument("--child", default=None, help=argparse_hidden())
    # One thread: on a shared machine a second intra-op thread mostly waits for a core.
    parser.set_defaults(threads=1)
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 2
    if args.child:
        child(args)
        return

    work = args.workdir
    chunk = min(args.chunk_rows, args.rows)
    t0 = time.perf_counter()
    files = generate(work / "raw", args.rows, chunk)
    gen_s = time.perf_counter() - t0
    sub_rows = min(args.subset_rows, args.rows)
    sub = subset(files, sub_rows, chunk, work / "subset")
    sub_data = data_config(sub, args)
    full_data = data_config(work / "raw", args)

    def timed_prepare(data: dict[str, Any], out: Path) -> dict[str, Any]:
        # in its own process: its peak RSS is the preparation's
        res = run_child({"kind": "prepare", "data": data, "out": str(out)}, args)
        print(f"prepare {out.name}: {res['prepare_s']:.1f}s, peak RSS "
              f"{res['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)  # fmt: skip
        return res

    runs: dict[str, list[dict[str, Any]]] = {"memory": [], "shards": []}
    sub_prep: dict[str, Any] = {}
    sub_prep_s, sub_train_rows = None, None
    if not args.skip_subset:
        sub_prep = timed_prepare(sub_data, work / "shards_subset")
        sub_prep_s, sub_train_rows = sub_prep["prepare_s"], sub_prep["train_rows"]
        for r in range(args.repeats):
            for kind in ("memory", "shards") if r % 2 == 0 else ("shards", "memory"):
                spec = ({"kind": "memory", "data": sub_data} if kind == "memory"
                        else {"kind": "shards", "path": str(work / "shards_subset")})  # fmt: skip
                res = run_child(spec, args)
                runs[kind].append(res)
                print(f"subset round {r}: {kind}: {res['samples_per_s']:,.0f} samples/s, "
                      f"peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)  # fmt: skip
    full: dict[str, Any] | None = None
    full_prep_s = None
    if not args.skip_full:
        full_prep = timed_prepare(full_data, work / "shards_full")
        full_prep_s = full_prep["prepare_s"]
        full = run_child({"kind": "shards", "path": str(work / "shards_full")}, args)
        full["train_rows"] = full_prep["train_rows"]
        full["prepare_peak_rss_bytes"] = full_prep["peak_rss_bytes"]

    def med(kind: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[kind])

    def peak(kind: str) -> str:
        return f"{max(x['peak_rss_bytes'] for x in runs[kind]) / 2**30:.2f}"

    rows_table = []
    ratio, round_ratios = None, []
    if runs["memory"]:
        ratio = med("shards", "samples_per_s") / med("memory", "samples_per_s")
        # each round's two runs saw about the same load: their ratio is the steadier figure
        round_ratios = [
            sh["samples_per_s"] / mem["samples_per_s"]
            for mem, sh in zip(runs["memory"], runs["shards"], strict=True)
        ]
        print(
            "shards / in-memory samples/s per round: " + ", ".join(f"{r:.2f}" for r in round_ratios)
        )
        rows_table += [
            ["in-memory (data=table)", f"{sub_rows:,}", f"{med('memory', 'setup_s'):.1f}",
             f"{med('memory', 'samples_per_s'):,.0f}", "1.00", peak("memory")],
            ["streaming (data=shards)", f"{sub_rows:,}", f"{sub_prep_s:.1f} + {med('shards', 'setup_s'):.1f}",
             f"{med('shards', 'samples_per_s'):,.0f}", f"{ratio:.2f}", peak("shards")],
        ]  # fmt: skip
    if full is not None:
        rows_table.append(
            ["streaming (data=shards)", f"{args.rows:,}", f"{full_prep_s:.1f} + {full['setup_s']:.1f}",
             f"{full['samples_per_s']:,.0f}", "-", f"{full['peak_rss_bytes'] / 2**30:.2f}"]
        )  # fmt: skip
    headers = [
        "path",
        "rows",
        "prepare + setup (s)",
        "train samples/s",
        "vs in-memory",
        "peak RSS (GiB)",
    ]
    print()
    print(markdown_table(headers, rows_table))
    payload = {
        "benchmark": "streaming",
        "config": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"
        },
        "generate_s": gen_s,
        "subset": None
        if not runs["memory"]
        else {
            "rows": sub_rows,
            "prepare_s": sub_prep_s,
            "prepare_peak_rss_bytes": sub_prep["peak_rss_bytes"],
            "runs": runs,
            "shards_vs_memory_samples_per_s": ratio,
            "round_ratios": round_ratios,
            "train_rows": sub_train_rows,
        },
        "full": None
        if full is None
        else {"generated_rows": args.rows, "prepare_s": full_prep_s, **full},
        "env": environment(torch.device("cpu")),
    }
    path = write_json("streaming", payload, args.out)
    print(f"\nwrote {path}")


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
