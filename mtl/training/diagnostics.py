"""Expert-health diagnostics for any gated multi-task model (MMoE, PLE, HoME, ...).

HoME (Kuaishou, 2024) names three failure modes of MMoE in production; these
statistics measure them from what every model returns (:class:`MultiTaskOutput`'s
``gate_weights``, ``expert_outputs`` and ``expert_kinds``), so the same numbers can
be compared across architectures:

* utilisation: the mean gate weight each task gives each expert (tasks x experts);
* collapse: per expert, the fraction of (near-)zero activations, and how much the
  experts' output scales differ (coefficient of variation of mean ``|y|``);
* degradation: per shared expert, the number of tasks giving it a meaningful weight
  (above ``1 / E_allowed`` of that task's gate); a shared expert used by at most one
  task has degraded into a task-specific one;
* underfitting: per task, the share of its gate weight on its own ``task:<t>``
  experts (NaN for models without task-specific experts).

Statistics are accumulated batch by batch as a few small tensors on the model's
device (a torchmetrics ``Metric``, so a distributed run reduces them across
processes) and reported as CPU tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torchmetrics import Metric

if TYPE_CHECKING:
    from mtl.models.rec.output import MultiTaskOutput

ZERO_EPS = 1e-6
"""Activations with ``|y| < ZERO_EPS`` count as zero (dead ReLU units)."""


class ExpertDiagnostics:
    """Expert-health statistics over one evaluation pass.

    A plain class, not a dataclass: torchmetrics squeezes the one-element tensors
    of a dataclass that ``Metric.compute`` returns, and a one-expert model would
    lose its expert axis.

    Args:
        tasks: task names, row order of ``utilisation``.
        expert_kinds: ``(E,)`` kinds: ``"shared"``, ``"group:<g>"``, ``"task:<t>"``.
        utilisation: (G, E) mean gate weight of task g on expert e (rows sum to 1).
        allowed: (G, E) bool, experts task g's gate can route to (weight ever > 0).
        zero_frac: (E,) fraction of near-zero activations per expert, or None.
        output_scale: (E,) mean ``|y|`` per expert, or None.
        tasks_using: (E,) number of tasks whose mean weight exceeds ``1 / E_allowed``.
        tasks_allowed: (E,) number of tasks whose gate can reach the expert.
        own_share: ``{task: share of gate weight on its own task:<t> experts}`` (NaN if none).

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

    def __repr__(self) -> str:
        return f"ExpertDiagnostics({self.to_dict()})"

    @property
    def shared_mask(self) -> Tensor:
        """(E,) bool: experts meant to be shared by several tasks (global or group)."""
        shared = [not k.startswith("task:") for k in self.expert_kinds]
        return torch.tensor(shared, dtype=torch.bool) & (self.tasks_allowed >= 2)

    @property
    def degraded(self) -> Tensor:
        """(E,) bool: shared experts used by at most one task (unused ones included)."""
        return self.shared_mask & (self.tasks_using <= 1)

    @property
    def num_degraded_shared(self) -> int:
        return int(self.degraded.sum())

    @property
    def scale_cv(self) -> float:
        """Std / mean of the experts' mean ``|y|``: 0 when all experts have one scale."""
        if self.output_scale is None or self.output_scale.numel() < 2:
            return math.nan
        mean = float(self.output_scale.mean())
        return float(self.output_scale.std(unbiased=False)) / mean if mean > 0 else math.nan

    def scalars(self) -> dict[str, float]:
        """Flat scalars for a logger (keys without the ``val/`` prefix).

        Example keys: ``collapse_zero_frac_max``, ``degraded_shared_experts``,
        ``own_expert_share/<task>``.
        """
        out: dict[str, float] = {}
        if self.zero_frac is not None:
            out["collapse_zero_frac_max"] = float(self.zero_frac.max())
            out["collapse_zero_frac_mean"] = float(self.zero_frac.mean())
            out["expert_scale_cv"] = self.scale_cv
        if self.utilisation.numel():
            out["degraded_shared_experts"] = float(self.num_degraded_shared)
            out["shared_experts"] = float(self.shared_mask.sum())
            for task, share in self.own_share.items():
                if not math.isnan(share):
                    out[f"own_expert_share/{task}"] = share
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (lists and floats; NaN stays NaN)."""

        def lst(t: Tensor | None) -> list[Any] | None:
            return None if t is None else t.tolist()

        return {
            "tasks": list(self.tasks),
            "expert_kinds": list(self.expert_kinds),
            "utilisation": lst(self.utilisation),
            "allowed": lst(self.allowed),
            "zero_frac": lst(self.zero_frac),
            "output_scale": lst(self.output_scale),
            "scale_cv": self.scale_cv,
            "tasks_using": lst(self.tasks_using),
            "tasks_allowed": lst(self.tasks_allowed),
            "shared": lst(self.shared_mask),
            "degraded": lst(self.degraded),
            "num_degraded_shared": self.num_degraded_shared,
            "own_share": dict(self.own_share),
        }


class DiagnosticsAccumulator(Metric):
    """Accumulates :class:`ExpertDiagnostics` over the batches of an evaluation pass.

    A torchmetrics ``Metric`` whose states are sums, counts and a running maximum
    on the module's device, so ``update`` does not sync with the host and a
    distributed run's ``compute`` reduces them over every process. The expert
    count is read from the first batch; in a distributed run every process must
    have seen at least one batch before ``compute``.

    Args:
        tasks: task names (the rows of the utilisation matrix).
        zero_eps: activations below this magnitude count as zero.
        usage_factor: an expert is "used" by task g when its mean weight exceeds
            ``usage_factor / E_allowed(g)``; 1.0 means "more than a uniform share".
        **kwargs: torchmetrics ``Metric`` options (``sync_on_compute``,
            ``process_group``, ...).

    Example:
        >>> from mtl.models.rec.output import MultiTaskOutput
        >>> acc = DiagnosticsAccumulator(tasks=["a"])
        >>> acc.update(MultiTaskOutput(logits={"a": torch.zeros(4)},
        ...     gate_weights={"a": torch.tensor([[1.0, 0.0]]).repeat(4, 1)},
        ...     expert_outputs=torch.stack([torch.ones(4, 3), torch.zeros(4, 3)]),
        ...     expert_kinds=["shared", "shared"]))
        >>> acc.compute().zero_frac.tolist()
        [0.0, 1.0]
    """

    full_state_update = False
    weight_sum_GE: Tensor
    weight_max_GE: Tensor
    rows: Tensor
    zero_count_E: Tensor
    abs_sum_E: Tensor
    elements: Tensor

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
        """The kinds of the last batch that named them."""
        # Empty until the first batch gives E; float64 sums stay exact over long passes.
        self.add_state("weight_sum_GE", torch.zeros(0, dtype=torch.float64), "sum")
        self.add_state("weight_max_GE", torch.zeros(0), "max")
        self.add_state("rows", torch.zeros((), dtype=torch.long), "sum")
        self.add_state("zero_count_E", torch.zeros(0, dtype=torch.long), "sum")
        self.add_state("abs_sum_E", torch.zeros(0, dtype=torch.float64), "sum")
        self.add_state("elements", torch.zeros((), dtype=torch.long), "sum")

    def reset(self) -> None:
        """Forget everything accumulated."""
        super().reset()
        self.expert_kinds = []

    @property
    def has_data(self) -> bool:
        """Whether a batch brought gate weights or expert outputs (no host sync)."""
        return self.weight_sum_GE.numel() > 0 or self.zero_count_E.numel() > 0

    def _accumulate(self, name: str, value: Tensor, combine: Any = torch.add) -> None:
        current = getattr(self, name)
        setattr(self, name, value if current.numel() == 0 else combine(current, value))

    def update(self, output: MultiTaskOutput) -> None:
        """Add one batch's gate weights ``{task: (B, E)}`` and expert outputs ``(E, B, H)``."""
        if output.expert_kinds:
            self.expert_kinds = list(output.expert_kinds)
        gates = output.gate_weights
        gated = [t for t in self.tasks if t in gates]
        if gated:
            some_BE = gates[gated[0]].detach().float()
            # Tasks without a gate (none in practice) keep zero rows.
            w_GBE = torch.stack(
                [
                    gates[t].detach().float() if t in gates else torch.zeros_like(some_BE)
                    for t in self.tasks
                ]
            )
            self._accumulate("weight_sum_GE", w_GBE.sum(1).double())
            self._accumulate("weight_max_GE", w_GBE.amax(1), torch.maximum)
            self.rows += w_GBE.shape[1]
        if output.expert_outputs is not None:
            abs_EN = output.expert_outputs.detach().float().flatten(1).abs()  # N = B * H
            self._accumulate("zero_count_E", (abs_EN < self.zero_eps).sum(1))
            self._accumulate("abs_sum_E", abs_EN.sum(1).double())
            self.elements += abs_EN.shape[1]

    def compute(self) -> ExpertDiagnostics:
        """Statistics over everything seen since the last :meth:`reset`, as CPU tensors."""
        G = len(self.tasks)
        if self.weight_sum_GE.numel():
            util_GE = (self.weight_sum_GE / self.rows.clamp_min(1)).float().cpu()
            allowed_GE = (self.weight_max_GE > 0).cpu()
        else:  # no gates (shared-bottom): empty utilisation
            util_GE = torch.zeros(G, 0)
            allowed_GE = torch.zeros(G, 0, dtype=torch.bool)
        E = util_GE.shape[1] if util_GE.numel() else self.abs_sum_E.numel()
        kinds = self.expert_kinds if len(self.expert_kinds) == E else ["shared"] * E

        n_allowed_G1 = allowed_GE.sum(1, keepdim=True).clamp_min(1).float()
        using_GE = (util_GE > self.usage_factor / n_allowed_G1) & allowed_GE
        own_share: dict[str, float] = {}
        for g, task in enumerate(self.tasks):
            own_E = torch.tensor([k == f"task:{task}" for k in kinds], dtype=torch.bool)
            own_share[task] = (
                float(util_GE[g, own_E].sum()) if own_E.any() and util_GE.numel() else math.nan
            )

        zero_frac_E = scale_E = None
        if self.zero_count_E.numel() and int(self.elements) > 0:
            elements = int(self.elements)
            zero_frac_E = (self.zero_count_E.double() / elements).float().cpu()
            scale_E = (self.abs_sum_E / elements).float().cpu()
        return ExpertDiagnostics(
            tasks=list(self.tasks),
            expert_kinds=list(kinds),
            utilisation=util_GE,
            allowed=allowed_GE,
            zero_frac=zero_frac_E,
            output_scale=scale_E,
            tasks_using=using_GE.sum(0).long(),
            tasks_allowed=allowed_GE.sum(0).long(),
            own_share=own_share,
        )


