"""The prepared folder: ``mtl prepare`` never deletes what it did not write, refuses an ``out=``
it would damage, and readers refuse a manifest that does not match the shards on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from mtl.cli import main
from mtl.data.shards.datamodule import ShardsDataModule
from mtl.data.shards.prepare import ENCODING_FILE, MANIFEST_FILE, prepare
from mtl.data.validation import DataError

N = 1000


def _frame(n: int = N, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame(
        {
            "user": [f"u{u}" for u in rng.integers(0, 50, n)],
            "item": [f"i{i}" for i in rng.integers(0, 80, n)],
            "price": rng.lognormal(1.0, 0.5, n),
            "click": rng.integers(0, 2, n),
        }
    )


def _data(**paths: Any) -> dict[str, Any]:
    return {
        "labels": ["click"],
        "categorical": ["user", "item"],
        "numeric": ["price"],
        "user": "user",
        **{k: str(v) for k, v in paths.items()},
    }


def _quiet(_: str) -> None:
    pass


def _contents(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# ----------------------------------------------------------------------------- out= is safe


@pytest.mark.parametrize("force", [False, True])
def test_inputs_inside_out_are_refused_and_left_untouched(tmp_path: Path, force: bool) -> None:
    ds = tmp_path / "ds"
    (ds / "train").mkdir(parents=True)
    (ds / "test").mkdir()
    df = _frame()
    df[:800].write_csv(ds / "train" / "a.csv")
    df[800:].write_csv(ds / "test" / "a.csv")
    before = _contents(ds)
    data = _data(path=ds, train="train", test="test")
    with pytest.raises(DataError, match=r"out=.*ds holds the input file .*a\.csv"):
        prepare(data, ds, force=force, log=_quiet)
    assert _contents(ds) == before
    # out= above the inputs is refused as well, even when it was prepared before
    with pytest.raises(DataError, match="holds the input file"):
        prepare(data, tmp_path, force=force, log=_quiet)
    assert _contents(ds) == before


def test_a_non_empty_folder_not_written_by_prepare_is_refused(tmp_path: Path) -> None:
    df = _frame()
    rows = tmp_path / "rows.parquet"
    df.write_parquet(rows)
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "mine.parquet").write_bytes(b"not ours")
    with pytest.raises(DataError, match=r"out=.*out is not empty .*train/mine\.parquet"):
        prepare(_data(path=rows), out, log=_quiet)
    assert (out / "train" / "mine.parquet").read_bytes() == b"not ours"
    # an empty folder, or one holding only what a preparation writes (an interrupted one), is fine
    (out / "train" / "mine.parquet").unlink()
    (out / "train" / "part-00007.parquet").write_bytes(b"stale shard")
    prepare(_data(path=rows), out, log=_quiet)
    assert not (out / "train" / "part-00007.parquet").exists()
    assert ShardsDataModule(path=out).rows("train") + ShardsDataModule(path=out).rows("val") > 0


def test_files_named_like_a_preparations_are_not_taken_for_one(tmp_path: Path) -> None:
    rows = tmp_path / "rows.parquet"
    _frame().write_parquet(rows)
    # Someone else's manifest.json and encoding.json, and a parquet file named like a shard.
    out = tmp_path / "app"
    (out / "train").mkdir(parents=True)
    (out / MANIFEST_FILE).write_text('{"name": "my web app"}')
    (out / ENCODING_FILE).write_text('{"theme": "dark"}')
    (out / "train" / "part-1.parquet").write_bytes(b"mine")
    (out / "notes.txt").write_text("mine")
    before = _contents(out)
    for force in (False, True):
        with pytest.raises(DataError, match=r"is not a folder written by mtl prepare .*encoding"):
            prepare(_data(path=rows), out, force=force, log=_quiet)
        assert _contents(out) == before
    # A .writing folder holding anything but partition files is not an interrupted run's.
    fresh = tmp_path / "fresh"
    (fresh / ".writing").mkdir(parents=True)
    (fresh / ".writing" / "draft.txt").write_text("mine")
    with pytest.raises(DataError, match=r"holds \.writing/draft\.txt"):
        prepare(_data(path=rows), fresh, log=_quiet)
    assert (fresh / ".writing" / "draft.txt").read_text() == "mine"


def test_a_linked_split_folder_is_refused_even_in_a_prepared_folder(tmp_path: Path) -> None:
    rows = tmp_path / "rows.parquet"
    _frame().write_parquet(rows)
    out = tmp_path / "shards"
    prepare(_data(path=rows), out, log=_quiet)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "part-00000.parquet").write_bytes(b"mine")
    for f in (out / "val").iterdir():
        f.unlink()
    (out / "val").rmdir()
    (out / "val").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(DataError, match=r"val is a link"):
        prepare(_data(path=rows), out, force=True, log=_quiet)
    assert (elsewhere / "part-00000.parquet").read_bytes() == b"mine"


def test_rewriting_a_prepared_folder_deletes_only_the_files_prepare_wrote(tmp_path: Path) -> None:
    rows = tmp_path / "rows.parquet"
    _frame().write_parquet(rows)
    out = tmp_path / "shards"
    first = prepare(_data(path=rows), out, row_group_rows=100, shard_rows=200, log=_quiet)
    train_rows = first["splits"]["train"]["rows"]
    assert len(first["splits"]["train"]["shards"]) == -(-train_rows // 200) > 2
    (out / "notes.md").write_text("mine")
    (out / "train" / "notes.txt").write_text("mine too")
    second = prepare(_data(path=rows), out, row_group_rows=100, shard_rows=500, log=_quiet)
    assert (out / "notes.md").read_text() == "mine"
    assert (out / "train" / "notes.txt").read_text() == "mine too"
    # the stale shards of the first run are gone: exactly the new manifest's files remain
    for split in ("train", "val", "test"):
        listed = {s["path"] for s in second["splits"][split]["shards"]}
        assert {f"{split}/{p.name}" for p in (out / split).glob("*.parquet")} == listed
    assert len(second["splits"]["train"]["shards"]) == -(-train_rows // 500) == 2
    dm = ShardsDataModule(path=out)
    dm.setup("fit")
    assert sum(dm.rows(s) for s in ("train", "val", "test")) == N


def test_out_naming_a_file_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = tmp_path / "rows.csv"
    _frame().write_csv(rows)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(DataError, match=r"out=.*afile is a file, not a folder"):
        prepare(_data(path=rows), afile, log=_quiet)
    with pytest.raises(DataError, match=r"afile is a file, not a folder"):
        prepare(_data(path=rows), afile / "sub", log=_quiet)
    args = [
        "prepare",
        "data=table",
        f"data.path={rows}",
        "data.labels=[click]",
        "data.categorical=[user,item]",
        "data.numeric=[price]",
        f"out={afile}",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out=") and err.count("\n") == 1
    assert afile.read_text() == "x"


# ------------------------------------------------------------------------- manifest checks


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    rows = tmp_path / "rows.parquet"
    _frame().write_parquet(rows)
    out = tmp_path / "shards"
    prepare(_data(path=rows), out, row_group_rows=100, shard_rows=300, log=_quiet)
    return out


def _edit(out: Path, change: Any) -> None:
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    change(manifest)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))


def _setup(out: Path) -> ShardsDataModule:
    dm = ShardsDataModule(path=out)
    dm.setup("fit")
    return dm


def test_a_manifest_that_is_not_json_is_named(prepared: Path) -> None:
    (prepared / MANIFEST_FILE).write_text('{"format": 1, "splits": ')
    with pytest.raises(DataError, match=r"shards/manifest\.json is not valid JSON.*--force"):
        _setup(prepared)


def test_a_manifest_missing_a_key_is_refused(prepared: Path) -> None:
    _edit(prepared, lambda m: m.pop("splits"))
    with pytest.raises(DataError, match=r"manifest\.json: missing key\(s\) \['splits'\].*--force"):
        _setup(prepared)


@pytest.mark.parametrize("delta", [-50, 50])
def test_an_edited_row_count_is_refused_not_trusted(prepared: Path, delta: int) -> None:
    # fewer rows would silently drop rows from every epoch, more would read past the file
    first = json.loads((prepared / MANIFEST_FILE).read_text())["splits"]["train"]["shards"][0]
    assert first["rows"] == 300

    def edit(m: dict[str, Any]) -> None:
        m["splits"]["train"]["shards"][0]["rows"] += delta
        m["splits"]["train"]["rows"] += delta

    _edit(prepared, edit)
    with pytest.raises(
        DataError,
        match=rf"train/part-00000\.parquet holds 300 rows, the manifest says {300 + delta}",
    ):
        _setup(prepared)


def test_a_split_count_that_disagrees_with_its_shards_is_refused(prepared: Path) -> None:
    _edit(prepared, lambda m: m["splits"]["test"].update(rows=m["splits"]["test"]["rows"] + 1))
    with pytest.raises(DataError, match=r"split 'test' has \d+ rows, its shards hold \d+"):
        _setup(prepared)


def test_a_missing_or_changed_shard_is_refused(prepared: Path) -> None:
    shard = prepared / "train" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes() + b"\0")
    with pytest.raises(DataError, match=r"part-00001\.parquet has \d+ bytes, the manifest says"):
        _setup(prepared)
    shard.unlink()
    with pytest.raises(DataError, match=r"shard train/part-00001\.parquet is missing"):
        _setup(prepared)


def test_a_shard_path_outside_the_split_folder_is_refused(prepared: Path) -> None:
    _edit(prepared, lambda m: m["splits"]["val"]["shards"][0].update(path="../rows.parquet"))
    with pytest.raises(DataError, match=r"val shard path '\.\./rows\.parquet' is not val/part-"):
        _setup(prepared)


def test_a_corrupt_encoding_is_named(prepared: Path) -> None:
    (prepared / ENCODING_FILE).write_text("{")
    with pytest.raises(ValueError, match=r"encoding\.json is not an encoding mtl prepare wrote"):
        _setup(prepared)


def test_prepare_rewrites_a_folder_whose_manifest_is_malformed(prepared: Path) -> None:
    rows = prepared.parent / "rows.parquet"
    args = {"row_group_rows": 100, "shard_rows": 300, "log": _quiet}
    # same inputs and options (the fingerprint matches), but the shard list is gone
    _edit(prepared, lambda m: m.pop("splits"))
    manifest = prepare(_data(path=rows), prepared, **args)
    assert sum(s["rows"] for s in manifest["splits"].values()) == N
    assert _setup(prepared).rows("train") == manifest["splits"]["train"]["rows"]
    _edit(prepared, lambda m: m["splits"]["train"].update(shards="nope"))
    prepare(_data(path=rows), prepared, **args)
    assert _setup(prepared).rows("train") == manifest["splits"]["train"]["rows"]
