"""Several gates over one expert bank: the multi-gate mixture of MMoE, PLE and HoME."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mtl.moe.dispatch import combine_dense_many
from mtl.moe.expert_bank import ExpertBank
from mtl.moe.gates.base import Router
from mtl.moe.gates.dense import DenseSoftmaxGate, _as_mask
from mtl.moe.gates.dynamic import TopPGate
from mtl.moe.gates.sigmoid import SigmoidBiasGate
from mtl.moe.gates.topk import NoisyTopKGate, TopKGate
from mtl.moe.group_counts import count_as_forward, routing_counts
from mtl.moe.masked_routing import EXPERT_MASK
from mtl.moe.multi_gate_sparse import MultiGateDroplessDispatch, RoutedExpertOutputs, is_sparse
from mtl.moe.routing import RoutingResult

GateFactory = Callable[..., nn.Module]
"""A gate constructor taking ``d_model`` and ``num_experts`` (a class or a Hydra partial)."""

# Gates whose choice is a ranking of the logits: masking a logit to a huge negative value
# removes that expert from the choice and gives it weight 0. Expert choice is not among
# them (a masked expert would still take its quota of tokens, with weight 0).
_MASKABLE_BY_LOGITS = (TopKGate, NoisyTopKGate, TopPGate, SigmoidBiasGate)
_MASKED_LOGIT = -1e9  # finite: exp underflows to exactly 0 and log-softmax stays finite


@dataclass
class MultiGateOutput:
    """Result of :class:`MultiGateMixture`.

    Attributes:
        outputs: ``{gate name: (T, D_out)}`` mixed representation per gate.
        routing: ``{gate name: RoutingResult}``.
        expert_outputs_ETD: ``(E, T, D_out)`` every expert's output, for
            diagnostics (dead units, output scale spread); None when the experts
            computed only their routed rows (sparse compute).
        routed_outputs: under sparse compute, each expert's outputs on its routed
            rows (:class:`~mtl.moe.multi_gate_sparse.RoutedExpertOutputs`); else None.

    Example:
        >>> from mtl.moe import DenseSoftmaxGate, ExpertBank
        >>> mix = MultiGateMixture(
        ...     experts=ExpertBank(num_experts=3, dims=[4, 6]),
        ...     gates={"click": DenseSoftmaxGate(d_model=4, num_experts=3)})
        >>> out = mix(torch.randn(5, 4))
        >>> out.outputs["click"].shape, out.expert_outputs_ETD.shape, out.routed_outputs
        (torch.Size([5, 6]), torch.Size([3, 5, 6]), None)
        >>> w_ET1 = out.routing["click"].dense_weights().T.unsqueeze(-1)
        >>> torch.allclose(out.outputs["click"], (out.expert_outputs_ETD * w_ET1).sum(0), atol=1e-6)
        True
    """

    outputs: dict[str, Tensor]
    routing: dict[str, RoutingResult]
    expert_outputs_ETD: Tensor | None
    routed_outputs: RoutedExpertOutputs | None = None

    @property
    def expert_outputs(self) -> Tensor | RoutedExpertOutputs | None:
        """What the experts computed, for the diagnostics: ``(E, T, D_out)`` on every row,
        or their outputs on their routed rows under sparse compute."""
        dense = self.expert_outputs_ETD
        return dense if dense is not None else self.routed_outputs

    def expert_load(self) -> Tensor:
        """``(E,)`` float32 (row, gate) slots each expert received, summed over the gates.

        A dense gate counts every expert it may use for every row, a sparse gate
        its valid slots; detached.
        """
        some = next(iter(self.routing.values()))
        E = some.num_experts
        load_E = torch.zeros(E, dtype=torch.float32, device=some.experts_TK.device)
        for r in self.routing.values():
            if r.dense_TE is not None:  # slot j is expert j: count the valid slots per column
                load_E = load_E + r.valid().sum(0).float()
                continue
            load_E = load_E + routing_counts(r).float()
        return load_E


class MultiGateMixture(nn.Module):
    """Experts computed once, mixed by one gate per task (or per lower-level unit).

    ``h_g = sum_e w_g(x)_e * Expert_e(x)`` for every gate ``g``. MMoE is one
    bank and one :class:`~mtl.moe.gates.DenseSoftmaxGate` per task; PLE/CGC and
    HoME are the same with ``expert_mask`` on each gate restricting it to shared
    + own experts. Experts may receive one input per expert (``(E, T, D)``,
    HoME's feature-gated views, PLE's upper levels) or a shared ``(T, D)``.

    On a shared input the mixture's only linear maps of ``x`` are the experts'
    first layer and the gates' logits: :meth:`input_weight` gives them as one
    matrix and :meth:`forward_projected` continues from ``x @ input_weight()``,
    a seam for callers that compute that product more cheaply than by forming
    ``x`` (:class:`~mtl.models.rec.ranker.Ranker` folds embedding tables into it).

    Sparse gates mean sparse compute: when every gate's routing is sparse (top-k,
    noisy top-k, top-p, expert choice, sigmoid + bias; not the dense softmax gate),
    each expert runs only on the rows some gate chose, once per row however many
    gates chose it (:class:`~mtl.moe.multi_gate_sparse.MultiGateDroplessDispatch`).
    The outputs equal the dense mixture with the same sparse weights. One gate
    module may serve several names, each routing its own ``gate_inputs`` entry
    (:class:`~mtl.models.rec.TaskRoutedMoE`: one gate on per-task conditions). Experts with
    batch norm (``norm="batch"``) normalise over the rows they see, which sparse
    compute would change from the batch to the routed rows: such banks compute
    densely unless ``sparse_compute=True``, which refuses them.

    Args:
        experts: an :class:`~mtl.moe.expert_bank.ExpertBank` or ``ExpertList``.
        gates: ``{name: gate}``; each gate routes over all ``E`` experts.
        sparse_compute: None computes sparsely when every gate is sparse and the
            experts have no batch norm; False always runs every expert on every
            row (the dense A/B reference); True computes sparsely whenever every
            gate is sparse and rejects batch-norm experts.
        sparse_dispatch: the module that computes sparsely (the seam for a faster
            dispatch); default :class:`~mtl.moe.multi_gate_sparse.MultiGateDroplessDispatch`.

    Shapes:
        ``x (T, D) | (E, T, D)``, gate inputs ``(T, D_g)`` -> outputs ``(T, D_out)``.

    Example:
        >>> from mtl.moe import DenseSoftmaxGate, ExpertBank
        >>> mix = MultiGateMixture(
        ...     experts=ExpertBank(num_experts=4, dims=[8, 16], activation="relu", activate_last=True),
        ...     gates={t: DenseSoftmaxGate(d_model=8, num_experts=4) for t in ("click", "like")})
        >>> x = torch.randn(5, 8)
        >>> out = mix(x)
        >>> out.outputs["like"].shape
        torch.Size([5, 16])
        >>> torch.allclose(mix.forward_projected(x @ mix.input_weight()).outputs["like"],
        ...                out.outputs["like"], atol=1e-6)
        True
    """

    def __init__(
        self,
        *,
        experts: nn.Module,
        gates: Mapping[str, nn.Module],
        sparse_compute: bool | None = None,
        sparse_dispatch: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not gates:
            raise ValueError("MultiGateMixture needs at least one gate")
        batch_norm = bool(getattr(experts, "norms", None))
        if sparse_compute and batch_norm:
            raise ValueError(
                "sparse_compute=True cannot run experts with batch norm (expert_norm=true): "
                "each expert would normalise over its routed rows instead of the batch; "
                "set sparse_compute to null/false or expert_norm to false"
            )
        for name, g in gates.items():
            if getattr(g, "num_experts", experts.num_experts) != experts.num_experts:
                raise ValueError(
                    f"gate {name!r} routes to {g.num_experts} experts, bank has {experts.num_experts}"
                )
        self.experts = experts
        self.gates = nn.ModuleDict(dict(gates))
        self._sparse_allowed = sparse_compute is not False and not batch_norm
        self.sparse_dispatch = sparse_dispatch or MultiGateDroplessDispatch()

    def forward(
        self, x: Tensor, gate_inputs: Tensor | Mapping[str, Tensor] | None = None
    ) -> MultiGateOutput:
        """Route with every gate, run the experts (on the routed rows only when sparse), mix.

        Args:
            x: ``(T, D)`` shared expert input or ``(E, T, D)`` one input per expert.
            gate_inputs: one ``(T, D_g)`` tensor for all gates, a dict per gate
                name, or None to gate on ``x`` (which must then be shared).
        """
        routing = {
            name: gate(self._gate_input(name, x, gate_inputs)) for name, gate in self.gates.items()
        }
        if self._sparse_allowed and all(is_sparse(r) for r in routing.values()):
            mixed, computed = self.sparse_dispatch(x, list(routing.values()), self.experts)
            return MultiGateOutput(
                outputs=dict(zip(routing, mixed, strict=True)),
                routing=routing,
                expert_outputs_ETD=None,
                routed_outputs=computed,
            )
        return _mix(self.experts.forward_all(x), routing)

    @staticmethod
    def _gate_input(
        name: str, x: Tensor, gate_inputs: Tensor | Mapping[str, Tensor] | None
    ) -> Tensor:
        if gate_inputs is None:
            if x.dim() != 2:
                raise ValueError("per-expert inputs (E, T, D) need explicit gate_inputs")
            return x
        if isinstance(gate_inputs, Tensor):
            return gate_inputs
        if name not in gate_inputs:
            raise ValueError(f"gate_inputs has no entry for gate {name!r}")
        return gate_inputs[name]

    def supports_projection(self) -> bool:
        """Whether :meth:`input_weight`/:meth:`forward_projected` apply: an
        :class:`~mtl.moe.expert_bank.ExpertBank` and dense softmax gates without input jitter
        (the only gates whose logits are a linear map of ``x``)."""
        return isinstance(self.experts, ExpertBank) and all(
            _projectable(g) for g in self.gates.values()
        )

    def _dense_gates(self) -> list[DenseSoftmaxGate]:
        """The gates, checked to be linear in a shared input (what the projected path needs)."""
        if not isinstance(self.experts, ExpertBank):
            raise TypeError("a projected input needs an ExpertBank")
        gates = list(self.gates.values())
        for g in gates:
            if not _projectable(g):
                raise TypeError("a projected input needs dense softmax gates without input jitter")
        return gates  # type: ignore[return-value]

    def input_weight(self) -> Tensor:
        """``(D, X)``: the experts' first layer, then each gate's ``E`` logit columns."""
        bank: ExpertBank = self.experts  # type: ignore[assignment]
        w_gates = [g.proj.weight.t() for g in self._dense_gates()]
        return torch.cat([bank.first_layer_weight(), *w_gates], dim=1)

    def forward_projected(self, z_TX: Tensor) -> MultiGateOutput:
        """:meth:`forward` of a shared input ``x`` given ``z_TX = x @ input_weight()``.

        Args:
            z_TX: ``(T, X)`` products, float32 (the gate logits are taken from them).
        """
        gates = self._dense_gates()
        bank: ExpertBank = self.experts  # type: ignore[assignment]
        E = bank.num_experts
        n_experts = z_TX.shape[1] - E * len(gates)
        # split, not slicing: each slice's backward would zero-fill a full-size gradient
        z_expert, *z_gates = z_TX.split([n_experts] + [E] * len(gates), dim=1)
        y_ETD = bank.forward_all_projected(z_expert)
        routing = {}
        for (name, gate), z_TE in zip(self.gates.items(), z_gates, strict=True):
            bias = gate.proj.bias
            logits_TE = z_TE.float() if bias is None else z_TE.float() + bias.float()
            # counted as the gate's forward counts: both paths issue the same collectives
            routing[name] = count_as_forward(gate, gate.route(logits_TE))
        return _mix(y_ETD, routing)


def _mix(y_ETD: Tensor, routing: dict[str, RoutingResult]) -> MultiGateOutput:
    """Each gate's weighted sum of the experts' outputs."""
    mixed = combine_dense_many(y_ETD, [r.dense_weights() for r in routing.values()])
    return MultiGateOutput(
        outputs=dict(zip(routing, mixed, strict=True)),
        routing=routing,
        expert_outputs_ETD=y_ETD,
    )


def _projectable(gate: nn.Module) -> bool:
    return isinstance(gate, DenseSoftmaxGate) and gate.input_jitter == 0


class MaskedGate(nn.Module):
    """A ranking gate restricted to a subset of the experts by masking its logits.

    For gates without an ``expert_mask`` argument of their own (top-k, noisy
    top-k, top-p, sigmoid + bias): the logits of disallowed experts are set to
    ``-1e9`` before the gate routes, so they are never chosen and get weight
    and gradient exactly 0, as :class:`~mtl.moe.gates.DenseSoftmaxGate`'s mask does.

    Args:
        gate: the wrapped :class:`~mtl.moe.gates.Router`.
        expert_mask: ``E`` booleans or the indices of the allowed experts.

    Example:
        >>> gate = MaskedGate(gate=TopKGate(d_model=8, num_experts=4, k=1), expert_mask=[0, 2])
        >>> set(gate(torch.randn(16, 8)).experts_TK.flatten().tolist()) <= {0, 2}
        True
    """

    def __init__(
        self, *, gate: Router, expert_mask: Sequence[bool] | Sequence[int] | Tensor
    ) -> None:
        super().__init__()
        if not isinstance(gate, _MASKABLE_BY_LOGITS):
            raise ValueError(
                f"{type(gate).__name__} cannot be restricted to some experts; gates that can: "
                f"DenseSoftmaxGate, {', '.join(c.__name__ for c in _MASKABLE_BY_LOGITS)}"
            )
        self.gate = gate
        self.num_experts = gate.num_experts
        self.register_buffer(
            "expert_mask_E", _as_mask(expert_mask, gate.num_experts), persistent=False
        )

    def forward(self, x_TD: Tensor) -> RoutingResult:
        """Route ``(T, D)`` tokens over the allowed experts only."""
        x_TD = x_TD.reshape(-1, x_TD.shape[-1])
        logits_TE = self.gate.logits(x_TD).masked_fill(~self.expert_mask_E, _MASKED_LOGIT)
        routing = self.gate.route(logits_TE, x_TD)
        # the mask travels with the decision: balancing losses count the allowed experts only
        routing.extras[EXPERT_MASK] = self.expert_mask_E
        return routing


def make_gate(
    factory: GateFactory,
    *,
    d_model: int,
    num_experts: int,
    expert_mask: Sequence[int] | None = None,
    name: str = "gate",
    **options: Any,
) -> nn.Module:
    """Build one gate of a multi-gate model from its factory, restricted to ``expert_mask``.

    A gate that takes ``expert_mask`` itself (:class:`~mtl.moe.gates.DenseSoftmaxGate`)
    gets it; a ranking gate (top-k, noisy top-k, top-p, sigmoid + bias) is wrapped
    in :class:`MaskedGate`; any other gate with a mask is refused.

    Args:
        factory: builds the gate from ``d_model=``, ``num_experts=`` (and ``options``).
        d_model: the gate input width.
        num_experts: ``E``.
        expert_mask: indices of the experts this gate may use; None = all.
        name: the gate's name in error messages (``"gate 'click'"``).
        options: further keyword arguments, which the factory must accept
            (``temperature``, ``logit_norm`` of a dense gate).

    Raises:
        ValueError: the factory rejects an option, the gate cannot be masked, or its
            ``k`` exceeds the experts it may use.

    Example:
        >>> gate = make_gate(functools.partial(TopKGate, k=2), d_model=8, num_experts=4,
        ...                  expert_mask=[0, 1, 3])
        >>> type(gate).__name__, type(gate.gate).__name__
        ('MaskedGate', 'TopKGate')
    """
    accepted = _keyword_arguments(factory)
    unknown = sorted(k for k in options if accepted is not None and k not in accepted)
    if unknown:
        raise ValueError(
            f"{name}: {_factory_name(factory)} takes no {', '.join(unknown)} "
            "(set on the model for the dense softmax gate only)"
        )
    masked = expert_mask is not None and len(expert_mask) < num_experts
    native = accepted is None or "expert_mask" in accepted
    kwargs = {"d_model": d_model, "num_experts": num_experts, **options}
    if masked and native:
        kwargs["expert_mask"] = list(expert_mask)  # type: ignore[arg-type]
    gate = factory(**kwargs)
    if not masked:
        return gate
    n_allowed = len(expert_mask)  # type: ignore[arg-type]
    k = getattr(gate, "k", None)
    if isinstance(k, int) and k > n_allowed:
        raise ValueError(f"{name} chooses k={k} experts but may use only {n_allowed}")
    if native:
        return gate
    if not isinstance(gate, _MASKABLE_BY_LOGITS):
        raise ValueError(
            f"{name} must be restricted to {n_allowed} of {num_experts} experts, which "
            f"{type(gate).__name__} cannot do; use dense_softmax, top_k, noisy_top_k, top_p "
            "or sigmoid_bias (or turn the model's expert mask off)"
        )
    return MaskedGate(gate=gate, expert_mask=list(expert_mask))  # type: ignore[arg-type]


def _keyword_arguments(factory: GateFactory) -> set[str] | None:
    """The keyword arguments ``factory`` accepts; None when it takes ``**kwargs``."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def _factory_name(factory: GateFactory) -> str:
    inner = factory.func if isinstance(factory, functools.partial) else factory
    return getattr(inner, "__name__", type(inner).__name__)
