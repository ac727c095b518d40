"""The experts a masked gate may use, and its routing restricted to them (for the balancing losses).

PLE and HoME restrict each gate to some experts (shared + its own). A balancing
loss normalises by the number of experts (``E * sum f_i P_i``, the CV of per-expert
sums); computed over all ``E``, a gate restricted to ``E_allowed`` experts would
count ``E - E_allowed`` experts fixed at zero load. :func:`restrict_to_allowed`
gives the routing over the allowed experts only, on which every loss of
:mod:`mtl.moe.losses` then normalises by ``E_allowed``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.moe.group_counts import restricted_group_extras
from mtl.moe.routing import RoutingResult

EXPERT_MASK = "expert_mask_E"
"""Key of ``RoutingResult.extras`` holding a masked gate's ``(E,)`` allowed experts."""


def allowed_experts(routing: RoutingResult) -> Tensor | None:
    """``(E,)`` bool: the experts a gate may use, or None when it may use all of them.

    A :class:`~mtl.moe.multi_gate.MaskedGate` records its mask in the routing; a masked dense gate's
    slots are its experts and its mask is its (per-token constant) validity.
    """
    if EXPERT_MASK in routing.extras:
        return routing.extras[EXPERT_MASK]
    if routing.dense_TE is not None and routing.valid_TK is not None:
        return routing.valid_TK[0]
    return None


def restrict_to_allowed(routing: RoutingResult) -> RoutingResult:
    """The routing over the ``E_allowed`` experts a masked gate may use.

    Balancing losses normalise by the number of experts (``E * sum f_i P_i``, the
    CV of per-expert sums): over all ``E`` a gate restricted to ``E_allowed`` would
    see ``E - E_allowed`` experts fixed at zero load. Expert ids are renumbered
    ``0..E_allowed-1``; slots on a disallowed expert (padding) become invalid. Counts
    summed over a process group (``extras``) are restricted alike.

    Example:
        >>> from mtl.moe import TopKGate
        >>> from mtl.moe.multi_gate import MaskedGate
        >>> gate = MaskedGate(gate=TopKGate(d_model=4, num_experts=4, k=1), expert_mask=[1, 3])
        >>> r = restrict_to_allowed(gate(torch.randn(6, 4)))
        >>> r.num_experts, set(r.experts_TK.flatten().tolist()) <= {0, 1}
        (2, True)
    """
    keep_E = allowed_experts(routing)
    if keep_E is None or bool(keep_E.all()):
        return routing
    if routing.dense_TE is not None:
        # a dense gate's slots are its experts: K = E_allowed
        w_TK = routing.dense_TE[:, keep_E]
        T, K = w_TK.shape
        experts_TK = torch.arange(K, device=w_TK.device).expand(T, K)
        weights_TK, valid_TK, dense_TE = w_TK, None, w_TK
    else:
        new_id_E = torch.cumsum(keep_E.long(), 0) - 1
        on_allowed_TK = keep_E[routing.experts_TK]
        experts_TK = new_id_E[routing.experts_TK].clamp_min(0)
        valid_TK = routing.valid() & on_allowed_TK
        weights_TK = routing.weights_TK.masked_fill(~valid_TK, 0.0)
        dense_TE = None
    load = routing.load_estimate_E
    return RoutingResult(
        weights_TK=weights_TK,
        experts_TK=experts_TK,
        logits_TE=routing.logits_TE[:, keep_E],
        probs_TE=routing.probs_TE[:, keep_E],
        valid_TK=valid_TK,
        load_estimate_E=None if load is None else load[keep_E],
        dense_TE=dense_TE,
        # counts over the ranks (DDP) follow the restriction
        extras=restricted_group_extras(routing, keep_E),
    )
