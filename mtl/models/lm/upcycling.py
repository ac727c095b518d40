"""Build MoE layers from a trained dense SwiGLU FFN that compute what the FFN computed.

* :func:`copy_ffn` (sparse upcycling, Komatsuzaki et al. 2023): every expert
  is a copy of the FFN.
* :func:`split_ffn` (LLaMA-MoE, Zhu et al. 2024): the FFN's hidden neurons are
  split into ``E`` groups (:func:`split_indices`), one expert each; SwiGLU is
  neuron-wise separable, so the experts' outputs sum to the FFN's.
* :func:`upcycle_transformer` swaps the dense FFNs of a :class:`TransformerLM`.

The layer's ``output_scale`` that keeps the dense output for the chosen gate,
and the default near-uniform router, come from :mod:`mtl.models.lm.upcycling_scale`
(:func:`~mtl.models.lm.upcycling_scale.preserving_scale`,
:func:`~mtl.models.lm.upcycling_scale.new_router`; re-exported here with
:func:`~mtl.models.lm.upcycling_scale.gate_total_weight`): ``1 / W`` for copies
and ``E / W`` for splits, ``W`` the gate's total combine weight; a split with
``k < E`` experts per token keeps only the expected output and needs
``preserve="expectation"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from mtl.models.lm.blocks import SwiGLU
from mtl.models.lm.transformer import TransformerLM
from mtl.models.lm.upcycling_scale import (
    Preserve,
    UpcycleMethod,
    gate_total_weight,
    new_router,
    preserving_scale,
)
from mtl.moe import DroplessDispatch, MoELayer, SwiGLUExperts

__all__ = [
    "Preserve",
    "SplitMethod",
    "UpcycleMethod",
    "copy_ffn",
    "gate_total_weight",
    "new_router",
    "preserving_scale",
    "split_ffn",
    "split_indices",
    "upcycle_transformer",
]

SplitMethod = Literal["random", "contiguous"]


def split_indices(
    d_hidden: int, num_experts: int, *, method: SplitMethod = "random", seed: int = 0
) -> list[Tensor]:
    """Partition ``range(d_hidden)`` into ``num_experts`` groups of near-equal size.

    Args:
        d_hidden: number of hidden neurons ``H``.
        num_experts: ``E`` (``<= H``); the first ``H % E`` groups get one extra neuron.
        method: ``"contiguous"`` (neurons ``[0, H/E)``, ...) or ``"random"``
            (a seeded permutation, LLaMA-MoE's neuron-independent random split).
        seed: seed of the random permutation.

    Returns:
        ``E`` sorted int64 index tensors that together cover every neuron once.

    Example:
        >>> [g.tolist() for g in split_indices(5, 2, method="contiguous")]
        [[0, 1, 2], [3, 4]]
    """
    if not 1 <= num_experts <= d_hidden:
        raise ValueError(f"need 1 <= num_experts <= d_hidden ({d_hidden}), got {num_experts}")
    if method == "contiguous":
        order = torch.arange(d_hidden)
    elif method == "random":
        order = torch.randperm(d_hidden, generator=torch.Generator().manual_seed(seed))
    else:
        raise ValueError(f"method must be 'random' or 'contiguous', got {method!r}")
    base, extra = divmod(d_hidden, num_experts)
    sizes = [base + (1 if e < extra else 0) for e in range(num_experts)]
    return [g.sort().values for g in torch.split(order, sizes)]


def _default_gate(
    gate: nn.Module | None,
    *,
    d_model: int,
    num_experts: int,
    k: int | None,
    renormalize: bool,
    router_std: float,
    caller: str,
) -> nn.Module:
    if gate is not None:
        return gate
    if k is None:
        raise ValueError(f"{caller} needs a gate or k (for the default TopKGate)")
    return new_router(
        d_model=d_model,
        num_experts=num_experts,
        k=k,
        renormalize=renormalize,
        router_std=router_std,
    )


def split_ffn(
    ffn: SwiGLU,
    *,
    num_experts: int,
    gate: nn.Module | None = None,
    k: int | None = None,
    renormalize: bool = True,
    preserve: Preserve = "exact",
    router_std: float = 1e-3,
    method: SplitMethod = "random",
    seed: int = 0,
    groups: Sequence[Tensor] | None = None,
    dispatch: nn.Module | None = None,
    aux_loss_weights: Mapping[str, float] | None = None,
    output_scale: float | None = None,
) -> MoELayer:
    """LLaMA-MoE expert construction: split the FFN's hidden neurons into experts.

    Args:
        ffn: the trained dense FFN (its weights are copied, not shared).
        num_experts: ``E``.
        gate: the router; default :func:`new_router` with ``k`` and ``renormalize``.
        k: experts per token for the default gate (required without ``gate``).
        renormalize: the default gate's weights sum to 1 over the chosen experts.
        preserve: ``"exact"`` (default) refuses ``k < E``, which keeps the dense
            output only in expectation; ``"expectation"`` accepts it.
        router_std: std of the default gate's projection.
        method: ``"random"`` or ``"contiguous"`` neuron split.
        seed: seed of the random split.
        groups: explicit neuron groups (overrides ``method``), e.g. from clustering.
        dispatch: default :class:`~mtl.moe.DroplessDispatch`.
        aux_loss_weights: the MoE layer's auxiliary losses.
        output_scale: default :func:`preserving_scale` (``E / W``).

    Returns:
        An :class:`~mtl.moe.MoELayer`; expert ``e`` holds neurons ``groups[e]``
        (unequal groups are padded and masked with ``hidden_sizes``).

    Raises:
        ValueError: bad groups, or ``k < E`` with ``preserve="exact"``.

    Example:
        >>> from mtl.moe.gates import ConstantGate
        >>> ffn = SwiGLU(d_model=8, d_hidden=32)
        >>> moe = split_ffn(ffn, num_experts=4, gate=ConstantGate(num_experts=4))
        >>> x = torch.randn(5, 8)
        >>> torch.allclose(moe(x).output, ffn(x), atol=1e-6)
        True
        >>> split_ffn(ffn, num_experts=4, k=4).output_scale  # renormalised: E / 1
        4.0
    """
    D, H = ffn.d_model, ffn.d_hidden
    gate = _default_gate(
        gate,
        d_model=D,
        num_experts=num_experts,
        k=k,
        renormalize=renormalize,
        router_std=router_std,
        caller="split_ffn",
    )
    scale = (
        preserving_scale(method="split", gate=gate, preserve=preserve)
        if output_scale is None
        else output_scale
    )
    groups = (
        list(groups)
        if groups is not None
        else split_indices(H, num_experts, method=method, seed=seed)
    )
    if len(groups) != num_experts:
        raise ValueError(f"got {len(groups)} neuron groups for num_experts={num_experts}")
    covered = torch.cat([torch.as_tensor(g).long() for g in groups]).sort().values
    if not torch.equal(covered, torch.arange(H)):
        raise ValueError(f"neuron groups must partition range({H}) (each neuron exactly once)")
    sizes = [len(g) for g in groups]
    width = max(sizes)
    bank = SwiGLUExperts(
        num_experts=num_experts,
        d_model=D,
        d_hidden=width,
        hidden_sizes=None if len(set(sizes)) == 1 else sizes,
    )
    w_gate_DH, w_up_DH, w_down_HD = _swiglu_weights(ffn)
    with torch.no_grad():
        for p in (bank.w_gate, bank.w_up, bank.w_down):
            p.zero_()
        for e, g in enumerate(groups):
            idx = torch.as_tensor(g).long()
            n = len(idx)
            bank.w_gate[e, :, :n].copy_(w_gate_DH[:, idx])
            bank.w_up[e, :, :n].copy_(w_up_DH[:, idx])
            bank.w_down[e, :n, :].copy_(w_down_HD[idx, :])
    return MoELayer(
        gate=gate,
        experts=bank.to(ffn.down_proj.weight),
        dispatch=dispatch or DroplessDispatch(),
        aux_loss_weights=aux_loss_weights,
        output_scale=scale,
    )


def copy_ffn(
    ffn: SwiGLU,
    *,
    num_experts: int,
    gate: nn.Module | None = None,
    k: int | None = None,
    renormalize: bool = True,
    router_std: float = 1e-3,
    dispatch: nn.Module | None = None,
    aux_loss_weights: Mapping[str, float] | None = None,
    noise_std: float = 0.0,
    seed: int = 0,
    output_scale: float | None = None,
) -> MoELayer:
    """Sparse upcycling: every expert starts as a copy of the dense FFN.

    Args:
        ffn: the trained dense FFN.
        num_experts: ``E``.
        gate: the router; default :func:`new_router` with ``k`` and ``renormalize``.
        k: experts per token for the default gate.
        renormalize: the default gate's weights sum to 1 over the chosen experts
            (then the layer equals the FFN whatever the router); without, the
            output is rescaled by ``E / k``.
        router_std: std of the default gate's projection.
        dispatch: default :class:`~mtl.moe.DroplessDispatch`.
        aux_loss_weights: the MoE layer's auxiliary losses.
        noise_std: relative std of Gaussian noise added to the copies
            (breaks the experts' symmetry; 0 keeps exact copies).
        seed: seed of that noise.
        output_scale: default :func:`preserving_scale` (``1 / W``).

    Example:
        >>> ffn = SwiGLU(d_model=8, d_hidden=16)
        >>> moe = copy_ffn(ffn, num_experts=4, k=2)
        >>> x = torch.randn(5, 8)
        >>> torch.allclose(moe(x).output, ffn(x), atol=1e-6)
        True
    """
    D, H = ffn.d_model, ffn.d_hidden
    gate = _default_gate(
        gate,
        d_model=D,
        num_experts=num_experts,
        k=k,
        renormalize=renormalize,
        router_std=router_std,
        caller="copy_ffn",
    )
    scale = preserving_scale(method="copy", gate=gate) if output_scale is None else output_scale
    bank = SwiGLUExperts(num_experts=num_experts, d_model=D, d_hidden=H)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for dst, src in zip(
            (bank.w_gate, bank.w_up, bank.w_down),
            _swiglu_weights(ffn),
            strict=True,
        ):
            dst.copy_(src.unsqueeze(0).expand_as(dst))
            if noise_std > 0:
                noise = torch.randn(dst.shape, generator=gen) * noise_std * src.std()
                dst.add_(noise.to(dst))
    return MoELayer(
        gate=gate,
        experts=bank.to(ffn.down_proj.weight),
        dispatch=dispatch or DroplessDispatch(),
        aux_loss_weights=aux_loss_weights,
        output_scale=scale,
    )


def upcycle_transformer(
    model: TransformerLM,
    *,
    make_moe: Callable[[SwiGLU, int], MoELayer],
    layers: Sequence[int] | None = None,
) -> list[int]:
    """Replace dense FFNs of ``model`` in place by MoE layers built from them.

    Args:
        model: a trained (partly) dense model.
        make_moe: ``(dense_ffn, layer_index) -> MoELayer``, e.g.
            ``lambda ffn, i: copy_ffn(ffn, num_experts=8, k=2)``.
        layers: which layers (default every dense layer).

    Returns:
        The indices of the layers replaced.

    Example:
        >>> lm = TransformerLM(vocab_size=20, d_model=16, n_layers=2, n_heads=2, d_ff=32)
        >>> upcycle_transformer(lm, make_moe=lambda f, i: copy_ffn(f, num_experts=4, k=2))
        [0, 1]
    """
    dense = [i for i, blk in enumerate(model.layers) if isinstance(blk.ffn, SwiGLU)]
    chosen = dense if layers is None else [int(i) for i in layers]
    bad = sorted(set(chosen) - set(dense))
    if bad:
        raise ValueError(f"layers {bad} have no dense SwiGLU FFN to upcycle (dense: {dense})")
    for i in chosen:
        model.layers[i].ffn = make_moe(model.layers[i].ffn, i)
    return chosen


def _swiglu_weights(ffn: SwiGLU) -> tuple[Tensor, Tensor, Tensor]:
    """``(D, H)`` gate, ``(D, H)`` up and ``(H, D)`` down matrices, SwiGLUExperts' layout."""
    if not isinstance(ffn, SwiGLU):
        raise TypeError(f"expected a SwiGLU FFN, got {type(ffn).__name__}")
    return ffn.gate_proj.weight.T, ffn.up_proj.weight.T, ffn.down_proj.weight.T
