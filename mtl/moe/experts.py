"""Expert banks: ``E`` feed-forward experts with stacked weights ``(E, D, H)``.

A bank answers the two questions every dispatch asks:

* ``forward_all(x)`` runs every expert on every row (dense mixing in
  MMoE/PLE/HoME; shared experts) or each expert on its own rows (capacity
  buffers, per-expert inputs ``(E, T, D)``): one batched matmul per layer.
* ``forward_grouped(x_ND, counts_E)`` runs each expert on its own block of
  expert-sorted rows (sparse dropless dispatch): one grouped matmul per layer,
  through the bank's ``_grouped_mm`` (:mod:`mtl.moe.grouped`), the one method
  a faster kernel overrides.

:class:`SwiGLUExperts` are the LLM experts; :class:`ExpertBank` the MLP experts
of the recommenders (any depth, biases, per-expert batch norm, dropout);
:class:`ExpertList` takes any modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.moe.grouped import grouped_mm

Activation = Literal["relu", "gelu", "silu", "swish", "identity"]
_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "swish": F.silu,
    "identity": lambda x: x,
}


class GroupedExperts(nn.Module):
    """Base of the stacked banks: the grouped-matmul seam they share."""

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


def _hidden_mask(num_experts: int, width: int, hidden_sizes: Sequence[int]) -> Tensor:
    """``(E, H)`` 0/1 mask: expert ``e`` uses the first ``hidden_sizes[e]`` hidden units."""
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
        mask_EH = (
            None if hidden_sizes is None else _hidden_mask(num_experts, d_hidden, hidden_sizes)
        )
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


class ExpertBank(GroupedExperts):
    """``E`` MLP experts of identical shape, layer ``l``'s weights stacked as ``(E, D_l, D_l+1)``.

    Hidden layers are ``Linear -> [BatchNorm] -> activation -> Dropout``; the
    last layer is activated (and normalised) only with ``activate_last``
    (recommender experts whose output is a representation, e.g. MMoE's
    ``ReLU(Linear(x))``).

    Args:
        num_experts: ``E``.
        dims: layer widths ``[D_in, H_1, ..., D_out]`` (at least two entries).
        activation: one of relu, gelu, silu/swish, identity.
        bias: learn per-expert biases.
        activate_last: activate (and normalise) the output layer too.
        norm: ``"batch"`` normalises each expert's pre-activations with its own
            batch statistics (HoME's expert normalisation); dense use only.
        hidden_sizes: per-expert active width of the hidden layer (two-layer
            experts only): expert ``e`` uses the first ``hidden_sizes[e]`` of
            ``dims[1]`` units, so experts of different sizes share one tensor.
        dropout: dropout after every activated layer, in training (where
            torch-rechub's and DeepCTR's expert MLPs drop).

    Shapes:
        forward_all: ``(T, D_in)`` or ``(E, T, D_in)`` -> ``(E, T, D_out)``.
        forward_grouped: ``(N, D_in)`` expert-sorted -> ``(N, D_out)``.

    Example:
        >>> bank = ExpertBank(num_experts=4, dims=[16, 32, 8], activation="relu", bias=True)
        >>> bank.forward_all(torch.randn(10, 16)).shape
        torch.Size([4, 10, 8])
    """

    def __init__(
        self,
        *,
        num_experts: int,
        dims: Sequence[int],
        activation: Activation = "gelu",
        bias: bool = False,
        activate_last: bool = False,
        norm: Literal["batch"] | None = None,
        hidden_sizes: Sequence[int] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dims = [int(d) for d in dims]
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if len(dims) < 2 or min(dims) < 1:
            raise ValueError(f"dims must list at least two positive widths, got {dims}")
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        if norm not in (None, "batch"):
            raise ValueError(f"norm must be None or 'batch', got {norm!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if hidden_sizes is not None and len(dims) != 3:
            raise ValueError("hidden_sizes needs two-layer experts (dims=[D, H, D_out])")
        self.num_experts = num_experts
        self.dims = dims
        self.activation = activation
        self.activate_last = activate_last
        self.dropout = float(dropout)
        self.num_layers = len(dims) - 1
        self._act = _ACTIVATIONS[activation]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, dims[i], dims[i + 1]))
            for i in range(self.num_layers)
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, dims[i + 1]))
            for i in range(self.num_layers if bias else 0)
        )
        n_activated = self.num_layers if activate_last else self.num_layers - 1
        # one BatchNorm1d over the E*H units of a layer: each expert's units get their own statistics
        self.norms = nn.ModuleList(
            nn.BatchNorm1d(num_experts * dims[i + 1])
            for i in range(n_activated if norm == "batch" else 0)
        )
        mask_EH = None if hidden_sizes is None else _hidden_mask(num_experts, dims[1], hidden_sizes)
        self.register_buffer("hidden_mask_EH", mask_EH, persistent=False)
        self.reset_parameters()

    @classmethod
    def from_modules(cls, modules: Sequence[nn.Module], **kw: object) -> ExpertBank:
        """Stack a list of identical ``nn.Sequential(Linear, act, Linear, ...)`` experts.

        The Linear layers are copied in order; activation and bias settings come
        from ``kw`` (they must match the modules for the outputs to match).
        """
        linears = [[m for m in mod.modules() if isinstance(m, nn.Linear)] for mod in modules]
        if not linears or not linears[0] or any(len(ls) != len(linears[0]) for ls in linears):
            raise ValueError("from_modules needs experts with the same number of nn.Linear layers")
        dims = [linears[0][0].in_features] + [lin.out_features for lin in linears[0]]
        has_bias = linears[0][0].bias is not None
        bank = cls(num_experts=len(modules), dims=dims, bias=has_bias, **kw)  # type: ignore[arg-type]
        with torch.no_grad():
            for e, ls in enumerate(linears):
                for i, lin in enumerate(ls):
                    bank.weights[i][e].copy_(lin.weight.T)
                    if has_bias:
                        bank.biases[i][e].copy_(lin.bias)
        return bank

    def reset_parameters(self) -> None:
        # nn.Linear's distribution, drawn per expert
        for i, w in enumerate(self.weights):
            bound = 1.0 / math.sqrt(self.dims[i])
            nn.init.uniform_(w, -bound, bound)
            if i < len(self.biases):
                nn.init.uniform_(self.biases[i], -bound, bound)

    @property
    def d_in(self) -> int:
        return self.dims[0]

    @property
    def d_out(self) -> int:
        return self.dims[-1]

    def forward_all(self, x: Tensor) -> Tensor:
        """Every expert on its input rows.

        Args:
            x: ``(T, D_in)`` shared by all experts, or ``(E, T, D_in)`` one input per expert.

        Returns:
            ``(E, T, D_out)``, a view of a ``(T, E, D_out)`` tensor.
        """
        if x.shape[-1] != self.d_in:
            raise ValueError(f"expert input has width {x.shape[-1]}, experts expect {self.d_in}")
        if x.dim() == 2:
            # Shared input: the first layer of all experts is one (T, D) @ (D, E*H)
            # matmul, whose (T, E*H) layout is also the batch norm's.
            return self.forward_all_projected(x @ self.first_layer_weight().to(x.dtype))
        return self._layers_from(0, x.transpose(0, 1))  # (T, E, D) view

    def first_layer_weight(self) -> Tensor:
        """The first layer of all experts on a shared input, as one ``(D_in, E*H)`` matrix.

        Expert ``e``'s ``H`` units are columns ``[e*H, (e+1)*H)``. A shared input
        gives ``forward_all(x) == forward_all_projected(x @ first_layer_weight())``,
        which lets a caller fuse more columns (gate logits) into the same matmul.
        """
        E, D, H = self.weights[0].shape
        return self.weights[0].permute(1, 0, 2).reshape(D, E * H)

    def forward_all_projected(self, z_TN: Tensor) -> Tensor:
        """:meth:`forward_all` of a shared input ``x`` given ``z_TN = x @ first_layer_weight()``.

        Args:
            z_TN: ``(T, E*H)`` first-layer products.

        Returns:
            ``(E, T, D_out)``, a view of a ``(T, E, D_out)`` tensor.
        """
        E, _, H = self.weights[0].shape
        if z_TN.dim() != 2 or z_TN.shape[1] != E * H:
            raise ValueError(f"first-layer products must be (T, {E * H}), got {tuple(z_TN.shape)}")
        h_TEH = self._finish_layer(0, z_TN.reshape(z_TN.shape[0], E, H))
        return self._layers_from(1, h_TEH)

    def _layers_from(self, first: int, h_TED: Tensor) -> Tensor:
        """Layers ``first..`` on per-expert rows ``(T, E, D)`` -> ``(E, T, D_out)`` view."""
        for i in range(first, self.num_layers):
            h_TED = self._finish_layer(i, torch.einsum("ted,edh->teh", h_TED, self.weights[i]))
        return h_TED.transpose(0, 1)

    def _finish_layer(self, i: int, z_TEH: Tensor) -> Tensor:
        """Bias, batch norm, activation, hidden mask and dropout of layer ``i``."""
        if i < len(self.biases):
            z_TEH = z_TEH + self.biases[i]
        if not self._is_activated(i):
            return z_TEH
        if i < len(self.norms):
            T, E, H = z_TEH.shape
            z_TEH = self.norms[i](z_TEH.reshape(T, E * H)).view(T, E, H)
        h_TEH = self._act(z_TEH)
        if i == 0 and self.hidden_mask_EH is not None:
            h_TEH = h_TEH * self.hidden_mask_EH.to(h_TEH.dtype)
        return F.dropout(h_TEH, self.dropout, self.training)

    def _is_activated(self, layer: int) -> bool:
        return layer < self.num_layers - 1 or self.activate_last

    def forward_grouped(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        """Each expert on its own block of rows.

        Args:
            x_ND: ``(N, D_in)`` rows sorted by expert, ``N = counts_E.sum()``.
            counts_E: ``(E,)`` int64 rows per expert.

        Returns:
            ``(N, D_out)``.
        """
        if self.norms:
            raise ValueError(
                "norm='batch' experts need dense dispatch (batch statistics per expert)"
            )
        N = x_ND.shape[0]
        h_NH = x_ND
        for i, w_EDH in enumerate(self.weights):
            z_NH = self._grouped_mm(h_NH, w_EDH, counts_E)
            if i < len(self.biases):
                z_NH = z_NH + self.biases[i].repeat_interleave(counts_E, 0, output_size=N)
            if self._is_activated(i):
                z_NH = self._act(z_NH)
                if i == 0 and self.hidden_mask_EH is not None:
                    mask_NH = self.hidden_mask_EH.repeat_interleave(counts_E, 0, output_size=N)
                    z_NH = z_NH * mask_NH.to(z_NH.dtype)
                z_NH = F.dropout(z_NH, self.dropout, self.training)
            h_NH = z_NH
        return h_NH

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, dims={self.dims}, activation={self.activation}, "
            f"bias={bool(len(self.biases))}, norm={'batch' if self.norms else None}, "
            f"dropout={self.dropout}"
        )


class ExpertList(nn.Module):
    """Experts given as a list of arbitrary modules, evaluated one by one.

    Slower than a stacked bank but accepts any expert architecture. It
    implements the same two methods, so it plugs into every dispatch.

    Args:
        experts: modules mapping ``(N, D_in) -> (N, D_out)``.

    Example:
        >>> ex = ExpertList([nn.Linear(8, 4) for _ in range(3)])
        >>> ex.forward_all(torch.randn(5, 8)).shape
        torch.Size([3, 5, 4])
    """

    def __init__(self, experts: Sequence[nn.Module]) -> None:
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
