"""Auxiliary router losses as pure functions of a routing decision.

Conventions: every loss is a float32 scalar; balancing losses are scaled so
that perfectly uniform routing gives 1.0 (``load_balance_loss``) or 0.0
(the CV² losses). Weighting is the caller's job (see ``MoELayer``'s
``aux_loss_weights``); typical weights: load balance 0.01, z-loss 1e-3.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mtl.moe.routing import RoutingResult, bin_counts


def load_balance_loss(
    probs_TE: Tensor,
    experts_TK: Tensor,
    valid_TK: Tensor | None = None,
    *,
    counts_E: Tensor | None = None,
) -> Tensor:
    """Switch/GShard load-balancing loss ``E * sum_i f_i * P_i``.

    ``f_i`` is the fraction of routed (token, slot) assignments that go to
    expert ``i`` and ``P_i`` the mean router probability of expert ``i``. Scaled
    so that uniform routing gives exactly 1.0 for any ``k`` (the megablocks /
    OLMo-core convention; HF Mixtral's version equals ``k`` times this).
    Only ``P`` carries gradient, as in the papers.

    Args:
        probs_TE: ``(T, E)`` router probabilities.
        experts_TK: ``(T, K)`` chosen experts.
        valid_TK: ``(T, K)`` bool mask of used slots, or None.
        counts_E: ``(E,)`` assignment counts to take ``f`` from instead of
            counting ``experts_TK``: under expert parallelism, the counts summed
            over the group (``routing.extras["group_counts_E"]``), so that the
            ranks' losses average to the loss of their tokens together.

    Example:
        >>> probs = torch.full((4, 2), 0.5)
        >>> load_balance_loss(probs, torch.tensor([[0], [1], [0], [1]])).item()
        1.0
    """
    E = probs_TE.shape[-1]
    if counts_E is None:
        ids = experts_TK.reshape(-1)
        weights = None if valid_TK is None else valid_TK.reshape(-1).to(probs_TE.dtype)
        counts_E = bin_counts(ids, E, weights=weights)
    counts_E = counts_E.to(probs_TE.dtype)
    f_E = counts_E / counts_E.sum().clamp_min(1.0)
    P_E = probs_TE.float().mean(0)
    # elementwise product + sum, not torch.dot: dot is autocast to low precision
    # and then rejects the float32 operands under CPU bf16 autocast
    return E * (f_E.detach() * P_E).sum()


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss ``mean_t (logsumexp_i logits_ti)^2``: keeps logits small."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def cv_squared(x_E: Tensor) -> Tensor:
    """Squared coefficient of variation ``var / mean^2`` (0 for a constant vector)."""
    x = x_E.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var(unbiased=False) / x.mean().square().clamp_min(1e-10)


def importance_loss(weights_TE: Tensor) -> Tensor:
    """Shazeer et al. 2017 importance loss: ``CV(sum_t gate_te)^2``."""
    return cv_squared(weights_TE.sum(0))


def load_cv_loss(load_estimate_E: Tensor) -> Tensor:
    """Shazeer et al. 2017 load loss: ``CV(load)^2`` of the smooth load estimate."""
    return cv_squared(load_estimate_E)


def router_entropy_loss(probs_TE: Tensor) -> Tensor:
    """Mean router entropy ``-sum_i P_i log P_i`` (nats), minimised with top-p routing."""
    p = probs_TE.float()
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()


def _load_cv_from(r: RoutingResult) -> Tensor:
    if r.load_estimate_E is None:
        raise ValueError("load_cv needs a gate that estimates load (NoisyTopKGate)")
    return load_cv_loss(r.load_estimate_E)


AUX_LOSSES: dict[str, Callable[[RoutingResult], Tensor]] = {
    "load_balance": lambda r: load_balance_loss(
        r.probs_TE, r.experts_TK, r.valid_TK, counts_E=r.extras.get("group_counts_E")
    ),
    "z_loss": lambda r: router_z_loss(r.logits_TE),
    "importance": lambda r: importance_loss(r.dense_weights()),
    "load_cv": _load_cv_from,
    "entropy": lambda r: router_entropy_loss(r.probs_TE),
}
"""Names accepted in ``aux_loss_weights``; each maps a RoutingResult to a scalar."""


def aux_losses(routing: RoutingResult, weights: dict[str, float]) -> dict[str, Tensor]:
    """Weighted auxiliary losses by name; unknown names raise ``ValueError``."""
    out: dict[str, Tensor] = {}
    for name, w in weights.items():
        if name not in AUX_LOSSES:
            raise ValueError(f"unknown auxiliary loss {name!r}; known: {sorted(AUX_LOSSES)}")
        if w:
            out[name] = w * AUX_LOSSES[name](routing)
    return out
