"""Decoder-only transformer whose feed-forward layers can be mixtures of experts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.models.lm.aux_pooling import AuxLossPooling, check_pooling, pooled_aux_losses
from mtl.models.lm.blocks import CausalSelfAttention, RMSNorm, SwiGLU
from mtl.models.lm.domain_routing import DomainEmbedding, domain_condition
from mtl.models.lm.init import init_module_, residual_std
from mtl.models.lm.moe_ffn import active_experts_per_token
from mtl.moe import MoELayer, MoEOutput, RoutingResult, RoutingStats

MoEFactory = Callable[[int, int], MoELayer]
"""``(layer_index, d_model) -> MoELayer``: a programmatic alternative to a spec."""

MoEReset = Callable[..., None]
"""``reset_layer(layer, *, std, out_std)`` of a factory that wants the LM's initialisation."""


@dataclass
class LMOutput:
    """Result of :class:`TransformerLM`.

    Attributes:
        logits: ``(B, T, V)`` next-token logits.
        aux_loss: float32 scalar, the weighted auxiliary router losses, summed over
            layers or computed on the pooled routing (``aux_loss_pooling``).
        aux_losses: the same by loss name, for logging.
        layer_stats: routing statistics of every MoE layer, by layer index.
        loss: mean next-token cross-entropy when ``targets`` were given, else None.
        routing: each MoE layer's routing decision (only with ``return_routing``).

    Example:
        >>> lm = TransformerLM(vocab_size=10, d_model=8, n_layers=1, n_heads=2, d_ff=16)
        >>> x = torch.randint(0, 10, (1, 4))
        >>> out = lm(x, x)
        >>> out.logits.shape, out.aux_loss.item(), out.loss is not None
        (torch.Size([1, 4, 10]), 0.0, True)
    """

    logits: Tensor
    aux_loss: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    layer_stats: dict[int, RoutingStats] = field(default_factory=dict)
    loss: Tensor | None = None
    routing: dict[int, RoutingResult] = field(default_factory=dict)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x))``, ``y = h + ffn(norm(h))``.

    The FFN is a dense :class:`SwiGLU` or an :class:`~mtl.moe.MoELayer`; tokens
    an MoE layer drops (capacity dispatch) pass through the residual unchanged.

    Args:
        d_model: width ``D``.
        n_heads: attention heads.
        ffn: the feed-forward module (``SwiGLU`` or ``MoELayer``).
        n_kv_heads: grouped key/value heads (None = ``n_heads``).
        rope_base: rotary frequency base.
        dropout: residual and attention dropout.
        norm_eps: RMSNorm epsilon.
        attn: the attention module (``(B, T, D) -> (B, T, D)``); None builds a
            :class:`CausalSelfAttention` from the arguments above.

    Shapes:
        ``(B, T, D) -> (B, T, D)``, plus the MoE output (or None).

    Example:
        >>> blk = TransformerBlock(d_model=16, n_heads=2, ffn=SwiGLU(d_model=16, d_hidden=32))
        >>> blk(torch.randn(2, 4, 16))[0].shape
        torch.Size([2, 4, 16])
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        ffn: nn.Module,
        n_kv_heads: int | None = None,
        rope_base: float = 10000.0,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
        attn: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim=d_model, eps=norm_eps)
        self.attn = attn or CausalSelfAttention(
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            rope_base=rope_base,
            dropout=dropout,
        )
        self.ffn_norm = RMSNorm(dim=d_model, eps=norm_eps)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoELayer)

    def forward(
        self, x_BTD: Tensor, gate_input: Tensor | None = None
    ) -> tuple[Tensor, MoEOutput | None]:
        h_BTD = x_BTD + self.drop(self.attn(self.attn_norm(x_BTD)))
        z_BTD = self.ffn_norm(h_BTD)
        if self.is_moe:
            # gate_input: a (B, T, domain_dim) condition the gate routes on instead of z
            moe_out = (
                self.ffn(z_BTD) if gate_input is None else self.ffn(z_BTD, gate_input=gate_input)
            )
            return h_BTD + self.drop(moe_out.output), moe_out
        return h_BTD + self.drop(self.ffn(z_BTD)), None


