"""LoRA fine-tuning of a trained language model: adapters, freezing, merging, adapter files.

:func:`add_lora` replaces the targeted layers of a model by adapted ones that
share the trained weights: attention and dense FFN projections
(``nn.Linear`` -> :class:`LoRALinear`, ``y = x W^T + (alpha / r) x A^T B^T``)
and SwiGLU expert banks (-> :class:`~mtl.moe.lora.LoRASwiGLUExperts`, one
adapter per expert on the stacked ``(E, D, H)`` weights). ``B`` starts at zero,
so the adapted model computes what the trained one did.

Base parameter names do not change (``layers.0.attn.q_proj.weight``); every
adapter parameter has ``lora_`` in its name. Hence:

* :func:`mark_only_lora_trainable` trains the adapters only;
* :func:`lora_state_dict` / :func:`save_adapters` keep the adapters only, and a
  trained base plus :func:`load_adapters` rebuilds the adapted model;
* :func:`merge_lora` folds every adapter into its weight and puts the plain
  layer back (same outputs, no extra cost at inference).

``peft`` is not used (nor a dependency): its LoRA layers wrap ``nn.Linear``-like
modules, not a bank's stacked ``(E, D, H)`` parameters multiplied by a grouped
matmul over dispatched rows; the adapters here go through that matmul.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.models.lm.finetune import ParamCounts, count_parameters
from mtl.models.lm.transformer import TransformerLM
from mtl.moe import SwiGLUExperts
from mtl.moe.lora import LoRASwiGLUExperts

if TYPE_CHECKING:
    from mtl.data.tokenizers import Tokenizer


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a rank-``r`` update: ``y = x W^T + b + (alpha / r) (x A^T) B^T``.

    Build it around a trained layer with :meth:`from_linear` (weight and bias
    are shared, not copied).

    Args:
        in_features, out_features, bias: as :class:`torch.nn.Linear`.
        rank: ``r``.
        alpha: the update is scaled by ``alpha / r``.

    Attributes:
        lora_A: ``(r, in_features)``, drawn as nn.Linear draws a weight.
        lora_B: ``(out_features, r)``, zero at the start.

    Shapes:
        ``(..., in_features) -> (..., out_features)``.

    Example:
        >>> base = nn.Linear(8, 4, bias=False)
        >>> lora = LoRALinear.from_linear(base, rank=2, alpha=4.0)
        >>> x = torch.randn(3, 8)
        >>> torch.equal(lora(x), base(x))
        True
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, rank: int, alpha: float
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        self.lora_A = nn.Parameter(torch.empty(self.rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, self.rank))
        nn.init.uniform_(self.lora_A, -1.0 / math.sqrt(in_features), 1.0 / math.sqrt(in_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rank: int, alpha: float) -> LoRALinear:
        """Adapters around ``linear``, sharing its weight (and bias)."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"LoRALinear wraps a plain nn.Linear, got {type(linear).__name__}")
        lora = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            rank=rank,
            alpha=alpha,
        )
        lora.to(device=linear.weight.device, dtype=linear.weight.dtype)
        lora.weight = linear.weight
        if linear.bias is not None:
            lora.bias = linear.bias
        return lora

    def forward(self, x: Tensor) -> Tensor:
        low = F.linear(F.linear(x, self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + self.scaling * low

    def delta_weight(self) -> Tensor:
        """``(alpha / r) B A``, shaped like the weight ``(out, in)``."""
        return self.scaling * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """Fold the update into the (shared) weight; returns a plain Linear holding it."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        self.weight.add_(self.delta_weight().to(self.weight.dtype))
        plain.weight = self.weight
        if self.bias is not None:
            plain.bias = self.bias
        return plain

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "experts")
"""Attention projections and the routed expert banks."""


@dataclass(frozen=True)
class LoRAConfig:
    """Which layers get adapters, and their rank and scale.

    Args:
        rank: ``r``.
        alpha: updates are scaled by ``alpha / r``.
        targets: last component of the module names to adapt: Linear layers
            (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``; dense FFN
            ``gate_proj``, ``up_proj``, ``down_proj``) and SwiGLU expert banks
            (``experts``: routed; ``shared``: always-on).

    Example:
        >>> lm = TransformerLM(vocab_size=20, d_model=8, n_layers=1, n_heads=2, d_ff=16)
        >>> LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj")).apply(lm)
        ['layers.0.attn.q_proj', 'layers.0.attn.v_proj']
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)

    def apply(self, model: nn.Module) -> list[str]:
        """:func:`add_lora` with this configuration."""
        return add_lora(model, rank=self.rank, alpha=self.alpha, targets=self.targets)

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def lm_from_checkpoint(
        cls,
        *,
        checkpoint: str,
        rank: int = 8,
        alpha: float = 16.0,
        targets: Sequence[str] = DEFAULT_TARGETS,
        train_also: Sequence[str] = (),
        vocab_size: int | None = None,
        max_seq_len: int | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> TransformerLM:
        """The language model of a training checkpoint with adapters, adapters trainable only.

        The ``_target_`` of the ``lm_lora`` experiment's model: the run then
        fine-tunes the adapters (the optimizer sees trainable parameters only).

        Args:
            checkpoint: a ``mtl train`` checkpoint of a language model.
            rank, alpha, targets: see :class:`LoRAConfig`.
            train_also: substrings of parameter names kept trainable too (``gate.``: the routers).
            vocab_size: the data's vocabulary size (must be the checkpoint's).
            max_seq_len: the data's block size (at most the checkpoint's).
            tokenizer: the run's tokenizer (the run passes it): the checkpoint's must be
                the same vocabulary (fingerprint), not only the same size.

        Raises:
            FileNotFoundError: ``checkpoint`` does not exist.
            ValueError: the data's vocabulary or block size does not fit the checkpoint
                (:class:`~mtl.training.lm_module.VocabularyMismatchError`: another
                tokenizer, even of the same size).
        """
        from mtl.training.build import load_module  # the training layer builds on the models

        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"model.checkpoint: no checkpoint file {checkpoint}")
        module = load_module(checkpoint)
        net = module.net
        if not isinstance(net, TransformerLM):
            raise ValueError(f"model.checkpoint: {checkpoint} holds no language model")
        saved = getattr(module, "tokenizer", None)
        if tokenizer is not None and saved is not None:
            check_base_tokenizer(
                {"state": saved.state_dict(), "fingerprint": saved.fingerprint()},
                tokenizer,
                key="model.checkpoint",
                path=checkpoint,
            )
        if vocab_size is not None and vocab_size != net.vocab_size:
            raise ValueError(
                f"model.checkpoint: {checkpoint} has vocab_size={net.vocab_size}, "
                f"the data's tokenizer {vocab_size} (use the data the model was trained on)"
            )
        if max_seq_len is not None and max_seq_len > net.max_seq_len:
            raise ValueError(
                f"data.block_size={max_seq_len} exceeds the checkpoint's max_seq_len={net.max_seq_len}"
            )
        cls(rank=rank, alpha=alpha, targets=tuple(targets)).apply(net)
        mark_only_lora_trainable(net, train_also=train_also)
        return net


def check_base_tokenizer(
    saved: Mapping[str, Any], tokenizer: Tokenizer, *, key: str, path: str | Path
) -> None:
    """Refuse to fine-tune the weights of checkpoint ``path`` on data of another tokenizer.

    ``saved`` is the checkpoint's ``lm_tokenizer`` entry (``state``, ``fingerprint``);
    the comparison is :func:`~mtl.training.lm_module.check_vocabulary`'s, the one
    resuming uses: equal fingerprints, so two tokenizers of one size that map ids
    to other symbols differ.

    Raises:
        VocabularyMismatchError: the vocabularies differ (a ``ValueError``).
    """
    from mtl.training.lm_module import VocabularyMismatchError, check_vocabulary

    try:
        check_vocabulary(saved, tokenizer)
    except VocabularyMismatchError as exc:
        details = str(exc).removeprefix("cannot resume: ")  # the message is worded for resuming
        raise VocabularyMismatchError(
            f"{key}: {path} was trained with another tokenizer than this run's data: {details}"
        ) from None


def add_lora(
    model: nn.Module, *, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS
) -> list[str]:
    """Replace every targeted layer of ``model`` by its adapted version, in place.

    Args:
        model: any module (usually a :class:`~mtl.models.lm.TransformerLM`).
        rank, alpha, targets: see :class:`LoRAConfig`.

    Returns:
        The qualified names of the adapted modules.

    Raises:
        ValueError: see :func:`adapted_modules`.
    """
    found = adapted_modules(model, rank=rank, alpha=alpha, targets=targets)
    for name, new in found:
        _replace(model, name, new)
    return [name for name, _ in found]


def adapted_modules(
    model: nn.Module, *, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS
) -> list[tuple[str, nn.Module]]:
    """The adapted version of every targeted layer, by qualified name; ``model`` is not changed.

    The new modules share the base weights, so building them is cheap; putting
    them in place is :func:`add_lora`'s step (a caller may check them first).

    Raises:
        ValueError: no module matches ``targets``, or a match is neither a
            plain ``nn.Linear`` nor a ``SwiGLUExperts`` bank, or the model
            already has adapters.
    """
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters (merge them first)")
    wanted = set(targets)
    found: list[tuple[str, nn.Module]] = [
        (name, module)
        for name, module in model.named_modules()
        if name and name.rsplit(".", 1)[-1] in wanted
    ]
    if not found:
        raise ValueError(f"LoRA targets {sorted(wanted)} match no module of the model")
    out: list[tuple[str, nn.Module]] = []
    for name, module in found:
        if type(module) is nn.Linear:
            new: nn.Module = LoRALinear.from_linear(module, rank=rank, alpha=alpha)
        elif type(module) is SwiGLUExperts:
            new = LoRASwiGLUExperts.from_bank(module, rank=rank, alpha=alpha)
        else:
            raise ValueError(
                f"LoRA target {name} is a {type(module).__name__}; adapters wrap nn.Linear "
                "and SwiGLUExperts only"
            )
        out.append((name, new))
    return out


def has_lora(model: nn.Module) -> bool:
    """Whether any module of ``model`` carries adapters."""
    return any(isinstance(m, LoRALinear | LoRASwiGLUExperts) for m in model.modules())


def mark_only_lora_trainable(model: nn.Module, *, train_also: Sequence[str] = ()) -> ParamCounts:
    """Freeze everything but the adapters (and parameters whose names contain a ``train_also`` entry).

    Example:
        >>> lm = TransformerLM(vocab_size=20, d_model=8, n_layers=1, n_heads=2, d_ff=16)
        >>> _ = add_lora(lm, rank=2, alpha=2.0, targets=("q_proj",))
        >>> mark_only_lora_trainable(lm).trainable  # A (2, 8) + B (8, 2)
        32
    """
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapters: add_lora first")
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in f".{name}" or any(s in name for s in train_also))
    return count_parameters(model)


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its weight and put the plain layer back, in place.

    The merged model computes the adapted model's outputs (up to rounding) with
    the base architecture, so its state dict loads into a model built without
    adapters. Returns the names of the merged modules.
    """
    merged = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, LoRALinear | LoRASwiGLUExperts)
    ]
    for name, module in merged:
        _replace(model, name, module.merged())
    return [name for name, _ in merged]


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors of ``model`` only (names containing ``lora_``), detached."""
    return {
        name: value.detach().clone()
        for name, value in model.state_dict().items()
        if ".lora_" in f".{name}"
    }


