"""Numeric features with ``inf``, ``-inf`` or values that overflow once standardised are refused.

A NaN was refused at load time; an infinite value or ``1e308`` went through and
turned the weights to NaN a few steps later. Each test names the file (or
split), the column and the number of rows in the expected message.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mtl.data.datamodule import RecDataModule
from mtl.data.features import ColumnRoles, fit_features
from mtl.data.sources.aliexpress import aliexpress
from mtl.data.sources.base import validate_frame
from mtl.data.tabular import encode


def _ali_dir_with(aliexpress_dir: Path, root: Path, values: list[str]) -> Path:
    # The shipped sample with ``values`` written into the first rows of numerical_3.
    root.mkdir()
    for name in ("train.csv", "test.csv"):
        lines = (aliexpress_dir / name).read_text().splitlines()
        header = lines[0].split(",")
        col = header.index("numerical_3")
        for i, value in enumerate(values if name == "train.csv" else []):
            cells = lines[1 + i].split(",")
            cells[col] = value
            lines[1 + i] = ",".join(cells)
        (root / name).write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize(
    ("values", "count"),
    [(["inf"], 1), (["-inf", "-inf"], 2), (["1e308"], 1), (["1e39", "inf", "-1e300"], 3)],
)
def test_aliexpress_file_with_infinite_or_huge_values_is_refused(
    values: list[str], count: int, aliexpress_dir: Path, tmp_path: Path
) -> None:
    root = _ali_dir_with(aliexpress_dir, tmp_path / "ali", values)
    rows = len((root / "train.csv").read_text().splitlines()) - 1
    with pytest.raises(ValueError) as info:
        aliexpress(root)
    message = str(info.value)
    assert message.startswith(f"{root / 'train.csv'}: numeric feature 'numerical_3' has {count} ")
    assert f"infinite or out-of-range values of {rows} rows" in message


def test_the_cli_refuses_an_inf_with_exit_2(
    aliexpress_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mtl.cli import main

    root = _ali_dir_with(aliexpress_dir, tmp_path / "ali", ["inf"])
    out = tmp_path / "run"
    rc = main(["train", "data=aliexpress", f"data.path={root}", f"output_dir={out}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "'numerical_3' has 1 infinite" in err
    assert not (out / "metrics.json").exists()


def test_validate_frame_keeps_finite_values_and_fills_nan_only() -> None:
    roles = ColumnRoles(categorical=[], numeric=["x"], labels={"y": "binary"})
    df = pl.DataFrame({"x": [1.0, -3.0e38, math.nan], "y": [0, 1, 0]})
    assert validate_frame(df, roles, origin="f.csv", fill_numeric_nulls=0.0)["x"].to_list() == [
        1.0,
        -3.0e38,
        0.0,
    ]
    with pytest.raises(
        ValueError, match=r"f\.csv: numeric feature 'x' has 1 infinite .* of 2 rows"
    ):
        validate_frame(pl.DataFrame({"x": [1.0, math.inf], "y": [0, 1]}), roles, origin="f.csv")


def test_fit_features_refuses_an_infinite_train_value() -> None:
    train = pl.DataFrame({"x": [1.0, 2.0, -math.inf], "y": [0, 1, 0]})
    with pytest.raises(ValueError, match=r"train split: numeric feature 'x' has 1 infinite"):
        fit_features(train, labels={"y": "binary"}, categorical=[], numeric=["x"])


def test_encode_refuses_a_value_that_overflows_once_standardised() -> None:
    # In float32 range raw, but the train std is 1e-3: 3e38 / 1e-3 is beyond float32.
    train = pl.DataFrame({"x": [0.0, 0.001, 0.002, 0.003], "y": [0, 1, 0, 1]})
    fitted = fit_features(train, labels={"y": "binary"}, categorical=[], numeric=["x"])
    ok = encode(pl.DataFrame({"x": [0.5], "y": [1]}), fitted, origin="val split")
    std = math.sqrt((2 * 0.0015**2 + 2 * 0.0005**2) / 4)  # ddof 0 about the mean 0.0015
    assert float(ok.num_BF[0, 0]) == pytest.approx((0.5 - 0.0015) / std, rel=1e-6)
    test = pl.DataFrame({"x": [0.001, 3.0e38, -3.0e38], "y": [0, 1, 0]})
    with pytest.raises(
        ValueError,
        match=r"test split of demo: numeric feature 'x' has 2 of 3 rows beyond the float32 range "
        r"once standardised with the train split's mean 0\.0015 and std 0\.00111803",
    ):
        encode(test, fitted, origin="test split of demo")


def test_datamodule_on_the_sample_still_loads(aliexpress_dir: Path) -> None:
    dm = RecDataModule(source="aliexpress", path=str(aliexpress_dir), batch_size=32)
    assert bool(dm.tensors("train").num_BF.isfinite().all())
    # numerical_1 standardised with the train rows' mean and std (ddof 0), val included
    raw = pl.read_csv(aliexpress_dir / "train.csv")["numerical_1"].to_numpy().astype(np.float64)
    train = raw[dm.row_index["train"]]
    assert dm.spec.numeric[0].name == "numerical_1" and dm.origin["val"] == "train"
    for split in ("train", "val"):
        want = (raw[dm.row_index[split]] - train.mean()) / train.std()
        got = dm.tensors(split).num_BF[:, 0].double().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
