"""Routing statistics as logged values: per MoE layer and their mean over layers.

:func:`routing_log_values` names the values (pure, no logger); :func:`log_routing`
hands them to a ``LightningModule``'s ``self.log``. Training values are logged per
step under ``moe/...``; validation values per epoch under ``val/moe/...``, where
the statistics are already those of the whole pass
(:class:`~mtl.training.routing_totals.RoutingTotals`).
"""

from __future__ import annotations

from collections.abc import Mapping

import pytorch_lightning as pl
import torch
from torch import Tensor

from mtl.moe import RoutingStats

__all__ = ["log_routing", "routing_log_values"]


def routing_log_values(stats: Mapping[int, RoutingStats], split: str) -> dict[str, Tensor]:
    """The scalar routing values of ``stats`` under their logger keys.

    Args:
        stats: per MoE layer index, its :class:`~mtl.moe.RoutingStats`.
        split: ``"train"`` (keys ``moe/...``) or another split (``{split}/moe/...``).

    Returns:
        ``moe/layer{i}/{name}`` for every layer and statistic of
        :meth:`~mtl.moe.RoutingStats.as_dict`, then ``moe/{name}``, the mean over layers.

    Example:
        >>> from mtl.moe.routing import RoutingStats
        >>> def stats(load):
        ...     z = torch.tensor(0.0)
        ...     return RoutingStats(tokens_per_expert_E=torch.tensor(load), dropped_slots=z,
        ...                         dropped_tokens=z, valid_slots=torch.tensor(4.0), entropy=z,
        ...                         mean_weight_E=torch.zeros(2), num_tokens=torch.tensor(4.0),
        ...                         experts_per_token=torch.tensor(1.0))
        >>> values = routing_log_values({0: stats([2.0, 2.0]), 1: stats([4.0, 0.0])}, "val")
        >>> [float(values[f"val/moe/{k}load_max_over_mean"]) for k in ("layer0/", "layer1/", "")]
        [1.0, 2.0, 1.5]
    """
    prefix = "moe/" if split == "train" else f"{split}/moe/"
    values: dict[str, Tensor] = {}
    per_name: dict[str, list[Tensor]] = {}
    for i, st in stats.items():
        for name, value in st.as_dict().items():
            values[f"{prefix}layer{i}/{name}"] = value
            per_name.setdefault(name, []).append(value)
    for name, layer_values in per_name.items():
        values[f"{prefix}{name}"] = torch.stack(layer_values).mean()
    return values


def log_routing(
    module: pl.LightningModule, stats: Mapping[int, RoutingStats], split: str, batch_size: int
) -> None:
    """Log :func:`routing_log_values` through ``module.log``: per step for
    ``"train"``, per epoch otherwise.

    Args:
        module: the module whose ``log`` records the values.
        stats: per MoE layer index, its routing statistics (nothing is logged if empty).
        split: ``"train"``, ``"val"``, ...
        batch_size: the batch size Lightning weights epoch means with.
    """
    on_step = split == "train"
    for key, value in routing_log_values(stats, split).items():
        module.log(key, value, on_step=on_step, on_epoch=not on_step, batch_size=batch_size)
