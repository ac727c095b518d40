"""Per-layer expert load over an evaluation: the vector a run records in ``metrics.json``.

Each MoE layer's :class:`~mtl.moe.RoutingStats` counts the token slots each expert
computed in one batch (``tokens_per_expert_E``); a multi-gate ranker reports the
(row, gate) slots each expert of each level received
(:attr:`~mtl.models.rec.output.MultiTaskOutput.expert_load`). :class:`ExpertLoad`
adds them up over the batches of an evaluation, on the device (no host sync per
batch), sums them over the ranks of a distributed run once at the end
(:meth:`ExpertLoad.reduce`), and hands back plain lists. :func:`log_load_histograms`
draws each vector in TensorBoard: a bar chart per expert (an image) and a histogram
whose buckets are the experts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtl.moe import RoutingStats
from mtl.moe.routing_sums import SumOverRanks

LOAD_SUFFIX = "/tokens_per_expert"


class ExpertLoad:
    """Token slots each expert computed, per MoE layer, summed over batches (and ranks).

    Example:
        >>> from mtl.moe import RoutingResult, routing_stats
        >>> r = RoutingResult(weights_TK=torch.ones(3, 1), experts_TK=torch.tensor([[0], [2], [2]]),
        ...                   logits_TE=torch.zeros(3, 3), probs_TE=torch.full((3, 3), 1 / 3))
        >>> load = ExpertLoad()
        >>> for _ in range(2):
        ...     load.update({1: routing_stats(r)})
        >>> load.as_dict("val/moe/")
        {'val/moe/layer1/tokens_per_expert': [2.0, 0.0, 4.0]}
        >>> load.reduce(lambda t: 2 * t)  # two ranks that saw the same batches
        >>> load.as_dict()
        {'layer1/tokens_per_expert': [4.0, 0.0, 8.0]}
    """

    def __init__(self) -> None:
        self._sum_E: dict[int, Tensor] = {}

    def reset(self) -> None:
        """Forget every batch seen so far (call at the start of an evaluation)."""
        self._sum_E = {}

    @property
    def has_data(self) -> bool:
        return bool(self._sum_E)

    def update(self, stats: Mapping[int, RoutingStats]) -> None:
        """Add one batch's per-layer statistics (layer index -> stats)."""
        self.add({i: st.tokens_per_expert_E for i, st in stats.items()})

    def add(self, loads: Mapping[int, Tensor]) -> None:
        """Add one batch's per-layer load vectors (layer index -> ``(E,)`` counts)."""
        for i, load_E in loads.items():
            load_E = load_E.detach().double()  # exact counts over long evaluations
            self._sum_E[i] = self._sum_E[i] + load_E if i in self._sum_E else load_E.clone()

    def reduce(self, reduce_sum: SumOverRanks) -> None:
        """Replace the sums by their sums over the ranks (one collective call).

        Every rank must have seen the same layers with the same expert counts (at
        least one evaluation batch each).

        Args:
            reduce_sum: sums a tensor over the ranks (``strategy.reduce(t, "sum")``,
                ``dist.all_reduce``).
        """
        layers = sorted(self._sum_E)
        if not layers:
            return
        parts = [self._sum_E[i] for i in layers]
        total = reduce_sum(torch.cat(parts))
        self._sum_E = dict(zip(layers, total.split([len(p) for p in parts]), strict=True))

    def vectors(self) -> dict[int, Tensor]:
        """Layer index -> ``(E,)`` float64 summed load, layers in order."""
        return {i: self._sum_E[i] for i in sorted(self._sum_E)}

    def as_dict(self, prefix: str = "") -> dict[str, list[float]]:
        """``{f"{prefix}layer{i}/tokens_per_expert": [count per expert]}``, layers in order.

        Args:
            prefix: put before every key, e.g. ``"val/moe/"``.
        """
        return {
            f"{prefix}layer{i}{LOAD_SUFFIX}": v.float().cpu().tolist()
            for i, v in self.vectors().items()
        }


def log_load_histograms(
    loggers: Iterable[Any], loads: Mapping[str, Sequence[float]], step: int
) -> int:
    """Draw each load vector in every TensorBoard logger among ``loggers``.

    Per vector, an image (a bar per expert, ``add_figure``) and a histogram whose
    bucket ``e`` holds expert ``e``'s load (``add_histogram_raw``: the histogram tab
    shows how the load moves over the evaluations). Other loggers are skipped.

    Args:
        loggers: Lightning loggers (``trainer.loggers``).
        loads: ``{tag: per-expert load}``, e.g. :meth:`ExpertLoad.as_dict`'s result.
        step: the global step the values belong to.

    Returns:
        How many TensorBoard writers received the vectors.
    """
    from pytorch_lightning.loggers import TensorBoardLogger

    writers = [lg.experiment for lg in loggers if isinstance(lg, TensorBoardLogger)]
    writers = [w for w in writers if hasattr(w, "add_histogram_raw")]  # rank 0 only
    if not writers or not loads:
        return 0
    # A bare Figure renders without a display and leaves pyplot's state and backend alone.
    from matplotlib.figure import Figure

    for tag, load in loads.items():
        counts = [float(v) for v in load]
        E = len(counts)
        total = sum(counts)
        fig = Figure(figsize=(max(3.0, 0.35 * E + 1.5), 2.5))
        ax = fig.subplots()
        ax.bar(range(E), counts, color="tab:blue")
        if total > 0:  # the balanced share, for reading the bars
            ax.axhline(total / E, color="tab:red", linewidth=1, linestyle="--")
        ax.set_xlabel("expert")
        ax.set_ylabel("slots")
        ax.set_title(tag, fontsize=8)
        fig.tight_layout()
        # expert e's bucket is (e - 1, e]: its right edge is the expert id
        ids = torch.arange(E, dtype=torch.float64)
        weights = torch.tensor(counts, dtype=torch.float64)
        for writer in writers:
            writer.add_figure(f"{tag}/bars", fig, global_step=step, close=False)
            writer.add_histogram_raw(
                tag,
                min=0.0,
                max=float(E - 1),
                num=total,
                sum=float((ids * weights).sum()),
                sum_squares=float((ids.square() * weights).sum()),
                bucket_limits=ids.tolist(),
                bucket_counts=counts,
                global_step=step,
            )
    return len(writers)
