"""Join KuaiRand-Pure logs with user and video features once, for ``data=kuairand``.

Usage::

    python datasets/kuairand/prepare.py data/KuaiRand-Pure/data [--out FILE]

Writes ``kuairand_pure.parquet`` (default: inside the data directory), which the
loader reads instead of re-joining the CSVs on every run. The join is
:func:`mtl.data.sources.kuairand.join_kuairand`, the same one the loader uses, so
both routes give identical frames. Reports log rows whose user or video has no
feature row (their profile features become unknown / OOV) and the label rates.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl

from mtl.data.sources.kuairand import KUAIRAND_TASKS, PREPARED_FILE, join_kuairand


def prepare(data_dir: Path, out: Path | None = None) -> Path:
    """Join, report and write the parquet file; return its path."""
    joined = join_kuairand(data_dir)
    target = out or data_dir / PREPARED_FILE
    no_user = (
        joined.filter(pl.col("user_active_degree").is_null()).height
        if "user_active_degree" in joined.columns
        else 0
    )
    no_video = (
        joined.filter(pl.col("author_id").is_null()).height if "author_id" in joined.columns else 0
    )
    rates = {t: round(float(joined[t].mean()), 5) for t in KUAIRAND_TASKS if t in joined.columns}  # type: ignore[arg-type]
    print(
        f"{joined.height} log rows; without user features: {no_user}; without video features: {no_video}"
    )
    print(f"label rates: {rates}")
    joined.write_parquet(target)
    print(f"written {target}")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data_dir", type=Path, help="the KuaiRand-Pure data/ directory")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"output file (default: DATA_DIR/{PREPARED_FILE})"
    )
    args = parser.parse_args(argv)
    prepare(args.data_dir, args.out)


if __name__ == "__main__":
    main()
