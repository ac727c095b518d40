"""The one routing result every gate returns, and the statistics derived from it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class RoutingResult:
    """What a gate decided for a batch of tokens.

    Every gate, dense or sparse, token-choice or expert-choice, describes its
    decision as ``K`` slots per token: slot ``(t, j)`` sends token ``t`` to expert
    ``experts_TK[t, j]`` with combine weight ``weights_TK[t, j]``. Gates whose
    number of experts per token varies (top-p, expert choice) pad to a fixed ``K``
    and mark the padding with ``valid_TK = False``. Dense gates use ``K = E``.

    Attributes:
        weights_TK: ``(T, K)`` float32 combine weights; 0 on invalid slots.
        experts_TK: ``(T, K)`` int64 expert ids.
        logits_TE: ``(T, E)`` float32 raw router logits (input of the z-loss).
        probs_TE: ``(T, E)`` float32 router probabilities over all experts
            (softmax, or normalised sigmoid scores): input of the balancing losses.
        valid_TK: ``(T, K)`` bool, or ``None`` when every slot is used.
        load_estimate_E: ``(E,)`` smooth, differentiable estimate of how many
            tokens each expert receives (noisy top-k only; Shazeer et al. 2017).
        extras: gate-specific tensors (kept small), e.g. the selection bias.
        dense_TE: ``(T, E)`` combine weights already in expert order (dense
            gates, whose slot ``j`` is expert ``j``), returned by
            :meth:`dense_weights` without a scatter; None for sparse gates.

    Example:
        >>> r = RoutingResult(
        ...     weights_TK=torch.ones(2, 1), experts_TK=torch.tensor([[0], [1]]),
        ...     logits_TE=torch.zeros(2, 2), probs_TE=torch.full((2, 2), 0.5))
        >>> r.dense_weights().tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """

    weights_TK: Tensor
    experts_TK: Tensor
    logits_TE: Tensor
    probs_TE: Tensor
    valid_TK: Tensor | None = None
    load_estimate_E: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    dense_TE: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.weights_TK.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs_TE.shape[-1]

    @property
    def slots(self) -> int:
        """``K``, the number of expert slots per token (including padding)."""
        return self.weights_TK.shape[-1]

    def valid(self) -> Tensor:
        """``(T, K)`` bool mask of used slots (all true when ``valid_TK`` is None)."""
        if self.valid_TK is None:
            return torch.ones_like(self.experts_TK, dtype=torch.bool)
        return self.valid_TK

    def dense_weights(self) -> Tensor:
        """``(T, E)`` float32 combine weights, zero for experts a token does not use."""
        if self.dense_TE is not None:
            return self.dense_TE
        w_TK = self.weights_TK
        if self.valid_TK is not None:
            w_TK = torch.where(self.valid_TK, w_TK, torch.zeros_like(w_TK))
        out_TE = torch.zeros(
            self.num_tokens, self.num_experts, dtype=w_TK.dtype, device=w_TK.device
        )
        return out_TE.scatter_add(1, self.experts_TK, w_TK)


@dataclass
class RoutingStats:
    """Per-call routing statistics, detached from the graph.

    Attributes:
        tokens_per_expert_E: ``(E,)`` float32 number of token slots each expert
            computed (after capacity dropping).
        dropped_slots: scalar, token slots the gate chose but the dispatch dropped.
        dropped_tokens: scalar, tokens no expert computed: every slot dropped by
            the dispatch's capacity, or none chosen at all (expert choice). They
            pass through the residual unchanged.
        valid_slots: scalar, token slots the gate chose.
        num_tokens: scalar, tokens routed.
        experts_per_token: scalar, mean number of experts that computed a token
            (varies with the router's confidence under top-p).
        entropy: scalar, mean per-token entropy (nats) of ``probs_TE``.
        mean_weight_E: ``(E,)`` mean combine weight each expert receives; for
            dense gates this is the expert utilisation a task's gate shows.

    Example:
        >>> r = RoutingResult(
        ...     weights_TK=torch.ones(3, 1), experts_TK=torch.tensor([[0], [0], [1]]),
        ...     logits_TE=torch.zeros(3, 2), probs_TE=torch.full((3, 2), 0.5))
        >>> s = routing_stats(r, kept_TK=torch.tensor([[True], [False], [True]]))
        >>> s.tokens_per_expert_E.tolist(), s.dropped_tokens.item(), round(s.dropped_fraction.item(), 3)
        ([1.0, 1.0], 1.0, 0.333)
        >>> s.as_dict("moe/")["moe/load_max_over_mean"].item()
        1.0
    """

    tokens_per_expert_E: Tensor
    dropped_slots: Tensor
    dropped_tokens: Tensor
    valid_slots: Tensor
    entropy: Tensor
    mean_weight_E: Tensor
    num_tokens: Tensor
    experts_per_token: Tensor

    @property
    def dropped_fraction(self) -> Tensor:
        return self.dropped_slots / self.valid_slots.clamp_min(1)

    @property
    def dropped_token_fraction(self) -> Tensor:
        return self.dropped_tokens / self.num_tokens.clamp_min(1)

    def as_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """Scalar statistics for a logger, e.g. ``{"moe/dropped_fraction": ...}``."""
        load = self.tokens_per_expert_E
        return {
            f"{prefix}dropped_fraction": self.dropped_fraction,
            f"{prefix}dropped_tokens": self.dropped_tokens,
            f"{prefix}dropped_token_fraction": self.dropped_token_fraction,
            f"{prefix}experts_per_token": self.experts_per_token,
            f"{prefix}router_entropy": self.entropy,
            # max/mean load: 1.0 is perfect balance, E means one expert takes all
            f"{prefix}load_max_over_mean": load.max() / load.mean().clamp_min(1e-9),
        }


def bin_counts(
    ids: Tensor, num_bins: int, weights: Tensor | None = None, *, scatter: bool | None = None
) -> Tensor:
    """How often each value in ``[0, num_bins)`` occurs in ``ids``: ``torch.bincount`` without a host sync.

    On CUDA ``torch.bincount`` reads the largest (and smallest) id back to the
    host to size its output, a sync in every training step; a ``scatter_add_``
    into ``num_bins`` zeros gives the same counts without it. CPU keeps
    ``bincount`` (no sync there, and faster).

    Args:
        ids: int64 ids of any shape, each in ``[0, num_bins)`` (outside is an
            error; on CUDA a device-side one).
        num_bins: length of the result.
        weights: same shape as ``ids``, or None to count.
        scatter: force (True) or forbid (False) the ``scatter_add_`` path;
            ``None`` takes it off CPU and under ``torch.compile``.

    Returns:
        ``(num_bins,)`` int64 counts, or sums of ``weights`` in their dtype.

    Example:
        >>> bin_counts(torch.tensor([[0, 2], [2, 2]]), 4).tolist()
        [1, 0, 3, 0]
        >>> bin_counts(torch.tensor([0, 2]), 3, weights=torch.tensor([0.5, 2.0])).tolist()
        [0.5, 0.0, 2.0]
    """
    flat = ids.reshape(-1)
    if scatter is None:
        # bincount's output length depends on the data: torch.compile would break the graph
        scatter = flat.device.type != "cpu" or torch.compiler.is_compiling()
    if not scatter:
        w = None if weights is None else weights.reshape(-1)
        out = torch.bincount(flat, weights=w, minlength=num_bins)
        if out.shape[0] != num_bins:
            raise ValueError(f"ids must lie in [0, {num_bins}), got one of {out.shape[0] - 1}")
        return out if weights is None else out.to(weights.dtype)
    src = torch.ones_like(flat) if weights is None else weights.reshape(-1)
    return torch.zeros(num_bins, dtype=src.dtype, device=flat.device).scatter_add_(0, flat, src)


@torch.no_grad()
def routing_stats(routing: RoutingResult, kept_TK: Tensor | None = None) -> RoutingStats:
    """Statistics of one routing decision.

    Args:
        routing: the gate's decision.
        kept_TK: ``(T, K)`` bool, the slots the dispatch really computed
            (``None``: every valid slot).

    Returns:
        RoutingStats, all tensors detached and on the routing's device.
    """
    valid_TK = routing.valid()
    kept = valid_TK if kept_TK is None else kept_TK & valid_TK
    E = routing.num_experts
    ids = routing.experts_TK.masked_fill(~kept, E)
    tokens_per_expert_E = bin_counts(ids, E + 1)[:E].float()
    # A token with no kept slot is dropped whether the dispatch's capacity dropped its
    # slots or the gate chose none (expert choice leaves some tokens to no expert).
    kept_T = kept.sum(-1)
    T = routing.num_tokens
    p_TE = routing.probs_TE
    entropy = -(p_TE * torch.log(p_TE.clamp_min(1e-12))).sum(-1).mean()
    return RoutingStats(
        tokens_per_expert_E=tokens_per_expert_E,
        dropped_slots=(valid_TK & ~kept).sum().float(),
        dropped_tokens=(kept_T == 0).sum().float(),
        valid_slots=valid_TK.sum().float(),
        entropy=entropy,
        mean_weight_E=routing.dense_weights().mean(0),
        num_tokens=torch.tensor(float(T), device=kept.device),
        experts_per_token=kept_T.sum().float() / max(T, 1),
    )
