"""Lightning callbacks shared by the rec and LM runners."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl

from mtl.models.lm.lora import adapter_config, has_lora, save_adapters
from mtl.moe.mixture_of_tokens import TemperatureSchedule, set_temperature


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


class TokenMixingTemperature(pl.Callback):
    """Set the Mixture-of-Tokens temperature of the model before every training step.

    Transition tuning (:class:`~mtl.moe.mixture_of_tokens.TemperatureSchedule`):
    ``tau`` falls from ``start`` to ``end`` over ``steps`` steps; logged as
    ``train/mot_temperature``. Does nothing in a model without such layers.

    Args:
        start: temperature at step 0.
        end: temperature from step ``steps`` on.
        steps: training steps over which ``tau`` moves from ``start`` to ``end``.
        kind: ``"exponential"`` (geometric interpolation) or ``"linear"``.

    Example:
        >>> TokenMixingTemperature(start=1.0, end=0.1, steps=10).schedule.at(10)
        0.1
    """

    def __init__(
        self,
        *,
        start: float = 1.0,
        end: float = 0.05,
        steps: int = 1000,
        kind: Literal["exponential", "linear"] = "exponential",
    ) -> None:
        self.schedule = TemperatureSchedule(start=start, end=end, steps=steps, kind=kind)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        tau = self.schedule.at(trainer.global_step)
        if set_temperature(pl_module, tau):
            pl_module.log("train/mot_temperature", tau, on_step=True, on_epoch=False)


class SaveAdapters(pl.Callback):
    """Write the model's LoRA adapters (only) to ``path`` when training ends.

    The file loads onto the base model with :func:`~mtl.models.lm.lora.load_adapters`.
    Does nothing in a model without adapters, and on ranks other than 0.

    Args:
        path: file to write; its parent folders are created when training ends.

    Example:
        >>> SaveAdapters(path="runs/x/adapters.pt").path.name
        'adapters.pt'
    """

    def __init__(self, *, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = getattr(pl_module, "net", pl_module)
        if trainer.global_rank != 0 or not has_lora(net):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer = getattr(pl_module, "tokenizer", None)  # the base's: its fingerprint is stored
        save_adapters(net, self.path, config=adapter_config(net), tokenizer=tokenizer)
