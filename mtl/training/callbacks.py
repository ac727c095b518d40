"""Lightning callbacks shared by the rec and LM runners."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl


class ValidateAtMaxSteps(pl.Callback):
    """Validate after the last step of a ``max_steps`` run that ends inside an epoch.

    Lightning validates at the end of each epoch. When ``max_steps`` stops training
    part-way through one, that epoch ends without validation, and its end-of-epoch
    checkpoint is ranked by the previous epoch's validation metric (stale), or,
    in a run shorter than one epoch, finds none: Lightning then warns, keeps no
    best checkpoint, and ``EarlyStopping`` raises. Asking the trainer to stop at
    that step makes Lightning validate there first.

    Example:
        >>> trainer = pl.Trainer(max_steps=300, callbacks=[ValidateAtMaxSteps()])  # doctest: +SKIP
    """

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True
