"""RecDataModule: deterministic splits, train-only fitting, Lightning integration."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as L
import torch

from mtl.data.datamodule import RecDataModule, split_indices
from mtl.data.sources import load_source
from mtl.data.tabular import RecBatch
from mtl.data.tensor_loader import TensorBatchLoader
from mtl.models.rec.embedding import FeatureEmbedding

SMALL_CTR = {"n": 3000, "n_users": 60, "n_items": 50}


@lru_cache(maxsize=1)
def _census_dm(path: str) -> RecDataModule:
    dm = RecDataModule(source="census_income", path=path, batch_size=4096, seed=0)
    dm.setup("fit")
    return dm


def test_split_indices_partition_and_determinism() -> None:
    parts = split_indices(1000, (0.7, 0.2, 0.1), seed=3)
    assert [len(p) for p in parts] == [700, 200, 100]
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    again = split_indices(1000, (0.7, 0.2, 0.1), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not np.array_equal(parts[1], split_indices(1000, (0.7, 0.2, 0.1), seed=4)[1])
    with pytest.raises(ValueError, match="sum to 1"):
        split_indices(10, (0.5, 0.2, 0.2), seed=0)


def test_same_seed_same_split_and_tensors() -> None:
    a = RecDataModule(source="synthetic_ctr", source_kwargs=SMALL_CTR, seed=5)
    b = RecDataModule(source="synthetic_ctr", source_kwargs=SMALL_CTR, seed=5)
    c = RecDataModule(source="synthetic_ctr", source_kwargs=SMALL_CTR, seed=6)
    for dm in (a, b, c):
        dm.setup()
    for split in ("train", "val", "test"):
        assert np.array_equal(a.row_index[split], b.row_index[split])
        assert torch.equal(a.tensors(split).cat_BF, b.tensors(split).cat_BF)
    assert not np.array_equal(a.row_index["val"], c.row_index["val"])
    # split_seed pins the split while the shuffling seed changes.
    d = RecDataModule(source="synthetic_ctr", source_kwargs=SMALL_CTR, seed=6, split_seed=5)
    d.setup()
    assert all(np.array_equal(a.row_index[s], d.row_index[s]) for s in ("train", "val", "test"))
    sizes = [len(a.tensors(s)) for s in ("train", "val", "test")]
    assert sizes == [2400, 300, 300]


def test_census_split_standardisation_and_oov(census_path: Path) -> None:
    dm = _census_dm(str(census_path))
    rows = {s: dm.row_index[s] for s in ("train", "val", "test")}
    assert [len(r) for r in rows.values()] == [79_810, 9_976, 9_976]
    assert len(np.unique(np.concatenate(list(rows.values())))) == 99_762
    assert all(dm.origin[s] == "train" for s in rows)  # all carved from the one file

    num = dm.tensors("train").num_BF
    assert torch.allclose(num.mean(0), torch.zeros(num.shape[1]), atol=1e-4)
    assert torch.allclose(num.std(0, unbiased=False), torch.ones(num.shape[1]), atol=1e-3)

    # Labels of the tensors are the source rows selected by row_index.
    source = load_source("census_income", path=str(census_path)).train
    val = dm.tensors("val")
    expected = source[rows["val"].tolist()].select("income", "never_married").to_numpy()
    assert np.array_equal(val.labels_BT.numpy(), expected.astype(np.float32))

    # OOV: a val category code is 0 exactly when the raw value never occurs in train.
    names = [f.name for f in dm.spec.categorical]
    j = names.index("detailed household and family stat")  # 38 values, some rare
    train_values = set(source[rows["train"].tolist()][names[j]].to_list())
    val_values = source[rows["val"].tolist()][names[j]].to_list()
    unseen = np.array([v not in train_values for v in val_values])
    assert np.array_equal(val.cat_BF[:, j].numpy() == 0, unseen)
    assert (dm.tensors("train").cat_BF > 0).all()  # census has no nulls: train never hits OOV
    vocab = dm.spec.categorical[j].vocab_size
    assert int(val.cat_BF[:, j].max()) <= vocab


def test_source_test_file_is_the_test_split(aliexpress_dir: Path) -> None:
    dm = RecDataModule(
        source="aliexpress", path=str(aliexpress_dir), split=(0.8, 0.1, 0.1), batch_size=16
    )
    assert [len(dm.tensors(s)) for s in ("train", "val", "test")] == [
        89,
        11,
        100,
    ]  # val = 1/9 of train.csv
    assert dm.origin["test"] == "test" and np.array_equal(dm.row_index["test"], np.arange(100))
    ignored = RecDataModule(source="aliexpress", path=str(aliexpress_dir), use_source_test=False)
    assert [len(ignored.tensors(s)) for s in ("train", "val", "test")] == [80, 10, 10]


def test_label_override_subset_and_errors() -> None:
    dm = RecDataModule(
        source="synthetic_ctr",
        source_kwargs=SMALL_CTR,
        labels=["conversion", "click"],
        task_weights={"conversion": 3.0},
    )
    assert dm.spec.task_names == ["conversion", "click"] and dm.spec.tasks[0].weight == 3.0
    assert dm.tensors("train").labels_BT.shape[1] == 2
    with pytest.raises(
        ValueError, match=r"labels \['share'\] are not labels of source 'synthetic_ctr'"
    ):
        RecDataModule(source="synthetic_ctr", source_kwargs=SMALL_CTR, labels=["share"]).setup()
    with pytest.raises(ValueError, match="unknown data source"):
        RecDataModule(source="nope").setup()
    with pytest.raises(ValueError, match="split must be"):
        RecDataModule(source="synthetic_ctr", split=(0.9, 0.1))


class _TinyModel(L.LightningModule):
    def __init__(self, dm: RecDataModule) -> None:
        super().__init__()
        self.embed = FeatureEmbedding(spec=dm.spec)
        self.head = torch.nn.Linear(self.embed.output_dim, dm.spec.n_tasks)
        self.train_rows: list[list[int]] = []  # user keys of every train batch, in order
        self.first_rows: list[torch.Tensor] = []
        self.val_rows = 0

    def training_step(self, batch: RecBatch, batch_idx: int) -> torch.Tensor:
        assert isinstance(batch, RecBatch)
        self.train_rows.append(batch.user.tolist())  # type: ignore[union-attr]
        if batch_idx == 0:
            self.first_rows.append(batch.user.clone())  # type: ignore[union-attr]
        logits = self.head(self.embed(batch.cat, batch.num))
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)

    def validation_step(self, batch: RecBatch, batch_idx: int) -> None:
        self.val_rows += batch.batch_size

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture
def one_thread() -> Iterator[None]:
    # Tiny matmuls: intra-op threads only contend on busy 2-core runners.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_lightning_fit_uses_loaders_and_sets_epochs() -> None:
    dm = RecDataModule(
        source="synthetic_ctr",
        source_kwargs=SMALL_CTR,
        batch_size=256,
        eval_batch_size=1000,
        seed=2,
    )
    model = _TinyModel(dm)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.num_training_batches == len(dm.train_dataloader()) == 10
    assert model.val_rows == 2 * 300  # full val split, each epoch
    # Epoch e's first batch is exactly that of a standalone loader set to epoch e.
    for epoch, rows in enumerate(model.first_rows):
        loader = TensorBatchLoader(
            tensors=dm.tensors("train"), batch_size=256, shuffle=True, seed=2
        )
        loader.set_epoch(epoch)
        assert torch.equal(next(iter(loader)).user, rows)  # type: ignore[arg-type]
    assert not torch.equal(model.first_rows[0], model.first_rows[1])


@pytest.mark.usefixtures("one_thread")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning")
def test_lightning_mid_epoch_resume_reproduces_the_data_order(tmp_path: Path) -> None:
    def run(max_steps: int, ckpt_path: str | None, callbacks: list[L.Callback]) -> _TinyModel:
        dm = RecDataModule(source="synthetic_ctr", source_kwargs=SMALL_CTR, batch_size=256, seed=2)
        model = _TinyModel(dm)
        trainer = L.Trainer(
            max_epochs=2, max_steps=max_steps, accelerator="cpu", logger=False,
            enable_checkpointing=bool(callbacks), callbacks=callbacks, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0,
        )  # fmt: skip
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model

    full = run(-1, None, [])
    ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=14, save_top_k=-1)
    run(14, None, [ckpt])  # stops after batch 4 of epoch 1 (10 batches per epoch)
    resumed = run(-1, str(tmp_path / "epoch=1-step=14.ckpt"), [])
    # The loader's state_dict (epoch, batches served) travels in the checkpoint.
    assert len(full.train_rows) == 20 and len(resumed.train_rows) == 6
    assert resumed.train_rows == full.train_rows[14:]
