"""``mtl prepare``: encode a table once into row-grouped Parquet shards for streaming training.

One streaming pass per step, nothing loaded whole: the rows are checked
(:func:`~mtl.data.shards.scan.check_rows`), split (:func:`~mtl.data.shards.split.split_column`),
the encoding is fitted on the train rows (:func:`~mtl.data.shards.encoding.fit_lazy`),
and every row is encoded (int32 ids, float32 standardised numerics, float32 labels,
an int64 user key) and written by polars' streaming sink into
``OUT/{train,val,test}/*.parquet`` files of at most ``shard_rows`` rows in row groups
of ``row_group_rows``. ``OUT/encoding.json`` holds the fitted encoding and
``OUT/manifest.json`` the shards, their row counts, the label rates, the share of
ids at the unknown index 0 per column, how the split was made, and a fingerprint of
the inputs (each file's size and modification time) and options: a second run with
the same fingerprint reuses the shards. ``OUT`` must not hold an input file, and
holds nothing else than an earlier preparation's files unless it has a manifest;
a rewrite deletes only those files (:mod:`~mtl.data.shards.folder`)::

    mtl prepare data=table data.path=logs/*.parquet data.labels=[click] \\
        data.categorical=[user_id,item_id] data.numeric=[price] out=shards/logs
    mtl train data=shards data.path=shards/logs
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from mtl.data.features import check_roles_disjoint
from mtl.data.shards.encoding import fit_lazy, save_encoding
from mtl.data.shards.folder import (
    ENCODING_FILE,
    MANIFEST_FILE,
    SHARD_FORMAT,
    SPLITS,
    WRITING,
    check_out,
    clear_shards,
    column_names,
    manifest_problem,
)
from mtl.data.shards.record import shard_record
from mtl.data.shards.scan import TableQuery, check_rows, read_failure, scan_files
from mtl.data.shards.split import SPLIT, describe_split, split_column, split_seed
from mtl.data.sources.table import split_files
from mtl.data.tabular import category_codes, standardised, user_key
from mtl.data.validation import DataError

__all__ = [
    "ENCODING_FILE",
    "MANIFEST_FILE",
    "SHARD_FORMAT",
    "column_names",
    "main",
    "prepare",
]

# The data keys that change the shards' content; the others (batch size...) do not.
_CONTENT_KEYS = (
    "path", "train", "val", "test", "labels", "categorical", "numeric", "user", "task_kinds",
    "separator", "null_values", "fill_numeric_nulls", "split_by", "split", "n_rows",
    "embed_dim", "max_embed_dim", "min_count", "max_vocab", "task_weights",
)  # fmt: skip


def _file_stamp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _encode_exprs(fitted: Any, schema: Mapping[str, pl.DataType]) -> list[pl.Expr]:
    spec = fitted.spec
    exprs = [
        category_codes(f.name, fitted.vocabularies[f.name], pl.Int32).alias(
            column_names("cat", f.name)
        )
        for f in spec.categorical
    ]
    exprs += [standardised(f).alias(column_names("num", f.name)) for f in spec.numeric]
    exprs += [pl.col(t).cast(pl.Float32).alias(column_names("label", t)) for t in spec.task_names]
    if spec.user_column is not None:
        exprs.append(user_key(spec.user_column, schema[spec.user_column]).alias("user"))
    return exprs


def _read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError:  # not JSON: prepared again
        return None
    return manifest if isinstance(manifest, dict) else None


def _complete(out: Path, manifest: Any) -> bool:
    """Whether ``out`` holds every shard ``manifest`` lists, as written (False if malformed)."""
    return manifest_problem(out, manifest) is None


def prepare(
    data: Mapping[str, Any],
    out: str | Path,
    *,
    row_group_rows: int = 100_000,
    shard_rows: int = 2_000_000,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Encode the rows of a ``data=table`` config into shards under ``out``; returns the manifest.

    Args:
        data: the ``data`` node of a ``data=table`` config (``path``, ``labels``,
            ``categorical``, ``numeric``, ``split_by``, ``min_count``, ``max_vocab``...).
        out: the folder of the shards.
        row_group_rows: rows per Parquet row group (the unit a reader reads at once).
        shard_rows: at most this many rows per shard file.
        force: rewrite even when ``out`` holds shards of the same inputs and options
            (never when ``out`` holds an input file).
        log: where progress lines go.

    Returns:
        The manifest (also written to ``out/manifest.json``).

    Raises:
        FileNotFoundError: a path matches no file.
        DataError: a file lacks a named column (the message lists the file's columns),
            holds bad values or no rows, cannot be read, or a split is empty; ``out`` is
            a file, holds an input file, or holds files not written by a preparation.
        ValueError: contradicting options.

    Example:
        >>> m = prepare({"path": "clicks.parquet", "labels": ["click"], "categorical": ["item"]},
        ...             "shards/clicks")  # doctest: +SKIP
        >>> m["splits"]["train"]["rows"]  # doctest: +SKIP
        80012
    """
    if row_group_rows < 1 or shard_rows < row_group_rows:
        raise ValueError(
            f"need 1 <= row_group_rows <= shard_rows, got {row_group_rows} and {shard_rows}"
        )
    out = Path(out).expanduser()
    query = TableQuery.from_config(data)
    roles = query.roles
    if not roles.categorical and not roles.numeric:
        raise ValueError("name feature columns: data.categorical=[...] and/or data.numeric=[...]")
    check_roles_disjoint(roles.categorical, roles.numeric, roles.labels)
    named = split_files(
        data.get("path"), train=data.get("train"), val=data.get("val"), test=data.get("test")
    )
    rows_key = "train" if "train" in named else "path"
    start = time.perf_counter()
    rows_files, rows = scan_files(named[rows_key], query, key=rows_key)
    given = {s: scan_files(named[s], query, key=s) for s in ("val", "test") if s in named}
    all_files = [*rows_files, *(f for files, _ in given.values() for f in files)]
    check_out(out, all_files)
    inputs = {"rows": [_file_stamp(f) for f in rows_files]} | {
        s: [_file_stamp(f) for f in files] for s, (files, _) in given.items()
    }
    options = {k: data.get(k) for k in _CONTENT_KEYS} | {
        "split_seed": split_seed(data),
        "row_group_rows": row_group_rows,
        "shard_rows": shard_rows,
        "format": SHARD_FORMAT,
    }
    fingerprint = json.loads(json.dumps({"inputs": inputs, "options": options}, default=str))
    earlier = _read_manifest(out)
    fresh = earlier is not None and earlier.get("fingerprint") == fingerprint
    if fresh and not force and _complete(out, earlier):  # type: ignore[arg-type]
        log(f"prepare: {out} holds shards of these inputs and options; reusing them")
        return earlier  # type: ignore[return-value]

    origin = _names(rows_files)
    try:
        splits, record, fitted = _write_shards(
            data,
            out,
            query=query,
            rows=rows,
            given={s: lf for s, (_, lf) in given.items()},
            origins={"rows": origin} | {s: _names(files) for s, (files, _) in given.items()},
            row_group_rows=row_group_rows,
            shard_rows=shard_rows,
            log=log,
            start=start,
        )
    except pl.exceptions.PolarsError as exc:
        # A value polars cannot parse, a damaged file...: one line naming the file.
        raise read_failure(all_files, query, exc) from exc
    carved = [s for s in ("val", "test") if s not in given]
    save_encoding(fitted, out / ENCODING_FILE)
    head = f"{data.get('name') or 'table'} {named[rows_key]}"
    manifest = {
        "format": SHARD_FORMAT,
        "fingerprint": fingerprint,
        "row_group_rows": row_group_rows,
        "encoding": ENCODING_FILE,
        "files": {k: [s["path"] for s in v] for k, v in inputs.items()},
        "how": describe_split(data, carved, head),
        "splits": splits,
        **record,
        "prepare_time_s": time.perf_counter() - start,
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    rows_text = ", ".join(f"{s} {v['rows']:,}" for s, v in splits.items())
    log(f"prepare: {out}: {rows_text} rows in {manifest['prepare_time_s']:.1f}s")
    return manifest


def _names(files: Sequence[Path]) -> str:
    return ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent is a file, no permission...
        raise DataError(f"out={out}: cannot create the folder ({exc.strerror})") from exc


def _write_shards(
    data: Mapping[str, Any],
    out: Path,
    *,
    query: TableQuery,
    rows: pl.LazyFrame,
    given: Mapping[str, pl.LazyFrame],
    origins: Mapping[str, str],
    row_group_rows: int,
    shard_rows: int,
    log: Callable[[str], None],
    start: float,
) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """Check, split, fit, encode and write: the shards of each split, the data record, the encoding.

    ``rows``: the ``rows`` files (the train rows, and the val/test rows carved from them);
    ``given``: the rows of the splits read from their own files; ``origins``: the files
    of each (``rows``, ``val``, ``test``) for messages.
    """
    origin = origins["rows"]
    rows = check_rows(rows, query, origin=origin)
    parts = {s: check_rows(lf, query, origin=origins[s]) for s, lf in given.items()}
    carved = [s for s in ("val", "test") if s not in given]
    fracs = dict(zip(SPLITS, (float(f) for f in data.get("split", (0.8, 0.1, 0.1))), strict=True))
    code = split_column(
        rows,
        carved=carved,
        fractions=fracs,
        split_by=query.split_by,
        seed=split_seed(data),
        origin=origin,
    )
    rows = rows.with_columns(code.alias(SPLIT))
    train = rows.filter(pl.col(SPLIT) == 0)
    log(f"prepare: fitting the encoding on the train rows of {origin}")
    fitted = fit_lazy(
        train,
        query.roles,
        embed_dim=data.get("embed_dim"),
        max_embed_dim=int(data.get("max_embed_dim", 16)),
        min_count=int(data.get("min_count", 1)),
        max_vocab=data.get("max_vocab"),
        task_weights=data.get("task_weights"),
        origin=origin,
    )
    vocab = ", ".join(f"{f.name} {f.vocab_size:,}" for f in fitted.spec.categorical)
    log(f"prepare: fitted in {time.perf_counter() - start:.1f}s; vocabularies: {vocab or 'none'}")

    exprs = _encode_exprs(fitted, rows.collect_schema())
    encoded = [rows.select(*exprs, pl.col(SPLIT))] + [
        lf.select(*exprs, pl.lit(SPLITS.index(s), dtype=pl.Int32).alias(SPLIT))
        for s, lf in parts.items()
    ]
    _make_folder(out)
    clear_shards(out)  # the old shards are no longer valid
    tmp = out / WRITING
    pl.concat(encoded, how="vertical").sink_parquet(
        pl.PartitionBy(tmp, key=SPLIT, include_key=False, max_rows_per_file=shard_rows),
        row_group_size=row_group_rows,
        mkdir=True,
        engine="streaming",
    )
    splits: dict[str, Any] = {}
    for code_value, name in enumerate(SPLITS):
        written = sorted((tmp / f"{SPLIT}={code_value}").glob("*.parquet"))
        target = out / name
        target.mkdir(exist_ok=True)
        shards = []
        for i, src in enumerate(written):
            dst = target / f"part-{i:05d}.parquet"
            src.replace(dst)
            n = pl.scan_parquet(dst).select(pl.len()).collect().item()
            shards.append({"path": f"{name}/{dst.name}", "rows": n, "bytes": dst.stat().st_size})
            log(f"prepare: wrote {name}/{dst.name}: {n:,} rows")
        total = sum(s["rows"] for s in shards)
        if total == 0:
            raise DataError(
                f"{origin}: the {name} split is empty (split={list(fracs.values())}); "
                "more rows or other fractions are needed"
            )
        splits[name] = {"rows": total, "shards": shards}
    shutil.rmtree(tmp, ignore_errors=True)

    raw = {s: rows.filter(pl.col(SPLIT) == SPLITS.index(s)) for s in carved} | parts
    record = shard_record(out, splits, fitted, raw=raw, origins=origins)
    if query.split_by and carved:
        ranges = (
            rows.group_by(SPLIT)
            .agg(pl.col(query.split_by).min().alias("lo"), pl.col(query.split_by).max().alias("hi"))
            .collect(engine="streaming")
        )
        record["time_range"] = {
            SPLITS[c]: [str(lo), str(hi)] for c, lo, hi in ranges.sort(SPLIT).iter_rows()
        }
    return splits, record, fitted


def _split_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    # ``out=DIR`` (and the other options as key=value) read like the Hydra overrides around them.
    ours = {"out", "row_group_rows", "shard_rows"}
    flags, overrides = [], []
    for arg in argv:
        key = arg.split("=", 1)[0]
        if "=" in arg and key in ours:
            flags += [f"--{key.replace('_', '-')}", arg.split("=", 1)[1]]
        else:
            overrides.append(arg)
    return flags, overrides


def main(argv: Sequence[str]) -> int:
    """``mtl prepare [overrides] out=DIR``: compose the ``data`` config as ``mtl train`` does,
    then :func:`prepare` it."""
    flags, overrides = _split_args(argv)
    parser = argparse.ArgumentParser(
        prog="mtl prepare",
        description="Encode a data=table config into Parquet shards for `mtl train data=shards`.",
    )
    parser.add_argument("--out", required=True, help="folder of the shards (also out=DIR)")
    parser.add_argument("--row-group-rows", type=int, default=100_000, help="rows per row group")
    parser.add_argument("--shard-rows", type=int, default=2_000_000, help="rows per shard file")
    parser.add_argument("--force", action="store_true", help="rewrite even if up to date")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: data=table data.path=...")
    args = parser.parse_args([*flags, *overrides])
    from omegaconf import OmegaConf

    from mtl.training.config import compose_config

    cfg = compose_config("train", args.overrides)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(data, dict)
    if not str(data.get("_target_", "")).endswith("TableDataModule"):
        raise ValueError(
            f"mtl prepare reads a data=table config (data.path, data.labels, ...); got "
            f"data._target_={data.get('_target_')}"
        )
    prepare(
        data,
        args.out,
        row_group_rows=args.row_group_rows,
        shard_rows=args.shard_rows,
        force=args.force,
    )
    return 0
