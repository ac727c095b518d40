"""One level's expert-health statistics of one run: :class:`ExpertDiagnostics`.

Built by :class:`mtl.training.diagnostics.DiagnosticsAccumulator` (which describes
each statistic); this module holds the result and what is derived from it: the
degraded shared experts, the gate shares by expert kind, the logged scalars and the
JSON form that ``metrics.json`` keeps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

ZERO_EPS = 1e-6
"""Activations with ``|y| < ZERO_EPS`` count as zero (dead ReLU units)."""
RELU_TYPE = frozenset({"relu", "relu6"})
"""Activations whose outputs are exactly zero on half their domain (dead units possible)."""


def zero_fraction_applies(activation: str | None) -> bool:
    """Whether the near-zero fraction measures collapse: ReLU-type, or unknown, experts.

    Example:
        >>> zero_fraction_applies("relu"), zero_fraction_applies("swish"), zero_fraction_applies(None)
        (True, False, True)
    """
    return activation is None or activation.lower() in RELU_TYPE


def seen(values_E: Tensor) -> Tensor:
    """The entries that are not NaN: the experts that computed at least one row.

    Example:
        >>> seen(torch.tensor([0.5, float("nan"), 0.25])).tolist()
        [0.5, 0.25]
    """
    return values_E[~values_E.isnan()]


def share_of(util_E: Tensor, mask: list[bool]) -> float:
    """Sum of ``util_E`` over the experts in ``mask``; NaN when none is.

    Example:
        >>> util_E = torch.tensor([0.5, 0.25, 0.25])
        >>> share_of(util_E, [False, True, True]), share_of(util_E, [False, False, False])
        (0.5, nan)
    """
    m = torch.tensor(mask, dtype=torch.bool)
    return float(util_E[m].sum()) if m.any() and util_E.numel() else math.nan


class ExpertDiagnostics:
    """Expert-health statistics of one gated level over one evaluation pass.

    A plain class, not a dataclass: torchmetrics squeezes the one-element tensors
    of a dataclass that ``Metric.compute`` returns, and a one-expert model would
    lose its expert axis. The final level's object carries the lower levels.

    Args:
        tasks: the level's gates, row order of ``utilisation``: the tasks at the final
            level; tasks, categories and ``"__shared__"`` below it.
        expert_kinds: ``(E,)`` kinds: ``"shared"``, ``"group:<g>"``, ``"task:<t>"``.
        utilisation: (G, E) mean gate weight of gate g on expert e (rows sum to 1).
        allowed: (G, E) bool, experts gate g can route to (weight ever > 0).
        zero_frac: (E,) fraction of near-zero activations per expert; None when the
            experts are not ReLU-type (see :func:`zero_fraction_applies`) or unseen.
            Under sparse compute the per-expert statistics are over the rows each
            expert computed, NaN for an expert that computed none (None in
            :meth:`to_dict`); the summaries skip it.
        output_scale: (E,) mean ``|y|`` per expert, or None.
        tasks_using: (E,) number of consumer gates whose mean weight exceeds ``1 / E_allowed``.
        tasks_allowed: (E,) number of consumer gates that can reach the expert.
        own_share: ``{gate: share of its weight on its own experts}`` (NaN if none).
        out_mean: (E,) mean of each expert's outputs over rows and units, or None.
        out_std: (E,) std of each expert's outputs over rows and units, or None.
        activation: the experts' activation, None when unknown.
        level: the level's label (``""`` for a one-level model).
        lower_levels: the levels below this one, from the input up.

    Example:
        >>> d = ExpertDiagnostics(tasks=["a", "b"], expert_kinds=["shared", "shared"],
        ...     utilisation=torch.tensor([[0.9, 0.1], [0.8, 0.2]]),
        ...     allowed=torch.ones(2, 2, dtype=torch.bool), zero_frac=None, output_scale=None,
        ...     tasks_using=torch.tensor([2, 0]), tasks_allowed=torch.tensor([2, 2]),
        ...     own_share={"a": float("nan"), "b": float("nan")})
        >>> d.degraded.tolist(), d.num_degraded_shared
        ([False, True], 1)
    """

    def __init__(
        self,
        *,
        tasks: list[str],
        expert_kinds: list[str],
        utilisation: Tensor,
        allowed: Tensor,
        zero_frac: Tensor | None,
        output_scale: Tensor | None,
        tasks_using: Tensor,
        tasks_allowed: Tensor,
        own_share: dict[str, float],
        out_mean: Tensor | None = None,
        out_std: Tensor | None = None,
        activation: str | None = None,
        level: str = "",
        lower_levels: Sequence[ExpertDiagnostics] = (),
    ) -> None:
        self.tasks = tasks
        self.expert_kinds = expert_kinds
        self.utilisation = utilisation
        self.allowed = allowed
        self.zero_frac = zero_frac
        self.output_scale = output_scale
        self.tasks_using = tasks_using
        self.tasks_allowed = tasks_allowed
        self.own_share = own_share
        self.out_mean = out_mean
        self.out_std = out_std
        self.activation = activation
        self.level = level
        self.lower_levels = list(lower_levels)

    def __repr__(self) -> str:
        return f"ExpertDiagnostics({self.to_dict()})"

    @property
    def shared_mask(self) -> Tensor:
        """(E,) bool: experts meant to be shared by several consumers (global or group)."""
        shared = [not k.startswith("task:") for k in self.expert_kinds]
        return torch.tensor(shared, dtype=torch.bool) & (self.tasks_allowed >= 2)

    @property
    def degraded(self) -> Tensor:
        """(E,) bool: shared experts used by at most one consumer (unused ones included)."""
        return self.shared_mask & (self.tasks_using <= 1)

    @property
    def num_degraded_shared(self) -> int:
        return int(self.degraded.sum())

    @property
    def scale_cv(self) -> float:
        """Std / mean over experts of their output std: 0 when all share one scale."""
        std = None if self.out_std is None else seen(self.out_std)
        if std is None or std.numel() < 2:
            return math.nan
        mean = float(std.mean())
        return float(std.std(unbiased=False)) / mean if mean > 0 else math.nan

    def kind_shares(self) -> dict[str, dict[str, float]]:
        """``{gate: {"own", "group", "shared"}}``: its weight on its own experts, on
        category experts (its own category's at the final level) and on global ones.

        Example:
            >>> d = ExpertDiagnostics(tasks=["a"], expert_kinds=["shared", "group:g", "task:a"],
            ...     utilisation=torch.tensor([[0.5, 0.2, 0.3]]), allowed=torch.ones(1, 3).bool(),
            ...     zero_frac=None, output_scale=None, tasks_using=torch.tensor([1, 1, 1]),
            ...     tasks_allowed=torch.tensor([1, 1, 1]), own_share={"a": 0.3})
            >>> {k: round(v, 2) for k, v in d.kind_shares()["a"].items()}
            {'own': 0.3, 'group': 0.2, 'shared': 0.5}
        """
        out: dict[str, dict[str, float]] = {}
        for g, gate in enumerate(self.tasks):
            row = self.utilisation[g] if self.utilisation.numel() else torch.zeros(0)
            own = {f"task:{gate}", f"group:{gate}"}
            out[gate] = {
                "own": share_of(row, [k in own for k in self.expert_kinds]),
                "group": share_of(
                    row, [k.startswith("group:") and k not in own for k in self.expert_kinds]
                ),
                "shared": share_of(row, [k == "shared" for k in self.expert_kinds]),
            }
        return out

    def scalars(self) -> dict[str, float]:
        """Flat scalars of the final level for a logger (keys without the ``val/`` prefix).

        Example keys: ``collapse_zero_frac_max`` (ReLU-type experts only),
        ``expert_scale_cv``, ``expert_std_min_max``, ``degraded_shared_experts``,
        ``own_expert_share/<task>``.
        """
        out: dict[str, float] = {}
        zero = None if self.zero_frac is None else seen(self.zero_frac)
        if zero is not None and zero.numel():
            out["collapse_zero_frac_max"] = float(zero.max())
            out["collapse_zero_frac_mean"] = float(zero.mean())
        std = None if self.out_std is None else seen(self.out_std)
        if std is not None and std.numel():
            out["expert_scale_cv"] = self.scale_cv
            top = float(std.max())
            out["expert_std_min_max"] = float(std.min()) / top if top > 0 else math.nan
        if self.utilisation.numel():
            out["degraded_shared_experts"] = float(self.num_degraded_shared)
            out["shared_experts"] = float(self.shared_mask.sum())
            for task, share in self.own_share.items():
                if not math.isnan(share):
                    out[f"own_expert_share/{task}"] = share
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (lists and floats; NaN stays NaN), lower levels nested."""

        def lst(t: Tensor | None) -> list[Any] | None:
            return None if t is None else t.tolist()

        def per_expert(t: Tensor | None) -> list[Any] | None:  # NaN: computed no row
            return None if t is None else [None if math.isnan(v) else v for v in t.tolist()]

        return {
            "level": self.level,
            "activation": self.activation,
            "tasks": list(self.tasks),
            "expert_kinds": list(self.expert_kinds),
            "utilisation": lst(self.utilisation),
            "allowed": lst(self.allowed),
            "zero_frac": per_expert(self.zero_frac),
            "output_scale": per_expert(self.output_scale),
            "out_mean": per_expert(self.out_mean),
            "out_std": per_expert(self.out_std),
            "scale_cv": self.scale_cv,
            "tasks_using": lst(self.tasks_using),
            "tasks_allowed": lst(self.tasks_allowed),
            "shared": lst(self.shared_mask),
            "degraded": lst(self.degraded),
            "num_degraded_shared": self.num_degraded_shared,
            "own_share": dict(self.own_share),
            "kind_shares": self.kind_shares(),
            "lower_levels": [d.to_dict() for d in self.lower_levels],
        }
