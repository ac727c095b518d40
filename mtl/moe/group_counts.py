"""Routing counts summed over a process group, for auxiliary losses of the group's tokens together.

When ``R`` ranks each route their own tokens and their losses are averaged (data
parallelism, expert parallelism), the per-token statistics an auxiliary loss
needs can be shared so that the mean of the ranks' losses is the loss of the
global batch, exactly, whatever each rank's number of tokens (none included):

* ``group_counts_E`` (``(E,)`` int64): valid (token, slot) assignments per
  expert, summed over the group: the load-balance loss's ``f``;
* ``group_tokens`` (int64 scalar): the group's number of tokens ``T_g``;
* ``group_ranks`` (int64 scalar): ``R``.

A rank's share of a per-token mean is then ``R / T_g * sum_t x_t`` (its tokens'
sum; 0 without tokens), which averages over the ranks to ``sum_all x / T_g``
(:mod:`mtl.moe.losses`). They live in :attr:`~mtl.moe.RoutingResult.extras`.
The counts carry no gradient (the loss's ``f`` is detached), so one
``all_reduce`` of ``E + 1`` integers per layer suffices.

Who fills them: :class:`~mtl.moe.ExpertParallelDispatch` (its count group) and,
without expert parallelism, :func:`count_routing_over` (a hook on each gate of the
MoE layers and multi-gate mixtures). Consumers that restrict a routing to some
experts keep the group's entries with :func:`restricted_group_extras`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mtl.moe.expert_exchange import GroupLike, resolve_group
from mtl.moe.routing import RoutingResult, bin_counts

GROUP_COUNTS = "group_counts_E"
GROUP_TOKENS = "group_tokens"
GROUP_RANKS = "group_ranks"


def routing_counts(routing: RoutingResult) -> Tensor:
    """``(E,)`` int64 valid (token, slot) assignments per expert of one routing."""
    E = routing.num_experts
    ids = routing.experts_TK
    if routing.valid_TK is not None:
        ids = ids.masked_fill(~routing.valid_TK, E)  # invalid slots to a sentinel bin
    return bin_counts(ids, E + 1)[:E]


@torch.compiler.disable
def count_over_group(routing: RoutingResult, counts_E: Tensor, group: GroupLike = None) -> None:
    """Sum ``counts_E`` and the token count over ``group`` into ``routing.extras`` (collective).

    Args:
        routing: this rank's routing; its ``extras`` receive the three entries.
        counts_E: ``(E,)`` this rank's valid assignments per expert.
        group: the ranks whose losses are averaged; None: the world.
    """
    pg = resolve_group(group)
    T = torch.full((1,), routing.num_tokens, dtype=torch.int64, device=counts_E.device)
    summed = torch.cat([counts_E.detach().to(torch.int64), T])
    dist.all_reduce(summed, group=pg)
    routing.extras[GROUP_COUNTS] = summed[:-1]
    routing.extras[GROUP_TOKENS] = summed[-1]
    routing.extras[GROUP_RANKS] = torch.tensor(pg.size(), dtype=torch.int64)


class _CountOverGroup:
    """Forward hook of a gate: count its routing over ``group`` while training."""

    def __init__(self, group: GroupLike) -> None:
        self.group = group

    def __call__(self, gate: nn.Module, args: tuple, routing: RoutingResult) -> None:
        # Only where the losses train: evaluation and sampling may run on some ranks only
        # (rank 0 generates), and a collective there would wait forever.
        if gate.training and torch.is_grad_enabled():
            count_over_group(routing, routing_counts(routing), self.group)


def count_as_forward(gate: nn.Module, routing: RoutingResult) -> RoutingResult:
    """Apply ``gate``'s counting hook (if any) to a routing it made outside its ``forward``.

    For a caller that computes a gate's logits itself and calls its ``route``
    (:meth:`~mtl.moe.MultiGateMixture.forward_projected`): the routing is counted
    exactly as the gate's forward would count it, so that every path through a
    model issues the same collectives.
    """
    for hook in list(gate._forward_hooks.values()):
        if isinstance(hook, _CountOverGroup):
            hook(gate, (), routing)
    return routing


def restricted_group_extras(routing: RoutingResult, keep_E: Tensor) -> dict[str, Tensor]:
    """The group entries of ``routing.extras`` for its restriction to the experts ``keep_E``.

    Args:
        routing: a routing counted over a group (or not: then ``{}``).
        keep_E: ``(E,)`` bool, the experts the restricted routing keeps (in order).

    Returns:
        ``{GROUP_COUNTS: (E_kept,), GROUP_TOKENS, GROUP_RANKS}``, or ``{}``.

    Example:
        >>> from mtl.moe import TopKGate
        >>> r = TopKGate(d_model=4, num_experts=3, k=1)(torch.randn(5, 4))
        >>> r.extras.update({GROUP_COUNTS: torch.tensor([4, 0, 6]),
        ...                  GROUP_TOKENS: torch.tensor(10), GROUP_RANKS: torch.tensor(2)})
        >>> restricted_group_extras(r, torch.tensor([True, False, True]))[GROUP_COUNTS].tolist()
        [4, 6]
    """
    if GROUP_COUNTS not in routing.extras:
        return {}
    return {
        GROUP_COUNTS: routing.extras[GROUP_COUNTS][keep_E],
        GROUP_TOKENS: routing.extras[GROUP_TOKENS],
        GROUP_RANKS: routing.extras[GROUP_RANKS],
    }


def _gates_of(net: nn.Module) -> list[nn.Module]:
    """The gates to count: of each non-expert-parallel MoE layer and each multi-gate mixture."""
    from mtl.moe.expert_parallel import ExpertParallelDispatch
    from mtl.moe.layer import MoELayer
    from mtl.moe.multi_gate import MultiGateMixture

    gates: list[nn.Module] = []
    for module in net.modules():
        if isinstance(module, MoELayer) and not isinstance(module.dispatch, ExpertParallelDispatch):
            gates.append(module.gate)
        elif isinstance(module, MultiGateMixture):
            gates.extend(module.gates.values())
    return gates


def count_routing_over(net: nn.Module, group: GroupLike = None) -> list[RemovableHandle]:
    """Make the gates of ``net``'s MoE layers and multi-gate mixtures count over ``group``.

    A forward hook on each gate of every non-expert-parallel
    :class:`~mtl.moe.MoELayer` and every :class:`~mtl.moe.MultiGateMixture`
    (the rankers' gates) sums the routing's counts over the
    group (:func:`count_over_group`) in training forwards (``gate.training``
    and gradients enabled), so that under data parallelism the ranks'
    auxiliary losses average to the single-process loss of the global batch
    (and DDP's mean of the gradients is its gradient). Layers with
    :class:`~mtl.moe.ExpertParallelDispatch` already count over their own group
    and gates already hooked are left alone; a gate that routes several times
    per forward (one gate under several names) counts each routing.
    Collective: in training, every rank must run every gate in the same order.

    Returns:
        the new hooks' handles (``handle.remove()`` undoes it).

    Example:
        >>> import torch.distributed as dist
        >>> from mtl.moe import DroplessDispatch, MoELayer, SwiGLUExperts, TopKGate
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> layer = MoELayer(gate=TopKGate(d_model=4, num_experts=4, k=2),
        ...                  experts=SwiGLUExperts(num_experts=4, d_model=4, d_hidden=8),
        ...                  dispatch=DroplessDispatch(), aux_loss_weights={"load_balance": 0.01})
        >>> handles = count_routing_over(layer)
        >>> r = layer(torch.randn(3, 4)).routing
        >>> int(r.extras[GROUP_TOKENS]), int(r.extras[GROUP_RANKS]), int(r.extras[GROUP_COUNTS].sum())
        (3, 1, 6)
        >>> count_routing_over(layer)  # already counted
        []
        >>> from mtl.moe import ExpertBank, MultiGateMixture
        >>> mix = MultiGateMixture(experts=ExpertBank(num_experts=4, dims=[4, 8]),
        ...     gates={t: TopKGate(d_model=4, num_experts=4, k=1) for t in ("click", "like")})
        >>> len(count_routing_over(mix))  # one hook per gate
        2
        >>> int(mix(torch.randn(5, 4)).routing["like"].extras[GROUP_COUNTS].sum())
        5
        >>> dist.destroy_process_group()
    """
    handles = []
    for gate in _gates_of(net):
        if any(isinstance(h, _CountOverGroup) for h in gate._forward_hooks.values()):
            continue  # hooked already (or met before: one gate under several names)
        handles.append(gate.register_forward_hook(_CountOverGroup(group)))
    return handles
