"""Encoding to tensors and the permutation batch loader."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from mtl.data.features import fit_features
from mtl.data.tabular import RecBatch, TabularTensors, encode
from mtl.data.tensor_loader import TensorBatchLoader


def _tensors(n: int, with_user: bool = True) -> TabularTensors:
    # Row i carries i in every column, so a batch tells which rows it holds.
    ids = torch.arange(n)
    return TabularTensors(
        cat_BF=torch.stack([ids, ids + 1], dim=1),
        num_BF=ids.float()[:, None],
        labels_BT=torch.stack([ids.float(), -ids.float()], dim=1),
        user_B=ids.clone() if with_user else None,
    )


def _rows(loader: TensorBatchLoader) -> list[int]:
    return [int(i) for b in loader for i in b.cat[:, 0]]


def test_encode_labels_user_and_shapes() -> None:
    df = pl.DataFrame(
        {
            "u": ["ann", "bob", "ann", "cy"],
            "n": [1.0, 2.0, 3.0, 4.0],
            "click": [1, 0, 1, 0],
            "gain": [0.5, -1.0, 2.0, 0.0],
        }
    )
    fitted = fit_features(
        df,
        categorical=["u"],
        numeric=["n"],
        labels={"click": "binary", "gain": "regression"},
        user_column="u",
    )
    t = encode(df, fitted)
    assert t.cat_BF.shape == (4, 1) and t.num_BF.shape == (4, 1) and t.labels_BT.shape == (4, 2)
    assert t.labels_BT.dtype == torch.float32
    assert t.labels_BT.tolist() == [[1.0, 0.5], [0.0, -1.0], [1.0, 2.0], [0.0, 0.0]]
    user = t.user_B.tolist()  # type: ignore[union-attr]
    assert user[0] == user[2] and len(set(user)) == 3  # same raw id -> same key
    # Integer user ids are kept as they are.
    fitted_int = fit_features(
        df.with_columns(pl.Series("uid", [7, 8, 7, 9])),
        categorical=["u"],
        numeric=[],
        labels={"click": "binary"},
        user_column="uid",
    )
    t_int = encode(df.with_columns(pl.Series("uid", [7, 8, 7, 9])), fitted_int)
    assert t_int.user_B.tolist() == [7, 8, 7, 9]  # type: ignore[union-attr]


def test_encode_rejects_bad_labels_and_null_numeric() -> None:
    df = pl.DataFrame({"n": [1.0, 2.0], "y": [0, 1]})
    fitted = fit_features(df, categorical=[], numeric=["n"], labels={"y": "binary"})
    with pytest.raises(
        ValueError, match=r"binary label 'y' must be 0/1; found 1 other values, e.g. \[2\]"
    ):
        encode(pl.DataFrame({"n": [1.0, 2.0], "y": [0, 2]}), fitted, origin="val")
    with pytest.raises(
        ValueError, match=r"val: numeric feature columns have null/NaN values .*'n': 1"
    ):
        encode(pl.DataFrame({"n": [None, 2.0], "y": [0, 1]}), fitted, origin="val")
    with pytest.raises(ValueError, match=r"missing columns \['n'\]"):
        encode(pl.DataFrame({"y": [0, 1]}), fitted)


def test_tensors_validate_shapes() -> None:
    with pytest.raises(ValueError, match=r"num_BF must be a 2-d torch\.float32"):
        TabularTensors(
            cat_BF=torch.zeros(3, 1, dtype=torch.long),
            num_BF=torch.zeros(2, 1),
            labels_BT=torch.zeros(3, 1),
        )


def test_every_row_once_per_epoch_and_len() -> None:
    loader = TensorBatchLoader(tensors=_tensors(103), batch_size=10, shuffle=True, seed=3)
    assert len(loader) == 11
    for _ in range(2):
        rows = _rows(loader)
        assert sorted(rows) == list(range(103))
    batches = list(loader)
    assert [b.batch_size for b in batches] == [10] * 10 + [3]
    b = batches[0]
    # Columns stay aligned under the gather.
    assert torch.equal(b.cat[:, 1], b.cat[:, 0] + 1) and torch.equal(b.labels[:, 0], b.num[:, 0])
    assert torch.equal(b.user, b.cat[:, 0])  # type: ignore[arg-type]


def test_drop_last_and_no_shuffle() -> None:
    loader = TensorBatchLoader(tensors=_tensors(25, with_user=False), batch_size=10, drop_last=True)
    assert len(loader) == 2
    assert _rows(loader) == list(range(20))  # file order, last 5 rows dropped
    assert next(iter(loader)).user is None


def test_order_is_a_function_of_seed_and_epoch() -> None:
    t = _tensors(200)
    a = TensorBatchLoader(tensors=t, batch_size=32, shuffle=True, seed=7)
    b = TensorBatchLoader(tensors=t, batch_size=32, shuffle=True, seed=7)
    epochs_a = [_rows(a) for _ in range(3)]
    epochs_b = [_rows(b) for _ in range(3)]
    assert epochs_a == epochs_b  # same seed -> same orders
    assert epochs_a[0] != epochs_a[1] != epochs_a[2]  # new order each epoch
    assert epochs_a[0] != list(range(200))
    c = TensorBatchLoader(tensors=t, batch_size=32, shuffle=True, seed=8)
    assert _rows(c) != epochs_a[0]  # other seed -> other order
    # Resuming at epoch 2 (Lightning calls sampler.set_epoch) reproduces that epoch.
    d = TensorBatchLoader(tensors=t, batch_size=32, shuffle=True, seed=7)
    d.sampler.set_epoch(2)
    assert _rows(d) == epochs_a[2]


def test_mid_epoch_state_dict_resumes_remaining_batches() -> None:
    t = _tensors(100)
    full = TensorBatchLoader(tensors=t, batch_size=16, shuffle=True, seed=1)
    full.set_epoch(4)
    expected = [b.cat[:, 0].tolist() for b in full]
    run = TensorBatchLoader(tensors=t, batch_size=16, shuffle=True, seed=1)
    run.set_epoch(4)
    it = iter(run)
    seen = [next(it).cat[:, 0].tolist() for _ in range(3)]
    state = run.state_dict()
    assert state["epoch"] == 4 and state["batches_served"] == 3
    resumed = TensorBatchLoader(tensors=t, batch_size=16, shuffle=True, seed=1)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # what Lightning does after restoring: same epoch keeps the offset
    assert seen + [b.cat[:, 0].tolist() for b in resumed] == expected
    assert resumed.epoch == 5 and len(list(resumed)) == len(resumed)  # next epoch is whole again


def test_shards_are_disjoint_and_equal() -> None:
    t = _tensors(101)
    shards = [
        TensorBatchLoader(
            tensors=t, batch_size=8, shuffle=True, seed=0, num_shards=4, shard_index=r
        )
        for r in range(4)
    ]
    rows = [_rows(s) for s in shards]
    assert all(len(r) == 25 for r in rows)  # 101 // 4, the remainder row is dropped
    flat = [i for r in rows for i in r]
    assert len(set(flat)) == 100
    assert len({len(s) for s in shards}) == 1


def test_rec_batch_to_device() -> None:
    b = RecBatch(
        cat=torch.tensor([[3], [7]]),
        num=torch.arange(6.0).reshape(2, 3),
        labels=torch.tensor([[1.0], [0.0]]),
        user=torch.tensor([11, 12]),
    )
    fields = ("cat", "num", "labels", "user")
    meta = b.to("meta")  # a real move on any machine: every field must change device
    for name in fields:
        got, src = getattr(meta, name), getattr(b, name)
        assert got.device.type == "meta" and (got.shape, got.dtype) == (src.shape, src.dtype)
    same = b.to("cpu")
    assert all(torch.equal(getattr(same, n), getattr(b, n)) for n in fields)
    assert same.batch_size == 2
    no_user = RecBatch(cat=b.cat, num=b.num, labels=b.labels).to("meta")
    assert no_user.user is None and no_user.num.device.type == "meta"
