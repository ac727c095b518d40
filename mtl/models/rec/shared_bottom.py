"""Shared-bottom multi-task model (Caruana 1997): one MLP for all tasks, one tower per task."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtl.models.rec.common import as_widths, check_dim, check_tasks
from mtl.models.rec.output import MultiTaskOutput
from mtl.models.rec.towers import TaskTowers, make_mlp


class SharedBottom(nn.Module):
    """Hard parameter sharing: ``logit_t = Tower_t(MLP(x))``.

    The bottom is ``Linear -> ReLU -> Dropout`` per layer; its last layer is
    activated too, exactly like a one-expert MMoE whose expert is
    ``ReLU(Linear(...))``, so MMoE with one expert reduces to this model.

    Args:
        d_in: width of the embedded input.
        tasks: task names, in output order.
        bottom_hidden: widths of the shared MLP (at least one layer).
        tower_hidden: hidden widths of each task tower.
        dropout: dropout after each hidden layer of the bottom and the towers.

    Shapes:
        ``x (B, d_in) ->`` logits ``{task: (B,)}``; no gates, no experts.

    Example:
        >>> model = SharedBottom(d_in=16, tasks=["click", "like"], bottom_hidden=[32], tower_hidden=[8])
        >>> model(torch.randn(4, 16)).logits["like"].shape
        torch.Size([4])
    """

    def __init__(
        self,
        *,
        d_in: int,
        tasks: Sequence[str],
        bottom_hidden: Sequence[int] = (256, 128),
        tower_hidden: Sequence[int] = (64,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.d_in = check_dim("d_in", d_in)
        self.tasks = check_tasks(tasks)
        widths = as_widths("bottom_hidden", bottom_hidden, allow_empty=False)
        self.bottom = make_mlp(d_in, widths, dropout)
        self.towers = TaskTowers(
            tasks=self.tasks, d_in=widths[-1], hidden=tower_hidden, dropout=dropout
        )

    def forward(self, x_BD: Tensor) -> MultiTaskOutput:
        h_BH = self.bottom(x_BD)
        return MultiTaskOutput(
            logits=self.towers(h_BH),
            aux_loss=torch.zeros((), dtype=torch.float32, device=x_BD.device),
        )
