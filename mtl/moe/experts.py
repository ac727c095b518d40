"""Expert banks: ``E`` feed-forward experts with stacked weights ``(E, D, H)``.

A bank answers the two questions every dispatch asks:

* ``forward_all(x)`` runs every expert on every row (dense mixing in
  MMoE/PLE/HoME; shared experts) or each expert on its own rows (capacity
  buffers, per-expert inputs ``(E, T, D)``): one batched matmul per layer.
* ``forward_grouped(x_ND, counts_E)`` runs each expert on its own block of
  expert-sorted rows (sparse dropless dispatch): one grouped matmul per layer,
  through the bank's ``_grouped_mm`` (:mod:`mtl.moe.grouped`), the one method
  a faster kernel overrides.

:class:`GroupedExperts` is the base of the stacked banks (their matmul seam);
:class:`SwiGLUExperts` are the LLM experts; :class:`ExpertList` takes any
modules. The MLP experts of the recommenders (any depth, biases, per-expert
batch norm, dropout) are :class:`~mtl.moe.expert_bank.ExpertBank`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.moe.grouped import grouped_mm


class GroupedExperts(nn.Module):
    """Base of the stacked banks: the grouped-matmul seam they share.

    It takes no constructor arguments; a subclass sets ``num_experts`` and keeps
    its weights stacked ``(E, D, H)``, and every product of its forward goes
    through :meth:`_grouped_mm` (expert-sorted rows) or :meth:`_batched_mm`
    (dense inputs). Overriding these two methods swaps the kernel, or adds a
    term to every product, without touching the expert computation.

    Attributes:
        num_experts: ``E``.

    Shapes:
        ``_grouped_mm``: ``x_ND (N, D)``, ``w_EDH (E, D, H)``, ``counts_E (E,)``
        with ``N = counts_E.sum()`` -> ``(N, H)``; ``_batched_mm``: ``(T, D)`` or
        ``(E, T, D)`` -> ``(E, T, H)``.

    Example:
        >>> class LoopExperts(SwiGLUExperts):  # the same seam, one matmul per expert
        ...     def _grouped_mm(self, x_ND, w_EDH, counts_E):
        ...         blocks = x_ND.split(counts_E.tolist())
        ...         return torch.cat([x @ w for x, w in zip(blocks, w_EDH)])
        >>> bank = SwiGLUExperts(num_experts=3, d_model=4, d_hidden=8)
        >>> loop = LoopExperts(num_experts=3, d_model=4, d_hidden=8)
        >>> _ = loop.load_state_dict(bank.state_dict())
        >>> x_ND, counts_E = torch.randn(6, 4), torch.tensor([1, 3, 2])
        >>> torch.allclose(loop.forward_grouped(x_ND, counts_E), bank.forward_grouped(x_ND, counts_E))
        True
    """

    num_experts: int

    def _grouped_mm(self, x_ND: Tensor, w_EDH: Tensor, counts_E: Tensor) -> Tensor:
        """``x[rows of e] @ w_EDH[e]`` for every expert ``e`` (:func:`~mtl.moe.grouped.grouped_mm`).

        Override in a subclass to use another kernel with the same contract.
        """
        return grouped_mm(x_ND, w_EDH, counts_E)

    def _batched_mm(self, x: Tensor, w_EDH: Tensor) -> Tensor:
        """``x @ w_EDH``: a shared ``(T, D)`` or per-expert ``(E, T, D)`` input -> ``(E, T, H)``.

        The dense counterpart of :meth:`_grouped_mm`; a subclass that adds a
        term to every expert product (LoRA adapters) overrides both.
        """
        return x @ w_EDH


def hidden_mask(num_experts: int, width: int, hidden_sizes: Sequence[int]) -> Tensor:
    """``(E, H)`` 0/1 mask: expert ``e`` uses the first ``hidden_sizes[e]`` hidden units.

    Experts of unequal hidden width share one ``(E, D, H)`` tensor this way
    (neuron-split experts, HoME's expert sizes).

    Args:
        num_experts: ``E``.
        width: ``H``, the shared tensor's hidden width.
        hidden_sizes: ``E`` active widths, each in ``[1, H]``.

    Example:
        >>> hidden_mask(2, 3, [1, 3]).tolist()
        [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    """
    sizes = [int(h) for h in hidden_sizes]
    if len(sizes) != num_experts or not all(1 <= h <= width for h in sizes):
        raise ValueError(
            f"hidden_sizes must give {num_experts} widths in [1, {width}], got {sizes}"
        )
    return (torch.arange(width).unsqueeze(0) < torch.tensor(sizes).unsqueeze(1)).float()


class SwiGLUExperts(GroupedExperts):
    """``E`` SwiGLU experts ``E_e(x) = (silu(x W_gate_e) * (x W_up_e)) W_down_e`` (Mixtral, LLaMA).

    Args:
        num_experts: ``E``.
        d_model: ``D``, input and output width.
        d_hidden: ``H``, hidden width of every expert.
        hidden_sizes: per-expert active hidden width: expert ``e`` uses the
            first ``hidden_sizes[e]`` of the ``H`` units (neuron-split experts
            of unequal size sharing one tensor).

    Attributes:
        w_gate: ``(E, D, H)``, the activated branch.
        w_up: ``(E, D, H)``, the linear branch.
        w_down: ``(E, H, D)``.

    Shapes:
        forward_all: ``(T, D)`` or ``(E, T, D)`` -> ``(E, T, D)``.
        forward_grouped: ``(N, D)`` expert-sorted -> ``(N, D)``.

    Example:
        >>> experts = SwiGLUExperts(num_experts=4, d_model=16, d_hidden=32)
        >>> experts.forward_all(torch.randn(10, 16)).shape
        torch.Size([4, 10, 16])
    """

    def __init__(
        self,
        *,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        hidden_sizes: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if num_experts < 1 or d_model < 1 or d_hidden < 1:
            raise ValueError(
                f"num_experts, d_model and d_hidden must be >= 1, got {num_experts}, {d_model}, {d_hidden}"
            )
        self.num_experts, self.d_model, self.d_hidden = num_experts, d_model, d_hidden
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, d_hidden))
        self.w_up = nn.Parameter(torch.empty(num_experts, d_model, d_hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        mask_EH = None if hidden_sizes is None else hidden_mask(num_experts, d_hidden, hidden_sizes)
        self.register_buffer("hidden_mask_EH", mask_EH, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's distribution, drawn per expert
        for w in (self.w_gate, self.w_up, self.w_down):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)

    @property
    def d_in(self) -> int:
        return self.d_model

    @property
    def d_out(self) -> int:
        return self.d_model

    def forward_all(self, x: Tensor) -> Tensor:
        """Every expert on ``x (T, D)``, or expert ``e`` on ``x[e]`` for ``x (E, T, D)``."""
        # (T, D) @ (E, D, H) broadcasts to (E, T, H); (E, T, D) @ (E, D, H) is a bmm
        h_ETH = F.silu(self._batched_mm(x, self.w_gate)) * self._batched_mm(x, self.w_up)
        if self.hidden_mask_EH is not None:
            h_ETH = h_ETH * self.hidden_mask_EH.unsqueeze(1).to(h_ETH.dtype)
        return self._batched_mm(h_ETH, self.w_down)

    def forward_grouped(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        """Each expert on its own block of rows; ``x_ND`` sorted by expert, ``N = counts_E.sum()``."""
        h_NH = F.silu(self._grouped_mm(x_ND, self.w_gate, counts_E))
        h_NH = h_NH * self._grouped_mm(x_ND, self.w_up, counts_E)
        if self.hidden_mask_EH is not None:
            mask_NH = self.hidden_mask_EH.repeat_interleave(counts_E, 0, output_size=x_ND.shape[0])
            h_NH = h_NH * mask_NH.to(h_NH.dtype)
        return self._grouped_mm(h_NH, self.w_down, counts_E)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}"


class ExpertList(nn.Module):
    """Experts given as a list of arbitrary modules, evaluated one by one.

    Slower than a stacked bank but accepts any expert architecture. It
    implements the same two methods, so it plugs into every dispatch.

    Args:
        experts: modules mapping ``(N, D_in) -> (N, D_out)``.

    Example:
        >>> ex = ExpertList(experts=[nn.Linear(8, 4) for _ in range(3)])
        >>> ex.forward_all(torch.randn(5, 8)).shape
        torch.Size([3, 5, 4])
    """

    def __init__(self, *, experts: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(experts) == 0:
            raise ValueError("ExpertList needs at least one expert")
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(experts)

    def forward_all(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return torch.stack([m(x) for m in self.experts])
        return torch.stack([m(x[e]) for e, m in enumerate(self.experts)])

    def forward_grouped(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        blocks = x_ND.split(counts_E.tolist())
        return torch.cat([m(x) for m, x in zip(self.experts, blocks, strict=True)])