def mean_diagnostics(diags: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Element-wise mean over runs (seeds) of :meth:`ExpertDiagnostics.to_dict` results.

    Lists are averaged when every run has the same shape (same model config);
    ``tasks_using`` and ``num_degraded_shared`` become fractional means. NaN and
    None entries (e.g. own-expert share of a model without task experts) are skipped.

    Example:
        >>> d = {"tasks": ["a"], "expert_kinds": ["shared"], "utilisation": [[1.0]], "zero_frac": [0.25],
        ...      "output_scale": [1.0], "scale_cv": None, "tasks_using": [1], "shared": [False],
        ...      "num_degraded_shared": 0, "own_share": {"a": None}}
        >>> mean_diagnostics([d, {**d, "zero_frac": [0.75]}])["zero_frac"]
        [0.5]
    """
    if not diags:
        return None

    def mean(values: Sequence[Any]) -> Any:
        values = [v for v in values if v is not None]
        if not values:
            return None
        t = torch.tensor(values, dtype=torch.float64)
        if t.ndim == 1:  # scalars: skip NaN (no value for that run)
            t = t[~t.isnan()]
            return float(t.mean()) if t.numel() else None
        return t.mean(0).tolist()

    def mean_list(key: str) -> Any:
        values = [d.get(key) for d in diags]
        shapes = {len(v) if v is not None else -1 for v in values}
        return mean(values) if len(shapes) == 1 and -1 not in shapes and values[0] else values[0]

    first = diags[0]
    return {
        "tasks": first["tasks"],
        "expert_kinds": first["expert_kinds"],
        "shared": first.get("shared") or [],
        **{k: mean_list(k) for k in ("utilisation", "zero_frac", "output_scale", "tasks_using")},
        "scale_cv": mean([d.get("scale_cv") for d in diags]),
        "num_degraded_shared": mean([float(d["num_degraded_shared"]) for d in diags]),
        "own_share": {t: mean([d["own_share"].get(t) for d in diags]) for t in first["own_share"]},
    }
