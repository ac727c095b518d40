"""The MoE feed-forward layers of a :class:`~mtl.models.lm.TransformerLM`, one fresh per layer.

A transformer needs a new :class:`~mtl.moe.MoELayer` (own weights) for every
MoE layer, all alike. :class:`MoEFFN` holds the recipe: factories of the parts
(usually ``functools.partial`` objects, which is what a Hydra config node with
``_partial_: true`` becomes) and the number of routed experts, which it hands
to both the gate and the expert bank so that they always agree::

    moe:
      _target_: mtl.models.lm.MoEFFN
      num_experts: 8
      gate: {_target_: mtl.moe.TopKGate, _partial_: true, k: 2, renormalize: true}
      experts: {_target_: mtl.moe.SwiGLUExperts, _partial_: true, d_hidden: 128}
      dispatch: {_target_: mtl.moe.DroplessDispatch, _partial_: true}
      aux_loss_weights: {load_balance: 0.01}

The config layer instantiates that node (:mod:`mtl.training.build`); nothing
here reads configs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from mtl.models.lm.init import init_module_
from mtl.moe import DroplessDispatch, ExpertChoiceGate, MoELayer, TopPGate

PartFactory = Callable[..., nn.Module]
"""Builds one part; called with keyword arguments (``d_model=``, ``num_experts=``)."""


class MoEFFN:
    """Factory of identical, independently initialised MoE feed-forward layers.

    Called as ``moe_ffn(layer_index, d_model)`` by :class:`~mtl.models.lm.TransformerLM`,
    it builds ``MoELayer(gate=gate(d_model=, num_experts=), experts=experts(d_model=,
    num_experts=), dispatch=dispatch(), shared=shared(d_model=))``.

    Initialisation: the parts it builds follow the LM's convention, not their
    own: the transformer calls :meth:`reset_layer` on every layer this factory
    made (``N(0, init_std)``, residual outputs scaled, see
    :mod:`mtl.models.lm.init`). A factory without ``reset_layer`` (any other
    callable) hands over layers whose weights the transformer keeps as they are.

    Args:
        num_experts: routed experts ``E``, given to the gate and the expert bank.
        gate: factory of the router (e.g. ``partial(TopKGate, k=2)``).
        experts: factory of the routed expert bank (e.g. ``partial(SwiGLUExperts, d_hidden=64)``).
        dispatch: factory of the dispatch module; None: :class:`~mtl.moe.DroplessDispatch`.
        shared: factory of always-on experts (DeepSeekMoE), called with ``d_model=``
            only (it sets its own expert count); None for none.
        aux_loss_weights: ``{name: weight}`` of the router losses (see :class:`~mtl.moe.MoELayer`).
        output_scale: multiplies the routed output.
        expert_parallel: ``N`` ranks to shard the routed experts over in a
            multi-process run (:class:`~mtl.moe.expert_parallel_plan.ExpertParallelPlan`;
            the layers are built whole and sharded when training starts); 1: not sharded.
        route_on: what the gates see: ``"input"``, the token's hidden state; ``"domain"``,
            a learned embedding of its sequence's domain id (condition routing; the LM
            holds the embedding, see :mod:`mtl.models.lm.domain_routing`).
        num_domains: domain ids ``0 .. num_domains - 1`` (``route_on="domain"``).
        domain_dim: width of the domain embedding, the gates' input width.
        default_domain: the domain of sequences given without an id (sampling); None: required.

    Example:
        >>> from functools import partial
        >>> from mtl.moe import SwiGLUExperts, TopKGate
        >>> make = MoEFFN(num_experts=4, gate=partial(TopKGate, k=2),
        ...               experts=partial(SwiGLUExperts, d_hidden=16))
        >>> a, b = make(0, 8), make(1, 8)
        >>> a.num_experts, a.gate is b.gate
        (4, False)
    """

    def __init__(
        self,
        *,
        num_experts: int,
        gate: PartFactory,
        experts: PartFactory,
        dispatch: Callable[[], nn.Module] | None = None,
        shared: PartFactory | None = None,
        aux_loss_weights: Mapping[str, float] | None = None,
        output_scale: float = 1.0,
        expert_parallel: int = 1,
        route_on: str = "input",
        num_domains: int = 0,
        domain_dim: int = 16,
        default_domain: int | None = None,
    ) -> None:
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if expert_parallel < 1 or num_experts % expert_parallel != 0:
            raise ValueError(
                f"expert_parallel={expert_parallel} must be >= 1 and divide num_experts={num_experts}"
            )
        self.expert_parallel = int(expert_parallel)
        if route_on not in ("input", "domain") or (route_on == "domain" and num_domains < 1):
            raise ValueError(
                f"route_on must be 'input' or 'domain' (with num_domains >= 1), got "
                f"route_on={route_on!r}, num_domains={num_domains}"
            )
        self.route_on, self.num_domains, self.domain_dim = route_on, num_domains, domain_dim
        self.default_domain = default_domain
        self.num_experts = num_experts
        self.gate = gate
        self.experts = experts
        self.dispatch = dispatch or DroplessDispatch
        self.shared = shared
        self.aux_loss_weights = dict(aux_loss_weights or {})
        self.output_scale = float(output_scale)

    def __call__(self, layer_index: int, d_model: int) -> MoELayer:
        """A new MoE layer of width ``d_model`` (``layer_index`` is not used: all layers alike)."""
        return MoELayer(
            gate=self.gate(
                d_model=self.domain_dim if self.route_on == "domain" else d_model,
                num_experts=self.num_experts,
            ),
            experts=self.experts(d_model=d_model, num_experts=self.num_experts),
            dispatch=self.dispatch(),
            shared=None if self.shared is None else self.shared(d_model=d_model),
            aux_loss_weights=self.aux_loss_weights,
            output_scale=self.output_scale,
        )

    @torch.no_grad()
    def reset_layer(self, layer: MoELayer, *, std: float, out_std: float) -> None:
        """Give a layer this factory built the LM's initialisation.

        Expert banks (routed and shared): ``N(0, std)``, their residual output
        (``w_down``, a bank's last layer, a ``down_proj``) ``N(0, out_std)``,
        biases zero. Gate: only the router projection ``gate.proj`` is drawn
        again; the rest of the gate keeps its own initialisation (the zero noise
        projection of :class:`~mtl.moe.NoisyTopKGate`, the zero selection bias
        of :class:`~mtl.moe.SigmoidBiasGate`).

        Args:
            layer: a layer returned by this factory.
            std: std of ordinary weights (the LM's ``init_std``).
            out_std: std of residual output weights (``init_std / sqrt(2 L)``).

        Example:
            >>> from functools import partial
            >>> from mtl.moe import NoisyTopKGate, SwiGLUExperts
            >>> make = MoEFFN(num_experts=4, gate=partial(NoisyTopKGate, k=2),
            ...               experts=partial(SwiGLUExperts, d_hidden=16))
            >>> layer = make(0, 8)
            >>> make.reset_layer(layer, std=0.02, out_std=0.01)
            >>> layer.gate.noise_proj.weight.abs().max().item()
            0.0
        """
        for name, module in layer.named_modules():
            if name.startswith("gate.") and name != "gate.proj":
                continue
            init_module_(name, module, std=std, out_std=out_std)


def active_experts_per_token(gate: nn.Module) -> float | None:
    """Expected number of routed experts a token uses, or None when it varies.

    ``k`` for token-choice gates, the capacity factor for expert choice (tokens
    per expert ``= c T / E``, so ``c`` experts per token on average); None for
    top-p, whose count depends on the router's confidence.

    Example:
        >>> from mtl.moe import TopKGate
        >>> active_experts_per_token(TopKGate(d_model=4, num_experts=8, k=2))
        2.0
    """
    if isinstance(gate, TopPGate):
        return None
    if isinstance(gate, ExpertChoiceGate):
        return float(gate.capacity_factor)
    k = getattr(gate, "k", None)
    return None if k is None else float(k)
