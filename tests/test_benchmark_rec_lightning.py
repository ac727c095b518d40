"""benchmarks/rec_lightning.py: epoch-by-epoch fits under one Trainer equal one long fit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from mtl.data.datamodule import RecDataModule
from mtl.models.rec import MMoE
from mtl.models.rec.embedding import FeatureEmbedding
from mtl.models.rec.ranker import Ranker

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import rec_lightning
    import rec_train
finally:
    sys.path.remove(str(ROOT / "benchmarks"))

MODEL = {"num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]}


def _dm() -> RecDataModule:
    dm = RecDataModule(
        source="synthetic_ctr", source_kwargs={"n": 2000}, batch_size=128, embed_dim=4
    )
    dm.setup("fit")
    return dm


def _module(dm: RecDataModule) -> rec_lightning.OneOptimizerRecModule:
    torch.manual_seed(3)
    embedding = FeatureEmbedding(spec=dm.spec)
    model = MMoE(d_in=embedding.output_dim, tasks=dm.spec.task_names, dropout=0.1, **MODEL)
    net = Ranker(embedding=embedding, model=model)
    return rec_lightning.OneOptimizerRecModule(net=net, seed=3, diagnostics=False)


def test_epochs_one_fit_at_a_time_equal_one_long_fit(tmp_path: Path) -> None:
    dm = _dm()
    stepped = _module(dm)
    run_epoch = rec_lightning.trainer_epoch_runner(stepped, dm.train_dataloader())
    deterministic = torch.are_deterministic_algorithms_enabled()
    seconds = [run_epoch(e) for e in range(3)]
    assert all(s > 0 for s in seconds)
    # the Trainer's deterministic mode stays inside the variant's epochs
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    (opt,) = stepped.trainer.optimizers
    steps_per_epoch = len(dm.train_dataloader())
    assert int(opt.state_dict()["state"][0]["step"]) == 3 * steps_per_epoch  # Adam kept its state

    whole = _module(dm)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=3,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(whole, train_dataloaders=dm.train_dataloader())
    torch.use_deterministic_algorithms(deterministic)
    for (name, a), b in zip(stepped.state_dict().items(), whole.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not torch.equal(
        stepped.net.embedding.tables[0].weight, _module(dm).net.embedding.tables[0].weight
    )


def test_asking_for_an_epoch_out_of_order_raises() -> None:
    dm = _dm()
    run_epoch = rec_lightning.trainer_epoch_runner(_module(dm), dm.train_dataloader())
    run_epoch(0)
    with pytest.raises(RuntimeError, match="trainer is at epoch 1, asked for 2"):
        run_epoch(2)


def test_rec_train_trainer_variant_trains_what_the_plain_loop_trains() -> None:
    """Without dropout (no random numbers) Lightning's path and the plain loop see the
    same init, batches and Adam steps: the same predictions, bit for bit."""
    dm = _dm()
    model = {"_target_": "mtl.models.rec.MMoE", **MODEL, "dropout": 0.0}
    trainer = rec_train.trainer_variant(dm, model, seed=1)
    loop = rec_train.mtl_variant(dm, model, "mtl", seed=1)
    untrained = loop.predict(dm.tensors("test"))
    for epoch in range(2):
        seconds = trainer.run_epoch(epoch)
        assert seconds is not None and seconds > 0
        assert loop.run_epoch(epoch) is None  # timed around by train_interleaved
    test = dm.tensors("test")
    torch.testing.assert_close(trainer.predict(test), loop.predict(test), rtol=0, atol=0)
    assert (trainer.predict(test) - untrained).abs().max() > 1e-3
    assert trainer.name == "mtl_trainer" and trainer.num_params == loop.num_params
