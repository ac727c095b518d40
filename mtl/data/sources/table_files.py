"""Which files a table source reads: the table suffixes, the files a path names, the split files.

A config names its rows with ``data.path`` (a file, a folder or a glob) or
``data.train``, and may name ``data.val`` / ``data.test`` files; :func:`split_files`
turns those keys into paths and :func:`table_files` each path into the files it names.
The table source (:func:`mtl.data.sources.table.table`), the table data module and
the shard writer all find their files here, so they read the same rows.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from mtl.data.sources.base import resolve_path
from mtl.data.validation import DataError

__all__ = ["TABLE_SUFFIXES", "split_files", "table_files"]

# Suffix -> format; ".gz" CSV/TSV files are read through polars' gzip support.
TABLE_SUFFIXES: dict[str, str] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "csv",
    ".csv.gz": "csv",
    ".tsv.gz": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
}


def _format(path: Path) -> str | None:
    name = path.name.lower()
    return next((fmt for suf, fmt in TABLE_SUFFIXES.items() if name.endswith(suf)), None)


def table_files(path: str | os.PathLike[str], *, key: str = "path") -> list[Path]:
    """The table files ``path`` names: a file, a folder's table files, or a glob's matches.

    Args:
        path: a file, a folder (its files with a :data:`TABLE_SUFFIXES` suffix, not
            recursive) or a glob pattern (``data/part-*.parquet``, ``logs/**/*.csv``).
        key: the config key, for error messages (``"path"``, ``"test"``).

    Returns:
        The files in sorted order (the order of the rows in the source frame).

    Raises:
        FileNotFoundError: nothing is found; the message names ``data.<key>``.
        DataError: a file named explicitly or matched has an unsupported suffix.

    Example:
        >>> table_files("logs/*.parquet")  # doctest: +SKIP
        [PosixPath('logs/part-0.parquet'), PosixPath('logs/part-1.parquet')]
    """
    root = resolve_path(path)
    text = str(root)
    suffixes = sorted(set(TABLE_SUFFIXES))
    if any(ch in text for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"data.{key}: no file matches {text}")
    elif root.is_dir():
        files = sorted(p for p in root.iterdir() if p.is_file() and _format(p) is not None)
        if not files:
            raise FileNotFoundError(
                f"data.{key}: folder {root} holds no table file (suffixes {suffixes})"
            )
    elif root.is_file():
        files = [root]
    else:
        raise FileNotFoundError(f"data.{key}: file or folder not found: {root}")
    unknown = [p for p in files if _format(p) is None]
    if unknown:
        raise DataError(
            f"data.{key}: {unknown[0]} is not a table file; expected one of the suffixes {suffixes}"
        )
    return files


def split_files(
    path: str | os.PathLike[str] | None = None,
    *,
    train: str | os.PathLike[str] | None = None,
    val: str | os.PathLike[str] | None = None,
    test: str | os.PathLike[str] | None = None,
) -> dict[str, str]:
    """What to read for the rows and for given val/test splits, by config key.

    The rows are ``path`` or ``train``. With both, ``path`` is a dataset folder and
    ``train``, ``val``, ``test`` name files (or globs) inside it: a preset such as
    ``conf/data/aliexpress.yaml`` fixes the file names and ``data.path=DIR`` picks the folder.

    Returns:
        ``{"path" or "train": rows, "val": ..., "test": ...}`` (only the given ones).

    Raises:
        ValueError: neither ``path`` nor ``train`` is given.
        FileNotFoundError: ``path`` is not a folder while ``train`` names a file in it.

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> split_files(root, train="train.csv", test="t.csv") == {
        ...     "train": f"{root}/train.csv", "test": f"{root}/t.csv"}
        True
        >>> split_files("rows.csv", test="/t.csv")
        {'path': 'rows.csv', 'test': '/t.csv'}
    """
    if path is None and train is None:
        raise ValueError("data=table needs data.path=<file, folder or glob> (or data.train=...)")
    named = {"val": val, "test": test}
    if path is not None and train is not None:
        root = resolve_path(path)
        if not root.is_dir() and root.exists():
            raise FileNotFoundError(
                f"data.path: {root} is not a folder; with data.train={train} given, data.path is "
                "the folder holding the train/val/test files"
            )
        if not root.exists():
            raise FileNotFoundError(
                f"data.path: folder not found: {root} (it should hold data.train={train})"
            )
        named = {"train": train} | named
        return {k: str(root / os.fspath(v)) for k, v in named.items() if v is not None}
    rows = {"train": train} if train is not None else {"path": path}
    return {k: os.fspath(v) for k, v in (rows | named).items() if v is not None}
