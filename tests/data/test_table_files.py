"""Which files a table source reads: folders, globs and suffixes (mtl.data.sources.table_files)."""

from __future__ import annotations

import gzip
import importlib
from pathlib import Path

import pytest

from mtl.data.sources.table_files import TABLE_SUFFIXES, split_files, table_files
from mtl.data.validation import DataError


def _touch(path: Path, text: str = "a\n1\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def test_a_folder_names_its_table_files_in_sorted_order_and_skips_the_rest(
    tmp_path: Path,
) -> None:
    names = ["b.parquet", "a.csv.gz", "c.JSONL", "d.tsv"]
    for name in names:
        _touch(tmp_path / name)
    _touch(tmp_path / "_SUCCESS", "")
    _touch(tmp_path / "notes.md")
    _touch(tmp_path / "nested" / "e.csv")  # not recursive
    assert [p.name for p in table_files(tmp_path)] == sorted(names)


def test_a_glob_recurses_and_refuses_a_matched_file_of_another_kind(tmp_path: Path) -> None:
    _touch(tmp_path / "x" / "part-0.csv")
    _touch(tmp_path / "y" / "z" / "part-1.csv")
    found = table_files(tmp_path / "**" / "part-*.csv")
    assert found == [tmp_path / "x" / "part-0.csv", tmp_path / "y" / "z" / "part-1.csv"]
    _touch(tmp_path / "x" / "part-2.xlsx")
    with pytest.raises(DataError, match=r"data.test: .*part-2\.xlsx is not a table file"):
        table_files(tmp_path / "x" / "part-*", key="test")


def test_nothing_found_names_the_config_key(tmp_path: Path) -> None:
    _touch(tmp_path / "readme.txt.bak")
    with pytest.raises(FileNotFoundError, match=r"data.val: folder .* holds no table file"):
        table_files(tmp_path, key="val")
    with pytest.raises(FileNotFoundError, match=r"data.path: file or folder not found"):
        table_files(tmp_path / "missing.csv")


def test_the_table_source_module_still_exports_the_file_finding_names() -> None:
    # The package's ``table`` attribute is the source function, so import the module by name.
    table_module = importlib.import_module("mtl.data.sources.table")
    assert table_module.table_files is table_files
    assert table_module.split_files is split_files
    assert table_module.TABLE_SUFFIXES is TABLE_SUFFIXES
