"""Unzip and validate one AliExpress country archive for ``data=aliexpress``.

Usage::

    python datasets/aliexpress/prepare.py AliExpress_NL.zip --out data/aliexpress
    python datasets/aliexpress/prepare.py data/aliexpress/AliExpress_NL      # validate only

The Tianchi CSVs are already in the layout the loader reads (``train.csv`` and
``test.csv`` with ``search_id``, ``categorical_1..16``, ``numerical_1..63``, ``click``,
``conversion``), so preparation is unzipping plus validation: every file is loaded
with :func:`mtl.data.sources.aliexpress.aliexpress`, which raises on missing columns,
non-0/1 labels and null numeric values, and rows with a conversion but no click
are counted (there should be none).
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

import polars as pl

from mtl.data.sources.aliexpress import aliexpress


def unzip(archive: Path, out: Path) -> Path:
    """Extract ``train.csv``/``test.csv`` of ``archive`` into ``out/<archive stem>/``."""
    target = out / archive.stem
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            if Path(name).name in ("train.csv", "test.csv"):
                with zf.open(name) as src, (target / Path(name).name).open("wb") as dst:
                    while chunk := src.read(1 << 24):  # stream: the CSVs are several GB
                        dst.write(chunk)
    if not (target / "train.csv").exists():
        raise SystemExit(f"error: no train.csv inside {archive}")
    return target


def validate(path: Path) -> dict[str, dict[str, float]]:
    """Load the directory with the loader and return per-split row counts and label rates."""
    data = aliexpress(path)
    report = {}
    for split, frame in (("train", data.train), ("test", data.test)):
        if frame is None:
            continue
        orphan = frame.filter((pl.col("conversion") == 1) & (pl.col("click") == 0)).height
        report[split] = {
            "rows": frame.height,
            "click_rate": float(frame["click"].mean()),  # type: ignore[arg-type]
            "conversion_rate": float(frame["conversion"].mean()),  # type: ignore[arg-type]
            "conversions_without_click": orphan,
        }
        print(f"{split}: {report[split]}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "source", type=Path, help="AliExpress_<CC>.zip or an unzipped country directory"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where to unzip (default: beside the archive)"
    )
    args = parser.parse_args(argv)
    path: Path = args.source
    if path.is_file() and zipfile.is_zipfile(path):
        path = unzip(path, args.out or path.parent)
        print(f"unzipped into {path}")
    validate(path)


if __name__ == "__main__":
    main()
