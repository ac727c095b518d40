"""Turn the raw Ali-CCP (Tianchi) files into the CSVs that ``data=ali_ccp`` reads.

Usage::

    python datasets/ali_ccp/prepare.py RAW_DIR --out data/ali_ccp [--val-fraction 0.1] [--max-rows N]

``RAW_DIR`` holds the four raw files of the Tianchi release::

    sample_skeleton_{train,test}.csv   sample_id, click, conversion, common_feature_index, n, feature_list
    common_features_{train,test}.csv   common_feature_index, n, feature_list

A feature list is ``field\\x02feature_id\\x03value`` entries joined by ``\\x01``; user
features sit in the common-features file, shared by the samples of one request.
The output follows the torch-rechub layout: ``ali_ccp_{train,val,test}.csv`` with
``click``, ``purchase``, one column per sparse field (the feature id of the field's
first entry; null when absent) and ``D<field>`` columns holding the value of that
entry for the multi-valued and combination fields. Validation rows are a
deterministic hash-based fraction of the train samples. Files are processed in
chunks, so the 40M-row train skeleton does not need to fit in memory at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl

SPARSE_FIELDS = (
    "101", "121", "122", "124", "125", "126", "127", "128", "129",
    "205", "206", "207", "210", "216", "508", "509", "702", "853", "301",
    "109_14", "110_14", "127_14", "150_14",
)  # fmt: skip
DENSE_FIELDS = ("109_14", "110_14", "127_14", "150_14", "508", "509", "702", "853")
SKELETON_COLUMNS = [
    "sample_id",
    "click",
    "purchase",
    "common_feature_index",
    "n_features",
    "feature_list",
]
COMMON_COLUMNS = ["common_feature_index", "n_features", "feature_list"]
OUTPUT_COLUMNS = ["click", "purchase", *SPARSE_FIELDS, *(f"D{f}" for f in DENSE_FIELDS)]


def _scan(path: Path, columns: list[str]) -> pl.LazyFrame:
    if not path.is_file():
        raise SystemExit(f"error: raw Ali-CCP file not found: {path}")
    # The feature lists contain no quotes or commas; treat every field as text.
    return pl.scan_csv(
        path, has_header=False, new_columns=columns, infer_schema=False, quote_char=None
    )


def parse_features(batch: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """Wide table: ``keys`` + one column per sparse field + ``D<field>`` values."""
    entries = (
        batch.select(*keys, pl.col("feature_list").str.split("\x01").alias("entry"))
        .explode("entry")
        .select(
            *keys,
            pl.col("entry").str.extract(r"^([^\x02]*)\x02").alias("field"),
            pl.col("entry").str.extract(r"\x02([^\x03]*)\x03").alias("feature_id"),
            pl.col("entry").str.extract(r"\x03(.*)$").cast(pl.Float64, strict=False).alias("value"),
        )
    )
    present = set(entries.get_column("field").unique().drop_nulls().to_list())
    aggs = [
        pl.col("feature_id").filter(pl.col("field") == f).first().alias(f)
        for f in SPARSE_FIELDS
        if f in present
    ] + [
        pl.col("value").filter(pl.col("field") == f).first().alias(f"D{f}")
        for f in DENSE_FIELDS
        if f in present
    ]
    return entries.group_by(keys, maintain_order=True).agg(aggs)


def _common_table(path: Path, chunk_rows: int) -> pl.DataFrame:
    parts = [
        parse_features(b, ["common_feature_index"])
        for b in _scan(path, COMMON_COLUMNS).collect_batches(chunk_size=chunk_rows)
    ]
    return pl.concat(parts, how="diagonal_relaxed")


def _finish(frame: pl.DataFrame) -> pl.DataFrame:
    missing = [
        pl.lit(None, dtype=pl.String).alias(c) for c in SPARSE_FIELDS if c not in frame.columns
    ]
    missing += [
        pl.lit(None, dtype=pl.Float64).alias(f"D{f}")
        for f in DENSE_FIELDS
        if f"D{f}" not in frame.columns
    ]
    frame = frame.with_columns(missing)
    # Absent dense entries mean "no such interaction": 0, so the loader sees no nulls.
    return frame.with_columns(pl.col(f"D{f}").fill_null(0.0) for f in DENSE_FIELDS).select(
        OUTPUT_COLUMNS
    )


def convert(
    skeleton: Path,
    common: Path,
    outputs: dict[str, Path],
    *,
    val_fraction: float = 0.0,
    max_rows: int | None = None,
    chunk_rows: int = 1_000_000,
    seed: int = 0,
) -> dict[str, int]:
    """Convert one raw split; with ``val_fraction`` route a hash-chosen share of samples to ``outputs["val"]``."""
    if val_fraction <= 0:
        outputs = {k: v for k, v in outputs.items() if k != "val"}
    common_wide = _common_table(common, chunk_rows)
    lf = _scan(skeleton, SKELETON_COLUMNS)
    if max_rows is not None:
        lf = lf.head(max_rows)
    counts = dict.fromkeys(outputs, 0)
    for batch in lf.collect_batches(chunk_size=chunk_rows):
        wide = parse_features(batch, ["sample_id", "click", "purchase", "common_feature_index"])
        joined = wide.join(
            common_wide,
            on="common_feature_index",
            how="left",
            suffix="_common",
            maintain_order="left",
            validate="m:1",
        )
        frame = _finish(joined.with_columns(pl.col("click", "purchase").cast(pl.Int8)))
        is_val = (pl.Series(joined["sample_id"]).hash(seed=seed) % 10_000) < int(
            val_fraction * 10_000
        )
        for name, part in (("train", frame.filter(~is_val)), ("val", frame.filter(is_val))):
            if name not in outputs or part.height == 0:
                continue
            with outputs[name].open("a" if counts[name] else "w") as fh:
                part.write_csv(fh, include_header=counts[name] == 0)
            counts[name] += part.height
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "raw_dir", type=Path, help="directory with sample_skeleton_*.csv and common_features_*.csv"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output directory for ali_ccp_{train,val,test}.csv"
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of train samples used as validation"
    )
    parser.add_argument(
        "--max-rows",
        type=int,
        default=None,
        help="only the first rows of each skeleton (quick runs)",
    )
    parser.add_argument("--chunk-rows", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    kw = {"max_rows": args.max_rows, "chunk_rows": args.chunk_rows}
    train = convert(
        args.raw_dir / "sample_skeleton_train.csv",
        args.raw_dir / "common_features_train.csv",
        {"train": args.out / "ali_ccp_train.csv", "val": args.out / "ali_ccp_val.csv"},
        val_fraction=args.val_fraction,
        **kw,
    )
    test = convert(
        args.raw_dir / "sample_skeleton_test.csv",
        args.raw_dir / "common_features_test.csv",
        {"train": args.out / "ali_ccp_test.csv"},
        **kw,
    )
    print(
        f"rows: train {train['train']}, val {train.get('val', 0)}, test {test['train']}; written to {args.out}"
    )


if __name__ == "__main__":
    main()
