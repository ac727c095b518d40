"""An upcycled language model: a dense LM whose FFNs become MoE layers (``conf/model/lm_upcycled.yaml``).

:class:`UpcycledLM` builds the dense :class:`~mtl.models.lm.TransformerLM` that
``dense`` describes, optionally takes the weights of a trained dense run
(``dense_state``), and replaces its FFNs by copy- or split-upcycled MoE layers
(:mod:`mtl.models.lm.upcycling`). Its arguments are plain values: the run turns
the config node into them and reads the dense run's checkpoint
(:mod:`mtl.training.upcycled_build`). A checkpoint of the upcycled run rebuilds
the model from its config without ``dense_state``: the weights come from the
checkpoint itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torch import Tensor

from mtl.models.lm.blocks import SwiGLU
from mtl.models.lm.finetune import freeze_all_but_experts
from mtl.models.lm.transformer import TransformerLM
from mtl.models.lm.upcycling import (
    Preserve,
    SplitMethod,
    UpcycleMethod,
    copy_ffn,
    split_ffn,
    upcycle_transformer,
)
from mtl.moe import MoELayer

Freeze = Literal["none", "all_but_experts"]


class UpcycledLM(TransformerLM):
    """A dense LM (trained: ``dense_state``) with its FFNs upcycled to MoE layers.

    A :class:`~mtl.models.lm.TransformerLM` in every respect once built: the
    constructor builds the dense model ``dense`` describes, loads the dense
    weights, and replaces the FFNs with
    :func:`~mtl.models.lm.upcycling.copy_ffn` or
    :func:`~mtl.models.lm.upcycling.split_ffn` layers, whose output scale keeps
    the dense output (:func:`~mtl.models.lm.upcycling.preserving_scale`).

    Args:
        dense: keyword arguments of the dense :class:`~mtl.models.lm.TransformerLM`
            (``moe`` None or absent); a ``vocab_size`` in it is replaced by this
            class's, and its ``max_seq_len`` by ``max_seq_len`` when that is given.
        vocab_size: ``V``, from the data.
        num_experts: ``E`` per upcycled layer.
        k: experts per token.
        method: ``"copy"`` (sparse upcycling) or ``"split"`` (LLaMA-MoE neuron split).
        renormalize: the new routers' weights sum to 1 over the chosen experts.
        preserve: ``"exact"`` refuses split with ``k < E``; ``"expectation"`` accepts
            it (see :func:`~mtl.models.lm.upcycling.preserving_scale`).
        max_seq_len: longest context (default the dense node's).
        layers: which layers to upcycle (default every layer).
        router_std: std of the new routers' projections.
        noise_std: relative noise on copied experts (copy only).
        split: ``"random"`` or ``"contiguous"`` neuron split (split only).
        seed: seed of the split or the noise (layer ``i`` uses ``seed + i``).
        aux_loss_weights: router losses of the MoE layers.
        dense_state: the dense model's weights (its ``state_dict``; a run reads them
            from ``model.init_checkpoint``), loaded before upcycling; None keeps the
            dense model's initialisation.
        freeze: ``"all_but_experts"`` trains only the experts and the routers
            (:func:`~mtl.models.lm.freeze_all_but_experts`).

    Raises:
        ValueError: a ``dense`` with MoE layers, an unknown method or freeze, a
            combination that cannot keep the dense output, a ``dense_state`` that
            does not fit the dense model.

    Shapes:
        as :class:`~mtl.models.lm.TransformerLM`: ``idx (B, T) -> logits (B, T, V)``.

    Example:
        >>> lm = UpcycledLM(dense={"d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32},
        ...                 vocab_size=20, num_experts=4, k=2)
        >>> sorted(lm.moe_layers()), lm.moe_layers()[0].output_scale
        ([0, 1], 1.0)
    """

    def __init__(
        self,
        *,
        dense: Mapping[str, Any],
        vocab_size: int,
        num_experts: int,
        k: int,
        method: UpcycleMethod = "copy",
        renormalize: bool = True,
        preserve: Preserve = "exact",
        max_seq_len: int | None = None,
        layers: Sequence[int] | None = None,
        router_std: float = 1e-3,
        noise_std: float = 0.0,
        split: SplitMethod = "random",
        seed: int = 0,
        aux_loss_weights: Mapping[str, float] | None = None,
        dense_state: Mapping[str, Tensor] | None = None,
        freeze: Freeze = "none",
    ) -> None:
        if method not in ("copy", "split"):
            raise ValueError(f"method must be 'copy' or 'split', got {method!r}")
        if freeze not in ("none", "all_but_experts"):
            raise ValueError(f"freeze must be 'none' or 'all_but_experts', got {freeze!r}")
        kwargs = dict(dense)
        if kwargs.pop("moe", None) is not None:
            raise ValueError("dense must describe a dense model (moe: null) to upcycle")
        kwargs["vocab_size"] = vocab_size
        if max_seq_len is not None:
            kwargs["max_seq_len"] = max_seq_len
        elif kwargs.get("max_seq_len") is None:
            kwargs.pop("max_seq_len", None)  # TransformerLM's default
        super().__init__(**kwargs)
        if dense_state is not None:
            self._load_dense(dense_state)
        losses = None if aux_loss_weights is None else dict(aux_loss_weights)

        def make(ffn: SwiGLU, i: int) -> MoELayer:
            if method == "copy":
                return copy_ffn(
                    ffn,
                    num_experts=num_experts,
                    k=k,
                    renormalize=renormalize,
                    router_std=router_std,
                    noise_std=noise_std,
                    seed=seed + i,
                    aux_loss_weights=losses,
                )
            return split_ffn(
                ffn,
                num_experts=num_experts,
                k=k,
                renormalize=renormalize,
                preserve=preserve,
                router_std=router_std,
                method=split,
                seed=seed + i,
                aux_loss_weights=losses,
            )

        upcycle_transformer(self, make_moe=make, layers=layers)
        if freeze == "all_but_experts":
            freeze_all_but_experts(self)

    def _load_dense(self, state: Mapping[str, Tensor]) -> None:
        """``state`` into the still dense model: the same keys, each of the same shape."""
        own = self.state_dict()
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        resized = [
            f"{key} {tuple(state[key].shape)} for {tuple(own[key].shape)}"
            for key in own.keys() & state.keys()
            if state[key].shape != own[key].shape
        ]
        if missing or unexpected or resized:
            raise ValueError(
                f"dense_state does not fit the dense model: missing {missing[:4]}, unexpected "
                f"{unexpected[:4]}, other shapes {sorted(resized)[:4]} (a dense model of other sizes?)"
            )
        self.load_state_dict(state)
