"""Per-layer expert load over an evaluation: the vector a run records in ``metrics.json``.

Each MoE layer's :class:`~mtl.moe.RoutingStats` counts the token slots each expert
computed in one batch (``tokens_per_expert_E``). :class:`ExpertLoad` adds them up
over the batches of an evaluation, on the device (no host sync per batch), and
hands back plain lists once at the end.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from mtl.moe import RoutingStats


class ExpertLoad:
    """Token slots each expert computed, per MoE layer, summed over batches.

    Example:
        >>> import torch
        >>> from mtl.moe import RoutingResult, routing_stats
        >>> r = RoutingResult(weights_TK=torch.ones(3, 1), experts_TK=torch.tensor([[0], [2], [2]]),
        ...                   logits_TE=torch.zeros(3, 3), probs_TE=torch.full((3, 3), 1 / 3))
        >>> load = ExpertLoad()
        >>> for _ in range(2):
        ...     load.update({1: routing_stats(r)})
        >>> load.as_dict("val/moe/")
        {'val/moe/layer1/tokens_per_expert': [2.0, 0.0, 4.0]}
    """

    def __init__(self) -> None:
        self._sum_E: dict[int, Tensor] = {}

    def reset(self) -> None:
        """Forget every batch seen so far (call at the start of an evaluation)."""
        self._sum_E = {}

    def update(self, stats: Mapping[int, RoutingStats]) -> None:
        """Add one batch's per-layer statistics (layer index -> stats)."""
        for i, st in stats.items():
            load_E = st.tokens_per_expert_E.detach()
            self._sum_E[i] = self._sum_E[i] + load_E if i in self._sum_E else load_E.clone()

    def as_dict(self, prefix: str = "") -> dict[str, list[float]]:
        """``{f"{prefix}layer{i}/tokens_per_expert": [count per expert]}``, layers in order.

        Args:
            prefix: put before every key, e.g. ``"val/moe/"``.
        """
        return {
            f"{prefix}layer{i}/tokens_per_expert": self._sum_E[i].float().cpu().tolist()
            for i in sorted(self._sum_E)
        }
