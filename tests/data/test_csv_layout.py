"""A CSV whose layout is wrong (a row longer than its header, a header naming a column twice)
is refused in one line naming the file and where, alike by ``data=table`` and ``mtl prepare``.

The files are written here as text, row by row, so the line of the bad row is known
from how the file was built, not from any reader.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import polars as pl
import pytest

from mtl.cli import main
from mtl.data.csv_layout import ragged_row
from mtl.data.shards.prepare import prepare
from mtl.data.sources.table import table
from mtl.data.validation import DataError

ROLES = {"labels": ["click"], "categorical": ["user_id"], "numeric": ["price"]}
HEADER = ["click", "user_id", "price"]


def _rows(n: int) -> list[list[str]]:
    return [[str(i % 2), f"u{i % 50}", f"{i}.5"] for i in range(n)]


def _write(path: Path, lines: list[str]) -> Path:
    text = "\n".join(lines) + "\n"
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _ragged_file(path: Path, n: int, bad: int, sep: str = ",") -> tuple[Path, int]:
    """``n`` rows with one extra field in row ``bad`` (0-based); its line, the header being 1."""
    rows = _rows(n)
    rows[bad].append("9")
    lines = [sep.join(HEADER), *(sep.join(r) for r in rows)]
    return _write(path, lines), bad + 2


def _errors(path: Path, tmp_path: Path, **extra: object) -> tuple[str, str]:
    """The messages of the in-memory table source and of ``mtl prepare`` for ``path``."""
    with pytest.raises(DataError) as in_memory:
        table(path, **ROLES, **extra)  # type: ignore[arg-type]
    with pytest.raises(DataError) as streamed:
        prepare({**ROLES, **extra, "path": str(path)}, tmp_path / "shards", log=lambda _: None)
    return str(in_memory.value), str(streamed.value)


@pytest.mark.parametrize(
    ("name", "n", "bad"),
    [
        ("near_top.csv", 5, 2),  # inside the first rows polars reads for the header
        ("deep.csv", 30_000, 24_321),  # far below them: found while streaming all the rows
        ("deep.csv.gz", 30_000, 20_000),
    ],
)
def test_a_ragged_row_is_named_by_file_and_line_on_both_paths(
    tmp_path: Path, name: str, n: int, bad: int
) -> None:
    path, line = _ragged_file(tmp_path / name, n, bad)
    expected = (
        f"table file {path} cannot be read: line {line} has 4 fields but the header (line 1) "
        "has 3; quote values that hold the separator"
    )
    assert _errors(path, tmp_path) == (expected, expected)


@pytest.mark.parametrize(("n", "bad"), [(5, 3), (30_000, 17_000)])
def test_a_ragged_row_of_a_tsv_file_is_found_with_its_separator(
    tmp_path: Path, n: int, bad: int
) -> None:
    path, line = _ragged_file(tmp_path / "rows.tsv", n, bad, sep="\t")
    in_memory, streamed = _errors(path, tmp_path)
    assert in_memory == streamed
    assert f"line {line} has 4 fields" in in_memory


def test_a_quoted_value_over_two_lines_counts_both_lines(tmp_path: Path) -> None:
    lines = ["click,user_id,price", '1,"u1,\nstill u1",1.5', "0,u2,2.5", "1,u3,3.5,9", "0,u4,4.5"]
    path = _write(tmp_path / "rows.csv", lines)
    # The header is line 1, the quoted value lines 2-3, "0,u2,2.5" line 4: the bad row is line 5.
    assert path.read_text().splitlines()[4] == "1,u3,3.5,9"
    assert ragged_row(path) == (
        "line 5 has 4 fields but the header (line 1) has 3; quote values that hold the separator"
    )
    # A separator inside quotes is no extra field: without the bad row there is none.
    assert ragged_row(_write(tmp_path / "ok.csv", lines[:3])) is None


@pytest.mark.parametrize("deep", [False, True])
def test_a_header_naming_a_column_twice_is_refused_on_both_paths(
    tmp_path: Path, deep: bool
) -> None:
    n = 30_000 if deep else 5
    header = "click,price,user_id,price,note,note"
    rows = [f"{r[0]},{r[2]},{r[1]},7,a,b" for r in _rows(n)]
    path = _write(tmp_path / "rows.csv", [header, *rows])
    # What polars did before: the second 'price' read apart, the first used silently.
    assert "price_duplicated_0" in pl.read_csv(path, n_rows=1).columns
    # 'note' is repeated too, but no role reads it: only the column the run uses is named.
    expected = f"{path}: the header names ['price'] more than once; give each column its own name"
    assert _errors(path, tmp_path) == (expected, expected)


def test_a_repeated_column_the_run_does_not_read_is_no_error(tmp_path: Path) -> None:
    lines = ["click,user_id,price,note,note", *(",".join([*r, "a", "b"]) for r in _rows(5))]
    data = table(_write(tmp_path / "rows.csv", lines), **ROLES)  # type: ignore[arg-type]
    assert data.train["price"].to_list() == [float(f"{i}.5") for i in range(5)]


def test_a_column_named_like_polars_renaming_alone_is_not_a_duplicate(tmp_path: Path) -> None:
    lines = ["click,user_id,price,price_duplicated_0", *(",".join([*r, "1"]) for r in _rows(5))]
    data = table(_write(tmp_path / "rows.csv", lines), **ROLES)  # type: ignore[arg-type]
    assert data.train["price"].to_list() == [float(f"{i}.5") for i in range(5)]


def test_the_cli_prints_the_ragged_line_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, line = _ragged_file(tmp_path / "rows.csv", 30_000, 12_345)
    args = [
        "data=table",
        f"data.path={path}",
        "data.labels=[click]",
        "data.categorical=[user_id]",
        "data.numeric=[price]",
    ]
    assert main(["prepare", *args, f"out={tmp_path / 'shards'}"]) == 2
    assert main(["train", *args, f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0] == err[1]
    assert err[0].startswith(f"error: table file {path} cannot be read: line {line} has 4 fields")
