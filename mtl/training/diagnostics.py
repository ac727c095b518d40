"""Expert-health diagnostics for any gated multi-task model (MMoE, PLE, HoME, ...).

HoME (Kuaishou, 2024) names three failure modes of MMoE in production; these
statistics measure them from what every model returns (:class:`MultiTaskOutput`'s
``gate_weights``, ``expert_outputs``, ``expert_kinds``, ``expert_activation`` and, for
multi-level models, ``lower_levels``), level by level, so the same numbers can be
compared across architectures:

* utilisation: the mean gate weight each gate gives each expert (gates x experts);
* collapse (HoME's definition): the distribution of each expert's output, its mean
  ``out_mean`` and std ``out_std`` over rows and units, and how much they differ between
  experts; plus, for ReLU-type experts only, the fraction of (near-)zero activations
  (a Swish or GELU expert is never exactly zero, so the fraction says nothing there).
  Under sparse compute an expert computes only its routed rows
  (:class:`~mtl.moe.multi_gate_sparse.RoutedExpertOutputs`), and its statistics are
  over those rows;
* degradation: per shared expert, the number of consumer gates (tasks, or categories
  at HoME's meta level; not the gate of PLE's shared unit) giving it a meaningful
  weight (above ``1 / E_allowed`` of that gate); a shared expert used by at most one
  has degraded into a task-specific one;
* underfitting: per gate, the share of its weight on its own experts (``task:<t>`` for
  task ``t``, ``group:<c>`` for category ``c``), on its category's and on the global
  shared ones.

Statistics are accumulated batch by batch as a few small tensors on the model's
device (a torchmetrics ``Metric``, so a distributed run reduces them across
processes) and reported as CPU tensors. Everything here is one run (one seed):
:mod:`mtl.training.diagnostics_summary` combines seeds without matching experts by
index, since experts are interchangeable between seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torchmetrics import Metric

from mtl.models.rec.common import SHARED_UNIT
from mtl.moe.multi_gate_sparse import RoutedExpertOutputs
from mtl.training.expert_diagnostics import (
    RELU_TYPE,
    ZERO_EPS,
    ExpertDiagnostics,
    share_of,
    zero_fraction_applies,
)

__all__ = [
    "RELU_TYPE",
    "ZERO_EPS",
    "DiagnosticsAccumulator",
    "ExpertDiagnostics",
    "zero_fraction_applies",
]

if TYPE_CHECKING:
    from mtl.models.rec.output import MultiTaskOutput


class _Level:
    """Where one level's gates and experts sit in the accumulator's concatenated states."""

    def __init__(
        self, name: str, gates: list[str], kinds: list[str], activation: str | None
    ) -> None:
        self.name, self.gates, self.kinds, self.activation = name, gates, kinds, activation
        self.row0 = self.col0 = 0

    @property
    def rows(self) -> slice:
        return slice(self.row0, self.row0 + len(self.gates))

    @property
    def cols(self) -> slice:
        return slice(self.col0, self.col0 + len(self.kinds))


def _num_experts(experts: Tensor | RoutedExpertOutputs) -> int:
    return experts.num_experts if isinstance(experts, RoutedExpertOutputs) else experts.shape[0]


class DiagnosticsAccumulator(Metric):
    """Accumulates :class:`ExpertDiagnostics` over the batches of an evaluation pass.

    A torchmetrics ``Metric`` whose states are sums, counts and a running maximum
    on the module's device, so ``update`` does not sync with the host and a
    distributed run's ``compute`` reduces them over every process. Every level's
    gates and experts are concatenated into one (gates x experts) block-diagonal
    state; the layout is read from the first batch, and in a distributed run every
    process must have seen at least one batch before ``compute``.

    Args:
        tasks: task names (the rows of the final level's utilisation).
        zero_eps: activations below this magnitude count as zero.
        usage_factor: an expert is "used" by gate g when its mean weight exceeds
            ``usage_factor / E_allowed(g)``; 1.0 means "more than a uniform share".
        **kwargs: torchmetrics ``Metric`` options (``sync_on_compute``,
            ``process_group``, ...).

    Example:
        >>> from mtl.models.rec.output import MultiTaskOutput
        >>> acc = DiagnosticsAccumulator(tasks=["a"])
        >>> acc.update(MultiTaskOutput(logits={"a": torch.zeros(4)},
        ...     gate_weights={"a": torch.tensor([[1.0, 0.0]]).repeat(4, 1)},
        ...     expert_outputs=torch.stack([torch.ones(4, 3), torch.zeros(4, 3)]),
        ...     expert_kinds=["shared", "shared"], expert_activation="relu"))
        >>> acc.compute().zero_frac.tolist()
        [0.0, 1.0]
    """

    full_state_update = False
    weight_sum_GE: Tensor
    weight_max_GE: Tensor
    rows: Tensor
    zero_count_E: Tensor
    abs_sum_E: Tensor
    sum_E: Tensor
    sumsq_E: Tensor
    elements_E: Tensor

    def __init__(
        self,
        *,
        tasks: Sequence[str],
        zero_eps: float = ZERO_EPS,
        usage_factor: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.zero_eps = zero_eps
        self.usage_factor = usage_factor
        self.expert_kinds: list[str] = []
        """The final level's kinds, from the last batch that named them."""
        self.levels: list[_Level] = []
        """The layout of the states, from the first batch (final level last)."""
        # Empty until the first batch gives the layout; float64 sums stay exact over long passes.
        self.add_state("weight_sum_GE", torch.zeros(0, dtype=torch.float64), "sum")
        self.add_state("weight_max_GE", torch.zeros(0), "max")
        self.add_state("rows", torch.zeros((), dtype=torch.long), "sum")
        self.add_state("zero_count_E", torch.zeros(0, dtype=torch.long), "sum")
        self.add_state("abs_sum_E", torch.zeros(0, dtype=torch.float64), "sum")
        self.add_state("sum_E", torch.zeros(0, dtype=torch.float64), "sum")
        self.add_state("sumsq_E", torch.zeros(0, dtype=torch.float64), "sum")
        self.add_state("elements_E", torch.zeros(0, dtype=torch.long), "sum")

    def reset(self) -> None:
        """Forget everything accumulated."""
        super().reset()
        self.expert_kinds = []
        self.levels = []

    @property
    def has_data(self) -> bool:
        """Whether a batch brought gate weights or expert outputs (no host sync)."""
        return self.weight_sum_GE.numel() > 0 or self.elements_E.numel() > 0

    def _layout(self, output: MultiTaskOutput) -> list[tuple[_Level, dict[str, Tensor], Any]]:
        """Each level with its gate weights and expert outputs; the layout on first sight."""
        parts = [
            (lv.name, lv.gate_weights, lv.expert_outputs, lv.expert_kinds, lv.activation)
            for lv in getattr(output, "lower_levels", ())
        ]
        top_gates = {t: output.gate_weights[t] for t in self.tasks if t in output.gate_weights}
        top_name = f"level {len(parts) + 1} of {len(parts) + 1} (top)" if parts else ""
        activation = getattr(output, "expert_activation", None)
        parts.append((top_name, top_gates, output.expert_outputs, output.expert_kinds, activation))
        if not self.levels:
            row = col = 0
            for name, gates, experts, kinds, act in parts:
                E = 0 if experts is None else _num_experts(experts)
                E = next(iter(gates.values())).shape[1] if gates else E
                level = _Level(name, list(gates), list(kinds) if len(kinds) == E else [], act)
                level.kinds = level.kinds or ["shared"] * E
                level.row0, level.col0 = row, col
                row, col = row + len(level.gates), col + E
                self.levels.append(level)
        return [(lv, p[1], p[2]) for lv, p in zip(self.levels, parts, strict=True)]

    def update(self, output: MultiTaskOutput) -> None:
        """Add one batch: every level's gate weights ``{gate: (B, E)}`` and outputs ``(E, B, H)``."""
        if output.expert_kinds:
            self.expert_kinds = list(output.expert_kinds)
        levels = self._layout(output)
        G = sum(len(lv.gates) for lv, _, _ in levels)
        E = sum(len(lv.kinds) for lv, _, _ in levels)
        if G:
            some = next(w for _, gates, _ in levels for w in gates.values())
            B, device = some.shape[0], some.device
            sum_GE = torch.zeros(G, E, dtype=torch.float64, device=device)
            max_GE = torch.zeros(G, E, device=device)
            for lv, gates, _ in levels:
                if not lv.gates:
                    continue
                w_GBE = torch.stack([gates[g].detach().float() for g in lv.gates])
                sum_GE[lv.rows, lv.cols] = w_GBE.sum(1).double()
                max_GE[lv.rows, lv.cols] = w_GBE.amax(1)
            self.weight_sum_GE = (
                sum_GE if self.weight_sum_GE.numel() == 0 else self.weight_sum_GE + sum_GE
            )
            self.weight_max_GE = (
                max_GE
                if self.weight_max_GE.numel() == 0
                else torch.maximum(self.weight_max_GE, max_GE)
            )
            self.rows += B
        if E and any(y is not None for _, _, y in levels):
            some_y = next(y for _, _, y in levels if y is not None)
            device = (
                some_y.outputs_ND if isinstance(some_y, RoutedExpertOutputs) else some_y
            ).device
            stats = torch.zeros(5, E, dtype=torch.float64, device=device)
            for lv, _, y_EBH in levels:
                if isinstance(y_EBH, RoutedExpertOutputs):
                    stats[:, lv.cols] = self._routed_stats(y_EBH)
                    continue
                if y_EBH is None:
                    continue
                y_EN = y_EBH.detach().float().flatten(1)  # N = B * H
                stats[0, lv.cols] = (y_EN.abs() < self.zero_eps).sum(1).double()
                stats[1, lv.cols] = y_EN.abs().sum(1).double()
                stats[2, lv.cols] = y_EN.sum(1).double()
                stats[3, lv.cols] = y_EN.double().square().sum(1)
                stats[4, lv.cols] = float(y_EN.shape[1])
            for i, name in enumerate(
                ("zero_count_E", "abs_sum_E", "sum_E", "sumsq_E", "elements_E")
            ):
                value = stats[i].long() if name in ("zero_count_E", "elements_E") else stats[i]
                current = getattr(self, name)
                setattr(self, name, value if current.numel() == 0 else current + value)

    def _routed_stats(self, y: RoutedExpertOutputs) -> Tensor:
        """``(5, E)`` float64 zero count, ``|y|`` sum, sum, sum of squares and element
        count of each expert's outputs over the rows it computed (sparse compute)."""
        y_NH = y.outputs_ND.detach().float()
        per_row_5N = torch.stack(
            [
                (y_NH.abs() < self.zero_eps).sum(1).double(),
                y_NH.abs().sum(1).double(),
                y_NH.sum(1).double(),
                y_NH.double().square().sum(1),
            ]
        )
        stats = torch.zeros(5, y.num_experts, dtype=torch.float64, device=y_NH.device)
        stats[:4].index_add_(1, y.experts_N(), per_row_5N)
        stats[4] = y.counts_E.double() * y_NH.shape[1]
        return stats

    def compute(self) -> ExpertDiagnostics:
        """Statistics over everything seen since the last :meth:`reset`, as CPU tensors."""
        levels = self.levels or [_Level("", [t for t in self.tasks], [], None)]
        if not self.levels:  # nothing seen
            levels[0].gates = []
        diags = [self._level(lv) for lv in levels]
        top = diags[-1]
        top.lower_levels = diags[:-1]
        return top

    def _level(self, lv: _Level) -> ExpertDiagnostics:
        final = lv is (self.levels[-1] if self.levels else lv)
        gates = list(self.tasks) if final else lv.gates
        E = len(lv.kinds)
        util_GE = torch.zeros(len(gates), E)
        allowed_GE = torch.zeros(len(gates), E, dtype=torch.bool)
        if self.weight_sum_GE.numel() and lv.gates:
            block = (self.weight_sum_GE[lv.rows, lv.cols] / self.rows.clamp_min(1)).float().cpu()
            seen = (self.weight_max_GE[lv.rows, lv.cols] > 0).cpu()
            for i, g in enumerate(lv.gates):  # tasks without a gate keep zero rows
                j = gates.index(g)
                util_GE[j], allowed_GE[j] = block[i], seen[i]
        if not lv.gates:  # no gates (shared-bottom): empty utilisation
            util_GE = torch.zeros(len(gates), 0)
            allowed_GE = torch.zeros(len(gates), 0, dtype=torch.bool)
            E = 0 if not self.elements_E.numel() else E
        n_allowed_G1 = allowed_GE.sum(1, keepdim=True).clamp_min(1).float()
        using_GE = (util_GE > self.usage_factor / n_allowed_G1) & allowed_GE
        # The shared unit's gate (PLE, HoME's meta level) feeds no task: not a consumer.
        consumer_G1 = torch.tensor([g != SHARED_UNIT for g in gates], dtype=torch.bool)[:, None]
        own_share: dict[str, float] = {}
        for g, gate in enumerate(gates):
            own = {f"task:{gate}", f"group:{gate}"} if not final else {f"task:{gate}"}
            own_share[gate] = share_of(util_GE[g], [k in own for k in lv.kinds]) if E else math.nan

        zero_frac_E = scale_E = mean_E = std_E = None
        if self.elements_E.numel() and E:
            n_E = self.elements_E[lv.cols].double()
            # under sparse compute an expert no gate chose computed nothing: NaN, not 0
            unseen_E = (n_E == 0).cpu()
            if not bool(unseen_E.all()):
                n_E = n_E.clamp_min(1.0)

                def per_expert(v_E: Tensor) -> Tensor:
                    return v_E.float().cpu().masked_fill(unseen_E, math.nan)

                scale_E = per_expert(self.abs_sum_E[lv.cols] / n_E)
                mean = self.sum_E[lv.cols] / n_E
                var = (self.sumsq_E[lv.cols] / n_E - mean.square()).clamp_min(0.0)
                mean_E, std_E = per_expert(mean), per_expert(var.sqrt())
                if zero_fraction_applies(lv.activation):
                    zero_frac_E = per_expert(self.zero_count_E[lv.cols].double() / n_E)
        return ExpertDiagnostics(
            tasks=gates,
            expert_kinds=list(lv.kinds) if E else [],
            utilisation=util_GE,
            allowed=allowed_GE,
            zero_frac=zero_frac_E,
            output_scale=scale_E,
            tasks_using=(using_GE & consumer_G1).sum(0).long(),
            tasks_allowed=(allowed_GE & consumer_G1).sum(0).long(),
            own_share=own_share,
            out_mean=mean_E,
            out_std=std_E,
            activation=lv.activation,
            level=lv.name,
        )
