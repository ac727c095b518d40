"""Watch ``val/loss`` when the monitored metric cannot be computed on the validation split.

AUC needs both classes: on a validation split where every binary task has a
single class, ``val/auc_mean`` is never logged (and ``val/auc/<task>`` is NaN).
Lightning's checkpoint callback then raises after the first epoch, or, with a NaN
value, never keeps a best checkpoint; early stopping stops the run. The run is
still worth finishing, ranked by its validation loss: :class:`MonitorFallback`
switches every checkpoint and early-stopping callback that watches such a key
to ``val/loss`` at the first validation, with one warning.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

log = logging.getLogger(__name__)

Watcher = ModelCheckpoint | EarlyStopping


def computable(value: Any) -> bool:
    """Whether a logged metric value exists and is a finite number.

    Example:
        >>> computable(torch.tensor(0.7)), computable(float("nan")), computable(None)
        (True, False, False)
    """
    return value is not None and math.isfinite(float(value))


def watch(callback: Watcher, monitor: str, mode: str) -> None:
    """Point a checkpoint or early-stopping callback that has seen no score yet at ``monitor``.

    Both callbacks derive their starting best value, and early stopping the sign of
    its ``min_delta``, from ``mode`` at construction; they are set again here.
    """
    inf = torch.tensor(math.inf)
    callback.monitor = monitor
    callback.mode = mode
    if isinstance(callback, ModelCheckpoint):
        callback.kth_value = inf if mode == "min" else -inf
    else:
        callback.min_delta = -abs(callback.min_delta) if mode == "min" else abs(callback.min_delta)
        callback.best_score = inf if mode == "min" else -inf
        callback.wait_count = 0


class MonitorFallback(pl.Callback):
    """Switch checkpoint and early-stopping monitors that cannot be computed to ``fallback``.

    At the first validation of a fit (the sanity check aside), each
    :class:`~pytorch_lightning.callbacks.ModelCheckpoint` and
    :class:`~pytorch_lightning.callbacks.EarlyStopping` whose monitored key is
    missing or NaN, while ``fallback`` is finite, is pointed at ``fallback`` with
    ``fallback_mode``; one warning names the keys. The choice is kept in
    checkpoints, so a resumed run ranks by the same key. A monitor that was
    computable at the first validation is never switched later.

    Args:
        fallback: the key to watch instead; it must be logged at every validation.
        fallback_mode: ``"min"`` or ``"max"`` for ``fallback``.

    Example:
        >>> trainer = pl.Trainer(callbacks=[MonitorFallback(), ModelCheckpoint(monitor="val/auc_mean",
        ...     mode="max")])  # doctest: +SKIP
    """

    def __init__(self, fallback: str = "val/loss", fallback_mode: str = "min") -> None:
        if fallback_mode not in ("min", "max"):
            raise ValueError(f"fallback_mode must be min or max, got {fallback_mode!r}")
        self.fallback = fallback
        self.fallback_mode = fallback_mode
        self.replaced: list[str] = []
        """The monitored keys switched to ``fallback`` in this run."""
        self._decided = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(fallback=self.fallback)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._decided:
            return
        metrics = trainer.callback_metrics
        if not computable(metrics.get(self.fallback)):
            return  # nothing better to watch (a non-finite loss stops the run elsewhere)
        self._decided = True
        watchers = self._watchers(trainer)
        missing = sorted(
            {c.monitor for c in watchers if c.monitor and not computable(metrics.get(c.monitor))}
        )
        if not missing:
            return
        self._switch(watchers, missing)
        log.warning(
            "%s cannot be computed on the validation split (missing or NaN: for AUC, a task "
            "with a single class there); checkpoints and early stopping watch %s (%s) instead",
            ", ".join(missing),
            self.fallback,
            self.fallback_mode,
        )

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Runs before the callbacks' states are restored: the checkpoint callback of
        # a switched run finds its state under its switched key.
        state = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
        replaced = list(state.get("replaced", []))
        if replaced:
            self._decided = True
            self._switch(self._watchers(trainer), replaced)

    def state_dict(self) -> dict[str, Any]:
        return {"replaced": list(self.replaced)}

    def _watchers(self, trainer: pl.Trainer) -> list[Watcher]:
        return [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint | EarlyStopping)]  # type: ignore[attr-defined]

    def _switch(self, watchers: list[Watcher], keys: list[str]) -> None:
        for callback in watchers:
            if callback.monitor in keys:
                watch(callback, self.fallback, self.fallback_mode)
        self.replaced = sorted(set(self.replaced) | set(keys))
