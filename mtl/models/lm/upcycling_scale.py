"""The output scale that makes an upcycled MoE layer compute what the dense FFN computed.

An upcycled layer outputs ``y = s * sum_{j in chosen} w_j f_j(x)``: ``f_j`` the
experts, ``w_j`` the gate's combine weights, ``s`` the layer's ``output_scale``.
Let ``W = sum_{j in chosen} w_j`` be the gate's total combine weight per token:
1 for renormalised top-k (Mixtral) and for softmax over the ``k`` chosen logits;
``k / E`` for the plain softmax-then-top-k gate (Switch, OLMoE) at a uniform
router; ``E * weight`` for :class:`~mtl.moe.gates.ConstantGate`
(:func:`gate_total_weight`).

* Copying (sparse upcycling, Komatsuzaki et al. 2023): every expert is the FFN,
  ``f_j = y_dense``, so ``y = s W y_dense`` and **s = 1 / W**: 1 for
  renormalised weights (exact for any router), ``E / k`` for the
  softmax-then-top-k gate (exact at a uniform router).
* Splitting (LLaMA-MoE, Zhu et al. 2024): the FFN's hidden neurons are split
  into ``E`` groups; SwiGLU is neuron-wise separable, so ``y_dense = sum_e f_e``
  over *all* experts. Each expert needs an effective weight ``s w_e = 1`` when
  all ``E`` are on, and ``E / k`` (the inverse of its chance ``k / E`` of being
  chosen) when ``k`` are: both give **s = E / W**: ``E`` for renormalised
  weights, ``E^2 / k`` for softmax-then-top-k, 1 for a constant gate of weight 1.
  ``E / k``, the factor LLaMA-MoE's released configs put on renormalised weights
  (``score_scale_factor``), is right only for unit weights (``W = k``); on
  weights that sum to 1 it shrinks the output ``k``-fold. With ``k < E`` only
  the *expected* output over the choice of experts is the dense one: a token
  sees ``k / E`` of the neurons, so the loss rises at step 0 however the output
  is scaled. :func:`preserving_scale` refuses ``k < E`` unless
  ``preserve="expectation"`` says that this is wanted (LLaMA-MoE's recipe:
  sparse experts, recovered by continual pre-training).

:func:`new_router` draws the default router's projection ``N(0, router_std)``
with a small std (1e-3): the weights start near uniform, where the rules above
are exact, while the choice of experts, which does not depend on the logits'
scale, still differs between tokens. The weight copying and splitting is
:mod:`mtl.models.lm.upcycling`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from mtl.moe import SigmoidBiasGate, TopKGate
from mtl.moe.gates import ConstantGate, NoisyTopKGate

__all__ = ["Preserve", "UpcycleMethod", "gate_total_weight", "new_router", "preserving_scale"]

UpcycleMethod = Literal["copy", "split"]
Preserve = Literal["exact", "expectation"]


def gate_total_weight(gate: nn.Module) -> float:
    """Total combine weight ``W`` the gate gives a token, at a uniform router.

    Args:
        gate: a :class:`~mtl.moe.TopKGate`, :class:`~mtl.moe.NoisyTopKGate`,
            :class:`~mtl.moe.SigmoidBiasGate` or :class:`~mtl.moe.gates.ConstantGate`.

    Raises:
        ValueError: another gate (top-p, expert choice, ...), whose total weight
            varies with the input: pass ``output_scale`` yourself.

    Example:
        >>> gate_total_weight(TopKGate(d_model=4, num_experts=8, k=2, renormalize=True))
        1.0
        >>> gate_total_weight(TopKGate(d_model=4, num_experts=8, k=2))
        0.25
    """
    if isinstance(gate, ConstantGate):
        return gate.num_experts * gate.weight
    if isinstance(gate, TopKGate):
        if gate.renormalize or gate.softmax_after_topk:
            return 1.0
        return gate.k / gate.num_experts  # softmax over E, k kept: k / E at a uniform router
    if isinstance(gate, NoisyTopKGate):
        return 1.0  # softmax over the k chosen logits
    if isinstance(gate, SigmoidBiasGate):
        # sigmoid(0) = 1/2 per chosen expert unless normalised to sum 1
        return gate.route_scale * (1.0 if gate.normalize else 0.5 * gate.k)
    raise ValueError(
        f"cannot tell the total combine weight of a {type(gate).__name__} at initialisation: "
        "pass output_scale explicitly"
    )


def preserving_scale(
    *, method: UpcycleMethod, gate: nn.Module, preserve: Preserve = "exact"
) -> float:
    """The ``output_scale`` that keeps the dense FFN's output (see the module docstring).

    ``copy``: ``1 / W``. ``split``: ``E / W``; with ``k < E`` experts per token
    only the expected output is kept, which ``preserve="expectation"`` must accept.

    Args:
        method: ``"copy"`` (every expert a copy) or ``"split"`` (neurons split).
        gate: the router (its ``k``, ``E`` and weighting, :func:`gate_total_weight`).
        preserve: ``"exact"`` refuses split with ``k < E``; ``"expectation"`` allows it.

    Raises:
        ValueError: naming the combination that cannot keep the dense output.

    Example:
        >>> gate = TopKGate(d_model=4, num_experts=8, k=8, renormalize=True)
        >>> preserving_scale(method="split", gate=gate)
        8.0
        >>> preserving_scale(method="copy", gate=TopKGate(d_model=4, num_experts=8, k=2))
        4.0
    """
    if preserve not in ("exact", "expectation"):
        raise ValueError(f"preserve must be 'exact' or 'expectation', got {preserve!r}")
    total = gate_total_weight(gate)
    if method == "copy":
        return 1.0 / total
    if method != "split":
        raise ValueError(f"method must be 'copy' or 'split', got {method!r}")
    E = int(gate.num_experts)
    k = int(getattr(gate, "k", E))
    if k < E and preserve == "exact":
        raise ValueError(
            f"split-upcycling with k={k} of E={E} experts ({type(gate).__name__}) cannot keep the "
            f"dense output: each token gets {k}/{E} of the FFN's neurons, so only the expected "
            "output over the choice of experts is the dense one and the loss rises at step 0. "
            "Use k=E, copy-upcycling, or preserve='expectation' to accept it (then the output "
            f"is scaled by E/W = {E / total:g})"
        )
    return E / total


def new_router(
    *, d_model: int, num_experts: int, k: int, renormalize: bool = True, router_std: float = 1e-3
) -> TopKGate:
    """A :class:`~mtl.moe.TopKGate` whose projection is drawn ``N(0, router_std)``.

    Small logits give near-uniform weights, for which :func:`preserving_scale`
    is exact also when the weights are not renormalised.

    Args:
        d_model: gate input width ``D``.
        num_experts: ``E``.
        k: experts per token.
        renormalize: the chosen weights sum to 1.
        router_std: std of the projection's entries.

    Example:
        >>> new_router(d_model=8, num_experts=4, k=2).proj.weight.std().item() < 0.01
        True
    """
    gate = TopKGate(d_model=d_model, num_experts=num_experts, k=k, renormalize=renormalize)
    with torch.no_grad():
        gate.proj.weight.normal_(0.0, router_std)
    return gate
