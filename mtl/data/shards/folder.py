"""The prepared folder: its layout, the checks of its manifest, and what ``mtl prepare`` may delete.

``mtl prepare ... out=OUT`` writes ``OUT/manifest.json``, ``OUT/encoding.json`` and
``OUT/{train,val,test}/part-NNNNN.parquet`` (through ``OUT/.writing`` while it runs).
Those are the only files it ever deletes: it refuses an ``OUT`` that holds one of its
input files, whatever the options, and an ``OUT`` that holds anything else unless an
earlier preparation's ``manifest.json`` marks it as a prepared folder (:func:`check_out`).
Readers trust a manifest only once :func:`manifest_problem` finds every shard it lists
with its recorded size and row count.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any

import polars as pl

from mtl.data.validation import DataError

__all__ = [
    "ENCODING_FILE",
    "MANIFEST_FILE",
    "SHARD_FORMAT",
    "SPLITS",
    "WRITING",
    "check_out",
    "clear_shards",
    "column_names",
    "manifest_problem",
    "read_manifest",
]

SHARD_FORMAT = 1
MANIFEST_FILE = "manifest.json"
ENCODING_FILE = "encoding.json"
WRITING = ".writing"
"""The folder polars' sink writes into before the shards move to their split folders."""
SPLITS = ("train", "val", "test")
SHARD_PATTERN = "part-*.parquet"
_OWN_FILES = (MANIFEST_FILE, ENCODING_FILE, ENCODING_FILE + ".tmp", WRITING)
_REQUIRED = ("format", "row_group_rows", "files", "how", "splits")


def column_names(kind: str, name: str) -> str:
    """The shard column of a feature or label: ``cat.<name>``, ``num.<name>``, ``label.<name>``.

    Example:
        >>> column_names("cat", "item_id")
        'cat.item_id'
    """
    return f"{kind}.{name}"


def _rewrite(root: Path) -> str:
    return f"re-run `mtl prepare ... out={root} --force` to write the folder again"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shard_problem(root: Path, split: str, shard: Any) -> tuple[str | None, int]:
    """What is wrong with one shard entry of ``split`` (None if nothing), and its rows."""
    if not isinstance(shard, Mapping) or not all(k in shard for k in ("path", "rows", "bytes")):
        return f"a {split} shard entry lacks 'path', 'rows' or 'bytes': {shard}", 0
    path, rows, size = shard["path"], shard["rows"], shard["bytes"]
    # Only our own file names: an edited path must not point the reader elsewhere.
    pure = PurePosixPath(str(path))
    if pure.parent != PurePosixPath(split) or not fnmatch(pure.name, SHARD_PATTERN):
        return f"{split} shard path {path!r} is not {split}/{SHARD_PATTERN}", 0
    if not (_is_int(rows) and _is_int(size) and rows >= 0):
        return f"shard {path}: 'rows' and 'bytes' must be integers, got {rows!r}, {size!r}", 0
    file = root / pure
    if not file.is_file():
        return f"shard {path} is missing", 0
    if file.stat().st_size != size:
        return f"shard {path} has {file.stat().st_size} bytes, the manifest says {size}", 0
    try:
        found = pl.scan_parquet(file).select(pl.len()).collect().item()
    except pl.exceptions.PolarsError as exc:
        return f"shard {path} cannot be read ({str(exc).strip().splitlines()[0]})", 0
    if found != rows:
        return f"shard {path} holds {found} rows, the manifest says {rows}", 0
    return None, rows


def manifest_problem(root: str | os.PathLike[str], manifest: Any) -> str | None:
    """What makes ``manifest`` (read from ``root/manifest.json``) unusable, or None.

    Checked: the format version, the keys readers use, and for every shard listed a
    file at its recorded path with its recorded byte size and row count (Parquet
    metadata only), the rows of each split summing to the split's count, and the
    encoding file.

    Example:
        >>> manifest_problem(".", {"format": 1})
        "missing key(s) ['row_group_rows', 'files', 'how', 'splits']"
    """
    root = Path(root)
    if not isinstance(manifest, Mapping):
        return "not a JSON object"
    if manifest.get("format") != SHARD_FORMAT:
        return f"shard format {manifest.get('format')}, expected {SHARD_FORMAT}"
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        return f"missing key(s) {missing}"
    if not _is_int(manifest["row_group_rows"]) or manifest["row_group_rows"] < 1:
        return f"row_group_rows must be a positive integer, got {manifest['row_group_rows']!r}"
    splits = manifest["splits"]
    if not isinstance(splits, Mapping) or any(s not in splits for s in SPLITS):
        return f"'splits' must hold {list(SPLITS)}"
    for name in SPLITS:
        split = splits[name]
        if not isinstance(split, Mapping) or not isinstance(split.get("shards"), list):
            return f"split {name!r} lacks its list of 'shards'"
        total = 0
        for shard in split["shards"]:
            problem, rows = _shard_problem(root, name, shard)
            if problem is not None:
                return problem
            total += rows
        if split.get("rows") != total:
            return f"split {name!r} has {split.get('rows')!r} rows, its shards hold {total}"
    encoding = root / str(manifest.get("encoding", ENCODING_FILE))
    if not encoding.is_file():
        return f"the encoding file {encoding.name} is missing"
    return None


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a prepared folder, checked (:func:`manifest_problem`).

    Raises:
        FileNotFoundError: the folder does not exist, or holds no ``manifest.json``
            (not prepared, or a preparation that did not finish).
        DataError: the manifest is not valid JSON, is of another format version, lacks
            keys, or does not match the shards on disk (one line naming the file).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.path: shard folder not found: {root}")
    file = root / MANIFEST_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"data.path: {root} is not a prepared shard folder (no {MANIFEST_FILE}); "
            f"write one with `mtl prepare data=table data.path=... out={root}`"
        )
    try:
        manifest = json.loads(file.read_text())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise DataError(f"{file} is not valid JSON ({exc}); {_rewrite(root)}") from exc
    problem = manifest_problem(root, manifest)
    if problem is not None:
        raise DataError(f"{file}: {problem}; {_rewrite(root)}")
    return manifest


