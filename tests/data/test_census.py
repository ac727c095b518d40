"""Census-Income (KDD) loader against the raw shared file."""

from __future__ import annotations

import gzip
import shutil
from functools import lru_cache
from pathlib import Path

import pytest

from mtl.data.sources import SourceData, load_source
from mtl.data.sources.census import CENSUS_COLUMNS, census_income


@lru_cache(maxsize=1)
def _census(path: str) -> SourceData:
    return census_income(path)


@lru_cache(maxsize=1)
def _raw_lines(path: str) -> list[list[str]]:
    with gzip.open(path, "rt") as fh:
        return [[f.strip() for f in line.rstrip("\n").split(",")] for line in fh if line.strip()]


def test_column_names_match_the_uci_description() -> None:
    assert len(CENSUS_COLUMNS) == 42
    assert CENSUS_COLUMNS[7] == "marital stat" and CENSUS_COLUMNS[24] == "instance weight"


def test_rows_labels_and_rates_match_the_raw_file(census_path: Path) -> None:
    data = _census(str(census_path))
    raw = _raw_lines(str(census_path))
    df = data.train
    assert df.height == len(raw) == 99_762
    assert data.test is None
    for i in (0, 1, 2, 1234, 99_761):
        row = df.row(i, named=True)
        assert row["income"] == int(raw[i][41] == "50000+.")
        assert row["never_married"] == int(raw[i][7] == "Never married")
        assert row["age"] == float(raw[i][0])
        assert row["education"] == raw[i][4]  # whitespace stripped
    assert df.row(0, named=True)["citizenship"] == "Foreign born- Not a citizen of U S"
    n_rich = sum(r[41] == "50000+." for r in raw)
    n_never = sum(r[7] == "Never married" for r in raw)
    assert int(df["income"].sum()) == n_rich
    assert int(df["never_married"].sum()) == n_never
    assert n_rich / len(raw) == pytest.approx(
        0.062, abs=0.002
    )  # ~6% positives, as in the MMoE paper
    assert n_never / len(raw) == pytest.approx(0.4325, abs=0.002)


def test_roles_exclude_weight_and_label_sources(census_path: Path) -> None:
    roles = _census(str(census_path)).roles
    features = roles.categorical + roles.numeric
    assert "instance weight" not in features
    assert "marital stat" not in features and "income class" not in features
    assert len(roles.categorical) == 32 and len(roles.numeric) == 7
    assert roles.labels == {"income": "binary", "never_married": "binary"}


def test_directory_with_train_and_test_files(census_path: Path, tmp_path: Path) -> None:
    with gzip.open(census_path, "rt") as fh:
        raw_text = fh.read().splitlines(keepends=True)
    (tmp_path / "census-income.data").write_text("".join(raw_text[:300]))  # plain, not gzipped
    with gzip.open(tmp_path / "census-income.test.gz", "wt") as fh:
        fh.writelines(raw_text[300:400])
    data = load_source("census_income", path=str(tmp_path))
    assert data.train.height == 300 and data.test is not None and data.test.height == 100
    only_test = tmp_path / "only_test"
    only_test.mkdir()
    shutil.copy(tmp_path / "census-income.test.gz", only_test)
    data = census_income(only_test)
    assert data.train.height == 100 and data.test is None


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.gz"):
        census_income(tmp_path / "nope.gz")
    with pytest.raises(
        FileNotFoundError, match=r"no census-income\.data\.gz or census-income\.test\.gz"
    ):
        census_income(tmp_path)
    empty = tmp_path / "census-income.test"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        census_income(empty)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("1, 2, 3\n4, 5, 6\n")
    with pytest.raises(ValueError, match="has 3 comma-separated columns, expected 42"):
        census_income(wrong)
    bad_label = tmp_path / "bad_label.csv"
    bad_label.write_text(", ".join(["1"] * 41 + ["maybe."]) + "\n")
    with pytest.raises(ValueError, match=r"'income class' must be .* e.g. \['maybe.'\]"):
        census_income(bad_label)
