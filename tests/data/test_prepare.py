"""datasets/<name>/prepare.py recipes on tiny raw inputs: their output is what the loaders read."""

from __future__ import annotations

import gzip
import importlib.util
import io
import tarfile
import zipfile
from pathlib import Path
from types import ModuleType

import polars as pl
import pytest

from mtl.data.sources import load_source
from mtl.data.sources.kuairand import PREPARED_FILE, kuairand

DATASETS = Path(__file__).resolve().parents[2] / "datasets"


def _recipe(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"prepare_{name}", DATASETS / name / "prepare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _features(entries: list[tuple[str, str, float]]) -> str:
    return "\x01".join(f"{field}\x02{fid}\x03{value}" for field, fid, value in entries)


def test_ali_ccp_raw_to_csv(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    for split, n in (("train", 40), ("test", 10)):
        common = [
            f"c{k},2,{_features([('101', f'u{k}', 1.0), ('109_14', f'h{k}', 0.5 * k)])}"
            for k in range(4)
        ]
        (raw / f"common_features_{split}.csv").write_text("\n".join(common) + "\n")
        rows = []
        for i in range(n):
            feats = _features(
                [("205", f"item{i % 5}", 1.0), ("508", f"x{i}", float(i)), ("301", "s1", 1.0)]
            )
            rows.append(f"{i},{int(i % 3 == 0)},{int(i % 6 == 0)},c{i % 4},3,{feats}")
        (raw / f"sample_skeleton_{split}.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    _recipe("ali_ccp").main(
        [str(raw), "--out", str(out), "--val-fraction", "0.25", "--chunk-rows", "16"]
    )

    data = load_source("ali_ccp", path=out)
    assert data.val is not None and data.test is not None
    assert data.train.height + data.val.height == 40 and data.test.height == 10
    assert 0 < data.val.height < 40
    both = pl.concat([data.train, data.val])
    assert sorted(both["205"].unique().to_list()) == [f"item{k}" for k in range(5)]
    assert (
        both["click"].sum() == 14 and both["purchase"].sum() == 7
    )  # i % 3 == 0, i % 6 == 0 for i < 40
    # The common (user) features joined by request: item i came with request c{i % 4} = user u{i % 4}.
    test = data.test.sort(pl.col("D508"))
    assert test["101"].to_list() == [f"u{i % 4}" for i in range(10)]
    assert test["D109_14"].to_list() == [0.5 * (i % 4) for i in range(10)]
    assert test["D702"].to_list() == [0.0] * 10  # field absent -> 0
    assert test["121"].null_count() == 10  # absent sparse field -> null -> OOV when encoded
    assert data.roles.user_column == "101" and "D508" in data.roles.numeric


def _kuairand_dir(root: Path) -> Path:
    pl.DataFrame(
        {
            "user_id": [1, 2],
            "user_active_degree": ["high_active", "UNKNOWN"],
            "register_days": [10, 20],
        }
    ).write_csv(root / "user_features_pure.csv")
    pl.DataFrame({"video_id": [5, 6], "author_id": [50, 60], "tag": ["1", "2,3"]}).write_csv(
        root / "video_features_basic_pure.csv"
    )
    pl.DataFrame(
        {
            "user_id": [1, 2, 2, 1],
            "video_id": [5, 6, 5, 7],  # video 7 has no feature row
            "date": [20220410, 20220420, 20220502, 20220503],
            "hourmin": [100, 200, 300, 400],
            "is_click": [1, 0, 1, 0],
            "long_view": [0, 0, 1, 0],
            "is_like": [0, 0, 1, 0],
            "is_follow": [0, 0, 0, 0],
            "duration_ms": [1000, 2000, 3000, 4000],
            "tab": [1, 1, 2, 2],
        }
    ).write_csv(root / "log_standard_4_08_to_4_21_pure.csv")
    return root


def test_kuairand_prepared_file_equals_raw_join(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _kuairand_dir(tmp_path)
    from_raw = kuairand(tmp_path)
    _recipe("kuairand").main([str(tmp_path)])
    assert "without video features: 1" in capsys.readouterr().out
    assert (tmp_path / PREPARED_FILE).is_file()
    from_parquet = kuairand(tmp_path)
    assert from_parquet.train.equals(from_raw.train) and from_parquet.test.equals(from_raw.test)  # type: ignore[union-attr]
    assert from_parquet.test["author_id"].to_list() == [50, None]  # type: ignore[index]


def test_census_extracts_nested_uci_archive(census_path: Path, tmp_path: Path) -> None:
    with gzip.open(census_path, "rt") as fh:
        head = "".join(next(fh) for _ in range(50))
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:gz") as tar:
        payload = gzip.compress(head.encode())
        info = tarfile.TarInfo("census-income.test.gz")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    archive = tmp_path / "census+income+kdd.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("census.tar.gz", tar_bytes.getvalue())
    _recipe("census_income").main([str(archive), "--out", str(tmp_path / "out")])
    assert load_source("census_income", path=tmp_path / "out").train.height == 50


def test_aliexpress_unzip_and_validate(aliexpress_dir: Path, tmp_path: Path) -> None:
    archive = tmp_path / "AliExpress_NL.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("train.csv", "test.csv"):
            zf.write(aliexpress_dir / name, f"AliExpress_NL/{name}")
    recipe = _recipe("aliexpress")
    target = recipe.unzip(archive, tmp_path / "out")
    report = recipe.validate(target)
    assert report["train"]["rows"] == 100 and report["train"]["conversions_without_click"] == 0
    assert report["test"]["click_rate"] == pytest.approx(
        pl.read_csv(aliexpress_dir / "test.csv")["click"].mean()  # type: ignore[arg-type]
    )
