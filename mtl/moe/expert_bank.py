"""The recommenders' MLP experts: ``E`` MLPs of one shape, each layer's weights stacked.

:class:`ExpertBank` builds on :class:`~mtl.moe.experts.GroupedExperts` (the
batched and grouped matmuls every stacked bank multiplies through), so it
serves dense mixing (MMoE/PLE/HoME, ``forward_all``) and sparse dispatch
(``forward_grouped``) alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.moe.experts import GroupedExperts, hidden_mask

__all__ = ["Activation", "ExpertBank"]

Activation = Literal["relu", "gelu", "silu", "swish", "identity"]
_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "swish": F.silu,
    "identity": lambda x: x,
}


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
        mask_EH = None if hidden_sizes is None else hidden_mask(num_experts, dims[1], hidden_sizes)
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

    def forward_all_projected(self, z_TX: Tensor) -> Tensor:
        """:meth:`forward_all` of a shared input ``x`` given ``z_TX = x @ first_layer_weight()``.

        Args:
            z_TX: ``(T, E*H)`` first-layer products.

        Returns:
            ``(E, T, D_out)``, a view of a ``(T, E, D_out)`` tensor.
        """
        E, _, H = self.weights[0].shape
        if z_TX.dim() != 2 or z_TX.shape[1] != E * H:
            raise ValueError(f"first-layer products must be (T, {E * H}), got {tuple(z_TX.shape)}")
        h_TEH = self._finish_layer(0, z_TX.reshape(z_TX.shape[0], E, H))
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
