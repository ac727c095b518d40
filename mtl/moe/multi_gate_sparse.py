"""Sparse compute for several gates over one expert bank: each expert runs only on its rows.

With sparse gates (top-k, noisy top-k, top-p, expert choice, sigmoid + bias) a
multi-gate mixture need not run every expert on every row and mix with zero
weights: :class:`MultiGateDroplessDispatch` gathers the ``(row, expert)`` pairs
that any gate chose, runs each expert once on its rows through the bank's
grouped matmul (``experts.forward_grouped``, the seam
:class:`~mtl.moe.dispatch.DroplessDispatch` uses) and gives each gate its weighted
sum of the rows it chose. A row that two gates send to one expert is computed once.
It also hands back what the experts computed (:class:`RoutedExpertOutputs`): the
collapse diagnostics read each expert's output distribution over its routed rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mtl.moe.dispatch import Experts
from mtl.moe.routing import RoutingResult


def is_sparse(routing: RoutingResult) -> bool:
    """Whether a routing uses only some experts per row: every gate but the dense ones.

    Dense gates (:class:`~mtl.moe.gates.DenseSoftmaxGate`, HoME's self gates) hand
    back their ``(T, E)`` weights as ``dense_TE``, masked experts included; a sparse
    gate's weights live in its ``K`` slots only.
    """
    return routing.dense_TE is None


def routed_pairs_ET(routings: Sequence[RoutingResult], num_experts: int) -> Tensor:
    """``(E, T)`` bool: whether any gate chose expert ``e`` for row ``t`` (a valid slot).

    Example:
        >>> r = RoutingResult(weights_TK=torch.ones(3, 1), experts_TK=torch.tensor([[1], [0], [1]]),
        ...                   logits_TE=torch.zeros(3, 2), probs_TE=torch.full((3, 2), 0.5))
        >>> routed_pairs_ET([r, r], 2).int().tolist()
        [[0, 1, 0], [1, 0, 1]]
    """
    T = routings[0].num_tokens
    device = routings[0].experts_TK.device
    used_TE = torch.zeros(T, num_experts + 1, dtype=torch.bool, device=device)
    for r in routings:
        # invalid slots go to the sentinel column E, dropped below
        ids_TK = r.experts_TK.masked_fill(~r.valid(), num_experts)
        used_TE.scatter_(1, ids_TK, True)
    return used_TE[:, :num_experts].T


@dataclass
class RoutedExpertOutputs:
    """Each expert's outputs on the rows routed to it (sparse compute), expert by expert.

    Under sparse compute an expert sees only the rows some gate chose for it, so
    there is no ``(E, T, D)`` tensor of every expert's output on every row; the
    statistics of an expert's outputs (mean, std, zero fraction) are taken over
    the rows it computed.

    Attributes:
        outputs_ND: ``(N, D_out)`` the outputs of the ``N`` chosen ``(row, expert)``
            pairs, expert 0's block first, each block in row order.
        counts_E: ``(E,)`` int64 rows each expert computed (the block sizes).

    Example:
        >>> y = RoutedExpertOutputs(outputs_ND=torch.arange(6.0).view(3, 2),
        ...                         counts_E=torch.tensor([2, 0, 1]))
        >>> y.num_experts, y.experts_N().tolist(), [b.tolist() for b in y.per_expert()]
        (3, [0, 0, 2], [[[0.0, 1.0], [2.0, 3.0]], [], [[4.0, 5.0]]])
    """

    outputs_ND: Tensor
    counts_E: Tensor

    @property
    def num_experts(self) -> int:
        return int(self.counts_E.numel())

    def experts_N(self) -> Tensor:
        """``(N,)`` the expert of each output row."""
        ids_E = torch.arange(self.num_experts, device=self.counts_E.device)
        return ids_E.repeat_interleave(self.counts_E, output_size=self.outputs_ND.shape[0])

    def per_expert(self) -> list[Tensor]:
        """``E`` blocks ``(N_e, D_out)``, one per expert (a host sync: for inspection)."""
        return list(self.outputs_ND.split(self.counts_E.tolist()))


class SparseMixResult(NamedTuple):
    """What :class:`MultiGateDroplessDispatch` returns: one ``(T, D_out)`` output per
    gate, in the order of the routings, and what the experts computed.

    Attributes:
        outputs: ``G`` tensors ``(T, D_out)``, gate ``g``'s mixture for every row.
        computed: the experts' ``(N, D_out)`` outputs on the ``N`` chosen
            ``(row, expert)`` pairs (:class:`RoutedExpertOutputs`).

    Example:
        >>> from mtl.moe import ExpertBank, TopKGate
        >>> bank = ExpertBank(num_experts=3, dims=[4, 2])
        >>> x = torch.randn(6, 4)
        >>> res = MultiGateDroplessDispatch()(x, [TopKGate(d_model=4, num_experts=3, k=1)(x)], bank)
        >>> len(res.outputs), res.outputs[0].shape, res.computed.outputs_ND.shape  # one pair per row
        (1, torch.Size([6, 2]), torch.Size([6, 2]))
    """

    outputs: list[Tensor]
    computed: RoutedExpertOutputs


class MultiGateDroplessDispatch(nn.Module):
    """Dropless sparse dispatch for ``G`` gates sharing one expert bank.

    The union over gates of the chosen ``(row, expert)`` pairs is listed expert
    by expert (``N`` rows, each expert's block in row order), each pair gathers
    its row's input, the experts run on their blocks with one grouped matmul per
    layer (``experts.forward_grouped``), and gate ``g``'s output for row ``t`` is
    ``sum_j w_g[t, j] * y[(t, e_g[t, j])]`` over its valid slots. Equal to the
    dense mixture with the gates' (sparse) weights, at the cost of the chosen
    pairs only. With one gate it computes what
    :class:`~mtl.moe.dispatch.DroplessDispatch` computes. The experts' outputs
    come back too (:class:`RoutedExpertOutputs`), for the diagnostics.

    Runs eagerly under ``torch.compile`` (the number of pairs is data-dependent:
    one host sync).

    Args (of ``forward``; the dispatch itself has no parameters):
        x: the input, shared by every expert or one per expert.
        routings: one :class:`~mtl.moe.RoutingResult` per gate, all over the same ``T`` rows.
        experts: a bank with ``num_experts`` and ``forward_grouped``.

    Shapes:
        ``x (T, D)`` shared or ``(E, T, D)`` one input per expert; each routing
        ``(T, K_g)`` -> :class:`SparseMixResult`: ``G`` outputs ``(T, D_out)`` and
        the ``(N, D_out)`` expert outputs.

    Example:
        >>> from mtl.moe import ExpertBank, TopKGate
        >>> bank = ExpertBank(num_experts=4, dims=[8, 6])
        >>> x = torch.randn(5, 8)
        >>> routings = [TopKGate(d_model=8, num_experts=4, k=2)(x) for _ in range(2)]
        >>> outs, computed = MultiGateDroplessDispatch()(x, routings, bank)
        >>> dense = [(bank.forward_all(x) * r.dense_weights().T.unsqueeze(-1)).sum(0) for r in routings]
        >>> all(torch.allclose(o, d, atol=1e-6) for o, d in zip(outs, dense))
        True
        >>> computed.counts_E.sum().item() <= 2 * 5 * 2  # each chosen (row, expert) pair once
        True
    """

    @torch.compiler.disable
    def forward(
        self, x: Tensor, routings: Sequence[RoutingResult], experts: Experts
    ) -> SparseMixResult:
        if not routings:
            raise ValueError("MultiGateDroplessDispatch needs at least one routing")
        E = experts.num_experts
        T = routings[0].num_tokens
        if x.dim() == 3 and x.shape[0] != E:
            raise ValueError(f"per-expert inputs must be ({E}, T, D), got {tuple(x.shape)}")
        if x.shape[-2] != T:
            raise ValueError(f"the input has {x.shape[-2]} rows but the gates routed {T}")
        used_ET = routed_pairs_ET(routings, E)
        # nonzero lists the pairs expert-major: the block layout forward_grouped expects
        e_N, t_N = used_ET.nonzero(as_tuple=True)
        counts_E = used_ET.sum(1)
        x_ND = x.index_select(0, t_N) if x.dim() == 2 else x[e_N, t_N]
        y_ND = experts.forward_grouped(x_ND, counts_E)
        N, D_out = y_ND.shape
        # row of pair (t, e) in y; N (a zero row) for pairs no gate chose
        row_TE = torch.full((T, E), N, dtype=torch.long, device=y_ND.device)
        row_TE[t_N, e_N] = torch.arange(N, device=y_ND.device)
        y_rows = torch.cat([y_ND, y_ND.new_zeros(1, D_out)])
        outputs = []
        for r in routings:
            valid_TK = r.valid()
            rows_TK = row_TE.gather(1, r.experts_TK).masked_fill(~valid_TK, N)
            w_TK = r.weights_TK.masked_fill(~valid_TK, 0.0).to(y_ND.dtype)
            y_TKD = y_rows.index_select(0, rows_TK.reshape(-1)).view(*rows_TK.shape, D_out)
            outputs.append(torch.bmm(w_TK.unsqueeze(1), y_TKD).squeeze(1))
        return SparseMixResult(outputs, RoutedExpertOutputs(outputs_ND=y_ND, counts_E=counts_E))