def _json_dict(file: Path) -> dict[str, Any] | None:
    """The JSON object in ``file``, or None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _is_our_manifest(file: Path) -> bool:
    """Whether ``file`` is a manifest ``mtl prepare`` wrote (complete or not): a JSON object
    of this shard format. A ``manifest.json`` of anything else is a user's file."""
    manifest = _json_dict(file)
    return manifest is not None and manifest.get("format") == SHARD_FORMAT


def _is_our_encoding(file: Path) -> bool:
    encoding = _json_dict(file)
    return encoding is not None and {"spec", "vocabularies"} <= encoding.keys()


def _foreign_in_writing(out: Path) -> str | None:
    """The first entry of ``out/.writing`` that is not a partition file of an interrupted
    preparation (``<split column>=<code>/*.parquet``), or None."""
    writing = out / WRITING
    if not writing.exists():
        return None
    if writing.is_symlink() or not writing.is_dir():
        return WRITING
    for part in sorted(writing.iterdir()):
        partition = part.name.rpartition("=")[2].isdigit()
        if part.is_symlink() or not part.is_dir() or not partition:
            return str(part.relative_to(out))
        for file in sorted(part.iterdir()):
            if file.is_symlink() or not file.is_file() or file.suffix != ".parquet":
                return str(file.relative_to(out))
    return None


def _foreign(out: Path) -> str | None:
    """The first entry of ``out`` that ``mtl prepare`` did not write, or None."""
    for entry in sorted(out.iterdir()):
        if entry.is_symlink():
            return entry.name
        if entry.name == MANIFEST_FILE and _is_our_manifest(entry):
            continue
        if entry.name == ENCODING_FILE and _is_our_encoding(entry):
            continue
        if entry.name in (ENCODING_FILE + ".tmp", WRITING):
            continue  # a half-written encoding; .writing is looked into apart
        if entry.name in SPLITS and entry.is_dir():
            for file in sorted(entry.iterdir()):
                if file.is_symlink() or not file.is_file() or not fnmatch(file.name, SHARD_PATTERN):
                    return str(file.relative_to(out))
            continue
        return entry.name
    return _foreign_in_writing(out)


def check_out(out: Path, inputs: Iterable[Path]) -> None:
    """Refuse an ``out=`` folder that writing the shards would damage.

    ``mtl prepare`` deletes and replaces its own files in ``out`` (:func:`clear_shards`):
    a folder is taken for an earlier preparation's only when its ``manifest.json`` is
    one; any other folder must hold nothing but what a preparation writes.

    Args:
        out: the folder of the shards (need not exist).
        inputs: every table file the preparation reads.

    Raises:
        DataError: ``out`` is a file; an input file lies under ``out`` (no option
            overrides this); a split folder or ``.writing`` is a link or holds other
            files; or ``out`` holds files other than a preparation's and no manifest of one.
    """
    if out.exists() and not out.is_dir():
        raise DataError(f"out={out} is a file, not a folder; name a new folder for the shards")
    # Found now, not after the long passes over the inputs: a parent that is a file.
    above = next((p for p in out.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise DataError(f"out={out}: {above} is a file, not a folder")
    root = out.resolve()
    for file in inputs:
        if file.resolve().is_relative_to(root):
            raise DataError(
                f"out={out} holds the input file {file}; mtl prepare writes and deletes shard "
                "files there, so name a folder outside the inputs"
            )
    if not out.is_dir():
        return
    # Written through, these would put shards (and deletions) somewhere else.
    links = [n for n in (*SPLITS, WRITING) if (out / n).is_symlink()]
    if links:
        raise DataError(
            f"out={out}: {', '.join(links)} is a link; mtl prepare writes and deletes shard "
            "files there, so name a new or empty folder"
        )
    prepared = _is_our_manifest(out / MANIFEST_FILE)
    foreign = _foreign_in_writing(out) if prepared else _foreign(out)
    if foreign is not None:
        raise DataError(
            f"out={out} is not empty and is not a folder written by mtl prepare (it holds "
            f"{foreign}); name a new or empty folder for the shards"
        )


def clear_shards(out: Path) -> None:
    """Delete what an earlier preparation wrote in ``out``, and nothing else.

    The manifest, the encoding, the ``.writing`` folder and the ``part-*.parquet`` files
    of the split folders (the names every manifest lists); other files stay.
    """
    shutil.rmtree(out / WRITING, ignore_errors=True)
    # The manifest first: a folder without one is never read as prepared.
    for name in (MANIFEST_FILE, ENCODING_FILE, ENCODING_FILE + ".tmp"):
        (out / name).unlink(missing_ok=True)
    for split in SPLITS:
        folder = out / split
        if folder.is_dir() and not folder.is_symlink():
            for file in folder.glob(SHARD_PATTERN):
                if file.is_file() and not file.is_symlink():
                    file.unlink()
