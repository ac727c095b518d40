"""Fine-tuning helpers: freeze everything but the experts, or freeze the experts.

Both return :class:`ParamCounts` so that a script can log (and a test check)
what is left to train.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mtl.moe import MoELayer


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model after freezing.

    Attributes:
        trainable: elements with ``requires_grad``.
        frozen: elements without.

    Example:
        >>> ParamCounts(trainable=3, frozen=5).total
        8
    """

    trainable: int
    frozen: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


def count_parameters(model: nn.Module) -> ParamCounts:
    """Count trainable and frozen parameters (shared tensors counted once).

    Example:
        >>> count_parameters(nn.Linear(3, 2)).trainable
        8
    """
    trainable = frozen = 0
    for p in model.parameters():  # parameters() deduplicates tied tensors
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return ParamCounts(trainable=trainable, frozen=frozen)


def _expert_modules(model: nn.Module, *, include_shared: bool) -> list[nn.Module]:
    mods: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, MoELayer):
            mods.append(m.experts)
            if include_shared and m.shared is not None:
                mods.append(m.shared)
    if not mods:
        raise ValueError("the model has no MoE layer: nothing to (un)freeze as experts")
    return mods


def freeze_all_but_experts(
    model: nn.Module, *, include_shared: bool = True, include_router: bool = True
) -> ParamCounts:
    """Train only the experts of every MoE layer and, by default, their routers.

    The routers stay trainable unless ``include_router=False``: after upcycling
    the router is new (random), and a frozen random router is rarely wanted.

    Args:
        model: any module containing :class:`~mtl.moe.MoELayer`s.
        include_shared: keep shared (always-on) experts trainable too.
        include_router: keep the gates trainable (default); False freezes them.

    Returns:
        The counts after freezing.

    Example:
        >>> from mtl.models.lm import TransformerLM
        >>> from mtl.models.lm.upcycling import copy_ffn, upcycle_transformer
        >>> lm = TransformerLM(vocab_size=20, d_model=8, n_layers=1, n_heads=2, d_ff=16)
        >>> _ = upcycle_transformer(lm, make_moe=lambda f, i: copy_ffn(f, num_experts=2, k=1))
        >>> freeze_all_but_experts(lm).trainable  # 2 experts x 3 x 8 x 16, router 8 x 2
        784
        >>> freeze_all_but_experts(lm, include_router=False).trainable
        768
    """
    keep = _expert_modules(model, include_shared=include_shared)
    if include_router:
        keep += [m.gate for m in model.modules() if isinstance(m, MoELayer)]
    for p in model.parameters():
        p.requires_grad_(False)
    for m in keep:
        for p in m.parameters():
            p.requires_grad_(True)
    return count_parameters(model)


def freeze_experts(model: nn.Module, *, include_shared: bool = True) -> ParamCounts:
    """Freeze the experts of every MoE layer; everything else stays as it was.

    Args:
        model: any module containing :class:`~mtl.moe.MoELayer`s.
        include_shared: freeze shared experts too.

    Returns:
        The counts after freezing.

    Example:
        >>> from mtl.models.lm import TransformerLM
        >>> from mtl.models.lm.upcycling import copy_ffn, upcycle_transformer
        >>> lm = TransformerLM(vocab_size=20, d_model=8, n_layers=1, n_heads=2, d_ff=16)
        >>> _ = upcycle_transformer(lm, make_moe=lambda f, i: copy_ffn(f, num_experts=2, k=1))
        >>> freeze_experts(lm).frozen
        768
    """
    for m in _expert_modules(model, include_shared=include_shared):
        for p in m.parameters():
            p.requires_grad_(False)
    return count_parameters(model)


def unfreeze_all(model: nn.Module) -> ParamCounts:
    """Make every parameter trainable again."""
    for p in model.parameters():
        p.requires_grad_(True)
    return count_parameters(model)
