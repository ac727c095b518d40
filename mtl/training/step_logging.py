"""Training-step logging: log step values only when something reads them.

Each Lightning ``self.log`` call has a fixed host cost that is a visible share of
a small ranker's CPU step (measured in ``benchmarks/RESULTS.md``). Two tools remove
that cost without changing what is recorded:

* :func:`step_metrics_due` says whether a value logged with ``on_step=True`` in
  this training batch will be read: by the logger (which writes step metrics
  every ``trainer.log_every_n_steps`` steps), by the progress bar (which
  refreshes every ``refresh_rate`` batches), or as the run's last value.
* :class:`EpochMeans` keeps the batch-size-weighted epoch means of scalar
  losses on the device (no host sync per step) and hands them to one
  ``self.log`` per key at the end of the epoch: the same value as
  ``self.log(..., on_epoch=True, batch_size=bs)`` in every step. It is a
  torchmetrics ``Metric``, so its sums are added across processes when a
  distributed run computes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torchmetrics import Metric

if TYPE_CHECKING:
    import pytorch_lightning as pl


def step_metrics_due(module: pl.LightningModule, batch_idx: int) -> bool:
    """Whether on-step values logged in this training batch would be read.

    True when the logger writes step metrics after this batch (Lightning's rule:
    the number of optimizer steps before this batch, plus one, is a multiple of
    ``log_every_n_steps``), when a progress bar with a ``refresh_rate`` refreshes
    after it, on the last batch of the epoch, on the last step of a
    ``max_steps`` run, once the trainer is stopping, in ``fast_dev_run``, and
    whenever the module is not attached to a trainer (plain calls log as usual).
    The answer is the same in ``on_train_batch_start``, ``training_step`` and
    ``on_train_batch_end``. It reads public trainer state only and assumes
    automatic optimization (one optimizer step per stepping batch).

    Args:
        module: the LightningModule whose ``training_step`` or
            ``on_train_batch_end`` asks.
        batch_idx: the batch index Lightning passed to that hook.

    Example:
        >>> import pytorch_lightning as pl
        >>> class M(pl.LightningModule):
        ...     def training_step(self, batch, batch_idx):
        ...         loss = batch.sum()
        ...         if step_metrics_due(self, batch_idx):
        ...             self.log("train/loss", loss, prog_bar=True)
        ...         return loss
        >>> step_metrics_due(M(), 0)  # not attached to a trainer: log as usual
        True
    """
    try:
        trainer = module.trainer
    except RuntimeError:  # not attached to a trainer
        return True
    if trainer.fast_dev_run or trainer.should_stop:
        return True
    # The logger names a batch by the optimizer steps taken before it. global_step
    # moves inside the optimizer step, so once this batch has stepped (processed ==
    # ready, as in on_train_batch_end) it already counts this batch's step.
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    last_batch = trainer.is_last_batch or progress.ready == trainer.num_training_batches
    stepped = progress.processed == progress.ready and (
        progress.ready % trainer.accumulate_grad_batches == 0 or last_batch
    )
    step = trainer.global_step + (0 if stepped else 1)
    every = trainer.log_every_n_steps
    if every > 0 and step % every == 0:
        return True
    if trainer.max_steps > 0 and step >= trainer.max_steps:
        return True
    bar = trainer.progress_bar_callback
    rate = int(getattr(bar, "refresh_rate", 0) or 0) if bar is not None and bar.is_enabled else 0
    if rate > 0 and (batch_idx + 1) % rate == 0:
        return True
    return bool(trainer.is_last_batch)


class EpochMeans(Metric):
    """Batch-size-weighted means of named scalars over one epoch, kept on the device.

    ``add`` stacks the step's values into one vector and adds it, times the batch
    size, to a running sum: no host sync per step. ``compute`` divides once. The
    same names must come in every step of an epoch (a model's set of losses does
    not change). The states are sums (``dist_reduce_fx="sum"``), so in a
    distributed run ``compute`` gives the means over every process's batches;
    every process must then have added at least one step.

    Args:
        **kwargs: torchmetrics ``Metric`` options (``sync_on_compute``,
            ``process_group``, ...).

    Example:
        >>> means = EpochMeans()
        >>> means.update({"loss": torch.tensor(1.0), "aux": torch.tensor(0.5)}, weight=3)
        >>> means.update({"loss": torch.tensor(2.0), "aux": torch.tensor(0.0)}, weight=1)
        >>> {k: round(float(v), 4) for k, v in means.compute().items()}
        {'loss': 1.25, 'aux': 0.375}
    """

    full_state_update = False
    sums: Tensor
    weight: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.names: tuple[str, ...] | None = None
        """The value names, in order, fixed by the epoch's first step."""
        # float32 (len(names),) once the first step has named the values.
        self.add_state("sums", default=torch.zeros(0), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def reset(self) -> None:
        """Forget the epoch so far (names included)."""
        super().reset()
        self.names = None

    def update(self, values: Mapping[str, Tensor], weight: int) -> None:
        """Add one step's scalar ``values`` with weight ``weight`` (its batch size).

        Raises:
            ValueError: when the names differ from the epoch's first step, or a
                value is not a scalar.
        """
        names = tuple(values)
        if self.names is None:
            self.names = names
        elif names != self.names:
            raise ValueError(
                f"EpochMeans got values {list(names)} after {list(self.names)} in the same epoch"
            )
        for name, value in values.items():
            if value.numel() != 1:
                raise ValueError(
                    f"EpochMeans value {name!r} has shape {tuple(value.shape)}, not a scalar"
                )
        step = torch.stack([v.detach().reshape(()).float() for v in values.values()])
        if self.sums.numel() == 0:
            self.sums = step * weight
        else:
            self.sums.add_(step, alpha=weight)
        self.weight += int(weight)

    def compute(self) -> dict[str, Tensor]:
        """The means so far, by name (empty before the first ``add``)."""
        if self.names is None or self.sums.numel() == 0:
            return {}
        means = self.sums / self.weight
        return dict(zip(self.names, means.unbind(0), strict=True))