class TransformerLM(nn.Module):
    """Decoder-only language model: RMSNorm, rotary attention, SwiGLU or MoE FFNs.

    Which layers are MoE: ``moe_layers`` if given, else layer ``i`` with
    ``i >= moe_offset`` and ``(i - moe_offset) % moe_every == 0`` (``moe_every=1``:
    every layer, as Mixtral; ``moe_every=2, moe_offset=1``: every other layer,
    as GShard/Switch; ``moe_offset=1``: first layer dense, as DeepSeekMoE).
    Without ``moe`` every layer is dense.

    Args:
        vocab_size: ``V``.
        d_model: width ``D``.
        n_layers: number of blocks ``L``.
        n_heads: attention heads.
        d_ff: hidden width of the dense SwiGLU layers.
        max_seq_len: longest accepted context.
        moe: a factory ``(layer_index, d_model) -> MoELayer`` of the MoE FFNs
            (:class:`~mtl.models.lm.MoEFFN`); None for a dense model.
        moe_every: MoE every n-th layer.
        moe_offset: first MoE layer.
        moe_layers: explicit MoE layer indices (overrides every/offset).
        n_kv_heads: grouped key/value heads (None = ``n_heads``).
        dropout: residual/attention dropout.
        tie_embeddings: share the input embedding with the output projection.
        rope_base: rotary frequency base.
        norm_eps: RMSNorm epsilon.
        init_std: std of the normal initialisation (residual outputs are
            further scaled by ``1 / sqrt(2 L)``, as GPT-2).
        aux_loss_pooling: how the MoE layers' router losses combine
            (:mod:`mtl.models.lm.aux_pooling`): ``"sum_over_layers"``, each layer's
            losses on its own routing, summed; ``"pooled"``, every loss computed
            once on all layers' routings pooled, as transformers'
            ``load_balancing_loss_func`` (then HF's ``router_aux_loss_coef`` is
            ``load_balance: coef * k`` exactly; needs equal ``aux_loss_weights``
            in every MoE layer).
        attention: a factory ``layer_index -> attention module`` (e.g. latent
            attention, or attention with query/key norms); None: the
            :class:`CausalSelfAttention` the arguments above describe.

    Initialisation: the LM initialises the parts it builds itself (embedding,
    attention, dense FFNs, head; :mod:`mtl.models.lm.init`). The MoE layers are
    the ``moe`` factory's: if it has a ``reset_layer(layer, *, std, out_std)``
    method, as :class:`~mtl.models.lm.MoEFFN` (the presets' factory) has, the LM
    calls it on every layer the factory built, so the presets get the LM's
    convention; any other factory's layers keep their weights, so a factory may
    return pre-trained layers (e.g. :func:`~mtl.models.lm.moe_layer_from_hf_mixtral`).

    Shapes:
        ``idx (B, T) int64 -> LMOutput.logits (B, T, V)``.

    Example:
        >>> from functools import partial
        >>> from mtl.models.lm.moe_ffn import MoEFFN
        >>> from mtl.moe import SwiGLUExperts, TopKGate
        >>> moe = MoEFFN(num_experts=4, gate=partial(TopKGate, k=2),
        ...              experts=partial(SwiGLUExperts, d_hidden=32))
        >>> lm = TransformerLM(vocab_size=50, d_model=16, n_layers=2, n_heads=2, d_ff=64, moe=moe)
        >>> out = lm(torch.randint(0, 50, (2, 7)))
        >>> out.logits.shape, sorted(out.layer_stats)
        (torch.Size([2, 7, 50]), [0, 1])
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        d_ff: int = 512,
        max_seq_len: int = 256,
        moe: MoEFactory | None = None,
        moe_every: int = 1,
        moe_offset: int = 0,
        moe_layers: Sequence[int] | None = None,
        n_kv_heads: int | None = None,
        dropout: float = 0.0,
        tie_embeddings: bool = True,
        rope_base: float = 10000.0,
        norm_eps: float = 1e-5,
        init_std: float = 0.02,
        aux_loss_pooling: AuxLossPooling = "sum_over_layers",
        attention: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("n_layers", n_layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if moe_every < 1 or moe_offset < 0:
            raise ValueError(
                f"need moe_every >= 1 and moe_offset >= 0, got {moe_every}, {moe_offset}"
            )
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layers = n_layers
        self.max_seq_len = max_seq_len
        self.init_std = init_std
        self.aux_loss_pooling = check_pooling(aux_loss_pooling)
        if moe is None:
            moe_idx: set[int] = set()
        elif moe_layers is not None:
            moe_idx = {int(i) for i in moe_layers}
            if not moe_idx <= set(range(n_layers)):
                raise ValueError(f"moe_layers {sorted(moe_idx)} outside [0, {n_layers})")
        else:
            moe_idx = {i for i in range(moe_offset, n_layers) if (i - moe_offset) % moe_every == 0}
        self.embed = nn.Embedding(vocab_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TransformerBlock(
                d_model=d_model,
                n_heads=n_heads,
                ffn=moe(i, d_model)
                if moe is not None and i in moe_idx
                else SwiGLU(d_model=d_model, d_hidden=d_ff),
                n_kv_heads=n_kv_heads,
                rope_base=rope_base,
                dropout=dropout,
                norm_eps=norm_eps,
                attn=None if attention is None else attention(i),
            )
            for i in range(n_layers)
        )
        self.norm = RMSNorm(dim=d_model, eps=norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self._moe_reset: MoEReset | None = getattr(moe, "reset_layer", None)
        # ranks to shard the routed experts over when training starts (LMModule.configure_model)
        self.expert_parallel = int(getattr(moe, "expert_parallel", 1))
        # the gates' input when they route on the sequence's domain (moe.route_on=domain)
        self.domain_embed = DomainEmbedding.for_factory(moe)
        self.reset_parameters()
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise what the LM built: ``N(0, init_std)``, residual outputs ``/ sqrt(2L)``.

        MoE layers are the factory's: re-initialised by its ``reset_layer``
        when it has one (:class:`~mtl.models.lm.MoEFFN`), left as they are otherwise.
        """
        std, out_std = self.init_std, residual_std(self.init_std, self.n_layers)
        moe_ffns = {id(layer) for layer in self.moe_layers().values()}
        skip: tuple[str, ...] = ()
        for name, module in self.named_modules():
            if skip and name.startswith(skip):
                continue
            if id(module) in moe_ffns:
                if self._moe_reset is not None:
                    self._moe_reset(module, std=std, out_std=out_std)
                skip = (*skip, name + ".")
                continue
            init_module_(name, module, std=std, out_std=out_std)

    def moe_layers(self) -> dict[int, MoELayer]:
        """The MoE FFNs by layer index."""
        return {i: blk.ffn for i, blk in enumerate(self.layers) if blk.is_moe}

    def forward(
        self,
        idx_BT: Tensor,
        targets_BT: Tensor | None = None,
        *,
        return_routing: bool = False,
        domain_B: Tensor | None = None,
    ) -> LMOutput:
        """Logits for every position, plus router losses and statistics.

        Args:
            idx_BT: ``(B, T)`` token ids, ``T <= max_seq_len``.
            targets_BT: ``(B, T)`` next-token ids; when given, ``loss`` is their
                mean cross-entropy (ids ``-100`` are ignored).
            return_routing: keep every MoE layer's :class:`~mtl.moe.RoutingResult`.
            domain_B: ``(B,)`` domain id of each sequence, required by (and only by)
                a model built with ``moe.route_on=domain``.
        """
        if idx_BT.dim() != 2:
            raise ValueError(f"expected token ids of shape (B, T), got {tuple(idx_BT.shape)}")
        T = idx_BT.shape[1]
        if self.max_seq_len < T:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.max_seq_len}")
        x_BTD = self.drop(self.embed(idx_BT))
        condition = domain_condition(self.domain_embed, domain_B, idx_BT)
        aux_loss = x_BTD.new_zeros((), dtype=torch.float32)
        aux_losses: dict[str, Tensor] = {}
        stats: dict[int, RoutingStats] = {}
        routing: dict[int, RoutingResult] = {}
        pooled = self.aux_loss_pooling == "pooled"
        pool: list[tuple[RoutingResult, dict[str, float]]] = []
        for i, block in enumerate(self.layers):
            x_BTD, moe_out = block(x_BTD, condition)
            if moe_out is None:
                continue
            if pooled and moe_out.routing is not None:
                pool.append((moe_out.routing, block.ffn.aux_loss_weights))
            elif not pooled:
                aux_loss = aux_loss + moe_out.aux_loss
                for name, value in moe_out.aux_losses.items():
                    aux_losses[name] = aux_losses[name] + value if name in aux_losses else value
            if moe_out.stats is not None:
                stats[i] = moe_out.stats
            if return_routing and moe_out.routing is not None:
                routing[i] = moe_out.routing
        if pool:
            aux_losses = pooled_aux_losses([r for r, _ in pool], [w for _, w in pool])
            for value in aux_losses.values():
                aux_loss = aux_loss + value
        logits_BTV = self.lm_head(self.norm(x_BTD))
        loss = None
        if targets_BT is not None:
            loss = F.cross_entropy(
                logits_BTV.reshape(-1, logits_BTV.shape[-1]).float(),
                targets_BT.reshape(-1),
                ignore_index=-100,
            )
        return LMOutput(
            logits=logits_BTV,
            aux_loss=aux_loss,
            aux_losses=aux_losses,
            layer_stats=stats,
            loss=loss,
            routing=routing,
        )

    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts: ``total``, ``active`` (per token) and ``embedding``.

        ``active`` counts a routed expert bank at ``k / E`` of its size (the
        expected share for expert choice, the whole bank for top-p, whose count
        varies). Tied embeddings are counted once. Experts sharded over ranks
        (expert parallelism) count whole: this rank holds ``1 / num_shards`` of them.
        """
        total = sum(p.numel() for p in self.parameters())
        inactive = 0.0
        for layer in self.moe_layers().values():
            held = sum(p.numel() for p in layer.experts.parameters())
            bank = held * getattr(layer.experts, "num_shards", 1)
            total += bank - held
            k = active_experts_per_token(layer.gate)
            if k is not None:
                inactive += bank * (1.0 - min(k, layer.num_experts) / layer.num_experts)
        return {
            "total": total,
            "active": round(total - inactive),
            "embedding": self.embed.weight.numel(),
        }
