"""ValidateAtMaxSteps: a max_steps run that ends inside an epoch validates its last step."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor, nn

from mtl.training.callbacks import ValidateAtMaxSteps


class _Probe(pl.LightningModule):
    """Records the global step of every validation."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.validated_at: list[int] = []
        self.val_losses: list[float] = []

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return (self.w - batch).pow(2).mean()

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self.log("val/loss", (self.w - batch).pow(2).mean())

    def on_validation_epoch_end(self) -> None:
        self.validated_at.append(self.trainer.global_step)
        self.val_losses.append(float(self.trainer.callback_metrics["val/loss"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path: Path, callbacks: list[pl.Callback]) -> tuple[_Probe, ModelCheckpoint, list[str]]:
    probe = _Probe()
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path, monitor="val/loss", save_top_k=-1, save_last=True
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=7,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        callbacks=[checkpoint, *callbacks],
    )
    data = torch.utils.data.DataLoader(torch.randn(5, 1), batch_size=1)  # 5 steps per epoch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(probe, train_dataloaders=data, val_dataloaders=data)
    return probe, checkpoint, [str(w.message) for w in caught]


def test_run_ending_inside_an_epoch_validates_its_last_step(tmp_path: Path) -> None:
    probe, checkpoint, messages = _fit(tmp_path / "with", [ValidateAtMaxSteps()])
    assert probe.validated_at == [5, 7]
    # the final steps' checkpoint is ranked by their own validation
    scores = {Path(k).name: float(v) for k, v in checkpoint.best_k_models.items()}
    assert scores == {
        "epoch=0-step=5.ckpt": probe.val_losses[0],
        "epoch=1-step=7.ckpt": probe.val_losses[1],
    }
    assert not any("could not find the monitored key" in m for m in messages)


def test_without_it_lightning_skips_that_validation(tmp_path: Path) -> None:
    probe, checkpoint, _ = _fit(tmp_path / "without", [])
    assert probe.validated_at == [5]  # steps 6-7 never validated: what the callback fixes
    # ... and its end-of-epoch checkpoint is ranked by step 5's stale val/loss
    scores = {Path(k).name: float(v) for k, v in checkpoint.best_k_models.items()}
    assert scores == {
        "epoch=0-step=5.ckpt": probe.val_losses[0],
        "epoch=1-step=7.ckpt": probe.val_losses[0],
    }
