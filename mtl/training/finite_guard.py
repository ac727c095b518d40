"""Stop a run whose loss or weights stop being finite, and say why.

A NaN loss does not stop Lightning: the optimizer turns the weights to NaN, the
checkpoint callback keeps saving, and the run ends with chance-level metrics and
exit status 0. :class:`FiniteGuard` checks the training loss and the parameters
after every optimizer step, and the validation loss after every validation, and
raises :class:`NonFiniteError` naming the step and the likely cause: a
non-finite value in the batch's inputs, or, with finite inputs, a learning rate
too high for the model. ``mtl.training.train.train`` then writes no
``metrics.json`` and tests no checkpoint; ``mtl train`` prints the message as one
``error:`` line and exits with status 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from mtl.data.tabular import RecBatch


class NonFiniteError(RuntimeError):
    """A training or validation loss, or a parameter, became NaN or infinite."""


def _float_tensors(batch: Any, path: str = "batch") -> Iterator[tuple[str, Tensor]]:
    # Named floating-point tensors of a batch of any nesting (tuple, dict, dataclass).
    if isinstance(batch, Tensor):
        if batch.is_floating_point():
            yield path, batch
    elif isinstance(batch, dict):
        for key, value in batch.items():
            yield from _float_tensors(value, f"{path}[{key!r}]")
    elif isinstance(batch, list | tuple):
        for i, value in enumerate(batch):
            yield from _float_tensors(value, f"{path}[{i}]")
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        for field in dataclasses.fields(batch):
            yield from _float_tensors(getattr(batch, field.name), f"{path}.{field.name}")


def non_finite_inputs(batch: Any, pl_module: pl.LightningModule) -> list[str]:
    """Names of the batch's inputs that hold NaN or infinite values.

    For a :class:`~mtl.data.tabular.RecBatch` of a module with a ``spec``
    (:class:`~mtl.training.rec_module.RecModule`), the numeric feature and label
    column names; otherwise the paths of the floating-point tensors
    (``batch[0]``, ``batch.num``).

    Example:
        >>> non_finite_inputs((torch.tensor([1.0, float("inf")]), torch.ones(2)), pl.LightningModule())
        ['batch[0]']
    """
    spec = getattr(pl_module, "spec", None)
    if isinstance(batch, RecBatch) and spec is not None:
        names: list[str] = []
        for columns, values_BF in (
            ([f.name for f in spec.numeric], batch.num),
            ([f"label {t}" for t in spec.task_names], batch.labels),
        ):
            bad_F = (~torch.isfinite(values_BF)).any(dim=0).tolist()
            names += [name for name, bad in zip(columns, bad_F, strict=True) if bad]
        return names
    return [name for name, t in _float_tensors(batch) if not bool(torch.isfinite(t).all())]


def _learning_rates(trainer: pl.Trainer) -> str:
    rates = sorted({float(g["lr"]) for opt in trainer.optimizers for g in opt.param_groups})
    return ", ".join(f"{lr:g}" for lr in rates) or "unknown"


class FiniteGuard(pl.Callback):
    """Raise :class:`NonFiniteError` when the loss or the weights are no longer finite.

    Checked after each optimizer step (every ``every_n_steps``): the training loss
    and the sum of the parameters, one device sync for both; after each
    validation: ``val_key``. With a gradient scaler (``precision=16-mixed``) an
    overflowing loss is expected now and then (the scaler skips that step), so
    only the parameters are checked there.

    Args:
        every_n_steps: check every this many optimizer steps (1: each one). The
            parameters of the last step are checked at the end of each epoch anyway.
        val_key: the validation loss key checked after validation; None: none.

    Raises:
        NonFiniteError: naming the step, the loss or the first non-finite parameters,
            and the likely cause.

    Example:
        >>> trainer = pl.Trainer(callbacks=[FiniteGuard()])  # doctest: +SKIP
    """

    def __init__(self, every_n_steps: int = 1, val_key: str | None = "val/loss") -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)
        self.val_key = val_key

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self._check(
            trainer, pl_module, loss if isinstance(loss, Tensor) else None, batch, batch_idx
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_steps > 1:
            self._check(trainer, pl_module, None, None, None)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.val_key is None:
            return
        value = trainer.callback_metrics.get(self.val_key)
        if value is not None and not math.isfinite(float(value)):
            raise NonFiniteError(
                f"{self.val_key} is {float(value)} after step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}): the model diverged on the validation data; "
                f"lower the learning rate (now "
                f"{_learning_rates(trainer)}) or clip gradients (trainer.gradient_clip_val)"
            )

    def _check(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        loss: Tensor | None,
        batch: Any,
        batch_idx: int | None,
    ) -> None:
        # The sum of all weights is NaN or infinite when any weight is, and costs a
        # tenth of an exact per-tensor check; it can also overflow on huge finite
        # weights, so the exact check below confirms before raising.
        sums = [torch.sum(p.detach(), dtype=torch.float32) for p in pl_module.parameters()]
        checks = [torch.stack(sums).sum()] if sums else []
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if loss is not None and scaler is None:
            checks.append(
                loss.detach().float().reshape(()).to(checks[0].device if checks else loss.device)
            )
        if not checks or bool(torch.isfinite(torch.stack(checks)).all()):
            return
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch}"
        where += ")" if batch_idx is None else f", batch {batch_idx})"
        cause = (
            f"lower the learning rate (now {_learning_rates(trainer)}) or clip gradients "
            "(trainer.gradient_clip_val)"
        )
        if len(checks) > 1 and not bool(torch.isfinite(checks[1])):
            bad_inputs = non_finite_inputs(batch, pl_module) if batch is not None else []
            if bad_inputs:
                raise NonFiniteError(
                    f"the training loss is {float(checks[1])} at {where}: the batch holds "
                    f"non-finite values in {bad_inputs}; remove or fill them in the data"
                )
            raise NonFiniteError(
                f"the training loss is {float(checks[1])} at {where} with finite inputs: "
                f"the optimisation diverged; {cause}"
            )
        names = [n for n, p in pl_module.named_parameters() if not bool(torch.isfinite(p).all())]
        if not names:
            return  # large but finite weights whose sum overflowed
        shown = names[:3] + ([f"... {len(names) - 3} more"] if len(names) > 3 else [])
        raise NonFiniteError(
            f"parameters became non-finite in the optimizer step at {where}: {shown}; "
            f"the optimisation diverged; {cause}"
        )
