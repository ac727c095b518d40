"""Optimizer and learning-rate schedule factories (config partials), and what modules return."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]
"""``optimizer(params) -> Optimizer``: what a config node with ``_partial_: true`` builds."""
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
"""``scheduler(optimizer) -> LRScheduler``, stepped after every optimizer step."""


def optimizers_with_schedule(
    optimizer: torch.optim.Optimizer, scheduler: SchedulerFactory | None
) -> dict[str, Any]:
    """What ``configure_optimizers`` returns: the optimizer and, if any, its per-step schedule."""
    if scheduler is None:
        return {"optimizer": optimizer}
    schedule = {"scheduler": scheduler(optimizer), "interval": "step"}
    return {"optimizer": optimizer, "lr_scheduler": schedule}


def warmup_cosine(
    optimizer: Optimizer,
    *,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.1,
    total_steps: int | None = None,
) -> LambdaLR:
    """Linear warmup to the optimizer's lr, then cosine decay to ``lr * min_lr_ratio``.

    Step the returned scheduler once per optimizer step.

    Args:
        optimizer: the optimizer whose learning rates are scaled.
        warmup_steps: steps of linear warmup (step ``s`` uses ``(s + 1) / warmup_steps``).
        min_lr_ratio: the factor reached at ``total_steps`` and kept after it.
        total_steps: where the decay ends; None or ``<= warmup_steps``: constant after warmup.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> sched = warmup_cosine(opt, warmup_steps=2, min_lr_ratio=0.1, total_steps=4)
        >>> [round(sched.lr_lambdas[0](s), 3) for s in range(6)]
        [0.5, 1.0, 1.0, 0.55, 0.1, 0.1]
    """

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if not total_steps or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
