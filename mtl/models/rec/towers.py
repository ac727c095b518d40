"""MLP blocks of the ranking models: bottoms and per-task prediction towers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from mtl.models.rec.common import as_widths, check_dim, check_tasks


def make_mlp(d_in: int, hidden: Sequence[int], dropout: float = 0.0, norm: bool = False) -> MLP:
    """``Linear -> [BatchNorm] -> ReLU -> Dropout`` per width in ``hidden``, every layer activated.

    With empty ``hidden`` it is the identity. Output width ``hidden[-1]`` (or ``d_in``).
    ``norm`` adds batch norm before each activation (the MLP of torch-rechub and
    DeepCTR).

    Example:
        >>> import torch
        >>> make_mlp(8, [16, 4])(torch.randn(3, 8)).shape
        torch.Size([3, 4])
    """
    return MLP(d_in=d_in, hidden=hidden, dropout=dropout, norm=norm)


class MLP(nn.Sequential):
    """``Linear -> [BatchNorm] -> ReLU -> [Dropout]`` blocks, one per hidden width.

    An ``nn.Sequential`` of exactly those modules (state-dict keys
    ``0.weight``, ``1.running_mean``, ...).

    Args:
        d_in: input width.
        hidden: hidden widths (empty: the identity).
        dropout: dropout after each activation.
        norm: batch norm before each activation.

    Shapes:
        ``(B, d_in) -> (B, hidden[-1])``.

    Example:
        >>> import torch
        >>> mlp = MLP(d_in=8, hidden=[16], dropout=0.1, norm=True)
        >>> [type(m).__name__ for m in mlp]
        ['Linear', 'BatchNorm1d', 'ReLU', 'Dropout']
    """

    def __init__(
        self, *, d_in: int, hidden: Sequence[int], dropout: float = 0.0, norm: bool = False
    ) -> None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        width = d_in
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        super().__init__(*layers)


class Tower(nn.Module):
    """A task's prediction head: an MLP followed by a linear layer to one score.

    Args:
        d_in: width of the task representation.
        hidden: hidden widths of the MLP (empty: a linear head).
        dropout: dropout after each hidden layer.
        norm: batch norm before each hidden activation.

    Shapes:
        ``(B, d_in) -> (B,)``.

    Example:
        >>> import torch
        >>> tower = Tower(d_in=16, hidden=[8], dropout=0.1)
        >>> tower(torch.randn(5, 16)).shape
        torch.Size([5])
    """

    def __init__(
        self, *, d_in: int, hidden: Sequence[int] = (), dropout: float = 0.0, norm: bool = False
    ) -> None:
        super().__init__()
        check_dim("d_in", d_in)
        widths = as_widths("tower_hidden", hidden)
        self.mlp = make_mlp(d_in, widths, dropout, norm)
        self.head = nn.Linear(widths[-1] if widths else d_in, 1)

    def forward(self, x_BD: Tensor) -> Tensor:
        return self.head(self.mlp(x_BD)).squeeze(-1)


class TaskTowers(nn.Module):
    """One :class:`Tower` per task, all of the same shape.

    Args:
        tasks: task names, in output order.
        d_in: width of each task's representation.
        hidden: tower hidden widths.
        dropout: tower dropout.
        norm: batch norm before each hidden activation of every tower.

    Shapes:
        ``{task: (B, d_in)}`` or one shared ``(B, d_in)`` -> ``{task: (B,)}``.

    Example:
        >>> import torch
        >>> towers = TaskTowers(tasks=["click", "like"], d_in=8, hidden=[4])
        >>> sorted(towers(torch.randn(3, 8)))
        ['click', 'like']
    """

    def __init__(
        self,
        *,
        tasks: Sequence[str],
        d_in: int,
        hidden: Sequence[int] = (),
        dropout: float = 0.0,
        norm: bool = False,
    ) -> None:
        super().__init__()
        self.tasks = check_tasks(tasks)
        self.towers = nn.ModuleDict(
            {t: Tower(d_in=d_in, hidden=hidden, dropout=dropout, norm=norm) for t in self.tasks}
        )

    def forward(self, reps: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
        if isinstance(reps, Tensor):
            return {t: self.towers[t](reps) for t in self.tasks}
        return {t: self.towers[t](reps[t]) for t in self.tasks}
