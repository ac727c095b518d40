"""Expert parallelism: the routed experts of a :class:`~mtl.moe.MoELayer` sharded over ranks.

Each of the ``R`` ranks of a process group holds ``L = E / R`` consecutive
experts (rank ``r`` owns experts ``[r L, (r + 1) L)``, torchtitan's and
Megatron's layout) in an :class:`ExpertShard`; gate, attention and everything
else stay replicated. :class:`ExpertParallelDispatch` is the dropless dispatch
(:class:`~mtl.moe.DroplessDispatch`: same slot sort and combine) whose grouped
step goes through the group:

1. the slots, sorted by expert, are already grouped by the rank that owns the expert;
2. ``all_to_all`` of the per-expert counts: each rank learns how many rows it receives;
3. ``all_to_all`` of the rows (uneven splits), regrouped by local expert;
4. the local bank's grouped matmul (``forward_grouped``, the ``_grouped_mm`` seam);
5. the reverse ``all_to_all`` of the outputs, then the dropless combine.

The exchanges are differentiable (:mod:`mtl.moe.expert_exchange`): a shard's
weight gradient sums the contributions of every rank's tokens. The counts and
the token count are also summed over the count group into ``routing.extras``
(:mod:`mtl.moe.group_counts`), so the ranks' load-balance, z- and entropy losses
average to the losses of the group's tokens together, however unevenly the
tokens are spread (:mod:`mtl.moe.losses`); :func:`reduce_routing_stats` gives
the group's routing statistics.

Training with data parallelism for the rest of the model: :class:`ExpertParallelPlan`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mtl.moe.dispatch import DispatchResult, DroplessDispatch
from mtl.moe.expert_exchange import (
    GroupLike,
    all_to_all_rows,
    exchange_counts,
    resolve_group,
)
from mtl.moe.experts import ExpertList
from mtl.moe.group_counts import count_over_group
from mtl.moe.layer import MoELayer
from mtl.moe.routing import RoutingResult, RoutingStats
from mtl.moe.routing_sums import sum_over_ranks


class ExpertShard(nn.Module):
    """This rank's ``L`` experts of an expert bank of ``E`` sharded over ``E / L`` ranks.

    Reports ``num_experts = E`` (what the gate routes to) and computes only
    through :class:`ExpertParallelDispatch`. Build it from a full bank with
    :func:`shard_experts`.

    Args:
        local: a bank (``SwiGLUExperts``, ``ExpertBank``, ``ExpertList``) of ``L`` experts.
        num_experts: ``E``, a multiple of ``L``.
        shard: this shard's index ``r``: it holds experts ``[r L, (r + 1) L)``.

    Example:
        >>> from mtl.moe import SwiGLUExperts
        >>> shard = shard_experts(SwiGLUExperts(num_experts=8, d_model=4, d_hidden=8),
        ...                       shard=1, num_shards=4)
        >>> shard.num_experts, shard.local.num_experts, shard.first_expert
        (8, 2, 2)
    """

    def __init__(self, *, local: nn.Module, num_experts: int, shard: int) -> None:
        super().__init__()
        L = int(local.num_experts)
        if num_experts % L != 0 or not 0 <= shard < num_experts // L:
            raise ValueError(
                f"a shard of {L} experts cannot be shard {shard} of num_experts={num_experts}"
            )
        self.local = local
        self.num_experts = num_experts
        self.num_shards = num_experts // L
        self.shard = shard

    @property
    def first_expert(self) -> int:
        return self.shard * self.local.num_experts

    def forward_all(self, x: Tensor) -> Tensor:
        raise ValueError("sharded experts compute through ExpertParallelDispatch only")

    def forward_grouped(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        raise ValueError("sharded experts compute through ExpertParallelDispatch only")

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, shard={self.shard}/{self.num_shards}"


def shard_experts(bank: nn.Module, *, shard: int, num_shards: int) -> ExpertShard:
    """Shard ``shard`` of ``num_shards`` of a full expert bank: a copy of its experts ``[r L, (r+1) L)``.

    Every parameter and buffer of a stacked bank leads with the expert
    dimension ``E``; the shard keeps its slice (copied, so the full bank can be
    freed). Banks with per-expert batch norm (statistics over all experts at
    once) cannot be sharded.

    Args:
        bank: ``SwiGLUExperts``, ``ExpertBank`` or ``ExpertList`` of ``E`` experts.
        shard: index ``r`` of the shard to keep (the rank in the expert-parallel group).
        num_shards: ``R``, dividing ``E``.

    Example:
        >>> from mtl.moe import SwiGLUExperts
        >>> bank = SwiGLUExperts(num_experts=4, d_model=4, d_hidden=8)
        >>> part = shard_experts(bank, shard=1, num_shards=2)
        >>> torch.equal(part.local.w_up, bank.w_up[2:])
        True
    """
    E = int(bank.num_experts)
    if num_shards < 1 or E % num_shards != 0:
        raise ValueError(f"num_experts={E} cannot be split into {num_shards} equal shards")
    if getattr(bank, "norms", None):
        raise ValueError("experts with norm='batch' cannot be sharded (one norm over all experts)")
    L = E // num_shards
    lo = shard * L
    if isinstance(bank, ExpertList):
        local: nn.Module = ExpertList(experts=copy.deepcopy(list(bank.experts)[lo : lo + L]))
        return ExpertShard(local=local, num_experts=E, shard=shard)
    local = _restacked(bank, E, lambda t: t[lo : lo + L].clone())
    local.num_experts = L
    return ExpertShard(local=local, num_experts=E, shard=shard)


@torch.no_grad()
def gather_experts(shard: ExpertShard, group: GroupLike = None) -> nn.Module:
    """The full bank of ``E`` experts, gathered from every rank's shard (for checkpoints).

    Collective: every rank of ``group`` calls it; each gets the full bank.

    Args:
        shard: this rank's shard (a stacked bank: ``SwiGLUExperts`` or ``ExpertBank``).
        group: the expert-parallel group the shards are spread over.

    Example:
        >>> full = gather_experts(layer.experts, group)  # doctest: +SKIP
    """
    pg = resolve_group(group)
    if pg.size() != shard.num_shards:
        raise ValueError(f"group has {pg.size()} ranks but the bank has {shard.num_shards} shards")
    if isinstance(shard.local, ExpertList):
        raise ValueError("gather_experts needs a stacked bank (SwiGLUExperts or ExpertBank)")
    full = _restacked(shard.local, shard.local.num_experts, lambda t: gather_expert_rows(t, pg))
    full.num_experts = shard.num_experts
    return full


def map_expert_rows(
    tensors: Mapping[str, Any], num_experts: int, rows: Callable[[Tensor], Tensor]
) -> dict[str, Any]:
    """``tensors`` with each per-expert tensor ``t`` replaced by ``rows(t)``, the rest as they are.

    A per-expert tensor leads with the expert dimension ``num_experts``; scalars,
    other shapes and non-tensors (an optimiser's ``step``) pass through. The one
    walk behind sharding and gathering a bank (:func:`shard_experts`,
    :func:`gather_experts`) and behind a checkpoint's expert weights and
    optimiser moments (:mod:`mtl.training.lm_expert_parallel`). The input is
    not modified.

    Args:
        tensors: e.g. a bank's buffers, its state dict, or one parameter's optimiser state.
        num_experts: the leading size that marks a per-expert tensor.
        rows: the new tensor for a per-expert one (a slice, a gather).

    Example:
        >>> state = {"step": torch.tensor(3.0), "exp_avg": torch.arange(8.0).view(4, 2)}
        >>> half = map_expert_rows(state, 4, lambda t: t[2:])
        >>> half["exp_avg"].tolist(), half["step"].item()
        ([[4.0, 5.0], [6.0, 7.0]], 3.0)
    """
    return {
        key: rows(value) if _is_per_expert(value, num_experts) else value
        for key, value in tensors.items()
    }


def _is_per_expert(value: object, num_experts: int) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == num_experts


def _restacked(bank: nn.Module, num_experts: int, rows: Callable[[Tensor], Tensor]) -> nn.Module:
    """A copy of a stacked bank whose per-expert tensors ``t`` are replaced by ``rows(t)``.

    Every parameter leads with the expert dimension ``num_experts`` (else ValueError);
    buffers that do are replaced too, the others copied as they are.
    """
    out = copy.deepcopy(bank)
    for module in out.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if not _is_per_expert(p, num_experts):
                raise ValueError(
                    f"parameter {name} of shape {tuple(p.shape)} has no expert dim {num_experts}"
                )
            module._parameters[name] = nn.Parameter(rows(p.detach()), requires_grad=p.requires_grad)
        module._buffers.update(map_expert_rows(module._buffers, num_experts, rows))
    return out


@torch.no_grad()
def gather_expert_rows(t: Tensor, group: GroupLike = None) -> Tensor:
    """Every rank's ``(L, ...)`` shard tensor stacked in shard order: ``(R L, ...)`` (collective).

    For tensors shaped like a shard's weights, e.g. an optimiser's moments.

    Example:
        >>> full_E = gather_expert_rows(exp_avg_L, group)  # doctest: +SKIP
    """
    pg = resolve_group(group)
    parts = [torch.empty_like(t) for _ in range(pg.size())]
    dist.all_gather(parts, t.contiguous(), group=pg)
    return torch.cat(parts)  # group-rank order = shard order


class _ExchangedExperts:
    """A shard seen by the dropless dispatch as the full bank: its grouped step exchanges rows."""

    def __init__(
        self,
        *,
        shard: ExpertShard,
        pg: dist.ProcessGroup,
        count_pg: dist.ProcessGroup,
        routing: RoutingResult,
    ) -> None:
        self.shard, self.pg, self.count_pg, self.routing = shard, pg, count_pg, routing
        self.num_experts = shard.num_experts

    def forward_all(self, x: Tensor) -> Tensor:
        raise ValueError("expert parallelism is dropless only (no dense computation)")

    def forward_grouped(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        R, L = self.shard.num_shards, self.shard.local.num_experts
        count_over_group(self.routing, counts_E, self.count_pg)
        # rows sorted by expert are grouped by owner rank: rank r's block is its experts' rows
        recv_RL = exchange_counts(counts_E.view(R, L), self.pg)
        # the split sizes the exchange needs on the host, read in one device sync
        send, recv = torch.stack([counts_E.view(R, L).sum(1), recv_RL.sum(1)]).tolist()
        x_MD = all_to_all_rows(x_ND, send, recv, self.pg)
        # arrived grouped by source rank, then local expert: regroup by local expert
        M = x_MD.shape[0]
        local_M = torch.arange(L, device=x_ND.device).repeat(R)
        local_M = local_M.repeat_interleave(recv_RL.reshape(-1), output_size=M)
        order_M = torch.argsort(local_M, stable=True)
        y_MD = self.shard.local.forward_grouped(x_MD.index_select(0, order_M), recv_RL.sum(0))
        y_MD = y_MD.new_zeros(M, y_MD.shape[-1]).index_copy(0, order_M, y_MD)
        return all_to_all_rows(y_MD, recv, send, self.pg)


class ExpertParallelDispatch(DroplessDispatch):
    """The dropless dispatch over experts sharded across a process group.

    Same slot sort and combine as :class:`~mtl.moe.DroplessDispatch`; the
    grouped step sends each row to the rank owning its expert and brings the
    output back (module docstring). Every rank of the group must call the
    layer, each with its own tokens (an empty batch included). The gate and
    the combine are local; only rows cross ranks.

    Args:
        group: the expert-parallel group, a ``ProcessGroup`` or a 1-D
            ``DeviceMesh`` (e.g. ``mesh["ep"]``); None: the world group.
        count_group: the ranks whose losses are averaged (under data
            parallelism too, the world); their summed per-expert and token
            counts (:mod:`mtl.moe.group_counts`) make each rank's auxiliary
            losses its share of the group's; None: ``group``.

    Shapes:
        ``forward(x_TD (T, D), routing, experts: ExpertShard) -> DispatchResult (T, D_out)``.

    Example:
        >>> import torch.distributed as dist
        >>> from mtl.moe import MoELayer, SwiGLUExperts, TopKGate
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> bank = SwiGLUExperts(num_experts=4, d_model=8, d_hidden=16)
        >>> layer = MoELayer(
        ...     gate=TopKGate(d_model=8, num_experts=4, k=2),
        ...     experts=shard_experts(bank, shard=dist.get_rank(), num_shards=dist.get_world_size()),
        ...     dispatch=ExpertParallelDispatch())
        >>> layer(torch.randn(5, 8)).output.shape
        torch.Size([5, 8])
        >>> dist.destroy_process_group()
    """

    def __init__(self, *, group: GroupLike = None, count_group: GroupLike = None) -> None:
        super().__init__()
        self.group = group
        self.count_group = count_group

    @torch.compiler.disable
    def forward(self, x_TD: Tensor, routing: RoutingResult, experts: nn.Module) -> DispatchResult:
        if not isinstance(experts, ExpertShard):
            raise ValueError(
                f"ExpertParallelDispatch needs an ExpertShard (shard_experts), got {type(experts).__name__}"
            )
        pg = resolve_group(self.group)
        if pg.size() != experts.num_shards or pg.rank() != experts.shard:
            raise ValueError(
                f"rank {pg.rank()} of a {pg.size()}-rank group holds shard "
                f"{experts.shard} of {experts.num_shards}: the shard must be the rank's"
            )
        count_pg = pg if self.count_group is None else resolve_group(self.count_group)
        exchanged = _ExchangedExperts(shard=experts, pg=pg, count_pg=count_pg, routing=routing)
        return super().forward(x_TD, routing, exchanged)  # type: ignore[arg-type]


def reduce_routing_stats(stats: RoutingStats, group: GroupLike = None) -> RoutingStats:
    """The routing statistics of every rank's tokens together (one ``all_reduce``).

    Counts are summed and per-token means re-weighted by each rank's token count
    (:func:`~mtl.moe.routing_sums.sum_over_ranks`; a rank without tokens adds
    nothing), so the result equals :func:`~mtl.moe.routing_stats` on the
    concatenated batch.

    Example:
        >>> global_stats = reduce_routing_stats(out.stats, group)  # doctest: +SKIP
    """
    pg = resolve_group(group)

    def all_reduce(t: Tensor) -> Tensor:
        dist.all_reduce(t, group=pg)
        return t

    return sum_over_ranks({0: stats}, all_reduce)[0]


def parallelize_experts(
    net: nn.Module, *, group: GroupLike = None, count_group: GroupLike = None
) -> list[str]:
    """Shard the routed experts of every :class:`~mtl.moe.MoELayer` of ``net`` over ``group``, in place.

    Each layer keeps this rank's slice of its bank (:func:`shard_experts`) and
    dispatches with :class:`ExpertParallelDispatch`. Every rank must start from
    the same full weights (same seed, or a loaded checkpoint). Only dropless
    layers can be sharded. ``count_group``: see :class:`ExpertParallelDispatch`.

    Returns:
        the qualified names (in ``net``) of the sharded parameters and buffers.

    Example:
        >>> names = parallelize_experts(lm, group=mesh["ep"])  # doctest: +SKIP
    """
    pg = resolve_group(group)
    names: list[str] = []
    for name, layer in net.named_modules():
        if not isinstance(layer, MoELayer) or isinstance(layer.experts, ExpertShard):
            continue
        if type(layer.dispatch) is not DroplessDispatch:
            raise ValueError(
                f"layer {name!r} uses {type(layer.dispatch).__name__}: only a dropless "
                "dispatch (DroplessDispatch) can be made expert-parallel"
            )
        layer.experts = shard_experts(layer.experts, shard=pg.rank(), num_shards=pg.size())
        layer.dispatch = ExpertParallelDispatch(group=group, count_group=count_group)
        prefix = f"{name}.experts." if name else "experts."
        names += [prefix + n for n, _ in layer.experts.named_parameters()]
        names += [prefix + n for n, _ in layer.experts.named_buffers()]
    return names


def sharded_parameters(net: nn.Module) -> Iterable[nn.Parameter]:
    """The parameters of every :class:`ExpertShard` in ``net`` (rank-specific weights)."""
    for module in net.modules():
        if isinstance(module, ExpertShard):
            yield from module.parameters()
