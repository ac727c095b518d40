"""mtl's ranker trained by pytorch-lightning's Trainer, as ``mtl train`` runs it.

``rec_train.py``'s ``mtl`` variant times the model in a plain loop, like the
rechub variants. Users train through ``mtl train``, which adds Lightning's loop,
hooks and logging; the ``mtl_trainer`` variant built from this module times that
path, so the benchmark also says what a user gets.

One ``pl.Trainer`` serves every epoch of a variant: each epoch is one more
``fit`` call with ``fit_loop.max_epochs`` raised by one, which continues from
the last epoch (global step, data order). ``configure_optimizers`` hands out
the same optimizer every time, so Adam's state carries over as in one long fit.
The Trainer is built from ``conf/trainer/cpu.yaml`` as ``mtl train`` builds it
(deterministic, its logging interval), without validation, checkpoints, logger
or progress bar: per-epoch work that no other variant does. The epoch time runs from
``on_train_epoch_start`` to ``on_train_epoch_end``, so a fit's set-up is not in it.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from mtl.data.tensor_loader import TensorBatchLoader
from mtl.training.build import build
from mtl.training.rec_module import RecModule

TRAINER_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "trainer" / "cpu.yaml"


class OneOptimizerRecModule(RecModule):
    """A RecModule whose ``configure_optimizers`` builds its optimizer once.

    Example:
        >>> module = OneOptimizerRecModule(net=ranker)  # doctest: +SKIP
        >>> module.configure_optimizers() is module.configure_optimizers()  # doctest: +SKIP
        True
    """

    _optimizers: dict[str, Any] | None = None

    def configure_optimizers(self) -> dict[str, Any]:
        if self._optimizers is None:
            self._optimizers = super().configure_optimizers()
        return self._optimizers


class EpochTimer(pl.Callback):
    """Wall time of each training epoch, from its first hook to its last."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def _deterministic_state() -> tuple[bool, bool]:
    return (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )


def trainer_epoch_runner(
    module: OneOptimizerRecModule, loader: TensorBatchLoader
) -> Callable[[int], float]:
    """``run_epoch(epoch) -> seconds``: one more epoch of ``module`` under one Trainer.

    Lightning's ``deterministic: true`` switches torch's deterministic algorithms
    on for the whole process. They are on during this variant's epochs, as in
    ``mtl train``, and back to the previous setting outside them, so the variants
    timed next to this one run as they would alone.
    """
    settings: dict[str, Any] = dict(OmegaConf.to_container(OmegaConf.load(TRAINER_CONFIG)))
    settings.update(
        max_epochs=0,
        enable_progress_bar=False,
        enable_checkpointing=False,
        logger=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    timer = EpochTimer()
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # "GPU available", "fit stopped"
    outside = _deterministic_state()
    trainer: pl.Trainer = build(settings, what="trainer", callbacks=[timer])
    inside = _deterministic_state()  # what the Trainer set, as in `mtl train`
    torch.use_deterministic_algorithms(outside[0], warn_only=outside[1])

    def run_epoch(epoch: int) -> float:
        if trainer.current_epoch != epoch:
            raise RuntimeError(f"trainer is at epoch {trainer.current_epoch}, asked for {epoch}")
        before = _deterministic_state()
        torch.use_deterministic_algorithms(inside[0], warn_only=inside[1])
        trainer.fit_loop.max_epochs = epoch + 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # validation skipped on purpose, and the like
                trainer.fit(module, train_dataloaders=loader)
        finally:
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        return timer.seconds[-1]

    return run_epoch
