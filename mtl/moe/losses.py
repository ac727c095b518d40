"""Auxiliary router losses as pure functions of a routing decision.

Conventions: every loss is a float32 scalar; balancing losses are scaled so
that perfectly uniform routing gives 1.0 (``load_balance_loss``) or 0.0
(the CV² losses). Weighting is the caller's job (see ``MoELayer``'s
``aux_loss_weights``); typical weights: load balance 0.01, z-loss 1e-3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from mtl.moe.group_counts import GROUP_COUNTS, GROUP_RANKS, GROUP_TOKENS
from mtl.moe.routing import RoutingResult, bin_counts


def _per_token_share(sum_: Tensor, num_tokens: Tensor | int, num_ranks: Tensor | int) -> Tensor:
    """``R / T_g * sum_``: a rank's share of a mean over the group's ``T_g`` tokens (0 for none)."""
    return sum_ * (
        torch.as_tensor(num_ranks, dtype=torch.float32, device=sum_.device)
        / torch.as_tensor(num_tokens, dtype=torch.float32, device=sum_.device).clamp_min(1.0)
    )


def load_balance_loss(
    probs_TE: Tensor,
    experts_TK: Tensor,
    valid_TK: Tensor | None = None,
    *,
    counts_E: Tensor | None = None,
    num_tokens: Tensor | int | None = None,
    num_ranks: Tensor | int = 1,
) -> Tensor:
    """Switch/GShard load-balancing loss ``E * sum_i f_i * P_i``.

    ``f_i`` is the fraction of routed (token, slot) assignments that go to
    expert ``i`` and ``P_i`` the mean router probability of expert ``i``. Scaled
    so that uniform routing gives exactly 1.0 for any ``k`` (the megablocks /
    OLMo-core convention; HF Mixtral's version equals ``k`` times this).
    Only ``P`` carries gradient, as in the papers. No tokens: 0.

    Over a group of ``R`` ranks whose losses are averaged
    (:mod:`mtl.moe.group_counts`), ``f`` comes from the group's counts and
    ``P_i = R / T_g * sum_t probs_ti`` (this rank's tokens), so the mean of the
    ranks' losses is exactly the loss of all ``T_g`` tokens together, however
    they are split (an empty rank contributes 0).

    Args:
        probs_TE: ``(T, E)`` router probabilities.
        experts_TK: ``(T, K)`` chosen experts.
        valid_TK: ``(T, K)`` bool mask of used slots, or None.
        counts_E: ``(E,)`` assignment counts to take ``f`` from instead of
            counting ``experts_TK``: the group's (``routing.extras["group_counts_E"]``).
        num_tokens: ``T_g``, the group's tokens; None: ``T``.
        num_ranks: ``R``, the ranks whose losses are averaged.

    Example:
        >>> probs = torch.full((4, 2), 0.5)
        >>> load_balance_loss(probs, torch.tensor([[0], [1], [0], [1]])).item()
        1.0
        >>> # rank 0 of two holds these 4 of the group's 6 tokens; the other 2 give 0.667
        >>> share = load_balance_loss(probs, torch.tensor([[0], [1], [0], [1]]),
        ...                           counts_E=torch.tensor([3, 3]), num_tokens=6, num_ranks=2)
        >>> round(share.item(), 4)  # mean over the ranks: 1.0, the loss of all 6 tokens
        1.3333
    """
    E = probs_TE.shape[-1]
    if counts_E is None:
        ids = experts_TK.reshape(-1)
        weights = None if valid_TK is None else valid_TK.reshape(-1).to(probs_TE.dtype)
        counts_E = bin_counts(ids, E, weights=weights)
    counts_E = counts_E.to(torch.float32)
    f_E = counts_E / counts_E.sum().clamp_min(1.0)
    T = probs_TE.shape[0] if num_tokens is None else num_tokens
    P_E = _per_token_share(probs_TE.float().sum(0), T, num_ranks)
    # elementwise product + sum, not torch.dot: dot is autocast to low precision
    # and then rejects the float32 operands under CPU bf16 autocast
    return E * (f_E.detach() * P_E).sum()


def router_z_loss(
    logits_TE: Tensor, *, num_tokens: Tensor | int | None = None, num_ranks: Tensor | int = 1
) -> Tensor:
    """ST-MoE router z-loss ``mean_t (logsumexp_i logits_ti)^2``: keeps logits small.

    No tokens: 0. ``num_tokens``/``num_ranks``: a rank's share of the mean over
    a group's tokens, as in :func:`load_balance_loss`.

    Example:
        >>> round(router_z_loss(torch.zeros(3, 4)).item(), 4)  # log(4)^2
        1.9218
    """
    sq_T = torch.logsumexp(logits_TE.float(), dim=-1).square()
    T = logits_TE.shape[0] if num_tokens is None else num_tokens
    return _per_token_share(sq_T.sum(), T, num_ranks)


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


def router_entropy_loss(
    probs_TE: Tensor, *, num_tokens: Tensor | int | None = None, num_ranks: Tensor | int = 1
) -> Tensor:
    """Mean router entropy ``-sum_i P_i log P_i`` (nats), minimised with top-p routing.

    No tokens: 0. ``num_tokens``/``num_ranks``: as in :func:`router_z_loss`.
    """
    p = probs_TE.float()
    ent_T = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
    T = probs_TE.shape[0] if num_tokens is None else num_tokens
    return _per_token_share(ent_T.sum(), T, num_ranks)


def _load_cv_from(r: RoutingResult) -> Tensor:
    if r.load_estimate_E is None:
        raise ValueError("load_cv needs a gate that estimates load (NoisyTopKGate)")
    return load_cv_loss(r.load_estimate_E)


def _group(r: RoutingResult) -> dict[str, Tensor | int | None]:
    """The group's token count and ranks, where the routing was counted over a group."""
    return {"num_tokens": r.extras.get(GROUP_TOKENS), "num_ranks": r.extras.get(GROUP_RANKS, 1)}


AUX_LOSSES: dict[str, Callable[[RoutingResult], Tensor]] = {
    "load_balance": lambda r: load_balance_loss(
        r.probs_TE, r.experts_TK, r.valid_TK, counts_E=r.extras.get(GROUP_COUNTS), **_group(r)
    ),
    "z_loss": lambda r: router_z_loss(r.logits_TE, **_group(r)),
    "importance": lambda r: importance_loss(r.dense_weights()),
    "load_cv": _load_cv_from,
    "entropy": lambda r: router_entropy_loss(r.probs_TE, **_group(r)),
}
"""Names accepted in ``aux_loss_weights``; each maps a RoutingResult to a scalar.

Where the routing was counted over a group (:mod:`mtl.moe.group_counts`), the
per-token losses (``load_balance``, ``z_loss``, ``entropy``) are this rank's
share of the group's loss: their mean over the ranks is the loss of the
group's tokens together. ``importance`` and ``load_cv`` (CV² of per-expert
sums) stay this rank's own."""


def check_aux_loss_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """``weights`` as a plain ``{name: float}`` dict, refusing unknown names and bad weights.

    A negative weight would reward the imbalance the loss measures, and a
    non-finite one poisons every gradient, so both are refused here rather
    than trained on silently.

    Example:
        >>> check_aux_loss_weights({"z_loss": 1e-3})
        {'z_loss': 0.001}
        >>> check_aux_loss_weights({"load_balance": -1})
        Traceback (most recent call last):
        ...
        ValueError: aux_loss_weights.load_balance=-1.0: a weight must be finite and >= 0
    """
    unknown = sorted(str(k) for k in weights if k not in AUX_LOSSES)
    if unknown:
        raise ValueError(f"unknown aux_loss_weights {unknown}; known: {sorted(AUX_LOSSES)}")
    out: dict[str, float] = {}
    for name, value in weights.items():
        try:
            w = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"aux_loss_weights.{name}={value!r}: a weight must be a number"
            ) from None
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"aux_loss_weights.{name}={w}: a weight must be finite and >= 0")
        out[str(name)] = w
    return out


def aux_losses(routing: RoutingResult, weights: dict[str, float]) -> dict[str, Tensor]:
    """Weighted auxiliary losses by name; unknown names raise ``ValueError``."""
    out: dict[str, Tensor] = {}
    for name, w in weights.items():
        if name not in AUX_LOSSES:
            raise ValueError(f"unknown auxiliary loss {name!r}; known: {sorted(AUX_LOSSES)}")
        if w:
            out[name] = w * AUX_LOSSES[name](routing)
    return out
