"""Cheap training-step logging: log step values only when something reads them.

Lightning's ``self.log`` costs about 0.25 ms per call on a CPU core
(pytorch-lightning 2.6: every call moves the stored result's whole ``__dict__``
to the value's device through ``apply_to_collection``, which deep-copies its
metadata dataclass). A ranking step of about 10 ms that logged its loss and one
loss per task spent ~10% of its time there; an LM step that logs routing
statistics for every layer makes about 20 calls.

Two tools remove that cost without changing what is recorded:

* :func:`step_metrics_due` says whether a value logged with ``on_step=True`` in
  this training batch will be read: by the logger (which writes step metrics
  every ``trainer.log_every_n_steps`` steps), by the progress bar (which
  refreshes every ``refresh_rate`` batches), or as the run's last value.
* :class:`EpochMeans` keeps the batch-size-weighted epoch means of scalar
  losses on the device (two tensor ops per step, no host sync) and hands them
  to one ``self.log`` per key at the end of the epoch: the same value as
  ``self.log(..., on_epoch=True, batch_size=bs)`` in every step.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytorch_lightning as pl
import torch
from torch import Tensor


def step_metrics_due(module: pl.LightningModule, batch_idx: int) -> bool:
    """Whether on-step values logged in this training batch would be read.

    True when the logger writes step metrics after this batch (Lightning's rule:
    the number of batches that stepped before it, plus one, is a multiple of
    ``log_every_n_steps``), when a progress bar with a ``refresh_rate`` refreshes
    after it, on the last batch of the epoch, on the last step of a
    ``max_steps`` run, once the trainer is stopping, in ``fast_dev_run``, and
    whenever the module is not attached to a trainer (plain calls log as usual).

    Args:
        module: the LightningModule whose ``training_step`` or
            ``on_train_batch_end`` asks.
        batch_idx: the batch index Lightning passed to that hook.

    Example:
        >>> class M(pl.LightningModule):  # doctest: +SKIP
        ...     def training_step(self, batch, batch_idx):
        ...         loss = ...
        ...         if step_metrics_due(self, batch_idx):
        ...             self.log("train/loss", loss, prog_bar=True)
        ...         return loss
    """
    trainer: pl.Trainer | None = getattr(module, "_trainer", None)
    if trainer is None or trainer.fast_dev_run or trainer.should_stop:
        return True
    # Lightning's logger counts batches that stepped and increments the count only
    # after on_train_batch_end (global_step moves earlier, inside the optimizer step),
    # so its own counter is the one that names this batch's step in every hook.
    epoch_loop = trainer.fit_loop.epoch_loop
    step = int(getattr(epoch_loop, "_batches_that_stepped", trainer.global_step)) + 1
    every = trainer.log_every_n_steps
    if every > 0 and step % every == 0:
        return True
    if trainer.max_steps > 0 and step >= trainer.max_steps:
        return True
    bar = trainer.progress_bar_callback
    rate = int(getattr(bar, "refresh_rate", 0) or 0) if bar is not None and bar.is_enabled else 0
    if rate > 0 and (batch_idx + 1) % rate == 0:
        return True
    return bool(epoch_loop.batch_progress.is_last_batch)


class EpochMeans:
    """Batch-size-weighted means of named scalars over one epoch, kept on the device.

    ``add`` stacks the step's values into one vector and adds it, times the batch
    size, to a running sum: two tensor ops and no host sync per step. The weights
    are host integers. ``compute`` divides once. The same names must come in
    every step of an epoch (a model's set of losses does not change).

    Example:
        >>> means = EpochMeans()
        >>> means.add({"loss": torch.tensor(1.0), "aux": torch.tensor(0.5)}, weight=3)
        >>> means.add({"loss": torch.tensor(2.0), "aux": torch.tensor(0.0)}, weight=1)
        >>> {k: round(float(v), 4) for k, v in means.compute().items()}
        {'loss': 1.25, 'aux': 0.375}
    """

    def __init__(self) -> None:
        self.names: tuple[str, ...] | None = None
        self._sums_K: Tensor | None = None  # (K,) float32, K = len(names)
        self._weight = 0

    def reset(self) -> None:
        """Forget the epoch so far."""
        self.names, self._sums_K, self._weight = None, None, 0

    @torch.no_grad()
    def add(self, values: Mapping[str, Tensor], weight: int) -> None:
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
        step_K = torch.stack([v.detach().reshape(()).float() for v in values.values()])
        if self._sums_K is None:
            self._sums_K = step_K * weight
        else:
            self._sums_K.add_(step_K, alpha=weight)
        self._weight += int(weight)

    def compute(self) -> dict[str, Tensor]:
        """The means so far, by name (empty before the first ``add``)."""
        if self._sums_K is None or self.names is None or self._weight == 0:
            return {}
        means_K = self._sums_K / self._weight
        return dict(zip(self.names, means_K.unbind(0), strict=True))
