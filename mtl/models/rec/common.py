"""Argument checks and small helpers shared by the ranking models.

Configs come from Hydra, so list and mapping arguments may arrive as
``ListConfig``/``DictConfig``: the converters accept any ``Sequence``/``Mapping``
and return plain Python containers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mtl.moe.expert_bank import ExpertBank
from mtl.moe.losses import aux_losses, check_aux_loss_weights
from mtl.moe.masked_routing import restrict_to_allowed
from mtl.moe.routing import RoutingResult

SHARED_UNIT = "__shared__"
"""Key of the shared (all-task) representation among per-task ones; task and
group names may not start with ``__`` so they cannot collide with it."""


def check_name(kind: str, name: object) -> str:
    """A task or group name usable as an ``nn.ModuleDict`` key."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} names must be non-empty strings, got {name!r}")
    if "." in name or name.startswith("__"):
        raise ValueError(f"{kind} name {name!r} may not contain '.' or start with '__'")
    return name


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """Validated list of task names: non-empty, unique, ModuleDict-safe.

    Example:
        >>> check_tasks(["click", "like"])
        ['click', 'like']
    """
    if isinstance(tasks, str) or not isinstance(tasks, Sequence):
        raise ValueError(f"tasks must be a sequence of task names, got {tasks!r}")
    out = [check_name("task", t) for t in tasks]
    if not out:
        raise ValueError("tasks must name at least one task, got an empty list")
    dup = sorted({t for t in out if out.count(t) > 1})
    if dup:
        raise ValueError(f"task names must be unique; repeated: {dup}")
    return out


def check_dim(name: str, value: object, minimum: int = 1) -> int:
    """An integer hyper-parameter ``>= minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def as_widths(name: str, value: Sequence[int] | int, *, allow_empty: bool = True) -> list[int]:
    """Layer widths as a list of positive ints (a bare int means one layer)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list of positive integers, got {value!r}")
    out = [check_dim(f"{name} entries", v) for v in value]
    if not out and not allow_empty:
        raise ValueError(f"{name} must list at least one width")
    return out


def as_loss_weights(value: Mapping[str, float] | None) -> dict[str, float]:
    """Auxiliary-loss weights as a plain dict (None = no auxiliary loss).

    Every name of :data:`mtl.moe.losses.AUX_LOSSES` is accepted, whatever the
    gates: a model's gates may be swapped after construction (a
    :class:`~mtl.moe.NoisyTopKGate` for ``load_cv``). Names are checked here, at
    construction; whether the routing supports a loss is checked at the first
    forward (``load_cv`` of a gate without a load estimate raises there).
    ``load_balance`` is constant (1.0) for a dense gate, whose every expert is used.

    Example:
        >>> as_loss_weights({"load_cv": 0.1, "importance": 1})
        {'load_cv': 0.1, 'importance': 1.0}
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"aux_loss_weights must map loss names to weights, got {value!r}")
    return check_aux_loss_weights(value)


def gate_aux_loss(
    routings: Sequence[RoutingResult], weights: Mapping[str, float], device: torch.device
) -> Tensor:
    """Mean over gates of the weighted auxiliary losses of each gate.

    Each gate is first restricted to the experts its mask allows, so that the
    balancing losses of a PLE/HoME gate do not count experts it cannot use
    (an importance loss over all ``E`` would otherwise push masked weights,
    which are fixed at 0, toward the mean). The mean (not the sum) keeps the
    weight's meaning independent of the number of tasks.
    """
    total = torch.zeros((), dtype=torch.float32, device=device)
    if not weights or not routings:
        return total
    for r in routings:
        # A masked gate's losses count only the experts it may use (restrict_to_allowed).
        parts = aux_losses(restrict_to_allowed(r), dict(weights))
        for v in parts.values():
            total = total + v.float()
    return total / len(routings)


def representation_bank(
    *,
    num_experts: int,
    dims: Sequence[int],
    activation: str = "relu",
    expert_norm: bool = False,
    dropout: float = 0.0,
) -> ExpertBank:
    """Experts whose output is a representation: every layer activated, biases on.

    ``expert_norm`` adds per-expert batch normalisation before each activation
    (HoME's expert normalisation, usable by MMoE/PLE for ablations); ``dropout``
    drops after every activation, in training.
    """
    return ExpertBank(
        num_experts=num_experts,
        dims=dims,
        activation=activation,  # type: ignore[arg-type]
        bias=True,
        activate_last=True,
        norm="batch" if expert_norm else None,
        dropout=dropout,
    )
