"""DeepSeek-V3's auxiliary-loss-free balancing as a Lightning callback.

After every optimiser step, each :class:`~mtl.moe.SigmoidBiasGate` moves its
selection bias toward balance from the step's token counts per expert (Wang et
al. 2024; DeepSeek-V3). The counts come from the ``layer_stats`` that
:meth:`~mtl.training.lm_module.LMModule.training_step` returns, summed over
gradient-accumulation micro-batches and over ranks, so every rank applies the
same update and the replicated biases stay equal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from torch import Tensor

from mtl.moe import SigmoidBiasGate
from mtl.training.step_logging import step_metrics_due


class AuxFreeBiasUpdate(pl.Callback):
    """DeepSeek-V3's auxiliary-loss-free balancing, applied after every optimiser step.

    For every MoE layer whose gate is a :class:`~mtl.moe.SigmoidBiasGate`, calls
    ``gate.update_bias(tokens_per_expert_E)`` with the step's token counts (taken
    from the ``layer_stats`` that :meth:`~mtl.training.lm_module.LMModule.training_step` returns; summed
    over gradient-accumulation micro-batches and over ranks), so the selection
    bias moves load toward balance. Logs ``moe/layer{i}/bias_absmax``.

    Example:
        >>> trainer = pl.Trainer(callbacks=[AuxFreeBiasUpdate()], logger=False, barebones=True)
        >>> [type(c).__name__ for c in trainer.callbacks]
        ['AuxFreeBiasUpdate']
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[int, Tensor] = {}

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not isinstance(outputs, Mapping) or not outputs.get("layer_stats"):
            return
        gates = {
            i: layer.gate
            for i, layer in pl_module.net.moe_layers().items()
            if isinstance(layer.gate, SigmoidBiasGate)
        }
        for i in gates:
            stats = outputs["layer_stats"].get(i)
            if stats is not None:
                counts = stats.tokens_per_expert_E.detach().float()
                self._pending[i] = self._pending[i] + counts if i in self._pending else counts
        if (batch_idx + 1) % max(1, int(trainer.accumulate_grad_batches)) != 0:
            return
        log_now = step_metrics_due(pl_module, batch_idx)
        for i, counts_E in self._pending.items():
            gates[i].update_bias(counts_E)
            if not log_now:
                continue
            pl_module.log(
                f"moe/layer{i}/bias_absmax",
                gates[i].expert_bias_E.abs().max(),
                batch_size=batch[0].shape[0],
            )
        self._pending = {}
