"""Mixtral, OLMoE and Qwen2-MoE: one MoE block and one attention, three spellings.

The three architectures route the same way -- softmax over all experts, top-k,
renormalised over the k (always in Mixtral, when ``norm_topk_prob`` says so in
the others) -- into a dropless SwiGLU bank, and attend with
:class:`~mtl.models.lm.blocks.CausalSelfAttention` (query/key norms in OLMoE,
q/k/v biases in Qwen2-MoE). What differs between them is data: the config keys
of the block, the attention options, Qwen2-MoE's shared expert and dense
layers. :class:`SoftmaxTopK` holds that data and does the rest in both
directions (config -> LM, LM -> config), so each architecture module declares
only what is its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from mtl.models.lm.blocks import CausalSelfAttention
from mtl.models.lm.hf.spec import (
    HFConfig,
    check_norm_eps,
    check_shared,
    lm_kwargs,
    moe_parts,
    need,
    one_value,
    routed_experts,
)
from mtl.models.lm.transformer import TransformerLM
from mtl.moe import MoELayer, TopKGate


def no_shared(shared: nn.Module | None) -> bool:
    """The block has no shared expert (Mixtral, OLMoE)."""
    return shared is None


@dataclass(frozen=True)
class SoftmaxTopK:
    """The config keys and attention options of one softmax top-k architecture.

    Attributes:
        name: the ``model_type``, for error messages.
        num_experts_key: config key of the number of routed experts ``E``.
        d_hidden_key: config key of a routed expert's width ``H``.
        renormalize_key: config key of renormalising the weights over the
            chosen experts (absent: false); None: always renormalised (Mixtral).
        qk_norm: the attention normalises queries and keys (OLMoE).
        every_layer: every decoder layer is an MoE layer (exporting an LM
            with dense layers is refused).

    Example:
        >>> family = SoftmaxTopK(
        ...     name="demo", num_experts_key="num_experts", d_hidden_key="intermediate_size"
        ... )
        >>> cfg = HFConfig(
        ...     {"hidden_size": 8, "num_experts": 4, "intermediate_size": 16, "num_experts_per_tok": 2}
        ... )
        >>> layer = family.moe_layer(cfg)
        >>> layer.num_experts, layer.gate.k, layer.gate.renormalize, layer.experts.d_hidden
        (4, 2, False, 16)
    """

    name: str
    num_experts_key: str
    d_hidden_key: str
    renormalize_key: str | None = "norm_topk_prob"
    qk_norm: bool = False
    every_layer: bool = True

    # ------------------------------------------------------------------ config -> LM
    def moe_layer(self, cfg: HFConfig, *, shared: nn.Module | None = None) -> MoELayer:
        """One block: softmax top-k gate, dropless SwiGLU bank, and ``shared`` beside them."""
        E = int(cfg.req(self.num_experts_key))
        experts, dispatch = routed_experts(
            cfg, num_experts=E, d_hidden=int(cfg.req(self.d_hidden_key))
        )
        renormalize = (
            True if self.renormalize_key is None else bool(cfg.get(self.renormalize_key, False))
        )
        gate = TopKGate(
            d_model=int(cfg.req("hidden_size")),
            num_experts=E,
            k=int(cfg.req("num_experts_per_tok")),
            renormalize=renormalize,
        )
        return MoELayer(gate=gate, experts=experts, dispatch=dispatch, shared=shared)

    def build(
        self,
        cfg: HFConfig,
        moe_layer: Callable[[HFConfig], MoELayer],
        *,
        qkv_bias: bool = False,
        moe_layers: Sequence[int] | None = None,
    ) -> TransformerLM:
        """The LM of ``cfg``: ``moe_layer(cfg)`` at ``moe_layers`` (None: every layer)."""
        kw = lm_kwargs(cfg)

        def attention(i: int) -> CausalSelfAttention:
            return CausalSelfAttention(
                d_model=kw["d_model"],
                n_heads=kw["n_heads"],
                n_kv_heads=kw["n_kv_heads"],
                rope_base=kw["rope_base"],
                qkv_bias=qkv_bias,
                qk_norm=self.qk_norm,
                norm_eps=kw["norm_eps"],
            )

        has_moe = moe_layers is None or len(moe_layers) > 0
        return TransformerLM(
            **kw,
            moe=(lambda i, d: moe_layer(cfg)) if has_moe else None,
            moe_layers=moe_layers,
            attention=attention,
        )

    # ------------------------------------------------------------------ LM -> config
    def export(
        self,
        lm: TransformerLM,
        *,
        qkv_bias: bool = False,
        shared: Callable[[nn.Module | None], bool] = no_shared,
        shared_what: str = "no shared expert",
    ) -> tuple[dict[str, Any], dict[int, MoELayer]]:
        """The attention and block keys of ``lm``'s config, and its MoE layers.

        Args:
            lm: the model to write.
            qkv_bias: the attention's q/k/v projections have biases.
            shared: whether a layer's shared part fits the architecture.
            shared_what: what ``shared`` accepts, for the error message.

        Raises:
            ValueError: ``lm`` does not fit the architecture (the message says where).
        """
        attn = _check_attention(lm, self.name, bias=qkv_bias, qk_norm=self.qk_norm)
        check_norm_eps(lm, self.name)
        layers = moe_parts(lm, self.name)
        if self.every_layer:
            need(len(layers) == lm.n_layers, "every layer must have an MoE FFN", self.name)
        _check_gates(layers, self.name, renormalize=True if self.renormalize_key is None else None)
        check_shared(layers, self.name, shared, shared_what)
        keys: dict[str, Any] = {
            "num_key_value_heads": attn.n_kv_heads,
            self.num_experts_key: one_value(
                [m.num_experts for m in layers.values()], "expert count", self.name
            ),
            self.d_hidden_key: one_value(
                [m.experts.d_hidden for m in layers.values()], "expert width", self.name
            ),
            "num_experts_per_tok": one_value([m.gate.k for m in layers.values()], "k", self.name),
        }
        if self.renormalize_key is not None:
            keys[self.renormalize_key] = one_value(
                [m.gate.renormalize for m in layers.values()], "renormalize", self.name
            )
        return keys, layers


def _check_attention(
    lm: TransformerLM, arch: str, *, bias: bool, qk_norm: bool
) -> CausalSelfAttention:
    """Every layer uses :class:`CausalSelfAttention` with the given options; returns layer 0's."""
    for i, blk in enumerate(lm.layers):
        a = blk.attn
        need(isinstance(a, CausalSelfAttention), f"layer {i} attention is {type(a).__name__}", arch)
        need((a.q_proj.bias is not None) == bias, f"layer {i} q/k/v bias must be {bias}", arch)
        need((a.q_norm is not None) == qk_norm, f"layer {i} query/key norm must be {qk_norm}", arch)
    return lm.layers[0].attn


def _check_gates(layers: Mapping[int, MoELayer], arch: str, *, renormalize: bool | None) -> None:
    """Every layer's gate is a bias-free, jitter-free :class:`TopKGate` (softmax over all
    experts, then top-k), renormalised over the chosen experts when ``renormalize`` says so
    (None: either)."""
    for i, layer in layers.items():
        g = layer.gate
        need(
            type(g) is TopKGate and not g.softmax_after_topk,
            f"layer {i} gate must be TopKGate(softmax_after_topk=False)",
            arch,
        )
        need(
            renormalize is None or g.renormalize == renormalize,
            f"layer {i} gate must have renormalize={renormalize}",
            arch,
        )
        need(
            g.proj.bias is None and g.input_jitter == 0,
            f"layer {i} gate has a bias or jitter",
            arch,
        )
