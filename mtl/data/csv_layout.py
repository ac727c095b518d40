"""A CSV file's rows as its text has them, for the error paths that must name a line.

Polars reads a CSV in parallel chunks and reports a row with more fields than the
header without its line, and reads a header naming a column twice by renaming the
repeat. The standard library's ``csv`` reader walks the file's text instead, so
these functions can say which line is at fault; they run on error paths only.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["RAGGED_ROW_ERROR", "csv_rows", "ragged_row"]

RAGGED_ROW_ERROR = "more fields than defined"
"""The start of polars' message for a row with more fields than the header (no line given)."""


@contextmanager
def csv_rows(path: Path, separator: str, quote_char: str | None = '"') -> Iterator[Any]:
    """``csv.reader`` over the text of ``path`` (gzip read through), with the file's separator.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "d.csv"
        >>> _ = path.write_text('a,b\\n1,"x,y"\\n')
        >>> with csv_rows(path, ",") as rows:
        ...     list(rows)
        [['a', 'b'], ['1', 'x,y']]
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    quoting = csv.QUOTE_MINIMAL if quote_char else csv.QUOTE_NONE
    with opener(path, "rt", encoding="utf-8-sig", errors="replace", newline="") as handle:
        yield csv.reader(handle, delimiter=separator, quotechar=quote_char, quoting=quoting)


def ragged_row(path: Path, separator: str = ",", quote_char: str | None = '"') -> str | None:
    """Where CSV file ``path`` first has a row with more fields than its header (lines count
    from 1, the header), or None. For error paths: it reads the file up to that row.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "d.csv"
        >>> _ = path.write_text('a,b\\n1,"x,y"\\n2,3,4\\n')
        >>> ragged_row(path)
        'line 3 has 3 fields but the header (line 1) has 2; quote values that hold the separator'
    """
    with csv_rows(path, separator, quote_char) as rows:
        width = len(next(rows, []))
        start = rows.line_num + 1  # a quoted value may span lines: a row starts after the last
        for row in rows:
            if len(row) > width:
                return (
                    f"line {start} has {len(row)} fields but the header (line 1) has {width}; "
                    "quote values that hold the separator"
                )
            start = rows.line_num + 1
    return None
