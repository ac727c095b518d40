"""An upcycled language model described by a config (``conf/model/lm_upcycled.yaml``).

:class:`UpcycledLM` builds the dense :class:`~mtl.models.lm.TransformerLM` its
``dense`` node describes, optionally loads the weights of a trained dense run
(``init_checkpoint``), and replaces its FFNs by copy- or split-upcycled MoE
layers (:mod:`mtl.models.lm.upcycling`). Because the whole construction is a
config, a checkpoint of the upcycled run reloads with
:func:`mtl.training.build.load_module` alone (the run saves the config without
``init_checkpoint``: the weights come from the checkpoint itself).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from omegaconf import DictConfig, OmegaConf
from torch import nn

from mtl.models.lm.blocks import SwiGLU
from mtl.models.lm.finetune import freeze_all_but_experts
from mtl.models.lm.lora import check_base_tokenizer
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

if TYPE_CHECKING:
    from mtl.data.tokenizers import Tokenizer

Freeze = Literal["none", "all_but_experts"]

_DENSE_TARGETS = ("mtl.models.lm.TransformerLM", "mtl.models.lm.transformer.TransformerLM")


class UpcycledLM(TransformerLM):
    """A dense LM (trained, from ``init_checkpoint``) with its FFNs upcycled to MoE layers.

    A :class:`~mtl.models.lm.TransformerLM` in every respect once built: the
    constructor builds the dense model ``dense`` describes, loads the dense
    weights, and replaces the FFNs with
    :func:`~mtl.models.lm.upcycling.copy_ffn` or
    :func:`~mtl.models.lm.upcycling.split_ffn` layers, whose output scale keeps
    the dense output (:func:`~mtl.models.lm.upcycling.preserving_scale`).

    Args:
        dense: keyword arguments of the dense :class:`~mtl.models.lm.TransformerLM`
            (a ``conf/model/lm_dense.yaml`` node; its ``_target_``, ``vocab_size`` and
            ``max_seq_len`` are replaced by this class's).
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
        init_checkpoint: a checkpoint of a dense run (``mtl train experiment=lm_dense``)
            whose weights the dense model takes before upcycling; None keeps the
            dense model's initialisation.
        freeze: ``"all_but_experts"`` trains only the experts and the routers
            (:func:`~mtl.models.lm.freeze_all_but_experts`).
        tokenizer: the run's tokenizer (the run passes it): ``init_checkpoint``'s must
            be the same vocabulary (fingerprint), not only the same size.

    Raises:
        ValueError: a ``dense`` node of another class or with MoE layers, an unknown
            method, a combination that cannot keep the dense output, an
            ``init_checkpoint`` of another tokenizer.
        FileNotFoundError: ``init_checkpoint`` does not exist.

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
        init_checkpoint: str | None = None,
        freeze: Freeze = "none",
        tokenizer: Tokenizer | None = None,
    ) -> None:
        if method not in ("copy", "split"):
            raise ValueError(f"method must be 'copy' or 'split', got {method!r}")
        if freeze not in ("none", "all_but_experts"):
            raise ValueError(f"freeze must be 'none' or 'all_but_experts', got {freeze!r}")
        kwargs = _dense_kwargs(dense)
        if max_seq_len is not None:
            kwargs["max_seq_len"] = max_seq_len
        super().__init__(vocab_size=vocab_size, **kwargs)
        if init_checkpoint is not None:
            _load_dense_weights(self, init_checkpoint, tokenizer=tokenizer)
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


def _dense_kwargs(dense: Mapping[str, Any]) -> dict[str, Any]:
    node = OmegaConf.to_container(dense, resolve=True) if isinstance(dense, DictConfig) else dense
    kwargs = dict(node)  # type: ignore[arg-type]
    target = kwargs.pop("_target_", None)
    if target is not None and target not in _DENSE_TARGETS:
        raise ValueError(f"dense must describe a TransformerLM, got _target_={target!r}")
    for key in ("_partial_", "_recursive_", "_convert_"):
        kwargs.pop(key, None)
    if kwargs.get("moe") is not None:
        raise ValueError("dense must describe a dense model (moe: null) to upcycle")
    kwargs.pop("moe", None)
    kwargs.pop("vocab_size", None)
    if kwargs.get("max_seq_len") is None:
        kwargs.pop("max_seq_len", None)
    return kwargs


def _load_dense_weights(lm: nn.Module, path: str, *, tokenizer: Tokenizer | None = None) -> None:
    """The ``net.*`` weights of a dense run's checkpoint, into ``lm`` (strict); the
    checkpoint's tokenizer must be ``tokenizer`` where both are known."""
    from mtl.training.checkpoints import read_checkpoint  # training imports models, not back

    if not Path(path).is_file():
        raise FileNotFoundError(f"init_checkpoint not found: {path}")
    checkpoint = read_checkpoint(path, role="init_checkpoint", require=("state_dict",))
    saved = checkpoint.get("lm_tokenizer")
    if tokenizer is not None and saved is not None:
        check_base_tokenizer(saved, tokenizer, key="model.init_checkpoint", path=path)
    state = checkpoint["state_dict"]
    weights = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    missing, unexpected = lm.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"init_checkpoint {path} does not fit the dense model: missing {sorted(missing)[:4]}, "
            f"unexpected {sorted(unexpected)[:4]} (is it a dense run of the same sizes?)"
        )
