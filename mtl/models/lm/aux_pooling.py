"""How a language model combines the auxiliary router losses of its MoE layers.

Two conventions, named by :class:`~mtl.models.lm.TransformerLM`'s ``aux_loss_pooling``:

* ``"sum_over_layers"`` (default; Switch, ST-MoE, megablocks): every MoE layer
  computes its losses on its own routing, and the model's loss is their sum,
  ``sum_l w * loss(routing_l)``. Uniform routing gives ``L`` times the layer
  value (``L`` MoE layers).
* ``"pooled"`` (Hugging Face transformers' ``load_balancing_loss_func``, used by
  Mixtral, OLMoE, Qwen2-MoE): the routings of all layers are pooled as if they
  were one batch of ``L * T`` tokens and each loss is computed once,
  ``w * loss(pooled routing)``. Uniform routing gives the layer value.

With ``"pooled"``, transformers' ``router_aux_loss_coef * load_balancing_loss_func(...)``
equals ``load_balance: router_aux_loss_coef * k`` exactly (HF's loss is ``k`` times
mtl's, which is 1 for uniform routing whatever ``k``). With ``"sum_over_layers"`` the
same weight gives about ``L`` times as much (not exactly: the sum of per-layer
products ``f_l . P_l`` is not ``L`` times the product of the pooled means).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from mtl.moe import RoutingResult
from mtl.moe.group_counts import GROUP_COUNTS, GROUP_RANKS, GROUP_TOKENS
from mtl.moe.losses import aux_losses

AuxLossPooling = Literal["sum_over_layers", "pooled"]
AUX_LOSS_POOLINGS: tuple[str, ...] = ("sum_over_layers", "pooled")


def check_pooling(value: str) -> AuxLossPooling:
    """``value`` if it names a convention, else ``ValueError``."""
    if value not in AUX_LOSS_POOLINGS:
        raise ValueError(
            f"aux_loss_pooling must be one of {list(AUX_LOSS_POOLINGS)}, got {value!r}"
        )
    return value  # type: ignore[return-value]


def pool_routings(routings: Sequence[RoutingResult]) -> RoutingResult:
    """The routings of several layers as one routing of all their tokens.

    Tokens are concatenated (layer after layer); layers with fewer slots ``K``
    are padded with invalid slots; load estimates (expected tokens per expert)
    are summed. All layers must route to the same number of experts.

    Routings counted over a process group (:mod:`mtl.moe.group_counts`: under
    expert or data parallelism) keep it: the group's per-expert and token
    counts are summed over the layers, so the pooled losses stay this rank's
    share of the group's pooled loss.

    Example:
        >>> from mtl.moe import TopKGate
        >>> gate = TopKGate(d_model=4, num_experts=3, k=1)
        >>> r = pool_routings([gate(torch.randn(5, 4)), gate(torch.randn(2, 4))])
        >>> r.num_tokens, r.num_experts
        (7, 3)
    """
    if not routings:
        raise ValueError("pool_routings needs at least one routing")
    if len(routings) == 1:
        return routings[0]
    experts = {r.num_experts for r in routings}
    if len(experts) != 1:
        raise ValueError(
            f"pooled aux losses need one number of experts in every layer, got {sorted(experts)}"
        )
    K = max(r.slots for r in routings)
    padded = any(r.slots != K for r in routings)

    def cat_slots(get: str, fill: float | int | bool) -> Tensor:
        parts = []
        for r in routings:
            t = r.valid() if get == "valid" else getattr(r, get)
            if r.slots < K:
                t = torch.nn.functional.pad(t, (0, K - r.slots), value=fill)
            parts.append(t)
        return torch.cat(parts)

    with_valid = padded or any(r.valid_TK is not None for r in routings)
    loads = [r.load_estimate_E for r in routings]
    denses = [r.dense_TE for r in routings]
    return RoutingResult(
        weights_TK=cat_slots("weights_TK", 0.0),
        experts_TK=cat_slots("experts_TK", 0),
        logits_TE=torch.cat([r.logits_TE for r in routings]),
        probs_TE=torch.cat([r.probs_TE for r in routings]),
        valid_TK=cat_slots("valid", False) if with_valid else None,
        load_estimate_E=None if any(x is None for x in loads) else torch.stack(loads).sum(0),  # type: ignore[arg-type]
        dense_TE=None if any(x is None for x in denses) else torch.cat(denses),  # type: ignore[arg-type]
        extras=_pooled_group_counts(routings),
    )


def _pooled_group_counts(routings: Sequence[RoutingResult]) -> dict[str, Tensor]:
    """The layers' group counts summed (empty if no layer was counted over a group)."""
    counted = [GROUP_COUNTS in r.extras for r in routings]
    if not any(counted):
        return {}
    if not all(counted):
        raise ValueError(
            "pooled aux losses need every MoE layer counted over the same process group "
            f"(extras[{GROUP_COUNTS!r}]); layers with it: {counted}"
        )
    ranks = {int(r.extras[GROUP_RANKS]) for r in routings}
    if len(ranks) != 1:
        raise ValueError(f"pooled layers were counted over groups of {sorted(ranks)} ranks")
    return {
        GROUP_COUNTS: torch.stack([r.extras[GROUP_COUNTS] for r in routings]).sum(0),
        GROUP_TOKENS: torch.stack([r.extras[GROUP_TOKENS] for r in routings]).sum(0),
        GROUP_RANKS: routings[0].extras[GROUP_RANKS],
    }


def pooled_aux_losses(
    routings: Sequence[RoutingResult], weights: Sequence[Mapping[str, float]]
) -> dict[str, Tensor]:
    """Weighted auxiliary losses of the pooled routing of several layers.

    Args:
        routings: each MoE layer's routing.
        weights: each layer's ``aux_loss_weights``; pooling needs them all equal.

    Returns:
        ``{name: weight * loss(pool_routings(routings))}``, float32 scalars.
    """
    distinct = {tuple(sorted(w.items())) for w in weights}
    if len(distinct) > 1:
        raise ValueError(
            "aux_loss_pooling='pooled' needs the same aux_loss_weights in every MoE layer, "
            f"got {[dict(w) for w in weights]}"
        )
    if not routings or not distinct or not any(w for w in weights[0].values()):
        return {}
    return aux_losses(pool_routings(routings), dict(weights[0]))