def load_lora_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load adapter tensors into a model with the same adapters; missing or extra names fail."""
    own = {name for name in model.state_dict() if ".lora_" in f".{name}"}
    missing, extra = sorted(own - set(state)), sorted(set(state) - own)
    if missing or extra:
        raise ValueError(
            f"adapter state does not match the model's adapters: missing {missing[:3]}, "
            f"unexpected {extra[:3]}"
        )
    model.load_state_dict(dict(state), strict=False)


def adapter_config(model: nn.Module) -> LoRAConfig:
    """The :class:`LoRAConfig` that adds ``model``'s adapters (rank and alpha of its first adapter).

    Example:
        >>> lm = TransformerLM(vocab_size=20, d_model=8, n_layers=1, n_heads=2, d_ff=16)
        >>> _ = add_lora(lm, rank=2, alpha=4.0, targets=("v_proj", "q_proj"))
        >>> adapter_config(lm)
        LoRAConfig(rank=2, alpha=4.0, targets=('q_proj', 'v_proj'))
    """
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, LoRALinear | LoRASwiGLUExperts)
    ]
    if not found:
        raise ValueError("the model has no LoRA adapters")
    first = found[0][1]
    targets = tuple(sorted({name.rsplit(".", 1)[-1] for name, _ in found}))
    return LoRAConfig(rank=first.rank, alpha=first.alpha, targets=targets)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# The adapter files live in their own module; importing them here keeps
# ``from mtl.models.lm.lora import save_adapters`` working.
from mtl.models.lm.lora_io import ADAPTER_FORMAT, load_adapters, save_adapters  # noqa: E402, F401
