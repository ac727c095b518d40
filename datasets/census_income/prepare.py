"""Extract and validate UCI Census-Income (KDD) for ``data=census_income``.

Usage::

    python datasets/census_income/prepare.py census+income+kdd.zip --out data/census_income
    python datasets/census_income/prepare.py data/census_income        # validate only

The UCI download is a zip that contains ``census.tar.gz``, which holds
``census-income.data.gz`` and ``census-income.test.gz``; both are extracted into
``--out`` as they are (the loader reads gzip directly). Then every census file in
the target is loaded with :func:`mtl.data.sources.census.census_income` and its
row count and label rates are printed, so a truncated or wrong file fails here
with the loader's error message rather than at training time.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import zipfile
from pathlib import Path

from mtl.data.sources.census import TEST_FILE, TRAIN_FILE, census_income

WANTED = (TRAIN_FILE, TEST_FILE, "census-income.names")


def _extract_tar(data: bytes, out: Path) -> list[Path]:
    written = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if member.isfile() and name in WANTED:
                target = out / name
                target.write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
                written.append(target)
    return written


def extract(archive: Path, out: Path) -> list[Path]:
    """Extract the census files from the UCI zip (or a tar archive) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        written = []
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                base = Path(name).name
                if base in WANTED:
                    (out / base).write_bytes(zf.read(name))
                    written.append(out / base)
                elif base.endswith((".tar.gz", ".tgz", ".tar")):
                    written += _extract_tar(zf.read(name), out)
        return written
    return _extract_tar(archive.read_bytes(), out)


def validate(path: Path) -> None:
    """Load every census file under ``path`` and print its size and label rates."""
    data = census_income(path)
    for split, frame in (("train", data.train), ("test", data.test)):
        if frame is None:
            continue
        rates = {t: round(float(frame[t].mean()), 4) for t in data.roles.labels}  # type: ignore[arg-type]
        print(f"{split}: {frame.height} rows, label rates {rates}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "source", type=Path, help="UCI archive (.zip / .tar.gz), a census file, or a directory"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where to extract an archive (default: beside it)"
    )
    args = parser.parse_args(argv)
    source: Path = args.source
    is_archive = source.is_file() and (zipfile.is_zipfile(source) or tarfile.is_tarfile(source))
    if is_archive:
        out = args.out or source.parent
        written = extract(source, out)
        if not written:
            raise SystemExit(f"error: no {' / '.join(WANTED)} inside {source}")
        print("extracted:", ", ".join(str(p) for p in written))
        source = out
    validate(source)


if __name__ == "__main__":
    main()
