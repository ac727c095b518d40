"""Expert banks: E feed-forward experts with stacked weights ``[E, D, H]``.

An expert bank answers two questions, so that every dispatch can use it:

* :meth:`ExpertBank.forward_all` runs every expert on every row (dense mixing,
  MMoE/PLE/HoME) or each expert on its own rows (capacity buffers, per-expert
  inputs such as HoME feature gates): one batched matmul per layer.
* :meth:`ExpertBank.forward_grouped` runs each expert on its own jagged slice of
  expert-sorted rows (sparse dropless dispatch): one grouped matmul per layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.moe.dropout import fast_dropout
from mtl.moe.grouped import _compute_dtype, grouped_matmul
from mtl.moe.norm_act import batch_norm_relu_dropout

Activation = Literal["relu", "gelu", "silu", "swish", "identity"]
_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "swish": F.silu,
    "identity": lambda x: x,
}


class _BatchedSwiGLU(torch.autograd.Function):
    """``y = (silu(x W1) * (x W3)) W2`` for per-expert row blocks ``x (E, C, D)``.

    One batched matmul per projection and a hand-written backward: the
    activation's gradient is formed in place, the two input-gradient products
    share one output (``baddbmm``), and only ``x``, the two pre-activations and
    the gated hidden state are kept for the backward (autograd's graph would
    also keep ``silu(x W1)``).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x_ECD: Tensor, w1_EDH: Tensor, w3_EDH: Tensor, w2_EHO: Tensor
    ) -> Tensor:
        # under autocast, compute in the autocast dtype in both passes and hand
        # gradients back in the inputs' own dtypes
        ctx.dtypes = (x_ECD.dtype, w1_EDH.dtype, w3_EDH.dtype, w2_EHO.dtype)
        dt = _compute_dtype(x_ECD)
        x_ECD, w1_EDH, w3_EDH, w2_EHO = (t.to(dt) for t in (x_ECD, w1_EDH, w3_EDH, w2_EHO))
        with torch.autocast(x_ECD.device.type, enabled=False):
            h1 = torch.bmm(x_ECD, w1_EDH)
            h3 = torch.bmm(x_ECD, w3_EDH)
            a = F.silu(h1).mul_(h3)
            y = torch.bmm(a, w2_EHO)
        ctx.save_for_backward(x_ECD, w1_EDH, w3_EDH, w2_EHO, h1, h3, a)
        return y

    @staticmethod
    def backward(ctx, grad_ECO: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        x, w1, w3, w2, h1, h3, a = ctx.saved_tensors
        grad_ECO = grad_ECO.to(a.dtype).contiguous()
        grad_w2 = torch.bmm(a.transpose(1, 2), grad_ECO)
        grad_a = torch.bmm(grad_ECO, w2.transpose(1, 2))
        grad_h3 = F.silu(h1).mul_(grad_a)
        # grad_h1 = silu'(h1) * grad_a * h3, written over grad_a (same elements)
        grad_h1 = grad_a.mul_(h3)
        torch.ops.aten.silu_backward.grad_input(grad_h1, h1, grad_input=grad_h1)
        grad_x = torch.bmm(grad_h1, w1.transpose(1, 2)).baddbmm_(grad_h3, w3.transpose(1, 2))
        grad_w1 = torch.bmm(x.transpose(1, 2), grad_h1)
        grad_w3 = torch.bmm(x.transpose(1, 2), grad_h3)
        grads = (grad_x, grad_w1, grad_w3, grad_w2)
        return tuple(g.to(d) for g, d in zip(grads, ctx.dtypes, strict=True))


class ExpertBank(nn.Module):
    """``E`` MLP experts of identical shape, weights stacked as ``[E, D_in, D_out]``.

    Layer ``l`` maps ``dims[l] -> dims[l + 1]``. Hidden layers are activated;
    the last is activated only with ``activate_last`` (recommender experts whose
    output is a representation, e.g. MMoE's ``ReLU(Linear(x))``). With ``glu``
    every hidden layer is gated, ``act(x W) * (x V)`` (SwiGLU with ``silu``).

    Args:
        num_experts: ``E``.
        dims: layer widths ``[D_in, H_1, ..., D_out]`` (at least two entries).
        activation: one of relu, gelu, silu/swish, identity.
        glu: gate hidden layers (SwiGLU/GeGLU); ignored for one-layer experts.
        bias: learn per-expert biases.
        activate_last: activate (and normalise) the output layer too.
        norm: ``"batch"`` normalises each expert's pre-activations with its own
            batch-norm statistics (HoME expert normalisation). Dense use only.
        hidden_sizes: per-expert active width of the hidden layer (two-layer
            experts only): expert ``e`` uses the first ``hidden_sizes[e]`` of
            ``dims[1]`` units, so experts of different sizes share one tensor.
        dropout: dropout after every activated layer, in training
            (:func:`~mtl.moe.dropout.fast_dropout`; torch-rechub's and
            DeepCTR's expert MLPs drop there).

    Shapes:
        forward_all: ``(T, D_in)`` or ``(E, T, D_in)`` -> ``(E, T, D_out)``.
        forward_grouped: ``(N, D_in)`` expert-sorted -> ``(N, D_out)``.

    Example:
        >>> bank = ExpertBank(num_experts=4, dims=[16, 32, 16], activation="silu", glu=True)
        >>> bank.forward_all(torch.randn(10, 16)).shape
        torch.Size([4, 10, 16])
    """

    def __init__(
        self,
        *,
        num_experts: int,
        dims: Sequence[int],
        activation: Activation = "gelu",
        glu: bool = False,
        bias: bool = False,
        activate_last: bool = False,
        norm: Literal["batch"] | None = None,
        hidden_sizes: Sequence[int] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dims = [int(d) for d in dims]
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = float(dropout)
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
        self.num_experts = num_experts
        self.dims = dims
        self.activation = activation
        self.activate_last = activate_last
        self.num_layers = len(dims) - 1
        self.glu = glu and self.num_layers > 1
        self._act = _ACTIVATIONS[activation]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, dims[i], dims[i + 1]))
            for i in range(self.num_layers)
        )
        self.gate_weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, dims[i], dims[i + 1]))
            for i in range(self.num_layers - 1 if self.glu else 0)
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, dims[i + 1]))
            for i in range(self.num_layers if bias else 0)
        )
        n_activated = self.num_layers if activate_last else self.num_layers - 1
        self.norms = nn.ModuleList(
            nn.BatchNorm1d(num_experts * dims[i + 1])
            for i in range(n_activated if norm == "batch" else 0)
        )
        if hidden_sizes is not None:
            hidden_sizes = [int(h) for h in hidden_sizes]
            if self.num_layers != 2:
                raise ValueError("hidden_sizes needs two-layer experts (dims=[D, H, D_out])")
            if len(hidden_sizes) != num_experts or not all(1 <= h <= dims[1] for h in hidden_sizes):
                raise ValueError(
                    f"hidden_sizes must give {num_experts} widths in [1, {dims[1]}], got {hidden_sizes}"
                )
            mask_EH = torch.arange(dims[1]).unsqueeze(0) < torch.tensor(hidden_sizes).unsqueeze(1)
            self.register_buffer("hidden_mask_EH", mask_EH.float(), persistent=False)
        else:
            self.hidden_mask_EH = None
        self.reset_parameters()

    @classmethod
    def swiglu(cls, *, num_experts: int, d_model: int, d_hidden: int, **kw: object) -> ExpertBank:
        """LLM-style SwiGLU experts ``D -> H -> D``."""
        return cls(
            num_experts=num_experts,
            dims=[d_model, d_hidden, d_model],
            activation="silu",
            glu=True,
            **kw,
        )  # type: ignore[arg-type]

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
        if bank.glu:
            raise ValueError("from_modules does not map GLU experts; build ExpertBank directly")
        with torch.no_grad():
            for e, ls in enumerate(linears):
                for i, lin in enumerate(ls):
                    bank.weights[i][e].copy_(lin.weight.T)
                    if has_bias:
                        bank.biases[i][e].copy_(lin.bias)
        return bank

    def reset_parameters(self) -> None:
        # Same distribution as nn.Linear, drawn per expert.
        for i, w in enumerate(self.weights):
            bound = 1.0 / math.sqrt(self.dims[i])
            nn.init.uniform_(w, -bound, bound)
            if i < len(self.gate_weights):
                nn.init.uniform_(self.gate_weights[i], -bound, bound)
            if i < len(self.biases):
                nn.init.uniform_(self.biases[i], -bound, bound)

    @property
    def d_in(self) -> int:
        return self.dims[0]

    @property
    def d_out(self) -> int:
        return self.dims[-1]

    def _is_activated(self, layer: int) -> bool:
        return layer < self.num_layers - 1 or self.activate_last

    def _norm_TEH(self, layer: int, h_TEH: Tensor) -> Tensor:
        if layer >= len(self.norms):
            return h_TEH
        T, E, H = h_TEH.shape
        # BatchNorm1d over the E*H units: each expert's units get their own statistics
        return self.norms[layer](h_TEH.reshape(T, E * H)).view(T, E, H)

    def _is_plain_swiglu(self) -> bool:
        """Two-layer SwiGLU experts without biases, norms or per-expert widths."""
        return (
            self.glu
            and self.num_layers == 2
            and self.activation in ("silu", "swish")
            and not self.activate_last
            and not self.biases
            and not self.norms
            and self.hidden_mask_EH is None
            and (self.dropout == 0.0 or not self.training)
        )

    def forward_all(self, x: Tensor) -> Tensor:
        """Every expert on its input rows.

        Args:
            x: ``(T, D_in)`` shared by all experts, or ``(E, T, D_in)`` one input per expert.

        Returns:
            ``(E, T, D_out)``.
        """
        if x.shape[-1] != self.d_in:
            raise ValueError(f"expert input has width {x.shape[-1]}, experts expect {self.d_in}")
        if x.dim() == 3 and self._is_plain_swiglu():
            # per-expert rows (padded dropless / capacity buffers): fused path
            return _BatchedSwiGLU.apply(
                x.contiguous(), self.weights[0], self.gate_weights[0], self.weights[1]
            )
        if x.dim() == 2:
            # Shared input (dense mixing): the first layer of all experts (and
            # their GLU gates) is one (T, D) @ (D, N) matmul, better shaped than
            # E small ones, and its (T, E*H) layout is the batch norm's.
            return self.forward_all_projected(x @ self.first_layer_weight().to(x.dtype))
        return self._layers_from(0, x.transpose(0, 1))  # x as a (T, E, D) view

    def first_layer_weight(self) -> Tensor:
        """The first layer of all experts on a shared input, as one ``(D_in, N)`` matrix.

        Columns: expert ``e``'s ``H`` first-layer units at ``[e*H, (e+1)*H)``, then,
        for GLU experts, their ``E*H`` gate units in the same order. A shared
        input ``x`` gives ``forward_all(x) == forward_all_projected(x @ W)``, which
        lets a caller fuse more columns (gate logits) into the same matmul, or
        compute the product without forming ``x``
        (:class:`~mtl.moe.linear_input.LinearInput`).
        """
        E, D, H = self.weights[0].shape
        w_DN = self.weights[0].permute(1, 0, 2).reshape(D, E * H)
        if not len(self.gate_weights):
            return w_DN
        return torch.cat([w_DN, self.gate_weights[0].permute(1, 0, 2).reshape(D, E * H)], dim=1)

    def forward_all_projected(self, z_TN: Tensor) -> Tensor:
        """:meth:`forward_all` of a shared input ``x`` given ``z_TN = x @ first_layer_weight()``.

        Args:
            z_TN: ``(T, N)`` first-layer products (``N = E*H``, ``2*E*H`` with GLU).

        Returns:
            ``(E, T, D_out)``, a view of a ``(T, E, D_out)`` tensor.
        """
        E, _, H = self.weights[0].shape
        n = E * H * (2 if len(self.gate_weights) else 1)
        if z_TN.dim() != 2 or z_TN.shape[1] != n:
            raise ValueError(f"first-layer products must be (T, {n}), got {tuple(z_TN.shape)}")
        T = z_TN.shape[0]
        if len(self.gate_weights):
            z_TN, g_TN = z_TN.split(E * H, dim=1)
            gate_TEH: Tensor | None = g_TN.reshape(T, E, H)
        else:
            gate_TEH = None
        z_TEH = z_TN.reshape(T, E, H)
        return self._layers_from(1, self._layer_TEH(0, z_TEH, gate_TEH))

    def _layers_from(self, first: int, h_TED: Tensor) -> Tensor:
        """Layers ``first..`` on per-expert rows ``(T, E, D)`` -> ``(E, T, D_out)`` view."""
        h = h_TED
        for i in range(first, self.num_layers):
            z_TEH = torch.einsum("ted,edh->teh", h, self.weights[i])
            gate_TEH = (
                torch.einsum("ted,edh->teh", h, self.gate_weights[i])
                if i < len(self.gate_weights)
                else None
            )
            h = self._layer_TEH(i, z_TEH, gate_TEH)
        return h.transpose(0, 1)

    def _layer_TEH(self, i: int, z_TEH: Tensor, gate_TEH: Tensor | None) -> Tensor:
        """Bias, norm, activation and GLU gate of layer ``i`` on its ``(T, E, H)`` products."""
        if (
            i < len(self.norms)
            and self.activation == "relu"
            and gate_TEH is None
            and (i > 0 or self.hidden_mask_EH is None)
        ):
            # rec experts (Linear -> BN -> ReLU -> Dropout): one autograd node in training
            T, E, H = z_TEH.shape
            shift_N = self.biases[i].reshape(E * H) if i < len(self.biases) else None
            y_TN = batch_norm_relu_dropout(
                z_TEH.reshape(T, E * H), self.norms[i], shift_N=shift_N, dropout=self.dropout
            )
            return y_TN.view(T, E, H)
        if i < len(self.biases):
            z_TEH = z_TEH + self.biases[i]
        if not self._is_activated(i):
            return z_TEH
        z_TEH = self._act(self._norm_TEH(i, z_TEH))
        if gate_TEH is not None:
            z_TEH = z_TEH * gate_TEH
        if i == 0 and self.hidden_mask_EH is not None:
            z_TEH = z_TEH * self.hidden_mask_EH.to(z_TEH.dtype)
        return fast_dropout(z_TEH, self.dropout, self.training)

    def forward_grouped(self, x_ND: Tensor, counts_E: Tensor, expert_ids_N: Tensor) -> Tensor:
        """Each expert on its own slice of expert-sorted rows.

        Args:
            x_ND: ``(N, D_in)`` rows sorted by expert; rows past ``counts_E.sum()``
                are padding and give zero output.
            counts_E: ``(E,)`` int64 rows per expert.
            expert_ids_N: ``(N,)`` int64 expert of each row (padding rows may hold
                any id in ``[0, E]``); used for biases and per-expert widths.

        Returns:
            ``(N, D_out)``.
        """
        if self.norms:
            raise ValueError(
                "norm='batch' experts need dense dispatch (batch statistics per expert)"
            )
        ids = expert_ids_N.clamp_max(self.num_experts - 1)
        h = x_ND
        for i, w_EDH in enumerate(self.weights):
            z = grouped_matmul(h, w_EDH, counts_E)
            if i < len(self.biases):
                z = z + self.biases[i][ids]
            if self._is_activated(i):
                z = self._act(z)
                if i < len(self.gate_weights):
                    z = z * grouped_matmul(h, self.gate_weights[i], counts_E)
                if i == 0 and self.hidden_mask_EH is not None:
                    z = z * self.hidden_mask_EH[ids].to(z.dtype)
                z = fast_dropout(z, self.dropout, self.training)
            h = z
        return h

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, dims={self.dims}, activation={self.activation}, "
            f"glu={self.glu}, bias={bool(len(self.biases))}, norm={'batch' if self.norms else None}, "
            f"dropout={self.dropout}"
        )


class ExpertList(nn.Module):
    """Experts given as a list of arbitrary modules, evaluated one by one.

    Slower than :class:`ExpertBank` but reads like the paper and accepts any
    expert architecture. It implements the same two methods, so it plugs into
    every dispatch.

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

    def forward_grouped(self, x_ND: Tensor, counts_E: Tensor, expert_ids_N: Tensor) -> Tensor:
        sizes = counts_E.tolist()
        rest = x_ND.shape[0] - sum(sizes)
        parts = torch.split(x_ND, [*sizes, rest])
        outs = [m(p) for m, p in zip(self.experts, parts[:-1], strict=True)]
        d_out = outs[0].shape[-1] if outs else x_ND.shape[-1]
        outs.append(x_ND.new_zeros(rest, d_out))
        return torch.cat(outs, 0)
