"""What every multi-task ranking model returns: :class:`MultiTaskOutput`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from mtl.moe.multi_gate_sparse import RoutedExpertOutputs


def _zero() -> Tensor:
    return torch.zeros((), dtype=torch.float32)


@dataclass
class GateLevel:
    """One gated level below a model's final one, for its diagnostics (PLE, HoME).

    Attributes:
        name: the level's label, e.g. ``"level 1 (meta)"``.
        gate_weights: ``{gate: (B, E)}`` every gate of the level, named by the unit
            it feeds: a task, a category, or ``"__shared__"`` (the shared unit).
        expert_outputs: ``(E, B, H)`` the level's expert outputs, their outputs on
            their routed rows under sparse compute, or None.
        expert_kinds: length ``E``, as :attr:`MultiTaskOutput.expert_kinds`.
        activation: the experts' activation (``"relu"``, ``"swish"``...).

    Example:
        >>> level = GateLevel(name="level 1", gate_weights={"a": torch.ones(2, 1)},
        ...     expert_outputs=None, expert_kinds=["shared"], activation="relu")
        >>> level.name, list(level.gate_weights)
        ('level 1', ['a'])
    """

    name: str
    gate_weights: dict[str, Tensor]
    expert_outputs: Tensor | RoutedExpertOutputs | None
    expert_kinds: list[str]
    activation: str | None = None


@dataclass
class MultiTaskOutput:
    """Predictions and diagnostics of one forward pass of a multi-task model.

    A task appears in ``logits`` or in ``probs``, never in both. The training
    loop applies a loss on logits (BCE-with-logits, MSE for regression) or on
    probabilities (BCE on a clamped probability) accordingly.

    Attributes:
        logits: ``{task: (B,)}`` raw score: a logit for binary tasks, the value
            for regression tasks.
        probs: ``{task: (B,)}`` probabilities of tasks the model predicts as a
            probability directly (ESMM's ``ctcvr = p_ctr * p_cvr``).
        aux_loss: float32 scalar to add to the task losses (0 when none).
        gate_weights: ``{task: (B, E)}`` weights of each task's final-level
            gate over the bank's ``E`` experts (exactly 0 for masked experts);
            empty for models without gates.
        expert_outputs: ``(E, B, H)`` outputs of the final-level experts
            (collapse diagnostics: zero-activation fraction, output scale); under
            sparse compute each expert's outputs on its routed rows
            (:class:`~mtl.moe.multi_gate_sparse.RoutedExpertOutputs`); or None.
        expert_kinds: length ``E``: ``"shared"``, ``"group:<name>"`` or
            ``"task:<name>"`` for each final-level expert.
        expert_load: ``{level: (E_level,)}`` (row, gate) slots each expert of a
            multi-gate level received in this batch, levels numbered from the input.
        expert_activation: the final-level experts' activation (``"relu"``,
            ``"swish"``...); None when unknown. Only ReLU-type experts output exact zeros.
        lower_levels: the gated levels below the final one, from the input up
            (PLE's lower CGC levels, HoME's meta level); empty for one-level models.

    Example:
        >>> out = MultiTaskOutput(logits={"click": torch.zeros(4)})
        >>> out.probabilities()["click"].tolist(), out.aux_loss.item()
        ([0.5, 0.5, 0.5, 0.5], 0.0)
    """

    logits: dict[str, Tensor]
    probs: dict[str, Tensor] = field(default_factory=dict)
    aux_loss: Tensor = field(default_factory=_zero)
    gate_weights: dict[str, Tensor] = field(default_factory=dict)
    expert_outputs: Tensor | RoutedExpertOutputs | None = None
    expert_kinds: list[str] = field(default_factory=list)
    expert_load: dict[int, Tensor] = field(default_factory=dict)
    expert_activation: str | None = None
    lower_levels: list[GateLevel] = field(default_factory=list)

    @property
    def tasks(self) -> list[str]:
        """Names of all predicted outputs: logits first, then probabilities."""
        return [*self.logits, *self.probs]

    def probabilities(self) -> dict[str, Tensor]:
        """``{task: (B,)}`` probability of every output, for binary tasks only.

        Logits go through a sigmoid; direct probabilities are returned as they
        are. Do not use it for regression outputs.
        """
        out = {t: torch.sigmoid(v) for t, v in self.logits.items()}
        out.update(self.probs)
        return out
